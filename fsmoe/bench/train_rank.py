"""The train benchmark as one rank runs it (started on every rank by :func:`fsmoe.bench.train.run_train_bench`).

Legend: B global batch, L sequence length.

1. Load the corpus; for every layout the rows need, build the process groups once (two channels).
2. Per row: our model exactly as ``fsmoe train`` builds it (:func:`~fsmoe.train.trainer.build_model`,
   :func:`~fsmoe.train.trainer.build_optimizer`, :func:`~fsmoe.train.trainer.build_grad_sync`), or the
   DeepSpeed-MoE twin (:mod:`fsmoe.bench.deepspeed_train`), each with its own batch sampler seeded
   alike, so step i of every row trains on the same batch.
3. ``warmup_steps`` + ``steps`` rounds (:func:`fsmoe.bench.rank.timed_rounds`): a round runs one
   :func:`~fsmoe.train.trainer.train_step` of every row in a rotated order, each after a barrier;
   one MAX all-reduce per round gives every run's slowest rank.
4. Every step's LM loss, averaged over the ranks (one all-reduce at the end).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.bench.config import DEEPSPEED
from fsmoe.bench.rank import timed_rounds
from fsmoe.bench.train_config import TrainBenchConfig, TrainImpl
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups
from fsmoe.parallel.grad_plan import PlannedGradSync
from fsmoe.parallel.grad_sync import GradSync
from fsmoe.schedule.schedules import get_schedule
from fsmoe.train.data import Corpus, load_corpus
from fsmoe.train.distributed import DistContext
from fsmoe.train.trainer import (
    RankBatches,
    TrainConfig,
    build_grad_sync,
    build_model,
    build_optimizer,
    train_step,
)


@dataclass
class TrainRun:
    """One row, ready on this rank: ``run()`` is one optimizer step on the row's next batch."""

    impl: TrainImpl
    cfg: TrainConfig
    ctx: DistContext
    model: nn.Module
    opt: torch.optim.Optimizer
    sync: GradSync | PlannedGradSync
    batches: RankBatches
    note: str = ""
    losses: list[Tensor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.impl.name

    def run(self) -> None:
        step = len(self.losses) + 1
        out = train_step(self.model, self.opt, self.sync, self.batches.sample(), step, self.cfg, self.ctx)
        assert out.loss is not None
        self.losses.append(out.loss.detach())


@dataclass
class TrainRankResult:
    """What one rank sends back. ``samples_s`` are slowest-rank seconds per timed step (the same on every
    rank); ``losses`` every step's LM loss averaged over the ranks (warm-up steps included)."""

    rank: int
    rows: list[str]
    samples_s: dict[str, list[float]]
    losses: dict[str, list[float]]
    notes: dict[str, str]
    skipped: dict[str, str]
    busy_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # rank 0: machine CPU-seconds per run
    ranks_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # rank 0: all ranks' CPU-seconds per run
    cpu_count: int = 1
    num_params: dict[str, int] = field(default_factory=dict)  # this rank's parameters per row
    wall_s: float = 0.0


def _build_run(cfg: TrainBenchConfig, impl: TrainImpl, ctx: DistContext, corpus: Corpus) -> TrainRun | str:
    tcfg = cfg.train_config(impl)
    if impl.spec.family == DEEPSPEED:
        from fsmoe.bench.deepspeed_train import build_deepspeed_twin  # imports DeepSpeed only when asked

        built = build_deepspeed_twin(tcfg, ctx, cfg.threads)
        if isinstance(built, str):
            return built
        model, note = built
        sync: GradSync | PlannedGradSync = GradSync(model, ctx.groups)
    else:
        model = build_model(tcfg, ctx)
        sync = build_grad_sync(model, tcfg, ctx)
        spec = get_schedule(impl.spec.family)
        note = ("GAR inside the MoE backward (planned)" if spec.gar_in_moe
                else "GAR overlapped with the dense backward" if spec.gar_overlap_dense else "GAR after the backward")
    model.train()
    batches = RankBatches(corpus.train_N, tcfg, tcfg.seed, ctx)
    return TrainRun(impl, tcfg, ctx, model, build_optimizer(model, tcfg), sync, batches, note=note)


def train_bench_rank(rank: int, world_size: int, cfg: TrainBenchConfig) -> TrainRankResult:
    """Run the benchmark of ``cfg`` on this rank (inside an initialised gloo world of ``world_size``)."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.train_config(cfg.impls()[0]).data, cfg.model_config().seq_len)
    groups: dict[ParallelDims, ProcessGroups] = {}
    runs: list[TrainRun] = []
    skipped: dict[str, str] = {}
    ds_unable = cfg.deepspeed_unable()
    for impl in cfg.impls():
        if impl.spec.family == DEEPSPEED and ds_unable is not None:
            skipped[impl.name] = ds_unable
            continue
        dims = impl.parallel.dims()
        if dims not in groups:  # the same order on every rank: impls() is pure
            groups[dims] = build_groups(dims, channels=2)
        built = _build_run(cfg, impl, DistContext(rank, world_size, groups[dims]), corpus)
        if isinstance(built, str):
            skipped[impl.name] = built
        else:
            runs.append(built)
    samples, busy, ours = timed_rounds(runs, cfg.warmup_steps, cfg.steps, rank)
    losses = {}
    for run in runs:  # rank means of every step's loss (one all-reduce per row, after the timing)
        loss_S = torch.stack(run.losses).double()
        dist.all_reduce(loss_S)
        losses[run.name] = (loss_S / world_size).tolist()
    dist.barrier()  # no rank starts tearing its groups down while a peer is still in the last exchange
    return TrainRankResult(
        rank=rank, rows=[r.name for r in runs], samples_s=samples, losses=losses,
        notes={r.name: r.note for r in runs}, skipped=skipped, busy_cpu_s=busy, ranks_cpu_s=ours,
        cpu_count=os.cpu_count() or 1, num_params={r.name: sum(p.numel() for p in r.model.parameters()) for r in runs},
        wall_s=time.perf_counter() - start,
    )
