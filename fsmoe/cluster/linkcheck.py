"""Measure the links a job's groups run over, from inside its ranks: intra- vs inter-node AlltoAll and
overlap on an emulated cluster (:func:`survey`, driven per cluster by :func:`survey_cluster`), and
every MoE collective on its real group across message sizes with α-β fits (:func:`measure_collectives`,
:func:`fit_alpha_beta`, driven by :func:`time_collectives`). ``benchmarks/cluster_links.py`` and
``benchmarks/collectives.py`` are thin scripts over these.

Run the rank functions with :meth:`fsmoe.cluster.EmulatedCluster.run_function` or
:func:`fsmoe.cluster.run_distributed` (every rank calls them with its rank and the world size).

Link groups follow :class:`fsmoe.parallel.dims.ParallelDims` with ``esp = procs_per_node`` and
``ep = nodes``: the ESP groups are the nodes (intra-node), the EP groups
join the ranks with the same local rank on every node (inter-node), so an EP AlltoAll is exactly the
traffic FSMoE's dispatch puts on the slow links.

Timing: one sample is a barrier on the world, then one collective; every sample is all-reduced with
MAX, because a collective ends when its slowest rank does; the median over ``reps`` samples is kept.
Quantities that are compared (intra vs inter; matmul, AlltoAll, both) are sampled interleaved, rep by
rep, so that load drifting on a shared machine touches them alike.
All groups of a kind run at once (both nodes' ESP groups; every EP group), as in training.

Bytes: ``nbytes`` is each rank's AlltoAll input. A node's uplink carries
``procs_per_node * nbytes * (nodes - 1) / nodes`` bytes per inter-node AlltoAll, so
``uplink_bits_per_s`` can be compared with the configured link rate.

Collectives (:func:`measure_collectives`): ``all_to_all`` on the EP group (dispatch / combine),
``all_gather`` and ``reduce_scatter`` on the ESP group, ``all_reduce`` on the dense-DP group
(Gradient-AllReduce), with the raw calls of :mod:`fsmoe.parallel.comm` on preallocated buffers. Message
size n (bytes, float32) follows the paper's §4 convention: the per-rank input for all_to_all and
all_reduce, the gathered output for all_gather, the input before scattering for reduce_scatter. One
sample is ``inner`` calls back to back, divided by ``inner``.

Overlap (:func:`measure_overlap`): ``t_mm`` a matmul alone, ``t_a2a`` an inter-node AlltoAll alone,
``t_both`` the AlltoAll issued with ``async_op=True``, the matmul, then ``wait()``. The overlap ratio
``(t_mm + t_a2a - t_both) / min(t_mm, t_a2a)`` is 1 when the shorter one hides completely behind the
longer one and 0 when they run back to back.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fsmoe.cluster.launcher import EmulatedCluster, run_distributed
from fsmoe.cluster.spec import EmulatedClusterSpec
from fsmoe.parallel.comm import all_gather_into, all_reduce_, all_to_all_into, reduce_scatter_into
from fsmoe.parallel.dims import GroupKind, ParallelDims, ProcessGroups, build_groups


@dataclass(frozen=True)
class LinkTiming:
    """Median seconds of one AlltoAll of ``nbytes`` per rank on the intra- and inter-node groups."""

    nbytes: int
    nodes: int
    procs_per_node: int
    intra_s: float
    inter_s: float

    @property
    def ratio(self) -> float:
        """How many times slower the inter-node AlltoAll is."""
        return self.inter_s / self.intra_s

    def rank_bytes_per_s(self, kind: str) -> float:
        """Algorithm bandwidth: one rank's input bytes over the time (``kind``: intra or inter)."""
        return self.nbytes / (self.intra_s if kind == "intra" else self.inter_s)

    @property
    def uplink_bits_per_s(self) -> float:
        """Bits one node pushed through its uplink per second during the inter-node AlltoAll."""
        crossing = self.procs_per_node * self.nbytes * (self.nodes - 1) / self.nodes
        return crossing * 8 / self.inter_s


@dataclass(frozen=True)
class OverlapTiming:
    """Median seconds of a matmul alone, an inter-node AlltoAll alone, and both overlapped."""

    nbytes: int
    matmul_n: int
    matmul_s: float
    a2a_s: float
    both_s: float

    @property
    def overlap_ratio(self) -> float:
        """(t_mm + t_a2a - t_both) / min(t_mm, t_a2a): 1 = fully hidden, 0 = back to back."""
        hidden = self.matmul_s + self.a2a_s - self.both_s
        return hidden / min(self.matmul_s, self.a2a_s)


def _groups(world_size: int, procs_per_node: int) -> ProcessGroups:
    nodes = world_size // procs_per_node
    dims = ParallelDims(
        world_size=world_size, procs_per_node=procs_per_node, dp=world_size, ep=nodes, esp=procs_per_node
    )
    return build_groups(dims, backend="gloo")


def _sample(fn: Callable[[], object], inner: int = 1) -> float:
    """One sample: barrier, time ``inner`` calls of ``fn`` (per call), MAX over the world (a collective
    ends with its slowest rank)."""
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    dt = torch.tensor([(time.perf_counter() - t0) / inner], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt.item())


def _samples(fns: Sequence[Callable[[], object]], reps: int, warmup: int, inner: int = 1) -> list[list[float]]:
    """``reps`` samples of each fn, interleaved rep by rep so that load drifting on a shared machine
    affects every fn alike."""
    for _ in range(warmup):
        for fn in fns:
            _sample(fn, inner)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            samples[i].append(_sample(fn, inner))
    return samples


def _medians(fns: Sequence[Callable[[], object]], reps: int, warmup: int) -> list[float]:
    return [statistics.median(s) for s in _samples(fns, reps, warmup)]


def _median_max(fn: Callable[[], None], reps: int, warmup: int) -> float:
    return _medians([fn], reps, warmup)[0]


def _a2a(nbytes: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    numel = max(size, nbytes // 4 // size * size)  # float32, divisible by the group size
    return torch.randn(numel), torch.empty(numel)


def _time_links(groups: ProcessGroups, nbytes: int, reps: int, warmup: int) -> LinkTiming:
    calls = []
    for kind in ("esp", "ep"):
        group, size = groups.group(kind), groups.size(kind)
        x, out = _a2a(nbytes, size)
        calls.append(lambda g=group, x=x, out=out: all_to_all_into(out, x, g))
    intra_s, inter_s = _medians(calls, reps, warmup)
    dims = groups.dims
    return LinkTiming(
        nbytes=nbytes,
        nodes=dims.num_nodes,
        procs_per_node=dims.procs_per_node,
        intra_s=intra_s,
        inter_s=inter_s,
    )


def _time_overlap(groups: ProcessGroups, nbytes: int, matmul_n: int, reps: int, warmup: int) -> OverlapTiming:
    group = groups.group("ep")
    x, out = _a2a(nbytes, groups.size("ep"))
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)

    def matmul() -> None:
        torch.mm(a, b)

    def a2a() -> None:
        all_to_all_into(out, x, group)

    def both() -> None:
        work = all_to_all_into(out, x, group, async_op=True)
        torch.mm(a, b)
        assert work is not None
        work.wait()

    matmul_s, a2a_s, both_s = _medians([matmul, a2a, both], reps, warmup)
    return OverlapTiming(nbytes=nbytes, matmul_n=matmul_n, matmul_s=matmul_s, a2a_s=a2a_s, both_s=both_s)


def _matching_matmul_n(target_s: float, reps: int) -> int:
    """A square matmul size whose time is close to ``target_s`` on the slowest rank (same n everywhere:
    the probe time is MAX-reduced). Cost grows as n³; n is a multiple of 64 in 128..4096."""
    probe_n = 512
    a = torch.randn(probe_n, probe_n)
    t = _median_max(lambda: torch.mm(a, a), reps, 1)
    n = probe_n * (target_s / t) ** (1 / 3)
    return int(min(4096, max(128, round(n / 64) * 64)))


def measure_links(
    rank: int, world_size: int, *, procs_per_node: int, nbytes: int, reps: int = 5, warmup: int = 1
) -> LinkTiming:
    """Time an AlltoAll of ``nbytes`` per rank on the intra- and on the inter-node groups."""
    return _time_links(_groups(world_size, procs_per_node), nbytes, reps, warmup)


def measure_overlap(
    rank: int,
    world_size: int,
    *,
    procs_per_node: int,
    nbytes: int,
    matmul_n: int | None = None,
    reps: int = 5,
    warmup: int = 1,
) -> OverlapTiming:
    """Time a ``matmul_n``-square matmul, an inter-node AlltoAll of ``nbytes``, and both overlapped.
    ``matmul_n=None`` sizes the matmul to take about as long as the AlltoAll (the hardest case)."""
    groups = _groups(world_size, procs_per_node)
    if matmul_n is None:
        matmul_n = _matching_matmul_n(_time_links(groups, nbytes, reps, warmup).inter_s, reps)
    return _time_overlap(groups, nbytes, matmul_n, reps, warmup)


@dataclass(frozen=True)
class LinkSurvey:
    """:func:`survey`'s result: link timings per message size, then one overlap measurement."""

    links: tuple[LinkTiming, ...]
    overlap: OverlapTiming | None


def survey(
    rank: int,
    world_size: int,
    *,
    procs_per_node: int,
    sizes: tuple[int, ...],
    overlap_nbytes: int | None,
    reps: int = 5,
    warmup: int = 1,
) -> LinkSurvey:
    """:func:`measure_links` for every size and :func:`measure_overlap` (matched matmul), on one set
    of groups: what ``benchmarks/cluster_links.py`` runs per cluster."""
    groups = _groups(world_size, procs_per_node)
    links = tuple(_time_links(groups, n, reps, warmup) for n in sizes)
    overlap = None
    if overlap_nbytes is not None:
        n = _matching_matmul_n(_time_links(groups, overlap_nbytes, reps, warmup).inter_s, reps)
        overlap = _time_overlap(groups, overlap_nbytes, n, reps, warmup)
    return LinkSurvey(links=links, overlap=overlap)


@dataclass(frozen=True)
class ClusterSurvey:
    """:func:`survey` on one emulated cluster, with the wall time and the machine's load around it."""

    spec: EmulatedClusterSpec
    survey: LinkSurvey
    wall_s: float
    load_avg_1m: float  # the higher of before and after

    @property
    def oversubscribed(self) -> bool:
        """Other work competed for the CPUs (the cluster's own ranks add ``world_size`` to the load);
        overlap and intra-node times suffer most."""
        return self.load_avg_1m > (os.cpu_count() or 1) + self.spec.world_size

    def to_json(self) -> dict[str, Any]:
        spec, tbf, overlap = self.spec, self.spec.tbf(), self.survey.overlap
        return {
            "link": spec.link,
            "rate_bits_per_s": spec.rate_bits,
            "tbf": None if tbf is None else vars(tbf),
            "nodes": spec.nodes,
            "procs_per_node": spec.procs_per_node,
            "wall_s": self.wall_s,
            "load_avg_1m": self.load_avg_1m,
            "links": [
                {**vars(t), "ratio": t.ratio, "uplink_bits_per_s": t.uplink_bits_per_s} for t in self.survey.links
            ],
            "overlap": None if overlap is None else {**vars(overlap), "overlap_ratio": overlap.overlap_ratio},
        }


def survey_cluster(
    spec: EmulatedClusterSpec, *, sizes: Sequence[int], overlap_nbytes: int | None, reps: int, timeout: float
) -> ClusterSurvey:
    """Build the emulated cluster of ``spec`` (needs root), run :func:`survey` on its ranks, remove it."""
    load_before = _load_avg()
    t0 = time.perf_counter()
    with EmulatedCluster(spec) as cluster:
        result = cluster.run_function(
            survey,
            procs_per_node=spec.procs_per_node,
            sizes=tuple(sizes),
            overlap_nbytes=overlap_nbytes,
            reps=reps,
            timeout=timeout,
        )[0]  # every rank holds the same MAX-reduced times
    wall_s = time.perf_counter() - t0
    return ClusterSurvey(spec=spec, survey=result, wall_s=wall_s, load_avg_1m=max(load_before, _load_avg()))


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# --- every MoE collective on its real group ------------------------------------------------------------

# collective name -> the group kind it runs on in a MoE layer
COLLECTIVE_GROUPS: dict[str, GroupKind] = {
    "all_to_all": "ep",
    "all_gather": "esp",
    "reduce_scatter": "esp",
    "all_reduce": "dense_dp",
}


@dataclass(frozen=True)
class CollectiveTiming:
    """Slowest-rank seconds per call of ``op`` on a message of ``nbytes`` (see the module doc) on this
    rank's group of its kind: the median and every sample."""

    op: str
    group: GroupKind
    group_ranks: tuple[int, ...]
    intra: bool
    nbytes: int
    seconds: float
    samples_s: tuple[float, ...]


def _collective_call(op: str, nbytes: int, groups: ProcessGroups) -> Callable[[], object]:
    """A call of ``op`` on its group, with buffers for a message of ``nbytes`` (see the module doc)."""
    kind = COLLECTIVE_GROUPS[op]
    group, size = groups.group(kind), groups.size(kind)
    full, out = _a2a(nbytes, size)
    part = out[: full.numel() // size]  # one rank's share
    if op == "all_to_all":
        return lambda: all_to_all_into(out, full, group)
    if op == "all_gather":
        return lambda: all_gather_into(full, part, group)
    if op == "reduce_scatter":
        return lambda: reduce_scatter_into(part, full, group)
    return lambda: all_reduce_(full, group)


def measure_collectives(
    rank: int,
    world_size: int,
    *,
    dims: ParallelDims,
    sizes: Sequence[int],
    reps: int = 7,
    inner: int = 4,
    warmup: int = 2,
) -> list[CollectiveTiming]:
    """Time every collective of :data:`COLLECTIVE_GROUPS` at every size on the groups of ``dims``; all
    groups of a kind run at once, as in training. Every rank returns the same (MAX-reduced) seconds."""
    groups = build_groups(dims)
    timings = []
    for op, kind in COLLECTIVE_GROUPS.items():
        for nbytes in sizes:
            (samples,) = _samples([_collective_call(op, nbytes, groups)], reps, warmup, inner)
            timings.append(
                CollectiveTiming(
                    op=op,
                    group=kind,
                    group_ranks=tuple(groups.ranks[kind]),
                    intra=groups.is_intra(kind),
                    nbytes=nbytes,
                    seconds=statistics.median(samples),
                    samples_s=tuple(samples),
                )
            )
    return timings


@dataclass(frozen=True)
class AlphaBeta:
    """t = α + β·n by least squares: ``alpha_s`` seconds, ``beta_s_per_byte``, and R² of the fit."""

    alpha_s: float
    beta_s_per_byte: float
    r2: float

    @property
    def bytes_per_s(self) -> float:
        return 1.0 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else float("nan")


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> AlphaBeta:
    """Least-squares t = α + β·n over the points (the paper's §4 cost model of one collective)."""
    n = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), t, rcond=None)
    ss_res = float(np.sum((t - (alpha + beta * n)) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return AlphaBeta(alpha_s=float(alpha), beta_s_per_byte=float(beta), r2=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0)


@dataclass(frozen=True)
class CollectiveFit:
    """One collective across sizes (rank 0's group shown) and its α-β fit."""

    op: str
    timings: tuple[CollectiveTiming, ...]
    fit: AlphaBeta

    def to_json(self) -> dict[str, Any]:
        first = self.timings[0]
        return {
            "op": self.op,
            "group": first.group,
            "group_size": len(first.group_ranks),
            "rank0_group_ranks": list(first.group_ranks),
            "intra": first.intra,
            **vars(self.fit),
            "points": [{"bytes": t.nbytes, "seconds": t.seconds, "samples_s": list(t.samples_s)} for t in self.timings],
        }


def time_collectives(
    dims: ParallelDims, *, sizes: Sequence[int], reps: int, inner: int, warmup: int, timeout: float
) -> tuple[list[CollectiveFit], float]:
    """:func:`measure_collectives` on ``dims.world_size`` forked loopback ranks, fitted per collective;
    and the wall seconds, start-up included."""
    t0 = time.perf_counter()
    per_rank = run_distributed(
        measure_collectives,
        dims.world_size,
        dims=dims,
        sizes=list(sizes),
        reps=reps,
        inner=inner,
        warmup=warmup,
        timeout=timeout,
    )
    wall_s = time.perf_counter() - t0
    fits = []
    for op in COLLECTIVE_GROUPS:
        timings = tuple(t for t in per_rank[0] if t.op == op)  # every rank holds the same seconds
        fit = fit_alpha_beta([t.nbytes for t in timings], [t.seconds for t in timings])
        fits.append(CollectiveFit(op=op, timings=timings, fit=fit))
    return fits, wall_s
