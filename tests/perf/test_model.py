"""The performance models: workloads against the block's real shapes, the paper's formulas against hand
computations, and the evaluator against the closed forms in each case's pure regime (paper §4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fsmoe.config import JobConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig, get_schedule
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.layer import MoELayer
from fsmoe.parallel.parallelize import apply_pipeline
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import (
    MAX_SLOW_WEIGHT,
    ChunkTimes,
    CommCover,
    PassModel,
    case_of,
    case_time,
    closed_form,
    contended_duration,
    gar_response,
    layer_work,
    model_slows,
    overlap_fractions,
    pass_durations,
    pass_slows,
    pass_tasks,
    play,
    play_contended,
    play_pass,
    predicates,
    rate_duration,
    slowed_duration,
    tokens_per_rank,
    window,
)
from fsmoe.schedule.ir import Task
from fsmoe.schedule.runtime import Runtime
from fsmoe.schedule.schedules import backward_tasks, lanes_for
from tests.perf.cases import REL, WORK

FSMOE, NO_IIO, SEQ = get_schedule("fsmoe"), get_schedule("fsmoe_no_iio"), get_schedule("sequential")



def L(alpha: float, beta: float) -> Linear:
    return Linear(alpha_s=alpha, beta_s=beta)


def costs_for(*, a2a: float, ag: float, exp_fwd: float, exp_bwd: float | None = None, busy_a2a: float | None = None,
              gar: Linear | None = None) -> Costs:
    """β chosen so that the whole (unchunked) pass of each task takes the given seconds for WORK (α = 0:
    a chunk of r takes total/r). RS costs what AG costs (the paper's AG ≈ RS)."""
    zero = L(0.0, 0.0)
    ops = {"a2a": L(0.0, a2a / WORK.n_a2a), "ag": L(0.0, ag / WORK.n_ag), "rs": L(0.0, ag / WORK.n_rs),
           "gar": gar or zero, "expert_fwd": L(0.0, exp_fwd / WORK.n_exp),
           "expert_bwd": L(0.0, (exp_bwd if exp_bwd is not None else 2 * exp_fwd) / WORK.n_exp),
           "gate_fwd": zero, "gate_bwd": zero, "dense_fwd": zero, "dense_bwd": zero}
    busy = {} if busy_a2a is None else {"a2a": L(0.0, busy_a2a / WORK.n_a2a)}
    return Costs(ops=ops, busy=busy)


# --- workloads -------------------------------------------------------------------------------------------------
def test_layer_work_hand_computed() -> None:
    assert (WORK.n_a2a, WORK.n_ag, WORK.n_rs, WORK.n_exp, WORK.n_gate) == (4096, 8192, 8192, 32768, 64 * 8 * 4)
    w = WORK.padded(3)  # C = 32 -> 33
    assert w.capacity == 33 and w.n_a2a == 4 * 33 * 8 * 4 and w.n_exp == 2 * 4 * 33 * 8 * 16
    one = dataclasses.replace(WORK, ep=1, esp=1)  # size-1 groups: no collectives at all
    assert (one.n_a2a, one.n_ag, one.n_rs) == (0, 0, 0) and one.n_exp == WORK.n_exp
    with pytest.raises(ValueError, match="E=4 is not divisible by EP=3"):
        dataclasses.replace(WORK, ep=3)


def test_layer_work_from_a_job() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, d_hidden=16, capacity_factor=1.25, expert="swiglu")
    job = JobConfig(model=ModelConfig(seq_len=32, d_model=8, n_heads=2, moe=moe),
                    parallel=ParallelConfig(nproc=4, ep=2, esp=2, mp=2), train=TrainConfig(batch_size=8))
    assert tokens_per_rank(job) == 8 // 2 * (32 // 2)  # B / dense_dp · L / mp = 64
    w = layer_work(job)
    assert (w.tokens, w.capacity_gate, w.gemms) == (64, 40, 3)  # C = ceil(2·1.25·64/4) = 40
    assert w.n_exp == 3 * 4 * 40 * 8 * 16 and w.n_ag == 2 * 4 * 40 * 8 * 4
    assert layer_work(job, tokens=100).capacity_gate == 63  # ceil(62.5)
    no_drop = dataclasses.replace(moe, capacity_factor=None)
    free = layer_work(job.replace(model=dataclasses.replace(job.model, moe=no_drop)))
    assert free.capacity_estimated and free.capacity_gate == 32  # balanced: ceil(2·64/4)


class _Recording(Dispatcher):
    """The local dispatcher, recording what each step would move."""

    def __init__(self) -> None:
        self.exchanged: list[int] = []

    def exchange(self, buf_WX: torch.Tensor) -> torch.Tensor:
        self.exchanged.append(buf_WX.numel() * buf_WX.element_size())
        return buf_WX


def test_layer_work_is_what_the_pipelined_block_moves_and_computes() -> None:
    """Oracle: the capacity the layer pads to, the bytes each AlltoAll call ships and the expert MACs of
    a pipelined MoE layer at (r_fwd, r_bwd) = (4, 2), summed over the chunks, equal LayerWork's."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_hidden=16, capacity_factor=1.25)
    layer = MoELayer.from_config(cfg, 8)
    layer.dispatcher = rec = _Recording()
    apply_pipeline([layer], "fsmoe", (4, 2), Runtime.for_schedule(FSMOE))
    macs: list[int] = []
    inner = layer.experts.forward_saving

    def counting(x_eND: torch.Tensor) -> tuple:
        e, N, D = x_eND.shape
        macs.append(2 * e * N * D * layer.experts.d_hidden)
        return inner(x_eND)

    layer.experts.forward_saving = counting
    layer(torch.randn(100, 8))
    job = JobConfig(model=ModelConfig(d_model=8, n_heads=2, moe=cfg))
    work = dataclasses.replace(layer_work(job, tokens=100), ep=2).padded(4)  # ep=2: count the AlltoAll bytes
    assert layer.last_routing.capacity == work.capacity == 64  # 63 padded to lcm(4, 2)
    assert len(rec.exchanged) == 8 and sum(rec.exchanged) == 2 * work.n_a2a  # dispatch + combine, 4 chunks
    assert sum(macs) == work.n_exp


# --- closed forms ----------------------------------------------------------------------------------------------
def _c(a: float, g: float, x: float) -> ChunkTimes:
    return ChunkTimes(a2a_s=a, ag_s=g, rs_s=g, exp_s=x)


# (chunk times, r, t_gar, the case that holds, its time by hand)
HAND = [
    (_c(4, 1, 1), 2, 5.0, 1, 2 * 2 * 4 + 5),  # Q1 ¬Q2 Q4
    (_c(4, 1, 1), 2, 1.0, 3, 2 * 2 * 4 + 1 + 1),  # Q1 ¬Q2 ¬Q4
    (_c(1, 0.5, 4), 2, 0.0, 2, 2 + 0.5 + 0.5 + 2 * 4),  # Q1 Q2 ¬Q5 (Q5: t_gar > 8 - 2 + 1)
    (_c(1, 0.5, 4), 2, 10.0, 1, 2 * 2 * 1 + 10),  # Q1 Q2 Q5
    (_c(1, 3, 1), 2, 0.0, 4, 2 + 2 * 3 + 2 * 3),  # ¬Q1 ¬Q3 ¬Q6 (Q6: t_gar > 12 - 2)
    (_c(1, 3, 1), 2, 11.0, 1, 4 + 11),  # ¬Q1 ¬Q3 Q6
    (_c(1, 2, 6), 2, 0.0, 2, 2 + 4 + 12),  # ¬Q1 Q3 ¬Q7 (Q7: t_gar > 4 + 12 - 2)
    (_c(1, 2, 6), 2, 15.0, 1, 4 + 15),  # ¬Q1 Q3 Q7
]


@pytest.mark.parametrize(("c", "r", "t_gar", "case", "expected"), HAND)
def test_each_case_and_its_time_by_hand(c: ChunkTimes, r: int, t_gar: float, case: int, expected: float) -> None:
    assert case_of(predicates(c, r, t_gar)) == case
    assert case_time(case, c, r, t_gar) == pytest.approx(expected, rel=REL)
    # every formula is a chain of the schedule: the case that holds is the longest (AG = RS here)
    assert expected == pytest.approx(max(case_time(j, c, r, t_gar) for j in (1, 2, 3, 4)), rel=REL)


def test_predicates_by_hand() -> None:
    q = predicates(_c(1, 0.5, 4), 2, 7.5)  # Q5: 7.5 > 2·4 − 2·1 + 1 = 7 ; Q4: 7.5 > 1 ; Q6: 7.5 > 2 − 2
    assert (q.q1, q.q2, q.q3, q.q4, q.q5, q.q6, q.q7) == (True, True, True, True, True, True, True)
    q = predicates(_c(1, 3, 1), 3, 0.0)  # Q2: 3 > 4? Q3: 3 > 12? Q6: 0 > 18 − 4?
    assert (q.q1, q.q2, q.q3, q.q6) == (False, False, False, False)


def test_eq1_chunks_forward_backward_and_the_no_iio_fold() -> None:
    costs = Costs(ops={"a2a": L(1e-3, 1e-6), "ag": L(2e-3, 1e-7), "rs": L(3e-3, 1e-7), "gar": L(0, 0),
                       "expert_fwd": L(1e-4, 1e-8), "expert_bwd": L(2e-4, 2e-8), "gate_fwd": L(0, 0),
                       "gate_bwd": L(0, 0), "dense_fwd": L(0, 0), "dense_bwd": L(0, 0)})
    c = PassModel.of(WORK, costs, backward=False).chunk(4)
    assert c.a2a_s == pytest.approx(1e-3 + 1024 * 1e-6) and c.ag_s == pytest.approx(2e-3 + 2048 * 1e-7)
    assert c.rs_s == pytest.approx(3e-3 + 2048 * 1e-7) and c.exp_s == pytest.approx(1e-4 + 8192 * 1e-8)
    b = PassModel.of(WORK, costs, backward=True).chunk(4)  # the backward line at the same n: twice the time
    assert b.exp_s == pytest.approx(2 * c.exp_s) and b.a2a_s == c.a2a_s
    f = PassModel.of(WORK, costs, backward=False, one_channel=True).chunk(4)
    assert (f.ag_s, f.rs_s) == (0.0, 0.0) and f.a2a_s == pytest.approx(c.a2a_s + (c.ag_s + c.rs_s) / 2)


def test_windows_by_hand() -> None:
    assert window(2, _c(1, 0.5, 4), 2) == pytest.approx(8 + 1 - 2)
    assert window(3, _c(4, 1, 1), 2) == pytest.approx(2)
    assert window(4, _c(1, 3, 1), 2) == pytest.approx(12 - 2)


# --- the evaluator ---------------------------------------------------------------------------------------------
# (schedule, totals of one unchunked pass, backward?, t_gar, r, hand-computed makespan); each in the pure
# regime of one case (for fsmoe: the closed form holds exactly there).
PURE = [
    (FSMOE, dict(a2a=8, ag=1, exp_fwd=1), False, None, 4, 2 * 4 * 2 + 0.25 + 0.25),  # Case 3
    (FSMOE, dict(a2a=8, ag=1, exp_fwd=0.5), True, 3.0, 4, 2 * 4 * 2 + 3),  # Case 1 (Q4)
    (FSMOE, dict(a2a=1, ag=0.5, exp_fwd=8), False, None, 4, 0.5 + 0.25 + 8),  # Case 2
    (FSMOE, dict(a2a=4, ag=0.4, exp_fwd=4), True, 5.0, 4, 2 * 4 * 1 + 5),  # Case 1 (Q2 Q5)
    (FSMOE, dict(a2a=1, ag=4, exp_fwd=1), False, None, 4, 0.5 + 4 + 4),  # Case 4
    (FSMOE, dict(a2a=1, ag=4, exp_fwd=0.5), True, 8.0, 4, 2 + 8),  # Case 1 (¬Q1 Q6)
    (FSMOE, dict(a2a=1, ag=2, exp_fwd=8), False, None, 4, 0.5 + 1 + 8),  # Case 2 (¬Q1 Q3)
    (FSMOE, dict(a2a=1, ag=0.5, exp_fwd=8), False, None, 2, 1 + 0.5 + 8),  # Case 2, r = 2
    (NO_IIO, dict(a2a=8, ag=1, exp_fwd=1), False, None, 4, 4 * (2 * 2 + 0.25 + 0.25)),  # folded Case 3
    (NO_IIO, dict(a2a=8, ag=1, exp_fwd=0.5), True, 2.0, 4, 4 * (2 * 2 + 0.25 + 0.25) + 2),  # folded Case 1
    (SEQ, dict(a2a=1, ag=0.5, exp_fwd=2), False, None, 1, 1 + 0.5 + 2 + 0.5 + 1),  # r = 1: Case 2
]


@pytest.mark.parametrize(("spec", "totals", "backward", "t_gar", "r", "expected"), PURE)
def test_evaluator_equals_the_closed_form_in_each_pure_regime(spec, totals, backward, t_gar, r, expected) -> None:
    costs = costs_for(**totals)
    played = play_pass(spec, WORK, costs, r, backward=backward, t_gar=t_gar)
    assert played.makespan_s == pytest.approx(expected, rel=REL)
    pm = PassModel.of(WORK, costs, backward=backward, one_channel=not spec.separate_channels)
    assert closed_form(pm, r, t_gar or 0.0)[1] == pytest.approx(expected, rel=REL)


def test_one_channel_compute_bound_is_the_folded_case_2() -> None:
    """With one FIFO lane each chunk's ReduceScatter and combine are issued right behind its expert
    (Tutel's order), so the compute-bound No-IIO pass is the folded Case 2, 2·t_a2a' + r·t_exp, and
    chunk 0's combine runs as soon as chunk 0's ReduceScatter is done, long before the last expert."""
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=8)
    played = play_pass(NO_IIO, WORK, costs, 4, backward=False)
    assert played.makespan_s == pytest.approx(2 * (0.25 + 0.125) + 8, rel=REL)
    folded = closed_form(PassModel.of(WORK, costs, backward=False, one_channel=True), 4)
    assert folded == (2, pytest.approx(played.makespan_s, rel=REL))
    assert played.span("combine", 0).start_s == pytest.approx(played.span("reduce", 0).end_s)
    assert played.span("combine", 0).end_s < played.span("expert", 3).start_s


def test_play_follows_lanes_and_dependencies_by_hand() -> None:
    tasks = [Task(kind="dispatch", chunk=0, channel="inter"), Task(kind="gather", chunk=0, channel="intra",
             deps=(("dispatch", 0),)), Task(kind="dispatch", chunk=1, channel="inter"),
             Task(kind="expert", chunk=0, channel="compute", deps=(("gather", 0),))]
    d = {"dispatch": 2.0, "gather": 1.0, "expert": 5.0}
    two = play(tasks, {"inter": "inter", "intra": "intra"}, lambda t: d[t.kind])
    assert [(s.start_s, s.end_s) for s in two.spans] == [(0, 2), (2, 3), (2, 4), (3, 8)]
    one = play(tasks, {"inter": "inter", "intra": "inter"}, lambda t: d[t.kind], free_at_s={"inter": 1.0})
    assert [(s.start_s, s.end_s) for s in one.spans] == [(1, 3), (3, 4), (4, 6), (4, 9)]
    assert one.makespan_s == 9 and one.predicted_s()["expert[0]"] == 5


@pytest.mark.parametrize("totals", [dict(a2a=1, ag=0.5, exp_fwd=4), dict(a2a=8, ag=1, exp_fwd=1),
                                    dict(a2a=1, ag=4, exp_fwd=1), dict(a2a=3, ag=2, exp_fwd=3)])
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_gar_response_is_exact(totals: dict, r: int) -> None:
    costs = costs_for(**totals)
    resp = gar_response(FSMOE, WORK, costs, r)
    for t_gar in (0.0, 0.3, 1.0, 2.5, 7.0, 40.0):
        played = play_pass(FSMOE, WORK, costs, r, backward=True, t_gar=t_gar).makespan_s
        assert resp(t_gar) == pytest.approx(played, rel=REL)
    inside = play_pass(FSMOE, WORK, costs, r, backward=True, t_gar=resp.window_s).makespan_s
    assert inside == pytest.approx(play_pass(FSMOE, WORK, costs, r, backward=True).makespan_s, rel=REL)


def test_gar_window_equals_the_case_table_in_its_pure_regime() -> None:
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=4, exp_bwd=8)  # backward Case 2 at r = 4: a=.25 g=s=.125 x=2
    assert gar_response(FSMOE, WORK, costs, 4).window_s == pytest.approx(4 * 2 + 0.25 - 2 * 3 * 0.25, rel=REL)
    assert gar_response(get_schedule("tutel"), WORK, costs, 4).window_s == 0.0  # no GAR slot in the block


def test_pass_durations_idle_and_busy_lines() -> None:
    costs = costs_for(a2a=8, ag=1, exp_fwd=1, busy_a2a=16)
    idle, busy = pass_durations(WORK, costs, 4), pass_durations(WORK, costs, 4, busy=True)
    tasks = pass_tasks(FSMOE, 4, backward=False)
    assert {idle(t) for t in tasks if t.kind in ("dispatch", "combine")} == {2.0}
    assert {busy(t) for t in tasks if t.kind in ("dispatch", "combine")} == {4.0}
    assert {busy(t) for t in tasks if t.kind == "gather"} == {0.25}  # no busy AllGather line: as idle
    gar = [t for t in backward_tasks(FSMOE, 1, True) if t.kind == "gar"]
    assert pass_durations(WORK, costs, 1, t_gar=3.0, busy=True)(gar[0]) == 3.0


# Two chunks by hand: dispatch[i] on the inter lane (idle 2 s, busy 4 s), expert[i] (3 s) after it.
TWO_CHUNKS = [Task(kind="dispatch", chunk=0, channel="inter"),
              Task(kind="expert", chunk=0, channel="compute", deps=(("dispatch", 0),)),
              Task(kind="dispatch", chunk=1, channel="inter"),
              Task(kind="expert", chunk=1, channel="compute", deps=(("dispatch", 1),))]


def two_chunks(max_plays: int):
    lanes = {"inter": "inter"}
    idle = {"dispatch": 2.0, "expert": 3.0}
    busy = {"dispatch": 4.0, "expert": 3.0}
    return play_contended(TWO_CHUNKS, lanes, lambda t: idle[t.kind], lambda t: busy[t.kind], max_plays=max_plays)


@pytest.mark.parametrize(("max_plays", "dispatch1_s"), [
    (1, 2.0),  # idle: dispatch[1] on [2, 4] ends inside expert[0] on [2, 5]: x² − 4x = 0 -> 4 (busy)
    (2, 4.0),  # [2, 6] sticks out of expert[0] by 1 s (expert[1] waits for it): x = 2 + 2·3/x -> 1 + √7
    (3, 1 + 7**0.5),  # the same piece again: settled
])
def test_contention_two_chunks_by_hand(max_plays: int, dispatch1_s: float) -> None:
    played = two_chunks(max_plays)
    assert played.plays == max_plays
    d0, d1 = played.span("dispatch", 0), played.span("dispatch", 1)
    assert (d0.start_s, d0.end_s) == (0.0, 2.0)  # the pipeline's fill never overlaps compute: idle
    assert d1.end_s - d1.start_s == pytest.approx(dispatch1_s, rel=REL)
    assert played.makespan_s == pytest.approx(max(5.0, 2.0 + dispatch1_s) + 3.0, rel=REL)


def test_contention_settles_at_the_fixed_point() -> None:
    """d = 2 + 2·3/d (dispatch[1] sticks out of expert[0]): d = 1 + √7, found in three plays."""
    played = two_chunks(60)
    assert played.plays == 3
    d1 = played.span("dispatch", 1)
    assert d1.end_s - d1.start_s == pytest.approx(1 + 7**0.5, rel=REL)
    assert overlap_fractions(played) == {("dispatch", 0): 0.0, ("dispatch", 1): pytest.approx(3 / (1 + 7**0.5))}


def test_contended_duration_by_hand() -> None:
    assert contended_duration(2.0, 4.0, 2.0, 2.0, True) == 4.0  # inside compute and stays so: busy
    assert contended_duration(2.0, 4.0, 4.0, 3.0, False) == pytest.approx(1 + 7**0.5)
    assert contended_duration(2.0, 4.0, 3.0, 0.0, False) == 2.0  # no overlap: idle
    assert contended_duration(2.0, 2.0, 3.0, 3.0, True) == 2.0  # busy = idle
    assert contended_duration(1.0, 2.0, 1.0, 0.5, True) == pytest.approx(1 + 0.5**0.5)  # x² − 2x + 0.5 = 0


def test_contention_in_the_pipelined_block() -> None:
    """r = 1 plays the idle lines once; at r = 4 (compute bound: every expert 2 s, AlltoAll chunks 0.25 s
    idle, 0.5 busy) the fill and drain are idle and the steady-state AlltoAlls, inside the experts, busy."""
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=8, busy_a2a=2)
    seq = play_pass(SEQ, WORK, costs, 1, backward=False)
    assert seq.plays == 1 and seq.makespan_s == pytest.approx(1 + 0.5 + 8 + 0.5 + 1, rel=REL)
    played = play_pass(FSMOE, WORK, costs, 4, backward=False)
    lengths = played.predicted_s()
    assert lengths["dispatch[0]"] == pytest.approx(0.25) and lengths["combine[3]"] == pytest.approx(0.25)
    assert 0.25 < lengths["dispatch[1]"] < 0.5  # starts before expert[0] (gather[0] first): partly
    assert all(lengths[f"dispatch[{i}]"] == pytest.approx(0.5) for i in (2, 3))
    assert all(lengths[f"combine[{i}]"] == pytest.approx(0.5) for i in (0, 1, 2))
    assert played.makespan_s == pytest.approx(0.25 + 0.125 + 8 + 0.125 + 0.25, rel=REL)


def test_gar_slice_contended_between_its_lines() -> None:
    """A GAR slice with an idle time is played between its idle and busy times by its overlap."""
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=4)  # backward experts: 8 s in all
    inside = play_pass(FSMOE, WORK, costs, 4, backward=True, t_gar=2.0, t_gar_idle=1.0)
    assert inside.predicted_s()["gar[0]"] == pytest.approx(2.0)  # wholly beside the experts: busy
    # r = 1: gar on [1, 1 + d] after combine_bwd[0], the expert on [1.5, 9.5]. Rate model (κ = 2): full
    # speed for 0.5 s, then half speed for the other 0.5 s of its work: d = 1.5, found by the first
    # replay and confirmed by the second
    partly = play_pass(FSMOE, WORK, costs, 1, backward=True, t_gar=2.0, t_gar_idle=1.0)
    assert partly.plays == 2
    assert partly.predicted_s()["gar[0]"] == pytest.approx(1.5, rel=REL)


def test_rate_duration_by_hand() -> None:
    # idle 2 s, busy 8 s (κ = 4, w = 3/4). Last play: 2 s, 1 s of it beside compute, end inside a compute
    # task with 10 s left: it stays inside, x = 2 + 3/4·(1 + x − 2) → x = 5
    assert rate_duration(2.0, 8.0, 2.0, 1.0, 10.0) == pytest.approx(5.0)
    # only 1 s of that task left: it passes the task's end, overlapped 1 + 1 = 2 s: x = 2 + 3/4·2 = 3.5
    assert rate_duration(2.0, 8.0, 2.0, 1.0, 1.0) == pytest.approx(3.5)
    assert rate_duration(2.0, 8.0, 3.0, 1.0, 0.0) == pytest.approx(2.75)  # end outside compute
    assert rate_duration(2.0, 8.0, 8.0, 8.0, 50.0) == 8.0  # overlapped all along: the busy time
    assert rate_duration(2.0, 2.0, 2.0, 2.0, 5.0) == 2.0  # no contention measured


def test_the_evaluator_plays_the_schedules_own_task_lists() -> None:
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=4)
    played = play_pass(FSMOE, WORK, costs, 2, backward=True, t_gar=1.0)
    assert [s.name for s in played.spans] == [str(t).split("@")[0] for t in backward_tasks(FSMOE, 2, True)]
    assert {s.lane for s in played.spans} == {"compute", *lanes_for(FSMOE).values()}


# --- compute slowed beside communication (Costs.beside) ----------------------------------------------------------
def test_slowed_duration_by_hand() -> None:
    # 3 s alone, played [2, 5] with 2 s of a σ = 2 collective (weight 1/2) beside it, none at its end: 3 + 1
    assert slowed_duration(3.0, 3.0, 1.0, 0.0) == 4.0
    # overlapped all along (weight 1/2 at its end too): σ·lo = 6
    assert slowed_duration(3.0, 3.0, 1.5, 0.5) == pytest.approx(6.0)
    assert slowed_duration(3.0, 3.0, 0.0, 0.0) == 3.0  # nothing beside it
    assert slowed_duration(1.0, 1.0, MAX_SLOW_WEIGHT, 5.0) == pytest.approx(1.0 / (1.0 - MAX_SLOW_WEIGHT))  # capped


def test_comm_cover_adds_overlapping_weights() -> None:
    cover = CommCover([(0.0, 2.0, 0.5), (1.0, 3.0, 0.25), (5.0, 6.0, 0.0)])  # a weightless span adds nothing
    assert cover.upto(-1.0) == 0.0 and cover.upto(1.0) == pytest.approx(0.5)
    assert cover.upto(2.0) == pytest.approx(0.5 + 0.75) and cover.upto(10.0) == pytest.approx(1.0 + 0.5)
    assert (cover.at(0.5), cover.at(1.5), cover.at(2.5), cover.at(3.0)) == (0.5, 0.75, 0.25, 0.0)
    assert not CommCover([(0.0, 1.0, 0.0)])
    assert CommCover([(0.0, 1.0, 0.75), (0.0, 1.0, 0.75)]).at(0.5) == MAX_SLOW_WEIGHT  # compute never stops


def test_compute_slowed_beside_two_chunks_by_hand() -> None:
    """TWO_CHUNKS with busy = idle collectives whose compute beside runs at half speed (σ = 2):
    dispatch[1] on [2, 4] lies inside expert[0] (3 s from 2): 2 s at half speed, 3 + 1 = 4 s; expert[1]
    then starts at 6: makespan 9 (8 without), played twice (the second play's durations stay)."""
    idle = {"dispatch": 2.0, "expert": 3.0}
    played = play_contended(TWO_CHUNKS, {"inter": "inter"}, lambda t: idle[t.kind], lambda t: idle[t.kind],
                            slows=lambda t: 2.0, max_plays=60)
    assert played.plays == 2
    e0, e1 = played.span("expert", 0), played.span("expert", 1)
    assert (e0.start_s, e0.end_s) == (2.0, pytest.approx(6.0)) and e1.end_s - e1.start_s == pytest.approx(3.0)
    assert played.makespan_s == pytest.approx(9.0)
    unslowed = play_contended(TWO_CHUNKS, {"inter": "inter"}, lambda t: idle[t.kind], lambda t: idle[t.kind],
                              slows=lambda t: 1.0)
    assert unslowed.makespan_s == 8.0 and unslowed.plays == 1


def test_the_models_apply_the_gars_slowdown_only() -> None:
    """σ of the block's own collectives is not applied (their busy lines carry the pipeline's mutual
    slowdown): a pipelined pass is the same with or without it. The GAR's is: a slice beside the experts
    slows them, by at most (σ − 1) × the slice."""
    costs = costs_for(a2a=1, ag=0.5, exp_fwd=8)
    chunked = dataclasses.replace(costs, beside={"a2a": 2.0, "ag": 2.0, "rs": 2.0})
    assert pass_slows(costs) is None and pass_slows(chunked) is None and model_slows(chunked) == {}
    assert play_pass(FSMOE, WORK, chunked, 4, backward=False) == play_pass(FSMOE, WORK, costs, 4, backward=False)
    slowed = dataclasses.replace(costs, beside={"a2a": 2.0, "gar": 2.0})
    assert model_slows(slowed) == {"gar": 2.0}
    fast = play_pass(FSMOE, WORK, costs, 4, backward=True, t_gar=1.0).makespan_s
    slow = play_pass(FSMOE, WORK, slowed, 4, backward=True, t_gar=1.0).makespan_s
    assert fast < slow <= fast + (2.0 - 1.0) * 1.0


def test_gar_response_slows_the_path_around_the_gar() -> None:
    """fsmoe r = 1 backward, compute bound: combine_bwd [0, 1], reduce_bwd [1, 1.5], the expert (8 s) from
    1.5; a GAR slice from 1 shorter than the expert leaves the link free (B + t < A) but, with σ = 2,
    slows the expert by half its overlap, (t − 0.5)/2 — the response and a play agree."""
    costs = dataclasses.replace(costs_for(a2a=1, ag=0.5, exp_fwd=4, gar=L(0.0, 1e-3)), beside={"gar": 2.0})
    g = gar_response(FSMOE, WORK, costs, 1)
    assert (g.slow, g.lead_s) == (0.5, 0.5) and g.cover_s == pytest.approx(2.0 * 8.0)
    assert g(0.0) == g(0.5) == g.a_s
    for t in (1.0, 3.0):
        played = play_pass(FSMOE, WORK, costs, 1, backward=True, t_gar=t)
        assert g(t) == pytest.approx(g.a_s + (t - 0.5) / 2)
        assert played.makespan_s == pytest.approx(g(t), rel=1e-6)
    unslowed = gar_response(FSMOE, WORK, dataclasses.replace(costs, beside={}), 1)
    assert (unslowed.slow, unslowed(3.0)) == (0.0, unslowed.a_s)
