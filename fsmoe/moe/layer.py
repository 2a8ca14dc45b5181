"""The modular MoE layer: Gate → Order → Dispatch → Expert → Combine → I-Order (paper §3.1).

Legend: T tokens, D model dim, E experts, e local experts, C capacity slots.

This module owns the layer's data flow and the capacity padding. Each part is passed to the
constructor and can be swapped; :meth:`MoELayer.from_config` builds the standard parts from a
:class:`MoEConfig`. Dispatch → experts → combine is the layer's *expert block* (``expert_block``,
:class:`~fsmoe.moe.block.ExpertBlock` by default), which distribution code swaps from outside, e.g. for
the pipelined block. The aux loss reaches the trainer through ``last_stats``, a frozen record set by
each forward on the layer itself (no global state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import MoEConfig
from fsmoe.moe.block import ExpertBlock
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import Experts, build_experts
from fsmoe.moe.gates import Gate, Routing, SoftAssignment, build_gate, fit_capacity
from fsmoe.moe.hooks import HookChain, MoEHook
from fsmoe.moe.order import Order, build_order


@dataclass(kw_only=True, frozen=True)
class MoEStats:
    """Per-forward statistics of one MoE layer (of this rank's routing group).

    ``expert_load_E``: the (token, expert) assignments each of the E experts kept after capacity, i.e.
    its filled slots (SoftMoE fills none: every slot mixes all tokens); a tensor, read only when
    logging. None from wrappers that do not count it."""

    aux_loss: Tensor
    num_dropped: Tensor
    num_assignments: int
    expert_load_E: Tensor | None = None

    @property
    def dropped_fraction(self) -> float:
        # Syncs (a .item()); call it only when logging.
        return float(self.num_dropped.item()) / max(self.num_assignments, 1)


def pad_capacity(routing: Routing, agree: Callable[[int], int]) -> Routing:
    """Give the routing the capacity that ``agree`` settles on (never less than its own) by appending
    empty slots, which carry no token and weight 0, so outputs do not change."""
    capacity = agree(routing.capacity)
    extra = capacity - routing.capacity
    if extra == 0:
        return routing
    if extra < 0:
        raise ValueError(f"agreed capacity {capacity} is below this rank's capacity {routing.capacity}")
    if routing.soft is not None:  # padded slots mix no token and feed no token
        pad = (0, extra)
        soft = SoftAssignment(F.pad(routing.soft.dispatch_TES, pad), F.pad(routing.soft.combine_TES, pad))
        routing = replace(routing, soft=soft)
    return replace(
        routing,
        token_EC=F.pad(routing.token_EC, (0, extra), value=routing.num_tokens),
        weight_EC=F.pad(routing.weight_EC, (0, extra)),
        capacity=capacity,
    )


class MoELayer(nn.Module):
    """``forward(x) -> y`` for x of shape (..., D); all tokens form one routing group.

    ``expert_block`` runs dispatch → experts → combine: the default :class:`ExpertBlock`, or one that
    distribution code swaps in from outside (:func:`fsmoe.parallel.parallelize.apply_pipeline`).

    **Input.** ``x`` must be a floating-point tensor (a Python list, a NumPy array or an integer or bool
    tensor is refused with a ``ValueError`` naming its type) with at least one token. Its dtype must be
    the parameters' dtype: the layer does not cast (a float16/bfloat16/float64 input to a float32 layer
    is refused, naming both dtypes), because a silent cast would hide a precision change and a copy of
    every activation. Cast the input, convert the layer (``layer.to(torch.bfloat16)``), or run under
    ``torch.autocast``, which picks the compute dtype op by op (the check is skipped there).

    **Non-finite tokens.** A token whose features hold a NaN or an inf only spoils its own output row,
    under both orders, for the top-k and expert-choice gates: the experts work row by row and the
    orders keep a bad row out of the other tokens' sums (see :class:`~fsmoe.moe.order.EinsumOrder`).
    What remains: (1) routing still sends the bad token somewhere (its scores are NaN: top-k picks its
    lowest-index experts, the ``probability`` drop policy and expert-choice rank it first), so it takes
    capacity slots and may displace a finite token; (2) the aux losses average over all tokens, so a
    non-zero ``aux_loss_coef`` / ``z_loss_coef`` gives a NaN aux loss (a zero coefficient gives 0);
    (3) parameter gradients sum over all tokens, so a loss that includes the bad row gives NaN gradients;
    (4) SoftMoE mixes every token into every slot, so there one bad token spoils every output row."""

    def __init__(
        self,
        gate: Gate,
        order: Order,
        experts: Experts,
        dispatcher: Dispatcher | None = None,
        hooks: Sequence[MoEHook] = (),
    ) -> None:
        super().__init__()
        self.gate = gate
        self.order = order
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        self.hooks = list(hooks)
        self.d_model = gate.d_model
        self.expert_block: ExpertBlock = ExpertBlock()
        self.last_stats: MoEStats | None = None
        self.last_routing: Routing | None = None

    @classmethod
    def from_config(
        cls, cfg: MoEConfig, d_model: int, dispatcher: Dispatcher | None = None,
        hooks: Sequence[MoEHook] = (),
    ) -> MoELayer:
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        experts = build_experts(
            cfg.expert,
            dispatcher.num_local_experts(cfg.num_experts),
            d_model,
            dispatcher.local_hidden(cfg.d_hidden),
            fan_in_hidden=cfg.d_hidden,
            owns_output_bias=dispatcher.owns_output_bias,
        )
        return cls(build_gate(cfg, d_model), build_order(cfg.order), experts, dispatcher, hooks)

    def add_hook(self, hook: MoEHook) -> None:
        self.hooks.append(hook)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(
                f"MoE input must be a torch.Tensor of shape (..., D={self.d_model}), got {type(x).__name__}"
            )
        if not x.is_floating_point():
            raise ValueError(f"MoE input must be floating point, got dtype {x.dtype}")
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
        if len(dtypes) == 1 and x.dtype not in dtypes and not torch.is_autocast_enabled(x.device.type):
            (dtype,) = dtypes
            raise ValueError(
                f"MoE input dtype {x.dtype} does not match the layer's parameters ({dtype}); the layer does "
                f"not cast: pass x.to({dtype}), convert the layer with .to({x.dtype}), or use torch.autocast"
            )
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoE input must have trailing dim D={self.d_model}, got shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"MoE input is an empty batch (shape {tuple(x.shape)}); need at least one token")

    def _agree_capacity(self, capacity: int, num_tokens: int) -> int:
        """The capacity every rank that exchanges slots with this one uses, padded to what the expert
        block asks (a multiple of its ``capacity_multiple``). The dispatcher hears whether the gate's C
        is static (a function of T alone), which lets it skip the exchange when ranks have equal T."""
        agreed = self.dispatcher.agree_capacity(capacity, num_tokens=num_tokens, static=self.gate.static_capacity)
        return fit_capacity(agreed, multiple=self.expert_block.capacity_multiple)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        hooks = HookChain(layer=self, hooks=tuple(self.hooks))
        x_TD = hooks("before_moe_start", x.reshape(-1, self.d_model))
        routing = self.gate(x_TD)
        routing = pad_capacity(routing, partial(self._agree_capacity, num_tokens=routing.num_tokens))
        x_ECD = hooks("before_dispatch", self.order.order(x_TD, routing))
        y_ECD = hooks("after_combine", self.expert_block(x_ECD, self.dispatcher, self.experts, hooks))
        y_TD = hooks("before_moe_end", self.order.iorder(y_ECD, routing))
        self.last_routing = routing
        self.last_stats = MoEStats(
            aux_loss=routing.aux_loss, num_dropped=routing.num_dropped, num_assignments=routing.num_assignments,
            expert_load_E=(routing.token_EC < routing.num_tokens).sum(1),
        )
        return y_TD.view(x.shape)
