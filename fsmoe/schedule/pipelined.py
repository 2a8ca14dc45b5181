"""The pipelined dispatch → AllGather → expert → ReduceScatter → combine block as one autograd Function.

Legend: E experts, e local experts, C capacity slots per expert (of this rank's routing group),
W = N_EP, S = N_ESP, D model dim, H expert hidden (this rank's slice), R pipeline degree (r_fwd forward,
r_bwd backward).

Forward splits the capacity axis into r_fwd chunks, each holding C/r_fwd slots of every expert, and
runs the schedule's forward task list. Backward re-splits into r_bwd chunks and runs the backward task
list, applying the exact activation derivatives (``Experts.backward_saved``) to what the experts saved
in forward (``Experts.forward_saving``: for FFN the gathered input and the pre-activation). C must be a
multiple of lcm(r_fwd, r_bwd).

Memory: the block never holds more than plain autograd would. What the experts saved for a forward
chunk is kept as it is, with no copy, in a per-chunk stash (:class:`_Stash`); backward chunk j reads
slots [j·C/r_bwd, (j+1)·C/r_bwd) of it: the forward chunk itself when r_fwd = r_bwd, else one copy of
this backward chunk only. Each forward chunk is dropped once the last backward chunk that reads it is
done, as autograd drops saved tensors node by node, so backward through the block runs once (no
``retain_graph``). The (E, C, D) output and input gradient are allocated when their first chunk
arrives, not while the experts run, and the chunks' parameter gradients are summed in place.

Autograd sees one op: ``y_ECD = pipe(x_ECD, dispatcher, experts)``; gate, Order and I-Order around it
stay ordinary autograd. The collectives inside run without autograd on the dispatcher's steps.

This module owns :class:`Pipeline`, the pipelined implementation of the MoE layer's expert block
(:class:`fsmoe.moe.block.ExpertBlock`), and its autograd Function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fsmoe.config import ScheduleSpec, check_degrees
from fsmoe.moe.block import ExpertBlock
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import Experts
from fsmoe.moe.hooks import BLOCK_POINTS, NO_HOOKS, HookChain
from fsmoe.schedule.runtime import Runtime
from fsmoe.schedule.schedules import backward_tasks, forward_tasks


@dataclass(kw_only=True, eq=False)
class Pipeline(ExpertBlock):
    """The pipelined expert block of one MoE layer: its schedule, degrees, the runtime whose lanes run
    its communication tasks (usually :meth:`Runtime.for_schedule`, one shared by all layers), and the
    Gradient-AllReduce slice to launch inside its backward (``gar``: a callable run on the inter
    channel, or None). Not frozen: the gradient plan attaches ``gar`` after the model is built
    (:func:`fsmoe.parallel.parallelize.attach_gradient_plan`).

    Set on a layer from outside by :func:`fsmoe.parallel.parallelize.apply_pipeline`.

    At r_fwd = r_bwd = 1 with no ``gar`` slice there is nothing to overlap: the block then runs as the
    plain :class:`~fsmoe.moe.block.ExpertBlock` (the same tasks in the same order on the calling thread,
    the same numbers), without handing each collective to a lane thread — on CPU ranks that share cores
    those hand-offs cost up to 8% of a training step (the planner's plain plan, measured with
    ``fsmoe bench train``)."""

    spec: ScheduleSpec
    r_fwd: int = 1
    r_bwd: int = 1
    runtime: Runtime
    gar: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        check_degrees(self.spec, self.r_fwd, self.r_bwd)

    @property
    def capacity_multiple(self) -> int:
        """Both passes cut C into equal chunks: C must be a multiple of lcm(r_fwd, r_bwd)."""
        return math.lcm(self.r_fwd, self.r_bwd)

    def __call__(self, x_ECD: Tensor, dispatcher: Dispatcher, experts: Experts, hooks: HookChain = NO_HOOKS) -> Tensor:
        """Dispatch, ESP gather, experts, ESP reduce and combine of ``x_ECD`` under this schedule."""
        inner = hooks.overriding(BLOCK_POINTS)
        if inner:
            raise ValueError(
                f"after_dispatch/before_combine hooks ({', '.join(type(h).__name__ for h in inner)}) run per chunk "
                "inside the pipelined block, which does not support them yet; remove the pipeline "
                "(fsmoe.parallel.parallelize.remove_pipeline) or the hook"
            )
        if self.r_fwd == self.r_bwd == 1 and self.gar is None:
            return super().__call__(x_ECD, dispatcher, experts, hooks)
        return _PipelinedBlock.apply(x_ECD, self, dispatcher, experts, *experts.parameters())


def _chunk(C: int, r: int, i: int) -> slice:
    c = C // r
    return slice(i * c, (i + 1) * c)


class _Stash:
    """What backward needs, as the experts saved it: ``pieces[i]`` holds forward chunk i's tensors, each
    (e, S·W·c_fwd, *) with slots ordered (S, W, c). It lives on ``ctx`` rather than going through
    ``save_for_backward``, whose tensors live until the Function's whole backward returns, so that
    :meth:`take` can drop each piece as soon as it is used up; :meth:`check_versions` does the check
    ``save_for_backward`` would do."""

    def __init__(self, pieces: list[tuple[Tensor, ...]]) -> None:
        self.pieces = pieces
        self.versions = [[t._version for t in saved] for saved in pieces]

    def check_versions(self) -> None:
        for i, (saved, versions) in enumerate(zip(self.pieces, self.versions, strict=True)):
            for k, (t, v) in enumerate(zip(saved, versions, strict=True)):
                if t._version != v:
                    raise RuntimeError(
                        f"tensor {k} that the experts saved for forward chunk {i} of the pipelined MoE block was "
                        f"modified in place after the forward (version {v} -> {t._version})"
                    )

    def take(self, SW: int, C: int, r: int, j: int) -> tuple[Tensor, ...]:
        """Backward chunk ``j`` of ``r``, each tensor (e, S·W·C/r, *): slots [j·C/r, (j+1)·C/r) of every
        (S, W) source, in the forward's slot order. With the same degree both ways it is forward chunk j
        itself, otherwise one copy of this chunk only. Take chunks in order: a forward chunk that no
        later backward chunk reads is dropped here."""
        pieces = self.pieces
        cf, want = C // len(pieces), _chunk(C, r, j)
        first, last = want.start // cf, (want.stop - 1) // cf
        if len(pieces) == r:
            out = pieces[j]
        else:
            out = tuple(self._cut(saved, SW, cf, first, want) for saved in zip(*pieces[first : last + 1], strict=True))
        for i in range(first, last + 1):
            if (i + 1) * cf <= want.stop:
                pieces[i] = ()
        return out

    @staticmethod
    def _cut(saved: tuple[Tensor, ...], SW: int, cf: int, first: int, want: slice) -> Tensor:
        """Slots ``want`` of one saved tensor, from its forward chunks ``first``, ``first + 1``, …"""
        parts = []
        for i, t in enumerate(saved, start=first):
            lo, hi = max(want.start, i * cf) - i * cf, min(want.stop, (i + 1) * cf) - i * cf
            parts.append(t.view(t.shape[0], SW, cf, *t.shape[2:])[:, :, lo:hi])
        cat = torch.cat(parts, dim=2)
        return cat.view(cat.shape[0], -1, *cat.shape[3:])


def _put(into: list[Tensor], chunk_EcD: Tensor, C: int, r: int, i: int) -> None:
    """Place chunk ``i`` of ``r`` in the (E, C, D) result held by ``into``. The result is allocated when the
    first chunk arrives, not up front, so it is not held while the experts run (the unpipelined layer
    does not hold it either); with r = 1 the chunk itself is the result."""
    if r == 1:
        into.append(chunk_EcD)
        return
    if not into:
        into.append(chunk_EcD.new_empty(chunk_EcD.shape[0], C, chunk_EcD.shape[2]))
    into[0][:, _chunk(C, r, i)] = chunk_EcD


class _PipelinedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_ECD: Tensor, pipe: Pipeline, disp: Dispatcher, experts: Experts, *params: Tensor) -> Tensor:
        E, C, D = x_ECD.shape
        W, r = disp.ep_size, pipe.r_fwd
        e = E // W
        if C % pipe.capacity_multiple:
            raise ValueError(f"capacity C={C} is not a multiple of lcm(r_fwd, r_bwd)={pipe.capacity_multiple}")
        c = C // r
        x_ECD = x_ECD.contiguous()
        recv: dict[int, Tensor] = {}
        gathered: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        reduced: dict[int, Tensor] = {}
        y: list[Tensor] = []  # the (E, C, D) output, see _put
        pieces: list[tuple[Tensor, ...]] = [()] * r  # per forward chunk, what the experts saved, (e, S·W·c, *)

        # Each task returns what it produced, for the stream lanes to record on the consumers' streams.
        def dispatch(i: int) -> Tensor:
            recv[i] = disp.exchange(x_ECD[:, _chunk(C, r, i)].reshape(W, e, c, D))  # (W_src, e, c, D)
            return recv[i]

        def gather(i: int) -> Tensor:
            gathered[i] = disp.gather_shards(recv.pop(i).transpose(0, 1).reshape(e, W * c, D))  # (e, S·W·c, D)
            return gathered[i]

        def expert(i: int) -> Tensor:
            outs[i], pieces[i] = experts.forward_saving(gathered.pop(i))
            return outs[i]

        def reduce(i: int) -> Tensor:
            reduced[i] = disp.reduce_shards(outs.pop(i))  # (e, W·c, D)
            return reduced[i]

        def combine(i: int) -> Tensor:
            send = reduced.pop(i).view(e, W, c, D).transpose(0, 1).contiguous()
            _put(y, disp.exchange(send).view(E, c, D), C, r, i)
            return y[0]

        impls = {"dispatch": dispatch, "gather": gather, "expert": expert, "reduce": reduce, "combine": combine}
        pipe.runtime.run(forward_tasks(pipe.spec, r), impls)
        ctx.pipe, ctx.disp, ctx.experts, ctx.shape = pipe, disp, experts, (E, C, D)
        device = x_ECD.device.type  # backward computes in the forward's autocast state (torch.amp.custom_bwd)
        ctx.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.stash = _Stash(pieces)
        (y_ECD,) = y
        if y_ECD.untyped_storage().data_ptr() == x_ECD.untyped_storage().data_ptr():  # e.g. identity experts
            y_ECD = y_ECD.clone()
        return y_ECD

    @staticmethod
    def backward(ctx: Any, dy_ECD: Tensor) -> tuple[Tensor | None, ...]:
        pipe, disp, experts = ctx.pipe, ctx.disp, ctx.experts
        E, C, D = ctx.shape
        W, S, r = disp.ep_size, disp.esp_size, pipe.r_bwd
        e, c = E // W, C // r
        stash: _Stash = ctx.stash
        ctx.stash = None  # backward frees the stash as it goes; a second backward would find it gone
        if stash is None:
            raise RuntimeError(
                "backward through the pipelined MoE block ran twice: it frees its saved activations chunk by "
                "chunk, as plain autograd frees saved tensors, so retain_graph=True is not supported here"
            )
        stash.check_versions()
        dy_ECD = dy_ECD.contiguous()
        params = list(experts.parameters())
        pgrads: list[Tensor | None] = [None] * len(params)
        dx: list[Tensor] = []  # the (E, C, D) input gradient, see _put
        recv: dict[int, Tensor] = {}
        gathered: dict[int, Tensor] = {}
        dxs: dict[int, Tensor] = {}
        reduced: dict[int, Tensor] = {}

        def combine_bwd(i: int) -> Tensor:
            recv[i] = disp.exchange(dy_ECD[:, _chunk(C, r, i)].reshape(W, e, c, D))
            return recv[i]

        def reduce_bwd(i: int) -> Tensor:  # adjoint of the ReduceScatter: AllGather
            gathered[i] = disp.gather_shards(recv.pop(i).transpose(0, 1).reshape(e, W * c, D))
            return gathered[i]

        def expert_bwd(i: int) -> Tensor:
            dxs[i], grads = experts.backward_saved(gathered.pop(i), stash.take(S * W, C, r, i))
            for k, g in enumerate(grads):
                if pgrads[k] is None:
                    pgrads[k] = g
                else:  # the first chunk's gradient is ours (fresh from backward_saved): sum in place
                    pgrads[k].add_(g)
            return dxs[i]

        def gather_bwd(i: int) -> Tensor:  # adjoint of the AllGather: ReduceScatter
            reduced[i] = disp.reduce_shards(dxs.pop(i))
            return reduced[i]

        def dispatch_bwd(i: int) -> Tensor:
            send = reduced.pop(i).view(e, W, c, D).transpose(0, 1).contiguous()
            _put(dx, disp.exchange(send).view(E, c, D), C, r, i)
            return dx[0]

        def gar(_: int) -> None:
            assert pipe.gar is not None
            pipe.gar()

        impls = {
            "combine_bwd": combine_bwd,
            "reduce_bwd": reduce_bwd,
            "expert_bwd": expert_bwd,
            "gather_bwd": gather_bwd,
            "dispatch_bwd": dispatch_bwd,
            "gar": gar,
        }
        device, enabled, dtype = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            pipe.runtime.run(backward_tasks(pipe.spec, r, with_gar=pipe.gar is not None), impls)
        return (dx[0], None, None, None, *pgrads)

