"""Megatron-style tensor-parallel causal self-attention with sequence parallelism (MP).

Legend: B batch, L sequence, l = L / N_MP this rank's sequence shard, D model dim, N heads,
n = N / N_MP local heads, G key/value heads, g = G / N_MP local key/value heads, Dh head dim,
P = Dh / 2 rotary pairs.

Between layers every MP rank holds its own sequence shard x_BlD (sequence parallelism), so layer norms,
the MoE layer and the dense MLP run on l tokens per rank. Attention needs the whole sequence:

    x_BlD ─AllGather(seq)─► x_BLD ─column-parallel QKV (n heads)─► attention ─row-parallel proj─►
    partial y_BLD ─ReduceScatter(seq)─► y_BlD + bias

AllGather and ReduceScatter are each other's adjoints, so backward mirrors forward. The QKV and
projection weights are sharded by head (their gradients are complete after the ReduceScatter/AllGather
adjoints, and are replicated only across the dense-DP group); the output bias is added after the
ReduceScatter, so each rank's bias gradient covers its own tokens (replicated over the world).

:class:`TensorParallelAttention` shards GPT-MoE's multi-head attention; :class:`TensorParallelGQA` shards
the Mixtral model's grouped-query attention (no biases): rank r keeps query heads [r·n, (r+1)·n) and
key/value heads [r·g, (r+1)·g), which are exactly the key/value heads its query heads read, since query
head j reads key/value head j // (N / G). RoPE rotates after the AllGather, so it uses the global
positions 0..L-1 of the gathered sequence, as the single-device attention does.

This module owns the MP attention modules; their collectives come from :mod:`fsmoe.parallel.comm`. The
grouped-query attention math is the single-device model's own (:mod:`fsmoe.nn.attention`) on this rank's
heads; GPT-MoE's multi-head attention math is repeated here (:mod:`fsmoe.models` sits beside this package,
not below it), and the distributed-equals-single-process tests hold the two together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.nn.attention import grouped_causal_attention
from fsmoe.parallel.comm import all_gather, reduce_scatter
from fsmoe.parallel.grad_sync import mark_replicas


class TensorParallelAttention(nn.Module):
    """Holds heads [mp_rank·n, (mp_rank+1)·n) of a full attention with fused ``qkv`` (3D, D) laid out
    as [q heads | k heads | v heads] and ``proj`` (D, D) — the layout of the single-device module."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group
        self.mp = dist.get_world_size(group) if group is not None else 1
        if n_heads % self.mp:
            raise ValueError(f"n_heads={n_heads} is not divisible by the MP degree {self.mp}")
        self.n_local = n_heads // self.mp
        self.head_dim = d_model // n_heads
        self.d_model = d_model
        self.dropout = dropout
        d_local = self.n_local * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * d_local)
        self.proj = nn.Linear(d_local, d_model, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(d_model))
        mark_replicas([self.qkv.weight, self.qkv.bias, self.proj.weight], "dense_dp")

    @torch.no_grad()
    def load_shard(self, full: nn.Module, mp_rank: int) -> None:
        """Copy this rank's heads from a single-device attention with ``qkv`` and ``proj`` linears."""
        D, d = self.d_model, self.n_local * self.head_dim
        rows = torch.cat([torch.arange(part * D + mp_rank * d, part * D + (mp_rank + 1) * d) for part in range(3)])
        self.qkv.weight.copy_(full.qkv.weight[rows])
        self.qkv.bias.copy_(full.qkv.bias[rows])
        self.proj.weight.copy_(full.proj.weight[:, mp_rank * d : (mp_rank + 1) * d])
        self.proj_bias.copy_(full.proj.bias)

    def forward(self, x_BlD: Tensor) -> Tensor:
        x_BLD = all_gather(x_BlD, self.group, dim=1) if self.mp > 1 else x_BlD
        B, L, _ = x_BLD.shape
        n, Dh = self.n_local, self.head_dim
        q, k, v = (t.view(B, L, n, Dh).transpose(1, 2) for t in self.qkv(x_BLD).split(n * Dh, dim=-1))
        p = self.dropout if self.training else 0.0
        y_BnLh = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        partial_BLD = self.proj(y_BnLh.transpose(1, 2).reshape(B, L, n * Dh))
        y_BlD = reduce_scatter(partial_BLD, self.group, dim=1) if self.mp > 1 else partial_BLD
        return y_BlD + self.proj_bias


class TensorParallelGQA(nn.Module):
    """Holds query heads [mp_rank·n, (mp_rank+1)·n) and key/value heads [mp_rank·g, (mp_rank+1)·g) of a
    grouped-query attention with fused ``qkv`` ((N + 2G)·Dh, D) laid out as [q heads | k heads | v heads]
    and ``proj`` (D, N·Dh), no biases — the layout of :class:`fsmoe.models.mixtral.GroupedQueryAttention`.
    ``forward(x_BlD) -> y_BlD`` on this rank's sequence shard."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float, dropout: float,
        group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.group = group
        self.mp = dist.get_world_size(group) if group is not None else 1
        if n_heads % n_kv_heads or n_kv_heads % self.mp:
            raise ValueError(
                f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}, which must be divisible "
                f"by the MP degree {self.mp}"
            )
        self.n_local, self.kv_local = n_heads // self.mp, n_kv_heads // self.mp
        self.head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (self.n_local + 2 * self.kv_local) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_local * self.head_dim, d_model, bias=False)
        mark_replicas([self.qkv.weight, self.proj.weight], "dense_dp")

    @torch.no_grad()
    def load_shard(self, full: nn.Module, mp_rank: int) -> None:
        """Copy this rank's heads from a single-device grouped-query attention with ``qkv`` and ``proj``."""
        Dh, n, g = self.head_dim, self.n_local, self.kv_local
        q0, k0, v0 = 0, self.n_heads * Dh, (self.n_heads + self.n_kv_heads) * Dh  # where each part's rows start
        rows = torch.cat([
            torch.arange(q0 + mp_rank * n * Dh, q0 + (mp_rank + 1) * n * Dh),
            torch.arange(k0 + mp_rank * g * Dh, k0 + (mp_rank + 1) * g * Dh),
            torch.arange(v0 + mp_rank * g * Dh, v0 + (mp_rank + 1) * g * Dh),
        ])
        self.qkv.weight.copy_(full.qkv.weight[rows])
        self.proj.weight.copy_(full.proj.weight[:, mp_rank * n * Dh : (mp_rank + 1) * n * Dh])

    def forward(self, x_BlD: Tensor) -> Tensor:
        x_BLD = all_gather(x_BlD, self.group, dim=1) if self.mp > 1 else x_BlD
        p = self.dropout if self.training else 0.0  # this rank's heads: the single-device math, unchanged
        y = grouped_causal_attention(self.qkv(x_BLD), self.n_local, self.kv_local, self.head_dim, self.rope_theta, p)
        partial_BLD = self.proj(y)
        return reduce_scatter(partial_BLD, self.group, dim=1) if self.mp > 1 else partial_BLD
