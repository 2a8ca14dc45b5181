"""The scale study: the inter-node lines' growth by hand, weak scaling's fixed work per GPU, and the stop rule."""

from __future__ import annotations

import pytest

from fsmoe.sim.engine import LayerBatch
from fsmoe.sim.presets import model_preset, paper_layout
from fsmoe.sim.presets import testbed_a as tb_a
from fsmoe.sim.scale import STOP_EFFICIENCY, at_nodes, bottleneck, channel_times, scale_study


def test_inter_node_lines_grow_as_pairwise_and_ring_collectives() -> None:
    """Testbed-A has 6 nodes; at 11 nodes α grows by (11−1)/(6−1) = 2 and β by (10/11)/(5/6) = 12/11."""
    a = tb_a()
    big = at_nodes(a, 11)
    for op in ("a2a", "gar"):
        assert big.costs.op(op).alpha_s == pytest.approx(2 * a.costs.op(op).alpha_s)
        assert big.costs.op(op).beta_s == pytest.approx(12 / 11 * a.costs.op(op).beta_s)
    for op in ("ag", "rs", "expert_fwd", "dense_bwd"):
        assert big.costs.op(op) == a.costs.op(op)
    assert at_nodes(a, 6).costs.ops == a.costs.ops and big.world == 88
    with pytest.raises(ValueError, match="between >= 2 nodes, got 6 -> 1"):
        at_nodes(a, 1)


def test_weak_scaling_keeps_the_work_per_gpu() -> None:
    """T per rank is fixed and E·C = E·ceil(k·f·T/E) stays k·f·T up to rounding (< E slots)."""
    study = scale_study(tb_a, "mixtral-8x7b", gpus=(32, 64), schedules=("tutel", "fsmoe"))
    for p in study.points:
        c = at_nodes(tb_a(), p.gpus // 8)
        lay = paper_layout(c, model_preset("mixtral-8x7b", c))
        one = LayerBatch.of_layout(lay)
        assert (lay.tokens, lay.experts) == (128, p.gpus // 8)
        assert 0 <= one.experts[0] * one.capacity_gate[0] - 2 * 1.2 * 128 < lay.experts
    t = [p.run("fsmoe").iteration_s for p in study.points]
    assert t[1] > t[0]  # more nodes: longer inter-node collectives
    assert study.efficiency("fsmoe") == pytest.approx([1.0, t[0] / t[1]])
    with pytest.raises(ValueError, match=r"GPU counts \[12\] are not >= 2 whole nodes of 8 GPUs"):
        scale_study(tb_a, "mixtral-8x7b", gpus=(16, 12))


def test_stop_point_and_bottleneck() -> None:
    study = scale_study(tb_a, "mixtral-8x7b", gpus=(16, 32, 1024), schedules=("fsmoe",))
    eff = study.efficiency("fsmoe")
    stop = study.stops_at("fsmoe")
    assert stop == next(g for g, e in zip((16, 32, 1024), eff, strict=True) if e < STOP_EFFICIENCY)
    run = study.points[-1].run("fsmoe")
    times = channel_times(run)
    assert bottleneck(run) == max(times, key=times.get) == "inter"
    assert sum(times.values()) == pytest.approx(sum(v for k, v in run.breakdown_s.items()
                                                     if k not in ("gar_exposed",)))
    assert "stops at" in study.text()
