"""Cluster and model presets: the paper's constants in our units, validation with the numbers named."""

from __future__ import annotations

import json

import pytest

from fsmoe.perf.costs import Costs, Linear
from fsmoe.sim import presets
from fsmoe.sim.presets import testbed_a as tb_a
from fsmoe.sim.presets import testbed_b as tb_b


def test_testbed_a_converts_the_papers_ms_and_elements_and_fixes_the_swap() -> None:
    c = tb_a()
    assert (c.nodes, c.gpus_per_node, c.world, c.mp) == (6, 8, 48, 8)
    a2a, ag = c.costs.op("a2a"), c.costs.op("ag")
    assert a2a.alpha_s == pytest.approx(0.287e-3)
    assert a2a.beta_s == pytest.approx(2.32e-6 * 1e-3 / 4)  # ms per fp32 element -> s per byte
    assert ag.beta_s == pytest.approx(2.21e-7 * 1e-3 / 4)
    assert a2a.beta_s > 5 * ag.beta_s  # IB AlltoAll ~10x slower per element than NVLink AllGather
    assert c.costs.op("gar").beta_s == pytest.approx(4.95e-6 * 1e-3 / 4)
    assert c.costs.op("expert_fwd").beta_s == pytest.approx(2.29e-11 * 1e-3)  # per MAC
    assert c.costs.op("expert_bwd").beta_s == pytest.approx(2 * 2.29e-11 * 1e-3)


def test_testbed_b_and_the_expert_gemm_count() -> None:
    c = tb_b()
    assert (c.nodes, c.gpus_per_node, c.mp) == (8, 4, 4)
    assert c.costs.op("ag").beta_s == pytest.approx(1.68e-7 * 1e-3 / 4)
    three = c.costs_for(3)
    assert three.op("expert_fwd").alpha_s == pytest.approx(3 * 9.24e-2 * 1e-3)
    assert three.op("expert_fwd").beta_s == c.costs.op("expert_fwd").beta_s
    assert three.op("a2a") == c.costs.op("a2a")


def test_dgx_h100_is_derived_and_faster_than_the_testbeds() -> None:
    h = presets.dgx_h100()
    assert "derived" in h.source and h.gpus_per_node == 8
    assert h.costs.op("a2a").beta_s < tb_a().costs.op("a2a").beta_s
    assert h.costs.op("ag").beta_s < h.costs.op("a2a").beta_s
    assert set(presets.CLUSTERS) == {"testbed-a", "testbed-b", "dgx-h100"}
    with pytest.raises(ValueError, match="unknown cluster 'x'; choose from testbed-a"):
        presets.cluster_preset("x")


def _costs() -> Costs:
    line = Linear(alpha_s=1e-4, beta_s=1e-9, r2=0.99)
    return Costs(ops={op: line for op in ("a2a", "ag", "rs", "gar", "expert_fwd", "expert_bwd", "gate_fwd",
                                          "gate_bwd", "dense_fwd", "dense_bwd")}, meta={"host": "here"})


def test_profile_cache_entry_loads(tmp_path) -> None:
    entry = tmp_path / "profile-0123.json"
    entry.write_text(json.dumps({"key": {"nproc": 4}, "costs": _costs().to_dict()}))
    costs = presets.load_profile_costs(entry)
    assert costs.op("a2a") == Linear(alpha_s=1e-4, beta_s=1e-9, r2=0.99)
    assert costs.meta["host"] == "here" and costs.meta["profile"] == str(entry)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(_costs().to_dict()))
    assert presets.load_profile_costs(bare).ops == costs.ops
    c = presets.profiled(entry, nodes=2, gpus_per_node=2, mp=2, gemms=2)
    assert c.world == 4 and c.costs.op("expert_fwd").alpha_s == pytest.approx(0.5e-4)
    assert c.costs.op("dense_fwd").beta_s == pytest.approx(0.25e-9)


def test_bad_profile_files_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read a costs record"):
        presets.load_profile_costs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"costs": {"ops": {"a2a": {"alpha_s": 0, "beta_s": 0}}}}))
    with pytest.raises(ValueError, match="no model for ag"):
        presets.load_profile_costs(bad)


@pytest.mark.parametrize("cluster", [tb_a(), tb_b()])
@pytest.mark.parametrize("name", sorted(presets.MODELS))
def test_model_presets_sit_on_the_papers_layout(cluster: presets.Cluster, name: str) -> None:
    model = presets.model_preset(name, cluster)
    lay = presets.paper_layout(cluster, model)
    assert lay.experts == lay.ep == cluster.nodes and lay.esp == lay.mp == cluster.mp
    assert model.seq_len == (1024 if cluster.name == "testbed-a" else 256) and model.batch == 1
    assert model.top_k == 2 and model.capacity_factor == 1.2
    assert lay.tokens == model.seq_len // cluster.mp


def test_model_sizes() -> None:
    a = tb_a()
    m7, m22, gpt = (presets.model_preset(name, a) for name in ("mixtral-8x7b", "mixtral-8x22b", "gpt2-xl-moe"))
    assert (m7.n_layers, m7.d_model, m7.d_hidden, m7.gemms, m7.n_kv_heads) == (7, 4096, 14336, 3, 8)
    assert (m22.n_layers, m22.d_model, m22.d_hidden) == (33, 6144, 16384)
    assert (gpt.n_layers, gpt.d_model, gpt.d_hidden, gpt.gemms) == (48, 1600, 6400, 2)
    D = 4096  # Mixtral: GQA QKV 1.5·D²/mp + output D²/mp (digest §5.2)
    assert m7.dense_grad_elems(8) == pytest.approx(1.5 * D * D / 8 + D * D / 8)
    D = 1600
    assert gpt.dense_grad_elems(8) == pytest.approx(3 * D * D / 8 + 3 * D / 8 + D * D / 8 + D)
    with pytest.raises(ValueError, match="unknown model 'gpt3'; choose from gpt2-xl-moe"):
        presets.model_preset("gpt3", a)


def test_layouts_that_do_not_fit_name_the_numbers() -> None:
    a = tb_a()
    m = presets.model_preset("mixtral-8x7b", a)
    with pytest.raises(ValueError, match="E=5 experts do not split over EP=6"):
        presets.paper_layout(a, m, experts=5)
    with pytest.raises(ValueError, match="esp=3 must divide procs_per_node=8"):
        presets.Layout(cluster=a, model=m, experts=6, ep=6, esp=3, mp=8)
    with pytest.raises(ValueError, match="ep=5 \\* esp=8 = 40 and world_size=48"):
        presets.Layout(cluster=a, model=m, experts=10, ep=5, esp=8, mp=8)
    odd = presets.model_preset("gpt2-xl-moe", a).__class__(name="odd", n_layers=2, d_model=1600, n_heads=25,
                                                   n_kv_heads=25, d_hidden=6400, gemms=2, seq_len=1024)
    with pytest.raises(ValueError, match="n_heads=25 is not divisible by MP=8"):
        presets.paper_layout(a, odd)
    with pytest.raises(ValueError, match="mp=3 must divide gpus_per_node=8"):
        presets.Cluster(name="x", nodes=2, gpus_per_node=8, costs=a.costs, mp=3, source="test")
    with pytest.raises(ValueError, match="gemms must be 2 \\(FFN\\) or 3 \\(SwiGLU\\), got 4"):
        odd.__class__(name="y", n_layers=1, d_model=8, n_heads=1, n_kv_heads=1, d_hidden=8, gemms=4, seq_len=8)
