"""``benchmarks/planner_accuracy.py``'s function: the cases and their jobs, and one tiny case run on 2
plain-loopback ranks (no namespaces) whose record is checked for structure and for values derived from
its own layer payload, and the statistics behind the per-config verdicts on synthetic samples. No timing is
asserted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fsmoe.bench.layer import check_layer_job
from fsmoe.bench.planner import (
    DEFAULT_CASES,
    QUICK_CASES,
    QUICK_SETTINGS,
    AccuracySettings,
    case,
    case_job,
    heldout_noise,
    heldout_over_best,
    model_record,
    noise_record,
    ratio_noise,
    run_planner_accuracy,
    show_planner_accuracy,
    verdict,
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
    tune = auto["tune"]  # the measured check ran (the plan section's default)
    assert rec["model_pick"] == tune["model"] and rec["tune_changed"] == (tune["picked"] != tune["model"])
    timed = tune["model"] if rec["tune_changed"] else auto["name"]  # the model's choice, as a row of its own
    assert rec["model_over_best"] == pytest.approx(by_name[timed]["median_s"] / min(r["median_s"] for r in fsmoe))
    assert rec["resolve_same_degrees"] is True and rec["solve_ms_alone"] > 0 and rec["solve_ms_rank"] > 0
    assert set(rec["probe_errors"]) == {"experts fwd+bwd", "gate+order fwd+bwd", "EP AlltoAll", "dense GAR"}
    s = result["summary"]
    assert s["cases"] == 1 and s["within_5pct"] in ("0/1", "1/1") and s["wall_s"] > 0
    printed = "\n".join(lines)
    assert "summary: 1 configs; median |error|" in printed and "auto/best" in printed
    assert show_planner_accuracy(tmp_path / "planner_accuracy.json") in printed  # a saved run, printed again
    saved = json.loads((tmp_path / "planner_accuracy.json").read_text())
    for key in ("auto_over_best", "rows", "best_verdict"):  # a record of an older version: derived again
        del saved["cases"][0][key]
    (tmp_path / "planner_accuracy.json").write_text(json.dumps(saved))
    assert show_planner_accuracy(tmp_path / "planner_accuracy.json") in printed


# --- the noise of the per-config verdicts (pure) ---------------------------------------------------------------
def test_heldout_ratio_times_the_choice_on_other_rounds() -> None:
    best, worse = [1.0] * 6, [1.3] * 6
    assert heldout_over_best([1.1] * 6, [worse, best]) == pytest.approx(1.1)
    assert heldout_over_best(best, [worse, best]) == pytest.approx(1.0)
    # the best on the even rounds is not the best on the odd ones: each half is judged by the other's choice
    a = [1.0, 2.0, 1.0, 2.0]
    b = [2.0, 1.0, 2.0, 1.0]
    assert heldout_over_best([1.5] * 4, [a, b]) == pytest.approx(1.5 / 2.0)
    with pytest.raises(ValueError, match="at least 2 rounds"):
        heldout_over_best([1.0], [[1.0]])


def test_heldout_ratio_removes_the_winners_curse_of_the_raw_minimum() -> None:
    rng = np.random.default_rng(7)
    raw, held = [], []
    for _ in range(300):  # auto and 8 grid rows of the same true time, 10 noisy rounds each
        rows = np.exp(rng.normal(0.0, 0.08, size=(9, 10)))
        auto, grid = rows[0], rows[1:]
        raw.append(np.log(np.median(auto) / np.median(grid, axis=1).min()))
        held.append(np.log(heldout_over_best(auto, grid)))
    assert np.mean(raw) > 0.03  # the minimum of 8 noisy medians sits well below the true time
    assert abs(np.mean(held)) < 0.01


def test_bootstrap_intervals_cover_the_ratio_and_collapse_without_noise() -> None:
    assert ratio_noise([2.0] * 5, [1.0] * 5) == pytest.approx((2.0, 2.0))
    assert heldout_noise([1.2] * 6, [[1.0] * 6, [1.5] * 6]) == pytest.approx((1.2, 1.2))
    rng = np.random.default_rng(3)
    num, den = np.exp(rng.normal(0.1, 0.1, 12)), np.exp(rng.normal(0.0, 0.1, 12))
    lo, hi = ratio_noise(num, den)
    assert lo < np.median(num) / np.median(den) < hi and hi - lo > 0.02
    assert ratio_noise(num, den) == (lo, hi)  # deterministic
    grid = np.exp(rng.normal(0.0, 0.1, (4, 12)))
    lo, hi = heldout_noise(num, grid)
    assert lo < heldout_over_best(num, grid) < hi


def test_verdict_and_the_noise_keys_of_a_record() -> None:
    assert verdict(1.04, (1.0, 1.1), 1.05) == "met"
    assert verdict(1.08, (1.03, 1.12), 1.05) == "noise"
    assert verdict(1.08, (1.06, 1.12), 1.05) == "missed"
    assert verdict(None, None, 1.05) is None
    auto = {"samples_s": [1.3] * 4}
    grid = [auto, {"samples_s": [1.0] * 4}, {"samples_s": [1.6] * 4}]
    seq = {"samples_s": [1.25] * 4}
    out = noise_record(auto, grid, seq, {"auto_over_best": 1.3, "auto_over_sequential": 1.04})
    assert out["auto_over_best_heldout"] == pytest.approx(1.3) and out["best_verdict"] == "missed"
    assert out["auto_over_sequential_ci"] == pytest.approx((1.04, 1.04)) and out["sequential_verdict"] == "missed"
    one_round = noise_record({"samples_s": [1.0]}, [{"samples_s": [1.0]}], seq,
                             {"auto_over_best": 1.0, "auto_over_sequential": 0.9})
    assert one_round["auto_over_best_heldout"] is None and one_round["best_verdict"] == "met"


def test_model_record_times_the_models_own_choice() -> None:
    best = {"name": "fsmoe r=2", "median_s": 1.0, "samples_s": [1.0] * 4}
    model = {"name": "fsmoe r=1 GAR after", "median_s": 1.2, "samples_s": [1.2] * 4}
    auto = {"name": "fsmoe auto r=2", "median_s": 1.0, "samples_s": [1.0] * 4}
    rows = {r["name"]: r for r in (best, model, auto)}
    tuned = {"name": "fsmoe auto r=2", "tune": {"model": "fsmoe r=1 GAR after", "picked": "fsmoe r=2"}}
    out = model_record(tuned, rows, list(rows.values()), best)
    assert out["model_pick"] == "fsmoe r=1 GAR after" and out["tune_changed"] is True
    assert out["model_over_best"] == pytest.approx(1.2) and out["model_over_best_heldout"] == pytest.approx(1.2)
    kept = {"name": "fsmoe auto r=2", "tune": {"model": "fsmoe r=2", "picked": "fsmoe r=2"}}
    out = model_record(kept, rows, list(rows.values()), best)  # kept: the auto row is the model's choice
    assert out["tune_changed"] is False and out["model_over_best"] == pytest.approx(1.0)
    untuned = model_record({"name": "fsmoe auto r=2", "tune": None}, rows, list(rows.values()), best)
    assert untuned["model_pick"] == "fsmoe r=2" and untuned["tune_changed"] is None
    assert model_record(None, rows, [], None)["model_pick"] is None


def test_settings_keep_the_rows_the_targets_compare() -> None:
    assert case_job(DEFAULT_CASES[0], AccuracySettings(schedules=("sequential", "fsmoe"))).bench.schedules == (
        "sequential", "fsmoe")
    tuned = case_job(DEFAULT_CASES[0], AccuracySettings(tune=1, tune_rounds=4))
    assert (tuned.plan.tune, tuned.plan.tune_rounds) == (1, 4)
    assert case_job(DEFAULT_CASES[0], AccuracySettings()).plan.tune == 3  # the plan section's default
    with pytest.raises(ValueError, match=r"lack \['sequential'\]"):
        AccuracySettings(schedules=("tutel", "fsmoe"))
