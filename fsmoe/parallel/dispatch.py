"""Distributed dispatchers: the EP AlltoAll routes and the ESP AllGather / ReduceScatter.

Legend: E experts in total, W = N_EP, e = E / W local experts, C capacity slots, D model dim,
S = N_ESP, N nodes, L EP ranks per node.

Each implements :class:`fsmoe.moe.dispatch.Dispatcher` (the local dispatcher is their numerical
reference) and ships the same pieces — this rank's (E, C, D) slots cut into W pieces of e experts,
piece w to EP rank w — differing only in the route (``exchange``). ESP (expert sharding) is common to
all: AllGather the received slots over the ESP group before the expert, ReduceScatter the partial
outputs after it (paper Fig. 2). Registry: :data:`DISPATCHERS`, names :data:`fsmoe.config.DISPATCHER_NAMES`;
``"local"`` is the single-device default.

Capacity agreement: every forward takes the max C over the EP × ESP block (one all-reduce), unless the
dispatcher was built with ``equal_tokens=True`` and the gate's C is static; then the block exchanges
only when (T, C) changes, to verify the promise (see :class:`_ExpertParallel`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.config import DISPATCHER_NAMES
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.parallel.comm import all_gather, all_to_all, collective_device, reduce_scatter
from fsmoe.parallel.dims import ProcessGroups

LOCAL = "local"


class _ExpertParallel(Dispatcher):
    """EP over the ``ep`` group and ESP over the ``esp`` group of ``channel``; subclasses pick the route.

    **Capacity agreement.** Equal-split AlltoAll and AllGather need one C on every rank of the EP × ESP
    block. By default :meth:`agree_capacity` takes the max over the block in every forward: one blocking
    all-reduce per MoE layer per forward (a cross-node round trip, and on an oversubscribed CPU host a
    few scheduler wake-ups), which DeepSpeed-MoE does not pay. ``equal_tokens=True`` is the caller's
    promise that every rank of the block routes the same number of tokens T in every forward (the
    trainer's ranks each get batch_size/dense_dp sequences of seq_len/mp tokens). A gate whose C is a
    pure function of T and its config (``Gate.static_capacity``: a fixed capacity factor) then gives
    every rank the same C without an exchange.

    The promise is checked, not trusted blindly. The dispatcher remembers the one (T, C) the whole block
    last verified; a forward at that (T, C) exchanges nothing, and a forward at any other (T, C)
    exchanges once to verify that every rank has that same T and C, raising the same ``ValueError`` on
    every rank otherwise (no rank is left waiting). Remembering one shape, not every shape seen, matters:
    verifications are collective, so the remembered shape is the same on every rank, and ranks whose
    T differ cannot all skip the check (with a set of shapes, two ranks at two different remembered
    shapes would both skip it and run an AlltoAll of mismatched sizes, which NCCL need not detect).
    What a per-shape check cannot turn into a clean error without a collective per forward is a rank
    that breaks the promise while the others stay at the remembered shape: that rank verifies while the
    others run their AlltoAll, a collective mismatch (gloo aborts on the size mismatch or times out;
    NCCL blocks until the group timeout). That is why this is an opt-in promise, made by callers that
    feed equal batches (:func:`fsmoe.parallel.parallelize.parallelize_gpt` for the trainer), and not
    the default. Non-static gates (``capacity_factor=None``: C is the busiest expert's load,
    data-dependent) exchange in every forward whatever the promise."""

    def __init__(self, groups: ProcessGroups, channel: int = 0, *, equal_tokens: bool = False) -> None:
        self.groups = groups
        self.ep_group = groups.group("ep", channel)
        self.esp_group = groups.group("esp", channel)
        self.ep_size = groups.size("ep")
        self.esp_size = groups.size("esp")
        self.esp_rank = groups.ranks["esp"].index(groups.rank)
        self.equal_tokens = equal_tokens
        self._verified: tuple[int, int] | None = None  # the (T, C) the whole block last verified it shares

    def agree_capacity(self, capacity: int, *, num_tokens: int | None = None, static: bool = False) -> int:
        if self.equal_tokens and static and num_tokens is not None:
            if (num_tokens, capacity) != self._verified:
                self._verify_shared(num_tokens, capacity)
                self._verified = (num_tokens, capacity)
            return capacity
        return self._max_over_block([capacity])[0]

    def _max_over_block(self, values: list[int]) -> list[int]:
        # Syncs (an all-reduce and a .tolist()): the elementwise max over the EP group, then over the ESP
        # group, is the max over the EP × ESP block.
        v = torch.tensor(values, dtype=torch.long, device=collective_device(self.ep_group))
        for group, size in ((self.ep_group, self.ep_size), (self.esp_group, self.esp_size)):
            if size > 1:
                dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
        return v.tolist()

    def _verify_shared(self, num_tokens: int, capacity: int) -> None:
        """Check the ``equal_tokens`` promise at a changed (T, C): one exchange of (max, -min) of both; every
        rank gets the same numbers, so every rank raises alike when they differ."""
        t_max, neg_t_min, c_max, neg_c_min = self._max_over_block([num_tokens, -num_tokens, capacity, -capacity])
        if t_max != -neg_t_min or c_max != -neg_c_min:
            raise ValueError(
                f"equal_tokens: this dispatcher was promised the same token count on every rank of its EP x ESP "
                f"block, but the ranks route T = {-neg_t_min}..{t_max} tokens with capacity C = {-neg_c_min}..{c_max} "
                f"(this rank: T={num_tokens}, C={capacity}); give every rank equal batches, or build the "
                f"dispatcher with equal_tokens=False (parallelize_gpt(..., equal_tokens=False))"
            )

    def gather_shards(self, x_eCD: Tensor) -> Tensor:
        if self.esp_size == 1:
            return x_eCD
        S, (e, C, D) = self.esp_size, x_eCD.shape
        g_SeCD = all_gather(x_eCD, self.esp_group, dim=0).view(S, e, C, D)
        return g_SeCD.transpose(0, 1).reshape(e, S * C, D)

    def reduce_shards(self, y_eCD: Tensor) -> Tensor:
        if self.esp_size == 1:
            return y_eCD
        S, (e, SC, D) = self.esp_size, y_eCD.shape
        y_SeCD = y_eCD.view(e, S, SC // S, D).transpose(0, 1).reshape(S * e, SC // S, D)
        return reduce_scatter(y_SeCD, self.esp_group, dim=0)


class AllToAllDispatcher(_ExpertParallel):
    """``a2a``: one flat AlltoAll over the EP group (NCCL-A2A in the paper)."""

    name = "a2a"

    def exchange(self, buf_WX: Tensor) -> Tensor:
        shape = buf_WX.shape
        return all_to_all(buf_WX.reshape(shape[0], -1), self.ep_group).view(shape)


def _nodes_of(members: tuple[int, ...], procs_per_node: int) -> list[list[int]]:
    """Split a group's ranks by node; hierarchical routes need the same count L on every node."""
    by_node: dict[int, list[int]] = {}
    for r in members:
        by_node.setdefault(r // procs_per_node, []).append(r)
    nodes = [by_node[n] for n in sorted(by_node)]
    if len({len(n) for n in nodes}) != 1 or sorted(members) != [r for n in nodes for r in n]:
        raise ValueError(
            f"hierarchical AlltoAll needs the EP group {list(members)} to have the same number of ranks "
            f"on every node (procs_per_node={procs_per_node}), got {[len(n) for n in nodes]}"
        )
    return nodes


class _Hierarchical(_ExpertParallel):
    """Builds, for every EP group, its intra-node subgroups (one per node) and its inter-node subgroups
    (ranks with the same local index on every node). ``new_group`` is collective over the world, so
    every rank builds all of them in the same order."""

    def __init__(self, groups: ProcessGroups, channel: int = 0, *, equal_tokens: bool = False) -> None:
        super().__init__(groups, channel, equal_tokens=equal_tokens)
        ppn, me = groups.dims.procs_per_node, groups.rank
        self.intra_group: dist.ProcessGroup | None = None
        self.inter_group: dist.ProcessGroup | None = None
        for members in groups.dims.group_ranks("ep"):
            nodes = _nodes_of(members, ppn)
            for node in nodes:
                g = dist.new_group(node)
                if me in node:
                    self.intra_group, self.num_nodes, self.local_size = g, len(nodes), len(node)
                    self.local_index = node.index(me)
            for l in range(len(nodes[0])):
                ranks = [node[l] for node in nodes]
                g = dist.new_group(ranks)
                if me in ranks:
                    self.inter_group = g


class TwoDHDispatcher(_Hierarchical):
    """``2dh`` (Tutel / DeepSpeed-MoE): an intra-node AlltoAll by destination local index, then an
    inter-node AlltoAll among ranks with the same local index. With W = N·L (N nodes, L EP ranks per
    node), piece (n, l) first moves to local rank l of this node, then to node n."""

    name = "2dh"

    def exchange(self, buf_WX: Tensor) -> Tensor:
        N, L, shape = self.num_nodes, self.local_size, buf_WX.shape
        by_local_LNX = buf_WX.reshape(N, L, -1).transpose(0, 1).reshape(L * N, -1)
        got_LNX = all_to_all(by_local_LNX, self.intra_group)  # (L_src, N_dst, X)
        by_node_NLX = got_LNX.view(L, N, -1).transpose(0, 1).reshape(N * L, -1)
        return all_to_all(by_node_NLX, self.inter_group).view(shape)  # (N_src, L_src, X) = W_src


class OneDHDispatcher(_Hierarchical):
    """``1dh`` (HetuMoE): every rank sends its whole buffer to its node leader (local index 0); the
    leaders exchange one aggregated message per node pair; each leader scatters back to its node.
    Gather and scatter are AlltoAlls with one-sided splits, so autograd takes the adjoints."""

    name = "1dh"

    def exchange(self, buf_WX: Tensor) -> Tensor:
        N, L, shape = self.num_nodes, self.local_size, buf_WX.shape
        flat = buf_WX.reshape(-1)
        n = flat.numel()  # equal on every rank: W pieces of one size
        leader = self.local_index == 0
        to_leader = [n if dst == 0 else 0 for dst in range(L)]
        from_all = [n] * L if leader else [0] * L
        gathered = all_to_all(flat, self.intra_group, from_all, to_leader)  # leader: (L_src, N, L_dst, X)
        if leader:
            by_node = gathered.view(L, N, L, -1).permute(1, 2, 0, 3).reshape(-1)  # (N_dst, L_dst, L_src, X)
            got = all_to_all(by_node, self.inter_group).view(N, L, L, -1)  # (N_src, L_dst, L_src, X)
            send = got.permute(1, 0, 2, 3).reshape(-1)  # (L_dst, N_src, L_src, X)
        else:
            send = gathered  # empty, but it keeps the gather in this rank's graph: backward must join it
        scatter_splits = [n if leader else 0 for _ in range(L)]
        from_leader = [n if src == 0 else 0 for src in range(L)]
        return all_to_all(send, self.intra_group, from_leader, scatter_splits).view(shape)


DISPATCHERS: dict[str, type[_ExpertParallel]] = {
    "a2a": AllToAllDispatcher,
    "2dh": TwoDHDispatcher,
    "1dh": OneDHDispatcher,
}
assert tuple(DISPATCHERS) == DISPATCHER_NAMES


def build_dispatcher(
    name: str, groups: ProcessGroups | None = None, channel: int = 0, *, equal_tokens: bool = False
) -> Dispatcher:
    """The dispatcher ``name``: ``"local"`` (no communication) or one of :data:`DISPATCHERS`, which
    need this rank's :class:`ProcessGroups` and use their communicators of ``channel``. ``equal_tokens``:
    the caller's promise of equal token counts on every rank, which lets static capacities skip the
    per-forward agreement (see :class:`_ExpertParallel`)."""
    if name == LOCAL:
        return Dispatcher()
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; choose one of {', '.join((LOCAL, *DISPATCHERS))}")
    if groups is None:
        raise ValueError(f"dispatcher {name!r} needs process groups (fsmoe.parallel.dims.build_groups)")
    return DISPATCHERS[name](groups, channel, equal_tokens=equal_tokens)
