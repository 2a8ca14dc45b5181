"""The planner: Algorithm 1 against a dense grid, the chosen degrees against brute force over the feasible
set, the modelled step by hand, and the gradient partition (readiness, never worse than no partition)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fsmoe.config import JobConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig, get_schedule
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.parallel.grad_plan import TAIL, GradientPlan, PlannedGradSync, StreamLayout, parse_plan
from fsmoe.parallel.grad_sync import REPLICA_ATTR
from fsmoe.parallel.parallelize import gpt_gradient_stream
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import (
    BlockWork,
    GarResponse,
    LayerTable,
    LayerWork,
    PassModel,
    case_time,
    closed_form,
    degree_pairs,
    layer_table,
    layer_work,
    padded_for,
    play_pass,
    slice_durations,
)
from fsmoe.perf.partition import StepModel, StreamBytes, partition, rank_stream, replica_sizes
from fsmoe.perf.planner import algorithm1, plan_job, plan_layer, predict_layer, step_model
from tests.dist_utils import run_distributed

WORK = LayerWork(tokens=256, d_model=64, d_hidden=128, num_experts=4, ep=2, esp=2, gemms=2, gate_width=4,
                 capacity_gate=100)


def L(alpha: float, beta: float) -> Linear:
    return Linear(alpha_s=alpha, beta_s=beta)


def make_costs(*, a2a: Linear, ag: Linear, exp: Linear, gar: Linear | None = None, busy: float = 1.0) -> Costs:
    """Synthetic costs (no profiling); ``busy`` scales the collectives measured under compute."""
    gar = gar or L(1e-4, 2e-9)
    ops = {"a2a": a2a, "ag": ag, "rs": ag, "gar": gar, "expert_fwd": exp, "expert_bwd": exp.scaled(2),
           "gate_fwd": L(1e-5, 1e-11), "gate_bwd": L(2e-5, 2e-11), "dense_fwd": L(1e-4, 1e-10),
           "dense_bwd": L(2e-4, 2e-10)}
    busy_ops = {} if busy == 1.0 else {k: ops[k].scaled(busy) for k in ("a2a", "ag", "rs", "gar")}
    return Costs(ops=ops, busy=busy_ops)


COSTS = {  # per-chunk regimes for WORK: AlltoAll bound, compute bound, intra bound, mixed with startup costs
    "a2a": make_costs(a2a=L(2e-4, 2e-8), ag=L(5e-5, 1e-10), exp=L(1e-5, 1e-11)),
    "compute": make_costs(a2a=L(1e-4, 1e-9), ag=L(5e-5, 1e-10), exp=L(1e-5, 4e-10)),
    "intra": make_costs(a2a=L(1e-4, 1e-9), ag=L(1e-4, 2e-8), exp=L(1e-5, 1e-11)),
    "mixed": make_costs(a2a=L(2e-3, 8e-9), ag=L(1e-3, 2e-9), exp=L(5e-4, 1e-10), busy=1.8),
}


# --- Algorithm 1 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(COSTS))
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("t_gar", [0.0, 1e-3, 2e-2])
@pytest.mark.parametrize("one_channel", [False, True])
def test_algorithm1_finds_the_continuous_optimum(name: str, backward: bool, t_gar: float, one_channel: bool) -> None:
    """SLSQP over the cases' constraints reaches the minimum of the closed form: what it claims is achieved
    at its r*, and no point of a dense grid of r ∈ [1, 8] is better (the optimum may lie between points)."""
    pm = PassModel.of(WORK, COSTS[name], backward=backward, one_channel=one_channel)
    grid = np.linspace(1.0, 8.0, 7001)
    brute = min(closed_form(pm, r, t_gar)[1] for r in grid)
    got = algorithm1(pm, t_gar=t_gar, max_degree=8)
    assert closed_form(pm, got.r_star, t_gar)[1] == pytest.approx(got.time_star_s, rel=1e-9)
    # its case's formula gives that time (at an optimum on a case boundary either case may be named)
    assert case_time(got.case, pm.chunk(got.r_star), got.r_star, t_gar) == pytest.approx(got.time_star_s, rel=1e-9)
    assert got.time_star_s <= brute * (1 + 1e-9)
    assert got.time_star_s >= brute * (1 - 1e-3)  # the grid's resolution
    assert got.r in (1, 2, 4, 8) and abs(np.log2(got.r) - np.log2(got.r_star)) <= 1  # a neighbouring power of 2


def test_algorithm1_rounds_with_capacity_padding() -> None:
    pm = PassModel.of(WORK, COSTS["compute"], backward=False)
    got = algorithm1(pm, max_degree=8, work=WORK, costs=COSTS["compute"])
    padded = PassModel.of(padded_for(WORK, got.r, got.r), COSTS["compute"], backward=False)
    assert got.time_s == pytest.approx(closed_form(padded, got.r)[1], rel=1e-12)


# --- degrees -----------------------------------------------------------------------------------------------------
def brute_force(spec_name: str, work: LayerWork, costs: Costs, t_gar: float) -> dict[tuple[int, int], float]:
    """Forward + backward of every feasible pair, played afresh (C padded to lcm(r_fwd, r_bwd))."""
    spec = get_schedule(spec_name)
    rs = (1, 2, 4, 8) if spec.pipelined else (1,)
    out = {}
    for f in rs:
        for b in rs:
            if f != b and not spec.independent_degrees:
                continue
            w = work.padded(int(np.lcm(f, b)))
            gar = t_gar if spec.gar_in_moe else None
            out[(f, b)] = (play_pass(spec, w, costs, f, backward=False).makespan_s
                           + play_pass(spec, w, costs, b, backward=True, t_gar=gar).makespan_s)
    return out


@pytest.mark.parametrize("name", list(COSTS))
@pytest.mark.parametrize("spec", ["fsmoe", "fsmoe_no_iio", "tutel", "sequential"])
@pytest.mark.parametrize("t_gar", [0.0, 5e-3])
def test_plan_layer_is_the_brute_force_argmin(name: str, spec: str, t_gar: float) -> None:
    times = brute_force(spec, WORK, COSTS[name], t_gar)
    lp = plan_layer(spec, WORK, COSTS[name], t_gar=t_gar)
    best = min(times.values())
    assert times[(lp.r_fwd, lp.r_bwd)] == pytest.approx(best, rel=1e-12)
    assert lp.fwd_s + lp.bwd_s == pytest.approx(best, rel=1e-12)
    assert lp.capacity == WORK.padded(int(np.lcm(lp.r_fwd, lp.r_bwd))).capacity


def test_r_is_one_when_pipelining_does_not_pay() -> None:
    slow_start = make_costs(a2a=L(0.5, 1e-9), ag=L(0.5, 1e-10), exp=L(0.1, 1e-10))  # every chunk pays α
    lp = plan_layer("fsmoe", WORK, slow_start)
    assert (lp.r_fwd, lp.r_bwd) == (1, 1)
    contended = make_costs(a2a=L(1e-4, 1e-8), ag=L(5e-5, 1e-10), exp=L(1e-5, 1e-10), busy=3.0)
    assert (plan_layer("fsmoe", WORK, contended).r_fwd, plan_layer("fsmoe", WORK, contended).r_bwd) == (1, 1)


def test_pipelining_is_chosen_when_it_pays() -> None:
    balanced = make_costs(a2a=L(1e-5, 1e-8), ag=L(1e-5, 1e-9), exp=L(1e-5, 2e-10))  # a2a 1 ms, experts 1.3 ms
    lp = plan_layer("fsmoe", WORK, balanced)
    assert lp.r_fwd > 1 and lp.r_bwd > 1
    assert lp.bottleneck_fwd in ("expert compute bound", "inter-node AlltoAll bound",
                                 "intra-node AllGather/ReduceScatter bound")


def test_max_degree_bounds_the_search() -> None:
    assert max(plan_layer("fsmoe", WORK, COSTS["mixed"], max_degree=2).r_fwd, 1) <= 2


# --- the gradient stream ---------------------------------------------------------------------------------------
def small_job(**parallel: int) -> JobConfig:
    moe = MoEConfig(num_experts=4, top_k=2, d_hidden=32, capacity_factor=1.25)
    model = ModelConfig(seq_len=16, d_model=16, n_layers=4, n_heads=2, d_ff=64, moe=moe)
    par = ParallelConfig(**({"nproc": 4, "procs_per_node": 2, "ep": 4} | parallel))
    return JobConfig(model=model, parallel=par, train=TrainConfig(batch_size=8))


def test_rank_stream_without_parallelism_is_the_real_models_stream() -> None:
    job = small_job(nproc=1, procs_per_node=1, ep=1)
    torch.manual_seed(0)
    real = gpt_gradient_stream(GPTMoE(job.model))
    meta = rank_stream(job)
    assert meta.slots == real.slots and meta.names == real.names and meta.ready == real.ready
    assert meta.ready_bytes() == real.ready_bytes()


def test_rank_stream_cuts_shards_by_hand() -> None:
    job = small_job(nproc=4, procs_per_node=4, ep=2, esp=2, mp=2)
    stream = rank_stream(job)
    numel = {n: p.numel() for n, p in zip(stream.names, stream.params, strict=True)}
    kind = {n: p.fsmoe_replicas for n, p in zip(stream.names, stream.params, strict=True)}
    w1 = "blocks.1.mlp.experts.w1_eDH"
    assert numel[w1] == (4 // 2) * 16 * (32 // 2) and kind[w1] == "expert_dp"  # e = E/EP, H/ESP
    assert numel["blocks.1.mlp.experts.b2_eD"] == 2 * 16  # rank 0 owns its ESP group's output bias
    assert numel["blocks.1.attn.qkv.weight"] == 3 * 16 * 16 // 2 and kind["blocks.1.attn.qkv.weight"] == "dense_dp"
    assert numel["blocks.1.attn.proj.bias"] == 16 and kind["blocks.1.attn.proj.bias"] == "world"
    assert replica_sizes(job.parallel) == {"world": 4, "dense_dp": 2, "expert_dp": 1}


def _real_stream(rank: int, world: int, job: JobConfig) -> tuple[dict[str, int], dict[str, int]]:
    """This rank's stream in the real parallelized model: bytes ready per slot, bytes per replica kind."""
    from fsmoe.parallel.dims import ParallelDims, build_groups
    from fsmoe.parallel.parallelize import parallelize_gpt

    groups = build_groups(ParallelDims.from_config(job.parallel))
    torch.manual_seed(0)
    layout = gpt_gradient_stream(parallelize_gpt(GPTMoE(job.model), groups))
    return layout.ready_bytes(), bytes_by_kind(layout)


def bytes_by_kind(layout: StreamLayout) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for p in layout.params:
        kind = getattr(p, REPLICA_ATTR, "world")
        kinds[kind] = kinds.get(kind, 0) + p.numel() * p.element_size()
    return kinds


def test_rank_stream_is_rank_0s_stream_of_the_parallelized_model() -> None:
    """Oracle: 4 gloo ranks (MP 2, EP 2, ESP 2) parallelize the model; rank 0's slots carry the bytes that
    rank_stream computes on the meta device, with the same replica kinds."""
    job = small_job(nproc=4, procs_per_node=4, ep=2, esp=2, mp=2)
    (ready, kinds), *_ = run_distributed(_real_stream, 4, job, timeout=120)
    meta = rank_stream(job)
    assert meta.ready_bytes() == ready
    assert bytes_by_kind(meta) == kinds


def test_stream_fit_by_hand() -> None:
    job = small_job()  # EP = 4 = world: experts are never all-reduced, everything else is
    stream = StreamBytes(rank_stream(job), replica_sizes(job.parallel))
    line = L(1.0, 0.5)  # 0.5 s per byte after α = 1 s
    pos = np.array([0.0, 0.0, 0.0])
    got = stream.fit(pos, np.array([0.5, 1.0 + 0.5 * 16, 1e9]), line)
    assert got[0] == 0.0  # below α: nothing that costs
    assert stream.comm(got[1:2])[0] == pytest.approx(16)  # 16 bytes of all-reduced gradient fit
    assert got[2] == stream.total


# --- the modelled step -------------------------------------------------------------------------------------------
def test_step_walk_by_hand() -> None:
    """Two blocks (0 dense, 1 MoE): slots moe:1 (64 B ready), dense:1 (+1280 B), dense:0 (+2400 B), tail
    (+9664 B); GAR costs 1 ms per byte; the MoE layer's backward is max(5, 1 + t_gar), its forward 2."""
    cfg = ModelConfig(seq_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16, moe=MoEConfig(num_experts=2, top_k=1,
                                                                                         d_hidden=8))
    layout = gpt_gradient_stream(GPTMoE(cfg))
    stream = StreamBytes(layout, {"world": 2, "dense_dp": 2, "expert_dp": 2})
    zero = L(0.0, 0.0)
    costs = Costs(ops={"a2a": zero, "ag": zero, "rs": zero, "gar": L(0.0, 1e-3), "expert_fwd": zero,
                       "expert_bwd": zero, "gate_fwd": zero, "gate_bwd": zero, "dense_fwd": L(0.0, 1.0),
                       "dense_bwd": L(0.0, 1.0)})
    table = LayerTable(pairs=((1, 1),), fwd_s=(2.0,), bwd=(GarResponse(a_s=5.0, b_s=1.0),))
    blocks = (BlockWork(moe=False, n_attn=1.0, n_mlp=1.0), BlockWork(moe=True, n_attn=1.0, n_mlp=0.0))
    model = StepModel(spec=get_schedule("fsmoe"), blocks=blocks, tables=[table], gate_n=[0.0], head_n=0.0,
                      costs=costs, stream=stream)
    none = model.run(fixed=np.zeros((1, 4)))
    # forward 2 + 1 (dense) + 2 (MoE); backward: MoE 5, attention 1, MLP 1, attention 1, then all 13408 B
    assert none["step_s"][0] == pytest.approx(5 + 8 + 13.408)
    greedy = model.run(tau=np.zeros((1, 1)))
    # moe:1 takes its 64 B (window 4 s); dense:1 its 1280 B in the 3 s before the backward ends; dense:0
    # the 1000 B that fit in block 0's attention (1 s) once the link is free at 7 s; the tail 11064 B.
    assert list(greedy["amounts"][0]) == [64, 1280, 1000, 11064]
    assert greedy["step_s"][0] == pytest.approx(5 + 8 + 11.064)
    late = model.run(fixed=np.array([[0, 0, 3680, 0]]))  # 3680 B at dense:0 run past the backward
    assert late["bwd_s"][0] == pytest.approx(7 + 3.68 + 9.728)


def _walk(gar: Linear, *, response: GarResponse | None = None, busy: Linear | None = None,
          sigma: float = 1.0) -> StepModel:
    """The two blocks of the walk above (moe:1 64 B, dense:1 +1280 B, dense:0 +2400 B, tail +9664 B;
    attention and MLP 1 s each), the GAR on ``gar`` alone and ``busy`` beside compute, σ = ``sigma``; the
    MoE layer's backward ``response`` (default max(5, 1 + t_gar)), its forward 2 s."""
    cfg = ModelConfig(seq_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16, moe=MoEConfig(num_experts=2, top_k=1,
                                                                                         d_hidden=8))
    stream = StreamBytes(gpt_gradient_stream(GPTMoE(cfg)), {"world": 2, "dense_dp": 2, "expert_dp": 2})
    zero = L(0.0, 0.0)
    ops = {"a2a": zero, "ag": zero, "rs": zero, "gar": gar, "expert_fwd": zero, "expert_bwd": zero,
           "gate_fwd": zero, "gate_bwd": zero, "dense_fwd": L(0.0, 1.0), "dense_bwd": L(0.0, 1.0)}
    blocks = (BlockWork(moe=False, n_attn=1.0, n_mlp=1.0), BlockWork(moe=True, n_attn=1.0, n_mlp=0.0))
    table = LayerTable(pairs=((1, 1),), fwd_s=(2.0,), bwd=(response or GarResponse(a_s=5.0, b_s=1.0),))
    costs = Costs(ops=ops, busy={"gar": busy} if busy else {}, beside={"gar": sigma})
    return StepModel(spec=get_schedule("fsmoe"), blocks=blocks, tables=[table], gate_n=[0.0], head_n=0.0,
                     costs=costs, stream=stream)


def test_step_walk_with_compute_slowed_beside_the_gar() -> None:
    """The walk above with σ = 2 for the GAR: 1000 B at dense:0 occupy the link for 1 s from 7 s while
    block 0's attention (1 s) runs beside it at half speed: 1.5 s; the tail (12408 B) follows at 8.5 s.
    In the MoE block, the slice slows the path around it as its GarResponse says (w = 1/2 after a 0.5 s
    lead, at most cover_s): 64 B = 0.064 s at moe:1 leave it at 5; at 0.1 s per byte, 6.4 s make it 6.5."""
    one_range = np.array([[0, 0, 1000, 0]])
    assert _walk(L(0.0, 1e-3)).run(fixed=one_range)["bwd_s"][0] == pytest.approx(7 + 1 + 12.408)
    assert _walk(L(0.0, 1e-3), sigma=2.0).run(fixed=one_range)["bwd_s"][0] == pytest.approx(7 + 1.5 + 12.408)
    slowed = _walk(L(0.0, 1e-3), sigma=2.0, response=GarResponse(a_s=5.0, b_s=1.0, slow=0.5, lead_s=0.5, cover_s=8.0))
    short = slowed.run(fixed=np.array([[64, 0, 0, 0]]))  # 0.064 s: within the lead, nothing slowed
    assert (short["gar"][0, 0], short["bwd"][0, 0]) == (pytest.approx(0.064), 5.0)
    # 64 B take 6.4 s: 5 + 0.5·min(6.4 − 0.5, 3) = 6.5 > B + 6.4 = 5.4
    capped = _walk(L(0.0, 0.1), sigma=2.0, response=GarResponse(a_s=5.0, b_s=-1.0, slow=0.5, lead_s=0.5, cover_s=3.0))
    assert capped.run(fixed=np.array([[64, 0, 0, 0]]))["bwd"][0, 0] == pytest.approx(6.5)


def test_step_walk_dense_range_past_its_compute_runs_at_idle_speed() -> None:
    """The walk above with the GAR measured 3× slower beside compute (busy line 3 ms per byte): 3680 B
    launched at dense:0 at 7 s have block 0's attention (1 s) beside them, then nothing — the link is
    the last user. Rate model: 1/3 of idle speed for 1 s (333.3 B), the other 3346.7 B at 1 ms per byte:
    4.3467 s, not the 11.04 s of the busy line throughout; the tail (9728 B) follows on the idle line.
    A range that fits inside its compute window costs its busy time: 300 B at dense:0 take 0.9 s."""
    model = _walk(L(0.0, 1e-3), busy=L(0.0, 3e-3))
    late = model.run(fixed=np.array([[0, 0, 3680, 0]]))
    assert late["bwd_s"][0] == pytest.approx(7 + (1 + 3.68 - 1 / 3) + 9.728)
    inside = model.run(fixed=np.array([[0, 0, 300, 0]]))  # link busy 7 → 7.9 beside the attention (7 → 8)
    assert inside["bwd_s"][0] == pytest.approx(8 + (13.408 - 0.3))


def test_plan_job_takes_the_default_plan_when_it_is_predicted_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's default (greedy at the best common degree) is a candidate beside the partition: with
    a partition that launches nothing inside the backward, the default plan wins and is what the job runs
    (a GAR with no start-up cost: launching every range as soon as it is ready hides it best)."""
    import fsmoe.perf.planner as planner

    job = small_job()
    costs = dataclasses.replace(COSTS["compute"], ops={**COSTS["compute"].ops, "gar": L(0.0, 2e-8)})
    stream = StreamBytes(rank_stream(job), replica_sizes(job.parallel))
    default = planner.predict_schedule(get_schedule("fsmoe"), job, layer_work(job), costs, rank_stream(job), stream)
    assert plan_job(job, costs).step_s < default.step_s  # the real partition beats the default here

    def nothing_inside(model: StepModel, *, seed: int = 0) -> object:
        return model.predict(model.run(fixed=np.zeros((1, len(model.stream.slots)))), method="none")

    monkeypatch.setattr(planner, "partition", nothing_inside)
    plan = plan_job(job, costs)
    assert plan.partition.startswith("default (greedy at r = ")
    assert plan.step_s == pytest.approx(default.step_s, rel=1e-12) and plan.degrees == default.pairs
    assert plan.gradient_plan == default.gradient_plan() and plan.gar_plan != "after"


def test_gar_slice_duration_by_hand() -> None:
    """The slice's rate-model duration at its slot: idle 6.4 s, busy 19.2 s (κ = 3), 0.5 s before the
    compute, 2 s of compute after that: 0.5 s at full speed, 2 s at a third (2/3 s of its work), then the
    other 5.9 − 2/3 s at full speed: 7.7333 s. Within the lead: its idle time; no compute: idle too."""
    g = GarResponse(a_s=5.0, b_s=1.0, lead_s=0.5, beside_s=2.0)
    assert g.slice_s(6.4, 19.2) == pytest.approx(0.5 + 2.0 + 5.9 - 2.0 / 3)
    assert g.slice_s(0.4, 1.2) == 0.4
    assert g.slice_s(1.0, 2.0) == pytest.approx(0.5 + 1.0)  # all of the rest beside compute: 0.5·κ = 1 s
    assert GarResponse(a_s=5.0, b_s=1.0).slice_s(1.0, 10.0) == 1.0
    slowing = GarResponse(a_s=5.0, b_s=1.0, slow=0.5, lead_s=0.5, cover_s=4.0, beside_s=2.0)  # σ = 2
    assert slowing.overlap_s == 4.0 and slowing.slice_s(6.4, 19.2) == pytest.approx(0.5 + 4.0 + 5.9 - 4.0 / 3)
    # batched, the same cases (and nothing to send: 0)
    cases = [(6.4, 19.2, 0.5, 2.0), (0.4, 1.2, 0.5, 2.0), (1.0, 2.0, 0.5, 2.0), (1.0, 10.0, 0.0, 0.0),
             (6.4, 19.2, 0.5, 4.0), (0.0, 0.0, 0.0, 1.0)]
    got = slice_durations(*(np.array(col) for col in zip(*cases, strict=True)))
    assert got.tolist() == pytest.approx([0.5 + 2.0 + 5.9 - 2.0 / 3, 0.4, 1.5, 1.0, 0.5 + 4.0 + 5.9 - 4.0 / 3, 0.0])


def test_step_walk_moe_slice_at_its_rate_model_duration() -> None:
    """The walk's MoE slot with a contended slice: 64 B at 0.1 s per byte alone, 0.3 s beside compute
    (κ = 3); the block's response has 0.5 s before its compute and 2 s of it after the slot: the slice
    takes 7.7333 s (test above), and the block max(5, 1 + 7.7333)."""
    model = _walk(L(0.0, 0.1), busy=L(0.0, 0.3), response=GarResponse(a_s=5.0, b_s=1.0, lead_s=0.5, beside_s=2.0))
    out = model.run(fixed=np.array([[64, 0, 0, 0]]))
    slice_s = 0.5 + 2.0 + 5.9 - 2.0 / 3
    assert out["gar"][0, 0] == pytest.approx(slice_s) and out["bwd"][0, 0] == pytest.approx(1.0 + slice_s)


def test_plan_layer_plays_the_slice_at_each_pairs_rate_model_duration() -> None:
    """Taking the busy line (10× idle) for the slice's duration, a compute-bound layer's 2 ms GAR goes after
    the backward; with its idle time given, each pair gets the slice beside its own compute
    (GarResponse.slice_s) and it stays inside, the plan's slice and backward that pair's."""
    costs, idle = COSTS["compute"], 2e-3
    busy_only = plan_layer("fsmoe", WORK, costs, t_gar=10 * idle, t_gar_after=idle)
    assert busy_only.gar_after_s == idle and busy_only.gar_s == 0.0
    rated = plan_layer("fsmoe", WORK, costs, t_gar=10 * idle, t_gar_after=idle, t_gar_idle=idle)
    assert rated.gar_after_s == 0.0 and idle < rated.gar_s < 10 * idle
    table = layer_table(get_schedule("fsmoe"), WORK, costs, degree_pairs(get_schedule("fsmoe"), 8))
    slices = [g.slice_s(idle, 10 * idle) for g in table.bwd]
    best = min(range(len(table.pairs)), key=lambda k: (table.total_s(k, slices[k]), k))
    assert (rated.r_fwd, rated.r_bwd) == table.pairs[best] and rated.gar_s == pytest.approx(slices[best])
    assert rated.total_s == pytest.approx(table.total_s(best, slices[best]))
    assert rated.total_s < busy_only.total_s


def test_plan_layer_moves_the_gar_after_when_that_is_faster() -> None:
    """With t_gar_after the plan compares the best pair with the slice inside against the best without
    it plus the GAR after the backward. Compute bound at r = 1 (window ≈ 5.4 ms): a 2 ms slice (1 ms
    alone) hides inside; with σ = 10 it slows the experts by 0.9 × its overlap, ≈ 1.7 ms > 1 ms after."""
    costs = COSTS["compute"]
    t_in, t_after = 2e-3, 1e-3
    inside = plan_layer("fsmoe", WORK, costs, t_gar=t_in, t_gar_after=t_after)
    assert inside.gar_after_s == 0 and inside.gar_s == t_in  # hidden beside the experts: stays inside
    assert inside == plan_layer("fsmoe", WORK, costs, t_gar=t_in)
    slow = dataclasses.replace(costs, beside={"gar": 10.0})
    moved = plan_layer("fsmoe", WORK, slow, t_gar=t_in, t_gar_after=t_after)
    assert (moved.gar_s, moved.gar_after_s) == (0.0, t_after)
    alone = plan_layer("fsmoe", WORK, slow)
    assert (moved.r_fwd, moved.r_bwd) == (alone.r_fwd, alone.r_bwd)
    assert moved.total_s == pytest.approx(alone.fwd_s + alone.bwd_s + t_after)
    kept = plan_layer("fsmoe", WORK, slow, t_gar=t_in)  # not offered: the slice stays inside, slowed
    assert kept.gar_after_s == 0 and kept.total_s > moved.total_s
    assert plan_layer("tutel", WORK, slow, t_gar=t_in, t_gar_after=t_after).gar_after_s == 0  # no slot: no choice
    # the prediction of the moved layer puts the GAR after the backward on the idle line
    pred = predict_layer("fsmoe", WORK, slow, moved.r_fwd, moved.r_bwd, gar_bytes=1000, gar_after=True)
    assert pred.gar_after_s == costs.op("gar")(1000) and pred.bwd_s == predict_layer(
        "fsmoe", WORK, slow, moved.r_fwd, moved.r_bwd).bwd_s


@pytest.mark.parametrize("name", list(COSTS))
def test_plan_layer_with_slowed_compute_is_the_brute_force_argmin(name: str) -> None:
    slowed = dataclasses.replace(COSTS[name], beside={"a2a": 1.6, "ag": 1.3, "rs": 1.3})
    times = brute_force("fsmoe", WORK, slowed, 0.0)
    lp = plan_layer("fsmoe", WORK, slowed)
    assert times[(lp.r_fwd, lp.r_bwd)] == pytest.approx(min(times.values()), rel=1e-12)
    assert min(times.values()) >= min(brute_force("fsmoe", WORK, COSTS[name], 0.0).values())


@pytest.mark.parametrize("name", list(COSTS))
@pytest.mark.parametrize("spec", ["fsmoe", "fsmoe_no_iio"])
def test_partition_respects_readiness_and_never_loses(name: str, spec: str) -> None:
    job = small_job()
    costs = dataclasses.replace(COSTS[name], ops={**COSTS[name].ops, "gar": L(1e-4, 5e-8)})
    plan = plan_job(job, costs, schedule=spec)
    layout = rank_stream(job)
    PlannedGradSync(layout, plan.gradient_plan, None)  # raises if a range launches an unready gradient
    assert parse_plan(plan.gar_plan, layout) == plan.gradient_plan
    ready = layout.ready_bytes()
    launched = 0
    for slot, n in plan.slot_bytes:
        launched += n
        assert launched <= ready[slot]
    assert launched == layout.total_bytes and dict(plan.slot_bytes)[TAIL] >= 0
    stream = StreamBytes(layout, replica_sizes(job.parallel))  # the model plan_job partitions over
    model = step_model(get_schedule(spec), job, layer_work(job), costs, stream, pairs=degree_pairs(get_schedule(spec)))
    unpartitioned = model.run(fixed=np.zeros((1, len(layout.slots))))["step_s"][0]
    step1 = model.run(tau=np.zeros((1, model.n_moe)))["step_s"][0]
    assert plan.step_s <= unpartitioned * (1 + 1e-12) and plan.step_s <= step1 * (1 + 1e-12)
    assert partition(model).step_s == plan.step_s  # deterministic


def test_job_plan_outputs() -> None:
    job = small_job()
    plan = plan_job(job, COSTS["mixed"])
    assert len(plan.layers) == job.model.num_moe_layers == len(plan.degrees) == 2
    assert [lp.block for lp in plan.layers] == [1, 3]
    assert {p.schedule for p in plan.predictions} == {"sequential", "tutel", "tutel_improved", "lina",
                                                       "fsmoe_no_iio", "fsmoe"}
    data = plan.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False))["degrees"] == [list(d) for d in plan.degrees]
    text = plan.explain()
    assert "bottleneck" in text and all(name in text for name in ("sequential", "fsmoe_no_iio", "lina"))
    assert plan.step_s == plan.prediction("fsmoe").step_s
    with pytest.raises(KeyError, match="no prediction for schedule 'deepspeed'"):
        plan.prediction("deepspeed")


def test_a_plan_within_min_gain_of_the_plain_one_gives_way_to_it() -> None:
    """The plain plan: r = 1 in every layer, nothing all-reduced inside the backward (``after``). A plan
    predicted faster by less than ``min_gain`` is replaced by it, its prediction played by the step model."""
    job = small_job()
    costs = COSTS["compute"]
    planned = plan_job(job, costs)
    plain = plan_job(job, costs, min_gain=0.99)
    assert planned.degrees != plain.degrees or planned.gar_plan != "after"  # the test compares two plans
    assert plain.degrees == ((1, 1), (1, 1)) and plain.gar_plan == "after" and plain.gradient_plan == GradientPlan()
    assert plain.partition.startswith("plain") and "min_gain 99%" in plain.partition
    gain = plain.step_s / planned.step_s - 1
    assert 0 < gain < 0.99
    assert plan_job(job, costs, min_gain=gain * 0.99).degrees == planned.degrees  # a gain above it: kept
    assert plan_job(job, costs, min_gain=gain * 1.01).degrees == ((1, 1), (1, 1))
    stream = StreamBytes(rank_stream(job), replica_sizes(job.parallel))
    flat = step_model(get_schedule("fsmoe"), job, layer_work(job), costs, stream, pairs=((1, 1),))
    assert plain.step_s == pytest.approx(flat.run(fixed=np.zeros((1, len(stream.slots))))["step_s"][0], rel=1e-12)


def test_a_job_plan_lists_the_other_plans_it_weighed() -> None:
    """``alternatives``: the plans weighed for the planned schedule (its partition, the plain one, the
    trainer's default at every common degree) that run differently from the chosen one and from each
    other; those at other degrees first, each part fastest modelled first. The measured check times
    the first of them. With the plain plan chosen (min_gain), the planned one is among them; with it not
    chosen, the plain one is."""
    job = small_job()
    costs = COSTS["compute"]
    for plan in (plan_job(job, costs), plan_job(job, costs, min_gain=0.99)):
        chosen = plan.prediction("fsmoe")
        runs = [(p.pairs, p.gradient_plan()) for p in (chosen, *plan.alternatives)]
        assert len(set(runs)) == len(runs) >= 2
        other = [p for p in plan.alternatives if p.pairs != chosen.pairs]
        same = [p for p in plan.alternatives if p.pairs == chosen.pairs]
        assert list(plan.alternatives) == other + same
        for part in (other, same):
            assert [p.step_s for p in part] == sorted(p.step_s for p in part)
        common = {p.pairs for p in plan.alternatives} | {chosen.pairs}
        assert all(((r, r),) * 2 in common for r in (1, 2, 4, 8))  # every common degree was weighed
        assert json.loads(json.dumps(plan.to_dict()))["alternatives"][0]["degrees"] == [
            list(d) for d in plan.alternatives[0].pairs]
    planned, plain = plan_job(job, costs), plan_job(job, costs, min_gain=0.99)
    assert ((1, 1), (1, 1)) in [p.pairs for p in planned.alternatives]
    assert any(p.pairs == planned.degrees and p.gradient_plan() == planned.gradient_plan
               for p in plain.alternatives)
    assert plan_job(job, costs, schedule="tutel").alternatives == ()  # not planned: nothing weighed


def test_plan_layer_min_gain() -> None:
    balanced = make_costs(a2a=L(1e-5, 1e-8), ag=L(1e-5, 1e-9), exp=L(1e-5, 2e-10))  # pipelining pays
    best = plan_layer("fsmoe", WORK, balanced, t_gar=1e-4, t_gar_after=1e-4)
    assert (best.r_fwd, best.r_bwd) != (1, 1)
    plain = plan_layer("fsmoe", WORK, balanced, t_gar=1e-4, t_gar_after=1e-4, min_gain=0.99)
    assert (plain.r_fwd, plain.r_bwd, plain.gar_s, plain.gar_after_s) == (1, 1, 0.0, 1e-4)
    gain = plain.total_s / best.total_s - 1
    assert plan_layer("fsmoe", WORK, balanced, t_gar=1e-4, t_gar_after=1e-4, min_gain=gain * 0.99) == best
    # without the GAR-after option the plain plan keeps the slice inside
    inside = plan_layer("fsmoe", WORK, balanced, t_gar=1e-4, min_gain=0.99)
    assert (inside.r_fwd, inside.r_bwd, inside.gar_s, inside.gar_after_s) == (1, 1, 1e-4, 0.0)


def test_predict_layer_places_the_gar_as_the_schedule_does() -> None:
    costs = dataclasses.replace(COSTS["mixed"], ops={**COSTS["mixed"].ops, "gar": L(1e-4, 1e-8)})
    gar_bytes = 2**20
    w = WORK.padded(4)
    gate = costs.op("gate_fwd")(w.n_gate), costs.op("gate_bwd")(w.n_gate)
    fs = predict_layer("fsmoe", WORK, costs, 4, 2, gar_bytes=gar_bytes)
    t_gar = costs.op("gar", busy=True)(gar_bytes)
    assert fs.fwd_s == pytest.approx(gate[0] + play_pass(get_schedule("fsmoe"), w, costs, 4, backward=False).makespan_s)
    bwd = play_pass(get_schedule("fsmoe"), w, costs, 2, backward=True, t_gar=t_gar,
                    t_gar_idle=costs.op("gar")(gar_bytes))
    assert fs.bwd_s == pytest.approx(gate[1] + bwd.makespan_s)
    assert fs.gar_after_s == 0.0
    tu = predict_layer("tutel", WORK, costs, 4, 4, gar_bytes=gar_bytes)
    assert tu.gar_after_s == pytest.approx(costs.op("gar")(gar_bytes))
    assert tu.total_s == pytest.approx(tu.fwd_s + tu.bwd_s + tu.gar_after_s)


def test_timelines_export_predicted_trace_events() -> None:
    played = play_pass(get_schedule("fsmoe"), WORK, COSTS["mixed"], 2, backward=False)
    events = played.trace_events(rank=3, start_s=1.0)
    assert [e.name for e in events] == [s.name for s in played.spans]
    assert {e.channel for e in events} == {"predicted:compute", "predicted:inter", "predicted:intra"}
    assert events[0].start_s == 1.0 and all(e.rank == 3 for e in events)
