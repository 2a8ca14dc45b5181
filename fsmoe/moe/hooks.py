"""The six extension points of the MoE layer (paper §3.1).

Subclass :class:`MoEHook` and override any of the methods; each receives the layer and the tensor at
that point and returns the tensor to continue with (e.g. compress before dispatch, decompress after).
The layer calls only the hooks registered with it, in order, so unused hooks cost nothing.

Tensors: ``x_TD`` tokens at the start, ``x_ECD`` the expert layout before/after dispatch,
``y_ECD`` expert outputs before/after combine, ``y_TD`` the layer's output at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from fsmoe.moe.layer import MoELayer

HOOK_POINTS = (
    "before_moe_start",
    "before_dispatch",
    "after_dispatch",
    "before_combine",
    "after_combine",
    "before_moe_end",
)


class MoEHook:
    """No-op base; every method is identity."""

    def before_moe_start(self, layer: MoELayer, x_TD: Tensor) -> Tensor:
        return x_TD

    def before_dispatch(self, layer: MoELayer, x_ECD: Tensor) -> Tensor:
        return x_ECD

    def after_dispatch(self, layer: MoELayer, x_ECD: Tensor) -> Tensor:
        return x_ECD

    def before_combine(self, layer: MoELayer, y_ECD: Tensor) -> Tensor:
        return y_ECD

    def after_combine(self, layer: MoELayer, y_ECD: Tensor) -> Tensor:
        return y_ECD

    def before_moe_end(self, layer: MoELayer, y_TD: Tensor) -> Tensor:
        return y_TD
