"""Training of :class:`~fsmoe.models.gpt_moe.GPTMoE` on one process or on every launched rank:
``run_train(JobConfig) -> TrainResult``.

The objective is the language-model loss plus the MoE layers' aux losses (already weighted by each
layer's ``MoEConfig`` coefficients). AdamW with linear warmup and cosine decay to ``min_lr_ratio · lr``.
Every ``log_every`` steps (and at the first and last step) one progress line is printed and one JSON
object appended to ``<out>/metrics.jsonl``; the validation loss at the end goes to the result and to
``<out>/summary.json``; the resolved job goes to ``<out>/job.toml`` (``--config`` reads it back).
Syncing reads (``.item()``, ``dropped_fraction``) happen only at those logging points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.config import JobConfig, ScheduleConfig, TrainConfig, dump_toml, get_schedule
from fsmoe.models import build_lm
from fsmoe.models.gpt_moe import GPTMoE, ModelOutput
from fsmoe.moe.layer import MoEStats
from fsmoe.parallel.dims import config_hash_check
from fsmoe.parallel.grad_plan import PlannedGradSync, greedy_plan, parse_plan
from fsmoe.parallel.grad_sync import GradSync
from fsmoe.parallel.parallelize import (
    apply_pipeline,
    attach_gradient_plan,
    gpt_gradient_stream,
    parallelize_gpt,
    pipeline_of,
)
from fsmoe.schedule.runtime import Runtime, chrome_trace
from fsmoe.train.data import BatchSampler, load_corpus
from fsmoe.train.distributed import DistContext, clip_grads_, global_grad_norm, setup, teardown

if TYPE_CHECKING:
    from fsmoe.perf.planner import JobPlan

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
CONFIG_FILE = "job.toml"
PLAN_FILE = "plan.json"


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
    """Learning rate for 1-based ``step``: linear warmup over ``lr_warmup`` steps, then cosine decay from
    ``lr`` to ``min_lr_ratio · lr`` at step ``steps``."""
    if step <= cfg.lr_warmup:
        return cfg.lr * step / cfg.lr_warmup
    progress = (step - cfg.lr_warmup) / max(cfg.steps - cfg.lr_warmup, 1)
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

    def __init__(self, data_N: Tensor, job: JobConfig, seed: int, ctx: DistContext | None) -> None:
        batch_size = job.train.batch_size
        self.sampler = BatchSampler(data_N, batch_size=batch_size, seq_len=job.model.seq_len, seed=seed)
        dp = 1 if ctx is None else ctx.groups.dims.dense_dp
        index = 0 if ctx is None else ctx.groups.dims.rank_layout(ctx.rank).dp
        rows = batch_size // dp
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
        if ctx is not None:
            ctx.heartbeat.alive()  # evaluation makes progress too
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


def build_model(job: JobConfig, ctx: DistContext | None, runtime: Runtime | None = None) -> GPTMoE:
    """The model of ``job`` for this rank: every rank builds the full model from ``run.seed``, then keeps
    its shards; MoE blocks get the configured schedule (sharing one runtime, i.e. one set of lanes)."""
    torch.manual_seed(job.run.seed)
    model = build_lm(job.model)
    par, sched = job.parallel, job.schedule
    if ctx is not None:
        parallelize_gpt(model, ctx.groups, par.dispatcher)
    if sched.name != "sequential" or job.run.trace:
        spec = get_schedule(sched.name)
        rank = 0 if ctx is None else ctx.rank
        runtime = runtime or Runtime.for_schedule(spec, rank=rank, trace=job.run.trace is not None)
        apply_pipeline(model.moe_layers, spec, sched.layer_degrees or sched.degrees, runtime)
    return model


def build_grad_sync(model: GPTMoE, job: JobConfig, ctx: DistContext | None) -> GradSync | PlannedGradSync:
    """Plain bucketed all-reduce after backward, or — for schedules that overlap it — a gradient plan:
    the explicit ``schedule.gar_plan``, else launch every range as soon as it is ready (only in the
    dense parts for tutel_improved; in fixed chunks for lina)."""
    spec = get_schedule(job.schedule.name)
    gar_plan = job.schedule.gar_plan
    groups = None if ctx is None else ctx.groups
    if not (spec.gar_in_moe or spec.gar_overlap_dense):
        if gar_plan:
            raise ValueError(f"schedule {spec.name!r} all-reduces gradients after backward; it takes no --gar-plan")
        return GradSync(model, groups)
    layout = gpt_gradient_stream(model)
    if gar_plan:
        plan = parse_plan(gar_plan, layout)
    else:
        allowed = (lambda slot: True) if spec.gar_in_moe else (lambda slot: slot.startswith("dense:"))
        plan = greedy_plan(layout, allowed, chunk_bytes=spec.gar_chunk_bytes)
    sync = PlannedGradSync(layout, plan, groups)
    attach_gradient_plan(model, sync, blocking_in_moe=spec.gar_blocking)
    return sync


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or gradient; raised on every rank alike, before the update."""


def check_finite(norm: Tensor, out: ModelOutput, step: int) -> None:
    """Stop at the first step whose global gradient norm is not finite (a non-finite loss on any rank makes
    it so, since the norm is all-reduced): the same decision on every rank, so no rank is left waiting in
    a collective, and the weights stay those of the last good step.
    Syncs (an ``.item()`` of one scalar per step): the decision needs the value on the host."""
    value = float(norm)
    if not math.isfinite(value):
        loss = float(out.loss.detach()) if out.loss is not None else math.nan
        raise TrainingDiverged(
            f"step {step}: the gradient norm is {value} (this rank's loss {loss}); stopped before the update, so "
            f"the weights are those after step {step - 1}: lower --lr, raise --lr-warmup, or clip with --grad-clip"
        )


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, sync: GradSync | PlannedGradSync, batch: tuple[Tensor, Tensor],
    step: int, cfg: TrainConfig, ctx: DistContext | None,
) -> ModelOutput:
    """One optimizer step at 1-based ``step`` on this rank's ``batch`` (x_BL, y_BL): forward, backward of
    LM + aux loss, gradient sync, the finiteness check (:func:`check_finite`, the one syncing read),
    clipping, AdamW at ``lr_at(step)``. Collective when ``ctx`` is set. ``model`` is a :class:`GPTMoE`
    (or any module with the same forward contract)."""
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
    world, groups = (1, None) if ctx is None else (ctx.world, ctx.groups)
    norm = global_grad_norm(model, world, groups)
    check_finite(norm, out, step)
    if cfg.grad_clip is not None:
        clip_grads_(model, cfg.grad_clip, world, groups, norm=norm)
    opt.step()
    return out


def run_train(job: JobConfig) -> TrainResult:
    """Train from scratch as ``job`` says; see the module docstring for what is logged and written.
    With ``parallel.nproc > 1`` this runs on every launched rank (see :mod:`fsmoe.train.distributed`)."""
    job.check_training()  # pure: the same error on every rank, before any collective
    threads = job.run.threads if job.run.threads is not None else (1 if job.parallel.distributed else None)
    if threads is not None:
        torch.set_num_threads(threads)
    corpus = load_corpus(job.data, job.model.seq_len)  # first, so that bad data leaves no output directory behind
    ctx = setup(job.parallel, job)
    try:
        return _train(job, corpus, ctx)
    except BaseException as e:  # the run directory says that this run did not finish, and why
        state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        mark_run(job, ctx, state, error=f"{type(e).__name__}: {e}".rstrip(": "))
        raise
    finally:
        teardown()


RUN_FILES = (CONFIG_FILE, PLAN_FILE, METRICS_FILE, SUMMARY_FILE, STATUS_FILE)


def prepare_run_dir(job: JobConfig) -> None:
    """Check ``run.out`` before any rank starts: it must be a directory this process can create and write,
    and it must not hold a previous run unless ``run.overwrite`` (then that run's files are removed, and
    nothing else). ``ValueError`` naming the path and the reason."""
    out = Path(job.run.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    previous = [f for f in RUN_FILES if (out / f).exists()]
    if previous and not job.run.overwrite:
        raise ValueError(f"--out {str(out)!r} holds a previous run ({', '.join(previous)}); pass --overwrite to "
                         "replace it, or choose another --out")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:  # the one reliable test (root passes every permission check): make it, write in it, leave no trace
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        for f in previous:
            (out / f).unlink()
    except OSError as e:
        raise ValueError(f"cannot write the run directory --out {str(out)!r}: {e.strerror or e}") from None
    finally:
        for p in created:  # deepest first; the run creates them again when it starts
            with contextlib.suppress(OSError):
                p.rmdir()


def mark_run(job: JobConfig, ctx: DistContext | None, state: str, **extra: object) -> None:
    """``<out>/status.json``: ``running`` from the start, then ``finished``, ``failed`` (with the error) or
    ``interrupted``;
    written by the main rank only, once the run directory exists."""
    out_dir = Path(job.run.out)
    if (ctx is None or ctx.is_main) and out_dir.is_dir():
        (out_dir / STATUS_FILE).write_text(json.dumps({"state": state, **extra}, indent=2) + "\n")


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a non-finite float becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def plan_schedule(job: JobConfig, ctx: DistContext | None, echo: Callable[[str], None] = print) -> tuple[
        JobConfig, JobPlan | None]:
    """FSMoE's adaptive core for a planned schedule (``schedule.planned``: fsmoe or fsmoe_no_iio given no
    degree): this job's costs — from the profile cache or profiled now on the job's own groups — then
    the plan (per-layer r_fwd, r_bwd and the gradient plan, :func:`fsmoe.perf.planner.plan_job`). Returns
    the job with the plan's decisions in ``schedule.layer_degrees`` / ``gar_plan`` (so its job.toml
    replays them without planning) and the plan. Collective when ``ctx`` is set: every rank gets the
    same costs (rank 0's) and so the same plan, which a hash exchange confirms. One process has nothing
    to overlap: r = 1 everywhere, no plan."""
    if not job.schedule.planned:
        return job, None
    if ctx is None:
        echo("plan: one process, nothing to overlap: r = 1 in every MoE layer")
        return job.with_overrides({"schedule.r_fwd": 1, "schedule.r_bwd": 1}), None
    from fsmoe.perf.planner import plan_job
    from fsmoe.perf.profile import load_or_profile

    costs = load_or_profile(job, ctx.groups, ctx.rank, cache_dir=Path(job.plan.profile_cache).expanduser(),
                            reprofile=job.plan.reprofile, budget_s=job.plan.profile_budget_s, echo=echo)
    plan = plan_job(job, costs, schedule=job.schedule.name, max_degree=job.plan.max_degree)
    planned = job.with_overrides({"schedule.layer_degrees": plan.degrees, "schedule.gar_plan": plan.gar_plan or None})
    config_hash_check(planned)  # every rank planned the same (same costs, deterministic solvers)
    return planned, plan


def _degrees_text(sched: ScheduleConfig) -> str:
    pairs = sched.layer_degrees or (sched.degrees,)
    return " ".join(f"{a}/{b}" for a, b in pairs)


def _train(job: JobConfig, corpus: object, ctx: DistContext | None) -> TrainResult:
    main = ctx is None or ctx.is_main
    echo: Callable[[str], None] = print if main else (lambda _: None)
    job, plan = plan_schedule(job, ctx, echo)
    cfg, m = job.train, job.model
    seq_len = m.seq_len
    out_dir = Path(job.run.out)
    metrics_path = out_dir / METRICS_FILE
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(dump_toml(job))
        mark_run(job, ctx, "running")
        if plan is not None:
            (out_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n")
            print(plan.explain(), flush=True)
    train = RankBatches(corpus.train_N, job, job.run.seed, ctx)
    model = build_model(job, ctx)
    model.train()
    opt = build_optimizer(model, cfg)
    sync = build_grad_sync(model, job, ctx)
    par, sched = job.parallel, job.schedule
    if main:
        layout = (f"{par.nproc} ranks (MP={par.mp}, EP={par.ep}, ESP={par.esp}, dispatcher {par.dispatcher}, "
                  f"schedule {sched.name} r={_degrees_text(sched)})" if par.distributed else "1 process")
        print(
            f"data: {corpus.source}; {corpus.train_N.numel():,} train / {corpus.val_N.numel():,} val bytes\n"
            f"model: {m.estimated_params() if par.distributed else model.num_params():,} parameters, "
            f"{m.n_layers} layers ({m.num_moe_layers} MoE: {m.moe.num_experts} experts, "
            f"top-{m.moe.top_k}, gate {m.moe.gate}); {cfg.batch_size}x{seq_len} tokens/step; {layout}",
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
            if ctx is not None:
                ctx.heartbeat(step)  # the launcher's watchdog: this rank finished `step`
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
                    "loss": mean_loss,  # the mean over the logging interval's steps (weights still moving)
                    "loss_steps": interval_steps,
                    "aux_loss": aux,
                    "dropped_fraction": dropped,
                    "lr": lr,
                    "tokens_per_s": interval_steps * tokens_per_step / max(now - interval_start, 1e-9),
                    "elapsed_s": train_seconds,
                }
                if metrics is not None:
                    metrics.write(json.dumps(_strict(last_record), allow_nan=False) + "\n")
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

    val = RankBatches(corpus.val_N, job, job.run.seed + 1, ctx)
    val_loss = evaluate(model, val, cfg.eval_iters, ctx)
    result = TrainResult(
        first_loss=first_loss,
        last_loss=float(last_record["loss"]),
        val_loss=val_loss,
        steps=step,
        tokens_per_s=step * tokens_per_step / max(train_seconds, 1e-9),
        metrics_path=str(metrics_path),
    )
    trace = job.run.trace
    if trace and main:
        pipe = pipeline_of(model.moe_layers[0]) if model.moe_layers else None
        if pipe is not None:
            chrome_trace(pipe.runtime.events, trace)
            print(f"trace: {trace} (open in Perfetto)", flush=True)
    if main:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(_strict(dataclasses.asdict(result)), indent=2, allow_nan=False)
                                            + "\n")
        mark_run(job, ctx, "finished", steps=step)
        print(
            f"done: {step} steps, first loss {first_loss:.4f}, last loss {result.last_loss:.4f} (mean of steps "
            f"{step - int(last_record['loss_steps']) + 1}-{step}), val loss {val_loss:.4f} (final weights, held-out "
            f"split), {result.tokens_per_s:,.0f} tok/s, {train_seconds:.1f}s training",
            flush=True,
        )
    return result
