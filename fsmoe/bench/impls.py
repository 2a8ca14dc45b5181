"""What one rank runs: our layer under each schedule, and the per-channel probes of the lower bound.

Legend: T tokens per rank, D model dim, E experts, e local experts, C capacity slots, W = N_EP,
S = N_ESP, R pipeline degree.

A :class:`Step` is one forward + backward of one implementation on this rank's fixed input ``x_TD``
with a fixed output gradient ``dy_TD``, plus the dense Gradient-AllReduce (GAR) of ``dense_grad_mb``:
after the backward for schedules without a GAR slot in the MoE block, inside the MoE backward (the
pipeline's ``gar`` task, on the inter-node channel) for ``fsmoe`` and ``fsmoe_no_iio``. All our
implementations share one :class:`~fsmoe.moe.layer.MoELayer` (the same weights, so the same routing)
and differ only in ``layer.pipeline``.

A :class:`Probe` runs one operation of the same work alone, on tensors of the shapes the layer moves,
and says how often it occurs per forward + backward: the expert forward + backward over all
(e, S·W·C, D) slots and the gate, Order and I-Order forward + backward (compute, once each); an ESP
AllGather + ReduceScatter pair (intra, twice: forward and backward); one EP AlltoAll (inter, four
times: dispatch, combine and their adjoints) and the GAR (inter, once). Each run starts from a
barrier, so every operation is timed on its own, as the cheapest it gets on these links; the busiest
channel's sum of count × time bounds every schedule from below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.bench.config import ImplSpec, LayerBenchConfig
from fsmoe.moe.dispatch import build_dispatcher
from fsmoe.moe.layer import MoELayer, pad_capacity
from fsmoe.parallel.dims import ProcessGroups
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime, TraceEvent
from fsmoe.schedule.schedules import get_schedule

Outputs = list[tuple[Tensor, Tensor]]  # (output, its gradient) pairs for one backward call


@dataclass
class Step:
    """One implementation, ready to run on this rank: ``run()`` is one timed forward + backward."""

    spec: ImplSpec
    forward: Callable[[], Outputs]
    zero_grad: Callable[[], None]
    after_backward: Callable[[], None] | None = None
    runtime: Runtime | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, events: list[TraceEvent] | None = None, rank: int = 0) -> None:
        """Forward, backward, then (if any) the work that follows the backward. With ``events``, the
        three phases are recorded on a ``layer`` track (the pipeline's own tasks go to its runtime)."""
        t0 = time.perf_counter()
        outs = self.forward()
        t1 = time.perf_counter()
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
        t2 = time.perf_counter()
        if self.after_backward is not None:
            self.after_backward()
        t3 = time.perf_counter()
        if events is not None:
            events += [TraceEvent("forward", "layer", t0, t1, rank), TraceEvent("backward", "layer", t1, t2, rank)]
            if self.after_backward is not None:
                events.append(TraceEvent("after backward (GAR)", "layer", t2, t3, rank))


@dataclass
class Probe:
    """One operation of the layer, alone (see the module doc); it occurs ``count`` times per fwd+bwd."""

    name: str
    channel: str  # compute | intra | inter
    fn: Callable[[], None]
    count: int = 1

    def run(self, events: list[TraceEvent] | None = None, rank: int = 0) -> None:
        self.fn()


@dataclass
class LayerWorkload:
    """This rank's inputs, the shared layer, and the dense gradient buffer of the GAR."""

    cfg: LayerBenchConfig
    groups: ProcessGroups
    rank: int
    layer: MoELayer = field(init=False)
    x_TD: Tensor = field(init=False)
    dy_TD: Tensor = field(init=False)
    dense_grad: Tensor = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same gate on every rank; expert shards differ, which is fine
        dispatcher = build_dispatcher(cfg.dispatcher, self.groups)
        self.layer = MoELayer.from_config(cfg.moe_config(), cfg.d_model, dispatcher=dispatcher)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank + 1)
        self.x_TD = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
        self.dy_TD = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
        self.dense_grad = torch.randn(int(cfg.dense_grad_mb * 2**20) // 4, generator=gen)
        # The dense part is data-parallel over the world (mp = 1); its own communicator (channel 1).
        self.gar_group = self.groups.group("dense_dp", 1)
        self.one = torch.ones(())

    def gar(self) -> None:
        """The dense part's Gradient-AllReduce (sum; the mean's division is not what is measured)."""
        if self.dense_grad.numel():
            dist.all_reduce(self.dense_grad, group=self.gar_group)

    def capacity(self) -> int:
        """C every rank uses without a pipeline (one forward; the capacity agreement is a collective)."""
        self.layer.pipeline = None
        with torch.no_grad():
            self.layer(self.x_TD)
        assert self.layer.last_routing is not None
        return self.layer.last_routing.capacity

    # --- our implementations ---------------------------------------------------------------------------
    def step(self, impl: ImplSpec) -> Step:
        pipe = None
        runtime = None
        if impl.pipelined:
            spec = get_schedule(impl.family)
            runtime = Runtime({"inter": "inter", "intra": "intra" if spec.separate_channels else "inter"},
                              rank=self.rank)
            gar = self.gar if impl.gar_in_moe and self.dense_grad.numel() else None
            pipe = Pipeline(spec, r_fwd=impl.r_fwd, r_bwd=impl.r_bwd, runtime=runtime, gar=gar)
        layer = self.layer

        def forward() -> Outputs:
            layer.pipeline = pipe
            y_TD = layer(self.x_TD.detach().requires_grad_())
            assert layer.last_stats is not None
            return [(y_TD, self.dy_TD), (layer.last_stats.aux_loss, self.one)]

        def zero_grad() -> None:
            layer.zero_grad(set_to_none=True)

        after = None if impl.gar_in_moe else self.gar
        where = "inside the MoE backward" if impl.gar_in_moe else "after the backward"
        return Step(impl, forward, zero_grad, after, runtime, note=f"GAR {where}")

    # --- the lower bound's probes -------------------------------------------------------------------
    def probes(self, C: int) -> list[Probe]:
        layer, disp = self.layer, self.layer.dispatcher
        E, D = self.cfg.experts, self.cfg.d_model
        W, S = disp.ep_size, disp.esp_size
        e = E // W
        gen = torch.Generator().manual_seed(self.rank + 12345)
        x_eND = torch.randn(e, S * W * C, D, generator=gen)
        dy_eND = torch.randn(e, S * W * C, D, generator=gen)
        recv_eND = torch.randn(e, W * C, D, generator=gen)
        send_WeCD = torch.randn(W, e, C, D, generator=gen)

        def experts() -> None:
            _, saved = layer.experts.forward_saving(x_eND)
            layer.experts.backward_saved(dy_eND, saved)

        def gate_and_order() -> None:
            x = self.x_TD.detach().requires_grad_()
            routing = pad_capacity(layer.gate(x), lambda c: max(c, C))
            y_TD = layer.order.iorder(layer.order.order(x, routing), routing)  # identity experts
            torch.autograd.backward([y_TD, routing.aux_loss], [self.dy_TD, self.one])

        @torch.no_grad()
        def esp() -> None:  # forward: AG(x), RS(y); backward: AG(dy), RS(dx) -- one pair per probe
            disp.reduce_shards(disp.gather_shards(recv_eND))

        @torch.no_grad()
        def alltoall() -> None:  # dispatch, combine, and their adjoints in backward: 4 of this size
            disp.exchange(send_WeCD)

        probes = [Probe("experts fwd+bwd", "compute", experts), Probe("gate+order fwd+bwd", "compute", gate_and_order)]
        if S > 1:
            probes.append(Probe("ESP AllGather+ReduceScatter", "intra", esp, count=2))
        if W > 1:
            probes.append(Probe("EP AlltoAll", "inter", alltoall, count=4))
        if self.dense_grad.numel():
            probes.append(Probe("dense GAR", "inter", self.gar))
        return probes


def rotate(items: Sequence[object], k: int) -> list[object]:
    """``items`` starting at position ``k`` (mod its length): round k runs them in this order."""
    k %= len(items)
    return [*items[k:], *items[:k]]
