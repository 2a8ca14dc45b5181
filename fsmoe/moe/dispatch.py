"""Dispatch / Combine: move the expert layout to the ranks that own the experts, and back.

Legend: E experts in total, e = E / N_EP local experts, C capacity slots, D model dim.

``dispatch(x_ECD) -> x_eC'D`` hands each local expert every slot addressed to it (C' = C times the
number of source ranks); ``combine(y_eC'D) -> y_ECD`` is its inverse. The local dispatcher moves
nothing and is the numerical reference for the distributed ones, which share its signature.
"""

from __future__ import annotations

from torch import Tensor


class Dispatcher:
    """Base and local (single-device) dispatcher: identity both ways, all E experts are local."""

    name = "local"

    def num_local_experts(self, num_experts: int) -> int:
        return num_experts

    def dispatch(self, x_ECD: Tensor) -> Tensor:
        return x_ECD

    def combine(self, y_eCD: Tensor) -> Tensor:
        return y_eCD


LocalDispatcher = Dispatcher
