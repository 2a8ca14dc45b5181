"""The simulator against measurements: each ``fsmoe bench layer`` row of a planner-accuracy run, replayed by
the simulator's engine from the profile that run measured on this machine's emulated cluster.

A planner-accuracy JSON (``benchmarks/planner_accuracy.py``) holds per configuration its sizes (T, D, H, E,
k, EP, ESP, the gate's C), the profile cache file its ranks used, and per row (``sequential``, ``tutel r=2``,
``fsmoe r=2/4``, ``fsmoe auto r=2/1``, ...) the measured median. The layer benchmark times one MoE layer:
gate + Order + I-Order, the expert block, and a dense Gradient-AllReduce of ``dense_grad_mb`` with no dense
part beside it. :func:`replay_case` builds that as a one-row :class:`~fsmoe.sim.engine.LayerBatch` (no
attention, no MP collectives; the gate's line from the profile) and plays the row's schedule at the row's
(r_fwd, r_bwd) with :func:`~fsmoe.sim.engine.layer_tables`, the collectives contended by their overlap with
compute as the planner's evaluator contends them (:func:`fsmoe.perf.model.play_contended`). The GAR is
placed where the benchmark ran it: after the backward (schedules without a slot, and a planned row that
moved it there: ``… GAR after``), or all of it inside the MoE backward, itself contended between its idle
and busy lines (:func:`gar_in_block`). Compute slows beside the collectives by the profile's σ
(``Costs.beside``) as in the planner's evaluator.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsmoe.config import ScheduleSpec, get_schedule
from fsmoe.perf.costs import Costs
from fsmoe.perf.model import model_slows, pass_tasks
from fsmoe.schedule.schedules import lanes_for
from fsmoe.sim.engine import (
    DenseTimes,
    LayerBatch,
    chunk_durations,
    contended_durations,
    gar_time,
    layer_tables,
    makespan,
    play_spans,
    schedule_layer,
)
from fsmoe.sim.presets import Cluster, profiled

TARGET = 0.10  # the bound on the median |error|


@dataclass(kw_only=True, frozen=True)
class RowReplay:
    """One benchmark row: its schedule and degrees, the measured median and the simulator's time (s)."""

    case: str
    name: str
    schedule: str
    r_fwd: int
    r_bwd: int
    measured_s: float
    simulated_s: float

    @property
    def error(self) -> float:
        """simulated / measured − 1."""
        return self.simulated_s / self.measured_s - 1.0


def parse_row(name: str) -> tuple[str, int, int]:
    """``fsmoe auto r=2/1`` → (``fsmoe``, 2, 1); ``sequential`` → (``sequential``, 1, 1)."""
    words = name.split()
    schedule = words[0]
    get_schedule(schedule)  # raises naming the choices
    degrees = next((w[2:] for w in words[1:] if w.startswith("r=")), "1")
    f, _, b = degrees.partition("/")
    return schedule, int(f), int(b or f)


def case_batch(case: dict[str, Any], grad_bytes: float) -> LayerBatch:
    """The benchmark's layer of one case as a one-row batch (no attention: the benchmark has none)."""
    c = case["config"]

    def col(v: float) -> np.ndarray:
        return np.array([v])

    return LayerBatch(tokens=col(c["tokens"]), seq_tokens=col(c["tokens"]), seq_len=col(c["tokens"]),
                      d_model=col(c["d_model"]), d_hidden=col(c["d_hidden"]), experts=col(c["experts"]),
                      gemms=col(2), capacity_gate=col(c["capacity"]), grad_bytes=col(grad_bytes), kv_ratio=col(1.0),
                      ep=c["ep"], esp=c["esp"], mp=1)


def case_cluster(case: dict[str, Any], profile: Path) -> Cluster:
    """The emulated cluster of a case (2 nodes × 2 ranks in the planner-accuracy runs) from its profile."""
    c = case["config"]
    world = c["ep"] * c["esp"]
    per_node = world // 2 if world > 1 else 1
    return profiled(profile, nodes=world // per_node, gpus_per_node=per_node, mp=1, gemms=2)


def gar_in_block(spec: ScheduleSpec, batch: LayerBatch, costs: Costs, r_fwd: int, r_bwd: int) -> np.ndarray:
    """The MoE block's backward at ``r_bwd`` (C padded for both degrees) with all of ``batch.grad_bytes``
    all-reduced in its GAR slot, the slice contended between its idle and busy lines like every other
    collective (as the layer benchmark runs it and its predicted column models it)."""
    pad = math.lcm(r_fwd, r_bwd)
    busy = chunk_durations(batch, costs, r_bwd, pad, busy=True) if costs.busy else None
    tasks = pass_tasks(spec, r_bwd, backward=True, with_gar=True)
    idle_gar = gar_time(costs.op("gar"), batch.grad_bytes)
    durations = contended_durations(tasks, lanes_for(spec), chunk_durations(batch, costs, r_bwd, pad), idle_gar, busy,
                                    gar_busy_s=gar_time(costs.op("gar", busy=True), batch.grad_bytes) if busy else None,
                                    slows=model_slows(costs) or None)
    return makespan(play_spans(tasks, lanes_for(spec), durations))


def replay_case(case: dict[str, Any], grad_bytes: float, profile: Path) -> list[RowReplay]:
    """Every row of ours in ``case``, simulated from ``profile`` (see the module docstring)."""
    cluster = case_cluster(case, profile)
    costs = cluster.costs
    batch = case_batch(case, grad_bytes)
    zero = np.zeros(1)
    n_gate = batch.tokens * batch.d_model * batch.experts
    dense = DenseTimes(attn_fwd=zero, attn_bwd=zero, mp_comm=zero, gate_fwd=costs.op("gate_fwd")(n_gate),
                       gate_bwd=costs.op("gate_bwd")(n_gate))
    out = []
    for row in case["rows"]:
        schedule, rf, rb = parse_row(row["name"])
        spec = get_schedule(schedule)
        tables = layer_tables(spec, batch, costs, pairs=[(rf, rb)])
        if row["name"].endswith(" GAR after"):  # the planner moved the slot's GAR after the backward
            simulated = float(tables.F[0, 0] + tables.A[0, 0] + gar_time(costs.op("gar"), batch.grad_bytes)[0]
                              + dense.fwd_s[0] + dense.bwd_s[0])
        elif spec.gar_in_moe:  # the benchmark runs the whole GAR inside the MoE backward: played there, contended
            simulated = float(tables.F[0, 0] + gar_in_block(spec, batch, costs, rf, rb)[0]
                              + dense.fwd_s[0] + dense.bwd_s[0])
        else:
            simulated = float(schedule_layer(spec, tables, dense, batch.grad_bytes, costs).total_s[0])
        out.append(RowReplay(case=case["name"], name=row["name"], schedule=schedule, r_fwd=rf, r_bwd=rb,
                             measured_s=row["median_s"], simulated_s=simulated))
    return out


@dataclass(kw_only=True, frozen=True)
class AccuracyReport:
    """Every replayed row, the cases skipped (name → why) and the medians of |error|."""

    rows: tuple[RowReplay, ...]
    skipped: dict[str, str]

    def median_abs_error(self, schedule: str | None = None) -> float:
        errs = [abs(r.error) for r in self.rows if schedule is None or r.schedule == schedule]
        return statistics.median(errs) if errs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        schedules = sorted({r.schedule for r in self.rows})
        return {"median_abs_error": self.median_abs_error(), "target": TARGET,
                "median_abs_error_by_schedule": {s: self.median_abs_error(s) for s in schedules},
                "median_error_signed": statistics.median(r.error for r in self.rows) if self.rows else None,
                "rows": [{"case": r.case, "name": r.name, "schedule": r.schedule, "r_fwd": r.r_fwd, "r_bwd": r.r_bwd,
                          "measured_s": r.measured_s, "simulated_s": r.simulated_s, "error": r.error}
                         for r in self.rows],
                "skipped": self.skipped}

    def text(self) -> str:
        lines = [f"{'case':<16}{'row':<20}{'measured ms':>12}{'simulated ms':>13}{'error':>9}"]
        lines += [f"{r.case:<16}{r.name:<20}{r.measured_s * 1e3:>12.2f}{r.simulated_s * 1e3:>13.2f}{r.error:>+9.1%}"
                  for r in self.rows]
        lines.append("median |error| by schedule: " + ", ".join(
            f"{s} {self.median_abs_error(s):.1%}" for s in sorted({r.schedule for r in self.rows})))
        lines.append(f"median |error| over {len(self.rows)} rows: {self.median_abs_error():.1%} "
                     f"(target <= {TARGET:.0%})")
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def replay_run(path: str | Path, profile_dir: str | Path | None = None) -> AccuracyReport:
    """Replay every case of a planner-accuracy JSON. A case's costs are those its run recorded beside it
    (``cases/<name>/layer.json``), else the profile file it named, or that file in ``profile_dir``; a case
    whose profile is missing is skipped, saying which file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a planner-accuracy record from {p}: {e}") from None
    grad_bytes = int(data["settings"]["dense_grad_mb"] * 2**20) // 4 * 4
    rows: list[RowReplay] = []
    skipped: dict[str, str] = {}
    for case in data["cases"]:
        named = Path(case["profile"]["cache_path"])
        # the costs the run used, as its case recorded them (the cache file may have been profiled again since)
        own = p.parent / "cases" / "".join(ch if ch.isalnum() else "_" for ch in case["name"]) / "layer.json"
        if profile_dir is not None:
            profile = Path(profile_dir).expanduser() / named.name
        else:
            profile = own if own.is_file() else named
        if not profile.is_file():
            skipped[case["name"]] = f"profile {profile} not found (the run measured it; rerun its profile)"
            continue
        rows += replay_case(case, grad_bytes, profile)
    return AccuracyReport(rows=tuple(rows), skipped=skipped)


__all__ = ["AccuracyReport", "RowReplay", "TARGET", "case_batch", "case_cluster", "parse_row", "replay_case",
           "replay_run"]
