"""The layer benchmark's workload: which implementations it runs (:func:`layer_impls`), what it refuses
(:func:`check_layer_job`), ``--quick`` (:func:`quick_layer_job`), and what one rank runs — a :class:`Step`
per implementation and the lower bound's :class:`Probe` s over one shared :class:`LayerWorkload` — with
the records a rank sends back (:class:`LayerRankResult`). The rank function and the run itself are
:mod:`fsmoe.bench.layer`; the module docstring there says what is measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.bench.harness import (
    DEEPSPEED,
    ImplSpec,
    RankResult,
    check_cpu_ranks,
)
from fsmoe.bench.layer_predict import dense_grad_numel
from fsmoe.bench.memory import PeakMemory
from fsmoe.cluster.spec import EmulatedClusterSpec
from fsmoe.config import JobConfig, get_schedule
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.layer import MoELayer, pad_capacity
from fsmoe.parallel.dims import ProcessGroups
from fsmoe.parallel.dispatch import build_dispatcher
from fsmoe.parallel.parallelize import apply_pipeline, remove_pipeline
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime, TraceEvent

Outputs = list[tuple[Tensor, Tensor]]  # (output, its gradient) pairs for one backward call

# ``--quick``: small sizes that finish in about half a minute (checks that everything runs, not
# performance). The CLI applies them to the recipe before ``--config`` and the flags, which win.
QUICK_LAYER: dict[str, Any] = {
    "bench.tokens": 256, "model.d_model": 128, "moe.d_hidden": 256, "bench.degrees": (1, 2),
    "bench.mixed_degrees": ((1, 2),), "bench.dense_grad_mb": 0.25, "bench.reps": 2, "bench.warmup": 1,
    "plan.profile_budget_s": 5.0,
}


def quick_layer_job(job: JobConfig) -> JobConfig:
    """``job`` with :data:`QUICK_LAYER` applied."""
    return job.with_overrides(QUICK_LAYER)


def check_layer_job(job: JobConfig) -> None:
    """What the layer benchmark needs beyond the job's own rules; ``ValueError`` naming the values.
    Call it before any rank starts."""
    check_cpu_ranks(job, "bench layer")
    if job.run.dtype != "fp32":
        raise ValueError(f"bench layer: the layer is timed in fp32; --dtype {job.run.dtype} is not supported here")
    par = job.parallel
    if par.mp != 1:
        raise ValueError(f"bench layer: the MoE layer has no tensor-parallel part; mp must be 1, got mp={par.mp}")
    if par.ep * par.esp != par.nproc:
        # Our rows would then need an expert-gradient AllReduce over expert-DP groups, which the
        # benchmark does not model; keep the paper's layout (every rank holds distinct shards).
        raise ValueError(
            f"bench layer: ep*esp must equal the world size (nproc), got ep={par.ep} * esp={par.esp} = "
            f"{par.ep * par.esp} != nproc={par.nproc}"
        )
    EmulatedClusterSpec.from_job(job)  # the emulated nodes' limits
    layer_impls(job)  # the degree rules of every schedule


def layer_impls(job: JobConfig) -> list[ImplSpec]:
    """Every implementation to run, in table order (DeepSpeed last; dropped later if it cannot run)."""
    b = job.bench
    out: list[ImplSpec] = []
    for name in b.schedules:
        spec = get_schedule(name)
        if not spec.pipelined:
            out.append(ImplSpec(name))
            continue
        pairs = [(r, r) for r in b.degrees]
        if spec.independent_degrees and name == "fsmoe":
            pairs += [p for p in b.mixed_degrees if p[0] != p[1]]
        out += [ImplSpec(name, r_fwd, r_bwd) for r_fwd, r_bwd in dict.fromkeys(pairs)]
    if b.deepspeed:
        out.append(ImplSpec(DEEPSPEED))
    return out


# --- the other packages' APIs this workload calls (each in one place) ----------------------------------------
def _dispatcher(job: JobConfig, groups: ProcessGroups) -> Dispatcher:
    # every rank routes bench.tokens: a static capacity is agreed once, not in every forward
    return build_dispatcher(job.parallel.dispatcher, groups, equal_tokens=True)


def _pipelined_block(layer: MoELayer, impl: ImplSpec, runtime: Runtime, gar: Callable[[], None] | None) -> Pipeline:
    """``layer``'s expert block pipelined as ``impl`` says, launching ``gar`` inside its backward (set on
    the layer now; :func:`_set_block` swaps it back in before each run)."""
    (pipe,) = apply_pipeline([layer], get_schedule(impl.family), (impl.r_fwd, impl.r_bwd), runtime)
    pipe.gar = gar
    return pipe


def _set_block(layer: MoELayer, block: Pipeline | None) -> None:
    """Swap the layer's expert block: ``block`` (from :func:`_pipelined_block`), or (None) the unpipelined one."""
    if block is None:
        remove_pipeline([layer])
    else:
        layer.expert_block = block


# --- what one rank runs ---------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class Step:
    """One implementation, ready to run on this rank: ``run()`` is one timed forward + backward (+ the
    work that follows it); ``prepare()`` zeroes the gradients, untimed."""

    spec: ImplSpec
    forward: Callable[[], Outputs]
    zero_grad: Callable[[], None]
    after_backward: Callable[[], None] | None = None
    runtime: Runtime | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def prepare(self) -> None:
        self.zero_grad()

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
            phases = [("forward", t0, t1), ("backward", t1, t2)]
            if self.after_backward is not None:
                phases.append(("after backward (GAR)", t2, t3))
            events += [TraceEvent(name=n, channel="layer", start_s=a, end_s=b, rank=rank) for n, a, b in phases]


@dataclass(kw_only=True, frozen=True)
class Probe:
    """One operation of the layer, alone (see the module doc); it occurs ``count`` times per fwd+bwd."""

    name: str
    channel: str  # compute | intra | inter
    fn: Callable[[], None]
    count: int = 1

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        self.fn()


@dataclass
class LayerWorkload:
    """This rank's inputs, the shared layer, and the dense gradient buffer of the GAR."""

    job: JobConfig
    groups: ProcessGroups
    rank: int
    layer: MoELayer = field(init=False)
    x_TD: Tensor = field(init=False)
    dy_TD: Tensor = field(init=False)
    dense_grad: Tensor = field(init=False)

    def __post_init__(self) -> None:
        job, seed = self.job, self.job.run.seed
        T, D = job.bench.tokens, job.model.d_model
        torch.manual_seed(seed)  # the same gate on every rank; expert shards differ, which is fine
        self.layer = MoELayer.from_config(job.moe, D, dispatcher=_dispatcher(job, self.groups))
        gen = torch.Generator().manual_seed(seed * 7919 + self.rank + 1)
        self.x_TD = torch.randn(T, D, generator=gen)
        self.dy_TD = torch.randn(T, D, generator=gen)
        self.dense_grad = torch.randn(dense_grad_numel(job), generator=gen)
        # The dense part is data-parallel over the world (mp = 1); its own communicator (channel 1).
        self.gar_group = self.groups.group("dense_dp", 1)
        self.one = torch.ones(())

    def gar(self) -> None:
        """The dense part's Gradient-AllReduce (sum; the mean's division is not what is measured)."""
        if self.dense_grad.numel():
            dist.all_reduce(self.dense_grad, group=self.gar_group)

    def capacity(self) -> int:
        """C every rank uses without a pipeline (one forward; the capacity agreement is a collective)."""
        _set_block(self.layer, None)
        with torch.no_grad():
            self.layer(self.x_TD)
        assert self.layer.last_routing is not None
        return self.layer.last_routing.capacity

    def step(self, impl: ImplSpec) -> Step:
        """Our layer under ``impl``'s schedule and degrees."""
        block, runtime = None, None
        if impl.pipelined:
            runtime = Runtime.for_schedule(get_schedule(impl.family), rank=self.rank)
            gar = self.gar if impl.gar_in_moe and self.dense_grad.numel() else None
            block = _pipelined_block(self.layer, impl, runtime, gar)
        layer = self.layer

        def forward() -> Outputs:
            _set_block(layer, block)
            y_TD = layer(self.x_TD.detach().requires_grad_())
            assert layer.last_stats is not None
            return [(y_TD, self.dy_TD), (layer.last_stats.aux_loss, self.one)]

        def zero_grad() -> None:
            layer.zero_grad(set_to_none=True)

        where = "inside the MoE backward" if impl.gar_in_moe else "after the backward"
        return Step(spec=impl, forward=forward, zero_grad=zero_grad,
                    after_backward=None if impl.gar_in_moe else self.gar, runtime=runtime, note=f"GAR {where}")

    def probes(self, C: int) -> list[Probe]:
        """The lower bound's probes at capacity ``C`` (see the module doc)."""
        layer, disp = self.layer, self.layer.dispatcher
        E, D = self.job.moe.num_experts, self.job.model.d_model
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

        probes = [Probe(name="experts fwd+bwd", channel="compute", fn=experts),
                  Probe(name="gate+order fwd+bwd", channel="compute", fn=gate_and_order)]
        if S > 1:
            probes.append(Probe(name="ESP AllGather+ReduceScatter", channel="intra", fn=esp, count=2))
        if W > 1:
            probes.append(Probe(name="EP AlltoAll", channel="inter", fn=alltoall, count=4))
        if self.dense_grad.numel():
            probes.append(Probe(name="dense GAR", channel="inter", fn=self.gar))
        return probes


@dataclass(kw_only=True, frozen=True)
class ProbeInfo:
    name: str
    channel: str
    count: int = 1  # occurrences per fwd+bwd


@dataclass(kw_only=True, frozen=True)
class LayerRankResult(RankResult):
    """One rank's layer result: ``specs`` the steps that ran (``names`` theirs); ``times`` also holds
    the probes'; ``memory`` is this rank's own; ``traces`` maps a step name to its trace events (the
    model's beside them); ``costs`` the profiled :class:`~fsmoe.perf.costs.Costs` as a dict (the same on
    every rank; None: no predictions); ``auto`` the ``fsmoe auto`` row's plan
    (:meth:`~fsmoe.bench.layer_predict.AutoPlan.to_dict`), None without one."""

    specs: list[ImplSpec]
    capacity: int
    probes: list[ProbeInfo]
    memory: dict[str, PeakMemory] = field(default_factory=dict)
    memory_note: str | None = None
    traces: dict[str, list[TraceEvent]] = field(default_factory=dict)
    costs: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None


__all__ = ["QUICK_LAYER", "LayerRankResult", "LayerWorkload", "Outputs", "Probe", "ProbeInfo", "Step",
           "check_layer_job", "layer_impls", "quick_layer_job"]
