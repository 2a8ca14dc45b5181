"""The single-device modular MoE layer and its swappable parts."""

from fsmoe.moe.config import MoEConfig
from fsmoe.moe.dispatch import Dispatcher, LocalDispatcher
from fsmoe.moe.experts import EXPERTS, Experts, FFNExperts, SwiGLUExperts, build_experts
from fsmoe.moe.gates import GATES, Gate, Routing, SoftAssignment, build_gate
from fsmoe.moe.hooks import MoEHook
from fsmoe.moe.layer import MoELayer, MoEStats
from fsmoe.moe.order import ORDERS, EinsumOrder, IndexOrder, Order, build_order

__all__ = [
    "EXPERTS", "GATES", "ORDERS", "Dispatcher", "EinsumOrder", "Experts", "FFNExperts", "Gate",
    "IndexOrder", "LocalDispatcher", "MoEConfig", "MoEHook", "MoELayer", "MoEStats", "Order", "Routing",
    "SoftAssignment", "SwiGLUExperts", "build_experts", "build_gate", "build_order",
]
