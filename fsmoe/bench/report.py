"""Show a layer-benchmark payload: a markdown table, JSON, a PNG bar chart, Chrome traces."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fsmoe.bench.config import DEEPSPEED
from fsmoe.schedule.runtime import TraceEvent, chrome_trace

OTHER_LOAD_WARN = 0.10  # share of the machine's CPU outside our ranks above which the table warns
FAMILY_COLORS = {"sequential": "#888888", "tutel": "#4c72b0", "tutel_improved": "#64b5cd", "lina": "#8172b2",
                 "fsmoe_no_iio": "#dd8452", "fsmoe": "#c44e52", "deepspeed": "#55a868"}  # bar colour per family


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def env_info() -> dict[str, Any]:
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def format_markdown(payload: dict[str, Any]) -> str:
    """The result as markdown: configuration line, implementations, lower bound, targets."""
    cfg, lb = payload["config"], payload["lower_bound"]
    cluster = payload["cluster"]
    bucket = "" if cfg.get("burst_bytes") is None else f" (tbf bucket {cfg['burst_bytes']} B)"
    lines = [
        f"### MoE layer: T={cfg['tokens']} tokens/rank, D={cfg['d_model']}, H={cfg['d_hidden']}, "
        f"E={cfg['experts']}, k={cfg['top_k']}, f={cfg['capacity_factor']} (C={payload['capacity']}), "
        f"{cfg['gate']}/{cfg['expert']}, fp32",
        f"{cluster['description']}{bucket}; EP={cfg['ep']}, ESP={cfg['esp']}, dispatcher {cfg['dispatcher']}; "
        f"dense GAR {cfg['dense_grad_mb']:g} MiB; median of {cfg['reps']} interleaved rounds "
        f"(+{cfg['warmup']} warm-up), slowest rank per run",
    ]
    load = payload.get("other_load")
    if load and load["share"] is not None and load["share"] > OTHER_LOAD_WARN:
        lines.append(f"**BUSY MACHINE: {100 * load['share']:.0f}% of the CPU went outside our ranks during the runs "
                     f"(worst run: {load['worst_run']}, {100 * load['worst_run_share']:.0f}%); another job shared "
                     "the cores, so the times are suspect. Rerun on a quiet machine.**")
    if not cluster.get("shaped", False):
        lines.append("**UNSHAPED: inter-node traffic runs at loopback speed; overlap numbers mean little.**")
    lines += [
        "",
        "| implementation | median s | vs best fsmoe | vs lower bound | vs CPU bound | CPU busy | peak MB | extra MB "
        "| extra vs sequential | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["implementations"]:
        lines.append(
            f"| {r['name']} | {_num(r['median_s'])} | {_ratio(r['ratio_to_best_fsmoe'])} | "
            f"{_ratio(r['ratio_to_lower_bound'])} | {_ratio(r['ratio_to_cpu_bound'])} | {_pct(r['cpu_utilization'])} | "
            f"{_num(r['peak_mem_mb'], 0)} | {_num(r['extra_mem_mb'], 0)} | "
            f"{_ratio(r['mem_ratio_to_sequential'])} | {r['note']} |"
        )
    for name, why in payload["skipped"].items():
        lines.append(f"| {name} | - | - | - | - | - | - | - | - | not run: {why} |")
    lines += [
        "",
        "median s: fwd+bwd (+GAR) of the slowest rank. CPU busy: the machine's busy CPU share during the run "
        "(all ranks, the kernel's network work included). peak MB: the worst rank's resident high-water mark; "
        "extra MB: peak minus the resident size just before the run (activations, gradients, buffers).",
    ]
    lines += ["", f"Lower bound {_num(lb['seconds'])} s = busiest channel ({lb['busiest_channel']}); "
              "each operation timed alone (after a barrier), same shapes, same interleaved rounds:", "",
              "| channel | operation | median s | per fwd+bwd | CPU core-s | CPU busy |",
              "|---|---|---:|---:|---:|---:|"]
    for p in lb["probes"]:
        lines.append(f"| {p['channel']} | {p['name']} | {_num(p['median_s'])} | x{p.get('count', 1)} | "
                     f"{_num(p['cpu_core_s'], 2)} | {_pct(p['cpu_utilization'])} |")
    for c, s in lb["channels_s"].items():
        lines.append(f"| **{c}** | sum of count x median | **{_num(s)}** | | | |")
    if lb.get("cpu_bound_s") is not None:
        lines += ["", f"CPU bound {_num(lb['cpu_bound_s'])} s = the probes' CPU core-seconds / {lb['cpu_count']} "
                  "cores (all ranks share this machine: compute and communication compete for its cores)."]
    if payload["targets"]:
        lines += ["", "| target | value | goal | applies here | met |", "|---|---:|---:|---|---|"]
        for t in payload["targets"]:
            goal = f"{'>=' if t['higher_is_better'] else '<='} {t['target']:g}"
            met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
            applies = ("yes" if t["applies"] else "no") + f" ({t['scope']})"
            lines.append(f"| {t['name']} | {_num(t['value'], 3)} | {goal} | {applies} | {met} |")
    if payload.get("memory_note"):
        lines += ["", payload["memory_note"]]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def write_chart(path: str | Path, payload: dict[str, Any]) -> str | None:
    """A bar per implementation (median s) with the lower bound as a line; returns a note when
    matplotlib is missing (then nothing is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e .[bench])"
    rows = payload["implementations"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.2))
    ax.bar([r["name"] for r in rows], [r["median_s"] for r in rows],
           color=[FAMILY_COLORS.get(r["family"], "#999999") for r in rows])
    lb = payload["lower_bound"]["seconds"]
    ax.axhline(lb, color="black", linestyle="--", linewidth=1, label=f"lower bound {lb:.3f} s")
    cfg = payload["config"]
    bucket = "" if cfg.get("burst_bytes") is None else f", tbf bucket {cfg['burst_bytes']} B"
    ax.set_title(f"MoE layer fwd+bwd, {payload['cluster']['description']}{bucket}, EP={cfg['ep']} ESP={cfg['esp']}",
                 fontsize=9)
    ax.set_ylabel("median seconds (slowest rank)")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_traces(path: str, traces: dict[str, Sequence[TraceEvent]], single: str | None) -> list[str]:
    """``single``: the one traced step, written to ``path``; otherwise one file per step, named
    ``<path stem>-<step>.json``. Returns the files written."""
    written = []
    for name, events in traces.items():
        if single is not None and name != single:
            continue
        out = path if single is not None else _suffixed(path, name)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        chrome_trace(list(events), out)
        written.append(out)
    return written


def _suffixed(path: str, name: str) -> str:
    p = Path(path)
    slug = name.replace(" ", "_").replace("=", "").replace("/", "-")
    return str(p.with_name(f"{p.stem}-{slug}{p.suffix or '.json'}"))


def finish_report(
    cfg: Any, payload: dict[str, Any], t0: float, notes: list[str], markdown: Callable[[dict[str, Any]], str],
    chart: Callable[[str, dict[str, Any]], str | None], echo: Callable[[str], None],
) -> dict[str, Any]:
    """The common end of a benchmark run: environment and wall time into ``payload``, the JSON and chart
    ``cfg`` names written, the table and the notes (``notes`` first) echoed. Returns ``payload``."""
    payload["env"] = env_info()
    if cfg.include_deepspeed:
        from fsmoe.bench.deepspeed_peer import deepspeed_version

        payload["env"]["deepspeed"] = deepspeed_version()
    payload["wall_s"] = time.perf_counter() - t0
    if cfg.out is not None:
        notes.append(f"json: {write_json(cfg.out, payload)}")
    chart_file = cfg.chart_path()
    if chart_file is not None:
        notes.append(chart(chart_file, payload) or f"chart: {chart_file}")
    echo(markdown(payload))
    if DEEPSPEED in payload["skipped"]:
        notes.append(f"deepspeed skipped: {payload['skipped'][DEEPSPEED]}")
    echo("\n".join(notes) + f"\n(wall {payload['wall_s']:.0f} s)")
    return payload
