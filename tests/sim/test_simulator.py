"""Whole-model simulation and the Table 4 grid: composition by hand, determinism, a slice of the grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fsmoe.config import SCHEDULES
from fsmoe.perf.model import LayerWork, play_pass
from fsmoe.sim.engine import LayerBatch, dense_times, gar_time
from fsmoe.sim.grid import (
    PAPER_TABLE5,
    GridReport,
    grid_batch,
    grid_configs,
    run_grid,
    run_testbed,
)
from fsmoe.sim.presets import model_preset, paper_layout
from fsmoe.sim.presets import testbed_a as tb_a
from fsmoe.sim.presets import testbed_b as tb_b
from fsmoe.sim.simulator import degree_runs, simulate

REL = 1e-9


def test_every_schedule_on_a_paper_model() -> None:
    a = tb_a()
    sim = simulate(paper_layout(a, model_preset("mixtral-8x7b", a)))
    assert [r.schedule for r in sim.runs] == list(SCHEDULES)
    assert sim.run("tutel").speedup_vs_tutel == 1.0
    for r in sim.runs:
        assert r.iteration_s == pytest.approx(r.fwd_s + r.bwd_s, rel=REL)
        assert len(r.degrees) == 7 and r.breakdown_s["gar_exposed"] <= r.breakdown_s["gar"] + 1e-12
    assert set(sim.run("sequential").degrees) == {(1, 1)}
    assert all(f == b for f, b in sim.run("tutel").degrees)
    assert sim.run("fsmoe").iteration_s <= sim.run("fsmoe_no_iio").iteration_s <= sim.run("tutel").iteration_s
    assert "mixtral-8x7b on testbed-a" in sim.table()
    with pytest.raises(ValueError, match="schedule"):
        simulate(paper_layout(a, model_preset("mixtral-8x7b", a)), ["fastest"])


def test_sequential_iteration_by_hand() -> None:
    """sequential: every block at r = 1 — dense forward + gate + the played block forward, the played block
    backward + dense backward — and every block's gradient all-reduced after the backward, exposed."""
    b = tb_b()
    model = dataclasses.replace(model_preset("gpt2-xl-moe", b), n_layers=3)
    lay = paper_layout(b, model)
    one = LayerBatch.of_layout(lay)
    work = LayerWork(tokens=lay.tokens, d_model=model.d_model, d_hidden=model.d_hidden, num_experts=lay.experts,
                     ep=lay.ep, esp=lay.esp, gemms=2, gate_width=lay.experts, capacity_gate=int(one.capacity_gate[0]))
    costs = b.costs_for(2)
    fwd = play_pass(SCHEDULES["sequential"], work, costs, 1, backward=False).makespan_s
    bwd = play_pass(SCHEDULES["sequential"], work, costs, 1, backward=True).makespan_s
    d = dense_times(one, b.costs)
    gar = float(gar_time(b.costs.op("gar"), one.grad_bytes)[0])
    expected = 3 * (fwd + bwd + float(d.fwd_s[0] + d.bwd_s[0]) + gar)
    assert simulate(lay, ["sequential"]).run("sequential").iteration_s == pytest.approx(expected, rel=REL)
    assert one.capacity_gate[0] == 20  # ceil(k·f·T/E) = ceil(2 · 1.2 · 64 / 8) = ceil(19.2)
    assert work.n_a2a == 8 * 20 * 1600 * 4


def test_simulation_is_deterministic() -> None:
    a = tb_a()
    lay = paper_layout(a, model_preset("gpt2-xl-moe", a))
    assert simulate(lay) == simulate(lay)


# --- the grid -----------------------------------------------------------------------------------------------------
def test_the_grid_has_1458_configs_per_testbed() -> None:
    a, b = grid_configs(tb_a()), grid_configs(tb_b())
    assert len(a) == len(b) == 1458 == len(set(a))
    assert {c.seq_len for c in a} == {512, 1024, 2048} and {c.seq_len for c in b} == {256, 512, 1024}
    batch = grid_batch(tb_b(), b[:3])
    assert batch.tokens.tolist() == [256 // 4, 256 // 4, 256 // 4] and batch.esp == batch.mp == 4 and batch.ep == 8
    assert batch.gemms.tolist() == [2, 3, 2]


def test_a_grid_config_that_does_not_split_is_refused() -> None:
    bad = dataclasses.replace(grid_configs(tb_a())[0], heads=12)
    with pytest.raises(ValueError, match="does not split over MP = ESP = 8"):
        grid_batch(tb_a(), (bad,))


@pytest.mark.parametrize("cluster", [tb_a(), tb_b()], ids=["A", "B"])
def test_a_grid_slice_is_deterministic_and_row_independent(cluster) -> None:
    configs = grid_configs(cluster)
    picks = configs[::97]
    one, two = run_testbed(cluster, picks), run_testbed(cluster, picks)
    small = run_testbed(cluster, picks[:5])
    for name in SCHEDULES:
        assert np.array_equal(one.results[name].total_s, two.results[name].total_s)
        assert np.array_equal(one.results[name].pair, two.results[name].pair)
        assert np.allclose(small.results[name].total_s, one.results[name].total_s[:5], rtol=REL, atol=0)
    assert np.all(one.speedups("tutel") == 1.0)
    assert np.all(one.results["fsmoe"].total_s <= one.results["fsmoe_no_iio"].total_s * (1 + 1e-12))
    assert np.all(one.results["tutel_improved"].total_s <= one.results["tutel"].total_s * (1 + 1e-12))
    assert 0 <= one.different_r <= len(picks)


def test_table5_report_puts_the_paper_beside_ours() -> None:
    tb = run_testbed(tb_b(), grid_configs(tb_b())[::200])
    report = GridReport(testbeds=(tb,), wall_s=0.5)
    rows = report.table5()
    assert [(r[0], r[1], r[2]) for r in rows] == [("testbed-b", s, p) for s, p in PAPER_TABLE5["testbed-b"].items()]
    assert all(r[4] == pytest.approx(r[3] - r[2]) for r in rows)
    assert "912 of 1458" in report.text() and "0.50 s" in report.text()


def test_the_full_grid_on_both_testbeds_is_deterministic() -> None:
    """All 1,458 configs x 6 schedules on A and B, twice: equal times and pairs."""
    one, two = run_grid(), run_grid()
    for a, b in zip(one.testbeds, two.testbeds, strict=True):
        assert len(a.configs) == 1458
        for name in SCHEDULES:
            assert np.array_equal(a.results[name].total_s, b.results[name].total_s)
            assert np.array_equal(a.results[name].pair, b.results[name].pair)
    assert one.table5() == two.table5()


def test_degree_runs_merge_equal_blocks() -> None:
    assert degree_runs([(4, 1)] * 6 + [(4, 4)]) == "blocks 0-5: 4/1, block 6: 4/4"
    assert degree_runs([(1, 1)]) == "block 0: 1/1"
    assert degree_runs([(2, 2), (1, 1), (2, 2)]) == "block 0: 2/2, block 1: 1/1, block 2: 2/2"
