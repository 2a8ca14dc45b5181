"""The layer benchmark as one rank runs it (started on every rank by :func:`fsmoe.bench.layer.run_layer_bench`).

1. Build the groups (two channels), the shared layer, one :class:`~fsmoe.bench.impls.Step` per
   implementation and the lower bound's probes.
2. ``warmup`` + ``reps`` rounds; a round runs every step and every probe once, in an order rotated by
   one per round. Each run: world barrier, run, wall time; after the round one all-reduce (MAX) gives
   every run's slowest rank, since a collective step ends when its slowest rank does. Every rank thus
   holds the same samples. Rank 0 also records the machine's busy CPU-seconds per run, and a SUM
   all-reduce gives our ranks' own CPU-seconds: the rest is other processes' (and the kernel's) work.
3. Memory pass: each step twice more, keeping the smaller reading of this process's peak memory
   (:mod:`fsmoe.bench.memory`).
4. Trace (optional): one more run of the traced steps with task tracing on.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from fsmoe.bench.config import DEEPSPEED, LayerBenchConfig
from fsmoe.bench.impls import LayerWorkload, Step, rotate
from fsmoe.bench.memory import PeakMemory, cpu_peak_supported, measure_peak, track_allocations_in_rss
from fsmoe.parallel.dims import build_groups
from fsmoe.schedule.runtime import TraceEvent

MEMORY_ROUNDS = 4  # RSS peaks move by tens of MB between rounds (gloo buffers); take the min of 4


@dataclass(frozen=True)
class ProbeInfo:
    name: str
    channel: str
    count: int = 1  # occurrences per fwd+bwd


@dataclass
class RankResult:
    """What one rank sends back. ``samples_s`` are slowest-rank seconds per timed round (the same on
    every rank); ``memory`` is this rank's own; ``traces`` maps a step name to its trace events."""

    rank: int
    capacity: int
    steps: list[str]
    probes: list[ProbeInfo]
    samples_s: dict[str, list[float]]
    notes: dict[str, str]
    skipped: dict[str, str]
    busy_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # rank 0: machine CPU-seconds per run
    ranks_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # rank 0: all ranks' CPU-seconds per run
    cpu_count: int = 1
    memory: dict[str, PeakMemory] = field(default_factory=dict)
    memory_note: str | None = None
    traces: dict[str, list[TraceEvent]] = field(default_factory=dict)
    wall_s: float = 0.0


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def traced_names(cfg: LayerBenchConfig, samples_s: dict[str, list[float]], steps: list[Step]) -> list[str]:
    """Which steps get a trace: the fastest fsmoe-family step (``--trace``), or every step (``--trace-all``)."""
    if cfg.trace is None:
        return []
    if cfg.trace_all:
        return [s.name for s in steps]
    ours = [s.name for s in steps if s.spec.family == "fsmoe"] or [s.name for s in steps if s.spec.is_ours]
    return [min(ours, key=lambda n: (_median(samples_s[n]), n))] if ours else []


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


class Timed(Protocol):
    """Anything a round can run: a layer :class:`Step` or :class:`Probe`, a training step, ..."""

    @property
    def name(self) -> str: ...

    def run(self) -> None: ...


def timed_rounds(items: Sequence[Timed], warmup: int, reps: int, rank: int) -> tuple[dict, dict, dict]:
    """``warmup`` untimed then ``reps`` timed rounds, each running every item once in a rotated order.
    Slowest-rank seconds per timed round for every item; on rank 0 also, per run, the machine's busy
    CPU-seconds and those our ranks used (a barrier after every run brackets them; the timed part ends
    before it). The difference is other processes' work (and the kernel's, e.g. network softirqs).
    A layer :class:`Step` has its gradients zeroed before each run (outside the timed part)."""
    names = [i.name for i in items]
    samples: dict[str, list[float]] = {n: [] for n in names}
    busy: dict[str, list[float]] = {n: [] for n in names}
    ours: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + reps):
        gc.collect()
        order = rotate(items, round_)
        dt = torch.zeros(len(items), dtype=torch.float64)
        cpu = torch.zeros(len(items), dtype=torch.float64)
        machine = [0.0] * len(items)
        for item in order:
            i = names.index(item.name)
            if isinstance(item, Step):
                item.zero_grad()
            dist.barrier()
            c0, p0 = machine_busy_s() if rank == 0 else None, time.process_time()
            t0 = time.perf_counter()
            item.run()
            dt[i] = time.perf_counter() - t0
            dist.barrier()
            c1, cpu[i] = machine_busy_s() if rank == 0 else None, time.process_time() - p0
            machine[i] = (c1 - c0) if c0 is not None and c1 is not None else math.nan
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        if round_ >= warmup:
            for n, t, c, m in zip(names, dt.tolist(), cpu.tolist(), machine, strict=True):
                samples[n].append(t)
                if rank == 0 and not math.isnan(m):
                    busy[n].append(m)
                    ours[n].append(c)
    return samples, busy, ours


def _memory_pass(steps: list[Step], rounds: int = MEMORY_ROUNDS) -> tuple[dict[str, PeakMemory], str | None]:
    """Each step ``rounds`` times (interleaved); per step the round with the least extra memory, since
    allocator leftovers only ever add to a reading."""
    if not cpu_peak_supported():
        return {}, "peak memory not measured: /proc/self/clear_refs is not writable here"
    track_allocations_in_rss()
    out: dict[str, PeakMemory] = {}
    for _ in range(rounds):
        for step in steps:
            gc.collect()
            step.zero_grad()
            dist.barrier()
            m = measure_peak(step.run)
            if step.name not in out or m.extra_bytes < out[step.name].extra_bytes:
                out[step.name] = m
    return out, None


def layer_bench_rank(rank: int, world_size: int, cfg: LayerBenchConfig) -> RankResult:
    """Run the benchmark of ``cfg`` on this rank (inside an initialised gloo world of ``world_size``)."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    groups = build_groups(cfg.dims(), channels=2)
    work = LayerWorkload(cfg, groups, rank)
    capacity = work.capacity()
    steps: list[Step] = []
    skipped: dict[str, str] = {}
    for impl in cfg.impls():
        if impl.family == DEEPSPEED:
            from fsmoe.bench.deepspeed_peer import build_deepspeed_step  # imports DeepSpeed only when asked

            built = build_deepspeed_step(work, cfg.threads)
            if isinstance(built, str):
                skipped[impl.name] = built
            else:
                steps.append(built)
        else:
            steps.append(work.step(impl))
    probes = work.probes(capacity)
    samples, busy, ours = timed_rounds([*steps, *probes], cfg.warmup, cfg.reps, rank)
    result = RankResult(
        rank=rank, capacity=capacity, steps=[s.name for s in steps],
        probes=[ProbeInfo(p.name, p.channel, p.count) for p in probes], samples_s=samples,
        notes={s.name: s.note for s in steps}, skipped=skipped, busy_cpu_s=busy, ranks_cpu_s=ours,
        cpu_count=os.cpu_count() or 1,
    )
    if cfg.memory:
        result.memory, result.memory_note = _memory_pass(steps)
    for name in traced_names(cfg, samples, steps):
        step = next(s for s in steps if s.name == name)
        events: list[TraceEvent] = []
        if step.runtime is not None:
            step.runtime.trace, step.runtime.events = True, events
        step.zero_grad()
        dist.barrier()
        step.run(events, rank)
        if step.runtime is not None:
            step.runtime.trace = False
        result.traces[name] = events
    result.wall_s = time.perf_counter() - start
    return result
