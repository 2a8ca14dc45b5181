"""Measure an emulated cluster from inside its ranks: intra- vs inter-node AlltoAll, and overlap.

Run these with :meth:`fsmoe.cluster.EmulatedCluster.run_function` (every rank calls them with its
rank and the world size). Groups follow :class:`fsmoe.parallel.dims.ParallelDims` with
``esp = procs_per_node`` and ``ep = nodes``: the ESP groups are the nodes (intra-node), the EP groups
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

Overlap (:func:`measure_overlap`): ``t_mm`` a matmul alone, ``t_a2a`` an inter-node AlltoAll alone,
``t_both`` the AlltoAll issued with ``async_op=True``, the matmul, then ``wait()``. The overlap ratio
``(t_mm + t_a2a - t_both) / min(t_mm, t_a2a)`` is 1 when the shorter one hides completely behind the
longer one and 0 when they run back to back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsmoe.parallel.comm import all_to_all_into
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups


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


def _sample(fn: Callable[[], None]) -> float:
    """One sample: barrier, time ``fn``, MAX over the world (a collective ends with its slowest rank)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt.item())


def _medians(fns: Sequence[Callable[[], None]], reps: int, warmup: int) -> list[float]:
    """Median of ``reps`` samples of each fn, interleaved rep by rep so that load drifting on a shared
    machine affects every fn alike."""
    for _ in range(warmup):
        for fn in fns:
            _sample(fn)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            samples[i].append(_sample(fn))
    return [statistics.median(s) for s in samples]


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
    group = groups.ep
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
