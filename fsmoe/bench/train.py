"""``fsmoe bench train``: tokens/s of the GPT-MoE trained with fsmoe vs the same model with DeepSpeed's MoE layer.

Legend: B global batch (sequences), L sequence length.

The job says everything: the model ``job.model`` (a preset, ``model.name``, with its sizes) whose MoE
layers renormalise the kept top-k weights (DeepSpeed's top-2 rule, :func:`bench_model`), so both
implementations compute the same function from the same weights; the data ``job.data`` (the same
batches for every row, B = ``train.batch_size`` sequences per step over all ranks, lr ``train.lr``);
the layout ``parallel`` on ``cluster``. The rows (:func:`train_rows`): every schedule in
``bench.schedules``, pipelined ones at ``schedule.r_fwd``/``schedule.r_bwd``, each trained exactly as
``fsmoe train`` trains (the trainer's model, gradient sync, optimizer and ``train_step``); with ``fsmoe``
among them, the ``fsmoe auto`` row: ``fsmoe`` with no degrees, planned on the ranks exactly as ``fsmoe
train`` plans it (:func:`fsmoe.train.trainer.plan_schedule`: the profile from the ``plan`` section's cache
or profiled now, then per-layer degrees and the gradient plan, checked by measurement against the other
plans it weighed), then trained like the others; and the
DeepSpeed-MoE twin when ``bench.deepspeed`` (:mod:`fsmoe.bench.deepspeed_peer`). DeepSpeed-MoE has no
expert sharding (ESP): with ``esp > 1`` our rows run the requested EP × ESP layout, the DeepSpeed row
runs the EP-only layout over the same ranks (EP = ep·esp, whole experts), and an extra row of each of
our schedules on that layout is its like-for-like partner. Each row trains under its own job
(:func:`row_job`). :func:`check_train_job` refuses what cannot run; :func:`quick_train_job` is ``--quick``.

:func:`run_train_bench` runs :func:`train_bench_rank` on every rank (:mod:`fsmoe.bench.harness`):
``bench.warmup`` untimed then ``bench.reps`` timed rounds, each round one optimizer step of every row
in a shuffled order, each after a barrier, slowest rank per step; then every step's LM loss averaged
over the ranks. :func:`summarize_train` (pure):

* ``median_s``: the median over the timed steps of the slowest rank's optimizer-step time (forward,
  backward, gradient sync, clipping, AdamW); ``tokens_per_s`` = B·L / ``median_s`` (global tokens).
* ``predicted_s``: the planner's modelled step (:class:`fsmoe.perf.planner.JobPlan`): the auto row's
  predicted step of the plan its measured check kept (:func:`fsmoe.train.trainer.check_plan`), and for a
  row run exactly as the plan predicted another schedule (same layout, same degrees in every layer) that
  prediction; ``predicted_error`` = predicted / median − 1. ``plans``: the
  auto rows' plans (``JobPlan.to_dict``) and the wall time of planning each (profile included).
* ``deepspeed_over_this``: DeepSpeed's ``median_s`` / this row's (above 1: this row is faster).
  ``best_ours``: our fastest row on DeepSpeed's layout (the like-for-like one), and
  ``speedup_vs_deepspeed`` its ratio.
* ``losses``: every step's LM loss averaged over the ranks, warm-up included; ``loss_first`` is the loss
  of the first step (before any update: same weights, same batch for every row), ``loss_last`` the
  last step's. ``initial_loss_check`` compares DeepSpeed's first loss with ours (``INITIAL_LOSS_TOL``).
* CPU: the machine's busy CPU during the steps and the share spent outside our ranks, as for the layer.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.bench.deepspeed_peer import build_deepspeed_twin, deepspeed_unable
from fsmoe.bench.harness import (
    DEEPSPEED,
    ImplSpec,
    RankResult,
    check_cpu_ranks,
    cpu_stats,
    other_load,
    rank_threads,
    ratio,
    run_on_ranks,
    timed_rounds,
)
from fsmoe.bench.report import bar_chart, finish_report, job_dict, warning_lines
from fsmoe.cluster.spec import EmulatedClusterSpec
from fsmoe.config import JobConfig, ModelConfig, ParallelConfig, ScheduleConfig, get_schedule
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups
from fsmoe.parallel.grad_plan import PlannedGradSync
from fsmoe.parallel.grad_sync import GradSync

if TYPE_CHECKING:  # the trainer is imported when a rank needs it (see the adapters below)
    from fsmoe.perf.planner import JobPlan
    from fsmoe.train.distributed import DistContext
    from fsmoe.train.trainer import RankBatches

AUTO_SCHEDULE = "fsmoe"  # the schedule whose planned row the benchmark adds

INITIAL_LOSS_TOL = 1e-4  # nats: same weights and batch; only float summation order differs

# ``--quick``: short sequences, small batch, a few steps (checks that everything runs, not performance).
# The CLI applies them to the recipe before ``--config`` and the flags, which win.
QUICK_TRAIN: dict[str, Any] = {
    "model.seq_len": 64, "train.batch_size": 8, "data.max_bytes": 200_000, "bench.reps": 3, "bench.warmup": 1,
    "bench.timeout_s": 300.0, "plan.profile_budget_s": 5.0,
}


def quick_train_job(job: JobConfig) -> JobConfig:
    """``job`` with :data:`QUICK_TRAIN` applied."""
    return job.with_overrides(QUICK_TRAIN)


# --- the rows ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainImpl:
    """One row of the table: a schedule of ours (or DeepSpeed-MoE) trained under ``parallel``."""

    spec: ImplSpec
    parallel: ParallelConfig
    ep_only: bool = False  # the EP-only partner of an EP x ESP row (see the module doc)

    @property
    def name(self) -> str:
        base = f"{self.spec.family} auto" if self.spec.auto else self.spec.name  # auto: degrees per layer
        return f"{base} (EP={self.parallel.ep} only)" if self.ep_only else base

    @property
    def layout(self) -> str:
        p = self.parallel
        mp = f" MP={p.mp}" if p.mp > 1 else ""
        return f"EP={p.ep} ESP={p.esp}{mp}"


def bench_model(job: JobConfig) -> ModelConfig:
    """``job.model`` with the kept top-k weights renormalised for k >= 2 (what DeepSpeed's top-2 does)."""
    moe = dataclasses.replace(job.moe, renormalize=job.moe.top_k >= 2)
    return dataclasses.replace(job.model, moe=moe)


def tokens_per_step(job: JobConfig) -> int:
    """B·L: the tokens of one optimizer step over all ranks."""
    return job.train.batch_size * job.model.seq_len


def train_rows(job: JobConfig) -> list[TrainImpl]:
    """Every row, in table order: our schedules, their EP-only partners (esp > 1 with DeepSpeed),
    DeepSpeed last (dropped later, with a reason, where it cannot run)."""
    par, sched = job.parallel, job.schedule
    ep_only_par = dataclasses.replace(par, ep=par.ep * par.esp, esp=1)
    out = []
    for name in job.bench.schedules:
        degrees = sched.degrees if get_schedule(name).pipelined else (1, 1)
        out.append(TrainImpl(ImplSpec(name, *degrees), par))
    if AUTO_SCHEDULE in job.bench.schedules:
        out.append(TrainImpl(ImplSpec(AUTO_SCHEDULE, auto=True), par))
    if job.bench.deepspeed:
        ep_only = par.esp > 1 and deepspeed_unable(job) is None  # else its row only says why not
        if ep_only:
            out += [TrainImpl(i.spec, ep_only_par, ep_only=True) for i in list(out)]
        out.append(TrainImpl(ImplSpec(DEEPSPEED), ep_only_par if ep_only else par))
    return out


def row_job(job: JobConfig, row: TrainImpl) -> JobConfig:
    """The job one row trains under: its layout and schedule (DeepSpeed's twin: ``sequential``; the auto
    row: ``fsmoe`` with no degrees, i.e. planned), the bench model, ``bench.warmup + bench.reps`` steps
    at a constant-then-cosine lr (no warm-up)."""
    family = "sequential" if row.spec.family == DEEPSPEED else row.spec.family
    steps = job.bench.warmup + job.bench.reps
    schedule = (ScheduleConfig(name=family) if row.spec.auto
                else ScheduleConfig(name=family, r_fwd=row.spec.r_fwd, r_bwd=row.spec.r_bwd))
    return job.replace(model=bench_model(job), parallel=row.parallel, schedule=schedule,
                       train=dataclasses.replace(job.train, steps=steps, lr_warmup=0))


def check_train_job(job: JobConfig) -> None:
    """What the train benchmark needs beyond the job's own rules: every row's degrees and layout (each
    row's job validated against the model and the batch); ``ValueError`` naming the values. Call it
    before any rank starts."""
    check_cpu_ranks(job, "bench train")
    EmulatedClusterSpec.from_job(job)
    for row in train_rows(job):
        row_job(job, row).check_training()


# --- the trainer's API (every call into fsmoe.train is here, imported when a rank needs it) ---------------------
def _context(rank: int, world: int, groups: ProcessGroups) -> DistContext:
    from fsmoe.train.distributed import DistContext

    return DistContext(rank, world, groups)


def _corpus_N(job: JobConfig) -> Tensor:
    from fsmoe.train.data import load_corpus

    return load_corpus(job.data, job.model.seq_len).train_N


def _ours(rjob: JobConfig, ctx: DistContext) -> tuple[nn.Module, GradSync | PlannedGradSync]:
    """Our model and its gradient sync, exactly as ``fsmoe train`` builds them."""
    from fsmoe.train.trainer import build_grad_sync, build_model

    model = build_model(rjob, ctx)
    return model, build_grad_sync(model, rjob, ctx)


def _plan(rjob: JobConfig, ctx: DistContext, data_N: Tensor) -> tuple[JobConfig, JobPlan | None]:
    """The trainer's planning of a planned row (collective), its measured check included: the job with
    the plan's degrees and gradient plan, and the plan. Rank 0's lines go to its log."""
    from fsmoe.train.trainer import plan_schedule

    return plan_schedule(rjob, ctx, print if ctx.rank == 0 else (lambda _: None), data_N)


def _trainer_parts(model: nn.Module, rjob: JobConfig, data_N: Tensor,
                   ctx: DistContext) -> tuple[torch.optim.Optimizer, RankBatches]:
    """The trainer's optimizer for ``model`` and this rank's batches (seeded alike for every row)."""
    from fsmoe.train.trainer import RankBatches, build_optimizer

    return build_optimizer(model, rjob.train), RankBatches(data_N, rjob, rjob.run.seed, ctx)


def _train_step(run: TrainRun, step: int) -> Tensor:
    """One trainer step at 1-based ``step``: the LM loss."""
    from fsmoe.train.trainer import train_step

    out = train_step(run.model, run.opt, run.sync, run.batches.sample(), step, run.job.train, run.ctx,
                     dtype=run.job.run.dtype)
    assert out.loss is not None
    return out.loss


# --- what one rank runs -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainRun:
    """One row, ready on this rank: ``run()`` is one optimizer step on the row's next batch."""

    row: TrainImpl
    job: JobConfig
    ctx: DistContext
    model: nn.Module
    opt: torch.optim.Optimizer
    sync: GradSync | PlannedGradSync
    batches: RankBatches
    note: str = ""
    plan: dict[str, Any] | None = None  # the auto row's plan and profile (see TrainRankResult.plans)
    losses: list[Tensor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.row.name

    def prepare(self) -> None:
        pass  # the trainer's step zeroes the gradients itself

    def run(self) -> None:
        self.losses.append(_train_step(self, len(self.losses) + 1).detach())


@dataclass(kw_only=True, frozen=True)
class TrainRankResult(RankResult):
    """One rank's train result: ``losses`` every step's LM loss averaged over the ranks (warm-up steps
    included; the same on every rank); ``num_params`` this rank's parameters per row; ``plans`` per auto
    row its plan (:meth:`~fsmoe.perf.planner.JobPlan.to_dict`) under ``plan`` and under ``plan_wall_s`` the
    wall time of planning it (profile or cache read, solve, the ranks' agreement)."""

    losses: dict[str, list[float]]
    num_params: dict[str, int] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)


def _gar_note(sync: GradSync | PlannedGradSync) -> str:
    """Where the row's gradient all-reduce runs, from the plan it runs."""
    if not isinstance(sync, PlannedGradSync) or not sync.plan.ranges:
        return "GAR after the backward"
    kinds = {slot.split(":")[0] for slot, n in sync.plan.ranges if n > 0}
    where = " and ".join(w for k, w in (("moe", "inside the MoE backward"), ("dense", "beside the dense backward"))
                         if k in kinds)
    return f"GAR {where}, the rest after it"


def _build_run(job: JobConfig, row: TrainImpl, ctx: DistContext, data_N: Tensor, threads: int) -> TrainRun | str:
    rjob = row_job(job, row)
    planned: dict[str, Any] | None = None
    if row.spec.auto:
        t0 = time.perf_counter()
        rjob, plan = _plan(rjob, ctx, data_N)
        assert plan is not None  # a planned schedule on a distributed context always gets a plan
        # plan_schedule does not say whether its profile came from the cache: its whole wall time it is
        planned = {"plan": plan.to_dict(), "plan_wall_s": time.perf_counter() - t0}
    if row.spec.family == DEEPSPEED:
        built = build_deepspeed_twin(rjob, ctx, threads)
        if isinstance(built, str):
            return built
        model, note = built
        sync: GradSync | PlannedGradSync = GradSync(model, ctx.groups)
    else:
        model, sync = _ours(rjob, ctx)
        note = _gar_note(sync)
    model.train()
    opt, batches = _trainer_parts(model, rjob, data_N, ctx)
    if planned is not None:
        degrees = " ".join(f"{a}/{b}" for a, b in rjob.schedule.layer_degrees or ())
        note = f"planned r={degrees}; {note}"
    return TrainRun(row=row, job=rjob, ctx=ctx, model=model, opt=opt, sync=sync, batches=batches, note=note,
                    plan=planned)


def train_bench_rank(rank: int, world_size: int, job: JobConfig) -> TrainRankResult:
    """Run the benchmark of ``job`` on this rank (inside an initialised gloo world of ``world_size``):
    load the corpus; for every layout the rows need, build the process groups once (two channels);
    build every row; time them (see the module doc)."""
    start = time.perf_counter()
    threads = rank_threads(job)
    torch.set_num_threads(threads)
    data_N = _corpus_N(job)
    groups: dict[ParallelDims, ProcessGroups] = {}
    runs: list[TrainRun] = []
    skipped: dict[str, str] = {}
    ds_unable = deepspeed_unable(job)
    for row in train_rows(job):
        if row.spec.family == DEEPSPEED and ds_unable is not None:
            skipped[row.name] = ds_unable
            continue
        dims = ParallelDims.from_config(row.parallel)
        if dims not in groups:  # the same order on every rank: train_rows() is pure
            groups[dims] = build_groups(dims, channels=2)
        built = _build_run(job, row, _context(rank, world_size, groups[dims]), data_N, threads)
        if isinstance(built, str):
            skipped[row.name] = built
        else:
            runs.append(built)
    times = timed_rounds(runs, job.bench.warmup, job.bench.reps, rank)
    losses = {}
    for run in runs:  # rank means of every step's loss (one all-reduce per row, after the timing)
        loss_S = torch.stack(run.losses).double()
        dist.all_reduce(loss_S)
        losses[run.name] = (loss_S / world_size).tolist()
    dist.barrier()  # no rank starts tearing its groups down while a peer is still in the last exchange
    return TrainRankResult(
        rank=rank, names=[r.name for r in runs], times=times, notes={r.name: r.note for r in runs}, skipped=skipped,
        losses=losses, num_params={r.name: sum(p.numel() for p in r.model.parameters()) for r in runs},
        plans={r.name: r.plan for r in runs if r.plan is not None}, wall_s=time.perf_counter() - start,
    )


# --- the payload, the table, the chart -------------------------------------------------------------------------
def summarize_train(job: JobConfig, results: Sequence[TrainRankResult], *, cluster: dict[str, Any]) -> dict[str, Any]:
    """The payload of one run (see the module doc); ``cluster`` describes where it ran."""
    first = results[0]
    rows_by_name = {r.name: r for r in train_rows(job)}
    tokens = tokens_per_step(job)
    rows: list[dict[str, Any]] = []
    for name in first.names:
        row, samples, losses = rows_by_name[name], first.times.samples_s[name], first.losses[name]
        median = statistics.median(samples)
        rows.append({
            "name": name, "family": row.spec.family, "layout": row.layout, "ep": row.parallel.ep,
            "esp": row.parallel.esp, "mp": row.parallel.mp, "r_fwd": row.spec.r_fwd, "r_bwd": row.spec.r_bwd,
            "median_s": median, "min_s": min(samples), "samples_s": samples, "tokens_per_s": tokens / median,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "note": first.notes.get(name, ""),
            "params_rank0": first.num_params.get(name), **cpu_stats(first.times, name),
        })
    plans = {name: first.plans[name] for name in first.names if name in first.plans}
    for r in rows:
        r["predicted_s"] = predicted_step(r, rows, plans)
        r["predicted_error"] = (r["predicted_s"] / r["median_s"] - 1.0
                                if r["predicted_s"] is not None and r["median_s"] > 0 else None)
    ds = next((r for r in rows if r["family"] == DEEPSPEED), None)
    for r in rows:
        r["deepspeed_over_this"] = ratio(ds["median_s"], r["median_s"]) if ds else None
    ours = [r for r in rows if r["family"] != DEEPSPEED]
    like = [r for r in ours if ds is None or r["layout"] == ds["layout"]]
    best = min(like, key=lambda r: (r["median_s"], r["name"])) if like else None
    check = None
    if ds is not None and ours:
        diff = abs(ds["loss_first"] - ours[0]["loss_first"])
        check = {"ours": ours[0]["name"], "ours_loss": ours[0]["loss_first"], "deepspeed_loss": ds["loss_first"],
                 "abs_diff": diff, "tolerance": INITIAL_LOSS_TOL, "match": diff <= INITIAL_LOSS_TOL}
    m = job.model
    return {
        "benchmark": "train",
        "cluster": cluster,
        "job": job_dict(job),
        "model": {"preset": m.name, "n_layers": m.n_layers, "d_model": m.d_model, "moe_layers": m.num_moe_layers,
                  "experts": m.moe.num_experts, "top_k": m.moe.top_k, "d_hidden": m.moe.d_hidden,
                  "capacity_factor": m.moe.capacity_factor, "gate": m.moe.gate, "expert": m.moe.expert,
                  "seq_len": m.seq_len},
        "tokens_per_step": tokens,
        "implementations": rows,
        "plans": plans,
        "skipped": first.skipped,
        "best_ours": best["name"] if best else None,
        "speedup_vs_deepspeed": best["deepspeed_over_this"] if best else None,
        "initial_loss_check": check,
        "ours_agree_at_first_step": (max(r["loss_first"] for r in ours) - min(r["loss_first"] for r in ours)
                                     if ours else None),
        "other_load": other_load(first.times, rows),
        "rank_wall_s": max(r.wall_s for r in results),
    }


def predicted_step(row: dict[str, Any], rows: Sequence[dict[str, Any]], plans: dict[str, dict[str, Any]]
                   ) -> float | None:
    """A row's modelled step: an auto row's own plan's ``step_s``; another row of ours, the prediction an
    auto row's plan on the same layout made for its schedule when that is exactly what the row ran (the
    schedule's default gradient plan, the row's degrees in every MoE layer); else None."""
    if row["name"] in plans:
        plan = plans[row["name"]]["plan"]
        check = plan.get("check")
        if check:  # the measured check may run another of the plans weighed: that one's prediction
            return float(next(c["predicted_s"] for c in check["candidates"] if c["label"] == check["picked"]))
        return float(plan["step_s"])
    if row["family"] == DEEPSPEED:
        return None
    for other in rows:
        plan = plans.get(other["name"], {}).get("plan")
        if plan is None or other["layout"] != row["layout"]:
            continue
        pred = plan["predictions"].get(row["family"])
        pair = [row["r_fwd"], row["r_bwd"]]
        if pred and pred["method"] == "default" and pred["degrees"] and all(d == pair for d in pred["degrees"]):
            return float(pred["step_s"])
    return None


def format_train_markdown(payload: dict[str, Any]) -> str:
    job, m, cluster = payload["job"], payload["model"], payload["cluster"]
    bench = job["bench"]
    lines = [
        f"### Training steps: GPT-MoE `{m['preset']}` ({m['n_layers']} layers, D={m['d_model']}, {m['moe_layers']} "
        f"MoE layers: E={m['experts']}, top-{m['top_k']}, H={m['d_hidden']}, f={m['capacity_factor']}, "
        f"{m['gate']}/{m['expert']}), B={job['train']['batch_size']} x L={m['seq_len']} = "
        f"{payload['tokens_per_step']} tokens/step, fp32",
        f"{cluster['description']}; dispatcher {job['parallel']['dispatcher']}; median of {bench['reps']} interleaved "
        f"steps (+{bench['warmup']} warm-up), slowest rank per step; every row trains on the same batches",
        *warning_lines(payload, "steps"),
        "",
        f"| implementation | layout | median step s | predicted s | error | tokens/s | DeepSpeed / this | loss step 1 "
        f"| loss step {bench['warmup'] + bench['reps']} | CPU busy | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["implementations"]:
        busy = "-" if r["cpu_utilization"] is None else f"{100 * r['cpu_utilization']:.0f}%"
        vs_ds = "-" if r["deepspeed_over_this"] is None else f"{r['deepspeed_over_this']:.2f}x"
        pred = "-" if r.get("predicted_s") is None else f"{r['predicted_s']:.3f}"
        err = "-" if r.get("predicted_error") is None else f"{100 * r['predicted_error']:+.0f}%"
        lines.append(f"| {r['name']} | {r['layout']} | {r['median_s']:.3f} | {pred} | {err} | {r['tokens_per_s']:,.0f} "
                     f"| {vs_ds} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | {busy} | {r['note']} |")
    for name, why in payload["skipped"].items():
        lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | not run: {why} |")
    for name, p in payload.get("plans", {}).items():
        plan = p["plan"]
        degrees = " ".join(f"{a}/{b}" for a, b in plan["degrees"])
        gar = plan["gar_plan"] if plan["gar_plan"] != "after" else "none (all after the backward)"
        lines += ["", f"{name}: planned r_fwd/r_bwd per MoE layer {degrees}; gradient plan "
                      f"{gar} (partition: {plan['partition']}); "
                      f"predicted step {plan['step_s']:.3f} s; "
                      f"solve {1e3 * plan['solve_s']:.0f} ms, planning with its profile {p['plan_wall_s']:.1f} s."]
    if payload["best_ours"] and payload["speedup_vs_deepspeed"] is not None:
        lines += ["", f"Best fsmoe row on DeepSpeed's layout: {payload['best_ours']}, "
                      f"{payload['speedup_vs_deepspeed']:.2f}x DeepSpeed's tokens/s."]
    check = payload["initial_loss_check"]
    if check is not None:
        verdict = "yes" if check["match"] else "NO"
        lines += ["", f"Step-1 loss from the same weights and batch: {check['ours']} {check['ours_loss']:.6f}, "
                      f"deepspeed {check['deepspeed_loss']:.6f} (|diff| {check['abs_diff']:.1e}; "
                      f"within {check['tolerance']:g}: {verdict})."]
    return "\n".join(lines)


def write_train_chart(path: str | Path, payload: dict[str, Any]) -> str | None:
    """A bar per row (tokens/s); a note when matplotlib is missing (then nothing is written)."""
    rows, par, m = payload["implementations"], payload["job"]["parallel"], payload["model"]
    title = (f"GPT-MoE {m['preset']} training, {payload['tokens_per_step']} tokens/step, EP={par['ep']} "
             f"ESP={par['esp']}\n{payload['cluster']['description']}")
    return bar_chart(path, rows, "tokens_per_s", title=title, ylabel="tokens/s (median step, slowest rank)",
                     bar_labels=[f"{r['tokens_per_s']:,.0f}" for r in rows], width_per_bar=1.1, rotation=30)


def run_train_bench(job: JobConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark of ``job`` (:func:`check_train_job` first); print the table with ``echo``; write
    ``train.json``, ``train.png`` and ``job.toml`` into ``run.out``; return the payload."""
    check_train_job(job)
    t0 = time.perf_counter()
    estimate = f"{len(train_rows(job))} implementations x {job.bench.warmup + job.bench.reps} steps"
    results, cluster = run_on_ranks("train", job, train_bench_rank, estimate, echo)
    payload = summarize_train(job, results, cluster=cluster)
    return finish_report("train", job, payload, t0, [], format_train_markdown, write_train_chart, echo)
