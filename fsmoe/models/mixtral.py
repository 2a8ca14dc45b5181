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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ModelConfig
from fsmoe.models.gpt_moe import INIT_STD, ModelOutput, MoELanguageModel, PreNormBlock
from fsmoe.moe.layer import MoELayer

RMS_EPS = 1e-5


def rope_tables(L: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(cos_LP, sin_LP)`` of the angles pos·θ^(-2p/Dh) for positions 0..L-1 and pairs p, in float32."""
    inv_freq_P = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angle_LP = torch.arange(L, device=device, dtype=torch.float32)[:, None] * inv_freq_P
    return angle_LP.cos(), angle_LP.sin()


def apply_rope(x_BNLh: Tensor, cos_LP: Tensor, sin_LP: Tensor) -> Tensor:
    """Rotate each pair (x[p], x[p + P]) of every head vector by its position's angle (the half-split
    pairing of Hugging Face's Mixtral)."""
    P = x_BNLh.shape[-1] // 2
    x1, x2 = x_BNLh[..., :P], x_BNLh[..., P:]
    cos, sin = cos_LP.to(x_BNLh.dtype), sin_LP.to(x_BNLh.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def grouped_causal_attention(
    qkv_BLX: Tensor, n_heads: int, n_kv_heads: int, head_dim: int, theta: float, dropout_p: float
) -> Tensor:
    """Causal attention of fused projections ``qkv_BLX`` laid out [N q heads | G k heads | G v heads]
    (X = (N + 2G)·Dh), RoPE on q and k, query head j reading key/value head j // (N / G): y_BL(N·Dh)."""
    B, L, _ = qkv_BLX.shape
    q, k, v = qkv_BLX.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q_BNLh = q.view(B, L, n_heads, head_dim).transpose(1, 2)
    k_BGLh, v_BGLh = (t.view(B, L, n_kv_heads, head_dim).transpose(1, 2) for t in (k, v))
    cos_LP, sin_LP = rope_tables(L, head_dim, theta, qkv_BLX.device)
    q_BNLh, k_BGLh = apply_rope(q_BNLh, cos_LP, sin_LP), apply_rope(k_BGLh, cos_LP, sin_LP)
    # enable_gqa repeats each key/value head for its N / G query heads without materialising the copies.
    y_BNLh = F.scaled_dot_product_attention(
        q_BNLh, k_BGLh, v_BGLh, dropout_p=dropout_p, is_causal=True, enable_gqa=n_kv_heads != n_heads
    )
    return y_BNLh.transpose(1, 2).reshape(B, L, n_heads * head_dim)


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
