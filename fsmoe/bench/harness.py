"""The benchmark harness: ranks on a cluster, interleaved rounds, slowest-rank timing, CPU accounting, memory.

Both side-by-side benchmarks are workloads on it (:mod:`fsmoe.bench.layer`: one MoE layer under every
schedule; :mod:`fsmoe.bench.train`: optimizer steps of the GPT-MoE). A workload supplies a rank
function ``fn(rank, world_size, job) -> RankResult`` and a list of :class:`Timed` items; the harness

1. opens the cluster the job asks for (:func:`open_bench_cluster`: ``cluster.launcher`` emulated,
   local, or auto) and runs the rank function on every rank (:func:`run_on_ranks`);
2. times the items in ``bench.warmup`` untimed then ``bench.reps`` timed rounds (:func:`timed_rounds`),
   each round running every item once in its own shuffled order (:func:`round_order`; a rotation by one
   per round kept each row among the same neighbours and near the same place in every round, and rows
   doing the same work then measured up to 27% apart), with Python's garbage collector run before the
   round and paused during it. Each run: world barrier,
   run, wall time; after the round one all-reduce (MAX) gives every run's slowest rank, since a
   collective step ends when its slowest rank does, so every rank holds the same samples. Rank 0 also
   records the machine's busy CPU-seconds per run (:func:`machine_busy_s`), and a SUM all-reduce gives
   our ranks' own CPU-seconds: the rest is other processes' (and the kernel's) work;
3. optionally measures each item's peak memory (:func:`memory_pass`, :mod:`fsmoe.bench.memory`);
4. turns rank 0's CPU samples into per-row statistics (:func:`cpu_stats`) and the share of the
   machine that went elsewhere (:func:`other_load`): another job on the cores makes times suspect.

The single-process micro-benchmarks (``benchmarks/gates.py``, ``collectives.py``, ``cluster_links.py``)
use :func:`time_fn` instead: warm-up, then as many timed calls as fit a time budget, median reported.
The report side (JSON, job.toml, markdown helpers, charts) is :mod:`fsmoe.bench.report`.
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from fsmoe.bench.memory import PeakMemory, cpu_peak_supported, measure_peak, track_allocations_in_rss
from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec, LocalCluster, open_cluster
from fsmoe.config import JobConfig, check_degrees, get_schedule

DEEPSPEED = "deepspeed"  # the family name of DeepSpeed-MoE's rows
MEMORY_ROUNDS = 4  # RSS peaks move by tens of MB between rounds (gloo buffers); take the min of 4
MIN_RUN_FOR_UTILIZATION_S = 0.1  # shorter runs are a few clock ticks: their CPU share is noise


# --- what a row runs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImplSpec:
    """One implementation in a table: a schedule of ours at degrees (r_fwd, r_bwd), or DeepSpeed-MoE.

    ``sequential`` is our layer without a pipeline (dispatch → experts → combine under plain autograd);
    every other schedule runs the pipelined expert block. ``auto``: the degrees are the planner's
    (:mod:`fsmoe.perf.planner`), chosen on the ranks from the profiled costs; the row is named
    ``fsmoe auto r=…`` so it stands beside the hand-picked ``fsmoe r=…`` rows. ``gar_after``: a schedule
    with a GAR slot runs the dense Gradient-AllReduce after the backward instead (the planner's choice
    when overlapping it does not pay; named ``… GAR after``)."""

    family: str  # a schedule name, or "deepspeed"
    r_fwd: int = 1
    r_bwd: int = 1
    auto: bool = False
    gar_after: bool = False

    def __post_init__(self) -> None:
        if self.family != DEEPSPEED:
            check_degrees(get_schedule(self.family), self.r_fwd, self.r_bwd)
        if self.auto and not self.pipelined:
            raise ValueError(f"ImplSpec: only a pipelined schedule of ours has planned degrees, got {self.family!r}")
        if self.gar_after and not (self.is_ours and get_schedule(self.family).gar_in_moe):
            raise ValueError(f"ImplSpec: only a schedule with a GAR slot can move its GAR after the backward, got "
                             f"{self.family!r}")

    @property
    def name(self) -> str:
        if not self.pipelined:
            return self.family
        r = f"{self.r_fwd}" if self.r_fwd == self.r_bwd else f"{self.r_fwd}/{self.r_bwd}"
        return f"{self.family}{' auto' if self.auto else ''} r={r}{' GAR after' if self.gar_after else ''}"

    @property
    def is_ours(self) -> bool:
        return self.family != DEEPSPEED

    @property
    def pipelined(self) -> bool:
        return self.is_ours and get_schedule(self.family).pipelined

    @property
    def gar_in_moe(self) -> bool:
        """Whether the dense Gradient-AllReduce runs inside the MoE backward (else after the backward)."""
        return self.is_ours and get_schedule(self.family).gar_in_moe and not self.gar_after


# --- the cluster ------------------------------------------------------------------------------------------
def check_cpu_ranks(job: JobConfig, what: str) -> None:
    """The benchmarks' ranks run on the CPU with gloo (:mod:`fsmoe.cluster.ranks`): ``--device cuda`` is
    refused, naming the command, rather than ignored."""
    if job.run.device == "cuda":
        raise ValueError(f"{what}: the benchmark's ranks run on the CPU with gloo; --device cuda is not supported "
                         "here yet (make gpu-check measures the layer on one GPU)")


def open_bench_cluster(job: JobConfig) -> EmulatedCluster | LocalCluster:
    """The cluster a benchmark runs on (not yet entered): ``emulated`` (namespaces; fail if impossible),
    ``local`` (plain loopback, unshaped), ``auto`` (emulated where possible, else local with a warning)."""
    spec, launcher = EmulatedClusterSpec.from_job(job), job.cluster.launcher
    if launcher == "emulated":
        return EmulatedCluster(spec)
    if launcher == "local":
        return LocalCluster(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster = open_cluster(spec, allow_unshaped=True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    return cluster


R = TypeVar("R")


def run_on_ranks(
    name: str, job: JobConfig, fn: Callable[[int, int, JobConfig], R], estimate: str, echo: Callable[[str], None]
) -> tuple[list[R], dict[str, Any]]:
    """Run ``fn(rank, world_size, job)`` on every rank of ``job``'s cluster within ``bench.timeout_s``,
    warning when the links are not shaped: the per-rank results and a description of the cluster."""
    with open_bench_cluster(job) as cluster:
        shaped = isinstance(cluster, EmulatedCluster) and cluster.spec.shaped
        description = cluster.describe()
        if not shaped:
            print(f"warning: unshaped run ({description}): inter-node links are as fast as intra-node ones",
                  file=sys.stderr, flush=True)
        echo(f"[fsmoe bench {name}] {description}: {estimate} ...")
        results = cluster.run_function(fn, job, timeout=job.bench.timeout_s)
    return results, {"description": description, "shaped": shaped, "launcher": type(cluster).__name__}


def rank_threads(job: JobConfig) -> int:
    """Torch threads per rank: ``run.threads``, else 1 (every benchmark rank is one of several)."""
    return job.run.threads or 1


# --- interleaved rounds -------------------------------------------------------------------------------------
class Timed(Protocol):
    """Anything a round runs: a layer step or probe, a training step. ``prepare()`` runs before every
    run, untimed (a layer step zeroes its gradients there)."""

    @property
    def name(self) -> str: ...

    def prepare(self) -> None: ...

    def run(self) -> None: ...


T = TypeVar("T")


def round_order(items: Sequence[T], k: int, salt: str = "") -> list[T]:
    """The order round ``k`` runs ``items`` in: a shuffle seeded by k and ``salt`` (the same on every rank),
    so that over the rounds each item runs at different places and after different neighbours. The salt
    (:func:`timed_rounds` passes the items' names) gives each table its own orders: seeded by k alone, every
    planner-accuracy configuration ran its rows in the same 11 orders, and the ``fsmoe auto`` row, doing
    sequential's work, measured 6-12% slower than it in round 1 of all five configurations where it did."""
    return random.Random(f"{salt}#{k}").sample(list(items), len(items))


def machine_busy_s() -> float | None:
    """CPU-seconds this machine's cores have been busy (all processes and the kernel), from /proc/stat;
    None where there is none. Every rank of an emulated cluster runs on this one machine."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, idle, iowait, irq, softirq, steal: busy = all but idle, iowait and steal (the
    # hypervisor's, not ours)
    busy = sum(fields[:3]) + sum(fields[5:7])
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass(kw_only=True, frozen=True)
class RoundTimes:
    """What :func:`timed_rounds` measured, per item name: ``samples_s`` the slowest rank's seconds per
    timed round (the same on every rank); on rank 0 only, per run, ``busy_cpu_s`` the machine's busy
    CPU-seconds and ``ranks_cpu_s`` those our ranks used; ``cpu_count`` the machine's cores."""

    samples_s: dict[str, list[float]]
    busy_cpu_s: dict[str, list[float]] = field(default_factory=dict)
    ranks_cpu_s: dict[str, list[float]] = field(default_factory=dict)
    cpu_count: int = 1


def timed_rounds(items: Sequence[Timed], warmup: int, reps: int, rank: int) -> RoundTimes:
    """``warmup`` untimed then ``reps`` timed rounds, each running every item once in a shuffled order
    with the garbage collector paused (see the module doc). A barrier after every run brackets its CPU
    accounting; the timed part ends before it."""
    names = [i.name for i in items]
    samples: dict[str, list[float]] = {n: [] for n in names}
    busy: dict[str, list[float]] = {n: [] for n in names}
    ours: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + reps):
        gc.collect()
        dt = torch.zeros(len(items), dtype=torch.float64)
        cpu = torch.zeros(len(items), dtype=torch.float64)
        machine = [0.0] * len(items)
        enabled = gc.isenabled()
        gc.disable()  # a collection inside one item's run would land on it alone
        try:
            for item in round_order(items, round_, "|".join(names)):
                i = names.index(item.name)
                item.prepare()
                dist.barrier()
                c0, p0 = machine_busy_s() if rank == 0 else None, time.process_time()
                t0 = time.perf_counter()
                item.run()
                dt[i] = time.perf_counter() - t0
                dist.barrier()
                c1, cpu[i] = machine_busy_s() if rank == 0 else None, time.process_time() - p0
                machine[i] = (c1 - c0) if c0 is not None and c1 is not None else math.nan
        finally:
            if enabled:
                gc.enable()
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        if round_ >= warmup:
            for n, t, c, m in zip(names, dt.tolist(), cpu.tolist(), machine, strict=True):
                samples[n].append(t)
                if rank == 0 and not math.isnan(m):
                    busy[n].append(m)
                    ours[n].append(c)
    return RoundTimes(samples_s=samples, busy_cpu_s=busy, ranks_cpu_s=ours, cpu_count=os.cpu_count() or 1)


def memory_pass(items: Sequence[Timed], rounds: int = MEMORY_ROUNDS) -> tuple[dict[str, PeakMemory], str | None]:
    """Each item ``rounds`` times (interleaved, each after a barrier); per item the round with the least
    extra memory, since allocator leftovers only ever add to a reading. Returns the readings and a note
    (why nothing was measured), one of them empty."""
    if not cpu_peak_supported():
        return {}, "peak memory not measured: /proc/self/clear_refs is not writable here"
    track_allocations_in_rss()
    out: dict[str, PeakMemory] = {}
    for _ in range(rounds):
        for item in items:
            gc.collect()
            item.prepare()
            dist.barrier()
            m = measure_peak(item.run)
            if item.name not in out or m.extra_bytes < out[item.name].extra_bytes:
                out[item.name] = m
    return out, None


@dataclass(kw_only=True, frozen=True)
class RankResult:
    """What every rank of a benchmark sends back (a workload adds its own fields): ``names`` the rows
    that ran, in table order; ``skipped`` rows that could not run, with the reason; ``notes`` one line
    per row for the table; ``wall_s`` the rank's time from start to result."""

    rank: int
    names: list[str]
    times: RoundTimes
    notes: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


# --- CPU accounting (pure: from rank 0's RoundTimes) -----------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    return None if a is None or b is None or b <= 0 else a / b


def cpu_stats(times: RoundTimes, name: str) -> dict[str, Any]:
    """For one row: ``cpu_core_s`` the machine's busy CPU-seconds during a run (mean over the rounds:
    /proc/stat counts 10 ms ticks, the mean blurs the steps), ``cpu_utilization`` that over run time ×
    cores (runs of 0.1 s and more), ``ranks_cpu_s`` our ranks' own (median), ``other_cpu_s`` the rest
    per run."""
    busy = times.busy_cpu_s.get(name)
    if not busy:
        return {"cpu_core_s": None, "cpu_utilization": None}
    core_s = statistics.fmean(busy)
    ours = times.ranks_cpu_s.get(name) or []
    other = [max(0.0, b - o) for b, o in zip(busy, ours, strict=False)]
    run_s = statistics.fmean(times.samples_s[name])
    utilization = ratio(core_s, run_s * times.cpu_count) if run_s >= MIN_RUN_FOR_UTILIZATION_S else None
    return {"cpu_core_s": core_s, "cpu_utilization": utilization,
            "ranks_cpu_s": statistics.median(ours) if ours else None, "other_cpu_s": other}


def other_load(times: RoundTimes, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU-seconds the machine spent outside our rank processes during the timed runs of ``rows`` (each
    with ``name``, ``samples_s`` and :func:`cpu_stats`'s keys), as a share of the cores' capacity:
    kernel network work is a few percent; much more means another job ran meanwhile."""
    measured = [x for x in rows if x.get("other_cpu_s")]
    if not measured:
        return None
    other = sum(sum(x["other_cpu_s"]) for x in measured)
    wall = sum(sum(x["samples_s"]) for x in rows)
    worst = max(measured, key=lambda x: max(x["other_cpu_s"]) / max(x["samples_s"]))
    return {"core_s": other, "share": other / (wall * times.cpu_count) if wall else None,
            "worst_run_share": max(worst["other_cpu_s"]) / (max(worst["samples_s"]) * times.cpu_count),
            "worst_run": worst["name"]}


# --- single-process timing (the micro-benchmark scripts) -------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one measured callable, in milliseconds. ``skipped`` holds the reason when
    the measurement was abandoned (then ``samples_ms`` holds at most the one call that proved too
    slow, and ``median_ms`` is NaN)."""

    samples_ms: tuple[float, ...]
    warmup: int
    skipped: str | None = None

    @property
    def median_ms(self) -> float:
        if self.skipped is not None or not self.samples_ms:
            return math.nan
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms) if self.samples_ms and self.skipped is None else math.nan

    @property
    def ok(self) -> bool:
        return self.skipped is None and bool(self.samples_ms)

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 4)

        return {"median_ms": num(self.median_ms), "min_ms": num(self.min_ms), "reps": len(self.samples_ms) if self.ok
                else 0, "warmup": self.warmup, "samples_ms": [round(s, 4) for s in self.samples_ms],
                "skipped": self.skipped}


@dataclass(frozen=True, kw_only=True)
class TimingPolicy:
    """How hard :func:`time_fn` tries: ``warmup`` untimed calls, then up to ``reps`` timed calls, fewer
    when one call is slow (as many as fit in ``budget_s``, at least ``min_reps``). A call slower than
    ``skip_above_s`` stops the measurement and marks it skipped, so one absurd size cannot hold a run."""

    warmup: int = 1
    reps: int = 5
    min_reps: int = 1
    budget_s: float = 2.0
    skip_above_s: float = 20.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.reps < 1 or not 1 <= self.min_reps <= self.reps:
            raise ValueError(f"need warmup >= 0 and 1 <= min_reps <= reps, got warmup={self.warmup}, "
                             f"min_reps={self.min_reps}, reps={self.reps}")


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":  # a call ends when the device is done with it
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], policy: TimingPolicy = TimingPolicy(), *, device: torch.device | str = "cpu",
            warmup: int | None = None) -> Timing:
    """Time ``fn()`` under ``policy`` (``warmup`` overrides the policy's warm-up count); the number of
    timed calls is sized from the first estimate."""
    device = torch.device(device)
    n_warm = policy.warmup if warmup is None else warmup
    last_s = None
    for _ in range(n_warm):
        last_s = _timed_call(fn, device)
        if last_s > policy.skip_above_s:
            return _too_slow(last_s, n_warm, policy)
    samples: list[float] = []
    target = policy.reps
    while len(samples) < target:
        s = _timed_call(fn, device)
        if s > policy.skip_above_s:
            return _too_slow(s, n_warm, policy)
        samples.append(s * 1e3)
        if len(samples) == 1:
            est = min(last_s, s) if last_s is not None else s
            target = max(policy.min_reps, min(policy.reps, int(policy.budget_s / max(est, 1e-9))))
    return Timing(tuple(samples), n_warm)


def _too_slow(seconds: float, n_warm: int, policy: TimingPolicy) -> Timing:
    return Timing((seconds * 1e3,), n_warm, skipped=f"one call took {seconds:.1f} s > {policy.skip_above_s:g} s")


def not_run(reason: str) -> Timing:
    """A measurement that was not attempted (e.g. it would not fit in memory)."""
    return Timing((), 0, skipped=reason)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op thread pool (benchmarks compare at a fixed thread count)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
