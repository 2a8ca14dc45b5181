"""Parallel degrees, the rank layout, and the process groups built from them.

Degrees (the paper's N_DP, N_MP, N_EP, N_ESP; world size P; ppn = processes per node):

* ``mp``  — Megatron tensor parallelism of the dense part (attention), with sequence parallelism.
* ``dp``  — data parallelism of the dense part: the number of distinct mini-batch shards, so
  ``dp * mp == world_size``. This is the paper's N_DP (Fig. 2: N_DP = N_MP = N_EP = N_ESP = 2 on 4 GPUs).
  ``dense_dp`` is the same number; the dense Gradient-AllReduce runs over a dense-DP group.
* ``ep``  — expert parallelism: the AlltoAll dispatch/combine group size.
* ``esp`` — expert sharding: each expert's hidden dim H is split ``esp`` ways (AllGather/ReduceScatter).
* ``expert_dp = world_size / (ep * esp)`` — how many replicas each expert shard has; the expert
  gradients are all-reduced over an expert-DP group. It is derived, never given.

Layout (the paper's evaluated layout, §6.1, and [C] ``moe_init``). Ranks are numbered node-major:
node n holds ranks ``n*ppn .. n*ppn + ppn - 1``.

* MP groups: ``mp`` contiguous ranks ``{k*mp, ..., k*mp + mp - 1}``. They must not cross a node, so
  ``mp`` divides ``ppn``.
* dense-DP groups: the ranks with the same MP index, stride ``mp``: ``{i, i + mp, i + 2*mp, ...}``.
* ESP groups: ``esp`` contiguous ranks; ``esp`` divides ``ppn``.
* EP groups: the world is cut into expert-parallel blocks of ``ep * esp`` contiguous ranks; inside
  block b the EP group of ESP index i is ``{b*ep*esp + i + j*esp : j < ep}`` (stride ``esp``). With
  ``esp == ppn`` these are the ranks with the same local rank on ``ep`` consecutive nodes.
* expert-DP groups: the ranks at the same position in every block, stride ``ep * esp``: they hold the
  same expert shard.

The paper's configuration is ``mp == esp == ppn`` and ``ep == number of nodes``: MP/ESP traffic is
intra-node, AlltoAll and dense Gradient-AllReduce are inter-node, and ``expert_dp == 1``. ``mp`` and
``esp`` are independent here (``mp = 1`` is allowed); ``mp`` need not equal ``esp``.

Whether a group is intra-node (all its ranks on one node) is a property of the group, not of its
kind: for odd layouts (an EP block straddling a node boundary) it can differ between ranks, so it is
asked per rank (:meth:`ParallelDims.is_intra`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.distributed as dist

from fsmoe.config import ParallelConfig, check_layout
from fsmoe.parallel.comm import all_gather_into, collective_device

GroupKind = Literal["mp", "dense_dp", "esp", "ep", "expert_dp"]
# The order in which build_groups creates groups; torch requires the same order on every rank.
GROUP_KINDS: tuple[GroupKind, ...] = ("mp", "dense_dp", "esp", "ep", "expert_dp")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits: its node, and its index inside each of its groups."""

    rank: int
    node: int
    local_rank: int
    dp: int  # index in its dense-DP group (= which mini-batch shard)
    mp: int  # index in its MP group
    ep: int  # index in its EP group
    esp: int  # index in its ESP group (= which H/esp shard of its experts)
    expert_dp: int  # index in its expert-DP group (= which replica of its expert shard)


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    """Validated parallel degrees. Pure: nothing here talks to ``torch.distributed``."""

    world_size: int
    procs_per_node: int
    dp: int
    mp: int = 1
    ep: int = 1
    esp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "procs_per_node", "dp", "mp", "ep", "esp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be an int >= 1, got {value!r}")
        if self.dp * self.mp != self.world_size:
            raise ValueError(
                f"ParallelDims: dp*mp must equal world_size (dense layout), "
                f"got dp={self.dp} * mp={self.mp} = {self.dp * self.mp} != world_size={self.world_size}"
            )
        try:  # the layout rules live in one place, shared with the job config
            check_layout(world_size=self.world_size, procs_per_node=self.procs_per_node, mp=self.mp, ep=self.ep,
                         esp=self.esp)
        except ValueError as e:
            raise ValueError(f"ParallelDims: {e}") from None

    @classmethod
    def from_config(cls, par: ParallelConfig) -> ParallelDims:
        """The layout of a job's :class:`~fsmoe.config.ParallelConfig` (dense data parallelism over world/mp)."""
        return cls(world_size=par.nproc, procs_per_node=par.ppn, dp=par.dense_dp, mp=par.mp, ep=par.ep, esp=par.esp)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.procs_per_node

    @property
    def dense_dp(self) -> int:
        """Dense data-parallel degree, world/mp (equal to ``dp``)."""
        return self.world_size // self.mp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard, world/(ep*esp)."""
        return self.world_size // (self.ep * self.esp)

    def node_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.procs_per_node

    def rank_layout(self, rank: int) -> RankCoords:
        """The coordinates of ``rank``; each index is its position in the matching group."""
        self._check_rank(rank)
        block = self.ep * self.esp
        return RankCoords(
            rank=rank,
            node=rank // self.procs_per_node,
            local_rank=rank % self.procs_per_node,
            dp=rank // self.mp,
            mp=rank % self.mp,
            ep=(rank % block) // self.esp,
            esp=rank % self.esp,
            expert_dp=rank // block,
        )

    def group_ranks(self, kind: GroupKind) -> tuple[tuple[int, ...], ...]:
        """Every group of ``kind``, each as its sorted ranks, in a fixed order; they partition the world."""
        P, mp, ep, esp = self.world_size, self.mp, self.ep, self.esp
        block = ep * esp
        if kind == "mp":
            return tuple(tuple(range(k * mp, (k + 1) * mp)) for k in range(P // mp))
        if kind == "dense_dp":
            return tuple(tuple(range(i, P, mp)) for i in range(mp))
        if kind == "esp":
            return tuple(tuple(range(k * esp, (k + 1) * esp)) for k in range(P // esp))
        if kind == "ep":
            return tuple(
                tuple(b * block + i + j * esp for j in range(ep)) for b in range(P // block) for i in range(esp)
            )
        if kind == "expert_dp":
            return tuple(tuple(range(p, P, block)) for p in range(block))
        raise ValueError(f"unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")

    def group_of(self, kind: GroupKind, rank: int) -> tuple[int, ...]:
        """The ranks of the group of ``kind`` that contains ``rank``."""
        self._check_rank(rank)
        return next(g for g in self.group_ranks(kind) if rank in g)

    def is_intra(self, kind: GroupKind, rank: int) -> bool:
        """True when every rank of ``rank``'s group of ``kind`` is on ``rank``'s node."""
        return len({r // self.procs_per_node for r in self.group_of(kind, rank)}) == 1

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size={self.world_size}")


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups. ``channels[c][kind]`` is the group of ``kind`` on channel c: each
    channel is a separate set of communicators, so collectives on different channels can run
    concurrently while those on one channel run in issue order. Channel 0 is the default."""

    dims: ParallelDims
    rank: int
    ranks: Mapping[str, tuple[int, ...]]
    channels: tuple[Mapping[str, dist.ProcessGroup], ...]

    def group(self, kind: GroupKind, channel: int = 0) -> dist.ProcessGroup:
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")
        if not 0 <= channel < len(self.channels):
            raise ValueError(f"channel {channel} out of range; {len(self.channels)} channel(s) were built")
        return self.channels[channel][kind]

    def is_intra(self, kind: GroupKind) -> bool:
        return self.dims.is_intra(kind, self.rank)

    def size(self, kind: GroupKind) -> int:
        return len(self.ranks[kind])


def build_groups(dims: ParallelDims, *, backend: str | None = None, channels: int = 1,
                 timeout: timedelta | None = None) -> ProcessGroups:
    """Create every group of every kind, ``channels`` times, and keep this rank's. ``timeout`` bounds every
    collective on them (without it a subgroup takes torch's default — 30 min on gloo — not the default
    group's, so a stopped peer would block its subgroup's collectives that long).

    ``dist.new_group`` is collective over the whole world, so every rank creates every group in the
    same order (channel, then :data:`GROUP_KINDS`, then :meth:`ParallelDims.group_ranks`), including
    groups it is not in. Call it once, after ``init_process_group``, on all ranks.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed to be initialised (init_process_group)")
    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"build_groups: the process group has world size {dist.get_world_size()}, "
            f"but ParallelDims has world_size={dims.world_size}"
        )
    if channels < 1:
        raise ValueError(f"build_groups: channels must be >= 1, got {channels}")
    rank = dist.get_rank()
    built: list[Mapping[str, dist.ProcessGroup]] = []
    for _ in range(channels):
        mine: dict[str, dist.ProcessGroup] = {}
        for kind in GROUP_KINDS:
            for ranks in dims.group_ranks(kind):
                pg = dist.new_group(list(ranks), backend=backend, timeout=timeout)
                if rank in ranks:
                    mine[kind] = pg
        built.append(MappingProxyType(mine))
    return ProcessGroups(
        dims=dims,
        rank=rank,
        ranks=MappingProxyType({kind: dims.group_of(kind, rank) for kind in GROUP_KINDS}),
        channels=tuple(built),
    )


def config_hash_check(obj: Any, group: dist.ProcessGroup | None = None) -> int:
    """Check that ``repr(obj)`` is the same on every rank of ``group``; return its 64-bit hash.

    Every rank hashes ``repr(obj)`` (sha256, first 8 bytes as an int64) and all-gathers the hashes: one
    8-byte exchange, meant for start-up before any data collective. If they differ, every rank raises
    the same ``ValueError``, listing which (global) ranks hold which hash.
    """
    digest = hashlib.sha256(repr(obj).encode()).digest()
    mine = int.from_bytes(digest[:8], "little", signed=True)
    size = dist.get_world_size(group)
    device = collective_device(group)
    hashes = torch.empty(size, dtype=torch.int64, device=device)
    all_gather_into(hashes, torch.tensor([mine], dtype=torch.int64, device=device), group)
    global_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    by_hash: dict[int, list[int]] = {}
    for r, h in zip(global_ranks, hashes.tolist(), strict=True):
        by_hash.setdefault(h, []).append(r)
    if len(by_hash) > 1:
        parts = "; ".join(f"ranks {ranks} have {h & (2**64 - 1):016x}" for h, ranks in by_hash.items())
        raise ValueError(
            f"config differs across ranks (sha256 of repr, first 8 bytes): {parts}. "
            "Launch every rank with the same configuration."
        )
    return mine
