"""``benchmarks/planner_accuracy.py``'s function: the cases and their jobs, and one tiny case run on 2
plain-loopback ranks (no namespaces) whose record is checked for structure and for values derived from
its own layer payload. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fsmoe.bench.layer import check_layer_job
from fsmoe.bench.planner import (
    DEFAULT_CASES,
    QUICK_CASES,
    QUICK_SETTINGS,
    AccuracySettings,
    case,
    case_job,
    run_planner_accuracy,
    show_planner_accuracy,
)


def test_default_cases_vary_what_the_issue_asks_and_are_runnable() -> None:
    jobs = [case_job(c, AccuracySettings()) for c in DEFAULT_CASES]
    assert len(jobs) >= 12 and len({c.name for c in DEFAULT_CASES}) == len(DEFAULT_CASES)
    for job in jobs:
        check_layer_job(job)
        assert job.bench.deepspeed is False and job.bench.memory is False and job.cluster.launcher == "emulated"
        assert job.bench.schedules == ("sequential", "tutel", "fsmoe_no_iio", "fsmoe")
    for get in (lambda j: j.bench.tokens, lambda j: j.model.d_model, lambda j: j.moe.d_hidden,
                lambda j: j.moe.num_experts, lambda j: j.moe.top_k, lambda j: j.cluster.link,
                lambda j: (j.parallel.ep, j.parallel.esp)):
        assert len({get(j) for j in jobs}) >= 2
    assert {(j.parallel.ep, j.parallel.esp) for j in jobs} == {(4, 1), (2, 2)}
    assert {j.cluster.link for j in jobs} == {"1gbit", "200mbit"}
    assert len({j.run.out for j in jobs}) == len(jobs)  # every case writes its own directory
    with pytest.raises(ValueError, match="unknown keys"):
        case("x", hidden=3)


def test_one_tiny_case_on_two_loopback_ranks(tmp_path: Path) -> None:
    settings = dataclasses.replace(QUICK_SETTINGS, launcher="local", nproc=2, procs_per_node=2, out=str(tmp_path),
                                   profile_cache=str(tmp_path / "cache"), profile_budget_s=2.0)
    lines: list[str] = []
    result = run_planner_accuracy(QUICK_CASES[:1], settings, echo=lines.append)
    (rec,) = result["cases"]
    layer = json.loads((tmp_path / "cases" / "tiny" / "layer.json").read_text())
    assert json.loads((tmp_path / "planner_accuracy.json").read_text()) == json.loads(json.dumps(result))
    assert rec["config"]["ep"] == 2 and rec["config"]["capacity"] == layer["capacity"]
    ours = [r for r in layer["implementations"] if r["family"] != "deepspeed"]
    assert [r["name"] for r in rec["rows"]] == [r["name"] for r in ours]
    assert all(r["predicted_s"] > 0 for r in rec["rows"])
    assert rec["median_abs_error"] == pytest.approx(layer["model"]["median_abs_error"])
    auto = layer["auto"]
    fsmoe = [r for r in ours if r["family"] == "fsmoe"]
    by_name = {r["name"]: r for r in ours}
    assert rec["auto_over_best"] == pytest.approx(by_name[auto["name"]]["median_s"] / min(r["median_s"] for r in fsmoe))
    assert rec["auto_over_sequential"] == pytest.approx(by_name[auto["name"]]["median_s"] /
                                                        by_name["sequential"]["median_s"])
    assert rec["within_5pct"] == (rec["auto_over_best"] <= 1.05)
    assert rec["resolve_same_degrees"] is True and rec["solve_ms_alone"] > 0 and rec["solve_ms_rank"] > 0
    assert set(rec["probe_errors"]) == {"experts fwd+bwd", "gate+order fwd+bwd", "EP AlltoAll", "dense GAR"}
    s = result["summary"]
    assert s["cases"] == 1 and s["within_5pct"] in ("0/1", "1/1") and s["wall_s"] > 0
    printed = "\n".join(lines)
    assert "summary: 1 configs; median |error|" in printed and "auto/best" in printed
    assert show_planner_accuracy(tmp_path / "planner_accuracy.json") in printed  # a saved run, printed again
