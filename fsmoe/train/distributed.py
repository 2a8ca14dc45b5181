"""Distributed training glue: the parallel config, start-up checks, and the launcher.

``ParallelConfig`` says how many ranks and how they split the work (MP, EP, ESP; the dense
data-parallel degree is world / MP). :func:`setup` runs on every rank: it validates everything that can
be checked from the config alone — the same pure checks on every rank, so a bad layout raises the same
clear ``ValueError`` everywhere before any collective — then joins the process group, builds the groups,
and compares a hash of the whole training config across ranks (one 8-byte exchange).

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

from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups, config_hash_check
from fsmoe.parallel.grad_sync import REPLICA_ATTR
from fsmoe.schedule.schedules import check_degrees, get_schedule

DISPATCHER_NAMES = ("a2a", "2dh", "1dh")


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """``nproc`` ranks in nodes of ``procs_per_node`` (``None``: all on one node); degrees mp, ep, esp;
    the MoE block's dispatcher and schedule with its pipeline degrees."""

    nproc: int = 1
    procs_per_node: int | None = None
    mp: int = 1
    ep: int = 1
    esp: int = 1
    dispatcher: str = "a2a"
    schedule: str = "sequential"
    r_fwd: int = 1
    r_bwd: int = 1
    gar_plan: str | None = None  # e.g. "moe:3=2MB,dense:3=ready"; None: the schedule's default plan
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.dispatcher not in DISPATCHER_NAMES:
            raise ValueError(f"unknown dispatcher {self.dispatcher!r}; choose one of {', '.join(DISPATCHER_NAMES)}")
        check_degrees(get_schedule(self.schedule), self.r_fwd, self.r_bwd)
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.mp > 1 and self.nproc % self.mp:
            raise ValueError(f"MP degree {self.mp} does not divide the {self.nproc} ranks")
        self.dims()  # validates the layout, naming the numbers

    @property
    def distributed(self) -> bool:
        return self.nproc > 1

    def dims(self) -> ParallelDims:
        return ParallelDims(
            world_size=self.nproc, procs_per_node=self.procs_per_node or self.nproc,
            dp=self.nproc // self.mp, mp=self.mp, ep=self.ep, esp=self.esp,
        )


def check_model_fits(par: ParallelConfig, *, num_experts: int, d_hidden: int, n_heads: int, seq_len: int,
                     batch_size: int) -> None:
    """Pure checks of the model and batch against the layout (run on every rank before any collective)."""
    dims = par.dims()
    problems = []
    if num_experts % par.ep:
        problems.append(f"number of experts E={num_experts} is not divisible by EP={par.ep}")
    if d_hidden % par.esp:
        problems.append(f"expert hidden dim H={d_hidden} is not divisible by ESP={par.esp}")
    if n_heads % par.mp:
        problems.append(f"attention heads {n_heads} are not divisible by MP={par.mp}")
    if seq_len % par.mp:
        problems.append(f"sequence length {seq_len} is not divisible by MP={par.mp} (sequence parallelism)")
    if batch_size % dims.dense_dp:
        problems.append(f"global batch {batch_size} is not divisible by the dense data-parallel degree {dims.dense_dp}")
    if problems:
        raise ValueError("; ".join(problems))


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
    groups = build_groups(par.dims(), channels=2)
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
