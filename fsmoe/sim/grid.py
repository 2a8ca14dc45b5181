"""The paper's 1,458 configured MoE layers (Table 4) under every schedule, and Table 5 from them.

Grid (digest §6.2): B ∈ {1, 2, 4} × heads ∈ {8, 16, 32} × L ∈ {512, 1024, 2048} (Testbed-B: {256, 512,
1024}) × M ∈ {1024, 2048, 4096} × H/M ∈ {2, 3, 4} × f ∈ {1.2, 2.4, no drop} × ffn ∈ {simple (2 GEMMs,
multi-head attention), Mixtral (3 GEMMs, grouped-query attention with 1/4 as many KV heads)} = 3⁶·2 = 1,458
layers per testbed; k = 2, E = N_EP = nodes, N_ESP = N_MP = the cluster's ``mp``. Each layer all-reduces
one layer's dense gradient in its backward ("the gradient aggregation of each configured layer is
included", digest §6.2), placed as each schedule places it (:func:`fsmoe.sim.engine.schedule_layer`).
The head count does not enter the modelled times (attention MACs do not depend on it).

The whole grid is one :class:`~fsmoe.sim.engine.LayerBatch` per testbed: every task list is played once
for all 1,458 layers (:func:`fsmoe.sim.engine.play_batch`), so both testbeds × 6 schedules take well under
a second. Deterministic: no randomness, no solver.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from fsmoe.config import SCHEDULES, get_schedule
from fsmoe.sim.engine import LayerBatch, LayerResult, capacity, dense_times, layer_tables, schedule_layer
from fsmoe.sim.presets import FP32_BYTES, Cluster, testbed_a, testbed_b

BATCHES = (1, 2, 4)
HEADS = (8, 16, 32)
SEQ_LENS = {"testbed-a": (512, 1024, 2048), "testbed-b": (256, 512, 1024)}
D_MODELS = (1024, 2048, 4096)
H_SCALES = (2, 3, 4)
FACTORS = (1.2, 2.4, None)
FFN_TYPES = ("simple", "mixtral")
TOP_K = 2
MIXTRAL_KV_RATIO = 0.25  # 8 KV heads of 32: Q, K, V = 1.5·D² (the authors' gradient count, digest §5.2)

# Paper Table 5: average speedup over tutel (with PipeMoE) on the configured layers (digest §6.4).
PAPER_TABLE5 = {"testbed-a": {"tutel_improved": 1.09, "fsmoe_no_iio": 1.12, "fsmoe": 1.18},
                "testbed-b": {"tutel_improved": 1.08, "fsmoe_no_iio": 1.16, "fsmoe": 1.22}}
PAPER_DIFFERENT_R = (912, 1458)  # configs whose best r differs between forward and backward (Testbed-B, §4.5)


@dataclass(kw_only=True, frozen=True)
class GridConfig:
    """One configured layer of Table 4."""

    batch: int
    heads: int
    seq_len: int
    d_model: int
    h_scale: int
    factor: float | None
    ffn: str


def grid_configs(cluster: Cluster) -> tuple[GridConfig, ...]:
    """The 1,458 layers of ``cluster`` (its L range), in a fixed order."""
    return tuple(GridConfig(batch=b, heads=h, seq_len=s, d_model=m, h_scale=x, factor=f, ffn=t)
                 for b, h, s, m, x, f, t in itertools.product(BATCHES, HEADS, SEQ_LENS[cluster.name], D_MODELS,
                                                              H_SCALES, FACTORS, FFN_TYPES))


def grid_batch(cluster: Cluster, configs: tuple[GridConfig, ...]) -> LayerBatch:
    """The configs as one batch on ``cluster``'s paper layout (``ValueError`` if one cannot hold it)."""
    mp = cluster.mp
    ep = cluster.world // mp
    for c in configs:
        if c.heads % mp or (c.batch * c.seq_len) % mp or (c.h_scale * c.d_model) % mp:
            raise ValueError(f"grid config {c} does not split over MP = ESP = {mp}")
    col = {f: np.array([getattr(c, f) for c in configs]) for f in ("batch", "seq_len", "d_model", "h_scale")}
    mixtral = np.array([c.ffn == "mixtral" for c in configs])
    S = col["batch"] * col["seq_len"]
    T = S // mp
    E = np.full(len(configs), cluster.nodes)
    D = col["d_model"].astype(float)
    kv = np.where(mixtral, MIXTRAL_KV_RATIO, 1.0)
    grad = np.where(mixtral, (1 + 2 * kv) * D * D / mp + D * D / mp, 3 * D * D / mp + 3 * D / mp + D * D / mp + D)
    return LayerBatch(tokens=T, seq_tokens=S, seq_len=col["seq_len"], d_model=col["d_model"],
                      d_hidden=col["h_scale"] * col["d_model"], experts=E, gemms=np.where(mixtral, 3, 2),
                      capacity_gate=capacity(T, E, TOP_K, [c.factor for c in configs]), grad_bytes=grad * FP32_BYTES,
                      kv_ratio=kv, ep=ep, esp=mp, mp=mp)


@dataclass(kw_only=True, frozen=True, eq=False)
class TestbedGrid:
    """Every schedule over one testbed's configs: per schedule the layers' times (``results``), speedups
    over tutel and their means (Table 5), and how many configs fsmoe runs with r_fwd ≠ r_bwd."""

    cluster: str
    configs: tuple[GridConfig, ...]
    results: dict[str, LayerResult]

    def speedups(self, schedule: str) -> np.ndarray:
        return self.results["tutel"].total_s / self.results[schedule].total_s

    def mean_speedup(self, schedule: str) -> float:
        return float(np.mean(self.speedups(schedule)))

    @property
    def different_r(self) -> int:
        """Configs whose fsmoe plan uses a different degree forward and backward."""
        fs = self.results["fsmoe"]
        return int(np.count_nonzero(fs.r_fwd != fs.r_bwd))


def run_testbed(cluster: Cluster, configs: tuple[GridConfig, ...] | None = None,
                schedules: tuple[str, ...] = tuple(SCHEDULES)) -> TestbedGrid:
    """Every schedule on ``configs`` (default: the whole grid) of ``cluster``; ``tutel`` always runs."""
    configs = grid_configs(cluster) if configs is None else configs
    batch = grid_batch(cluster, configs)
    costs = cluster.costs
    dense = dense_times(batch, costs)
    cache: dict = {}
    results = {}
    for name in dict.fromkeys(("tutel", *schedules)):
        spec = get_schedule(name)
        results[name] = schedule_layer(spec, layer_tables(spec, batch, costs, cache=cache), dense, batch.grad_bytes,
                                       costs)
    return TestbedGrid(cluster=cluster.name, configs=configs, results=results)


@dataclass(kw_only=True, frozen=True, eq=False)
class GridReport:
    """Both testbeds, the wall time of the run, and Table 5 beside the paper."""

    testbeds: tuple[TestbedGrid, ...]
    wall_s: float

    def table5(self) -> list[tuple[str, str, float, float, float]]:
        """Rows (testbed, schedule, paper, ours, ours − paper)."""
        rows = []
        for tb in self.testbeds:
            for s, paper in PAPER_TABLE5[tb.cluster].items():
                ours = tb.mean_speedup(s)
                rows.append((tb.cluster, s, paper, ours, ours - paper))
        return rows

    def text(self) -> str:
        lines = [f"Table 5 (mean speedup over tutel, {len(self.testbeds[0].configs)} configured layers per testbed; "
                 f"grid ran in {self.wall_s:.2f} s)",
                 f"{'testbed':<11}{'schedule':<16}{'paper':>7}{'ours':>8}{'diff':>8}"]
        lines += [f"{tb:<11}{s:<16}{p:>7.2f}{o:>8.3f}{d:>+8.3f}" for tb, s, p, o, d in self.table5()]
        for tb in self.testbeds:
            lines.append(f"{tb.cluster}: fsmoe uses r_fwd != r_bwd in {tb.different_r} of {len(tb.configs)} configs "
                         f"(paper, Testbed-B: {PAPER_DIFFERENT_R[0]} of {PAPER_DIFFERENT_R[1]})")
        return "\n".join(lines)


def run_grid(clusters: tuple[Cluster, ...] | None = None) -> GridReport:
    """The full grid × the 6 schedules on Testbed-A and Testbed-B (or ``clusters``)."""
    start = time.perf_counter()
    testbeds = tuple(run_testbed(c) for c in (clusters or (testbed_a(), testbed_b())))
    return GridReport(testbeds=testbeds, wall_s=time.perf_counter() - start)


__all__ = ["BATCHES", "D_MODELS", "FACTORS", "FFN_TYPES", "GridConfig", "GridReport", "HEADS", "H_SCALES",
           "PAPER_DIFFERENT_R", "PAPER_TABLE5", "SEQ_LENS", "TestbedGrid", "grid_batch", "grid_configs",
           "run_grid", "run_testbed"]
