"""``fsmoe train --schedule fsmoe`` with no degree plans by itself (profile → plan → per-layer degrees and
gradient plan), writes plan.json and a job.toml that replays the plan without planning; ``fsmoe plan``
prints the same kind of decision from the cached profile. Real 2-rank runs on loopback with a short
profiling budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsmoe.cli import main
from fsmoe.config import SCHEDULES, load_toml

SMALL = ["--nproc", "2", "--ep", "2", "--batch-size", "4", "--data-bytes", "200000", "--eval-iters", "1",
         "--profile-budget", "6"]


def test_planned_training_writes_its_plan_and_replays_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    assert main(["train", *SMALL, "--schedule", "fsmoe", "--steps", "2", "--profile-cache", str(cache),
                 "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    job = load_toml(out / "job.toml")
    assert not job.schedule.planned and job.schedule.name == "fsmoe"
    assert len(plan["layers"]) == job.model.num_moe_layers
    # the measured check timed the model's plan first, then the other plans it weighed; the job runs the
    # fastest of them
    check = plan["check"]
    first, *others = check["candidates"]
    assert first["degrees"] == [[layer["r_fwd"], layer["r_bwd"]] for layer in plan["layers"]]
    assert first["gar_plan"] == plan["gar_plan"] and first["predicted_s"] == plan["step_s"]
    assert others and len(check["candidates"]) <= 3 and check["rounds"] == 8  # the plan section's defaults
    assert [(c["degrees"], c["gar_plan"]) for c in others] == [
        (a["degrees"], a["gar_plan"]) for a in plan["alternatives"][: len(others)]]
    picked = next(c for c in check["candidates"] if c["label"] == check["picked"])
    assert picked["median_s"] == min(c["median_s"] for c in check["candidates"])
    assert job.schedule.layer_degrees == tuple(tuple(d) for d in picked["degrees"])
    assert job.schedule.gar_plan == picked["gar_plan"]
    assert len(list(cache.glob("*.json"))) == 1  # profiled once, cached
    printed = capfd.readouterr().out  # the ranks' output (rank 0 prints)
    assert "plan for fsmoe" in printed and "bottleneck" in printed and "done: 2 steps" in printed
    assert f"running {check['picked']}" in printed

    # the job file replays the plan: no planning, the same degrees and gradient plan
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "job.toml"), "--out", str(again)]) == 0
    assert not (again / "plan.json").exists()
    assert load_toml(again / "job.toml").schedule == job.schedule
    assert "plan for fsmoe" not in capfd.readouterr().out

    # a given gradient plan is kept; the degrees are still planned (from the cached profile)
    given = tmp_path / "given"
    assert main(["train", *SMALL, "--schedule", "fsmoe", "--steps", "1", "--profile-cache", str(cache),
                 "--gar-plan", "dense:1=ready", "--out", str(given)]) == 0
    kept = load_toml(given / "job.toml").schedule
    timed = json.loads((given / "plan.json").read_text())["check"]["candidates"]
    assert kept.gar_plan == "dense:1=ready" and list(map(list, kept.layer_degrees)) in [c["degrees"] for c in timed]
    assert len({json.dumps(c["degrees"]) for c in timed}) == len(timed)  # the same gradient plan: degrees differ
    assert "keeping the given --gar-plan 'dense:1=ready'" in capfd.readouterr().out


def test_plan_command_reads_the_cached_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    plans = []
    for _ in range(2):
        assert main(["plan", *SMALL, "--profile-cache", str(cache), "--json"]) == 0
        text = capsys.readouterr().out
        plans.append(json.loads(text[text.index("{"):]))
    assert len(list(cache.glob("*.json"))) == 1  # the second plan used the first one's profile
    assert plans[0] == plans[1] | {"solve_s": plans[0]["solve_s"]}  # same costs: the same plan
    plan = plans[0]
    assert set(plan["predictions"]) == set(SCHEDULES)
    assert len(plan["layers"]) == 2 and all(layer["r_fwd"] >= 1 and layer["r_bwd"] >= 1 for layer in plan["layers"])
    assert plan["predictions"]["fsmoe"]["step_s"] <= plan["predictions"]["sequential"]["step_s"] * (1 + 1e-9)
