"""Experts batched over the local experts on the (e, C, D) layout.

Legend: e local experts, C capacity slots, D model dim, H expert hidden dim.

Weights are stored per expert with H as an explicit axis (``w1_eDH``, ``w2_eHD``) so that expert
sharding (ESP) keeps a slice of H on each rank: the first GEMM is column-parallel, the second
row-parallel, and the partial outputs are summed across the shard group. The output bias is then
added by one shard only (``owns_output_bias``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.moe.config import EXPERT_NAMES


def shard_index(param_name: str, shard_shape: torch.Size, expert_offset: int, hidden_offset: int) -> tuple[slice, ...]:
    """Where a local shard sits inside the full expert parameter of the same name. The axes are read
    from the shape suffix (``w1_eDH``: experts, model dim, hidden): ``e`` and ``H`` are sliced."""
    axes = param_name.rsplit("_", 1)[1]
    starts = {"e": expert_offset, "H": hidden_offset}
    return tuple(
        slice(starts[a], starts[a] + n) if a in starts else slice(None) for a, n in zip(axes, shard_shape, strict=True)
    )


class Experts(nn.Module):
    """Base: ``forward(x_eCD) -> y_eCD``; ``num_local`` experts of hidden slice ``d_hidden``."""

    def __init__(self, num_local: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.num_local = num_local
        self.d_model = d_model
        self.d_hidden = d_hidden

    @torch.no_grad()
    def load_shard(self, full: Experts, expert_offset: int, hidden_offset: int) -> None:
        """Copy this rank's slice (experts from ``expert_offset``, hidden from ``hidden_offset``) of a
        full, unsharded expert module of the same kind."""
        for name, p in self.named_parameters():
            p.copy_(getattr(full, name)[shard_index(name, p.shape, expert_offset, hidden_offset)])

    def _param(self, *shape: int, fan_in: int) -> nn.Parameter:
        w = torch.empty(*shape)
        nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        return nn.Parameter(w)


class FFNExperts(Experts):
    """GPT-style expert: y = GELU(x·W1 + b1)·W2 + b2 (two GEMMs)."""

    def __init__(
        self, num_local: int, d_model: int, d_hidden: int, *, fan_in_hidden: int | None = None,
        owns_output_bias: bool = True,
    ) -> None:
        super().__init__(num_local, d_model, d_hidden)
        fan_h = fan_in_hidden or d_hidden
        self.w1_eDH = self._param(num_local, d_model, d_hidden, fan_in=d_model)
        self.b1_eH = self._param(num_local, d_hidden, fan_in=d_model)
        self.w2_eHD = self._param(num_local, d_hidden, d_model, fan_in=fan_h)
        self.b2_eD = self._param(num_local, d_model, fan_in=fan_h) if owns_output_bias else None

    def forward(self, x_eCD: Tensor) -> Tensor:
        h_eCH = F.gelu(torch.baddbmm(self.b1_eH.unsqueeze(1), x_eCD, self.w1_eDH))
        if self.b2_eD is None:
            return torch.bmm(h_eCH, self.w2_eHD)
        return torch.baddbmm(self.b2_eD.unsqueeze(1), h_eCH, self.w2_eHD)


class SwiGLUExperts(Experts):
    """Mixtral-style expert: y = (SiLU(x·W1) ⊙ x·W3)·W2 (three GEMMs, no biases)."""

    def __init__(
        self, num_local: int, d_model: int, d_hidden: int, *, fan_in_hidden: int | None = None,
        owns_output_bias: bool = True,
    ) -> None:
        super().__init__(num_local, d_model, d_hidden)
        fan_h = fan_in_hidden or d_hidden
        self.w1_eDH = self._param(num_local, d_model, d_hidden, fan_in=d_model)
        self.w3_eDH = self._param(num_local, d_model, d_hidden, fan_in=d_model)
        self.w2_eHD = self._param(num_local, d_hidden, d_model, fan_in=fan_h)

    def forward(self, x_eCD: Tensor) -> Tensor:
        h_eCH = F.silu(torch.bmm(x_eCD, self.w1_eDH)) * torch.bmm(x_eCD, self.w3_eDH)
        return torch.bmm(h_eCH, self.w2_eHD)


EXPERTS: dict[str, type[Experts]] = {"ffn": FFNExperts, "swiglu": SwiGLUExperts}
assert tuple(EXPERTS) == EXPERT_NAMES


def build_experts(name: str, num_local: int, d_model: int, d_hidden: int, **kwargs: object) -> Experts:
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; choose one of {', '.join(EXPERTS)}")
    return EXPERTS[name](num_local, d_model, d_hidden, **kwargs)  # type: ignore[arg-type]
