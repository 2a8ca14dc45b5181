"""The simulated iteration as trace events: a two-block model whose every task length is chosen by hand (α only,
β = 0), so every start and end is worked out below; and on the paper's presets the last event ends exactly at
the simulated iteration time under every schedule."""

from __future__ import annotations

import json

import pytest

from fsmoe.config import SCHEDULES
from fsmoe.perf.costs import Costs, Linear
from fsmoe.schedule.runtime import chrome_trace
from fsmoe.sim.presets import Cluster, SimModel, model_preset, paper_layout
from fsmoe.sim.presets import testbed_a as tb_a
from fsmoe.sim.presets import testbed_b as tb_b
from fsmoe.sim.simulator import simulate
from fsmoe.sim.timeline import iteration_events


def _alpha(a: float) -> Linear:
    return Linear(alpha_s=a, beta_s=0.0)


# Every chunk's AlltoAll takes 1 s; an expert GEMM 1 s forward (2 GEMMs: 2 s), 2 s backward (4 s); the gate
# 0.5 s / 1 s; the attention 4 GEMM launches of 0.25 s / 0.5 s (1 s / 2 s); the GAR 3 s. With β = 0 more
# chunks only add α, so every schedule runs r = 1.
TOY_COSTS = Costs(ops={"a2a": _alpha(1.0), "ag": _alpha(1.0), "rs": _alpha(1.0), "gar": _alpha(3.0),
                       "expert_fwd": _alpha(1.0), "expert_bwd": _alpha(2.0), "gate_fwd": _alpha(0.5),
                       "gate_bwd": _alpha(1.0), "dense_fwd": _alpha(0.25), "dense_bwd": _alpha(0.5)})
# 2 nodes x 1 GPU: EP = 2 (AlltoAll), ESP = MP = 1 (no AllGather/ReduceScatter, no MP collectives).
TOY = paper_layout(Cluster(name="toy", nodes=2, gpus_per_node=1, costs=TOY_COSTS, mp=1, source="test"),
                   SimModel(name="toy", n_layers=2, d_model=8, n_heads=1, n_kv_heads=1, d_hidden=8, gemms=2, seq_len=8))

FORWARD = [("b0 attention", "compute", 0, 1), ("b0 gate+order", "compute", 1, 1.5),
           ("b0 dispatch[0]", "inter", 1.5, 2.5), ("b0 expert[0]", "compute", 2.5, 4.5),
           ("b0 combine[0]", "inter", 4.5, 5.5), ("b1 attention", "compute", 5.5, 6.5),
           ("b1 gate+order", "compute", 6.5, 7), ("b1 dispatch[0]", "inter", 7, 8),
           ("b1 expert[0]", "compute", 8, 10), ("b1 combine[0]", "inter", 10, 11)]
BACKWARD_TOP = [("b1 combine_bwd[0]", "inter", 11, 12), ("b1 expert_bwd[0]", "compute", 12, 16),
                ("b1 dispatch_bwd[0]", "inter", 16, 17), ("b1 gate+i-order bwd", "compute", 17, 18),
                ("b1 attention bwd", "compute", 18, 20)]
BLOCK0_BACKWARD = [("b0 combine_bwd[0]", "inter", 20, 21), ("b0 expert_bwd[0]", "compute", 21, 25),
                   ("b0 dispatch_bwd[0]", "inter", 25, 26), ("b0 gate+i-order bwd", "compute", 26, 27),
                   ("b0 attention bwd", "compute", 27, 29)]


def _spans(schedule: str) -> list[tuple[str, str, float, float]]:
    return [(e.name, e.channel, e.start_s, e.end_s) for e in iteration_events(TOY, schedule)]


@pytest.mark.parametrize(("schedule", "gar", "total"), [
    # block 1's gradient after block 0's backward, exposed: [29, 32]; block 0's own after it: [32, 35]
    ("sequential", [("gar b1", "inter", 29, 32), ("gar b0", "inter", 32, 35)], 35),
    ("tutel", [("gar b1", "inter", 29, 32), ("gar b0", "inter", 32, 35)], 35),
    # beside block 0's dense backward (3 s window, [26, 29]): hidden
    ("tutel_improved", [("gar b1", "inter", 26, 29), ("gar b0", "inter", 29, 32)], 32),
    ("fsmoe", [("gar b1", "inter", 26, 29), ("gar b0", "inter", 29, 32)], 32),
])
def test_toy_timeline_by_hand(schedule: str, gar: list, total: float) -> None:
    expected = FORWARD + BACKWARD_TOP + BLOCK0_BACKWARD + gar
    assert sorted(_spans(schedule), key=lambda s: (s[2], s[0])) == sorted(expected, key=lambda s: (s[2], s[0]))
    assert simulate(TOY, [schedule]).run(schedule).iteration_s == pytest.approx(total)


def test_lina_puts_the_gradient_in_the_moe_backward_by_hand() -> None:
    """Lina: block 1's gradient in block 0's MoE backward, after the last combine_bwd on the inter lane
    [21, 24]; dispatch_bwd waits for the expert (25): nothing moves, 32 s in all."""
    spans = _spans("lina")
    assert ("b0 gar[0]", "inter", 21, 24) in spans
    assert ("b0 dispatch_bwd[0]", "inter", 25, 26) in spans
    assert ("gar b0", "inter", 29, 32) in spans and max(s[3] for s in spans) == 32


@pytest.mark.parametrize("cluster", [tb_a(), tb_b()], ids=["A", "B"])
@pytest.mark.parametrize("model", ["gpt2-xl-moe", "mixtral-8x7b"])
def test_the_timeline_ends_at_the_simulated_iteration(cluster: Cluster, model: str) -> None:
    lay = paper_layout(cluster, model_preset(model, cluster))
    sim = simulate(lay)
    for run in sim.runs:
        events = iteration_events(lay, run.schedule)
        assert max(e.end_s for e in events) == pytest.approx(run.iteration_s, rel=1e-12)
        for lane in ("compute", "intra", "inter") if run.schedule in ("fsmoe", "lina", "sequential") else ("compute",):
            spans = sorted((e.start_s, e.end_s) for e in events if e.channel == lane)
            assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False)), (run.schedule, lane)
    assert {e.channel for e in iteration_events(lay, "fsmoe")} == {"compute", "intra", "inter"}
    assert set(SCHEDULES) == {r.schedule for r in sim.runs}


def test_the_trace_is_the_runtimes_chrome_format(tmp_path) -> None:
    path = tmp_path / "sim.json"
    chrome_trace(iteration_events(TOY, "fsmoe"), str(path))
    events = json.loads(path.read_text())["traceEvents"]
    first = min(events, key=lambda e: e["ts"])
    assert first == {"name": "b0 attention", "cat": "compute", "ph": "X", "pid": 0, "tid": "compute", "ts": 0.0,
                     "dur": 1e6}
    assert max(e["ts"] + e["dur"] for e in events) == pytest.approx(32e6)
