"""Simulate a whole model's training iteration on a described cluster, per schedule.

A model of ``n_layers`` identical MoE blocks (every block MoE, the paper's setting) on a :class:`Layout`
is a chain of generalized layers (digest §5.1: one MoE layer plus the dense part before the next). Each
is played by :mod:`fsmoe.sim.engine` — the runtime's own task lists for the MoE block, forward and backward,
at every degree pair the schedule allows — and composed as the backward runs it, from the last block:

* the last block's backward has no gradient ready to hide (its dense gradient becomes ready only after it);
* every other block hides the gradient of the block above it (one block's dense gradient, MP-sharded;
  expert gradients need no all-reduce: E = N_EP, so each expert shard has one replica), placed as the
  schedule places it (:func:`fsmoe.sim.engine.schedule_layer`);
* the first block's own gradient is all-reduced after the backward, exposed, under every schedule.

iteration = (L − 1)·(fwd + bwd of a block hiding a gradient) + (fwd + bwd of the last block) + tail GAR.

Not modelled: embeddings, the LM head, the loss, the optimizer step; contention between collectives and
compute only where the costs have busy lines (profiles of this machine; the paper's presets have none).
:func:`simulate` returns per schedule the iteration time, a breakdown by task kind (summed task time, so
overlapped work counts in full, as paper Table 2), the speedup over ``tutel`` and the degrees chosen per
block: the best (r_fwd, r_bwd) of every pair played exactly, which is the planner's choice (its exhaustive
evaluation step) for a layer without a gradient to hide (tests/sim/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsmoe.config import SCHEDULES, get_schedule
from fsmoe.sim.engine import LayerBatch, dense_times, gar_time, layer_tables, schedule_layer
from fsmoe.sim.presets import Layout

BASELINE = "tutel"
BREAKDOWN = ("a2a", "ag", "rs", "expert", "attention", "mp_comm", "gate", "gar", "gar_exposed")


@dataclass(kw_only=True, frozen=True)
class ScheduleRun:
    """One schedule's simulated iteration: times (s), ``breakdown_s`` by task kind (``a2a``, ``ag``,
    ``rs``, ``expert``, ``attention``, ``mp_comm``, ``gate``, ``gar``: summed task time; ``gar_exposed``:
    the GAR time nothing hides), (r_fwd, r_bwd) per block in block order, and the speedup over tutel."""

    schedule: str
    iteration_s: float
    fwd_s: float
    bwd_s: float
    breakdown_s: dict[str, float]
    degrees: tuple[tuple[int, int], ...]
    speedup_vs_tutel: float


@dataclass(kw_only=True, frozen=True)
class Simulation:
    """Every requested schedule on one layout."""

    layout: Layout
    runs: tuple[ScheduleRun, ...]

    def run(self, schedule: str) -> ScheduleRun:
        for r in self.runs:
            if r.schedule == schedule:
                return r
        raise KeyError(f"no run of {schedule!r}; have {', '.join(r.schedule for r in self.runs)}")

    def table(self) -> str:
        """A text table: one row per schedule (ms; the breakdown sums task time, so overlapped work counts in
        full), then each schedule's (r_fwd, r_bwd) per block as runs of equal blocks."""
        lay = self.layout
        lines = [f"{lay.model.name} on {lay.cluster.name}: {lay.cluster.world} GPUs ({lay.cluster.nodes} x "
                 f"{lay.cluster.gpus_per_node}), E={lay.experts}, EP={lay.ep}, ESP={lay.esp}, MP={lay.mp}, "
                 f"T={lay.tokens} tokens/rank, {lay.model.n_layers} blocks",
                 f"{'schedule':<15}{'iter ms':>10}{'vs tutel':>9}" + "".join(f"{k:>12}" for k in BREAKDOWN)]
        for r in self.runs:
            lines.append(f"{r.schedule:<15}{r.iteration_s * 1e3:>10.2f}{r.speedup_vs_tutel:>8.3f}x"
                         + "".join(f"{r.breakdown_s[k] * 1e3:>12.2f}" for k in BREAKDOWN))
        lines.append("(r_fwd, r_bwd) per block:")
        lines += [f"  {r.schedule:<15}{degree_runs(r.degrees)}" for r in self.runs]
        return "\n".join(lines)


def degree_runs(degrees: Sequence[tuple[int, int]]) -> str:
    """``blocks 0-5: 4/4, block 6: 4/1``: (r_fwd, r_bwd) per block, runs of equal blocks merged."""
    parts, start = [], 0
    for i in range(1, len(degrees) + 1):
        if i == len(degrees) or degrees[i] != degrees[start]:
            where = f"block {start}" if i - 1 == start else f"blocks {start}-{i - 1}"
            parts.append(f"{where}: {degrees[start][0]}/{degrees[start][1]}")
            start = i
    return ", ".join(parts)


def simulate(layout: Layout, schedules: Sequence[str] = tuple(SCHEDULES)) -> Simulation:
    """Simulate one training iteration of ``layout.model`` on ``layout.cluster`` under each of
    ``schedules`` (module docstring). Deterministic and pure."""
    for s in schedules:
        get_schedule(s)  # raises naming the choices
    one = LayerBatch.of_layout(layout)
    n = float(one.grad_bytes[0])
    batch = one.with_grad(np.array([n, 0.0]))  # row 0: hides the gradient above; row 1: the last block
    costs = layout.cluster.costs
    dense = dense_times(batch, costs)
    L = layout.model.n_layers
    tail = float(gar_time(costs.op("gar"), np.array([n]))[0])
    cache: dict = {}
    raw = {}
    for name in dict.fromkeys([*schedules, BASELINE]):
        spec = get_schedule(name)
        tables = layer_tables(spec, batch, costs, cache=cache)
        res = schedule_layer(spec, tables, dense, batch.grad_bytes, costs)
        w = np.array([L - 1, 1.0])  # how many blocks take each row
        k = res.pair
        breakdown = {kind: float(w @ tables.busy[kind][k, [0, 1]]) for kind in ("a2a", "ag", "rs", "expert")}
        breakdown.update(attention=float(w @ (dense.attn_fwd + dense.attn_bwd)), mp_comm=float(w @ (2 * dense.mp_comm)),
                         gate=float(w @ (dense.gate_fwd + dense.gate_bwd)),
                         gar=float(w @ (res.gar_moe_s + np.where(res.gar_dense_s > 0, res.gar_dense_s,
                                                                 res.gar_exposed_s))) + tail,
                         gar_exposed=float(w @ res.gar_exposed_s) + tail)
        fwd = float(w @ res.fwd_s)
        bwd = float(w @ res.bwd_s) + tail
        degrees = tuple([res.pairs[int(k[0])]] * (L - 1) + [res.pairs[int(k[1])]])
        raw[name] = (fwd, bwd, breakdown, degrees)
    base = sum(raw[BASELINE][:2])
    runs = tuple(ScheduleRun(schedule=s, iteration_s=raw[s][0] + raw[s][1], fwd_s=raw[s][0], bwd_s=raw[s][1],
                             breakdown_s=raw[s][2], degrees=raw[s][3], speedup_vs_tutel=base / (raw[s][0] + raw[s][1]))
                 for s in schedules)
    return Simulation(layout=layout, runs=runs)


__all__ = ["BASELINE", "BREAKDOWN", "ScheduleRun", "Simulation", "degree_runs", "simulate"]
