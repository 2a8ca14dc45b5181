"""The scale study: one model from 16 to 1,024 GPUs under every schedule, and where each stops scaling.

Scaling here is **weak scaling**: every GPU keeps the same tokens (B·L/MP per rank, the model preset's
L and B) and the paper's layout grows with the cluster — E = N_EP = nodes, one expert per node, ESP = MP =
the GPUs of a node (digest §6.5). The expert work per rank stays constant (E·C = k·f·T); what grows is the
inter-node collectives' reach. Ideal weak scaling keeps the iteration time constant; ``efficiency`` is
t(first size) / t(P).

How the inter-node lines grow (:func:`at_nodes`): a preset's AlltoAll and Gradient-AllReduce constants
are fitted (or derived) at its own node count N₀. Across N nodes, the textbook α-β models of the MPI
collectives (Thakur, Rabenseifner & Gropp, 2005) give pairwise-exchange AlltoAll (N−1)·α + (N−1)/N·n·β
and ring all-reduce 2(N−1)·α + 2(N−1)/N·n·β; both lines are rescaled from N₀ to N by those factors
(α by (N−1)/(N₀−1), β by ((N−1)/N)/((N₀−1)/N₀)). The authors' own fits move the same way: β_a2a 1.31e-6
→ 1.85e-6 → 2.32e-6 ms/element at 16 → 32 → 48 GPUs (digest §6.3), the model 1.39e-6 → 2.09e-6 → 2.32e-6.
Intra-node lines (ESP/MP AllGather and ReduceScatter) and compute do not change.

Why a schedule stops: per size the summed task time of each channel (``compute``: experts, attention,
gate; ``intra``: ESP and MP AllGather/ReduceScatter; ``inter``: AlltoAll and Gradient-AllReduce); the
largest is the bottleneck. A schedule "stops scaling" at the first size whose efficiency falls below
:data:`STOP_EFFICIENCY`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fsmoe.config import SCHEDULES
from fsmoe.perf.costs import Costs, Linear
from fsmoe.sim.presets import Cluster, dgx_h100, model_preset, paper_layout, testbed_a
from fsmoe.sim.simulator import ScheduleRun, simulate

GPUS = (16, 32, 64, 128, 256, 512, 1024)
STOP_EFFICIENCY = 0.8
CHANNELS = {"compute": ("expert", "attention", "gate"), "intra": ("ag", "rs", "mp_comm"), "inter": ("a2a", "gar")}


def at_nodes(cluster: Cluster, nodes: int) -> Cluster:
    """``cluster`` with ``nodes`` nodes, its AlltoAll and Gradient-AllReduce lines rescaled from its own
    node count (module docstring). ``ValueError`` below 2 nodes (no inter-node collective to scale)."""
    n0 = cluster.nodes
    if nodes < 2 or n0 < 2:
        raise ValueError(f"at_nodes: the inter-node lines scale between >= 2 nodes, got {n0} -> {nodes}")
    a_k = (nodes - 1) / (n0 - 1)
    b_k = ((nodes - 1) / nodes) / ((n0 - 1) / n0)

    def grow(line: Linear) -> Linear:
        return Linear(alpha_s=line.alpha_s * a_k, beta_s=line.beta_s * b_k)

    ops = {**cluster.costs.ops, **{op: grow(cluster.costs.op(op)) for op in ("a2a", "gar")}}
    busy = {op: (grow(line) if op in ("a2a", "gar") else line) for op, line in cluster.costs.busy.items()}
    costs = Costs(ops=ops, busy=busy, meta={**cluster.costs.meta, "scaled_from_nodes": n0})
    return dataclasses.replace(cluster, nodes=nodes, costs=costs,
                               source=f"{cluster.source}; inter-node lines rescaled {n0} -> {nodes} nodes")


@dataclass(kw_only=True, frozen=True)
class ScalePoint:
    """One cluster size: the GPUs and every schedule's run."""

    gpus: int
    runs: tuple[ScheduleRun, ...]

    def run(self, schedule: str) -> ScheduleRun:
        return next(r for r in self.runs if r.schedule == schedule)


def channel_times(run: ScheduleRun) -> dict[str, float]:
    """Summed task time per channel (s) of one iteration."""
    return {ch: sum(run.breakdown_s[k] for k in kinds) for ch, kinds in CHANNELS.items()}


def bottleneck(run: ScheduleRun) -> str:
    times = channel_times(run)
    return max(times, key=times.__getitem__)


@dataclass(kw_only=True, frozen=True)
class ScaleStudy:
    """One model on one cluster family over :data:`GPUS`."""

    cluster: str
    model: str
    points: tuple[ScalePoint, ...]

    def efficiency(self, schedule: str) -> list[float]:
        t0 = self.points[0].run(schedule).iteration_s
        return [t0 / p.run(schedule).iteration_s for p in self.points]

    def stops_at(self, schedule: str) -> int | None:
        """The first GPU count whose efficiency is below :data:`STOP_EFFICIENCY` (None: it never stops)."""
        return next((p.gpus for p, e in zip(self.points, self.efficiency(schedule), strict=True)
                     if e < STOP_EFFICIENCY), None)

    def inter_bound_from(self, schedule: str) -> int | None:
        """The first GPU count from which the inter-node channel has the most task time (None: never)."""
        bound = [bottleneck(p.run(schedule)) == "inter" for p in self.points]
        return next((p.gpus for i, p in enumerate(self.points) if all(bound[i:])), None)

    def rows(self) -> list[dict]:
        out = []
        schedules = [r.schedule for r in self.points[0].runs]
        for s in schedules:
            stop = self.stops_at(s)
            at = next(p for p in self.points if p.gpus == (stop or self.points[-1].gpus)).run(s)
            out.append({"schedule": s, "iteration_ms": [p.run(s).iteration_s * 1e3 for p in self.points],
                        "efficiency": self.efficiency(s), "stops_at_gpus": stop, "bottleneck_there": bottleneck(at),
                        "inter_bound_from_gpus": self.inter_bound_from(s),
                        "channels_ms_there": {k: v * 1e3 for k, v in channel_times(at).items()}})
        return out

    def text(self) -> str:
        lines = [f"weak scaling, {self.model} on {self.cluster} (tokens per GPU fixed; E = nodes): iteration ms",
                 f"{'schedule':<15}" + "".join(f"{p.gpus:>9}" for p in self.points)
                 + "  eff@max  stops at  bottleneck there  inter-bound from"]
        for row in self.rows():
            stop, inter = row["stops_at_gpus"], row["inter_bound_from_gpus"]
            lines.append(f"{row['schedule']:<15}" + "".join(f"{t:>9.1f}" for t in row["iteration_ms"])
                         + f"  {row['efficiency'][-1]:>7.2f}  {stop if stop else '-':>8}  {row['bottleneck_there']:>16}"
                         f"  {inter if inter else '-':>16}")
        return "\n".join(lines)


def scale_study(base: Callable[[], Cluster], model: str, *, gpus: Sequence[int] = GPUS,
                schedules: Sequence[str] = tuple(SCHEDULES)) -> ScaleStudy:
    """``model`` (a paper preset, its settings on ``base``'s cluster) at each GPU count of ``gpus`` (whole
    nodes of ``base()``'s size), every schedule."""
    cluster = base()
    per_node = cluster.gpus_per_node
    bad = [g for g in gpus if g % per_node or g // per_node < 2]
    if bad:
        raise ValueError(f"scale_study: GPU counts {bad} are not >= 2 whole nodes of {per_node} GPUs ({cluster.name})")
    points = []
    for g in gpus:
        c = at_nodes(cluster, g // per_node)
        points.append(ScalePoint(gpus=g, runs=simulate(paper_layout(c, model_preset(model, c)), schedules).runs))
    return ScaleStudy(cluster=cluster.name, model=model, points=tuple(points))


def default_studies() -> tuple[ScaleStudy, ...]:
    """The report's studies: Mixtral-8x7B (7 blocks, L = 1024) on DGX-H100 and on Testbed-A nodes."""
    return tuple(scale_study(base, "mixtral-8x7b") for base in (dgx_h100, testbed_a))


__all__ = ["CHANNELS", "GPUS", "STOP_EFFICIENCY", "ScalePoint", "ScaleStudy", "at_nodes", "bottleneck",
           "channel_times", "default_studies", "scale_study"]
