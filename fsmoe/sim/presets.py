"""Described clusters and models for the simulator: the paper's testbeds, a DGX-H100, and three models.

Units follow :mod:`fsmoe.perf.costs`: seconds, collective n in bytes (fp32: 4 bytes per element), GEMM n in
multiply-accumulates (MACs). The paper's fitted constants (Fig. 5 caption; digest §6.3) are in ms and
elements; :func:`paper_costs` converts them (α_s = α_ms·1e-3, β_s/byte = β_ms/elem·1e-3/4,
β_s/MAC = β_ms/MAC·1e-3). The caption swaps β_a2a and β_ag on Testbed-A; the authors' code hard-codes
β_a2a = 2.32e-6 and β_ag = 2.35e-7 ms/element for 48 GPUs (digest §6.3), so Testbed-A takes the caption's
values with those two swapped back.

Compute lines beyond the experts: the paper fits only the GEMM line. The gate (+ Order/I-Order) and the
dense attention use the same GEMM line here (``gate_*``: one GEMM of n = T·D·E MACs; ``dense_*``: the
attention's MACs, :mod:`fsmoe.sim.simulator`), backward twice the forward (digest §4.4).

Model sizes (:class:`SimModel`): our :class:`~fsmoe.config.ModelConfig` is GPT-style (MHA, dense MLPs, a
preset name from a fixed list); it cannot express Mixtral's grouped-query attention, so the simulator
keeps the sizes it needs in its own frozen dataclass and builds only configs, never weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fsmoe.config import check_layout
from fsmoe.perf.costs import Costs, Linear

FP32_BYTES = 4
MS = 1e-3


# --- clusters --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class Cluster:
    """A described cluster: ``nodes`` × ``gpus_per_node`` ranks, the α-β lines of every operation
    (``costs``; ``expert_*`` lines are per MAC with α for one GEMM: :meth:`costs_for` scales α by the
    expert's GEMM count), the MP/ESP degree the paper uses on it (``mp``), and where the numbers come from."""

    name: str
    nodes: int
    gpus_per_node: int
    costs: Costs
    mp: int
    source: str

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"Cluster {self.name}: nodes={self.nodes} and gpus_per_node={self.gpus_per_node} "
                             "must be >= 1")
        if self.gpus_per_node % self.mp:
            raise ValueError(f"Cluster {self.name}: mp={self.mp} must divide gpus_per_node={self.gpus_per_node}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def costs_for(self, gemms: int) -> Costs:
        """The costs with the expert lines' α for an expert of ``gemms`` GEMMs (digest §4.1: α_exp =
        #GEMMs·α_gemm; β stays per MAC since n_exp counts every GEMM's MACs)."""
        ops = dict(self.costs.ops)
        for op in ("expert_fwd", "expert_bwd"):
            ops[op] = Linear(alpha_s=ops[op].alpha_s * gemms, beta_s=ops[op].beta_s)
        return Costs(ops=ops, busy=dict(self.costs.busy), beside=dict(self.costs.beside),
                     meta={**self.costs.meta, "gemms": gemms})


def paper_costs(*, gemm: tuple[float, float], a2a: tuple[float, float], ag: tuple[float, float],
                rs: tuple[float, float], ar: tuple[float, float], source: str) -> Costs:
    """:class:`Costs` from the paper's (α ms, β ms per element or per MAC) pairs; backward GEMMs twice the
    forward's (digest §4.4: double the time, not n)."""
    def coll(p: tuple[float, float]) -> Linear:
        return Linear(alpha_s=p[0] * MS, beta_s=p[1] * MS / FP32_BYTES)

    g = Linear(alpha_s=gemm[0] * MS, beta_s=gemm[1] * MS)
    return Costs(ops={"a2a": coll(a2a), "ag": coll(ag), "rs": coll(rs), "gar": coll(ar),
                      "expert_fwd": g, "expert_bwd": g.scaled(2.0), "gate_fwd": g, "gate_bwd": g.scaled(2.0),
                      "dense_fwd": g, "dense_bwd": g.scaled(2.0)}, meta={"source": source})


def testbed_a() -> Cluster:
    """Testbed-A (paper Table 3): 6 nodes × 8 RTX A6000, NVLink 112.5 GB/s, 200 Gb/s InfiniBand; N_MP =
    N_ESP = 8. Fig. 5 caption constants with β_a2a/β_ag swapped back to the authors' code values."""
    costs = paper_costs(gemm=(4.26e-2, 2.29e-11), a2a=(2.87e-1, 2.32e-6), ag=(3.37e-1, 2.21e-7),
                        rs=(3.95e-1, 2.34e-7), ar=(5.11e-1, 4.95e-6), source="FSMoE Fig. 5 caption, Testbed-A")
    return Cluster(name="testbed-a", nodes=6, gpus_per_node=8, costs=costs, mp=8,
                   source="paper-fitted (Fig. 5; β_a2a/β_ag swap fixed, digest §6.3)")


def testbed_b() -> Cluster:
    """Testbed-B (paper Table 3): 8 nodes × 4 RTX 2080Ti, PCIe 3.0, 100 Gb/s InfiniBand; N_MP = N_ESP = 4.
    Fig. 5 caption constants as printed."""
    costs = paper_costs(gemm=(9.24e-2, 4.42e-11), a2a=(1.75e-1, 3.06e-7), ag=(3.20e-2, 1.68e-7),
                        rs=(3.91e-2, 1.67e-7), ar=(8.37e-2, 5.99e-7), source="FSMoE Fig. 5 caption, Testbed-B")
    return Cluster(name="testbed-b", nodes=8, gpus_per_node=4, costs=costs, mp=4, source="paper-fitted (Fig. 5)")


DGX_H100_NODES = 4


def dgx_h100(nodes: int = DGX_H100_NODES) -> Cluster:
    """DGX-H100 nodes — DERIVED from public figures, not measured. NVIDIA's DGX H100 datasheet: 8 H100 SXM
    per node, NVLink 4 at 900 GB/s per GPU (450 GB/s each way), 8 ConnectX-7 400 Gb/s InfiniBand ports
    (50 GB/s per GPU); H100 SXM datasheet: 494.5 dense TF32 TFLOPS (our work is fp32 elements, run on
    tensor cores as TF32). Assumed: collectives reach 80% of link rate and GEMMs 50% of peak; α = 20 µs
    per NCCL collective inside a node, 30 µs across nodes, 10 µs per GEMM launch.

    β per byte: AlltoAll across nodes 1/(0.8·50e9) (each rank's NIC carries its n); AllGather and
    ReduceScatter of gathered size n inside a node (7/8)·n/(0.8·450e9); ring all-reduce across nodes
    2·n/(0.8·50e9). β per MAC = 2 FLOP / (0.5·494.5e12)."""
    nic, nvl = 0.8 * 50e9, 0.8 * 450e9
    mac = 2.0 / (0.5 * 494.5e12)
    g = Linear(alpha_s=10e-6, beta_s=mac)
    ops = {"a2a": Linear(alpha_s=30e-6, beta_s=1 / nic), "ag": Linear(alpha_s=20e-6, beta_s=7 / 8 / nvl),
           "rs": Linear(alpha_s=20e-6, beta_s=7 / 8 / nvl), "gar": Linear(alpha_s=30e-6, beta_s=2 / nic),
           "expert_fwd": g, "expert_bwd": g.scaled(2.0), "gate_fwd": g, "gate_bwd": g.scaled(2.0),
           "dense_fwd": g, "dense_bwd": g.scaled(2.0)}
    return Cluster(name="dgx-h100", nodes=nodes, gpus_per_node=8, mp=8,
                   costs=Costs(ops=ops, meta={"source": "derived from NVIDIA DGX H100 / H100 SXM datasheets"}),
                   source="derived from public link and FLOP figures (not measured)")


def load_profile_costs(path: str | Path) -> Costs:
    """The :class:`Costs` of one ``fsmoe profile`` cache entry (``{"key": ..., "costs": ...}``, written by
    :mod:`fsmoe.perf.profile`), or of a bare ``Costs.to_dict()`` record. ``ValueError`` when it is neither."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a costs record from {p}: {e}") from None
    record = data.get("costs", data) if isinstance(data, dict) else data
    if not isinstance(record, dict):
        raise ValueError(f"{p} holds no costs record")
    costs = Costs.from_dict(record)
    return Costs(ops=costs.ops, busy=costs.busy, beside=costs.beside, meta={**costs.meta, "profile": str(p)})


def profiled(path: str | Path, *, nodes: int, gpus_per_node: int, mp: int = 1, gemms: int = 2) -> Cluster:
    """A cluster from this machine's ``fsmoe profile`` output. The profile's expert lines already cover the
    expert type it measured (``gemms`` of them), so α is divided back to one GEMM; its dense lines are per
    T·D² (:class:`fsmoe.perf.model.BlockWork`: an attention is 4·T·D² MACs), so β is divided by 4 to be
    per MAC (the L² term of attention is then priced at the projections' rate)."""
    costs = load_profile_costs(path)
    ops = dict(costs.ops)
    for op in ("expert_fwd", "expert_bwd"):
        ops[op] = Linear(alpha_s=ops[op].alpha_s / gemms, beta_s=ops[op].beta_s, r2=ops[op].r2)
    for op in ("dense_fwd", "dense_bwd"):
        ops[op] = Linear(alpha_s=ops[op].alpha_s, beta_s=ops[op].beta_s / 4, r2=ops[op].r2)
    return Cluster(name="profiled", nodes=nodes, gpus_per_node=gpus_per_node, mp=mp,
                   costs=Costs(ops=ops, busy=costs.busy, beside=costs.beside, meta=costs.meta),
                   source=f"fsmoe profile cache {path}")


CLUSTERS = {"testbed-a": testbed_a, "testbed-b": testbed_b, "dgx-h100": dgx_h100}


def cluster_preset(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; choose from {', '.join(CLUSTERS)}")
    return CLUSTERS[name]()


# --- models ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class SimModel:
    """The sizes the simulator needs of an MoE transformer (every block MoE, as in the paper's runs):
    ``n_layers`` blocks of model dim D = ``d_model``, ``n_heads`` query heads and ``n_kv_heads`` key/value
    heads (GQA), experts of hidden H = ``d_hidden`` with ``gemms`` GEMMs (2: FFN, 3: SwiGLU), ``top_k``,
    ``capacity_factor`` f (None: no drop, C from balanced routing), ``batch`` sequences of ``seq_len``."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_hidden: int
    gemms: int
    top_k: int = 2
    capacity_factor: float | None = 1.2
    seq_len: int
    batch: int = 1

    def __post_init__(self) -> None:
        for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_hidden", "top_k", "seq_len", "batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"SimModel {self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.gemms not in (2, 3):
            raise ValueError(f"SimModel {self.name}: gemms must be 2 (FFN) or 3 (SwiGLU), got {self.gemms}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"SimModel {self.name}: n_kv_heads={self.n_kv_heads} must divide "
                             f"n_heads={self.n_heads}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"SimModel {self.name}: capacity_factor must be > 0, got {self.capacity_factor}")

    def dense_grad_elems(self, mp: int) -> float:
        """Dense gradient elements per GPU per layer, MP-sharded (digest §5.2): GPT (MHA)
        3D²/mp + 3D/mp + D²/mp + D; GQA (Mixtral) (1 + 2·kv/heads)·D²/mp + D²/mp."""
        D = self.d_model
        if self.n_kv_heads == self.n_heads:
            return 3 * D * D / mp + 3 * D / mp + D * D / mp + D
        return (1 + 2 * self.n_kv_heads / self.n_heads) * D * D / mp + D * D / mp


@dataclass(kw_only=True, frozen=True)
class Layout:
    """How a model sits on a cluster: E = ``experts`` over EP = nodes (one expert group per node, the
    paper's setting), ESP = MP = ``mp`` inside a node (sequence-parallel attention)."""

    cluster: Cluster
    model: SimModel
    experts: int
    ep: int
    esp: int
    mp: int

    def __post_init__(self) -> None:
        c, m = self.cluster, self.model
        check_layout(world_size=c.world, procs_per_node=c.gpus_per_node, mp=self.mp, ep=self.ep, esp=self.esp)
        if self.experts % self.ep:
            raise ValueError(f"{m.name} on {c.name}: E={self.experts} experts do not split over EP={self.ep}")
        if m.d_hidden % self.esp:
            raise ValueError(f"{m.name} on {c.name}: H={m.d_hidden} is not divisible by ESP={self.esp}")
        if m.n_heads % self.mp:
            raise ValueError(f"{m.name} on {c.name}: n_heads={m.n_heads} is not divisible by MP={self.mp}")
        if m.seq_len % self.mp:
            raise ValueError(f"{m.name} on {c.name}: seq_len={m.seq_len} is not divisible by MP={self.mp} "
                             "(sequence parallelism)")

    @property
    def tokens(self) -> int:
        """T per rank: batch·L/MP (sequence parallelism), routed as one group."""
        return self.model.batch * self.model.seq_len // self.mp


def paper_layout(cluster: Cluster, model: SimModel, *, experts: int | None = None) -> Layout:
    """The paper's layout (digest §6.5): E = N_EP = nodes, N_ESP = N_MP = the cluster's ``mp``."""
    e = cluster.nodes if experts is None else experts
    return Layout(cluster=cluster, model=model, experts=e, ep=cluster.world // cluster.mp, esp=cluster.mp,
                  mp=cluster.mp)


def _seq(cluster: Cluster) -> int:
    return 256 if cluster.name == "testbed-b" else 1024  # L = 1024 on A, 256 on B (digest §6.5)


def gpt2_xl_moe(cluster: Cluster) -> SimModel:
    """GPT2-XL-based MoE (digest §6.5): 48 layers, D = 1600, FFN experts H = 4D, B = 1, k = 2, f = 1.2.
    GPT2-XL's 25 heads do not split over MP = 4 or 8; 32 heads of 50 are used (the paper lists none)."""
    return SimModel(name="gpt2-xl-moe", n_layers=48, d_model=1600, n_heads=32, n_kv_heads=32, d_hidden=6400,
                    gemms=2, seq_len=_seq(cluster))


def mixtral_8x7b(cluster: Cluster) -> SimModel:
    """Mixtral-8x7B sizes (D = 4096, 32 heads / 8 KV heads, SwiGLU H = 14336), cut to 7 layers as the paper
    does to fit Testbed-B (digest §6.5); B = 1, k = 2, f = 1.2."""
    return SimModel(name="mixtral-8x7b", n_layers=7, d_model=4096, n_heads=32, n_kv_heads=8, d_hidden=14336,
                    gemms=3, seq_len=_seq(cluster))


def mixtral_8x22b(cluster: Cluster) -> SimModel:
    """Mixtral-8x22B sizes (D = 6144, 48 heads / 8 KV heads, SwiGLU H = 16384), cut to 33 layers (Testbed-A
    only in the paper, digest §6.5); B = 1, k = 2, f = 1.2."""
    return SimModel(name="mixtral-8x22b", n_layers=33, d_model=6144, n_heads=48, n_kv_heads=8, d_hidden=16384,
                    gemms=3, seq_len=_seq(cluster))


MODELS = {"gpt2-xl-moe": gpt2_xl_moe, "mixtral-8x7b": mixtral_8x7b, "mixtral-8x22b": mixtral_8x22b}


def model_preset(name: str, cluster: Cluster) -> SimModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](cluster)


__all__ = ["CLUSTERS", "Cluster", "Layout", "MODELS", "SimModel", "cluster_preset", "dgx_h100", "gpt2_xl_moe",
           "load_profile_costs", "mixtral_8x22b", "mixtral_8x7b", "model_preset", "paper_costs", "paper_layout",
           "profiled", "testbed_a", "testbed_b"]
