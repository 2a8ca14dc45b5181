"""Apply parallelism to a single-device model from outside: shards, dispatchers, pipelines, plans.

Every rank builds the same full model (GPT-MoE or Mixtral) from the same seed, then :func:`parallelize_gpt`
keeps this rank's shards: MP attention heads (:class:`TensorParallelAttention`, or :class:`TensorParallelGQA`
for the Mixtral model's grouped-query attention), this rank's sequence shard,
and the MoE layers' expert shards behind a distributed dispatcher. The distributed model is therefore
exactly the single-device model with the same weights, which is what the equality tests rely on
(building the full model first costs memory once at start-up; fine for the model sizes trained here).

:func:`apply_pipeline` is the one entry point that pipelines MoE layers: it swaps each layer's expert
block for a :class:`~fsmoe.schedule.pipelined.Pipeline` (per-layer degrees allowed), and
:func:`remove_pipeline` swaps the default block back. :func:`attach_gradient_plan` then wires a
gradient plan's slots into the model, including each pipeline's Gradient-AllReduce task.

:class:`RoutingGrid` is the single-device side of the same contract: it makes the reference model
route each rank's tokens as a separate routing group, so "distributed == single-process" is defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
from torch import Tensor, nn

from fsmoe.config import ModelConfig, ScheduleSpec, get_schedule
from fsmoe.moe.block import ExpertBlock
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import build_experts
from fsmoe.moe.layer import MoELayer, MoEStats
from fsmoe.parallel.comm import Group
from fsmoe.parallel.dims import ProcessGroups
from fsmoe.parallel.dispatch import build_dispatcher
from fsmoe.parallel.grad_plan import TAIL, PlannedGradSync, StreamLayout, order_stream
from fsmoe.parallel.grad_sync import mark_replicas
from fsmoe.parallel.tensor_parallel import TensorParallelAttention, TensorParallelGQA
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime

Degrees = tuple[int, int]  # (r_fwd, r_bwd)


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


def tensor_parallel_attention(cfg: ModelConfig, group: Group) -> nn.Module:
    """The MP attention of the model ``cfg`` describes: GPT-MoE's multi-head attention or the Mixtral
    model's grouped-query attention with RoPE, heads split over ``group``."""
    if cfg.arch == "mixtral":
        return TensorParallelGQA(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.dropout, group)
    return TensorParallelAttention(cfg.d_model, cfg.n_heads, cfg.dropout, group)


def parallelize_gpt(
    model: nn.Module, groups: ProcessGroups, dispatcher: str = "a2a", *, equal_tokens: bool = True
) -> nn.Module:
    """In place: MP attention, sequence shard and distributed MoE layers for this rank, for either
    language model of :func:`fsmoe.models.build_lm` (its ``cfg.arch`` picks the MP attention).

    ``equal_tokens`` (default True) promises the MoE dispatcher that every rank feeds the model the same
    number of tokens in every forward, as the trainer does (batch_size/dense_dp sequences of seq_len,
    L/mp of them per MP rank): with a fixed capacity factor the layers then agree their capacity once per
    shape instead of in every forward (see the capacity agreement in :mod:`fsmoe.parallel.dispatch`). Pass
    False to feed ranks different batch sizes."""
    dims = groups.dims
    coords = dims.rank_layout(groups.rank)
    disp = (build_dispatcher(dispatcher, groups, equal_tokens=equal_tokens) if dims.ep * dims.esp > 1
            else build_dispatcher("local"))
    for block in model.blocks:
        if dims.mp > 1:
            tp = tensor_parallel_attention(model.cfg, groups.group("mp"))
            tp.load_shard(block.attn, coords.mp)
            block.attn = tp
        if isinstance(block.mlp, MoELayer):
            block.mlp = shard_moe_layer(block.mlp, groups, disp)
    model.seq_shard = (coords.mp, dims.mp)
    return model


def moe_layers(model_or_layers: nn.Module | Sequence[MoELayer]) -> list[MoELayer]:
    """The MoE layers of a model (every :class:`MoELayer` among its modules, in module order, also
    inside wrappers such as :class:`RoutingGrid`), or the given layers."""
    if isinstance(model_or_layers, nn.Module):
        return [m for m in model_or_layers.modules() if isinstance(m, MoELayer)]
    return list(model_or_layers)


def _per_layer(degrees: Degrees | Sequence[Degrees], n: int) -> list[Degrees]:
    """One (r_fwd, r_bwd) pair per layer from one pair for all or a list of pairs."""
    if len(degrees) == 2 and all(isinstance(r, int) for r in degrees):
        return [cast(Degrees, tuple(degrees))] * n
    pairs = [tuple(pair) for pair in cast(Sequence[Degrees], degrees)]
    if len(pairs) != n or any(len(pair) != 2 for pair in pairs):
        raise ValueError(
            f"degrees must be one (r_fwd, r_bwd) pair or one pair per MoE layer; got {list(degrees)} for {n} layers"
        )
    return cast(list[Degrees], pairs)


def apply_pipeline(
    model_or_layers: nn.Module | Sequence[MoELayer],
    spec: ScheduleSpec | str,
    degrees: Degrees | Sequence[Degrees],
    runtime: Runtime | None = None,
) -> list[Pipeline]:
    """Pipeline the expert block (dispatch → ESP gather → experts → ESP reduce → combine) of every MoE
    layer of ``model_or_layers`` under schedule ``spec``; returns the pipelines, one per layer in order.

    ``degrees`` is one (r_fwd, r_bwd) pair for all layers or one pair per layer (the planner picks
    them per layer). All layers share ``runtime`` (one set of lanes; default
    ``Runtime.for_schedule(spec)``), so their tasks queue on the same channels. The layers pad their
    capacity to each pipeline's lcm(r_fwd, r_bwd); outputs and gradients equal the unpipelined layer's.
    A pipeline's ``gar`` (its Gradient-AllReduce slice) is attached afterwards, by
    :func:`attach_gradient_plan` or by the caller. Applying again replaces the pipelines;
    :func:`remove_pipeline` restores the default block."""
    spec = get_schedule(spec) if isinstance(spec, str) else spec
    layers = moe_layers(model_or_layers)
    runtime = runtime if runtime is not None else Runtime.for_schedule(spec)
    pairs = _per_layer(degrees, len(layers))
    pipes = [Pipeline(spec=spec, r_fwd=r_fwd, r_bwd=r_bwd, runtime=runtime) for r_fwd, r_bwd in pairs]
    for layer, pipe in zip(layers, pipes, strict=True):
        layer.expert_block = pipe
    return pipes


def remove_pipeline(model_or_layers: nn.Module | Sequence[MoELayer]) -> None:
    """Give every MoE layer of ``model_or_layers`` the default (unpipelined) expert block back."""
    for layer in moe_layers(model_or_layers):
        layer.expert_block = ExpertBlock()


def pipeline_of(layer: nn.Module) -> Pipeline | None:
    """The pipeline of an MoE layer, or None (not pipelined, or not an MoE layer)."""
    block = getattr(layer, "expert_block", None)
    return block if isinstance(block, Pipeline) else None


def gpt_gradient_stream(model: nn.Module) -> StreamLayout:
    """The gradient stream of a GPT-MoE or Mixtral model (see :mod:`fsmoe.parallel.grad_plan`; both name
    their parts ``blocks.i.{ln1,attn,ln2,mlp}``, ``ln_f``, ``head``): slots ``moe:i`` and
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
            pipe = pipeline_of(block.mlp)
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
        load_E: Tensor | None = None
        rows = []
        for i in range(gb):
            row = []
            for j in range(gs):
                row.append(self.layer(cells[i, :, j]))
                s = self.layer.last_stats
                aux, dropped, assigned = aux + s.aux_loss, dropped + s.num_dropped, assigned + s.num_assignments
                if s.expert_load_E is not None:
                    load_E = s.expert_load_E if load_E is None else load_E + s.expert_load_E
            rows.append(torch.stack(row, dim=1))
        out = torch.stack(rows, dim=0)  # (gb, B/gb, gs, L/gs, D)
        # Each rank's loss carries its own group's aux loss and the trainer averages losses over ranks,
        # so the reference averages the groups' aux losses.
        self.last_stats = MoEStats(aux_loss=aux / (gb * gs), num_dropped=dropped, num_assignments=assigned,
                                   expert_load_E=load_E)  # summed over the groups, as the trainer sums ranks
        return out.reshape(B, L, D)


def reference_grid(model: nn.Module, batch_groups: int, seq_groups: int) -> nn.Module:
    """In place: wrap every MoE layer of a single-device model in a :class:`RoutingGrid`."""
    for block in model.blocks:
        if isinstance(block.mlp, MoELayer):
            block.mlp = RoutingGrid(block.mlp, batch_groups, seq_groups)
    return model


__all__ = [
    "Degrees", "RoutingGrid", "apply_pipeline", "attach_gradient_plan", "gpt_gradient_stream", "moe_layers",
    "parallelize_gpt", "pipeline_of", "reference_grid", "remove_pipeline", "shard_moe_layer",
    "tensor_parallel_attention",
]
