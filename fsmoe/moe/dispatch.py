"""Dispatch / Combine: move the expert layout to the ranks that own the experts, and back.

Legend: E experts in total, e = E / N_EP local experts, C capacity slots, D model dim.

``dispatch(x_ECD) -> x_eC'D`` hands each local expert every slot addressed to it (C' = C times the
number of source ranks); ``combine(y_eC'D) -> y_ECD`` is its inverse. The local dispatcher moves
nothing and is the numerical reference for the distributed ones, which share its signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.parallel.comm import all_gather, all_to_all, reduce_scatter

if TYPE_CHECKING:
    from fsmoe.parallel.dims import ProcessGroups


class Dispatcher:
    """Base and local (single-device) dispatcher: identity both ways, all E experts are local and
    unsharded. Distributed dispatchers override the steps; the scheduler may call the steps one by one
    (``exchange`` is the EP AlltoAll, ``gather_shards``/``reduce_shards`` the ESP AllGather and
    ReduceScatter), ``dispatch``/``combine`` compose them."""

    name = "local"
    ep_size = 1
    esp_size = 1
    esp_rank = 0

    def num_local_experts(self, num_experts: int) -> int:
        if num_experts % self.ep_size:
            raise ValueError(
                f"number of experts E={num_experts} is not divisible by the EP degree {self.ep_size}"
            )
        return num_experts // self.ep_size

    def local_hidden(self, d_hidden: int) -> int:
        """The slice of the expert hidden dim H kept on this rank (H / N_ESP)."""
        if d_hidden % self.esp_size:
            raise ValueError(f"expert hidden dim H={d_hidden} is not divisible by the ESP degree {self.esp_size}")
        return d_hidden // self.esp_size

    @property
    def owns_output_bias(self) -> bool:
        """Partial expert outputs are summed over the ESP group, so one shard adds the output bias."""
        return self.esp_rank == 0

    def agree_capacity(self, capacity: int) -> int:
        """The capacity every rank that exchanges slots with this one uses (here: its own)."""
        return capacity

    def exchange(self, buf_WX: Tensor) -> Tensor:
        """Piece w of ``buf_WX`` (W = N_EP pieces) goes to EP rank w; returns the pieces received, by
        source rank. Its own adjoint, so dispatch and combine both use it."""
        return buf_WX

    def gather_shards(self, x_eCD: Tensor) -> Tensor:
        return x_eCD

    def reduce_shards(self, y_eCD: Tensor) -> Tensor:
        return y_eCD

    def dispatch(self, x_ECD: Tensor) -> Tensor:
        """(E, C, D) slots of this rank → (e, N_ESP·N_EP·C, D) slots of this rank's experts."""
        W = self.ep_size
        if W == 1 and self.esp_size == 1:
            return x_ECD
        E, C, D = x_ECD.shape
        e = E // W
        recv_WeCD = self.exchange(x_ECD.reshape(W, e, C, D))
        return self.gather_shards(recv_WeCD.transpose(0, 1).reshape(e, W * C, D))

    def combine(self, y_eCD: Tensor) -> Tensor:
        """Inverse of :meth:`dispatch`: (e, N_ESP·N_EP·C, D) → (E, C, D) back on the source rank."""
        W = self.ep_size
        if W == 1 and self.esp_size == 1:
            return y_eCD
        y_eCD = self.reduce_shards(y_eCD)
        e, WC, D = y_eCD.shape
        send_WeCD = y_eCD.view(e, W, WC // W, D).transpose(0, 1).contiguous()
        return self.exchange(send_WeCD).reshape(W * e, WC // W, D)


LocalDispatcher = Dispatcher


# ------------------------------------------------------------------------------------------------------
# Distributed dispatchers. Each ships the same pieces — this rank's (E, C, D) slots cut into W = N_EP
# pieces of e = E / W experts, piece w to EP rank w — and differs only in the route (``exchange``).
# ESP (expert sharding) is common to all: AllGather the received slots over the ESP group before the
# expert, ReduceScatter the partial outputs after it (paper Fig. 2).
# ------------------------------------------------------------------------------------------------------


class _ExpertParallel(Dispatcher):
    def __init__(self, groups: ProcessGroups, channel: int = 0) -> None:
        self.groups = groups
        self.ep_group = groups.group("ep", channel)
        self.esp_group = groups.group("esp", channel)
        self.ep_size = groups.size("ep")
        self.esp_size = groups.size("esp")
        self.esp_rank = groups.ranks["esp"].index(groups.rank)

    def agree_capacity(self, capacity: int) -> int:
        # Syncs: equal-split AlltoAll and AllGather need one C across the EP × ESP block; the max over
        # the EP group, then over the ESP group, is the max over the block.
        c = torch.tensor([capacity], dtype=torch.long)
        for group, size in ((self.ep_group, self.ep_size), (self.esp_group, self.esp_size)):
            if size > 1:
                dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
        return int(c.item())

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

    def __init__(self, groups: ProcessGroups, channel: int = 0) -> None:
        super().__init__(groups, channel)
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


DISPATCHERS: dict[str, type[Dispatcher]] = {
    "local": Dispatcher,
    "a2a": AllToAllDispatcher,
    "2dh": TwoDHDispatcher,
    "1dh": OneDHDispatcher,
}


def build_dispatcher(name: str, groups: ProcessGroups | None = None, channel: int = 0) -> Dispatcher:
    """The dispatcher ``name``; distributed ones need this rank's :class:`ProcessGroups`."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; choose one of {', '.join(DISPATCHERS)}")
    if name == "local":
        return Dispatcher()
    if groups is None:
        raise ValueError(f"dispatcher {name!r} needs process groups (fsmoe.parallel.build_groups)")
    return DISPATCHERS[name](groups, channel)  # type: ignore[call-arg]
