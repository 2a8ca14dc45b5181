"""From a job to what the simulator plays: the described cluster (``sim`` section), the model's sizes
(``model`` and ``moe`` sections) and how the model sits on the cluster.

* Cluster (:func:`sim_cluster`): a preset of :data:`~fsmoe.sim.presets.CLUSTERS`, or the path of an
  ``fsmoe profile`` cache file (its topology read from the file's key). ``--nodes`` / ``--gpus-per-node``
  resize it; MP = ESP = the GPUs of one node, the paper's setting (digest §3.2), so a resized node
  changes MP too. A preset on another number of nodes (≥ 2) has its inter-node lines rescaled
  (:func:`fsmoe.sim.scale.at_nodes`); a profile's lines are taken as measured.
* Model (:func:`sim_model`): with ``paper_settings`` a paper preset (``gpt2-xl-moe``, ``mixtral-8x7b``,
  ``mixtral-8x22b``) takes the paper's settings on that cluster (:func:`~fsmoe.sim.presets.model_preset`:
  its layer count, L, B = 1, k = 2, f = 1.2; digest §6.5) and E = N_EP = nodes; otherwise the
  :class:`~fsmoe.config.ModelConfig`'s own sizes (layers, D, heads, KV heads, L, H, E, k, f, expert type)
  with B = 1. The simulator models blocks that are all MoE: a model with dense blocks (``moe_every`` > 1)
  is refused. The gate enters only through C (k, f); no gate has a cost of its own beyond its GEMM.
* Layout (:func:`sim_layout`): E experts over EP = world / MP, ESP = MP; every rule of
  :class:`~fsmoe.sim.presets.Layout` is checked there, each error naming the numbers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fsmoe.config import MODEL_PRESETS, JobConfig, ModelConfig, SimConfig
from fsmoe.perf.model import GEMMS
from fsmoe.sim.presets import (
    CLUSTERS,
    MODELS,
    Cluster,
    Layout,
    SimModel,
    cluster_preset,
    model_preset,
    paper_layout,
    profiled,
)
from fsmoe.sim.scale import at_nodes


def _profile_topology(path: Path) -> tuple[int | None, int | None, int]:
    """(nodes, procs per node, expert GEMMs) from an ``fsmoe profile`` cache entry's key (None: not there)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the profile {path}: {e}") from None
    key = data.get("key", {}) if isinstance(data, dict) else {}
    topo, sizes = key.get("topology", {}), key.get("sizes", {})
    return topo.get("nodes"), topo.get("procs_per_node"), int(sizes.get("gemms", 2))


def sim_cluster(sim: SimConfig) -> Cluster:
    """The cluster ``sim`` describes (module docstring); ``ValueError`` naming the choices or the numbers."""
    name = sim.cluster
    if name in CLUSTERS:
        base = cluster_preset(name)
        if sim.nodes and sim.nodes != base.nodes and sim.nodes > 1:
            base = at_nodes(base, sim.nodes)
        nodes = sim.nodes or base.nodes
        gpus = sim.gpus_per_node or base.gpus_per_node
        return dataclasses.replace(base, nodes=nodes, gpus_per_node=gpus, mp=gpus)
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"--cluster {name!r} is neither a preset ({', '.join(CLUSTERS)}) nor a profile file")
    nodes, gpus, gemms = _profile_topology(path)
    nodes, gpus = sim.nodes or nodes, sim.gpus_per_node or gpus
    if nodes is None or gpus is None:
        raise ValueError(f"the profile {path} names no topology; give --nodes and --gpus-per-node")
    return profiled(path, nodes=nodes, gpus_per_node=gpus, mp=gpus, gemms=gemms)


def sim_model(model: ModelConfig, cluster: Cluster, *, paper_settings: bool) -> SimModel:
    """The sizes the simulator plays for ``model`` on ``cluster`` (module docstring)."""
    if paper_settings and model.name in MODELS:
        if model != MODEL_PRESETS[model.name]():
            changed = [f.name for f in dataclasses.fields(model) if getattr(model, f.name) !=
                       getattr(MODEL_PRESETS[model.name](), f.name)]
            raise ValueError(f"model flags change the preset {model.name} ({', '.join(changed)}), but the paper's "
                             "settings replace its sizes; pass --no-paper-settings to simulate your sizes")
        return model_preset(model.name, cluster)
    if model.moe_every != 1:
        raise ValueError(f"the simulator plays models whose every block is MoE; {model.name} has moe_every="
                         f"{model.moe_every} ({model.num_moe_layers} MoE blocks of {model.n_layers}): "
                         "pass --moe-every 1")
    moe = model.moe
    return SimModel(name=model.name, n_layers=model.n_layers, d_model=model.d_model, n_heads=model.n_heads,
                    n_kv_heads=model.kv_heads, d_hidden=moe.d_hidden, gemms=GEMMS[moe.expert], top_k=moe.top_k,
                    capacity_factor=moe.capacity_factor, seq_len=model.seq_len)


def sim_layout(job: JobConfig) -> Layout:
    """``job``'s model on ``job``'s simulated cluster: with the paper's settings E = nodes, else the
    model's E; EP = world / MP, ESP = MP = GPUs per node."""
    cluster = sim_cluster(job.sim)
    paper = job.sim.paper_settings and job.model.name in MODELS
    model = sim_model(job.model, cluster, paper_settings=job.sim.paper_settings)
    layout = paper_layout(cluster, model, experts=None if paper else job.moe.num_experts)
    check_measured(layout)
    return layout


def check_measured(layout: Layout) -> None:
    """A profile says which operations it did not measure (``meta["skipped"]``: e.g. no AllGather on a
    profile with ESP = 1); their lines are zero, so a layout that needs one would play it for free:
    ``ValueError`` naming each and why it was skipped."""
    skipped = layout.cluster.costs.meta.get("skipped") or {}
    needed = ["a2a" if layout.ep > 1 else None, "gar", "expert_fwd", "expert_bwd", "gate_fwd", "gate_bwd",
              "dense_fwd", "dense_bwd", *(("ag", "rs") if layout.esp > 1 or layout.mp > 1 else ())]
    missing = [f"{op} ({skipped[op]})" for op in needed if op in skipped]
    if missing:
        raise ValueError(f"the profile {layout.cluster.source} did not measure what this layout runs: "
                         f"{'; '.join(missing)}; profile a job with that layout (fsmoe profile)")


__all__ = ["sim_cluster", "sim_layout", "sim_model"]
