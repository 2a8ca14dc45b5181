"""Shared helpers for the benchmark scripts: timing, environment record, tables, JSON.

Timing rule (:func:`time_fn`): ``warmup`` untimed calls, then up to ``reps`` timed calls, fewer when
one call is slow (as many as fit in ``budget_s``, at least ``min_reps``); the median is reported.
A call slower than ``skip_above_s`` stops the measurement and marks it skipped, so one absurd size
cannot hold the whole run. On CUDA every call is bracketed by a device synchronise.

Scripts keep their own CLI (``main(argv) -> payload``) and call these helpers; tests call ``main``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one measured callable, in milliseconds.

    ``skipped`` holds the reason when the measurement was abandoned (then ``samples_ms`` holds at most
    the one call that proved too slow, and ``median_ms`` is NaN)."""

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
        return {
            "median_ms": _json_float(self.median_ms),
            "min_ms": _json_float(self.min_ms),
            "reps": len(self.samples_ms) if self.ok else 0,
            "warmup": self.warmup,
            "samples_ms": [round(s, 4) for s in self.samples_ms],
            "skipped": self.skipped,
        }


@dataclass(frozen=True, kw_only=True)
class TimingPolicy:
    """How hard :func:`time_fn` tries: see the module docstring."""

    warmup: int = 1
    reps: int = 5
    min_reps: int = 1
    budget_s: float = 2.0
    skip_above_s: float = 20.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.reps < 1 or not 1 <= self.min_reps <= self.reps:
            raise ValueError(
                f"need warmup >= 0 and 1 <= min_reps <= reps, got warmup={self.warmup}, "
                f"min_reps={self.min_reps}, reps={self.reps}"
            )


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _timed_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], object],
    policy: TimingPolicy = TimingPolicy(),
    *,
    device: torch.device | str = "cpu",
    warmup: int | None = None,
) -> Timing:
    """Time ``fn()`` under ``policy`` (``warmup`` overrides the policy's warm-up count)."""
    sync = _sync_for(torch.device(device))
    n_warm = policy.warmup if warmup is None else warmup
    last_s = None
    for _ in range(n_warm):
        last_s = _timed_call(fn, sync)
        if last_s > policy.skip_above_s:
            return _too_slow(last_s, n_warm, policy)
    samples: list[float] = []
    target = policy.reps
    while len(samples) < target:
        s = _timed_call(fn, sync)
        if s > policy.skip_above_s:
            return _too_slow(s, n_warm, policy)
        samples.append(s * 1e3)
        if len(samples) == 1:  # size the run from the first estimate we have
            est = min(last_s, s) if last_s is not None else s
            fit = int(policy.budget_s / max(est, 1e-9))
            target = max(policy.min_reps, min(policy.reps, fit))
    return Timing(tuple(samples), n_warm)


def _too_slow(seconds: float, n_warm: int, policy: TimingPolicy) -> Timing:
    why = f"one call took {seconds:.1f} s > {policy.skip_above_s:g} s"
    return Timing((seconds * 1e3,), n_warm, skipped=why)


def not_run(reason: str) -> Timing:
    """A measurement that was not attempted (e.g. it would not fit in memory)."""
    return Timing((), 0, skipped=reason)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op thread pool (benchmarks compare at a fixed thread count)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def env_info(device: torch.device | str) -> dict[str, Any]:
    """What a reader needs to compare two result files: versions, threads, device, CPU, commit."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (dataclasses and :class:`Timing` converted) as indented JSON; makes parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


def to_jsonable(obj: object) -> object:
    """Plain JSON values: Timing → its dict, dataclasses → dicts, NaN → null, tuples → lists."""
    if isinstance(obj, Timing):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return to_jsonable(asdict(obj))  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
