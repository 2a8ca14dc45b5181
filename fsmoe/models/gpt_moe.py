"""A GPT-2 style byte-level language model in which every ``moe_every``-th MLP is an MoE layer.

Legend: B batch, L sequence length (≤ ``seq_len``), D model dim, V vocabulary (256 bytes),
N heads, Dh = D / N head dim, F dense MLP hidden.

Blocks are pre-LN: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, where ``mlp`` is a dense GELU MLP or an
:class:`~fsmoe.moe.layer.MoELayer`. Block i (0-based) is MoE when ``(i + 1) % moe_every == 0``, so with
the default ``moe_every=2`` blocks 1, 3, 5, ... are MoE (GShard's "every other layer"). The model never
touches ``torch.distributed``: attention lives in its own class so that a tensor-parallel attention can
replace it, and expert parallelism enters through the MoE layer's dispatcher.

The parts every language model here shares live in this module too: :class:`PreNormBlock` (the block
structure, with the ``grad_slot`` hook the gradient plan uses) and :class:`MoELanguageModel` (the
sequence shard, ``moe_layers``, the parameter count, the loss and statistics tail);
:mod:`fsmoe.models.mixtral` builds on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ModelConfig
from fsmoe.moe.layer import MoELayer, MoEStats

INIT_STD = 0.02  # GPT-2's initialiser scale for the dense weights


@dataclass(frozen=True)
class ModelOutput:
    """``loss`` is the mean next-byte cross entropy (None without targets); ``aux_loss`` is the sum of
    the MoE layers' already-weighted aux losses (a zero scalar for a dense model), to be added to it."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    moe_stats: list[MoEStats]


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on one device: ``forward(x_BLD) -> y_BLD``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, out_std: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        _init_linear(self.qkv, INIT_STD)
        _init_linear(self.proj, out_std)

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        N = self.n_heads
        q_BLD, k_BLD, v_BLD = self.qkv(x_BLD).split(D, dim=-1)
        q_BNLh, k_BNLh, v_BNLh = (t.view(B, L, N, D // N).transpose(1, 2) for t in (q_BLD, k_BLD, v_BLD))
        p = self.dropout if self.training else 0.0
        y_BNLh = F.scaled_dot_product_attention(q_BNLh, k_BNLh, v_BNLh, dropout_p=p, is_causal=True)
        return self.proj(y_BNLh.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """Dense GELU MLP ``x -> W2·GELU(W1·x)``; shape-preserving on (..., D)."""

    def __init__(self, d_model: int, d_ff: int, out_std: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        _init_linear(self.fc, INIT_STD)
        _init_linear(self.proj, out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class _OnBackward(torch.autograd.Function):
    """Identity; its backward calls ``fn`` when the gradient of its output is complete."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[], None]) -> Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.fn()
        return grad, None


class PreNormBlock(nn.Module):
    """Pre-norm residual block ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` over given parts: ``ln1`` and
    ``ln2`` the norms (LayerNorm in GPT, RMSNorm in Mixtral), ``attn`` an attention ``(x_BLD) -> y_BLD``,
    ``mlp`` a dense MLP or an :class:`MoELayer`. Parts are registered in that order (parameter names and
    order are part of the checkpoint and of the gradient stream)."""

    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, mlp: nn.Module, dropout: float) -> None:
        super().__init__()
        self.ln1 = ln1
        self.attn = attn
        self.ln2 = ln2
        self.mlp = mlp
        self.drop = nn.Dropout(dropout)
        # Called in backward once the MLP/MoE branch is done, before this block's attention backward
        # (where a planned gradient all-reduce can overlap it); None costs nothing.
        self.grad_slot: Callable[[], None] | None = None

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x_BLD: Tensor) -> Tensor:
        x_BLD = x_BLD + self.drop(self.attn(self.ln1(x_BLD)))
        if self.grad_slot is not None:
            x_BLD = _OnBackward.apply(x_BLD, self.grad_slot)
        return x_BLD + self.drop(self.mlp(self.ln2(x_BLD)))


class Block(PreNormBlock):
    """GPT-2's pre-LN block; ``mlp`` is either :class:`MLP` or :class:`MoELayer`."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        # GPT-2: residual-path output projections scaled by 1/sqrt(2·n_layers) so the residual stream's
        # variance does not grow with depth. MoE experts keep their own initialisation.
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        ln1 = nn.LayerNorm(cfg.d_model)
        attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, out_std)
        ln2 = nn.LayerNorm(cfg.d_model)
        mlp = MoELayer.from_config(cfg.moe, cfg.d_model) if moe else MLP(cfg.d_model, cfg.d_ff, out_std)
        super().__init__(ln1, attn, ln2, mlp, cfg.dropout)


class MoELanguageModel(nn.Module):
    """What the language models share: ``blocks`` (set by the subclass, items :class:`PreNormBlock`),
    ``seq_shard`` = (this shard, number of shards) of the sequence axis, set by
    :func:`fsmoe.parallel.parallelize.parallelize_gpt` for sequence parallelism, the MoE layers, the
    parameter count, and the loss and statistics at the end of the forward."""

    blocks: nn.ModuleList

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.seq_shard: tuple[int, int] = (0, 1)

    def _build_head(self, cfg: ModelConfig) -> None:
        """The bias-free output head: the input embedding ``wte``'s weight when tied, else its own, drawn now."""
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        else:
            nn.init.normal_(self.head.weight, std=INIT_STD)

    @property
    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers (or wrappers of them that report ``last_stats``, e.g. a routing grid)."""
        return [b.mlp for b in self.blocks if hasattr(b.mlp, "last_stats")]

    def num_params(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _shard(self, idx_BL: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """This rank's shard of the positions: ``(idx_Bl, targets_Bl, pos_l)`` with ``pos_l`` the global
        positions of the shard. Sequence parallelism: a rank embeds, routes and scores only its shard;
        attention gathers the rest."""
        L = idx_BL.shape[1]
        if L > self.cfg.seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's seq_len={self.cfg.seq_len}")
        shard, shards = self.seq_shard
        if shards == 1:
            return idx_BL, targets, torch.arange(L, device=idx_BL.device)
        if L % shards:
            raise ValueError(f"sequence length {L} is not divisible by the {shards} sequence shards")
        keep = slice(shard * (L // shards), (shard + 1) * (L // shards))
        pos_l = torch.arange(keep.start, keep.stop, device=idx_BL.device)
        return idx_BL[:, keep], targets[:, keep] if targets is not None else None, pos_l

    def _output(self, logits_BLV: Tensor, targets: Tensor | None) -> ModelOutput:
        """The mean next-token loss (with targets) and the MoE layers' statistics of this forward."""
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits_BLV.flatten(0, 1).float(), targets.flatten())
        stats: list[MoEStats] = []
        for layer in self.moe_layers:
            if layer.last_stats is None:
                raise RuntimeError("an MoE layer did not set last_stats in its forward")
            stats.append(layer.last_stats)
        aux = sum((s.aux_loss for s in stats), logits_BLV.new_zeros(()))
        return ModelOutput(logits=logits_BLV, loss=loss, aux_loss=aux, moe_stats=stats)


class GPTMoE(MoELanguageModel):
    """``forward(idx_BL, targets=None) -> ModelOutput``; idx and targets are byte ids of shape (B, L)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=INIT_STD)
        nn.init.normal_(self.wpe.weight, std=INIT_STD)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._build_head(cfg)

    def forward(self, idx_BL: Tensor, targets: Tensor | None = None) -> ModelOutput:
        idx_BL, targets, pos_L = self._shard(idx_BL, targets)
        x_BLD = self.drop(self.wte(idx_BL) + self.wpe(pos_L))
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self._output(self.head(self.ln_f(x_BLD)), targets)
