"""The six extension points of the MoE layer (paper §3.1) and the chain that runs them.

Subclass :class:`MoEHook` and override any of its points; each receives the layer and the tensor at
that point and returns the tensor to continue with (e.g. compress before dispatch, decompress after).
A layer runs only the hooks registered with it, in registration order, through a :class:`HookChain`
bound to it, so unused hooks cost nothing.

Tensors: ``x_TD`` tokens at the start, ``x_ECD`` the expert layout before/after dispatch,
``y_ECD`` expert outputs before/after combine, ``y_TD`` the layer's output at the end.

This module owns the hook vocabulary only; it does not know the layer class (the layer argument is
any ``nn.Module``), so the layer can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

HOOK_POINTS = (
    "before_moe_start",  # (layer, x_TD) -> x_TD, before the gate
    "before_dispatch",  # (layer, x_ECD) -> x_ECD, after Order
    "after_dispatch",  # (layer, x_eCD) -> x_eCD, in front of the experts (inside the expert block)
    "before_combine",  # (layer, y_eCD) -> y_eCD, behind the experts (inside the expert block)
    "after_combine",  # (layer, y_ECD) -> y_ECD, before I-Order
    "before_moe_end",  # (layer, y_TD) -> y_TD, the layer's output
)
BLOCK_POINTS = ("after_dispatch", "before_combine")  # the points inside the dispatch → combine block


class MoEHook:
    """No-op base: every point (see :data:`HOOK_POINTS` for its tensor) is the identity. A subclass
    overrides the points it needs, as methods or as instance attributes."""

    def _identity(self, layer: nn.Module, t: Tensor) -> Tensor:
        return t

    # One identity serves all six points: they differ only in the tensor they see.
    before_moe_start = before_dispatch = after_dispatch = _identity
    before_combine = after_combine = before_moe_end = _identity


assert all(getattr(MoEHook, p) is MoEHook._identity for p in HOOK_POINTS)


def overrides(hook: MoEHook, point: str) -> bool:
    """Whether ``hook`` does something at ``point`` (a method or an instance attribute there)."""
    return getattr(getattr(hook, point), "__func__", None) is not MoEHook._identity


@dataclass(frozen=True, eq=False)
class HookChain:
    """The hooks of one layer, bound to it: ``chain(point, t)`` passes ``t`` through every hook's
    ``point`` in registration order. The empty chain (:data:`NO_HOOKS`) returns ``t``."""

    layer: nn.Module | None = None
    hooks: tuple[MoEHook, ...] = ()

    def __call__(self, point: str, t: Tensor) -> Tensor:
        for hook in self.hooks:
            t = getattr(hook, point)(self.layer, t)
        return t

    def overriding(self, points: tuple[str, ...]) -> list[MoEHook]:
        """The hooks that do something at any of ``points``."""
        return [h for h in self.hooks if any(overrides(h, p) for p in points)]


NO_HOOKS = HookChain()
