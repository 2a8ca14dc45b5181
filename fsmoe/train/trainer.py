"""Single-process training of :class:`~fsmoe.models.gpt_moe.GPTMoE`: ``run_train(TrainConfig) -> TrainResult``.

The objective is the language-model loss plus the MoE layers' aux losses (already weighted by each
layer's ``MoEConfig`` coefficients). AdamW with linear warmup and cosine decay to ``min_lr_ratio · lr``.
Every ``log_every`` steps (and at the first and last step) one progress line is printed and one JSON
object appended to ``<out_dir>/metrics.jsonl``; the validation loss at the end goes to the result and to
``<out_dir>/summary.json``. Syncing reads (``.item()``, ``dropped_fraction``) happen only at those
logging points.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.models.gpt_moe import GPTMoE, GPTMoEConfig, ModelOutput, gpt2_moe_tiny
from fsmoe.moe.layer import MoEStats
from fsmoe.parallel.grad_plan import PlannedGradSync, greedy_plan, parse_plan
from fsmoe.parallel.grad_sync import GradSync
from fsmoe.parallel.parallelize import attach_gradient_plan, gpt_gradient_stream, parallelize_gpt
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime, chrome_trace
from fsmoe.schedule.schedules import get_schedule
from fsmoe.train.data import BatchSampler, DataConfig, load_corpus
from fsmoe.train.distributed import DistContext, ParallelConfig, check_model_fits, clip_grads_, setup, teardown

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One training run. ``max_seconds`` (optional) stops training early once that much wall time has
    been spent in training steps; ``threads=None`` leaves torch's intra-op thread count alone."""

    model: GPTMoEConfig = field(default_factory=gpt2_moe_tiny)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 50
    eval_iters: int = 20
    out_dir: str = "runs/default"
    threads: int | None = None
    max_seconds: float | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trace: str | None = None  # Chrome-trace JSON of the MoE blocks' tasks (rank 0), written at the end

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for torch's default), got {self.threads}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 (or None for no limit), got {self.max_seconds}")
        m = self.model
        check_model_fits(self.parallel, num_experts=m.moe.num_experts, d_hidden=m.moe.d_hidden,
                         n_heads=m.n_heads, seq_len=m.seq_len, batch_size=self.batch_size)


@dataclass(frozen=True)
class TrainResult:
    """``first_loss`` is the first step's LM loss, ``last_loss`` the mean LM loss over the last logging
    interval, ``val_loss`` the final validation LM loss; ``tokens_per_s`` counts training steps only."""

    first_loss: float
    last_loss: float
    val_loss: float
    steps: int
    tokens_per_s: float
    metrics_path: str


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 1-based ``step``: linear warmup over ``warmup`` steps, then cosine decay from
    ``lr`` to ``min_lr_ratio · lr`` at step ``steps``."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (incl. embeddings and the experts' stacked weights), none on
    biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def dropped_fraction(stats: Sequence[MoEStats]) -> float:
    """Dropped share of all routed assignments across the MoE layers of one forward.
    Syncs (an ``.item()``): call it only when logging."""
    if not stats:
        return 0.0
    dropped = torch.stack([torch.as_tensor(s.num_dropped) for s in stats]).sum().item()
    return float(dropped) / max(sum(s.num_assignments for s in stats), 1)


def _world_mean(values: list[float], ctx: DistContext | None) -> list[float]:
    """Mean over ranks of a few logged scalars (a sync; only at logging points)."""
    t = torch.tensor(values, dtype=torch.float64)
    if ctx is not None:
        dist.all_reduce(t)
        t /= ctx.world
    return t.tolist()


class RankBatches:
    """Every rank draws the same global batch and keeps its dense-DP rows, so a distributed run sees
    exactly the data of the single-process run with the same seed."""

    def __init__(self, data_N: Tensor, cfg: TrainConfig, seed: int, ctx: DistContext | None) -> None:
        self.sampler = BatchSampler(data_N, batch_size=cfg.batch_size, seq_len=cfg.model.seq_len, seed=seed)
        dp = 1 if ctx is None else ctx.groups.dims.dense_dp
        index = 0 if ctx is None else ctx.groups.dims.rank_layout(ctx.rank).dp
        rows = cfg.batch_size // dp
        self.rows = slice(index * rows, (index + 1) * rows)

    def sample(self) -> tuple[Tensor, Tensor]:
        x_BL, y_BL = self.sampler.sample()
        return x_BL[self.rows], y_BL[self.rows]


@torch.no_grad()
def evaluate(model: GPTMoE, batches: RankBatches | BatchSampler, iters: int, ctx: DistContext | None = None) -> float:
    """Mean LM loss over ``iters`` batches in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(())
    for _ in range(iters):
        x_BL, y_BL = batches.sample()
        out = model(x_BL, y_BL)
        assert out.loss is not None
        total += out.loss
    model.train(was_training)
    return _world_mean([total.item() / iters], ctx)[0]


def _format_line(rec: dict[str, float | int], steps: int) -> str:
    return (
        f"step {rec['step']:>{len(str(steps))}}/{steps} | loss {rec['loss']:.4f} | aux {rec['aux_loss']:.4f}"
        f" | dropped {rec['dropped_fraction']:.3f} | lr {rec['lr']:.2e} | {rec['tokens_per_s']:,.0f} tok/s"
    )


def build_model(cfg: TrainConfig, ctx: DistContext | None, runtime: Runtime | None = None) -> GPTMoE:
    """The model of ``cfg`` for this rank: every rank builds the full model from ``cfg.seed``, then keeps
    its shards; MoE blocks get the configured schedule (sharing one runtime, i.e. one set of lanes)."""
    torch.manual_seed(cfg.seed)
    model = GPTMoE(cfg.model)
    par = cfg.parallel
    if ctx is not None:
        parallelize_gpt(model, ctx.groups, par.dispatcher)
    if par.schedule != "sequential" or cfg.trace:
        spec = get_schedule(par.schedule)
        lanes = {"inter": "inter", "intra": "intra" if spec.separate_channels else "inter"}
        runtime = runtime or Runtime(lanes, rank=0 if ctx is None else ctx.rank, trace=cfg.trace is not None)
        for layer in model.moe_layers:
            layer.pipeline = Pipeline(spec, r_fwd=par.r_fwd, r_bwd=par.r_bwd, runtime=runtime)
    return model


def build_grad_sync(model: GPTMoE, cfg: TrainConfig, ctx: DistContext | None) -> GradSync | PlannedGradSync:
    """Plain bucketed all-reduce after backward, or — for schedules that overlap it — a gradient plan:
    the explicit ``parallel.gar_plan``, else launch every range as soon as it is ready (only in the
    dense parts for tutel_improved; in fixed chunks for lina)."""
    spec = get_schedule(cfg.parallel.schedule)
    groups = None if ctx is None else ctx.groups
    if not (spec.gar_in_moe or spec.gar_overlap_dense):
        if cfg.parallel.gar_plan:
            raise ValueError(f"schedule {spec.name!r} all-reduces gradients after backward; it takes no --gar-plan")
        return GradSync(model, groups)
    layout = gpt_gradient_stream(model)
    if cfg.parallel.gar_plan:
        plan = parse_plan(cfg.parallel.gar_plan, layout)
    else:
        allowed = (lambda slot: True) if spec.gar_in_moe else (lambda slot: slot.startswith("dense:"))
        plan = greedy_plan(layout, allowed, chunk_bytes=spec.gar_chunk_bytes)
    sync = PlannedGradSync(layout, plan, groups)
    attach_gradient_plan(model, sync, blocking_in_moe=spec.gar_blocking)
    return sync


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, sync: GradSync | PlannedGradSync, batch: tuple[Tensor, Tensor],
    step: int, cfg: TrainConfig, ctx: DistContext | None,
) -> ModelOutput:
    """One optimizer step at 1-based ``step`` on this rank's ``batch`` (x_BL, y_BL): forward, backward of
    LM + aux loss, gradient sync, clipping, AdamW at ``lr_at(step)``. Collective when ``ctx`` is set;
    no syncing reads. ``model`` is a :class:`GPTMoE` (or any module with the same forward contract)."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    x_BL, y_BL = batch
    out: ModelOutput = model(x_BL, y_BL)
    assert out.loss is not None
    loss: Tensor = out.loss + out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sync.sync()
    if cfg.grad_clip is not None:
        clip_grads_(model, cfg.grad_clip, 1 if ctx is None else ctx.world, None if ctx is None else ctx.groups)
    opt.step()
    return out


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train from scratch as ``cfg`` says; see the module docstring for what is logged and written.
    With ``cfg.parallel.nproc > 1`` this runs on every launched rank (see :mod:`fsmoe.train.distributed`)."""
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.parallel.distributed else None)
    if threads is not None:
        torch.set_num_threads(threads)
    corpus = load_corpus(cfg.data, cfg.model.seq_len)  # first, so that bad data leaves no output directory behind
    ctx = setup(cfg.parallel, cfg)
    try:
        return _train(cfg, corpus, ctx)
    finally:
        teardown()


def _train(cfg: TrainConfig, corpus: object, ctx: DistContext | None) -> TrainResult:
    main = ctx is None or ctx.is_main
    seq_len = cfg.model.seq_len
    out_dir = Path(cfg.out_dir)
    metrics_path = out_dir / METRICS_FILE
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    train = RankBatches(corpus.train_N, cfg, cfg.seed, ctx)
    model = build_model(cfg, ctx)
    model.train()
    opt = build_optimizer(model, cfg)
    sync = build_grad_sync(model, cfg, ctx)
    par = cfg.parallel
    if main:
        layout = (f"{par.nproc} ranks (MP={par.mp}, EP={par.ep}, ESP={par.esp}, dispatcher {par.dispatcher}, "
                  f"schedule {par.schedule} r={par.r_fwd}/{par.r_bwd})" if par.distributed else "1 process")
        print(
            f"data: {corpus.source}; {corpus.train_N.numel():,} train / {corpus.val_N.numel():,} val bytes\n"
            f"model: {GPTMoE(cfg.model).num_params() if par.distributed else model.num_params():,} parameters, "
            f"{cfg.model.n_layers} layers ({cfg.model.num_moe_layers} MoE: {cfg.model.moe.num_experts} experts, "
            f"top-{cfg.model.moe.top_k}, gate {cfg.model.moe.gate}); {cfg.batch_size}x{seq_len} tokens/step; {layout}",
            flush=True,
        )

    tokens_per_step = cfg.batch_size * seq_len
    first_loss = math.nan
    interval_loss = torch.zeros(())
    interval_steps = 0
    interval_start = time.perf_counter()
    train_seconds = 0.0
    last_record: dict[str, float | int] = {}
    step = 0
    metrics = metrics_path.open("w") if main else None
    try:
        while step < cfg.steps:
            step += 1
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            out = train_step(model, opt, sync, train.sample(), step, cfg, ctx)
            assert out.loss is not None
            train_seconds += time.perf_counter() - t0
            interval_loss += out.loss.detach()
            interval_steps += 1

            out_of_time = cfg.max_seconds is not None and train_seconds >= cfg.max_seconds
            if ctx is not None:  # every rank must stop at the same step
                out_of_time = bool(_world_mean([float(out_of_time)], ctx)[0] > 0)
            last = step == cfg.steps or out_of_time
            if step == 1 or step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                mean_loss, aux, dropped = _world_mean(
                    [interval_loss.item() / interval_steps, out.aux_loss.item(), dropped_fraction(out.moe_stats)], ctx
                )
                if step == 1:
                    first_loss = mean_loss
                last_record = {
                    "step": step,
                    "loss": mean_loss,
                    "aux_loss": aux,
                    "dropped_fraction": dropped,
                    "lr": lr,
                    "tokens_per_s": interval_steps * tokens_per_step / max(now - interval_start, 1e-9),
                    "elapsed_s": train_seconds,
                }
                if metrics is not None:
                    metrics.write(json.dumps(last_record) + "\n")
                    metrics.flush()
                    print(_format_line(last_record, cfg.steps), flush=True)
                interval_loss.zero_()
                interval_steps = 0
                interval_start = time.perf_counter()
            if out_of_time:
                if main:
                    print(f"stopping after {step} steps: max_seconds={cfg.max_seconds} reached", flush=True)
                break
    finally:
        if metrics is not None:
            metrics.close()

    val = RankBatches(corpus.val_N, cfg, cfg.seed + 1, ctx)
    val_loss = evaluate(model, val, cfg.eval_iters, ctx)
    result = TrainResult(
        first_loss=first_loss,
        last_loss=float(last_record["loss"]),
        val_loss=val_loss,
        steps=step,
        tokens_per_s=step * tokens_per_step / max(train_seconds, 1e-9),
        metrics_path=str(metrics_path),
    )
    if cfg.trace and main:
        layers = model.moe_layers
        if layers and layers[0].pipeline is not None:
            chrome_trace(layers[0].pipeline.runtime.events, cfg.trace)
            print(f"trace: {cfg.trace} (open in Perfetto)", flush=True)
    if main:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        print(
            f"done: {step} steps, first loss {first_loss:.4f}, last loss {result.last_loss:.4f}, "
            f"val loss {val_loss:.4f}, {result.tokens_per_s:,.0f} tok/s, {train_seconds:.1f}s training",
            flush=True,
        )
    return result
