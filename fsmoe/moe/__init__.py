"""The single-device modular MoE layer and its swappable parts.

Imports only torch and :mod:`fsmoe.config`: no ``torch.distributed``, nothing from ``fsmoe.parallel``
or ``fsmoe.schedule``. Distribution and pipelining are applied from outside through the interfaces
defined here (:class:`Dispatcher`, :class:`ExpertBlock`).
"""

from fsmoe.config import MoEConfig
from fsmoe.moe.block import ExpertBlock
from fsmoe.moe.dispatch import Dispatcher, LocalDispatcher
from fsmoe.moe.experts import EXPERTS, Experts, FFNExperts, SwiGLUExperts, build_experts
from fsmoe.moe.gates import GATES, Gate, Routing, SoftAssignment, build_gate, capacity_for, fit_capacity
from fsmoe.moe.hooks import HOOK_POINTS, NO_HOOKS, HookChain, MoEHook
from fsmoe.moe.layer import MoELayer, MoEStats, pad_capacity
from fsmoe.moe.order import ORDERS, EinsumOrder, IndexOrder, Order, build_order

__all__ = [
    "EXPERTS", "GATES", "HOOK_POINTS", "NO_HOOKS", "ORDERS", "Dispatcher", "EinsumOrder", "ExpertBlock", "Experts",
    "FFNExperts", "Gate", "HookChain", "IndexOrder", "LocalDispatcher", "MoEConfig", "MoEHook", "MoELayer",
    "MoEStats", "Order", "Routing", "SoftAssignment", "SwiGLUExperts", "build_experts", "build_gate", "build_order",
    "capacity_for", "fit_capacity", "pad_capacity",
]
