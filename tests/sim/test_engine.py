"""The simulator's engine: hand-computed timelines, the closed forms in each pure regime, agreement with the
planner's evaluator (the same task lists, played one layer at a time), and the GAR placement rules."""

from __future__ import annotations

import numpy as np
import pytest

from fsmoe.config import SCHEDULES, get_schedule
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import LayerWork, PassModel, closed_form, padded_for, play_pass, rate_duration
from fsmoe.perf.planner import plan_layer
from fsmoe.sim.engine import (
    DenseTimes,
    LayerBatch,
    LayerTables,
    capacity,
    gar_time,
    layer_tables,
    play_batch,
    rate,
    schedule_layer,
)
from tests.perf.cases import REL, WORK

FSMOE, NO_IIO, TUTEL = get_schedule("fsmoe"), get_schedule("fsmoe_no_iio"), get_schedule("tutel")


def batch_of(work: LayerWork, rows: int = 1, grad_bytes: float = 0.0) -> LayerBatch:
    def col(v: float) -> np.ndarray:
        return np.full(rows, v)

    return LayerBatch(tokens=col(work.tokens), seq_tokens=col(work.tokens * 2), seq_len=col(work.tokens),
                      d_model=col(work.d_model), d_hidden=col(work.d_hidden), experts=col(work.num_experts),
                      gemms=col(work.gemms), capacity_gate=col(work.capacity_gate), grad_bytes=col(grad_bytes),
                      kv_ratio=col(1.0), ep=work.ep, esp=work.esp, mp=work.esp)


def costs_for(*, a2a: float, ag: float, exp_fwd: float, exp_bwd: float | None = None, alpha: float = 0.0) -> Costs:
    """β such that the whole (unchunked) pass of each task of WORK takes the given seconds; RS = AG."""
    def line(total: float, n: float) -> Linear:
        return Linear(alpha_s=alpha, beta_s=total / n)

    exp_bwd = 2 * exp_fwd if exp_bwd is None else exp_bwd
    zero = Linear(alpha_s=0.0, beta_s=0.0)
    return Costs(ops={"a2a": line(a2a, WORK.n_a2a), "ag": line(ag, WORK.n_ag), "rs": line(ag, WORK.n_rs),
                      "gar": zero, "expert_fwd": line(exp_fwd, WORK.n_exp), "expert_bwd": line(exp_bwd, WORK.n_exp),
                      "gate_fwd": zero, "gate_bwd": zero, "dense_fwd": zero, "dense_bwd": zero})


def one_pair(spec, costs: Costs, r: int) -> LayerTables:
    return layer_tables(spec, batch_of(WORK), costs, pairs=[(r, r)])


# --- golden timelines ------------------------------------------------------------------------------------------
def test_fsmoe_forward_r2_by_hand() -> None:
    """Per chunk a2a 2, ag 1, rs 1, expert 2. inter: dispatch0 [0,2] dispatch1 [2,4]; intra: gather0 [2,3]
    gather1 [4,5]; compute: expert0 [3,5] expert1 [5,7]; reduce0 [5,6] reduce1 [7,8]; combine0 [6,8]
    combine1 [8,10]: 10 = Case 3, 2r·a + g + s."""
    t = one_pair(FSMOE, costs_for(a2a=4, ag=2, exp_fwd=4), 2)
    assert t.F[0, 0] == pytest.approx(10.0, rel=REL)


def test_no_iio_forward_r2_by_hand() -> None:
    """One FIFO lane: dispatch0 [0,2] gather0 [2,3] dispatch1 [3,5] gather1 [5,6] reduce0 [6,7] combine0
    [7,9] reduce1 [9,10] combine1 [10,12]; experts [3,5], [6,8]: 12."""
    t = one_pair(NO_IIO, costs_for(a2a=4, ag=2, exp_fwd=4), 2)
    assert t.F[0, 0] == pytest.approx(12.0, rel=REL)


def test_fsmoe_backward_r2_with_its_gar_slice_by_hand() -> None:
    """combine_bwd [0,2] [2,4]; reduce_bwd [2,3] [4,5]; experts [3,5] [5,7]; gather_bwd [5,6] [7,8];
    dispatch_bwd [6,8] [8,10]: A = 10. With a GAR slice G after the last combine_bwd: [4, 4+G], then
    dispatch_bwd [4+G, 6+G] [6+G, 8+G]: B = 8, so 3 s of GAR give max(10, 11) = 11."""
    t = one_pair(FSMOE, costs_for(a2a=4, ag=2, exp_fwd=2, exp_bwd=4), 2)
    assert (t.A[0, 0], t.B[0, 0]) == (pytest.approx(10.0), pytest.approx(8.0))
    assert max(t.A[0, 0], t.B[0, 0] + 3.0) == pytest.approx(11.0)


def test_play_batch_plays_each_row_alone() -> None:
    from fsmoe.perf.model import pass_tasks
    from fsmoe.schedule.schedules import lanes_for

    op_s = {"a2a": np.array([2.0, 1.0]), "ag": np.array([1.0, 0.5]), "rs": np.array([1.0, 0.5]),
            "expert_fwd": np.array([2.0, 8.0])}
    span = play_batch(pass_tasks(FSMOE, 2, backward=False), lanes_for(FSMOE), op_s)
    assert span.tolist() == pytest.approx([10.0, 1 + 0.5 + 16 + 0.5 + 1])  # row 2: compute bound, Case 2


# --- the closed forms in each pure regime (as tests/perf/test_model.py) ----------------------------------------
PURE = [  # (schedule, totals of one unchunked pass, backward?, r, hand-computed makespan)
    (FSMOE, dict(a2a=8, ag=1, exp_fwd=1), False, 4, 2 * 4 * 2 + 0.25 + 0.25),  # Case 3
    (FSMOE, dict(a2a=1, ag=0.5, exp_fwd=8), False, 4, 0.5 + 0.25 + 8),  # Case 2
    (FSMOE, dict(a2a=1, ag=4, exp_fwd=1), False, 4, 0.5 + 4 + 4),  # Case 4
    (FSMOE, dict(a2a=1, ag=2, exp_fwd=8), False, 4, 0.5 + 1 + 8),  # Case 2 (¬Q1 Q3)
    (FSMOE, dict(a2a=1, ag=0.5, exp_fwd=4), True, 4, 0.5 + 0.25 + 8),  # Case 2 backward (expert_bwd = 2x)
    (NO_IIO, dict(a2a=8, ag=1, exp_fwd=1), False, 4, 4 * (2 * 2 + 0.25 + 0.25)),  # folded Case 3
    (TUTEL, dict(a2a=1, ag=0.5, exp_fwd=8), False, 4, 2 * (0.25 + 0.125) + 8),  # folded Case 2
]


@pytest.mark.parametrize(("spec", "totals", "backward", "r", "expected"), PURE)
def test_engine_equals_the_closed_form_in_each_pure_regime(spec, totals, backward, r, expected) -> None:
    costs = costs_for(**totals)
    t = one_pair(spec, costs, r)
    played = t.A[0, 0] if backward else t.F[0, 0]
    assert played == pytest.approx(expected, rel=REL)
    pm = PassModel.of(WORK, costs, backward=backward, one_channel=not spec.separate_channels)
    assert closed_form(pm, r)[1] == pytest.approx(expected, rel=REL)


# --- the same task lists as the planner's evaluator -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("totals", [dict(a2a=3, ag=1, exp_fwd=2, alpha=0.05), dict(a2a=1, ag=4, exp_fwd=1, alpha=0.1),
                                    dict(a2a=1, ag=0.5, exp_fwd=8, alpha=0.01)])
def test_engine_agrees_with_play_pass_at_every_pair(name: str, totals: dict) -> None:
    """Every pair's forward and backward (A, B) equal :func:`fsmoe.perf.model.play_pass` on the padded work
    (idle lines: these costs have no busy lines). WORK has 2 GEMMs; the engine scales expert α by it."""
    spec = get_schedule(name)
    costs = costs_for(**totals)
    per_gemm = Costs(ops={**costs.ops, **{op: Linear(alpha_s=costs.op(op).alpha_s / 2, beta_s=costs.op(op).beta_s)
                                          for op in ("expert_fwd", "expert_bwd")}})
    work = LayerWork(**{**WORK.__dict__, "capacity_gate": 27})  # padding changes n at every lcm
    tables = layer_tables(spec, batch_of(work), per_gemm)
    for k, (rf, rb) in enumerate(tables.pairs):
        w = padded_for(work, rf, rb)
        assert tables.F[k, 0] == pytest.approx(play_pass(spec, w, costs, rf, backward=False).makespan_s, rel=REL)
        assert tables.A[k, 0] == pytest.approx(play_pass(spec, w, costs, rb, backward=True).makespan_s, rel=REL)
        if spec.gar_in_moe:
            with_gar = play_pass(spec, w, costs, rb, backward=True, t_gar=0.7).makespan_s
            assert max(tables.A[k, 0], tables.B[k, 0] + 0.7) == pytest.approx(with_gar, rel=REL)
        else:
            assert tables.B[k, 0] == -np.inf


@pytest.mark.parametrize("name", ["tutel", "fsmoe_no_iio", "fsmoe"])
def test_without_gradient_the_pair_is_the_planners(name: str) -> None:
    spec = get_schedule(name)
    costs = costs_for(a2a=3, ag=1, exp_fwd=2, alpha=0.05)
    per_gemm = Costs(ops={**costs.ops, **{op: Linear(alpha_s=0.025, beta_s=costs.op(op).beta_s)
                                          for op in ("expert_fwd", "expert_bwd")}})
    b = batch_of(WORK)
    tables = layer_tables(spec, b, per_gemm)
    zero = np.zeros(1)
    dense = DenseTimes(attn_fwd=zero, attn_bwd=zero, mp_comm=zero, gate_fwd=zero, gate_bwd=zero)
    res = schedule_layer(spec, tables, dense, zero, per_gemm)
    plan = plan_layer(spec, WORK, costs)
    assert (int(res.r_fwd[0]), int(res.r_bwd[0])) == (plan.r_fwd, plan.r_bwd)
    assert res.total_s[0] == pytest.approx(plan.fwd_s + plan.bwd_s, rel=REL)


# --- where each schedule puts the Gradient-AllReduce --------------------------------------------------------------
GAR = Linear(alpha_s=0.5, beta_s=1.0)  # 1 s per byte: n bytes take 0.5 + n s
TABLES = LayerTables(pairs=((1, 1), (2, 2)), F=np.array([[5.0], [4.0]]), A=np.array([[10.0], [8.0]]),
                     B=np.array([[6.0], [7.0]]))


def _costs_with_gar() -> Costs:
    zero = Linear(alpha_s=0.0, beta_s=0.0)
    return Costs(ops={op: (GAR if op == "gar" else zero) for op in ("a2a", "ag", "rs", "gar", "expert_fwd",
                                                                     "expert_bwd", "gate_fwd", "gate_bwd",
                                                                     "dense_fwd", "dense_bwd")})


def _dense(window: float) -> DenseTimes:
    z = np.zeros(1)
    return DenseTimes(attn_fwd=z, attn_bwd=np.array([window]), mp_comm=z, gate_fwd=z, gate_bwd=z)


def test_gar_placement_by_hand() -> None:
    """6 bytes (6.5 s alone), dense window 1 s. tutel: best pair (2,2) 4 + 8, GAR exposed 6.5 -> 18.5;
    tutel_improved: 12 + 1 + 5.5 exposed = 18.5; fsmoe: the best split, e.g. 0.5 B in (2,2)'s window
    (0.5 + 0.5 = 1 s = A − B, free) and 5.5 B beside the dense backward (6 s, 1 hidden): 12 + 1 + 5 = 18;
    lina: all 6.5 s in the block: 4 + (7 + 6.5) + 1."""
    costs, n = _costs_with_gar(), np.array([6.0])
    tutel = schedule_layer(TUTEL, TABLES, _dense(1.0), n, costs)
    assert (tutel.total_s[0], tutel.gar_exposed_s[0], tutel.r_fwd[0]) == (pytest.approx(19.5), 6.5, 2)
    improved = schedule_layer(get_schedule("tutel_improved"), TABLES, _dense(1.0), n, costs)
    assert (improved.total_s[0], improved.gar_exposed_s[0]) == (pytest.approx(18.5), pytest.approx(5.5))
    fs = schedule_layer(FSMOE, TABLES, _dense(1.0), n, costs)
    assert fs.total_s[0] == pytest.approx(18.0)
    lina = schedule_layer(get_schedule("lina"), TABLES, _dense(1.0), n, costs)
    assert lina.gar_moe_s[0] == pytest.approx(6.5) and lina.total_s[0] == pytest.approx(4 + 7 + 6.5 + 1)


@pytest.mark.parametrize("seed", range(5))
def test_fsmoe_split_is_the_exact_minimum(seed: int) -> None:
    """The step time is piecewise linear in the bytes x given to the MoE slot; its convex breakpoints hold
    the minimum: nothing on a fine grid of x beats it."""
    rng = np.random.default_rng(seed)
    K = 4
    F, A = rng.uniform(1, 5, (K, 1)), rng.uniform(5, 10, (K, 1))
    tables = LayerTables(pairs=tuple((2**k, 2**k) for k in range(K)), F=F, A=A, B=A - rng.uniform(0, 4, (K, 1)))
    costs, n, window = _costs_with_gar(), np.array([rng.uniform(1, 8)]), rng.uniform(0, 3)
    fs = schedule_layer(FSMOE, tables, _dense(window), n, costs)
    xs = np.linspace(0, n[0], 4001)
    brute = min(float(np.min(F[:, 0] + np.maximum(A[:, 0], tables.B[:, 0] + gar_time(GAR, np.array([x])))))
                + window + max(float(gar_time(GAR, np.array([n[0] - x]))[0]) - window, 0.0) for x in xs)
    assert fs.total_s[0] <= brute + 1e-9
    assert fs.total_s[0] >= brute - 2 * n[0] / 4000


def test_capacity_is_exact_and_clamped() -> None:
    T, E = np.array([100, 64, 64, 3]), np.array([2, 4, 4, 8])
    assert capacity(T, E, 2, [1.1, 1.2, None, 2.4]).tolist() == [110 if 110 <= 100 else 100, 39, 32, 2]


# --- contention: busy lines played as the planner's evaluator plays them ----------------------------------------
def _with_busy(costs: Costs, factor: float) -> Costs:
    """``costs`` whose collectives are ``factor`` times slower beside compute (busy lines)."""
    return Costs(ops=costs.ops, busy={op: costs.op(op).scaled(factor) for op in ("a2a", "ag", "rs")})


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("totals", [dict(a2a=3, ag=1, exp_fwd=2, alpha=0.05),
                                    dict(a2a=1, ag=0.5, exp_fwd=8, alpha=0.01)])
def test_engine_with_busy_lines_equals_play_contended(name: str, totals: dict) -> None:
    """With busy lines the engine finds each collective's overlap by replaying (the contention model of
    :func:`fsmoe.perf.model.play_contended`): every pair's forward and backward equal play_pass, and the
    GAR slot's response equals the evaluator's at both ends."""
    spec = get_schedule(name)
    costs = _with_busy(costs_for(**totals), 1.8)
    per_gemm = Costs(ops={**costs.ops, **{op: Linear(alpha_s=costs.op(op).alpha_s / 2, beta_s=costs.op(op).beta_s)
                                          for op in ("expert_fwd", "expert_bwd")}}, busy=costs.busy)
    tables = layer_tables(spec, batch_of(WORK), per_gemm)
    idle = layer_tables(spec, batch_of(WORK), Costs(ops=per_gemm.ops))
    for k, (rf, rb) in enumerate(tables.pairs):
        w = padded_for(WORK, rf, rb)
        assert tables.F[k, 0] == pytest.approx(play_pass(spec, w, costs, rf, backward=False).makespan_s, rel=REL)
        assert tables.A[k, 0] == pytest.approx(play_pass(spec, w, costs, rb, backward=True).makespan_s, rel=REL)
        assert tables.F[k, 0] >= idle.F[k, 0] - 1e-12  # contention only slows
        if max(rf, rb) > 1 and spec.pipelined:
            assert tables.busy["a2a"][k, 0] >= idle.busy["a2a"][k, 0]
    if spec.pipelined:
        assert np.any(tables.busy["a2a"] > idle.busy["a2a"] * (1 + 1e-9)), "no AlltoAll overlapped compute"


def test_rate_on_arrays_equals_the_evaluators_rate_duration() -> None:
    """The GAR's rate model, batched: every case of :func:`fsmoe.perf.model.rate_duration` (end inside a
    compute task and staying there, passing its end, outside compute; no contention; zero length)."""
    cases = [(2.0, 8.0, 2.0, 1.0, 10.0), (2.0, 8.0, 2.0, 1.0, 1.0), (2.0, 8.0, 3.0, 1.0, 0.0),
             (2.0, 8.0, 8.0, 8.0, 50.0), (2.0, 2.0, 2.0, 2.0, 5.0), (1.0, 3.0, 0.0, 0.0, 0.0),
             (0.5, 1.5, 0.7, 0.2, 0.05)]
    got = rate(*(np.array(col) for col in zip(*cases, strict=True)))
    assert got.tolist() == pytest.approx([rate_duration(*c) for c in cases], rel=REL)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gar_slot_slice_is_the_planners_rate_model_duration(sigma: float) -> None:
    """The MoE slot's slice in the engine is GarResponse.slice_s of the pair: each pair's LEAD and OVERLAP
    equal the evaluator's lead_s and overlap_s, and lina (everything in the slot) runs its slice at that
    duration, between the idle and busy lines."""
    from fsmoe.perf.model import gar_response

    base = costs_for(a2a=1, ag=0.5, exp_fwd=8, alpha=0.01)
    gar = Linear(alpha_s=0.0, beta_s=1e-4)
    costs = Costs(ops={**base.ops, "gar": gar}, busy={"a2a": base.op("a2a").scaled(1.5), "gar": gar.scaled(3.0)},
                  beside={"gar": sigma} if sigma > 1 else {})
    per_gemm = Costs(ops={**costs.ops, **{op: Linear(alpha_s=costs.op(op).alpha_s / 2, beta_s=costs.op(op).beta_s)
                                          for op in ("expert_fwd", "expert_bwd")}},
                     busy=costs.busy, beside=costs.beside)  # the engine's expert line is per GEMM
    lina = get_schedule("lina")
    tables = layer_tables(lina, batch_of(WORK), per_gemm)
    for k, (rf, rb) in enumerate(tables.pairs):
        g = gar_response(lina, padded_for(WORK, rf, rb), costs, rb)
        assert (tables.LEAD[k, 0], tables.OVERLAP[k, 0]) == (pytest.approx(g.lead_s, rel=REL, abs=1e-12),
                                                              pytest.approx(g.overlap_s, rel=REL))
    n = np.array([100000.0])  # 10 s alone, 30 s beside compute all along: it outlasts the experts
    res = schedule_layer(lina, tables, _dense(0.0), n, per_gemm)
    k = int(res.pair[0])
    rf, rb = tables.pairs[k]
    want = gar_response(lina, padded_for(WORK, rf, rb), costs, rb).slice_s(10.0, 30.0)
    assert res.gar_moe_s[0] == pytest.approx(want, rel=REL) and 10.0 < want < 30.0


def test_contended_rows_are_played_alone() -> None:
    """Rows settle after different numbers of plays; each equals its own one-row play."""
    costs = _with_busy(costs_for(a2a=3, ag=1, exp_fwd=2, alpha=0.05), 2.0)
    two = LayerBatch(**{**batch_of(WORK, rows=2).__dict__, "d_hidden": np.array([16, 64])})
    both = layer_tables(FSMOE, two, costs)
    for row, h in enumerate((16, 64)):
        alone = layer_tables(FSMOE, LayerBatch(**{**batch_of(WORK).__dict__, "d_hidden": np.array([h])}), costs)
        assert np.allclose(both.F[:, row], alone.F[:, 0], rtol=REL, atol=0)
        assert np.allclose(both.A[:, row], alone.A[:, 0], rtol=REL, atol=0)


# --- compute slowed beside collectives (Costs.beside), as the planner's evaluator slows it -------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_engine_with_slowed_compute_equals_play_contended(name: str) -> None:
    """With σ per collective the engine slows compute beside communication as play_pass does (the GAR's σ
    only): every pair's forward and backward equal the evaluator's, and the GAR slot's lead and cover its
    GarResponse's."""
    from fsmoe.perf.model import gar_response

    spec = get_schedule(name)
    base = costs_for(a2a=1, ag=0.5, exp_fwd=8, alpha=0.01)
    gar = Linear(alpha_s=0.0, beta_s=1e-3)
    costs = Costs(ops={**base.ops, "gar": gar}, busy={"a2a": base.op("a2a").scaled(1.5)},
                  beside={"a2a": 1.6, "ag": 1.2, "rs": 1.2, "gar": 2.0})
    per_gemm = Costs(ops={**costs.ops, **{op: Linear(alpha_s=costs.op(op).alpha_s / 2, beta_s=costs.op(op).beta_s)
                                          for op in ("expert_fwd", "expert_bwd")}},
                     busy=costs.busy, beside=costs.beside)
    tables = layer_tables(spec, batch_of(WORK), per_gemm)
    unslowed = layer_tables(spec, batch_of(WORK), Costs(ops=per_gemm.ops, busy=per_gemm.busy))
    assert tables.W == 0.5
    for k, (rf, rb) in enumerate(tables.pairs):
        w = padded_for(WORK, rf, rb)
        assert tables.F[k, 0] == pytest.approx(play_pass(spec, w, costs, rf, backward=False).makespan_s, rel=REL)
        assert tables.A[k, 0] == pytest.approx(play_pass(spec, w, costs, rb, backward=True).makespan_s, rel=REL)
        assert tables.A[k, 0] >= unslowed.A[k, 0] - 1e-12
        if spec.gar_in_moe:
            g = gar_response(spec, w, costs, rb)
            assert (tables.B[k, 0], tables.LEAD[k, 0], tables.COVER[k, 0]) == (
                pytest.approx(g.b_s, rel=REL), pytest.approx(g.lead_s, rel=REL, abs=1e-12),
                pytest.approx(g.cover_s, rel=REL))
            assert tables.backward(np.array([3.0]))[k, 0] == pytest.approx(g(3.0), rel=REL)
    assert np.array_equal(tables.F, unslowed.F) and np.array_equal(tables.A, unslowed.A)  # no GAR in them
    if spec.gar_in_moe:
        assert np.all(tables.COVER > 0), "the GAR slot slows no compute"


def test_dense_gar_slows_the_dense_backward() -> None:
    """tutel_improved with 6 bytes (6.5 s alone) beside a 1 s dense backward and σ = 2: the dense backward
    runs 2 s, 1 s more (½ · min(6.5, 2)), and 6.5 − 2 = 4.5 s stay exposed: 12 + 1 + 1 + 4.5."""
    costs, n = _costs_with_gar(), np.array([6.0])
    slowed = Costs(ops=costs.ops, busy=costs.busy, beside={"gar": 2.0})
    improved = schedule_layer(get_schedule("tutel_improved"), TABLES, _dense(1.0), n, slowed)
    assert (improved.total_s[0], improved.gar_exposed_s[0]) == (pytest.approx(18.5), pytest.approx(4.5))
    plain = schedule_layer(get_schedule("tutel_improved"), TABLES, _dense(1.0), n, costs)
    assert plain.bwd_s[0] == improved.bwd_s[0]  # the link bounds both: the slowed compute hides under it
    short = schedule_layer(get_schedule("tutel_improved"), TABLES, _dense(4.0), np.array([1.0]), slowed)
    assert short.bwd_s[0] == pytest.approx(
        schedule_layer(get_schedule("tutel_improved"), TABLES, _dense(4.0), np.array([1.0]), costs).bwd_s[0] + 0.75)
