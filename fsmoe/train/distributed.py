"""Distributed training glue: joining the ranks, gradient-norm clipping, and the launcher.

The layout (:class:`~fsmoe.config.ParallelConfig`) is validated with the rest of the job before any rank
starts, and again, identically, on every rank when it builds the job, so a bad layout raises the same
clear ``ValueError`` everywhere before any collective. :func:`setup` then joins the process group,
builds the groups, and compares a hash of the whole job across ranks (one 8-byte exchange).

:func:`launch` starts ``nproc`` local ranks through torch's own elastic launcher API (what ``torchrun``
uses), re-running this command line in each; when one rank fails, the launcher stops the others.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fsmoe.config import ParallelConfig
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups, config_hash_check
from fsmoe.parallel.grad_sync import REPLICA_ATTR


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    groups: ProcessGroups

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size a launcher (torchrun, :func:`launch`) gave this process, 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(par: ParallelConfig, config_for_hash: Any) -> DistContext | None:
    """Join the process group of a launched rank and build the groups; ``None`` for one process."""
    if not par.distributed:
        return None
    world = env_world_size()
    if world != par.nproc:
        raise ValueError(
            f"--nproc {par.nproc} does not match the launcher's WORLD_SIZE={world}; "
            "start with `fsmoe train --nproc N` or `torchrun --nproc-per-node N -m fsmoe train ...`"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=par.timeout_s))
    groups = build_groups(ParallelDims.from_config(par), channels=2)
    config_hash_check(config_for_hash)
    return DistContext(dist.get_rank(), dist.get_world_size(), groups)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def global_grad_norm(model: nn.Module, world: int, groups: ProcessGroups | None) -> torch.Tensor:
    """The L2 norm of the full model's gradient, after gradient sync. A parameter replicated on k ranks
    is counted 1/k times on each, so one all-reduce over the world sums every element exactly once."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        kind = getattr(p, REPLICA_ATTR, "world")
        copies = world if kind == "world" or groups is None else groups.size(kind)
        sq += p.grad.double().square().sum() / copies
    if groups is not None and world > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


def clip_grads_(model: nn.Module, max_norm: float, world: int, groups: ProcessGroups | None) -> float:
    norm = global_grad_norm(model, world, groups)
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return float(norm)


def launch(argv: Sequence[str], nproc: int, module: str = "fsmoe") -> int:
    """Run ``python -m <module> <argv>`` on ``nproc`` local ranks with torch's elastic launcher; returns
    0 when every rank succeeded, 1 otherwise (the launcher has then stopped the remaining ranks)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"fsmoe-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
    except ChildFailedError as err:
        print(f"fsmoe: a rank failed, all ranks were stopped:\n{err.format_msg()}", file=sys.stderr, flush=True)
        return 1
    return 0
