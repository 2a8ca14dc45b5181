"""From the layer benchmark's rank results to its payload, markdown table and bar chart.

:func:`summarize` is pure (no processes, no files): it takes every rank's
:class:`~fsmoe.bench.layer.LayerRankResult` and returns the JSON-ready payload.

* ``median_s``: the median over the timed rounds of the slowest rank's fwd+bwd(+GAR) time.
* ``ratio_to_best_fsmoe``: median / the smallest median among the ``fsmoe`` schedule's rows.
* Lower bound: each probe (one operation, timed alone) has a median and a count per fwd+bwd; a
  channel's time is the sum of count × median over its probes (compute: experts + gate/order; intra:
  2 ESP AllGather+ReduceScatter pairs; inter: 4 AlltoAlls + dense GAR); the bound is the busiest
  channel's time, and ``ratio_to_lower_bound`` = median / bound.
* Memory: per rank, the peak during one fwd+bwd and the part of it above the resident size just
  before (``extra``: activations, gradients, communication buffers); the table shows the worst rank,
  and ``mem_ratio_to_sequential`` compares ``extra`` with the ``sequential`` row's.
* Model (:mod:`fsmoe.bench.layer_predict`): ``predicted_s`` each row of ours as the α-β model plays it
  on the profiled costs (``predicted_fwd_s``, ``predicted_bwd_s``, ``predicted_gar_after_s`` its parts),
  ``predicted_error`` = predicted / median − 1; ``model.median_abs_error`` over those rows. ``profile``:
  where the costs came from (cache hit, path, the profile's wall time and budget); ``auto``: the
  ``fsmoe auto`` row's plan (degrees, cases, continuous r*, the GAR it planned with, ``solve_s``).
* CPU (all ranks share one machine; :func:`fsmoe.bench.harness.cpu_stats`): ``cpu_core_s`` the
  machine's busy CPU-seconds during a run, ``cpu_utilization`` that over run time × cores.
  ``cpu_bound_s`` = the probes' CPU-seconds (× count) summed / cores: where compute and communication
  compete for the same cores (more ranks than cores), no schedule beats it either. ``other_load``: CPU
  the machine spent outside our ranks during the runs (another job sharing the cores makes times suspect).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsmoe.bench.harness import DEEPSPEED, cpu_stats, other_load, ratio
from fsmoe.bench.layer_predict import predict_rows, relative_error
from fsmoe.bench.report import bar_chart, fmt_num, fmt_pct, fmt_ratio, job_dict, warning_lines
from fsmoe.config import JobConfig
from fsmoe.perf.costs import Costs

if TYPE_CHECKING:
    from fsmoe.bench.layer_workload import LayerRankResult

CHANNELS = ("compute", "intra", "inter")
TARGET_LOWER_BOUND = 1.10  # fsmoe at its best r within this factor of the lower bound
TARGET_VS_DEEPSPEED = 1.6  # at 200 Mbit/s
TARGET_VS_TUTEL = 1.25  # where intra-node AG/RS and GAR are a real share (EP x ESP layouts)
TARGET_MEMORY = 1.1  # pipelined schedules' peak memory relative to sequential
_MB = 2**20


def _best(rows: Sequence[dict[str, Any]], family: str) -> dict[str, Any] | None:
    mine = [r for r in rows if r["family"] == family]
    return min(mine, key=lambda r: (r["median_s"], r["name"])) if mine else None


def summarize(job: JobConfig, results: Sequence[LayerRankResult], *, cluster: dict[str, Any]) -> dict[str, Any]:
    """The payload of one run (see the module doc); ``cluster`` describes where it ran."""
    first = results[0]
    times, samples = first.times, first.times.samples_s
    costs = Costs.from_dict(first.costs) if first.costs is not None else None
    predicted = predict_rows(job, costs, first.specs) if costs is not None else {}
    rows: list[dict[str, Any]] = []
    for impl in first.specs:
        name = impl.name
        peaks = [r.memory[name] for r in results if name in r.memory]
        pred = predicted.get(name)
        median = statistics.median(samples[name])
        rows.append({
            "name": name, "family": impl.family, "r_fwd": impl.r_fwd, "r_bwd": impl.r_bwd, "auto": impl.auto,
            "median_s": median, "min_s": min(samples[name]),
            "predicted_s": pred.total_s if pred else None,
            "predicted_fwd_s": pred.fwd_s if pred else None, "predicted_bwd_s": pred.bwd_s if pred else None,
            "predicted_gar_after_s": pred.gar_after_s if pred else None,
            "predicted_error": relative_error(pred.total_s if pred else None, median),
            "samples_s": samples[name], "note": first.notes.get(name, ""),
            "peak_mem_mb": max(p.peak_bytes for p in peaks) / _MB if peaks else None,
            "extra_mem_mb": max(p.extra_bytes for p in peaks) / _MB if peaks else None,
            "peak_mem_mb_per_rank": [p.peak_bytes / _MB for p in peaks],
            "extra_mem_mb_per_rank": [p.extra_bytes / _MB for p in peaks],
            **cpu_stats(times, name),
        })

    probes = [{"name": p.name, "channel": p.channel, "count": p.count, "median_s": statistics.median(samples[p.name]),
               "samples_s": samples[p.name], **cpu_stats(times, p.name)} for p in first.probes]
    channels = {c: sum(p["count"] * p["median_s"] for p in probes if p["channel"] == c) for c in CHANNELS}
    busiest = max(CHANNELS, key=lambda c: channels[c])
    bound = channels[busiest]
    cpu_work = [p["cpu_core_s"] for p in probes]
    cpu_bound = (sum(p["count"] * p["cpu_core_s"] for p in probes) / times.cpu_count
                 if cpu_work and None not in cpu_work else None)

    best_fsmoe = _best(rows, "fsmoe")
    seq = next((r for r in rows if r["family"] == "sequential"), None)
    for r in rows:
        r["ratio_to_best_fsmoe"] = ratio(r["median_s"], best_fsmoe["median_s"] if best_fsmoe else None)
        r["ratio_to_lower_bound"] = ratio(r["median_s"], bound)
        r["mem_ratio_to_sequential"] = ratio(r["extra_mem_mb"], seq["extra_mem_mb"] if seq else None)
        r["ratio_to_cpu_bound"] = ratio(r["median_s"], cpu_bound)

    errors = [abs(r["predicted_error"]) for r in rows if r["predicted_error"] is not None]
    return {
        "benchmark": "layer",
        "cluster": cluster,
        "job": job_dict(job),
        "capacity": first.capacity,
        "implementations": rows,
        "model": {"median_abs_error": statistics.median(errors) if errors else None,
                  "max_abs_error": max(errors) if errors else None, "rows": len(errors)},
        "profile": _profile_info(costs),
        "auto": first.auto,
        "costs": first.costs,
        "skipped": first.skipped,
        "lower_bound": {"seconds": bound, "busiest_channel": busiest, "channels_s": channels, "probes": probes,
                        "cpu_bound_s": cpu_bound, "cpu_count": times.cpu_count},
        "best_fsmoe": best_fsmoe["name"] if best_fsmoe else None,
        "targets": _targets(job, rows, bound, cluster),
        "memory_note": first.memory_note,
        "other_load": other_load(times, [*rows, *probes]),
        "rank_wall_s": max(r.wall_s for r in results),
    }


def _profile_info(costs: Costs | None) -> dict[str, Any] | None:
    """Where the costs came from: cache hit and path, and the profile's own wall time and budget (a
    cache hit's wall time is that of the run that profiled)."""
    if costs is None:
        return None
    meta, cache = costs.meta, costs.meta.get("cache", {})
    return {"cache_hit": cache.get("hit"), "cache_path": cache.get("path"), "wall_s": meta.get("wall_s"),
            "budget_s": meta.get("budget_s"), "profiled_at": meta.get("profiled_at"), "scaled": meta.get("scaled"),
            "skipped": meta.get("skipped")}


def _targets(job: JobConfig, rows: list[dict[str, Any]], bound: float, cluster: dict[str, Any]) -> list[dict]:
    """The issue's targets, each with its measured value and whether it applies to this configuration."""
    best = _best(rows, "fsmoe")
    if best is None:
        return []
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool, applies: bool, why: str) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out.append({"name": name, "value": value, "target": target, "higher_is_better": higher_is_better,
                    "applies": applies and cluster.get("shaped", False), "met": met, "scope": why})

    add(f"{best['name']} / lower bound", ratio(best["median_s"], bound), TARGET_LOWER_BOUND, False, True,
        "every configuration")
    ds = _best(rows, DEEPSPEED)
    add(f"deepspeed / {best['name']}", ratio(ds["median_s"], best["median_s"]) if ds else None,
        TARGET_VS_DEEPSPEED, True, job.cluster.link.lower() == "200mbit", "at 200 Mbit/s")
    tutel = _best(rows, "tutel")
    add(f"{tutel['name'] if tutel else 'tutel'} / {best['name']}",
        ratio(tutel["median_s"], best["median_s"]) if tutel else None, TARGET_VS_TUTEL, True, job.parallel.esp > 1,
        "EP x ESP layouts")
    pipelined = [r for r in rows if r["family"] not in ("sequential", DEEPSPEED) and r["mem_ratio_to_sequential"]]
    worst = max(pipelined, key=lambda r: r["mem_ratio_to_sequential"], default=None)
    add(f"peak extra memory / sequential (worst: {worst['name'] if worst else '-'})",
        worst["mem_ratio_to_sequential"] if worst else None, TARGET_MEMORY, False, True, "pipelined schedules")
    return out


def format_markdown(payload: dict[str, Any]) -> str:
    """The result as markdown: configuration line, implementations, lower bound, targets."""
    job, lb, cluster = payload["job"], payload["lower_bound"], payload["cluster"]
    moe, par, bench = job["moe"], job["parallel"], job["bench"]
    burst = job["cluster"]["burst_bytes"]
    bucket = "" if burst is None else f" (tbf bucket {burst} B)"
    lines = [
        f"### MoE layer: T={bench['tokens']} tokens/rank, D={job['model']['d_model']}, H={moe['d_hidden']}, "
        f"E={moe['num_experts']}, k={moe['top_k']}, f={moe['capacity_factor']} (C={payload['capacity']}), "
        f"{moe['gate']}/{moe['expert']}, fp32",
        f"{cluster['description']}{bucket}; EP={par['ep']}, ESP={par['esp']}, dispatcher {par['dispatcher']}; "
        f"dense GAR {bench['dense_grad_mb']:g} MiB; median of {bench['reps']} interleaved rounds "
        f"(+{bench['warmup']} warm-up), slowest rank per run",
        *warning_lines(payload, "runs"),
        "",
        "| implementation | median s | predicted s | error | vs best fsmoe | vs lower bound | vs CPU bound | CPU busy "
        "| peak MB | extra MB | extra vs sequential | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["implementations"]:
        lines.append(
            f"| {r['name']} | {fmt_num(r['median_s'])} | {fmt_num(r.get('predicted_s'))} | "
            f"{fmt_signed_pct(r.get('predicted_error'))} | {fmt_ratio(r['ratio_to_best_fsmoe'])} | "
            f"{fmt_ratio(r['ratio_to_lower_bound'])} | {fmt_ratio(r['ratio_to_cpu_bound'])} | "
            f"{fmt_pct(r['cpu_utilization'])} | {fmt_num(r['peak_mem_mb'], 0)} | {fmt_num(r['extra_mem_mb'], 0)} | "
            f"{fmt_ratio(r['mem_ratio_to_sequential'])} | {r['note']} |"
        )
    for name, why in payload["skipped"].items():
        lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | - | not run: {why} |")
    lines += [
        "",
        "median s: fwd+bwd (+GAR) of the slowest rank. predicted s: the α-β model on the profiled costs "
        "(error = predicted / median - 1). CPU busy: the machine's busy CPU share during the run "
        "(all ranks, the kernel's network work included). peak MB: the worst rank's resident high-water mark; "
        "extra MB: peak minus the resident size just before the run (activations, gradients, buffers).",
        *_model_lines(payload),
        "", f"Lower bound {fmt_num(lb['seconds'])} s = busiest channel ({lb['busiest_channel']}); "
        "each operation timed alone (after a barrier), same shapes, same interleaved rounds:", "",
        "| channel | operation | median s | per fwd+bwd | CPU core-s | CPU busy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in lb["probes"]:
        lines.append(f"| {p['channel']} | {p['name']} | {fmt_num(p['median_s'])} | x{p.get('count', 1)} | "
                     f"{fmt_num(p['cpu_core_s'], 2)} | {fmt_pct(p['cpu_utilization'])} |")
    for c, s in lb["channels_s"].items():
        lines.append(f"| **{c}** | sum of count x median | **{fmt_num(s)}** | | | |")
    if lb.get("cpu_bound_s") is not None:
        lines += ["", f"CPU bound {fmt_num(lb['cpu_bound_s'])} s = the probes' CPU core-seconds / {lb['cpu_count']} "
                  "cores (all ranks share this machine: compute and communication compete for its cores)."]
    if payload["targets"]:
        lines += ["", "| target | value | goal | applies here | met |", "|---|---:|---:|---|---|"]
        for t in payload["targets"]:
            goal = f"{'>=' if t['higher_is_better'] else '<='} {t['target']:g}"
            met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
            applies = ("yes" if t["applies"] else "no") + f" ({t['scope']})"
            lines.append(f"| {t['name']} | {fmt_num(t['value'], 3)} | {goal} | {applies} | {met} |")
    if payload.get("memory_note"):
        lines += ["", payload["memory_note"]]
    return "\n".join(lines)


def fmt_signed_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _model_lines(payload: dict[str, Any]) -> list[str]:
    """The model's summary under the table: the median error, the profile, the auto row's plan."""
    model, prof, auto = payload.get("model"), payload.get("profile"), payload.get("auto")
    lines: list[str] = []
    if model and model["median_abs_error"] is not None:
        lines += ["", f"Model: median |error| {100 * model['median_abs_error']:.1f}% over {model['rows']} rows "
                      f"(max {100 * model['max_abs_error']:.0f}%)."]
    if prof:
        how = "cached" if prof["cache_hit"] else "profiled now"
        lines.append(f"Profile: {how} ({fmt_num(prof['wall_s'], 1)} s of {prof['budget_s']:g} s budget); "
                     f"{prof['cache_path']}")
    if auto:
        p = auto["plan"]
        lines.append(f"fsmoe auto, the model's plan: r_fwd={p['r_fwd']} r_bwd={p['r_bwd']} (r* {p['r_star_fwd']:.2f} / "
                     f"{p['r_star_bwd']:.2f}; forward case {p['case_fwd']}: {p['bottleneck_fwd']}; backward case "
                     f"{p['case_bwd']}: {p['bottleneck_bwd']}; GAR {auto['gar_bytes'] / 2**20:.2f} MiB "
                     + (f"after the backward, {1e3 * p['gar_after_s']:.1f} ms exposed: predicted faster than inside"
                        if p["gar_after_s"] > 0
                        else f"inside the MoE backward, {1e3 * p['gar_s']:.1f} ms beside the experts "
                             f"({1e3 * auto['t_gar_s']:.1f} ms if beside compute all along)")
                     + f"), solved in {1e3 * auto['solve_s']:.1f} ms.")
        tune = auto.get("tune")
        if tune:
            timed = ", ".join(f"{c['name']} {1e3 * c['median_s']:.1f} ms (predicted {1e3 * c['predicted_s']:.1f})"
                              for c in tune["candidates"])
            kept = "the model's plan kept" if tune["picked"] == tune["model"] else f"{tune['picked']} picked"
            lines.append(f"Measured check ({tune['rounds']} rounds each, {tune['wall_s']:.1f} s): {timed}; {kept}.")
    return lines


def write_chart(path: str | Path, payload: dict[str, Any]) -> str | None:
    """A bar per implementation (median s) with the lower bound as a line; a note when matplotlib is missing."""
    job, lb = payload["job"], payload["lower_bound"]["seconds"]
    burst = job["cluster"]["burst_bytes"]
    bucket = "" if burst is None else f", tbf bucket {burst} B"
    title = (f"MoE layer fwd+bwd, {payload['cluster']['description']}{bucket}, EP={job['parallel']['ep']} "
             f"ESP={job['parallel']['esp']}")
    return bar_chart(path, payload["implementations"], "median_s", title=title,
                     ylabel="median seconds (slowest rank)", line=(lb, f"lower bound {lb:.3f} s"))
