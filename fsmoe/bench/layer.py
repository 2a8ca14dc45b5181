"""``fsmoe bench layer``: one MoE layer configuration, several implementations side by side in one run.

Legend: T tokens per rank, D model dim, H expert hidden, E experts, e local experts, K top-k, C capacity
slots, W = N_EP, S = N_ESP, R pipeline degree.

The job says everything: the layer is ``job.moe`` at D = ``model.d_model`` on T = ``bench.tokens``
tokens per rank (one routing group, fp32); the layout ``parallel`` (EP × ESP over the world, dense part
data-parallel, ``mp`` = 1) on ``cluster`` (emulated nodes of ``parallel.ppn`` ranks, each node's link
``cluster.link``); the rows every schedule in ``bench.schedules`` at every degree in ``bench.degrees``
(``sequential`` once, unpipelined), plus the ``bench.mixed_degrees`` pairs for ``fsmoe``, and
DeepSpeed-MoE when ``bench.deepspeed`` (:func:`layer_impls`); with ``fsmoe`` among the schedules, the
``fsmoe auto`` row at the planner's degrees, after the measured check (:func:`tune_auto`: the model's pair
and the next symmetric degrees, ``plan.tune`` pairs, timed for ``plan.tune_rounds`` rounds, the fastest
kept; when it is not the model's choice, that choice is timed as a row of its own beside it).
:func:`check_layer_job` refuses what this benchmark cannot run; :func:`quick_layer_job` is ``--quick``.

:func:`run_layer_bench` runs :func:`layer_bench_rank` on every rank (:mod:`fsmoe.bench.harness`). One
rank builds the groups (two channels), loads or profiles the job's costs and plans the ``fsmoe auto``
row (:mod:`fsmoe.bench.layer_predict`), builds the shared layer, checks the plan by measurement, builds
one :class:`Step` per implementation and the lower bound's probes (:class:`Probe`), times them in
interleaved rounds, then (``bench.memory``)
measures each step's peak memory and (``run.trace``) traces the fastest ``fsmoe`` step — or every step
with ``bench.trace_all`` — with the model's timeline of that row beside it. Every row of ours gets its
predicted time beside the measured one. What the numbers mean: :mod:`fsmoe.bench.layer_report`.

A :class:`Step` is one forward + backward of one implementation on this rank's fixed input ``x_TD``
with a fixed output gradient ``dy_TD``, plus the dense Gradient-AllReduce (GAR) of ``bench.dense_grad_mb``:
after the backward for schedules without a GAR slot in the MoE block, inside the MoE backward (the
pipeline's ``gar`` task, on the inter-node channel) for ``fsmoe`` and ``fsmoe_no_iio``. All our
implementations share one MoE layer (the same weights, so the same routing) and differ only in its
expert block.

A :class:`Probe` runs one operation of the same work alone, on tensors of the shapes the layer moves,
and says how often it occurs per forward + backward: the expert forward + backward over all
(e, S·W·C, D) slots and the gate, Order and I-Order forward + backward (compute, once each); an ESP
AllGather + ReduceScatter pair (intra, twice: forward and backward); one EP AlltoAll (inter, four
times: dispatch, combine and their adjoints) and the GAR (inter, once). Each run starts from a
barrier, so every operation is timed on its own, as the cheapest it gets on these links; the busiest
channel's sum of count × time bounds every schedule from below.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from fsmoe.bench.harness import (
    DEEPSPEED,
    ImplSpec,
    RoundTimes,
    memory_pass,
    rank_threads,
    run_on_ranks,
    timed_rounds,
)
from fsmoe.bench.layer_predict import (
    AUTO_SCHEDULE,
    AutoPlan,
    auto_options,
    layer_costs,
    plan_auto,
    predicted_trace,
    with_auto,
)
from fsmoe.bench.layer_report import format_markdown, summarize, write_chart
from fsmoe.bench.layer_workload import (
    QUICK_LAYER,
    LayerRankResult,
    LayerWorkload,
    ProbeInfo,
    Step,
    check_layer_job,
    layer_impls,
    quick_layer_job,
)
from fsmoe.bench.report import finish_report, write_traces
from fsmoe.config import JobConfig
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.perf.costs import Costs
from fsmoe.perf.tune import pick_fastest, tune_candidates
from fsmoe.schedule.runtime import TraceEvent


def traced_names(job: JobConfig, times: RoundTimes, steps: list[Step]) -> list[str]:
    """Which steps get a trace: the fastest fsmoe-family step (``run.trace``), or every step (``bench.trace_all``)."""
    if job.run.trace is None:
        return []
    if job.bench.trace_all:
        return [s.name for s in steps]
    ours = [s.name for s in steps if s.spec.family == "fsmoe"] or [s.name for s in steps if s.spec.is_ours]
    return [min(ours, key=lambda n: (statistics.median(times.samples_s[n]), n))] if ours else []


def _trace(step: Step, rank: int, job: JobConfig, costs: Costs) -> list[TraceEvent]:
    """One more run of ``step`` with task tracing on: its phases and its pipeline's tasks, and the
    model's timeline of the same row beside them (``predicted:*`` tracks)."""
    events: list[TraceEvent] = []
    if step.runtime is not None:
        step.runtime.trace, step.runtime.events = True, events
    step.prepare()
    dist.barrier()
    step.run(events, rank)
    if step.runtime is not None:
        step.runtime.trace = False
    return events + predicted_trace(job, costs, step.spec, events, rank)


def tune_auto(auto: AutoPlan, job: JobConfig, costs: Costs, work: LayerWorkload, rank: int,
              echo: Callable[[str], None] = print) -> AutoPlan:
    """The measured check of the ``fsmoe auto`` row (:mod:`fsmoe.perf.tune`): the candidates of
    :func:`~fsmoe.perf.tune.tune_candidates` (the plan, its degrees with the GAR in the other place, the
    next symmetric degrees; ``plan.tune`` pairs), one warm-up and ``plan.tune_rounds`` interleaved rounds
    each on this layer, the fastest median kept. Collective;
    every rank picks the same (the slowest rank's times). ``tune`` of the returned plan: what was timed."""
    t0 = time.perf_counter()
    chosen = auto.option
    candidates = tune_candidates(chosen, auto_options(job, costs), job.plan.tune)
    impls = [ImplSpec(AUTO_SCHEDULE, o.r_fwd, o.r_bwd, gar_after=o.gar_after) for o in candidates]
    times = timed_rounds([work.step(i) for i in impls], 1, job.plan.tune_rounds, rank)
    names = [i.name for i in impls]
    best = candidates[names.index(pick_fastest(times.samples_s, names))]
    rows = [{"name": n, "r_fwd": o.r_fwd, "r_bwd": o.r_bwd, "gar_after": o.gar_after, "predicted_s": o.predicted_s,
             "median_s": statistics.median(times.samples_s[n])} for n, o in zip(names, candidates, strict=True)]
    tune = {"rounds": job.plan.tune_rounds, "candidates": rows, "model": names[0],
            "picked": names[candidates.index(best)], "wall_s": time.perf_counter() - t0}
    if rank == 0:
        echo("[tune] " + ", ".join(f"{r['name']} {1e3 * r['median_s']:.1f} ms" for r in rows)
             + f" -> {tune['picked']}" + ("" if best is chosen else f" (the model's: {names[0]})"))
    impl = ImplSpec(AUTO_SCHEDULE, best.r_fwd, best.r_bwd, auto=True, gar_after=best.gar_after)
    return replace(auto, impl=impl, tune=tune)


def layer_bench_rank(rank: int, world_size: int, job: JobConfig) -> LayerRankResult:
    """Run the benchmark of ``job`` on this rank (inside an initialised gloo world of ``world_size``)."""
    start = time.perf_counter()
    threads = rank_threads(job)
    torch.set_num_threads(threads)
    groups = build_groups(ParallelDims.from_config(job.parallel), channels=2)
    costs = layer_costs(job, groups, rank)  # before any layer is built: the profile has the cores alone
    auto = plan_auto(job, costs) if AUTO_SCHEDULE in job.bench.schedules else None
    work = LayerWorkload(job, groups, rank)
    if auto is not None and job.plan.tune > 1:
        auto = tune_auto(auto, job, costs, work, rank)
    capacity = work.capacity()
    steps: list[Step] = []
    skipped: dict[str, str] = {}
    for impl in with_auto(layer_impls(job), auto.impl if auto else None, auto.model_impl if auto else None):
        if impl.family == DEEPSPEED:
            from fsmoe.bench.deepspeed_peer import build_deepspeed_step  # that module builds on this one

            built = build_deepspeed_step(work, threads)
            if isinstance(built, str):
                skipped[impl.name] = built
            else:
                steps.append(built)
        else:
            steps.append(work.step(impl))
    probes = work.probes(capacity)
    times = timed_rounds([*steps, *probes], job.bench.warmup, job.bench.reps, rank)
    memory, memory_note = memory_pass(steps) if job.bench.memory else ({}, None)
    traces = {name: _trace(next(s for s in steps if s.name == name), rank, job, costs)
              for name in traced_names(job, times, steps)}
    return LayerRankResult(
        rank=rank, names=[s.name for s in steps], specs=[s.spec for s in steps], times=times,
        notes={s.name: s.note for s in steps}, skipped=skipped,
        capacity=capacity, probes=[ProbeInfo(name=p.name, channel=p.channel, count=p.count) for p in probes],
        memory=memory, memory_note=memory_note, traces=traces, costs=costs.to_dict(),
        auto=auto.to_dict() if auto else None, wall_s=time.perf_counter() - start,
    )


def run_layer_bench(job: JobConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark of ``job`` (:func:`check_layer_job` first); print the table with ``echo``; write
    ``layer.json``, ``layer.png`` and ``job.toml`` into ``run.out`` and, with ``run.trace``, the Chrome
    trace(s); return the payload (see :mod:`fsmoe.bench.layer_report`)."""
    check_layer_job(job)
    t0 = time.perf_counter()
    rounds = job.bench.warmup + job.bench.reps
    auto = " + fsmoe auto" if AUTO_SCHEDULE in job.bench.schedules else ""
    estimate = (f"profile (cached, or up to {job.plan.profile_budget_s:g} s), {len(layer_impls(job))} "
                f"implementations{auto} x {rounds} rounds (+ probes, memory pass)")
    results, cluster = run_on_ranks("layer", job, layer_bench_rank, estimate, echo)
    payload = summarize(job, results, cluster=cluster)
    notes: list[str] = []
    if job.run.trace is not None:
        traces = {name: [e for r in results for e in r.traces.get(name, [])] for name in results[0].traces}
        single = None if job.bench.trace_all else next(iter(traces), None)
        files = write_traces(job.run.trace, traces, single)
        payload["trace_files"] = files
        notes.append(f"trace: {', '.join(files)}" if files else "trace: no fsmoe step to trace")
    return finish_report("layer", job, payload, t0, notes, format_markdown, write_chart, echo)


__all__ = ["QUICK_LAYER", "check_layer_job", "layer_bench_rank", "layer_impls", "quick_layer_job", "run_layer_bench",
           "tune_auto"]
