"""A Mixtral-style language model: RMSNorm, rotary positions, grouped-query attention, SwiGLU experts.

Legend: B batch, L sequence length (≤ ``seq_len``), D model dim, V vocabulary, N query heads, G key/value
heads (N / G query heads share one), Dh = D / N head dim, P = Dh / 2 rotary pairs, F dense MLP hidden.

Blocks are pre-norm like GPT-MoE's (:class:`~fsmoe.models.gpt_moe.PreNormBlock`, so parallelizing, the
gradient plan and the pipelined schedules treat both models alike): ``x = x + attn(ln1(x));
x = x + mlp(ln2(x))`` with RMSNorm (eps 1e-5, learned gain) as ``ln1``/``ln2``, grouped-query causal
attention with RoPE on q and k, and ``mlp`` an :class:`~fsmoe.moe.layer.MoELayer` (block i is MoE when
``(i + 1) % moe_every == 0``; the presets use SwiGLU experts in every block) or a dense SwiGLU MLP. No
biases in attention, norms, dense MLPs or head (``--expert swiglu``, the presets' experts, has none either;
``ffn`` experts keep theirs), no learned position embedding, a final RMSNorm, and a head tied to the embedding only
when ``tie_embeddings``.

Positions: attention always runs over the whole sequence (under sequence parallelism the tensor-parallel
attention gathers it first), so RoPE rotates by the global positions 0..L-1 wherever a token's shard lives.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ModelConfig
from fsmoe.models.gpt_moe import INIT_STD, ModelOutput, MoELanguageModel, PreNormBlock
from fsmoe.moe.layer import MoELayer
from fsmoe.nn.attention import grouped_causal_attention

RMS_EPS = 1e-5




class GroupedQueryAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE on one device: ``forward(x_BLD) -> y_BLD``.

    ``qkv`` (D → (N + 2G)·Dh) holds [q heads | k heads | v heads], ``proj`` (N·Dh → D); no biases."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float, dropout: float, out_std: float
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=INIT_STD)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x_BLD: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        y = grouped_causal_attention(self.qkv(x_BLD), self.n_heads, self.n_kv_heads, self.head_dim,
                                     self.rope_theta, p)
        return self.proj(y)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP ``x -> W2·(SiLU(W1·x) ⊙ W3·x)`` (hidden F), no biases; shape-preserving on (..., D)."""

    def __init__(self, d_model: int, d_ff: int, out_std: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        nn.init.normal_(self.w1.weight, std=INIT_STD)
        nn.init.normal_(self.w3.weight, std=INIT_STD)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralBlock(PreNormBlock):
    """Pre-RMSNorm block: grouped-query attention, then an MoE layer or a dense :class:`SwiGLU`."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        # As in GPT-2: residual-path output projections scaled by 1/sqrt(2·n_layers); experts keep their own.
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        ln1 = nn.RMSNorm(cfg.d_model, eps=RMS_EPS)
        attn = GroupedQueryAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.dropout, out_std)
        ln2 = nn.RMSNorm(cfg.d_model, eps=RMS_EPS)
        mlp = MoELayer.from_config(cfg.moe, cfg.d_model) if moe else SwiGLU(cfg.d_model, cfg.d_ff, out_std)
        super().__init__(ln1, attn, ln2, mlp, cfg.dropout)


class Mixtral(MoELanguageModel):
    """``forward(idx_BL, targets=None) -> ModelOutput``; idx and targets are token ids of shape (B, L).
    The same contract as :class:`~fsmoe.models.gpt_moe.GPTMoE` (``blocks``, ``moe_layers``,
    ``num_params()``, ``seq_shard``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.arch != "mixtral":
            raise ValueError(f"Mixtral needs a config with arch='mixtral', got arch={cfg.arch!r} (model {cfg.name!r})")
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=INIT_STD)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(MixtralBlock(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.RMSNorm(cfg.d_model, eps=RMS_EPS)
        self._build_head(cfg)

    def forward(self, idx_BL: Tensor, targets: Tensor | None = None) -> ModelOutput:
        idx_BL, targets, _ = self._shard(idx_BL, targets)  # positions enter in attention, over the whole sequence
        x_BLD = self.drop(self.wte(idx_BL))
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self._output(self.head(self.ln_f(x_BLD)), targets)
