"""The layer benchmark's model side on fixed synthetic costs (no processes): the ``fsmoe auto`` row is
:func:`plan_layer`'s answer, every row of ours gets :func:`predict_layer`'s time (in the summary too), and
a traced row's predicted timeline sits on ``predicted:*`` tracks from the measured phases' starts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fsmoe.bench import DEEPSPEED, ImplSpec, layer_impls, quick_layer_job, summarize
from fsmoe.bench.harness import RoundTimes
from fsmoe.bench.layer_predict import (
    bench_work,
    gar_bytes,
    gar_time,
    plan_auto,
    predict_impl,
    predict_rows,
    predicted_trace,
    relative_error,
    with_auto,
)
from fsmoe.bench.layer_workload import LayerRankResult, ProbeInfo
from fsmoe.config import JobConfig, layer_bench_recipe
from fsmoe.perf.costs import ZERO, Costs, Linear
from fsmoe.perf.model import layer_work
from fsmoe.perf.planner import plan_layer, predict_layer
from fsmoe.schedule.runtime import TraceEvent


def synthetic_costs() -> Costs:
    """AlltoAll about as long as the expert compute at the quick sizes, slower under compute (busy): a
    layer where pipelining pays, with round numbers."""
    def line(alpha_us: float, beta: float) -> Linear:
        return Linear(alpha_s=alpha_us * 1e-6, beta_s=beta)

    ops = {"a2a": line(200, 8e-9), "ag": line(100, 2e-9), "rs": line(100, 2e-9), "gar": line(300, 8e-9),
           "expert_fwd": line(100, 6e-11), "expert_bwd": line(200, 1.2e-10), "gate_fwd": line(100, 1e-9),
           "gate_bwd": line(150, 2e-9), "dense_fwd": ZERO, "dense_bwd": ZERO}
    busy = {"a2a": line(300, 1.2e-8), "ag": line(150, 3e-9), "rs": line(150, 3e-9), "gar": line(400, 1.2e-8)}
    return Costs(ops=ops, busy=busy, meta={"cache": {"hit": True, "path": "synthetic"}, "wall_s": 1.5,
                                           "budget_s": 5.0})


def _job(**overrides: Any) -> JobConfig:
    return quick_layer_job(layer_bench_recipe()).with_overrides({"bench.deepspeed": True, **overrides})


@pytest.mark.parametrize("layout", [{"parallel.ep": 4}, {"parallel.ep": 2, "parallel.esp": 2}])
def test_auto_row_is_plan_layers_answer(layout: dict[str, int]) -> None:
    job, costs = _job(**layout), synthetic_costs()
    auto = plan_auto(job, costs)
    t_gar = costs.op("gar", busy=True)(gar_bytes(job))
    idle = costs.op("gar")(gar_bytes(job))  # the slice's time alone: its rate-model duration per pair
    want = plan_layer("fsmoe", layer_work(job, tokens=job.bench.tokens), costs, t_gar=t_gar, t_gar_after=idle,
                      t_gar_idle=idle, max_degree=job.plan.max_degree)
    assert (auto.impl.r_fwd, auto.impl.r_bwd) == (want.r_fwd, want.r_bwd)
    assert auto.plan == want and auto.t_gar_s == t_gar == gar_time(job, costs)
    assert gar_bytes(job) == int(0.25 * 2**20)  # the quick preset's dense_grad_mb, fp32
    assert auto.impl.auto and auto.impl.family == "fsmoe" and auto.impl.gar_in_moe
    r = f"{want.r_fwd}" if want.r_fwd == want.r_bwd else f"{want.r_fwd}/{want.r_bwd}"
    assert auto.impl.name == f"fsmoe auto r={r}"
    assert auto.solve_s > 0 and auto.to_dict()["plan"]["r_fwd"] == want.r_fwd
    # the degrees follow max_degree
    capped = plan_auto(job.with_overrides({"plan.max_degree": 1}), costs)
    assert (capped.impl.r_fwd, capped.impl.r_bwd) == (1, 1)


def test_auto_row_moves_the_gar_after_the_backward_when_overlap_does_not_pay() -> None:
    """The synthetic GAR inside the backward (1.5× busy) pays; one 20× slower beside the experts, or one
    that slows the experts to a crawl (σ = 10), does not: the row runs it after the backward instead."""
    job, costs = _job(), synthetic_costs()
    assert not plan_auto(job, costs).impl.gar_after
    gar = costs.ops["gar"]
    for bad in (dataclasses.replace(costs, busy={**costs.busy, "gar": gar.scaled(20)}),
                dataclasses.replace(costs, beside={"gar": 10.0})):
        auto = plan_auto(job, bad)
        assert auto.impl.gar_after and not auto.impl.gar_in_moe and auto.impl.name.endswith(" GAR after")
        assert auto.plan.gar_s == 0 and auto.plan.gar_after_s == gar(gar_bytes(job)) > 0
        assert auto.to_dict()["gar_after"]
        pred = predict_impl(job, bad, auto.impl)
        assert pred is not None and pred.gar_after_s == auto.plan.gar_after_s
        inside = predict_impl(job, bad, ImplSpec("fsmoe", auto.impl.r_fwd, auto.impl.r_bwd))
        assert inside is not None and inside.gar_after_s == 0 and pred.total_s < inside.total_s
    with pytest.raises(ValueError, match="GAR slot"):
        ImplSpec("tutel", 2, 2, gar_after=True)


def test_synthetic_costs_make_pipelining_pay() -> None:
    """Guards the test above from comparing two trivial r = 1 answers."""
    impl = plan_auto(_job(), synthetic_costs()).impl
    assert (impl.r_fwd, impl.r_bwd) != (1, 1)


def test_auto_row_goes_after_ours_and_before_deepspeed() -> None:
    job = _job()
    impls = layer_impls(job)
    auto = ImplSpec("fsmoe", 2, 4, auto=True)
    rows = with_auto(impls, auto)
    assert rows[-1].family == DEEPSPEED and rows[-2] == auto and rows[:-2] == impls[:-1]
    assert with_auto(impls, None) == impls
    model = ImplSpec("fsmoe", 1, 1, gar_after=True)  # the model's choice, when the measured check picked another
    assert with_auto(impls, auto, model) == [*impls[:-1], model, auto, impls[-1]]
    assert with_auto(impls, auto, impls[0]) == rows  # a row the table has already is not added twice
    assert ImplSpec("fsmoe", 2, 2, auto=True).name == "fsmoe auto r=2"
    with pytest.raises(ValueError, match="planned degrees"):
        ImplSpec("sequential", auto=True)


def test_every_row_of_ours_is_predicted() -> None:
    job, costs = _job(), synthetic_costs()
    impls = with_auto(layer_impls(job), plan_auto(job, costs).impl)
    preds = predict_rows(job, costs, impls)
    assert set(preds) == {i.name for i in impls if i.family != DEEPSPEED}
    assert predict_impl(job, costs, ImplSpec(DEEPSPEED)) is None
    work = layer_work(job, tokens=job.bench.tokens)
    for impl in impls:
        if impl.family == DEEPSPEED:
            continue
        want = predict_layer(impl.family, work, costs, impl.r_fwd, impl.r_bwd, gar_bytes=gar_bytes(job))
        assert preds[impl.name] == want
        # GAR inside the MoE backward for fsmoe's schedules, after the backward for the others
        assert (preds[impl.name].gar_after_s == 0) == impl.gar_in_moe
    assert relative_error(1.1, 1.0) == pytest.approx(0.1) and relative_error(None, 1.0) is None
    assert relative_error(1.0, 0.0) is None


def test_summary_puts_predictions_beside_the_medians() -> None:
    job, costs = _job(**{"bench.schedules": ("sequential", "fsmoe"), "bench.mixed_degrees": ()}), synthetic_costs()
    auto = plan_auto(job, costs)
    specs = [ImplSpec("sequential"), ImplSpec("fsmoe", 1, 1), ImplSpec("fsmoe", 2, 2), auto.impl]
    samples = {s.name: [0.010, 0.012, 0.011] for s in specs}
    samples["experts fwd+bwd"] = [0.004, 0.004, 0.004]
    results = [LayerRankResult(rank=r, names=[s.name for s in specs], specs=specs,
                               times=RoundTimes(samples_s=samples), capacity=bench_work(job).capacity,
                               probes=[ProbeInfo(name="experts fwd+bwd", channel="compute")],
                               costs=costs.to_dict(), auto=auto.to_dict()) for r in range(2)]
    p = summarize(job, results, cluster={"description": "test", "shaped": True})
    rows = {r["name"]: r for r in p["implementations"]}
    preds = predict_rows(job, costs, specs)
    for s in specs:
        r = rows[s.name]
        assert r["predicted_s"] == pytest.approx(preds[s.name].total_s)
        assert r["predicted_fwd_s"] + r["predicted_bwd_s"] + r["predicted_gar_after_s"] == pytest.approx(
            r["predicted_s"])
        assert r["predicted_error"] == pytest.approx(r["predicted_s"] / 0.011 - 1)
    assert rows[auto.impl.name]["auto"] is True and rows["fsmoe r=1"]["auto"] is False
    errors = sorted(abs(rows[s.name]["predicted_error"]) for s in specs)
    assert p["model"]["median_abs_error"] == pytest.approx((errors[1] + errors[2]) / 2)
    assert p["model"]["rows"] == 4
    assert p["profile"]["cache_hit"] is True and p["profile"]["wall_s"] == 1.5
    assert p["auto"]["r_fwd"] == auto.impl.r_fwd and Costs.from_dict(p["costs"]) == costs


@pytest.mark.parametrize("impl", [ImplSpec("fsmoe", 2, 4), ImplSpec("tutel", 2, 2), ImplSpec("sequential")])
def test_trace_gets_the_models_timeline_beside_the_measured_phases(impl: ImplSpec) -> None:
    job, costs = _job(), synthetic_costs()
    measured = [TraceEvent(name="forward", channel="layer", start_s=100.0, end_s=100.02, rank=1),
                TraceEvent(name="backward", channel="layer", start_s=100.02, end_s=100.06, rank=1),
                TraceEvent(name="expert[0]", channel="compute", start_s=100.01, end_s=100.012, rank=1)]
    if not impl.gar_in_moe:
        measured.append(TraceEvent(name="after backward (GAR)", channel="layer", start_s=100.06, end_s=100.07, rank=1))
    events = predicted_trace(job, costs, impl, measured, rank=1)
    pred = predict_impl(job, costs, impl)
    assert pred is not None
    assert all(e.channel.startswith("predicted:") and e.rank == 1 for e in events)
    layer = {e.name: e for e in events if e.channel == "predicted:layer"}
    assert layer["forward"].start_s == 100.0 and layer["forward"].end_s - layer["forward"].start_s == pytest.approx(
        pred.fwd_s)
    assert layer["backward"].start_s == 100.02
    assert layer["backward"].end_s - layer["backward"].start_s == pytest.approx(pred.bwd_s)
    assert ("after backward (GAR)" in layer) == (not impl.gar_in_moe)
    tasks = [e for e in events if e.channel != "predicted:layer" and "gate" not in e.name]
    gate_f = costs.op("gate_fwd")(bench_work(job).n_gate)
    assert min(e.start_s for e in tasks) == pytest.approx(100.0 + gate_f)  # the block follows gate + order
    assert min(e.start_s for e in tasks if "bwd" in e.name) >= 100.02  # the backward block from its phase
    assert any(e.name.startswith("expert[") for e in tasks) and any(e.name.startswith("expert_bwd[") for e in tasks)
    assert {e.channel for e in tasks} <= {"predicted:compute", "predicted:inter", "predicted:intra"}
    assert predicted_trace(job, costs, ImplSpec(DEEPSPEED), measured, rank=1) == []
    assert predicted_trace(job, costs, impl, measured[2:], rank=1) == []  # no phases: nothing to anchor on
