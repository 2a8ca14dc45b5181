"""The layer benchmark's model side: the profile, the ``fsmoe auto`` row, and each row's predicted time.

Legend: T tokens per rank, C capacity slots, r pipeline degree (r_fwd forward, r_bwd backward), GAR the
dense Gradient-AllReduce of ``bench.dense_grad_mb``.

On the ranks, before any timing:

* :func:`layer_costs` — the job's α-β lines from the profile cache, or profiled now on the benchmark's
  own groups (:func:`fsmoe.perf.profile.load_or_profile`, T = ``bench.tokens``, the ``plan`` section's
  budget, cache and ``reprofile``): the MoE block's collectives and compute, gate + order, and the GAR
  at ``bench.dense_grad_mb`` — no dense part (:data:`LAYER_OPS`): the benchmark has none.
* :func:`plan_auto` — the ``fsmoe auto`` row: :func:`fsmoe.perf.planner.plan_layer` on the layer's work
  (:func:`fsmoe.perf.model.layer_work` at T = ``bench.tokens``) with the GAR inside its backward
  (busy line: it overlaps the experts), as the ``fsmoe`` rows run it, or after the backward (idle line)
  when the planner finds that faster (``… GAR after``); its wall time is the planner's solve time for
  one layer. :func:`auto_options` ranks every option it weighs, for the measured check
  (:func:`fsmoe.bench.layer.tune_auto`), which may pick another (``AutoPlan.tune``).

Pure, from the costs: :func:`predict_rows` gives every row of ours (DeepSpeed-MoE is not our schedule
IR) :func:`fsmoe.perf.planner.predict_layer` at the row's degrees — gate + Order + I-Order forward and
backward around the played block, the GAR inside the backward (``gar_in_moe`` schedules) or after it
(the others, idle line). :func:`predicted_trace` draws a traced row's modelled timeline on
``predicted:<lane>`` tracks beside the measured ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsmoe.bench.harness import ImplSpec
from fsmoe.config import JobConfig, get_schedule
from fsmoe.parallel.dims import ProcessGroups
from fsmoe.perf.costs import COLLECTIVES, Costs
from fsmoe.perf.model import LayerWork, layer_work, padded_for, play_pass
from fsmoe.perf.planner import LayerOption, LayerPlan, LayerPrediction, layer_options, plan_layer, predict_layer
from fsmoe.schedule.runtime import TraceEvent

AUTO_SCHEDULE = "fsmoe"  # the schedule whose planned row the layer benchmark adds
LAYER_OPS = (*COLLECTIVES, "expert_fwd", "expert_bwd", "gate_fwd", "gate_bwd")  # no dense part
FP32_BYTES = 4


def dense_grad_numel(job: JobConfig) -> int:
    """Elements of the benchmark's dense gradient buffer (fp32): ``bench.dense_grad_mb`` MiB."""
    return int(job.bench.dense_grad_mb * 2**20) // FP32_BYTES


def gar_bytes(job: JobConfig) -> int:
    """Bytes the benchmark's GAR all-reduces (0: none)."""
    return dense_grad_numel(job) * FP32_BYTES


def bench_work(job: JobConfig) -> LayerWork:
    """The layer's work on one rank at T = ``bench.tokens``."""
    return layer_work(job, tokens=job.bench.tokens)


# --- on the ranks ----------------------------------------------------------------------------------------------
def layer_costs(job: JobConfig, groups: ProcessGroups, rank: int, *,
                echo: Callable[[str], None] = print) -> Costs:
    """The job's costs (collective: every rank gets rank 0's; see the module doc)."""
    from fsmoe.perf.profile import load_or_profile  # its torch workloads load only on the ranks

    return load_or_profile(job, groups, rank, cache_dir=Path(job.plan.profile_cache).expanduser(),
                           reprofile=job.plan.reprofile, tokens=job.bench.tokens, budget_s=job.plan.profile_budget_s,
                           ops=LAYER_OPS, echo=echo)


def gar_time(job: JobConfig, costs: Costs) -> float:
    """The GAR's modelled time inside the MoE backward (busy line), 0 without a GAR."""
    n = gar_bytes(job)
    return costs.op("gar", busy=True)(n) if n > 0 else 0.0


@dataclass(kw_only=True, frozen=True)
class AutoPlan:
    """The ``fsmoe auto`` row: its implementation, the planner's :class:`LayerPlan`, the GAR it planned
    with (``t_gar_s`` for ``gar_bytes``) and ``solve_s``, the wall time of :func:`plan_layer`."""

    impl: ImplSpec
    plan: LayerPlan
    t_gar_s: float
    gar_bytes: int
    solve_s: float
    tune: dict[str, Any] | None = None  # the measured check (fsmoe.bench.layer.tune_auto), when it ran

    @property
    def option(self) -> LayerOption:
        """The plan's choice as one of :func:`auto_options`."""
        return LayerOption(r_fwd=self.plan.r_fwd, r_bwd=self.plan.r_bwd, gar_after=self.plan.gar_after_s > 0,
                           predicted_s=self.plan.total_s)

    @property
    def model_impl(self) -> ImplSpec | None:
        """The model's choice as a plain row, when the measured check picked another (else None)."""
        o = self.option
        if (o.r_fwd, o.r_bwd, o.gar_after) == (self.impl.r_fwd, self.impl.r_bwd, self.impl.gar_after):
            return None
        return ImplSpec(AUTO_SCHEDULE, o.r_fwd, o.r_bwd, gar_after=o.gar_after)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.impl.name, "r_fwd": self.impl.r_fwd, "r_bwd": self.impl.r_bwd,
                "gar_after": self.impl.gar_after,
                "plan": self.plan.to_dict(), "t_gar_s": self.t_gar_s, "gar_bytes": self.gar_bytes,
                "solve_s": self.solve_s, "tune": self.tune}


def _gar_args(job: JobConfig, costs: Costs) -> dict[str, float | None]:
    """The GAR as the ``fsmoe`` rows run it: inside the backward (busy line, its slice by the rate model
    against the idle one), or after it (idle line)."""
    n = gar_bytes(job)
    t_idle = costs.op("gar")(n) if n > 0 else None
    return {"t_gar": gar_time(job, costs), "t_gar_after": t_idle, "t_gar_idle": t_idle}


def plan_auto(job: JobConfig, costs: Costs) -> AutoPlan:
    """Plan the ``fsmoe auto`` row from ``costs`` (pure and deterministic: every rank gets the same)."""
    work = bench_work(job)
    t0 = time.perf_counter()
    args = _gar_args(job, costs)
    plan = plan_layer(AUTO_SCHEDULE, work, costs, **args, max_degree=job.plan.max_degree,  # type: ignore[arg-type]
                      min_gain=job.plan.min_gain)
    solve_s = time.perf_counter() - t0
    impl = ImplSpec(AUTO_SCHEDULE, plan.r_fwd, plan.r_bwd, auto=True, gar_after=plan.gar_after_s > 0)
    return AutoPlan(impl=impl, plan=plan, t_gar_s=args["t_gar"] or 0.0, gar_bytes=gar_bytes(job), solve_s=solve_s)


def auto_options(job: JobConfig, costs: Costs) -> list[LayerOption]:
    """Every option :func:`plan_auto` weighs, fastest modelled first (:func:`fsmoe.perf.planner.layer_options`)."""
    return layer_options(AUTO_SCHEDULE, bench_work(job), costs, **_gar_args(job, costs),  # type: ignore[arg-type]
                         max_degree=job.plan.max_degree)


def with_auto(impls: Sequence[ImplSpec], auto: ImplSpec | None, model: ImplSpec | None = None) -> list[ImplSpec]:
    """``impls`` with the auto row after our rows (before DeepSpeed-MoE); ``model`` (the model's own
    choice, when the measured check picked another) just before it, unless ``impls`` has it already."""
    if auto is None:
        return list(impls)
    ours = [i for i in impls if i.is_ours]
    extra = [model] if model is not None and model not in impls else []
    return [*ours, *extra, auto, *(i for i in impls if not i.is_ours)]


# --- pure: predictions -----------------------------------------------------------------------------------------
def predict_impl(job: JobConfig, costs: Costs, impl: ImplSpec) -> LayerPrediction | None:
    """One row's modelled fwd + bwd (+GAR) (None for DeepSpeed-MoE)."""
    if not impl.is_ours:
        return None
    return predict_layer(impl.family, bench_work(job), costs, impl.r_fwd, impl.r_bwd, gar_bytes=gar_bytes(job),
                         gar_after=impl.gar_after)


def predict_rows(job: JobConfig, costs: Costs, impls: Sequence[ImplSpec]) -> dict[str, LayerPrediction]:
    """Every row of ours by name."""
    out = {}
    for impl in impls:
        pred = predict_impl(job, costs, impl)
        if pred is not None:
            out[impl.name] = pred
    return out


def predicted_trace(job: JobConfig, costs: Costs, impl: ImplSpec, measured: Sequence[TraceEvent],
                    rank: int) -> list[TraceEvent]:
    """The model's timeline of one traced run of ``impl``, beside its ``measured`` events on this rank.

    Each phase is drawn from the measured start of the same phase (the ``layer`` track's ``forward``,
    ``backward`` and ``after backward (GAR)``), so each pass's error shows on its own: on
    ``predicted:layer`` the three phases' modelled lengths; on ``predicted:compute`` gate + Order
    (forward) first, then the block's tasks on ``predicted:<lane>`` as :func:`fsmoe.perf.model.play_pass`
    plays them; in the backward gate + Order + I-Order's backward is drawn after the block (the model
    does not split it around the block). Empty for DeepSpeed-MoE or when the phases are missing."""
    pred = predict_impl(job, costs, impl)
    starts = {e.name: e.start_s for e in measured if e.channel == "layer" and e.rank == rank}
    if pred is None or "forward" not in starts or "backward" not in starts:
        return []
    spec = get_schedule(impl.family)
    work = padded_for(bench_work(job), impl.r_fwd, impl.r_bwd)
    gate_f, gate_b = costs.op("gate_fwd")(work.n_gate), costs.op("gate_bwd")(work.n_gate)
    t_fwd, t_bwd = starts["forward"], starts["backward"]
    fwd = play_pass(spec, work, costs, impl.r_fwd, backward=False)
    with_gar = spec.gar_in_moe and gar_bytes(job) > 0
    bwd = play_pass(spec, work, costs, impl.r_bwd, backward=True, t_gar=gar_time(job, costs) if with_gar else None,
                    t_gar_idle=costs.op("gar")(gar_bytes(job)) if with_gar else None)

    def event(name: str, lane: str, start: float, length: float) -> TraceEvent:
        return TraceEvent(name=name, channel=f"predicted:{lane}", start_s=start, end_s=start + length, rank=rank)

    events = [event("forward", "layer", t_fwd, pred.fwd_s), event("backward", "layer", t_bwd, pred.bwd_s),
              event("gate+order", "compute", t_fwd, gate_f),
              *fwd.trace_events(rank=rank, start_s=t_fwd + gate_f),
              *bwd.trace_events(rank=rank, start_s=t_bwd),
              event("gate+order bwd", "compute", t_bwd + bwd.makespan_s, gate_b)]
    if pred.gar_after_s > 0 and "after backward (GAR)" in starts:
        events.append(event("after backward (GAR)", "layer", starts["after backward (GAR)"], pred.gar_after_s))
    return events


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted − measured) / measured; None when either is missing or measured is not positive."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return predicted / measured - 1.0


__all__ = ["AUTO_SCHEDULE", "AutoPlan", "LAYER_OPS", "auto_options", "bench_work", "dense_grad_numel", "gar_bytes",
           "gar_time", "layer_costs", "plan_auto", "predict_impl", "predict_rows", "predicted_trace", "relative_error",
           "with_auto"]
