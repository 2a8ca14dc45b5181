"""Megatron-style tensor-parallel causal self-attention with sequence parallelism (MP).

Legend: B batch, L sequence, l = L / N_MP this rank's sequence shard, D model dim, N heads,
n = N / N_MP local heads, Dh head dim.

Between layers every MP rank holds its own sequence shard x_BlD (sequence parallelism), so layer norms,
the MoE layer and the dense MLP run on l tokens per rank. Attention needs the whole sequence:

    x_BlD ─AllGather(seq)─► x_BLD ─column-parallel QKV (n heads)─► attention ─row-parallel proj─►
    partial y_BLD ─ReduceScatter(seq)─► y_BlD + bias

AllGather and ReduceScatter are each other's adjoints, so backward mirrors forward. The QKV and
projection weights are sharded by head (their gradients are complete after the ReduceScatter/AllGather
adjoints, and are replicated only across the dense-DP group); the output bias is added after the
ReduceScatter, so each rank's bias gradient covers its own tokens (replicated over the world).

This module owns the MP attention module; its collectives come from :mod:`fsmoe.parallel.comm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

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
