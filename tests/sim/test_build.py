"""From a job to the simulated layout: presets, resized clusters, profile files, the model's own sizes, and every
layout that cannot be held refused with the numbers named."""

from __future__ import annotations

import json

import pytest

from fsmoe.config import RECIPES, JobConfig
from fsmoe.perf.costs import Costs, Linear
from fsmoe.sim.build import sim_cluster, sim_layout
from fsmoe.sim.presets import model_preset
from fsmoe.sim.presets import testbed_b as tb_b
from fsmoe.sim.scale import at_nodes


def job(**overrides) -> JobConfig:
    return RECIPES["simulate"]().with_overrides(overrides)


def test_the_recipe_is_mixtral_8x7b_on_testbed_a_with_the_papers_settings() -> None:
    lay = sim_layout(job())
    assert (lay.cluster.name, lay.cluster.world, lay.experts, lay.ep, lay.esp, lay.mp) == ("testbed-a", 48, 6, 6, 8, 8)
    assert (lay.model.n_layers, lay.model.seq_len, lay.model.batch) == (7, 1024, 1)


def test_resizing_a_preset_keeps_mp_a_node() -> None:
    lay = sim_layout(job(**{"sim.cluster": "testbed-b", "sim.nodes": 2, "sim.gpus_per_node": 2}))
    assert (lay.cluster.world, lay.mp, lay.esp, lay.ep, lay.experts) == (4, 2, 2, 2, 2)
    assert lay.cluster.costs.ops == at_nodes(tb_b(), 2).costs.ops  # inter-node lines rescaled from 8 nodes
    assert lay.cluster.costs.op("ag") == tb_b().costs.op("ag")
    assert lay.model == model_preset("mixtral-8x7b", tb_b())
    h100 = sim_cluster(job(**{"sim.cluster": "dgx-h100", "sim.nodes": 16}).sim)
    assert (h100.nodes, h100.gpus_per_node, h100.mp) == (16, 8, 8)


def test_the_models_own_sizes_without_paper_settings() -> None:
    lay = sim_layout(job(**{"model.name": "mixtral-tiny", "sim.cluster": "testbed-b", "sim.nodes": 2,
                            "sim.gpus_per_node": 2}))
    m = lay.model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_hidden, m.gemms) == (4, 128, 4, 2, 192, 3)
    assert m.seq_len == 128
    assert (m.top_k, m.capacity_factor, lay.experts) == (2, 1.25, 4)
    mine = sim_layout(job(**{"sim.paper_settings": False, "sim.cluster": "testbed-b", "model.n_layers": 3}))
    assert (mine.model.n_layers, mine.model.seq_len, mine.experts, mine.ep, mine.mp) == (3, 4096, 8, 8, 4)
    assert mine.tokens == 4096 // 4


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model.name": "tiny"}, "tiny has moe_every=2 .* pass --moe-every 1"),
    ({"model.n_layers": 4}, "model flags change the preset mixtral-8x7b \\(n_layers\\).*--no-paper-settings"),
    ({"sim.paper_settings": False}, "E=8 experts do not split over EP=6"),
    ({"sim.cluster": "testbed-z"},
     "'testbed-z' is neither a preset \\(testbed-a, testbed-b, dgx-h100\\) nor a profile"),
    ({"sim.gpus_per_node": 3}, "H=14336 is not divisible by ESP=3"),
    ({"model.name": "mixtral-tiny", "sim.nodes": 2, "sim.gpus_per_node": 2, "model.seq_len": 127},
     "seq_len=127 is not divisible by MP=2"),
    ({"model.name": "mixtral-tiny", "sim.nodes": 3, "sim.gpus_per_node": 2}, "E=4 experts do not split over EP=3"),
    ({"model.name": "mixtral-tiny", "sim.nodes": 1, "sim.gpus_per_node": 8}, "n_heads=4 is not divisible by MP=8"),
])
def test_layouts_that_cannot_be_held_name_the_numbers(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sim_layout(job(**overrides))


def _profile(tmp_path, key: dict, skipped: dict | None = None) -> str:
    line = Linear(alpha_s=1e-4, beta_s=1e-9)
    costs = Costs(ops={op: line for op in ("a2a", "ag", "rs", "gar", "expert_fwd", "expert_bwd", "gate_fwd",
                                           "gate_bwd", "dense_fwd", "dense_bwd")}, busy={"a2a": line.scaled(2)},
                  meta={"skipped": skipped or {}})
    path = tmp_path / "profile-x.json"
    path.write_text(json.dumps({"key": key, "costs": costs.to_dict()}))
    return str(path)


def test_a_profile_file_brings_its_topology(tmp_path) -> None:
    path = _profile(tmp_path, {"topology": {"nodes": 2, "procs_per_node": 2}, "sizes": {"gemms": 2}})
    c = sim_cluster(job(**{"sim.cluster": path}).sim)
    assert (c.nodes, c.gpus_per_node, c.mp, c.name) == (2, 2, 2, "profiled")
    assert c.costs.op("expert_fwd").alpha_s == pytest.approx(0.5e-4)  # per GEMM
    assert c.costs.op("a2a", busy=True).beta_s == pytest.approx(2e-9)
    bare = _profile(tmp_path, {})
    with pytest.raises(ValueError, match="names no topology; give --nodes and --gpus-per-node"):
        sim_cluster(job(**{"sim.cluster": bare}).sim)
    c = sim_cluster(job(**{"sim.cluster": bare, "sim.nodes": 4, "sim.gpus_per_node": 1}).sim)
    assert c.world == 4


def test_what_a_profile_did_not_measure_is_not_played_for_free(tmp_path) -> None:
    topology = {"topology": {"nodes": 2, "procs_per_node": 2}, "sizes": {"gemms": 2}}
    path = _profile(tmp_path, topology, {"ag": "ESP = 1: no AllGather / ReduceScatter", "rs": "ESP = 1: no "
                                         "AllGather / ReduceScatter", "dense_fwd": "not measured (not in ops)"})
    with pytest.raises(ValueError, match=r"did not measure what this layout runs: dense_fwd \(not measured "
                                         r"\(not in ops\)\); ag \(ESP = 1: no AllGather / ReduceScatter\); rs"):
        sim_layout(job(**{"sim.cluster": path, "model.name": "mixtral-tiny"}))
    assert sim_layout(job(**{"sim.cluster": _profile(tmp_path, topology), "model.name": "mixtral-tiny"})).esp == 2
