"""From the ranks' raw samples to the benchmark's result: medians, ratios, the lower bound, targets.

Pure (no processes, no files): :func:`summarize` takes every rank's :class:`~fsmoe.bench.rank.RankResult`
and returns the JSON-ready payload that :mod:`fsmoe.bench.report` prints and plots.

* ``median_s``: the median over the timed rounds of the slowest rank's fwd+bwd(+GAR) time.
* ``ratio_to_best_fsmoe``: median / the smallest median among the ``fsmoe`` schedule's rows.
* Lower bound: each probe (one operation, timed alone) has a median and a count per fwd+bwd; a
  channel's time is the sum of count × median over its probes (compute: experts + gate/order; intra:
  2 ESP AllGather+ReduceScatter pairs; inter: 4 AlltoAlls + dense GAR); the bound is the busiest
  channel's time, and ``ratio_to_lower_bound`` = median / bound.
* Memory: per rank, the peak during one fwd+bwd and the part of it above the resident size just
  before (``extra``: activations, gradients, communication buffers); the table shows the worst rank,
  and ``mem_ratio_to_sequential`` compares ``extra`` with the ``sequential`` row's.
* CPU (all ranks share one machine): ``cpu_core_s`` is the machine's busy CPU-seconds during a run
  (``/proc/stat``, every process and the kernel's network work; mean over the rounds),
  ``cpu_utilization`` that over run time × cores (only for runs of 0.1 s and more).
  ``cpu_bound_s`` = the probes' CPU-seconds (× count) summed / cores: where compute and communication compete
  for the same cores (more ranks than cores), no schedule beats it either. ``other_load``: CPU the
  machine spent outside our ranks during the runs (another job sharing the cores makes times suspect).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any, Protocol

from fsmoe.bench.config import DEEPSPEED, LayerBenchConfig
from fsmoe.bench.rank import RankResult

CHANNELS = ("compute", "intra", "inter")
TARGET_LOWER_BOUND = 1.10  # fsmoe at its best r within this factor of the lower bound
TARGET_VS_DEEPSPEED = 1.6  # at 200 Mbit/s
TARGET_VS_TUTEL = 1.25  # where intra-node AG/RS and GAR are a real share (EP x ESP layouts)
TARGET_MEMORY = 1.1  # pipelined schedules' peak memory relative to sequential
_MB = 2**20
MIN_RUN_FOR_UTILIZATION_S = 0.1  # shorter runs are a few clock ticks: their CPU share is noise


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _best(rows: Sequence[dict[str, Any]], family: str) -> dict[str, Any] | None:
    mine = [r for r in rows if r["family"] == family]
    return min(mine, key=lambda r: (r["median_s"], r["name"])) if mine else None


class CpuSamples(Protocol):
    """What :func:`cpu_stats` and :func:`other_load` read from rank 0's result (a layer or train bench's)."""

    samples_s: dict[str, list[float]]
    busy_cpu_s: dict[str, list[float]]
    ranks_cpu_s: dict[str, list[float]]
    cpu_count: int


def cpu_stats(first: CpuSamples, name: str) -> dict[str, Any]:
    """Machine CPU-seconds busy during the run (median) and the share of all cores that is."""
    busy = first.busy_cpu_s.get(name)
    if not busy:
        return {"cpu_core_s": None, "cpu_utilization": None}
    core_s = statistics.fmean(busy)  # /proc/stat counts in clock ticks (10 ms): the mean blurs the steps
    ours = first.ranks_cpu_s.get(name) or []
    other = [max(0.0, b - o) for b, o in zip(busy, ours, strict=False)]
    run_s = statistics.fmean(first.samples_s[name])
    utilization = _ratio(core_s, run_s * first.cpu_count) if run_s >= MIN_RUN_FOR_UTILIZATION_S else None
    return {"cpu_core_s": core_s, "cpu_utilization": utilization,
            "ranks_cpu_s": statistics.median(ours) if ours else None, "other_cpu_s": other}


def summarize(cfg: LayerBenchConfig, results: Sequence[RankResult], *, cluster: dict[str, Any]) -> dict[str, Any]:
    """The payload of one run (see the module doc); ``cluster`` describes where it ran."""
    first = results[0]
    samples = first.samples_s
    impls = {i.name: i for i in cfg.impls()}
    rows: list[dict[str, Any]] = []
    for name in first.steps:
        impl = impls[name]
        peaks = [r.memory[name] for r in results if name in r.memory]
        rows.append({
            "name": name, "family": impl.family, "r_fwd": impl.r_fwd, "r_bwd": impl.r_bwd,
            "median_s": statistics.median(samples[name]), "min_s": min(samples[name]),
            "samples_s": samples[name], "note": first.notes.get(name, ""),
            "peak_mem_mb": max(p.peak_bytes for p in peaks) / _MB if peaks else None,
            "extra_mem_mb": max(p.extra_bytes for p in peaks) / _MB if peaks else None,
            "peak_mem_mb_per_rank": [p.peak_bytes / _MB for p in peaks],
            "extra_mem_mb_per_rank": [p.extra_bytes / _MB for p in peaks],
            **cpu_stats(first, name),
        })

    probes = [{"name": p.name, "channel": p.channel, "count": p.count, "median_s": statistics.median(samples[p.name]),
               "samples_s": samples[p.name], **cpu_stats(first, p.name)} for p in first.probes]
    channels = {c: sum(p["count"] * p["median_s"] for p in probes if p["channel"] == c) for c in CHANNELS}
    busiest = max(CHANNELS, key=lambda c: channels[c])
    bound = channels[busiest]
    cpu_work = [p["cpu_core_s"] for p in probes]
    cpu_bound = (sum(p["count"] * p["cpu_core_s"] for p in probes) / first.cpu_count
                 if cpu_work and None not in cpu_work else None)

    best_fsmoe = _best(rows, "fsmoe")
    seq = next((r for r in rows if r["family"] == "sequential"), None)
    for r in rows:
        r["ratio_to_best_fsmoe"] = _ratio(r["median_s"], best_fsmoe["median_s"] if best_fsmoe else None)
        r["ratio_to_lower_bound"] = _ratio(r["median_s"], bound)
        r["mem_ratio_to_sequential"] = _ratio(r["extra_mem_mb"], seq["extra_mem_mb"] if seq else None)
        r["ratio_to_cpu_bound"] = _ratio(r["median_s"], cpu_bound)

    return {
        "benchmark": "layer",
        "cluster": cluster,
        "config": dataclasses.asdict(cfg),
        "capacity": first.capacity,
        "implementations": rows,
        "skipped": first.skipped,
        "lower_bound": {"seconds": bound, "busiest_channel": busiest, "channels_s": channels, "probes": probes,
                        "cpu_bound_s": cpu_bound, "cpu_count": first.cpu_count},
        "best_fsmoe": best_fsmoe["name"] if best_fsmoe else None,
        "targets": _targets(cfg, rows, bound, cluster),
        "memory_note": first.memory_note,
        "other_load": other_load(first, rows, probes),
        "rank_wall_s": max(r.wall_s for r in results),
    }


def other_load(first: CpuSamples, rows: list[dict[str, Any]], probes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU-seconds the machine spent outside our rank processes during the timed runs, as a share of
    the cores' capacity: kernel network work is a few percent; much more means another job ran
    meanwhile and the numbers are suspect."""
    other = sum(sum(x["other_cpu_s"] or []) for x in [*rows, *probes] if x.get("other_cpu_s") is not None)
    wall = sum(sum(x["samples_s"]) for x in [*rows, *probes])
    if not other and not any(x.get("other_cpu_s") for x in [*rows, *probes]):
        return None
    worst = max(([max(x["other_cpu_s"]) / (max(x["samples_s"]) * first.cpu_count), x["name"]]
                 for x in [*rows, *probes] if x.get("other_cpu_s")), default=[0.0, ""])
    return {"core_s": other, "share": other / (wall * first.cpu_count) if wall else None,
            "worst_run_share": worst[0], "worst_run": worst[1]}


def _targets(cfg: LayerBenchConfig, rows: list[dict[str, Any]], bound: float, cluster: dict[str, Any]) -> list[dict]:
    """The issue's targets, each with its measured value and whether it applies to this configuration."""
    best = _best(rows, "fsmoe")
    if best is None:
        return []
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool, applies: bool, why: str) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out.append({"name": name, "value": value, "target": target, "higher_is_better": higher_is_better,
                    "applies": applies and cluster.get("shaped", False), "met": met, "scope": why})

    add(f"{best['name']} / lower bound", _ratio(best["median_s"], bound), TARGET_LOWER_BOUND, False, True,
        "every configuration")
    ds = _best(rows, DEEPSPEED)
    add(f"deepspeed / {best['name']}", _ratio(ds["median_s"], best["median_s"]) if ds else None,
        TARGET_VS_DEEPSPEED, True, cfg.link.lower() == "200mbit", "at 200 Mbit/s")
    tutel = _best(rows, "tutel")
    add(f"{tutel['name'] if tutel else 'tutel'} / {best['name']}",
        _ratio(tutel["median_s"], best["median_s"]) if tutel else None, TARGET_VS_TUTEL, True, cfg.esp > 1,
        "EP x ESP layouts")
    pipelined = [r for r in rows if r["family"] not in ("sequential", DEEPSPEED) and r["mem_ratio_to_sequential"]]
    worst = max(pipelined, key=lambda r: r["mem_ratio_to_sequential"], default=None)
    add(f"peak extra memory / sequential (worst: {worst['name'] if worst else '-'})",
        worst["mem_ratio_to_sequential"] if worst else None, TARGET_MEMORY, False, True, "pipelined schedules")
    return out
