"""Training of a language model (:func:`fsmoe.models.build_lm`) on one process or on every launched rank:
``run_train(JobConfig) -> TrainResult``.

The objective is the language-model loss plus the MoE layers' aux losses (already weighted by each
layer's ``MoEConfig`` coefficients). AdamW with linear warmup and cosine decay to ``min_lr_ratio · lr``.

What a run writes in ``<out>``: the resolved job (``job.toml``; ``--config`` reads it back), ``status.json``,
``summary.json`` at the end, and ``metrics.jsonl``, one JSON object per line:

* every ``log_every`` steps (and at the first and last step) a training record, ``"kind": "train"``:
  ``step``, ``loss`` (the mean over the logging interval), ``loss_steps``, ``aux_loss``,
  ``dropped_fraction`` (the dropped share of all ranks' assignments), ``lr``, ``tokens_per_s``,
  ``elapsed_s``, and of the interval's last step ``expert_load`` (per MoE layer, the assignments each
  expert kept after capacity, summed over ranks) and ``dropped_per_layer`` (per MoE layer, the dropped
  share of all ranks' assignments);
* every ``eval_every`` steps and at the end a validation record, ``{"kind": "val", "step", "val_loss",
  "val_ppl"}``: the mean LM loss over ``eval_iters`` held-out batches (the same batches every time) and
  its exponential.

One progress line per training record, or (``run.progress``: ``bar``, or ``auto`` on a terminal) a tqdm
bar over the steps on the main rank. Syncing reads (``.item()``, the logged sums over ranks) happen only
at those logging points.

Checkpoints (:mod:`fsmoe.train.checkpoint`): every ``save_every`` steps and at the last step, in
``<out>/checkpoints``. ``train.resume`` continues a checkpoint's run exactly (step, LR schedule,
optimizer, every rank's RNG, data position), under any layout; resuming into the run directory that
holds the checkpoint appends to its ``metrics.jsonl`` (after dropping records of later steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.config import JobConfig, ScheduleConfig, TrainConfig, dump_toml, get_schedule
from fsmoe.models import build_lm
from fsmoe.models.gpt_moe import ModelOutput, MoELanguageModel
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
from fsmoe.train.checkpoint import (
    Checkpoint,
    ShardMap,
    check_resume,
    load_checkpoint,
    rewind_latest,
    save_checkpoint,
)
from fsmoe.train.data import BatchSampler, Corpus, load_corpus
from fsmoe.train.distributed import (
    LAUNCHER_PID_ENV,
    DistContext,
    clip_grads_,
    global_grad_norm,
    keep_alive,
    rank_placement,
    setup,
    teardown,
    use_device,
)
from fsmoe.train.precision import autocast
from fsmoe.train.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    PLAN_FILE,
    SUMMARY_FILE,
    Progress,
    drop_records_after,
    mark_run,
    perplexity,
    resumes_in_place,
    strict_json,
)

if TYPE_CHECKING:
    from fsmoe.perf.planner import JobPlan



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


def _world_mean(values: list[float], ctx: DistContext | None) -> list[float]:
    """Mean over ranks of a few logged scalars (a sync; only at logging points)."""
    t = torch.tensor(values, dtype=torch.float64, device=None if ctx is None else ctx.device)
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
def evaluate(model: MoELanguageModel, batches: RankBatches | BatchSampler, iters: int,
             ctx: DistContext | None = None, *, dtype: str = "fp32") -> float:
    """Mean LM loss over ``iters`` batches in eval mode (restores the previous mode), on the model's device
    and in ``dtype`` (``run.dtype``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for _ in range(iters):
        if ctx is not None:
            ctx.heartbeat.alive()  # evaluation makes progress too
        x_BL, y_BL = (t.to(device) for t in batches.sample())
        with autocast(dtype, device):
            out = model(x_BL, y_BL)
        assert out.loss is not None
        total += out.loss
    model.train(was_training)
    return _world_mean([total.item() / iters], ctx)[0]


def build_model(job: JobConfig, ctx: DistContext | None, runtime: Runtime | None = None, *,
                device: torch.device | str = "cpu") -> MoELanguageModel:
    """The model of ``job`` for this rank on ``device``: every rank builds the full model from ``run.seed``,
    then keeps its shards; MoE blocks get the configured schedule (sharing one runtime, i.e. one set of
    lanes: threads on the CPU, CUDA streams on a GPU)."""
    torch.manual_seed(job.run.seed)
    model = build_lm(job.model)
    par, sched = job.parallel, job.schedule
    if ctx is not None:
        parallelize_gpt(model, ctx.groups, par.dispatcher)
    if sched.name != "sequential" or job.run.trace:
        spec = get_schedule(sched.name)
        rank = 0 if ctx is None else ctx.rank
        runtime = runtime or Runtime.for_schedule(spec, rank=rank, trace=job.run.trace is not None, device=device)
        apply_pipeline(model.moe_layers, spec, sched.layer_degrees or sched.degrees, runtime)
    return model.to(device)


def build_grad_sync(model: MoELanguageModel, job: JobConfig, ctx: DistContext | None) -> GradSync | PlannedGradSync:
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
    step: int, cfg: TrainConfig, ctx: DistContext | None, *, dtype: str = "fp32",
) -> ModelOutput:
    """One optimizer step at 1-based ``step`` on this rank's ``batch`` (x_BL, y_BL): forward, backward of
    LM + aux loss, gradient sync, the finiteness check (:func:`check_finite`, the one syncing read),
    clipping, AdamW at ``lr_at(step)``. The batch moves to the model's device; the forward runs in ``dtype``
    (``run.dtype``: bf16 autocast, :mod:`fsmoe.train.precision`). Collective when ``ctx`` is set. ``model``
    is a :class:`MoELanguageModel` (or any module with the same forward contract)."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    x_BL, y_BL = (t.to(device) for t in batch)
    with autocast(dtype, device):
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
    """Train as ``job`` says (from scratch, or from ``train.resume``); see the module docstring for what is
    logged and written. With ``parallel.nproc > 1`` this runs on every launched rank (see
    :mod:`fsmoe.train.distributed`)."""
    job.check_training()  # pure: the same error on every rank, before any collective
    # pure file reads, likewise; under fsmoe's launcher, which hashed the files once, sizes and configs only
    resume = check_resume(job, verify=LAUNCHER_PID_ENV not in os.environ)
    threads = job.run.threads if job.run.threads is not None else (1 if job.parallel.distributed else None)
    if threads is not None:
        torch.set_num_threads(threads)
    # first, so that bad data leaves no output directory behind
    corpus = load_corpus(job.data, job.model.seq_len, job.model.vocab_size)
    ctx = setup(job.parallel, job, device=job.run.device)  # the device, made current, and its backend
    if ctx is None:
        use_device(rank_placement(job.run.device))
    try:
        return train(job, corpus, ctx, resume)
    except BaseException as e:  # the run directory says that this run did not finish, and why
        state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        mark_run(job, ctx, state, error=f"{type(e).__name__}: {e}".rstrip(": "))
        raise
    finally:
        teardown()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_plan(job: JobConfig, plan: JobPlan, ctx: DistContext, data_N: Tensor,
               echo: Callable[[str], None] = print) -> tuple[JobConfig, JobPlan]:
    """The measured check of a job plan (:mod:`fsmoe.perf.tune`): the plan and the first ``plan.tune`` − 1
    of its ``alternatives`` (the other whole-step plans the planner weighed, other degrees first), each
    built as the trainer builds it (model, gradient sync, optimizer), then one untimed and
    ``plan.tune_rounds`` timed rounds, each running one :func:`train_step` of every candidate in a
    rotated order, on one batch drawn apart from the training stream; the slowest rank's time per step,
    the fastest median kept (ties: the model's order). Collective. Every candidate is alive during the
    check (their models and optimizer states: ``plan.tune`` times the run's own); interleaving them is
    what the benchmarks do, and timing each alone in turn measured a pipelined plan 15% faster than it
    ran in training. Returns the job with the kept plan's degrees and gradient plan (a given
    ``schedule.gar_plan`` is kept), and the plan with ``check`` set. The run itself is untouched: every
    candidate is a throwaway model from ``run.seed``, and the trainer builds its own afterwards."""
    from fsmoe.perf.partition import StepPrediction, plan_text
    from fsmoe.perf.tune import pick_fastest

    def runs(p: StepPrediction) -> tuple[tuple[tuple[int, int], ...], str]:  # degrees, the gradient plan run
        return p.pairs, job.schedule.gar_plan or plan_text(p.gradient_plan())

    candidates: list[StepPrediction] = []
    for p in (plan.prediction(plan.schedule), *plan.alternatives):  # a given gradient plan: degrees alone differ
        if len(candidates) < job.plan.tune and all(runs(p) != runs(q) for q in candidates):
            candidates.append(p)
    # short names (the gradient plans, which grow with the model, are in the record beside them)
    labels = [f"{i + 1}: {_pairs_text(p.pairs)} {p.method.split(' (')[0] or 'plan'}" for i, p in enumerate(candidates)]
    batch = RankBatches(data_N, job, job.run.seed + 1, ctx).sample()
    echo(f"measured check: {len(candidates)} plans x {1 + job.plan.tune_rounds} training steps, interleaved "
         "(--tune 1 skips it)")
    t0 = time.perf_counter()
    built = []
    for pred in candidates:
        pairs, gar = runs(pred)
        cjob = job.with_overrides({"schedule.layer_degrees": pairs, "schedule.gar_plan": gar})
        model = build_model(cjob, ctx, device=ctx.device)
        model.train()
        built.append((cjob, model, build_optimizer(model, cjob.train), build_grad_sync(model, cjob, ctx)))
    k = len(built)
    times = torch.zeros(1 + job.plan.tune_rounds, k, dtype=torch.float64)
    with keep_alive(ctx.heartbeat):
        for round_ in range(len(times)):
            for j in range(k):
                i = (round_ + j) % k
                cjob, model, opt, sync = built[i]
                dist.barrier()
                start = time.perf_counter()
                train_step(model, opt, sync, batch, round_ + 1, cjob.train, ctx, dtype=cjob.run.dtype)
                _synchronize(ctx.device)
                times[round_, i] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's, the same on every rank
    del built
    samples = {label: times[1:, i].tolist() for i, label in enumerate(labels)}
    picked = pick_fastest(samples, labels)
    best = candidates[labels.index(picked)]
    check = {"rounds": job.plan.tune_rounds, "picked": picked, "model": labels[0], "wall_s": time.perf_counter() - t0,
             "candidates": [{"label": label, "degrees": [list(d) for d in p.pairs], "method": p.method,
                             "gar_plan": runs(p)[1], "predicted_s": p.step_s,
                             "median_s": statistics.median(samples[label])}
                            for label, p in zip(labels, candidates, strict=True)]}
    checked = dataclasses.replace(plan, check=check)
    echo(checked.explain().splitlines()[-1])
    pairs, gar = runs(best)
    return job.with_overrides({"schedule.layer_degrees": pairs, "schedule.gar_plan": gar}), checked


def _pairs_text(pairs: tuple[tuple[int, int], ...]) -> str:
    """``r=2/4`` when every layer runs the same pair, else one pair per layer."""
    return "r=" + (f"{pairs[0][0]}/{pairs[0][1]}" if len(set(pairs)) == 1 else " ".join(f"{a}/{b}" for a, b in pairs))


def plan_schedule(job: JobConfig, ctx: DistContext | None, echo: Callable[[str], None] = print,
                  data_N: Tensor | None = None) -> tuple[JobConfig, JobPlan | None]:
    """FSMoE's adaptive core for a planned schedule (``schedule.planned``: fsmoe or fsmoe_no_iio given no
    degree): this job's costs — from the profile cache or profiled now on the job's own groups — then
    the plan (per-layer r_fwd, r_bwd and the gradient plan, :func:`fsmoe.perf.planner.plan_job`; a given
    ``schedule.gar_plan`` is kept). Returns
    the job with the plan's decisions in ``schedule.layer_degrees`` / ``gar_plan`` (so its job.toml
    replays them without planning) and the plan. Collective when ``ctx`` is set: every rank gets the
    same costs (rank 0's) and so the same plan, which a hash exchange confirms. One process has nothing
    to overlap: r = 1 everywhere, no plan. With ``data_N`` (the training tokens) and ``plan.tune`` > 1,
    the plan is checked by measurement first (:func:`check_plan`)."""
    if not job.schedule.planned:
        return job, None
    if ctx is None:
        echo("plan: one process, nothing to overlap: r = 1 in every MoE layer")
        return job.with_overrides({"schedule.r_fwd": 1, "schedule.r_bwd": 1}), None
    from fsmoe.perf.planner import plan_job
    from fsmoe.perf.profile import load_or_profile

    costs = load_or_profile(job, ctx.groups, ctx.rank, cache_dir=Path(job.plan.profile_cache).expanduser(),
                            reprofile=job.plan.reprofile, budget_s=job.plan.profile_budget_s, echo=echo)
    plan = plan_job(job, costs, schedule=job.schedule.name, max_degree=job.plan.max_degree,
                    min_gain=job.plan.min_gain)
    if job.schedule.gar_plan:  # given: the degrees are planned, the gradient plan is the user's
        echo(f"plan: keeping the given --gar-plan {job.schedule.gar_plan!r} (the planner's: {plan.gar_plan!r})")
    planned = job.with_overrides({"schedule.layer_degrees": plan.degrees,
                                  "schedule.gar_plan": job.schedule.gar_plan or plan.gar_plan})
    config_hash_check(planned)  # every rank planned the same (same costs, deterministic solvers)
    if data_N is not None and job.plan.tune > 1 and plan.alternatives:  # else nothing to weigh it against
        planned, plan = check_plan(job, plan, ctx, data_N, echo)
    return planned, plan


def _degrees_text(sched: ScheduleConfig) -> str:
    pairs = sched.layer_degrees or (sched.degrees,)
    return " ".join(f"{a}/{b}" for a, b in pairs)


def logged_stats(interval_loss: Tensor, interval_steps: int, out: ModelOutput, ctx: DistContext | None) -> dict[
        str, Any]:
    """The numbers of one training record (see the module doc) from this rank's interval loss sum and its
    last step's output: the loss and aux loss as means over ranks, the dropped share of all ranks'
    assignments, the per-layer expert loads and dropped shares as sums over ranks. Built on the device,
    one all-reduce and one read back: call it only when logging."""
    stats = out.moe_stats
    if any(s.expert_load_E is None for s in stats):
        raise RuntimeError("an MoE layer's stats carry no expert_load_E; the trainer logs per-expert loads")
    device, f64 = interval_loss.device, torch.float64
    n = len(stats)
    sizes = [s.expert_load_E.numel() for s in stats]  # type: ignore[union-attr]
    values = torch.cat([
        torch.stack([interval_loss.detach().to(f64) / interval_steps, out.aux_loss.detach().to(device, f64)]),
        torch.stack([torch.as_tensor(s.num_dropped, device=device).to(f64) for s in stats]) if n else
        torch.zeros(0, dtype=f64, device=device),
        torch.tensor([float(s.num_assignments) for s in stats], dtype=f64, device=device),  # host ints: no sync
        *(s.expert_load_E.to(device, f64) for s in stats),  # type: ignore[union-attr]
    ])
    if ctx is not None:
        values = values.to(ctx.device)  # NCCL reduces device tensors
        dist.all_reduce(values)
        values[:2] /= ctx.world
    flat = values.tolist()  # the one sync
    loss, aux = flat[0], flat[1]
    dropped, assigned = flat[2 : 2 + n], flat[2 + n : 2 + 2 * n]
    loads, at = [], 2 + 2 * n
    for size in sizes:
        loads.append([int(c) for c in flat[at : at + size]])
        at += size
    return {
        "loss": loss, "aux_loss": aux, "dropped_fraction": sum(dropped) / max(sum(assigned), 1.0),
        "expert_load": loads, "dropped_per_layer": [d / max(a, 1.0) for d, a in zip(dropped, assigned, strict=True)],
    }


def train(job: JobConfig, corpus: Corpus, ctx: DistContext | None, resume: Checkpoint | None = None) -> TrainResult:
    """The body of :func:`run_train` on a rank that has joined (``ctx`` from :func:`setup`, or one a test
    builds on a process group it runs several jobs in; None for one process): plan, build, resume from
    ``resume`` (the job's :func:`~fsmoe.train.checkpoint.check_resume`), train, evaluate, save, and write
    the run directory."""
    main = ctx is None or ctx.is_main
    echo: Callable[[str], None] = print if main else (lambda _: None)
    job, plan = plan_schedule(job, ctx, echo, corpus.train_N)
    cfg, m = job.train, job.model
    seq_len = m.seq_len
    out_dir = Path(job.run.out)
    metrics_path = out_dir / METRICS_FILE
    plan_json = None if plan is None else json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"
    in_place = resumes_in_place(job, resume)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(dump_toml(job))
        mark_run(job, ctx, "running")
        if plan is not None:
            (out_dir / PLAN_FILE).write_text(plan_json)
            print(plan.explain(), flush=True)
        if in_place:  # this run continues from ``resume``: what came after it in the directory is not its history
            assert resume is not None
            drop_records_after(metrics_path, resume.step)
            rewind_latest(resume)
            (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    batches = RankBatches(corpus.train_N, job, job.run.seed, ctx)
    device = ctx.device if ctx is not None else rank_placement(job.run.device).device
    model = build_model(job, ctx, device=device)
    model.train()
    opt = build_optimizer(model, cfg)
    sync = build_grad_sync(model, job, ctx)
    shards = ShardMap.probe(job, model, ctx) if cfg.save_every is not None or resume is not None else None
    par, sched = job.parallel, job.schedule
    if main:
        unit = "bytes" if corpus.train_N.dtype == torch.uint8 else "tokens"
        layout = (f"{par.nproc} ranks (MP={par.mp}, EP={par.ep}, ESP={par.esp}, dispatcher {par.dispatcher}, "
                  f"schedule {sched.name} r={_degrees_text(sched)})" if par.distributed else "1 process")
        print(
            f"data: {corpus.source}; {corpus.train_N.numel():,} train / {corpus.val_N.numel():,} val {unit}\n"
            f"model: {m.estimated_params() if par.distributed else model.num_params():,} parameters, "
            f"{m.n_layers} layers ({m.num_moe_layers} MoE: {m.moe.num_experts} experts, "
            f"top-{m.moe.top_k}, gate {m.moe.gate}); {cfg.batch_size}x{seq_len} tokens/step; {layout}",
            flush=True,
        )
    step, train_seconds, first_loss = 0, 0.0, math.nan
    if resume is not None:
        assert shards is not None
        restored = load_checkpoint(resume, model, opt, shards, samplers={"train": batches.sampler})  # sets the RNG
        step, train_seconds = restored.step, float(restored.extra.get("train_seconds", 0.0))
        first = restored.extra.get("first_loss")  # None: not finite, or not saved by a trainer
        first_loss = math.nan if first is None else float(first)
        echo(f"resumed from {str(resume.path)!r} at step {step} (saved by {resume.world} "
             f"rank{'s' if resume.world > 1 else ''})")
    tokens_per_step = cfg.batch_size * seq_len
    interval_loss = torch.zeros((), device=device)
    interval_steps = 0
    interval_start = time.perf_counter()
    last_record: dict[str, Any] = {}
    val_loss = math.nan
    metrics = metrics_path.open("a" if in_place else "w") if main else None
    progress = Progress(job.run.progress, main, cfg.steps, step)

    def write(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            metrics.flush()

    try:
        while step < cfg.steps:
            step += 1
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            out = train_step(model, opt, sync, batches.sample(), step, cfg, ctx, dtype=job.run.dtype)
            if ctx is not None:
                ctx.heartbeat(step)  # the launcher's watchdog: this rank finished `step`
            assert out.loss is not None
            train_seconds += time.perf_counter() - t0
            interval_loss += out.loss.detach()
            interval_steps += 1
            progress.advance()

            out_of_time = cfg.max_seconds is not None and train_seconds >= cfg.max_seconds
            if ctx is not None and cfg.max_seconds is not None:  # every rank must stop at the same step
                out_of_time = bool(_world_mean([float(out_of_time)], ctx)[0] > 0)
            last = step == cfg.steps or out_of_time
            if step == 1 or step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                logged = logged_stats(interval_loss, interval_steps, out, ctx)
                if step == 1:
                    first_loss = logged["loss"]
                last_record = {
                    "kind": "train",
                    "step": step,
                    "loss": logged["loss"],  # the mean over the logging interval's steps (weights still moving)
                    "loss_steps": interval_steps,
                    "aux_loss": logged["aux_loss"],
                    "dropped_fraction": logged["dropped_fraction"],
                    "lr": lr,
                    "tokens_per_s": interval_steps * tokens_per_step / max(now - interval_start, 1e-9),
                    "elapsed_s": train_seconds,
                    "expert_load": logged["expert_load"],
                    "dropped_per_layer": logged["dropped_per_layer"],
                }
                write(last_record)
                progress.record(last_record)
                interval_loss.zero_()
                interval_steps = 0
                interval_start = time.perf_counter()
            if (cfg.eval_every is not None and step % cfg.eval_every == 0) or last:
                val = RankBatches(corpus.val_N, job, job.run.seed + 1, ctx)  # the same held-out batches every time
                val_loss = evaluate(model, val, cfg.eval_iters, ctx, dtype=job.run.dtype)
                write({"kind": "val", "step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
                progress.echo(f"step {step}: val loss {val_loss:.4f}, val ppl {perplexity(val_loss):,.2f}")
            if cfg.save_every is not None and (step % cfg.save_every == 0 or last):
                assert shards is not None
                if ctx is not None:
                    ctx.heartbeat.alive()
                path = save_checkpoint(
                    out_dir, step, model, opt, shards, samplers={"train": batches.sampler}, job_toml=dump_toml(job),
                    plan_json=plan_json, keep=cfg.keep_checkpoints,
                    extra={"train_seconds": train_seconds, "first_loss": first_loss if math.isfinite(first_loss)
                           else None},
                )
                progress.echo(f"checkpoint: {path}")
            if out_of_time:
                progress.echo(f"stopping after {step} steps: max_seconds={cfg.max_seconds} reached")
                break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()

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
        summary = json.dumps(strict_json(dataclasses.asdict(result)), indent=2, allow_nan=False)
        (out_dir / SUMMARY_FILE).write_text(summary + "\n")
        mark_run(job, ctx, "finished", steps=step)
        print(
            f"done: {step} steps, first loss {first_loss:.4f}, last loss {result.last_loss:.4f} (mean of steps "
            f"{step - int(last_record['loss_steps']) + 1}-{step}), val loss {val_loss:.4f} (final weights, held-out "
            f"split), {result.tokens_per_s:,.0f} tok/s, {train_seconds:.1f}s training",
            flush=True,
        )
    return result
