"""Typed configuration of one MoE layer.

Legend: T tokens, D model dim (the paper's M), H expert hidden, E experts, K top-k, C capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

GATE_NAMES = ("gshard", "switch", "sigmoid", "xmoe", "expert_choice", "softmoe")
ORDER_NAMES = ("einsum", "index")
EXPERT_NAMES = ("ffn", "swiglu")
DROP_POLICIES = ("position", "probability")
NOISY_GATES = ("gshard", "switch", "sigmoid")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Everything needed to build an :class:`~fsmoe.moe.layer.MoELayer` for model dim D.

    ``capacity_factor`` is the paper's f: each expert has C = ceil(k·f·T/E) slots per routing group
    (T tokens in the group). ``None`` means no token is ever dropped (C = the busiest expert's load).
    """

    num_experts: int = 4
    top_k: int = 2
    d_hidden: int = 256
    gate: str = "gshard"
    order: str = "index"
    expert: str = "ffn"
    capacity_factor: float | None = 1.25
    min_capacity: int = 0
    capacity_multiple: int = 1  # C is rounded up to a multiple of this (pipelining pads to lcm(r_fwd, r_bwd))
    drop_policy: str = "position"
    renormalize: bool = False  # divide each token's kept weights by their sum
    noisy: bool = False  # GShard noisy gating (W_noise, softplus), in training only
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    xmoe_dim: int = 16  # X-MoE low-rank routing dimension
    softmoe_slots: int = 1  # SoftMoE slots per expert

    def __post_init__(self) -> None:
        _check_choice("gate", self.gate, GATE_NAMES)
        _check_choice("order", self.order, ORDER_NAMES)
        _check_choice("expert", self.expert, EXPERT_NAMES)
        _check_choice("drop policy", self.drop_policy, DROP_POLICIES)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.gate not in ("expert_choice", "softmoe") and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must satisfy 1 <= k <= E, got k={self.top_k} with E={self.num_experts} experts"
            )
        if self.gate == "expert_choice" and self.top_k < 1:
            raise ValueError(f"top_k is the average experts per token; got k={self.top_k} (expert_choice needs k >= 1)")
        if self.noisy and self.gate not in NOISY_GATES:
            raise ValueError(f"noisy gating applies to the {', '.join(NOISY_GATES)} gates, not {self.gate!r}")
        if self.gate == "switch" and self.top_k != 1:
            raise ValueError(f"the switch gate is top-1, got top_k={self.top_k}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for no dropping), got {self.capacity_factor}")
        if self.gate == "expert_choice" and self.capacity_factor is None:
            raise ValueError("the expert_choice gate needs a capacity_factor (each expert picks C tokens)")
        for name in ("d_hidden", "capacity_multiple", "xmoe_dim", "softmoe_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
