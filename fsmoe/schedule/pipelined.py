"""The pipelined dispatch → AllGather → expert → ReduceScatter → combine block as one autograd Function.

Legend: E experts, e local experts, C capacity slots per expert (of this rank's routing group),
W = N_EP, S = N_ESP, D model dim, R pipeline degree (r_fwd forward, r_bwd backward).

Forward splits the capacity axis into r_fwd chunks, each holding C/r_fwd slots of every expert, and
runs the schedule's forward task list. Backward re-splits into r_bwd chunks and runs the backward task
list. Because r_fwd and r_bwd may differ, what backward needs is stashed *per slot*, in one canonical
layout (e, S, W, C, *): the gathered expert inputs and the experts' pre-activations. Backward of chunk
j then reads slots [j·C/r_bwd, (j+1)·C/r_bwd) whatever the forward chunking was, and applies the exact
activation derivatives (``Experts.backward_saved``). C must be a multiple of lcm(r_fwd, r_bwd).

Autograd sees one op: ``y_ECD = pipelined(x_ECD, *expert_params)``; gate, Order and I-Order around it
stay ordinary autograd. The collectives inside run without autograd on the dispatcher's steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import Experts
from fsmoe.schedule.runtime import Runtime
from fsmoe.schedule.schedules import ScheduleSpec, backward_tasks, check_degrees, forward_tasks


@dataclass
class Pipeline:
    """How one MoE layer pipelines: its schedule, degrees, runtime, and the Gradient-AllReduce slice
    to launch inside its backward (``gar``: a callable run on the inter channel, or None)."""

    spec: ScheduleSpec
    r_fwd: int = 1
    r_bwd: int = 1
    runtime: Runtime | None = None
    gar: Callable[[], None] | None = None
    lanes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_degrees(self.spec, self.r_fwd, self.r_bwd)
        if self.runtime is None:
            inter = "inter"
            intra = "intra" if self.spec.separate_channels else "inter"
            self.runtime = Runtime({"inter": inter, "intra": intra})

    @property
    def capacity_multiple(self) -> int:
        return math.lcm(self.r_fwd, self.r_bwd)


def _chunk(C: int, r: int, i: int) -> slice:
    c = C // r
    return slice(i * c, (i + 1) * c)


class _PipelinedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_ECD: Tensor, pipe: Pipeline, disp: Dispatcher, experts: Experts, *params: Tensor) -> Tensor:
        E, C, D = x_ECD.shape
        W, S, r = disp.ep_size, disp.esp_size, pipe.r_fwd
        e = E // W
        if C % pipe.capacity_multiple:
            raise ValueError(f"capacity C={C} is not a multiple of lcm(r_fwd, r_bwd)={pipe.capacity_multiple}")
        c = C // r
        x_ECD = x_ECD.contiguous()
        recv: dict[int, Tensor] = {}
        gathered: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        reduced: dict[int, Tensor] = {}
        y_ECD = x_ECD.new_empty(E, C, D)
        stash: list[Tensor] = []  # per saved tensor, (e, S, W, C, *)

        def dispatch(i: int) -> None:
            recv[i] = disp.exchange(x_ECD[:, _chunk(C, r, i)].reshape(W, e, c, D))  # (W_src, e, c, D)

        def gather(i: int) -> None:
            gathered[i] = disp.gather_shards(recv.pop(i).transpose(0, 1).reshape(e, W * c, D))  # (e, S·W·c, D)

        def expert(i: int) -> None:
            x_eND = gathered.pop(i)
            out, saved = experts.forward_saving(x_eND)
            if not stash:
                stash.extend(t.new_empty(e, S, W, C, *t.shape[2:]) for t in saved)
            for buf, t in zip(stash, saved, strict=True):
                buf[:, :, :, _chunk(C, r, i)] = t.view(e, S, W, c, *t.shape[2:])
            outs[i] = out

        def reduce(i: int) -> None:
            reduced[i] = disp.reduce_shards(outs.pop(i))  # (e, W·c, D)

        def combine(i: int) -> None:
            send = reduced.pop(i).view(e, W, c, D).transpose(0, 1).contiguous()
            y_ECD[:, _chunk(C, r, i)] = disp.exchange(send).view(E, c, D)

        impls = {"dispatch": dispatch, "gather": gather, "expert": expert, "reduce": reduce, "combine": combine}
        pipe.runtime.run(forward_tasks(pipe.spec, r), impls)
        ctx.pipe, ctx.disp, ctx.experts, ctx.shape = pipe, disp, experts, (E, C, D)
        ctx.save_for_backward(*stash)
        return y_ECD

    @staticmethod
    def backward(ctx: Any, dy_ECD: Tensor) -> tuple[Tensor | None, ...]:
        pipe, disp, experts = ctx.pipe, ctx.disp, ctx.experts
        stash = ctx.saved_tensors
        E, C, D = ctx.shape
        W, S, r = disp.ep_size, disp.esp_size, pipe.r_bwd
        e, c = E // W, C // r
        dy_ECD = dy_ECD.contiguous()
        params = list(experts.parameters())
        pgrads: list[Tensor | None] = [None] * len(params)
        dx_ECD = dy_ECD.new_empty(E, C, D)
        recv: dict[int, Tensor] = {}
        gathered: dict[int, Tensor] = {}
        dxs: dict[int, Tensor] = {}
        reduced: dict[int, Tensor] = {}

        def combine_bwd(i: int) -> None:
            recv[i] = disp.exchange(dy_ECD[:, _chunk(C, r, i)].reshape(W, e, c, D))

        def reduce_bwd(i: int) -> None:  # adjoint of the ReduceScatter: AllGather
            gathered[i] = disp.gather_shards(recv.pop(i).transpose(0, 1).reshape(e, W * c, D))

        def expert_bwd(i: int) -> None:
            saved = tuple(
                t[:, :, :, _chunk(C, r, i)].reshape(e, S * W * c, *t.shape[4:]) for t in stash
            )
            dx, grads = experts.backward_saved(gathered.pop(i), saved)
            for k, g in enumerate(grads):
                pgrads[k] = g if pgrads[k] is None else pgrads[k] + g
            dxs[i] = dx

        def gather_bwd(i: int) -> None:  # adjoint of the AllGather: ReduceScatter
            reduced[i] = disp.reduce_shards(dxs.pop(i))

        def dispatch_bwd(i: int) -> None:
            send = reduced.pop(i).view(e, W, c, D).transpose(0, 1).contiguous()
            dx_ECD[:, _chunk(C, r, i)] = disp.exchange(send).view(E, c, D)

        def gar(_: int) -> None:
            assert pipe.gar is not None
            pipe.gar()

        impls = {"combine_bwd": combine_bwd, "reduce_bwd": reduce_bwd, "expert_bwd": expert_bwd,
                 "gather_bwd": gather_bwd, "dispatch_bwd": dispatch_bwd, "gar": gar}
        pipe.runtime.run(backward_tasks(pipe.spec, r, with_gar=pipe.gar is not None), impls)
        return (dx_ECD, None, None, None, *pgrads)


def pipelined_experts(x_ECD: Tensor, pipe: Pipeline, disp: Dispatcher, experts: Experts) -> Tensor:
    """Dispatch, ESP gather, experts, ESP reduce and combine of ``x_ECD`` under ``pipe``'s schedule."""
    return _PipelinedBlock.apply(x_ECD, pipe, disp, experts, *experts.parameters())
