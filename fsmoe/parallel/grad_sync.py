"""Gradient synchronisation of replicated parameters (data parallelism), bucketed, after backward.

Every parameter is held by a set of ranks: dense parameters that no rank shards (embeddings, norms,
the gate) by the whole world; tensor-parallel shards (attention) by their dense-DP group; expert
shards by their expert-DP group. Its gradient on one rank covers only that rank's share of the loss
(plus what the model-parallel collectives already summed in), so the full gradient is the sum over
the ranks that hold the parameter. Each rank's loss is a mean over its own tokens, so the sum is
divided by the number of loss shards (the world size) to give the gradient of the global mean.

Gradients are flattened per replica group into buckets of ``bucket_bytes`` and all-reduced
asynchronously, bucket by bucket, in reverse registration order (roughly the order backward produces
them). :mod:`fsmoe.parallel.grad_plan` slides ranges of the same stream into the backward instead;
here they run after it. This module owns the replica marks and the plain after-backward sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.parallel.dims import ProcessGroups

REPLICA_ATTR = "fsmoe_replicas"  # on a Parameter: the group kind that holds its replicas
REPLICA_KINDS = ("world", "dense_dp", "expert_dp")


def replica_group(groups: ProcessGroups | None, kind: str) -> tuple[dist.ProcessGroup | None, int]:
    """The process group that holds the replicas of ``kind``, and its size (``world``: the default
    group; no groups: this process alone)."""
    if groups is None:
        return None, 1
    if kind == "world":
        return None, groups.dims.world_size
    return groups.group(kind), groups.size(kind)  # type: ignore[arg-type]


def mark_replicas(params: Iterable[nn.Parameter], kind: str) -> None:
    """Declare which ranks hold replicas of ``params`` (default for unmarked parameters: the world)."""
    if kind not in REPLICA_KINDS:
        raise ValueError(f"unknown replica kind {kind!r}; choose one of {', '.join(REPLICA_KINDS)}")
    for p in params:
        setattr(p, REPLICA_ATTR, kind)


@dataclass(frozen=True)
class Bucket:
    """One all-reduce: ``params`` of one replica ``kind``, flattened together (``numel`` elements)."""

    kind: str
    params: tuple[nn.Parameter, ...]
    numel: int


class GradSync:
    """``sync()`` after ``loss.backward()``: every gradient becomes the world-mean gradient."""

    def __init__(self, model: nn.Module, groups: ProcessGroups | None, bucket_bytes: int = 25 * 2**20) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.groups = groups
        self.world = 1 if groups is None else groups.dims.world_size
        by_kind: dict[str, list[nn.Parameter]] = {k: [] for k in REPLICA_KINDS}
        for p in model.parameters():
            if p.requires_grad:
                by_kind[getattr(p, REPLICA_ATTR, "world")].append(p)
        self.buckets: list[Bucket] = []
        for kind, params in by_kind.items():
            current: list[nn.Parameter] = []
            size = 0
            for p in reversed(params):
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= bucket_bytes:
                    self.buckets.append(Bucket(kind, tuple(current), sum(q.numel() for q in current)))
                    current, size = [], 0
            if current:
                self.buckets.append(Bucket(kind, tuple(current), sum(q.numel() for q in current)))

    @torch.no_grad()
    def sync(self) -> None:
        if self.world == 1:
            return
        pending: list[tuple[Bucket, Tensor, object]] = []
        for bucket in self.buckets:
            group, size = replica_group(self.groups, bucket.kind)
            flat = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket.params
            ])
            work = dist.all_reduce(flat, group=group, async_op=True) if size > 1 else None
            pending.append((bucket, flat, work))
        for bucket, flat, work in pending:
            if work is not None:
                work.wait()
            flat.div_(self.world)
            offset = 0
            for p in bucket.params:
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[offset : offset + n].view_as(p))
                offset += n
