"""Attention math shared by the single-device Mixtral model (:mod:`fsmoe.models.mixtral`) and its
tensor-parallel attention (:mod:`fsmoe.parallel.tensor_parallel`), written once: rotary position tables,
their application, and grouped-query causal attention on fused projections. Pure tensor functions; imports
nothing from fsmoe.

Legend: B batch, L sequence length, N query heads, G key/value heads, Dh head dim, P = Dh / 2 rotary pairs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.lru_cache(maxsize=32)
def rope_tables(L: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(cos_LP, sin_LP)`` of the angles pos·θ^(-2p/Dh) for positions 0..L-1 and pairs p, in float32;
    built once per (L, Dh, θ, device) and shared by every layer (callers never write into them)."""
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


__all__ = ["apply_rope", "grouped_causal_attention", "rope_tables"]
