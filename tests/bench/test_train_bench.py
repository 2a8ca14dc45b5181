"""``fsmoe bench train``: the job checks, the row list, the CLI flags, the summary arithmetic on hand-made
samples, and one quick run on 2 plain-loopback ranks whose first-step loss is checked against a
single-process model (and, where DeepSpeed is installed, against the DeepSpeed-MoE twin's). No timing
is asserted beyond "positive"."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fsmoe.bench import DEEPSPEED, check_train_job, quick_train_job, run_train_bench, summarize_train, train_rows
from fsmoe.bench.deepspeed_peer import deepspeed_unable
from fsmoe.bench.harness import RoundTimes
from fsmoe.bench.train import TrainRankResult, bench_model, row_job, tokens_per_step
from fsmoe.cli import build_parser, job_from_args
from fsmoe.config import JobConfig, load_toml, train_bench_recipe
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.parallel.parallelize import reference_grid
from fsmoe.train.data import BatchSampler, load_corpus

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _job(**overrides: Any) -> JobConfig:
    return train_bench_recipe().with_overrides(overrides)


def _quick(**overrides: Any) -> JobConfig:
    return quick_train_job(train_bench_recipe()).with_overrides(overrides)


# --- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parallel.ep": 3}, "ep*esp must divide world_size, got ep=3"),
        ({"train.batch_size": 6}, "global batch 6 is not divisible by the dense data-parallel degree 4"),
        ({"parallel.ep": 2, "parallel.esp": 4}, "esp=4 must divide procs_per_node=2"),
        ({"model.name": "huge"}, "unknown model preset 'huge'"),
        ({"bench.schedules": ("fsmoe", "gpipe")}, "unknown schedule 'gpipe'"),
        ({"bench.schedules": ()}, "at least one schedule"),
        ({"bench.reps": 0}, "reps must be an int >= 1"),
        ({"bench.warmup": -1}, "warmup must be an int >= 0"),
        ({"cluster.launcher": "ssh"}, "unknown launcher 'ssh'"),
        ({"cluster.link": "10mbps"}, "bytes/s"),
        # the pipelined rows' degrees must suit every schedule asked for
        ({"bench.schedules": ("tutel",), "schedule.r_fwd": 4}, "uses one degree for both passes"),
    ],
)
def test_job_refuses_with_the_numbers(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        check_train_job(_job(**changes))


def test_rows_and_layouts() -> None:
    job = _job(**{"bench.schedules": ("sequential", "fsmoe")})
    assert [(i.name, i.layout) for i in train_rows(job)] == [
        ("sequential", "EP=4 ESP=1"), ("fsmoe r=2", "EP=4 ESP=1"), ("fsmoe auto", "EP=4 ESP=1"),
        ("deepspeed", "EP=4 ESP=1")]
    assert tokens_per_step(job) == 16 * 128
    # the model DeepSpeed can mirror: kept top-2 weights renormalised, like its top2gating
    assert bench_model(job).moe.renormalize is True
    rows = train_rows(job)
    assert [row_job(job, r).schedule.name for r in rows] == ["sequential", "fsmoe", "fsmoe", "sequential"]
    # the auto row's job is fsmoe with no degrees: planned on the ranks, as fsmoe train plans it
    assert row_job(job, rows[2]).schedule.planned and not row_job(job, rows[1]).schedule.planned
    assert row_job(job, rows[1]).train.steps == 2 + 10 and row_job(job, rows[1]).train.lr_warmup == 0
    assert row_job(job, rows[1]).model.moe.renormalize is True
    # ESP: our rows keep it; DeepSpeed and one EP-only partner per schedule run EP over the same 4 ranks
    esp = job.with_overrides({"parallel.ep": 2, "parallel.esp": 2})
    assert [(i.name, i.layout) for i in train_rows(esp)] == [
        ("sequential", "EP=2 ESP=2"), ("fsmoe r=2", "EP=2 ESP=2"), ("fsmoe auto", "EP=2 ESP=2"),
        ("sequential (EP=4 only)", "EP=4 ESP=1"), ("fsmoe r=2 (EP=4 only)", "EP=4 ESP=1"),
        ("fsmoe auto (EP=4 only)", "EP=4 ESP=1"), ("deepspeed", "EP=4 ESP=1")]
    assert [i.name for i in train_rows(esp.with_overrides({"bench.deepspeed": False}))] == [
        "sequential", "fsmoe r=2", "fsmoe auto"]
    assert [i.name for i in train_rows(job.with_overrides({"bench.schedules": ("sequential", "tutel")}))] == [
        "sequential", "tutel r=2", "deepspeed"]  # no fsmoe, no auto row
    assert deepspeed_unable(esp) is None
    assert "mp=1" in (deepspeed_unable(job.with_overrides({"parallel.ep": 2, "parallel.mp": 2})) or "")
    assert "not arch 'mixtral'" in (deepspeed_unable(job.with_overrides({"model.name": "mixtral-tiny"})) or "")


def test_cli_flags_override_the_preset() -> None:
    args = build_parser().parse_args(["bench", "train", "--quick", "--link", "200mbit", "--ep", "2", "--esp", "2",
                                      "--schedules", "fsmoe", "--r-fwd", "4", "--no-deepspeed", "--reps", "5"])
    job = job_from_args(args, args.cmd)
    assert job == _quick(**{"cluster.link": "200mbit", "parallel.ep": 2, "parallel.esp": 2,
                            "bench.schedules": ("fsmoe",), "schedule.r_fwd": 4, "bench.deepspeed": False,
                            "bench.reps": 5})
    args = build_parser().parse_args(["bench", "train"])
    assert job_from_args(args, args.cmd) == train_bench_recipe()


# --- the summary arithmetic, on hand-made samples ----------------------------------------------------------
def test_summary_tokens_per_s_and_ratios_come_from_the_medians() -> None:
    job = _quick(**{"parallel.nproc": 2, "parallel.procs_per_node": 2, "parallel.ep": 2,
                    "bench.schedules": ("sequential", "fsmoe")})
    samples = {"sequential": [0.4, 0.2, 0.3], "fsmoe r=2": [0.25, 0.2, 0.1], DEEPSPEED: [0.5, 0.4, 0.6]}
    losses = {"sequential": [5.5, 5.0, 4.8, 4.7], "fsmoe r=2": [5.5, 5.0, 4.8, 4.7],
              DEEPSPEED: [5.50005, 5.0, 4.8, 4.6]}
    results = [TrainRankResult(rank=r, names=list(samples), times=RoundTimes(samples_s=samples), losses=losses)
               for r in range(2)]
    p = summarize_train(job, results, cluster={"description": "test", "shaped": True})
    rows = {r["name"]: r for r in p["implementations"]}
    tokens = 8 * 64
    assert p["tokens_per_step"] == tokens
    assert rows["fsmoe r=2"]["median_s"] == 0.2 and rows["fsmoe r=2"]["tokens_per_s"] == pytest.approx(tokens / 0.2)
    assert rows["sequential"]["deepspeed_over_this"] == pytest.approx(0.5 / 0.3)
    assert p["best_ours"] == "fsmoe r=2" and p["speedup_vs_deepspeed"] == pytest.approx(0.5 / 0.2)
    assert rows[DEEPSPEED]["loss_first"] == 5.50005 and rows[DEEPSPEED]["loss_last"] == 4.6
    check = p["initial_loss_check"]
    assert check["abs_diff"] == pytest.approx(5e-5) and check["match"] is True
    assert p["ours_agree_at_first_step"] == 0.0
    assert p["model"]["preset"] == "tiny" and p["job"]["train"]["batch_size"] == 8


def test_predicted_step_only_where_the_plan_predicted_what_the_row_ran() -> None:
    job = _quick(**{"parallel.nproc": 2, "parallel.procs_per_node": 2, "parallel.ep": 2,
                    "bench.schedules": ("sequential", "tutel", "fsmoe"), "schedule.r_fwd": 2})
    names = ["sequential", "tutel r=2", "fsmoe r=2", "fsmoe auto"]
    samples = {n: [0.2, 0.2, 0.2] for n in names}
    losses = {n: [5.0, 4.9, 4.8, 4.7] for n in names}
    predictions = {"sequential": {"step_s": 0.1, "degrees": [[1, 1], [1, 1]], "method": "default"},
                   "tutel": {"step_s": 0.15, "degrees": [[4, 4], [4, 4]], "method": "default"},  # not r=2
                   "fsmoe": {"step_s": 0.3, "degrees": [[2, 2], [2, 2]], "method": "step 1"}}  # planned GAR
    plan = {"schedule": "fsmoe", "step_s": 0.3, "degrees": [[2, 2], [2, 2]], "gar_plan": "", "partition": "step 1",
            "solve_s": 0.05, "predictions": predictions}
    results = [TrainRankResult(rank=r, names=names, times=RoundTimes(samples_s=samples), losses=losses,
                               plans={"fsmoe auto": {"plan": plan, "plan_wall_s": 1.0}}) for r in range(2)]
    p = summarize_train(job, results, cluster={"description": "test", "shaped": True})
    rows = {r["name"]: r for r in p["implementations"]}
    assert rows["fsmoe auto"]["predicted_s"] == 0.3 and rows["fsmoe auto"]["predicted_error"] == pytest.approx(0.5)
    assert rows["sequential"]["predicted_s"] == 0.1
    assert rows["tutel r=2"]["predicted_s"] is None  # predicted at r=4
    assert rows["fsmoe r=2"]["predicted_s"] is None  # same degrees, but the plan's GAR partition, not the default
    assert p["plans"]["fsmoe auto"]["plan"]["step_s"] == 0.3


# --- one quick run on 2 loopback ranks ----------------------------------------------------------------------
def test_quick_run_on_two_loopback_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    # DeepSpeed rides along where it is installed (its twin's first loss is then checked too)
    job = _quick(**{"cluster.launcher": "local", "parallel.nproc": 2, "parallel.procs_per_node": 2,
                    "parallel.ep": 2, "run.out": str(out), "bench.deepspeed": HAS_DEEPSPEED,
                    "bench.timeout_s": 180.0, "plan.profile_cache": str(tmp_path / "cache"),
                    "plan.profile_budget_s": 2.0})
    payload = run_train_bench(job)
    printed = capsys.readouterr().out
    assert "| implementation | layout | median step s | predicted s | error | tokens/s |" in printed
    assert "fsmoe auto: planned r_fwd/r_bwd per MoE layer" in printed
    data = json.loads((out / "train.json").read_text())
    assert data == json.loads(json.dumps(payload))  # what was returned is what was written
    assert load_toml(out / "job.toml") == job  # the resolved job, round-tripped
    assert data["benchmark"] == "train" and data["cluster"]["shaped"] is False
    rows = {r["name"]: r for r in data["implementations"]}
    assert {"sequential", "fsmoe r=2"} <= set(rows)
    for r in rows.values():
        assert len(r["samples_s"]) == job.bench.reps and all(s > 0 for s in r["samples_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["samples_s"]))
        assert r["tokens_per_s"] == pytest.approx(data["tokens_per_step"] / r["median_s"])
        assert len(r["losses"]) == job.bench.warmup + job.bench.reps and all(math.isfinite(x) for x in r["losses"])
        assert r["loss_last"] < r["loss_first"]  # four AdamW steps at lr 3e-3 from ~ln 256 learn something
    # our schedules train the same function: same loss at every step (float summation order aside)
    assert rows["fsmoe r=2"]["losses"] == pytest.approx(rows["sequential"]["losses"], abs=1e-4)
    assert rows["fsmoe auto"]["losses"] == pytest.approx(rows["sequential"]["losses"], abs=1e-4)
    # the auto row: planned by the trainer's plan_schedule, its predicted step beside the measured one
    plan = data["plans"]["fsmoe auto"]["plan"]
    assert len(plan["degrees"]) == job.model.num_moe_layers and plan["schedule"] == "fsmoe"
    check = plan["check"]  # the measured check ran as in fsmoe train: the row runs the plan it kept
    kept = next(c for c in check["candidates"] if c["label"] == check["picked"])
    assert rows["fsmoe auto"]["predicted_s"] == kept["predicted_s"] > 0
    auto = rows["fsmoe auto"]
    assert auto["predicted_error"] == pytest.approx(kept["predicted_s"] / auto["median_s"] - 1)
    assert rows["fsmoe auto"]["note"].startswith(f"planned r={' '.join(f'{a}/{b}' for a, b in kept['degrees'])};")
    assert rows["sequential"]["predicted_s"] == plan["predictions"]["sequential"]["step_s"]  # r = 1: what it ran
    assert data["plans"]["fsmoe auto"]["plan_wall_s"] > 0

    # oracle: the first step's loss (before any update) equals a single-process model with the same seed
    # on the same global batch, each rank's rows routed as their own group
    model_cfg = bench_model(job)
    corpus = load_corpus(job.data, model_cfg.seq_len)
    x_BL, y_BL = BatchSampler(corpus.train_N, batch_size=job.train.batch_size, seq_len=model_cfg.seq_len,
                              seed=job.run.seed).sample()
    torch.manual_seed(job.run.seed)
    ref = reference_grid(GPTMoE(model_cfg), 2, 1)
    with torch.no_grad():
        ref_loss = ref(x_BL, y_BL).loss.item()
    assert rows["sequential"]["loss_first"] == pytest.approx(ref_loss, abs=1e-5)

    if HAS_DEEPSPEED:
        assert DEEPSPEED in rows, data["skipped"]
        assert data["initial_loss_check"]["match"] is True
        assert rows[DEEPSPEED]["loss_first"] == pytest.approx(ref_loss, abs=1e-4)
    else:
        assert DEEPSPEED not in rows and data["initial_loss_check"] is None
    assert (out / "train.png").exists() == HAS_MATPLOTLIB


def test_deepspeed_missing_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmoe.bench.deepspeed_peer import build_deepspeed_twin

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.moe.layer", None)
    job = train_bench_recipe()
    why = build_deepspeed_twin(row_job(job, train_rows(job)[-1]), SimpleNamespace(), 1)  # type: ignore[arg-type]
    assert isinstance(why, str) and "DeepSpeed is not installed" in why
