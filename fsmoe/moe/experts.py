"""Experts batched over the local experts on the (e, C, D) layout.

Legend: e local experts, C capacity slots, D model dim, H expert hidden dim.

Weights are stored per expert with H as an explicit axis (``w1_eDH``, ``w2_eHD``) so that expert
sharding (ESP) keeps a slice of H on each rank: the first GEMM is column-parallel, the second
row-parallel, and the partial outputs are summed across the shard group. The output bias is then
added by one shard only (``owns_output_bias``).

This module owns the expert networks: each one's math written once (``_forward``), used by the
autograd ``forward`` and by ``forward_saving`` / ``backward_saved``, the manual pair that the
pipelined block runs chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import EXPERT_NAMES


def shard_index(param_name: str, shard_shape: torch.Size, expert_offset: int, hidden_offset: int) -> tuple[slice, ...]:
    """Where a local shard sits inside the full expert parameter of the same name. The axes are read
    from the shape suffix (``w1_eDH``: experts, model dim, hidden): ``e`` and ``H`` are sliced."""
    axes = param_name.rsplit("_", 1)[1]
    starts = {"e": expert_offset, "H": hidden_offset}
    return tuple(
        slice(starts[a], starts[a] + n) if a in starts else slice(None) for a, n in zip(axes, shard_shape, strict=True)
    )


class Experts(nn.Module):
    """Base: ``forward(x_eCD) -> y_eCD``; ``num_local`` experts of hidden slice ``d_hidden``.

    ``fan_in_hidden`` is the full (unsharded) H that initialises the second GEMM, so every ESP shard
    draws from the same distribution as the unsharded expert (default: ``d_hidden``);
    ``owns_output_bias``: whether this shard adds the output bias (one shard of each ESP group does)."""

    def __init__(
        self, num_local: int, d_model: int, d_hidden: int, *, fan_in_hidden: int | None = None,
        owns_output_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_local = num_local
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.fan_in_hidden = fan_in_hidden or d_hidden
        self.owns_output_bias = owns_output_bias

    # --- the math, once, and the manual backward of the pipelined block ---------------------------------
    # ``_forward`` is an expert's math written once: the output and the per-slot tensors its backward
    # needs, each (e, N, *). ``forward`` keeps the output (autograd saves what it needs itself);
    # ``forward_saving`` runs it without autograd and keeps both, for the pipelined block whose backward
    # re-chunks the slots. ``backward_saved`` takes the output gradient and those tensors for any subset
    # of the slots and returns the input gradient and one new gradient tensor per parameter (in
    # ``parameters()`` order; the caller sums chunks into them in place). A subclass overrides either
    # ``forward`` (then the base ``_forward`` saves only the input and ``backward_saved`` recomputes
    # under autograd, so any expert module works) or ``_forward`` and ``backward_saved`` (the built-in
    # experts: they save pre-activations and apply the exact derivatives).

    def _forward(self, x_eND: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        if type(self).forward is Experts.forward:
            raise NotImplementedError(f"{type(self).__name__} must override forward or _forward")
        return self(x_eND), (x_eND,)

    def forward(self, x_eCD: Tensor) -> Tensor:
        return self._forward(x_eCD)[0]

    @torch.no_grad()
    def forward_saving(self, x_eND: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self._forward(x_eND)

    def backward_saved(self, dy_eND: Tensor, saved: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
        params = list(self.parameters())
        with torch.enable_grad():
            x = saved[0].detach().requires_grad_()
            grads = torch.autograd.grad(self(x), [x, *params], dy_eND, allow_unused=True)
        dx, pgrads = grads[0], grads[1:]
        return dx, [torch.zeros_like(p) if g is None else g for p, g in zip(params, pgrads, strict=True)]

    @torch.no_grad()
    def load_shard(self, full: Experts, expert_offset: int, hidden_offset: int) -> None:
        """Copy this rank's slice (experts from ``expert_offset``, hidden from ``hidden_offset``) of a
        full, unsharded expert module of the same kind."""
        for name, p in self.named_parameters():
            p.copy_(getattr(full, name)[shard_index(name, p.shape, expert_offset, hidden_offset)])

    def _param(self, axes: str, fan_in: int) -> nn.Parameter:
        """A parameter of the shape its suffix names (``"eDH"``: e × D × H), U(±1/√fan_in)."""
        sizes = {"e": self.num_local, "D": self.d_model, "H": self.d_hidden}
        w = torch.empty(*(sizes[a] for a in axes))
        nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        return nn.Parameter(w)


class FFNExperts(Experts):
    """GPT-style expert: y = GELU(x·W1 + b1)·W2 + b2 (two GEMMs)."""

    def __init__(self, num_local: int, d_model: int, d_hidden: int, **kw: Any) -> None:
        super().__init__(num_local, d_model, d_hidden, **kw)  # keywords: see Experts
        self.w1_eDH = self._param("eDH", fan_in=d_model)
        self.b1_eH = self._param("eH", fan_in=d_model)
        self.w2_eHD = self._param("eHD", fan_in=self.fan_in_hidden)
        self.b2_eD = self._param("eD", fan_in=self.fan_in_hidden) if self.owns_output_bias else None

    def _forward(self, x_eND: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        pre_eNH = torch.baddbmm(self.b1_eH.unsqueeze(1), x_eND, self.w1_eDH)
        h_eNH = F.gelu(pre_eNH)
        if self.b2_eD is None:
            y_eND = torch.bmm(h_eNH, self.w2_eHD)
        else:
            y_eND = torch.baddbmm(self.b2_eD.unsqueeze(1), h_eNH, self.w2_eHD)
        return y_eND, (x_eND, pre_eNH)

    @torch.no_grad()
    def backward_saved(self, dy_eND: Tensor, saved: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
        x_eND, pre_eNH = saved
        dw2 = torch.bmm(F.gelu(pre_eNH).transpose(1, 2), dy_eND)  # GELU(pre) recomputed, dropped at once
        dh_eNH = torch.bmm(dy_eND, self.w2_eHD.transpose(1, 2))
        # in place: one (e, N, H) buffer for dh and dpre, where autograd's GELU backward holds both
        dpre_eNH = torch.ops.aten.gelu_backward.grad_input(dh_eNH, pre_eNH, grad_input=dh_eNH)
        dw1 = torch.bmm(x_eND.transpose(1, 2), dpre_eNH)
        dx = torch.bmm(dpre_eNH, self.w1_eDH.transpose(1, 2))
        grads = [dw1, dpre_eNH.sum(1), dw2]
        if self.b2_eD is not None:
            grads.append(dy_eND.sum(1))
        return dx, grads


class SwiGLUExperts(Experts):
    """Mixtral-style expert: y = (SiLU(x·W1) ⊙ x·W3)·W2 (three GEMMs, no biases)."""

    def __init__(self, num_local: int, d_model: int, d_hidden: int, **kw: Any) -> None:
        super().__init__(num_local, d_model, d_hidden, **kw)  # keywords: see Experts; no bias to own
        self.w1_eDH = self._param("eDH", fan_in=d_model)
        self.w3_eDH = self._param("eDH", fan_in=d_model)
        self.w2_eHD = self._param("eHD", fan_in=self.fan_in_hidden)

    def _forward(self, x_eND: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        g_eNH, u_eNH = torch.bmm(x_eND, self.w1_eDH), torch.bmm(x_eND, self.w3_eDH)
        return torch.bmm(F.silu(g_eNH) * u_eNH, self.w2_eHD), (x_eND, g_eNH, u_eNH)

    @torch.no_grad()
    def backward_saved(self, dy_eND: Tensor, saved: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
        x_eND, g_eNH, u_eNH = saved
        act_eNH = F.silu(g_eNH)
        dw2 = torch.bmm((act_eNH * u_eNH).transpose(1, 2), dy_eND)
        dh_eNH = torch.bmm(dy_eND, self.w2_eHD.transpose(1, 2))
        du_eNH = dh_eNH * act_eNH
        del act_eNH
        # in place: dh, dh·u and dg share one (e, N, H) buffer, where autograd holds them apart
        dg_eNH = torch.ops.aten.silu_backward.grad_input(dh_eNH.mul_(u_eNH), g_eNH, grad_input=dh_eNH)
        xt = x_eND.transpose(1, 2)
        dx = torch.bmm(dg_eNH, self.w1_eDH.transpose(1, 2)).add_(torch.bmm(du_eNH, self.w3_eDH.transpose(1, 2)))
        return dx, [torch.bmm(xt, dg_eNH), torch.bmm(xt, du_eNH), dw2]


EXPERTS: dict[str, type[Experts]] = {"ffn": FFNExperts, "swiglu": SwiGLUExperts}
assert tuple(EXPERTS) == EXPERT_NAMES


def build_experts(name: str, num_local: int, d_model: int, d_hidden: int, **kwargs: Any) -> Experts:
    """The experts ``name``; keywords ``fan_in_hidden`` and ``owns_output_bias`` (see :class:`Experts`)."""
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; choose one of {', '.join(EXPERTS)}")
    return EXPERTS[name](num_local, d_model, d_hidden, **kwargs)
