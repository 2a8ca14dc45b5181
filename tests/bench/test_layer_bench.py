"""``fsmoe bench layer``: the job checks, the implementation list, the CLI flags, the summary arithmetic on
hand-made samples, and one quick run on 2 plain-loopback ranks (no namespaces) whose JSON is checked for
structure and for ratios computed from the medians. No timing is asserted."""

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

from fsmoe.bench import (
    DEEPSPEED,
    ImplSpec,
    check_layer_job,
    layer_impls,
    quick_layer_job,
    run_layer_bench,
    summarize,
)
from fsmoe.bench.harness import RoundTimes, round_order
from fsmoe.bench.layer_workload import LayerRankResult, ProbeInfo
from fsmoe.bench.memory import PeakMemory
from fsmoe.cli import build_parser, job_from_args
from fsmoe.config import JobConfig, layer_bench_recipe, load_toml
from fsmoe.perf.costs import Costs
from fsmoe.perf.model import layer_work
from fsmoe.perf.planner import LayerOption, layer_options, plan_layer
from fsmoe.perf.tune import tune_candidates

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _job(**overrides: Any) -> JobConfig:
    return layer_bench_recipe().with_overrides(overrides)


def _quick(**overrides: Any) -> JobConfig:
    return quick_layer_job(layer_bench_recipe()).with_overrides(overrides)


# --- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parallel.ep": 2, "parallel.esp": 1}, "ep*esp must equal the world size"),
        ({"parallel.ep": 2, "parallel.mp": 2}, "mp must be 1, got mp=2"),
        ({"moe.num_experts": 6}, "E=6 is not divisible by EP=4"),
        ({"parallel.ep": 2, "parallel.esp": 2, "moe.d_hidden": 2049}, "H=2049 is not divisible by ESP=2"),
        ({"parallel.ep": 2, "parallel.esp": 4}, "esp=4 must divide procs_per_node=2"),
        ({"bench.schedules": ("fsmoe", "gpipe")}, "unknown schedule 'gpipe'"),
        ({"cluster.link": "10mbps"}, "bytes/s"),
        ({"parallel.dispatcher": "local"}, "unknown dispatcher 'local'"),
        ({"bench.degrees": (0,)}, "degrees must be >= 1"),
        ({"cluster.launcher": "ssh"}, "unknown launcher 'ssh'"),
        ({"bench.reps": 0}, "reps must be an int >= 1"),
    ],
)
def test_job_refuses_with_the_numbers(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        check_layer_job(_job(**changes))


def test_implementations_listed_in_table_order() -> None:
    job = _job(**{"bench.schedules": ("sequential", "tutel", "fsmoe"), "bench.degrees": (1, 4),
                  "bench.mixed_degrees": ((2, 4), (4, 4))})
    names = [i.name for i in layer_impls(job)]
    # sequential once; tutel gets only r_fwd = r_bwd; fsmoe also the mixed pairs (duplicates dropped)
    assert names == ["sequential", "tutel r=1", "tutel r=4", "fsmoe r=1", "fsmoe r=4", "fsmoe r=2/4", "deepspeed"]
    assert [i.gar_in_moe for i in layer_impls(job)] == [False, False, False, True, True, True, False]
    assert ImplSpec("fsmoe", 4, 8).pipelined and not ImplSpec("sequential").pipelined
    no_ds = job.with_overrides({"bench.deepspeed": False})
    assert [i.name for i in layer_impls(no_ds)][-1] == "fsmoe r=2/4"
    with pytest.raises(ValueError, match="uses one degree for both passes"):
        ImplSpec("tutel", 2, 4)


def test_quick_preset_is_small_and_overridable() -> None:
    job = _quick(**{"parallel.ep": 2, "parallel.esp": 2})
    assert (job.bench.tokens, job.model.d_model, job.moe.d_hidden, job.bench.reps) == (256, 128, 256, 2)
    assert (job.parallel.ep, job.parallel.esp) == (2, 2)
    check_layer_job(job)


def _cli_job(*argv: str) -> JobConfig:
    args = build_parser().parse_args(["bench", "layer", *argv])
    return job_from_args(args, args.cmd)


def test_cli_flags_override_the_preset() -> None:
    job = _cli_job("--quick", "--link", "200mbit", "--ep", "2", "--esp", "2", "--schedules", "tutel", "fsmoe",
                   "--r", "2", "4", "--mixed", "2/4", "--no-deepspeed", "--reps", "3", "--burst", "262144")
    assert job.bench.tokens == 256 and job.cluster.link == "200mbit" and (job.parallel.ep, job.parallel.esp) == (2, 2)
    assert job.bench.schedules == ("tutel", "fsmoe") and job.bench.degrees == (2, 4)
    assert job.bench.mixed_degrees == ((2, 4),)
    assert job.bench.deepspeed is False and job.bench.reps == 3 and job.cluster.burst_bytes == 262144
    assert job.bench.memory is True and job.bench.trace_all is False  # flags left out keep the preset's values
    assert _cli_job() == layer_bench_recipe()


def test_cli_rejects_a_bad_pair_and_a_bad_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "layer", "--mixed", "4x8"])
    assert "expected R_FWD/R_BWD" in capsys.readouterr().err
    from fsmoe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "layer", "--ep", "3"])
    assert exc.value.code == 2
    assert "ep*esp must divide world_size, got ep=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "layer", "--ep", "2"])  # the layer benchmark's own rule, before any rank starts
    assert exc.value.code == 2
    assert "ep*esp must equal the world size" in capsys.readouterr().err


# --- the summary arithmetic, on hand-made samples ----------------------------------------------------------
def _fake_results(job: JobConfig) -> list[LayerRankResult]:
    samples = {
        "sequential": [3.0, 1.0, 2.0],  # median 2.0
        "fsmoe r=1": [1.6, 1.5, 1.4],  # median 1.5
        "fsmoe r=2": [1.2, 1.0, 1.1],  # median 1.1: the best fsmoe
        "experts fwd+bwd": [0.8, 0.9, 0.7],  # compute 0.8 + 0.1
        "gate+order fwd+bwd": [0.1, 0.1, 0.1],
        "EP AlltoAll": [0.125, 0.1, 0.15],  # inter 4 x 0.125 + 0.2
        "dense GAR": [0.2, 0.2, 0.2],
    }
    probes = [ProbeInfo(name="experts fwd+bwd", channel="compute"),
              ProbeInfo(name="gate+order fwd+bwd", channel="compute"),
              ProbeInfo(name="EP AlltoAll", channel="inter", count=4), ProbeInfo(name="dense GAR", channel="inter")]
    specs = [ImplSpec("sequential"), ImplSpec("fsmoe", 1, 1), ImplSpec("fsmoe", 2, 2)]
    times = RoundTimes(samples_s=samples, busy_cpu_s={n: [2.0, 2.0, 2.0] for n in samples}, cpu_count=2)
    out = []
    for rank in range(2):
        memory = {s.name: PeakMemory(peak_bytes=(100 + 10 * i + rank) * 2**20, before_bytes=50 * 2**20, method="test")
                  for i, s in enumerate(specs)}
        out.append(LayerRankResult(rank=rank, names=[s.name for s in specs], specs=specs, times=times, capacity=154,
                                   probes=probes, skipped={DEEPSPEED: "not installed"}, memory=memory))
    return out


def test_rounds_run_the_rows_in_shuffled_orders() -> None:
    """Every round runs every row once, in an order that depends only on the round (the same on every
    rank), so that a row neither keeps its neighbours nor its place: over 5 rounds of 18 rows each row
    sees several places and several predecessors (a rotation by one gave each the same predecessor)."""
    rows = [f"row{i}" for i in range(18)]
    orders = [round_order(rows, k) for k in range(5)]
    assert all(sorted(o) == sorted(rows) for o in orders)
    assert orders == [round_order(rows, k) for k in range(5)] and orders[0] != orders[1]
    for row in rows:
        assert len({o.index(row) for o in orders}) >= 3
        assert len({o[o.index(row) - 1] for o in orders if o.index(row) > 0}) >= 2
    # another table (other row names) gets other orders: a row's place is not the same in every table
    other = [round_order(rows, k, "another table") for k in range(5)]
    assert other == [round_order(rows, k, "another table") for k in range(5)] and other != orders


def test_summary_ratios_come_from_the_medians() -> None:
    job = _quick(**{"bench.schedules": ("sequential", "fsmoe"), "bench.mixed_degrees": ()})
    p = summarize(job, _fake_results(job), cluster={"description": "test", "shaped": True})
    rows = {r["name"]: r for r in p["implementations"]}
    assert rows["sequential"]["median_s"] == 2.0 and rows["fsmoe r=2"]["median_s"] == 1.1
    assert p["best_fsmoe"] == "fsmoe r=2"
    lb = p["lower_bound"]
    assert lb["channels_s"] == pytest.approx({"compute": 0.9, "intra": 0.0, "inter": 0.7})
    assert lb["busiest_channel"] == "compute" and lb["seconds"] == pytest.approx(0.9)
    assert lb["cpu_bound_s"] == pytest.approx((3 + 4) * 2.0 / 2)  # the AlltoAll's CPU counts 4 times
    assert rows["sequential"]["ratio_to_best_fsmoe"] == pytest.approx(2.0 / 1.1)
    assert rows["fsmoe r=1"]["ratio_to_lower_bound"] == pytest.approx(1.5 / 0.9)
    # memory: worst rank (rank 1), extra = peak - before; ratio to sequential's extra
    assert rows["fsmoe r=2"]["extra_mem_mb"] == pytest.approx(121 - 50)
    assert rows["fsmoe r=2"]["mem_ratio_to_sequential"] == pytest.approx(71 / 51)
    assert p["skipped"] == {DEEPSPEED: "not installed"}
    by_name = {t["name"]: t for t in p["targets"]}
    assert by_name["fsmoe r=2 / lower bound"]["value"] == pytest.approx(1.1 / 0.9)
    assert by_name["fsmoe r=2 / lower bound"]["met"] is False
    assert p["job"]["bench"]["tokens"] == 256 and p["job"]["parallel"]["ep"] == 4  # the job, by section


# --- one quick run on 2 loopback ranks ----------------------------------------------------------------------
def test_quick_run_on_two_loopback_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, trace = tmp_path / "out", tmp_path / "trace.json"
    job = _quick(**{"cluster.launcher": "local", "parallel.nproc": 2, "parallel.procs_per_node": 2,
                    "parallel.ep": 2, "bench.degrees": (1, 2), "bench.mixed_degrees": ((1, 2),), "run.out": str(out),
                    "run.trace": str(trace), "bench.timeout_s": 120.0, "plan.profile_cache": str(tmp_path / "cache"),
                    "plan.profile_budget_s": 2.0})
    payload = run_layer_bench(job)
    printed = capsys.readouterr().out
    assert "| implementation | median s | predicted s | error |" in printed and "Lower bound" in printed
    assert "fsmoe auto, the model's plan: r_fwd=" in printed and "Model: median |error|" in printed
    assert "Measured check (" in printed
    data = json.loads((out / "layer.json").read_text())
    assert data == json.loads(json.dumps(payload))  # what was returned is what was written
    assert load_toml(out / "job.toml") == job  # the resolved job, round-tripped
    assert data["benchmark"] == "layer" and data["cluster"]["shaped"] is False
    assert data["job"]["parallel"]["ep"] == 2 and data["capacity"] >= 1

    rows = {r["name"]: r for r in data["implementations"]}
    # the auto row: the planner's degrees on the profiled costs, run like the fsmoe rows
    auto = data["auto"]
    costs = Costs.from_dict(data["costs"])
    idle = costs.op("gar")(auto["gar_bytes"])
    want = plan_layer("fsmoe", layer_work(job, tokens=job.bench.tokens), costs, t_gar=auto["t_gar_s"],
                      t_gar_after=idle, t_gar_idle=idle, max_degree=job.plan.max_degree, min_gain=job.plan.min_gain)
    plan = auto["plan"]
    assert (plan["r_fwd"], plan["r_bwd"], plan["gar_after_s"] > 0) == (want.r_fwd, want.r_bwd, want.gar_after_s > 0)
    # the measured check: the model's first pairs, timed; the row runs the fastest median
    options = layer_options("fsmoe", layer_work(job, tokens=job.bench.tokens), costs, t_gar=auto["t_gar_s"],
                            t_gar_after=idle, t_gar_idle=idle, max_degree=job.plan.max_degree)
    chosen = LayerOption(r_fwd=want.r_fwd, r_bwd=want.r_bwd, gar_after=want.gar_after_s > 0, predicted_s=want.total_s)
    timed = auto["tune"]["candidates"]
    assert [(c["r_fwd"], c["r_bwd"], c["gar_after"]) for c in timed] == [
        (o.r_fwd, o.r_bwd, o.gar_after) for o in tune_candidates(chosen, options, job.plan.tune)]
    assert len(timed) >= 2 and auto["tune"]["rounds"] == job.plan.tune_rounds
    assert auto["tune"]["model"] == timed[0]["name"] == ImplSpec("fsmoe", want.r_fwd, want.r_bwd,
                                                                  gar_after=want.gar_after_s > 0).name
    fastest = min(timed, key=lambda c: c["median_s"])
    assert auto["tune"]["picked"] == fastest["name"]
    assert (auto["r_fwd"], auto["r_bwd"], auto["gar_after"]) == (fastest["r_fwd"], fastest["r_bwd"],
                                                                 fastest["gar_after"])
    assert auto["name"] in rows and rows[auto["name"]]["auto"] is True and auto["name"].startswith("fsmoe auto r=")
    where = "after the backward" if auto["gar_after"] else "inside the MoE backward"
    assert rows[auto["name"]]["note"] == f"GAR {where}"
    assert data["profile"]["cache_hit"] is False and data["profile"]["budget_s"] == 2.0
    assert Path(data["profile"]["cache_path"]).parent == tmp_path / "cache"
    ours = [r for r in rows.values() if r["family"] != DEEPSPEED]
    for r in ours:  # every row of ours has its prediction beside its median
        assert r["predicted_s"] > 0 and r["predicted_error"] == pytest.approx(r["predicted_s"] / r["median_s"] - 1)
    assert data["model"]["rows"] == len(ours) and data["model"]["median_abs_error"] >= 0
    requested = [i.name for i in layer_impls(job)] + [auto["name"]]
    if auto["tune"]["picked"] != auto["tune"]["model"]:  # the model's choice is timed beside the auto row
        requested.append(auto["tune"]["model"])
    for name in requested:  # every implementation has a time, or (DeepSpeed only) a reason it did not run
        if name == DEEPSPEED and name in data["skipped"]:
            assert data["skipped"][name]
            continue
        r = rows[name]
        assert len(r["samples_s"]) == job.bench.reps and all(s > 0 for s in r["samples_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["samples_s"]))
        assert r["extra_mem_mb"] is not None and len(r["peak_mem_mb_per_rank"]) == 2
    assert set(rows) <= set(requested)

    best = min((r for r in rows.values() if r["family"] == "fsmoe"), key=lambda r: r["median_s"])
    assert data["best_fsmoe"] == best["name"]
    lb = data["lower_bound"]
    channels = {c: sum(p["count"] * p["median_s"] for p in lb["probes"] if p["channel"] == c)
                for c in ("compute", "intra", "inter")}
    assert {p["name"]: p["count"] for p in lb["probes"]}["EP AlltoAll"] == 4
    assert lb["channels_s"] == pytest.approx(channels)
    assert lb["seconds"] == pytest.approx(max(channels.values()))
    for p in lb["probes"]:
        assert p["median_s"] == pytest.approx(statistics.median(p["samples_s"]))
    for r in rows.values():
        assert r["ratio_to_best_fsmoe"] == pytest.approx(r["median_s"] / best["median_s"])
        assert r["ratio_to_lower_bound"] == pytest.approx(r["median_s"] / lb["seconds"])
        if r["mem_ratio_to_sequential"] is not None:
            assert r["mem_ratio_to_sequential"] == pytest.approx(r["extra_mem_mb"] / rows["sequential"]["extra_mem_mb"])
    assert all(not math.isnan(t["value"]) for t in data["targets"] if t["value"] is not None)

    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}
    assert {"forward", "backward"} <= {e["name"] for e in events}
    assert any(e["name"].startswith("expert[") for e in events)  # the pipeline's own tasks
    predicted = [e for e in events if e["tid"].startswith("predicted:")]  # the model's, beside them
    assert {"predicted:layer", "predicted:compute", "predicted:inter"} <= {e["tid"] for e in predicted}
    assert {e["pid"] for e in predicted} == {0, 1}
    assert data["trace_files"] == [str(trace)]
    assert (out / "layer.png").exists() == HAS_MATPLOTLIB


def test_deepspeed_missing_or_unable_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmoe.bench.deepspeed_peer import build_deepspeed_step

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.moe.layer", None)
    work = SimpleNamespace(job=layer_bench_recipe())
    assert "DeepSpeed is not installed" in build_deepspeed_step(work, 1)  # type: ignore[arg-type]
    work = SimpleNamespace(job=_job(**{"moe.gate": "expert_choice"}))
    assert "only top-k softmax gating" in build_deepspeed_step(work, 1)  # type: ignore[arg-type]
    work = SimpleNamespace(job=_job(**{"moe.capacity_factor": None}))
    assert "fixed capacity factor" in build_deepspeed_step(work, 1)  # type: ignore[arg-type]
