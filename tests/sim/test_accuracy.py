"""Replaying a planner-accuracy run on the simulator: row names, the layer the benchmark times (no attention,
the gate from the profile), missing profiles skipped with the file named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fsmoe.config import get_schedule
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import LayerWork
from fsmoe.perf.planner import predict_layer
from fsmoe.sim.accuracy import case_batch, parse_row, replay_run
from fsmoe.sim.engine import DenseTimes, layer_tables, schedule_layer
from fsmoe.sim.presets import load_profile_costs, profiled


def test_row_names() -> None:
    assert parse_row("sequential") == ("sequential", 1, 1)
    assert parse_row("tutel r=4") == ("tutel", 4, 4)
    assert parse_row("fsmoe auto r=2/1") == ("fsmoe", 2, 1)
    with pytest.raises(ValueError, match="deepspeed"):
        parse_row("deepspeed")


def _run(tmp_path, *, with_profile: bool) -> tuple[str, str]:
    line = Linear(alpha_s=1e-3, beta_s=1e-8)
    ops = {op: line for op in ("a2a", "ag", "rs", "gar", "expert_fwd", "expert_bwd", "gate_fwd", "gate_bwd",
                               "dense_fwd", "dense_bwd")}
    profile = tmp_path / "profile-abc.json"
    if with_profile:
        busy = {"a2a": line.scaled(1.5), "gar": line.scaled(2.0)}
        profile.write_text(json.dumps({"key": {}, "costs": Costs(ops=ops, busy=busy).to_dict()}))
    case = {"name": "c", "config": {"tokens": 64, "d_model": 8, "d_hidden": 16, "experts": 4, "ep": 2, "esp": 2,
                                    "capacity": 40},
            "profile": {"cache_path": str(profile)},
            "rows": [{"name": "sequential", "median_s": 0.05}, {"name": "fsmoe r=2/4", "median_s": 0.04}]}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"settings": {"dense_grad_mb": 1.0}, "cases": [case]}))
    return str(path), str(profile)


def test_replay_is_the_engine_on_the_benchmarks_layer(tmp_path) -> None:
    path, profile = _run(tmp_path, with_profile=True)
    report = replay_run(path)
    assert [(r.name, r.schedule, r.r_fwd, r.r_bwd) for r in report.rows] == [
        ("sequential", "sequential", 1, 1), ("fsmoe r=2/4", "fsmoe", 2, 4)]
    costs = profiled(profile, nodes=2, gpus_per_node=2, gemms=2).costs
    case = json.loads((tmp_path / "acc.json").read_text())["cases"][0]
    batch = case_batch(case, 2**20)
    assert (batch.ep, batch.esp, batch.mp, int(batch.capacity_gate[0])) == (2, 2, 1, 40)
    gate = 1e-3 + 1e-8 * 64 * 8 * 4
    z = np.zeros(1)
    dense = DenseTimes(attn_fwd=z, attn_bwd=z, mp_comm=z, gate_fwd=np.array([gate]), gate_bwd=np.array([gate]))
    seq = get_schedule("sequential")
    want = schedule_layer(seq, layer_tables(seq, batch, costs, pairs=[(1, 1)]), dense, batch.grad_bytes, costs)
    assert report.rows[0].simulated_s == pytest.approx(float(want.total_s[0]), rel=1e-12)
    # fsmoe ran the whole GAR inside its MoE backward: the replay equals the planner's evaluator, which plays
    # the same placement with the slice contended between its idle and busy lines
    work = LayerWork(tokens=64, d_model=8, d_hidden=16, num_experts=4, ep=2, esp=2, gemms=2, gate_width=4,
                     capacity_gate=40)
    measured = load_profile_costs(profile)  # as profiled: expert lines over both GEMMs (profiled() splits them)
    evaluator = predict_layer("fsmoe", work, measured, 2, 4, gar_bytes=int(batch.grad_bytes[0]))
    assert report.rows[1].simulated_s == pytest.approx(evaluator.total_s, rel=1e-9)
    assert report.rows[1].error == pytest.approx(report.rows[1].simulated_s / 0.04 - 1)
    assert report.median_abs_error() == pytest.approx(float(np.median([abs(r.error) for r in report.rows])))
    assert "median |error| over 2 rows" in report.text()


def test_a_missing_profile_is_skipped_and_named(tmp_path) -> None:
    path, profile = _run(tmp_path, with_profile=False)
    report = replay_run(path)
    assert report.rows == () and math.isnan(report.median_abs_error())
    assert report.skipped == {"c": f"profile {profile} not found (the run measured it; rerun its profile)"}
    with pytest.raises(ValueError, match="cannot read a planner-accuracy record"):
        replay_run(tmp_path / "missing.json")
