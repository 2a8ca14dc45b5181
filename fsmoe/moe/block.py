"""The expert block: the swappable middle of the MoE layer, on the expert layout.

Legend: E experts, e local experts, C capacity slots per expert, D model dim.

``block(x_ECD, dispatcher, experts, hooks) -> y_ECD`` runs Dispatch → (ESP AllGather) → experts →
(ESP ReduceScatter) → Combine. :class:`ExpertBlock` is the interface and its default: the steps one
after the other under plain autograd, with the ``after_dispatch`` / ``before_combine`` hooks around
the experts. It is the numerical reference for every other block.

A different block (the pipelined one, :class:`fsmoe.schedule.pipelined.Pipeline`) subclasses it and is
set on a layer from outside (:func:`fsmoe.parallel.parallelize.apply_pipeline`), so this package knows
nothing of schedules. ``capacity_multiple`` is what a block asks of the capacity: the layer pads C to a
multiple of it (empty slots change no output), e.g. a block that cuts C into R chunks asks for R.
"""

from __future__ import annotations

from torch import Tensor

from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import Experts
from fsmoe.moe.hooks import NO_HOOKS, HookChain


class ExpertBlock:
    """Default block: unpipelined, every step under autograd, hooks run between the steps."""

    @property
    def capacity_multiple(self) -> int:
        """C must be a multiple of this; the default block takes any C."""
        return 1

    def __call__(self, x_ECD: Tensor, dispatcher: Dispatcher, experts: Experts, hooks: HookChain = NO_HOOKS) -> Tensor:
        x_eCD = hooks("after_dispatch", dispatcher.dispatch(x_ECD))
        y_eCD = hooks("before_combine", experts(x_eCD))
        return dispatcher.combine(y_eCD)
