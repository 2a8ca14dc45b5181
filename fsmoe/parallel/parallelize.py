"""Turn a single-device GPT-MoE into this rank's part of the distributed model.

Every rank builds the same full model from the same seed, then :func:`parallelize_gpt` keeps this
rank's shards: MP attention heads (:class:`TensorParallelAttention`), this rank's sequence shard,
and the MoE layers' expert shards behind a distributed dispatcher. The distributed model is therefore
exactly the single-device model with the same weights, which is what the equality tests rely on
(building the full model first costs memory once at start-up; fine for the model sizes trained here).

:class:`RoutingGrid` is the single-device side of the same contract: it makes the reference model
route each rank's tokens as a separate routing group, so "distributed == single-process" is defined.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from fsmoe.moe.dispatch import Dispatcher, build_dispatcher
from fsmoe.moe.experts import build_experts
from fsmoe.moe.layer import MoELayer, MoEStats
from fsmoe.parallel.dims import ProcessGroups
from fsmoe.parallel.grad_plan import TAIL, PlannedGradSync, StreamLayout, order_stream
from fsmoe.parallel.grad_sync import mark_replicas
from fsmoe.parallel.tensor_parallel import TensorParallelAttention


def shard_moe_layer(full: MoELayer, groups: ProcessGroups, dispatcher: Dispatcher) -> MoELayer:
    """The distributed MoE layer holding this rank's experts (EP) and hidden slice (ESP) of ``full``."""
    cfg = full.gate.cfg
    coords = groups.dims.rank_layout(groups.rank)
    e = dispatcher.num_local_experts(cfg.num_experts)
    h = dispatcher.local_hidden(cfg.d_hidden)
    experts = build_experts(
        cfg.expert, e, full.d_model, h, fan_in_hidden=cfg.d_hidden, owns_output_bias=dispatcher.owns_output_bias
    )
    experts.load_shard(full.experts, coords.ep * e, coords.esp * h)
    mark_replicas(experts.parameters(), "expert_dp")
    return MoELayer(full.gate, full.order, experts, dispatcher, full.hooks)


def parallelize_gpt(model: nn.Module, groups: ProcessGroups, dispatcher: str = "a2a") -> nn.Module:
    """In place: MP attention, sequence shard and distributed MoE layers for this rank."""
    dims = groups.dims
    coords = dims.rank_layout(groups.rank)
    disp = build_dispatcher(dispatcher, groups) if dims.ep * dims.esp > 1 else build_dispatcher("local")
    for block in model.blocks:
        if dims.mp > 1:
            tp = TensorParallelAttention(model.cfg.d_model, model.cfg.n_heads, model.cfg.dropout, groups.mp)
            tp.load_shard(block.attn, coords.mp)
            block.attn = tp
        if isinstance(block.mlp, MoELayer):
            block.mlp = shard_moe_layer(block.mlp, groups, disp)
    model.seq_shard = (coords.mp, dims.mp)
    return model


def gpt_gradient_stream(model: nn.Module) -> StreamLayout:
    """The gradient stream of a GPT-MoE (see :mod:`fsmoe.parallel.grad_plan`): slots ``moe:i`` and
    ``dense:i`` from the last block to the first, then ``tail``; each parameter ready at the first slot
    after backward completes it. Tied or embedding parameters finish last (``tail``)."""
    blocks = list(model.blocks)
    slots: list[str] = []
    first_of: dict[int, str] = {}
    for i in reversed(range(len(blocks))):
        if isinstance(blocks[i].mlp, MoELayer):
            slots.append(f"moe:{i}")
        slots.append(f"dense:{i}")
        first_of[i] = slots[-2] if isinstance(blocks[i].mlp, MoELayer) else slots[-1]
    slots.append(TAIL)
    index = {s: k for k, s in enumerate(slots)}
    triples = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            i = int(parts[1])
            if parts[2] in ("ln2", "mlp"):
                ready = index[f"dense:{i}"]
            else:  # ln1, attn: done when block i's backward ends, i.e. at block i-1's first slot
                ready = index[first_of[i - 1]] if i > 0 else index[TAIL]
        elif parts[0] in ("ln_f", "head"):
            ready = 0
        else:  # embeddings (and a head tied to them) accumulate until the very end
            ready = index[TAIL]
        triples.append((name, p, ready))
    return order_stream(triples, slots)


def attach_gradient_plan(model: nn.Module, sync: PlannedGradSync, blocking_in_moe: bool = True) -> None:
    """Wire the plan's slots into the model: ``dense:i`` as block i's backward hook, ``moe:i`` as MoE
    layer i's Gradient-AllReduce task (its pipeline must run a schedule with a GAR slot)."""
    for slot in sync.slots_used():
        kind, i = slot.split(":")
        block = model.blocks[int(i)]
        if kind == "dense":
            block.grad_slot = partial(sync.fire, slot)
        else:
            pipe = getattr(block.mlp, "pipeline", None)
            if pipe is None or not pipe.spec.gar_in_moe:
                runs = "no pipelined schedule" if pipe is None else f"schedule {pipe.spec.name!r}"
                raise ValueError(
                    f"gradient plan uses slot {slot!r}, but MoE layer {i} runs {runs}, "
                    "which has no Gradient-AllReduce slot"
                )
            pipe.gar = partial(sync.fire, slot, wait=blocking_in_moe)


class RoutingGrid(nn.Module):
    """Single-device reference: route the (B, L) tokens as a grid of ``batch_groups × seq_groups``
    routing groups — the tokens each rank of a (dense-DP × MP) layout holds — one call each."""

    def __init__(self, layer: MoELayer, batch_groups: int, seq_groups: int) -> None:
        super().__init__()
        self.layer = layer
        self.grid = (batch_groups, seq_groups)
        self.last_stats: MoEStats | None = None

    def forward(self, x_BLD: Tensor) -> Tensor:
        gb, gs = self.grid
        B, L, D = x_BLD.shape
        if B % gb or L % gs:
            raise ValueError(f"batch {B} × sequence {L} does not split into a {gb} × {gs} routing grid")
        cells = x_BLD.view(gb, B // gb, gs, L // gs, D)
        aux, dropped, assigned = x_BLD.new_zeros(()), 0, 0
        rows = []
        for i in range(gb):
            row = []
            for j in range(gs):
                row.append(self.layer(cells[i, :, j]))
                s = self.layer.last_stats
                aux, dropped, assigned = aux + s.aux_loss, dropped + s.num_dropped, assigned + s.num_assignments
            rows.append(torch.stack(row, dim=1))
        out = torch.stack(rows, dim=0)  # (gb, B/gb, gs, L/gs, D)
        # Each rank's loss carries its own group's aux loss and the trainer averages losses over ranks,
        # so the reference averages the groups' aux losses.
        self.last_stats = MoEStats(aux / (gb * gs), dropped, assigned)
        return out.reshape(B, L, D)


def reference_grid(model: nn.Module, batch_groups: int, seq_groups: int) -> nn.Module:
    """In place: wrap every MoE layer of a single-device model in a :class:`RoutingGrid`."""
    for block in model.blocks:
        if isinstance(block.mlp, MoELayer):
            block.mlp = RoutingGrid(block.mlp, batch_groups, seq_groups)
    return model


__all__ = ["RoutingGrid", "attach_gradient_plan", "gpt_gradient_stream", "parallelize_gpt", "reference_grid",
           "shard_moe_layer"]
