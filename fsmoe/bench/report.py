"""The report side of every benchmark: where the files go, what the payload records, tables and charts.

A side-by-side benchmark (layer, train) writes into the job's ``run.out`` directory: ``<name>.json``
(the payload), ``<name>.png`` (a bar chart, where matplotlib is installed) and ``job.toml`` (the
resolved job, :func:`fsmoe.config.dump_toml`; ``fsmoe ... --config job.toml`` reruns it), then prints
its markdown table (:func:`finish_report`). The payload's ``job`` is the same job as
``{section: {field: value}}`` (:func:`job_dict`).

Helpers shared by the workloads' tables (:func:`fmt_num`, :func:`fmt_ratio`, :func:`fmt_pct`,
:func:`warning_lines`) and charts (:func:`bar_chart`); and, for the single-process scripts, a plain-text
:class:`Table`, :func:`env_info` and :func:`write_json`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fsmoe.bench.harness import DEEPSPEED, Timing
from fsmoe.config import JobConfig, dump_toml, flag_specs, get_value
from fsmoe.schedule.runtime import TraceEvent, chrome_trace

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_FILE = "job.toml"
OTHER_LOAD_WARN = 0.10  # share of the machine's CPU outside our ranks above which a table warns
FAMILY_COLORS = {"sequential": "#888888", "tutel": "#4c72b0", "tutel_improved": "#64b5cd", "lina": "#8172b2",
                 "fsmoe_no_iio": "#dd8452", "fsmoe": "#c44e52", DEEPSPEED: "#55a868"}  # bar colour per family
NO_MATPLOTLIB = "no chart: matplotlib is not installed (pip install -e .[bench])"


# --- the environment and the job ---------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def env_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a reader needs to compare two result files: versions, threads, device, CPU, commit, load."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def deepspeed_version() -> str | None:
    """The installed DeepSpeed's version (without importing it), or None."""
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None


def job_dict(job: JobConfig) -> dict[str, dict[str, Any]]:
    """The job as ``{section: {field: value}}``, the sections and keys of ``job.toml`` (tuples stay tuples)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in flag_specs():
        section, _, name = spec.key.partition(".")
        out.setdefault(section, {})[name] = get_value(job, spec.key)
    return out


def out_paths(job: JobConfig, name: str) -> dict[str, Path]:
    """The files a benchmark ``name`` writes into ``run.out``: ``json``, ``chart`` and ``job``."""
    out = Path(job.run.out)
    return {"json": out / f"{name}.json", "chart": out / f"{name}.png", "job": out / JOB_FILE}


# --- JSON -------------------------------------------------------------------------------------------------
def to_jsonable(obj: object) -> object:
    """Plain JSON values: Timing → its dict, dataclasses → dicts, NaN/inf → null, tuples → lists."""
    if isinstance(obj, Timing):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return to_jsonable(asdict(obj))  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, Path | torch.device | torch.dtype):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see :func:`to_jsonable`) as indented JSON; makes the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


# --- the end of a side-by-side run -----------------------------------------------------------------------------
def finish_report(
    name: str, job: JobConfig, payload: dict[str, Any], t0: float, notes: list[str],
    markdown: Callable[[dict[str, Any]], str], chart: Callable[[str | Path, dict[str, Any]], str | None],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The common end of a benchmark run: the environment and wall time into ``payload``, the JSON, the
    chart and ``job.toml`` written into ``run.out`` (see the module doc), the table and the notes
    (``notes`` first) echoed. Returns ``payload``."""
    payload["env"] = env_info()
    if job.bench.deepspeed:
        payload["env"]["deepspeed"] = deepspeed_version()
    payload["wall_s"] = time.perf_counter() - t0
    paths = out_paths(job, name)
    paths["job"].parent.mkdir(parents=True, exist_ok=True)
    paths["job"].write_text(dump_toml(job))
    notes.append(f"json: {write_json(paths['json'], payload)}")
    notes.append(chart(paths["chart"], payload) or f"chart: {paths['chart']}")
    notes.append(f"job: {paths['job']}")
    echo(markdown(payload))
    if DEEPSPEED in payload["skipped"]:
        notes.append(f"deepspeed skipped: {payload['skipped'][DEEPSPEED]}")
    echo("\n".join(notes) + f"\n(wall {payload['wall_s']:.0f} s)")
    return payload


def write_traces(path: str, traces: dict[str, Sequence[TraceEvent]], single: str | None) -> list[str]:
    """``single``: the one traced row, written to ``path``; otherwise one file per row, named
    ``<path stem>-<row>.json``. Returns the files written."""
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


# --- table and chart helpers --------------------------------------------------------------------------------
def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def warning_lines(payload: dict[str, Any], runs: str) -> list[str]:
    """The bold warnings above a table: another job shared the cores during the ``runs``; the links
    were not shaped."""
    lines = []
    load = payload.get("other_load")
    if load and load["share"] is not None and load["share"] > OTHER_LOAD_WARN:
        lines.append(f"**BUSY MACHINE: {100 * load['share']:.0f}% of the CPU went outside our ranks during the {runs} "
                     f"(worst: {load['worst_run']}, {100 * load['worst_run_share']:.0f}%); another job shared the "
                     "cores, so the times are suspect. Rerun on a quiet machine.**")
    if not payload["cluster"].get("shaped", False):
        lines.append("**UNSHAPED: inter-node traffic runs at loopback speed; overlap numbers mean little.**")
    return lines


def bar_chart(path: str | Path, rows: Sequence[dict[str, Any]], key: str, *, title: str, ylabel: str,
              bar_labels: Sequence[str] | None = None, line: tuple[float, str] | None = None,
              width_per_bar: float = 0.55, rotation: int = 60) -> str | None:
    """One bar per row (``row[key]``, coloured by ``row["family"]``), optional labels on the bars and a
    dashed horizontal ``line`` (value, legend). Returns a note when matplotlib is missing (then nothing
    is written), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(max(5.0, width_per_bar * len(rows) + 2), 4.2))
    bars = ax.bar([r["name"] for r in rows], [r[key] for r in rows],
                  color=[FAMILY_COLORS.get(r["family"], "#999999") for r in rows])
    if bar_labels is not None:
        ax.bar_label(bars, labels=list(bar_labels), fontsize=8)
    if line is not None:
        ax.axhline(line[0], color="black", linestyle="--", linewidth=1, label=line[1])
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=rotation, labelsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --- a plain-text table (the single-process scripts) --------------------------------------------------------
@dataclass
class Table:
    """A plain-text table: ``add(row)``, then ``str(table)``; numbers are right-aligned."""

    header: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, cells: Sequence[object]) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"row has {len(cells)} cells, header has {len(self.header)}")
        self.rows.append([fmt_cell(c) for c in cells])

    def __str__(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) for i, h in enumerate(self.header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        for r in self.rows:
            lines.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return "\n".join(lines)


def fmt_cell(value: object) -> str:
    if isinstance(value, Timing):
        return fmt_ms(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def fmt_ms(t: Timing) -> str:
    if not t.ok:
        return "skipped"
    m = t.median_ms
    return f"{m:.3f}" if m < 1 else f"{m:.2f}" if m < 100 else f"{m:.0f}"


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("x×"))
    except ValueError:
        return False
    return True
