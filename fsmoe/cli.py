"""The ``fsmoe`` command: a thin layer that parses flags into one :class:`~fsmoe.config.JobConfig` and calls
the typed functions (``run_train``, ``run_profile``, ``plan_job``, ``run_layer_bench``, ``run_train_bench``).

Only this module reads ``sys.argv`` (and, for a rank started by torchrun, ``WORLD_SIZE``). Every flag is
declared by the config itself (:func:`fsmoe.config.flag_specs`): a command names the config sections it
reads and the recipe it starts from (:data:`fsmoe.config.RECIPES`), so a flag has one name, one meaning
and one parser in every command. A job is resolved as: the command's recipe, then ``--quick`` (the
benchmarks), then ``--config job.toml``, then the flags given. A new subcommand (profile, plan,
simulate, ...) adds one :class:`Command` to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsmoe.config import PLANNED_SCHEDULES, RECIPES, JobConfig, flag_specs, get_value, read_toml_overrides


class UsageError(Exception):
    """A mistake in what the user asked for: reported as a one-line error with exit status 2."""


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join("/".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "(empty)"
    return str(value)


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_job_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...], base: JobConfig) -> None:
    """One flag per field of ``sections``, grouped by section; ``dest`` is the field's ``section.field``
    key and nothing is stored unless the flag is given (the default shown is ``base``'s)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in flag_specs(sections):
        section = spec.key.partition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (config section [{section}])")
        kw: dict[str, Any] = {"dest": spec.key, "default": argparse.SUPPRESS,
                              "help": f"{spec.help} (default: {_shown(get_value(base, spec.key))})".replace("%", "%%")}
        if spec.is_bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if spec.parse is not None:
                kw["type"] = _arg_type(spec.parse)
            if spec.nargs is not None:
                kw["nargs"] = spec.nargs
            kw["metavar"] = "{" + ",".join(spec.choices) + "}" if spec.choices else spec.key.partition(".")[2].upper()
        groups[section].add_argument(spec.flag, **kw)


def job_from_args(args: argparse.Namespace, command: Command) -> JobConfig:
    """The command's recipe, ``--quick``, ``--config FILE``, then the flags given; ValueError naming the
    values when the job breaks a rule."""
    job = RECIPES[command.recipe]()
    if getattr(args, "quick", False) and command.quick is not None:
        job = command.quick(job)
    overrides: dict[str, Any] = {}
    if args.config is not None:
        overrides.update(read_toml_overrides(args.config))
    overrides.update({k: v for k, v in vars(args).items() if "." in k})
    if "parallel.nproc" not in overrides and "WORLD_SIZE" in os.environ:
        overrides["parallel.nproc"] = int(os.environ["WORLD_SIZE"])  # a rank started by torchrun
    job = job.with_overrides(overrides)
    if command.check is not None:
        command.check(job)
    return job


# --- train ----------------------------------------------------------------------------------------------------
def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


def _on_gpu(job: JobConfig) -> bool:
    import torch

    return job.run.device == "cuda" or (job.run.device == "auto" and torch.cuda.is_available())


def check_profiled_job(job: JobConfig) -> None:
    """``fsmoe profile`` / ``fsmoe plan``, and a planned ``fsmoe train``: the profiler times CPU workloads on
    gloo ranks; on a GPU that would plan from the wrong machine, so it is refused, naming the way out."""
    job.check_training()
    if _on_gpu(job):
        raise ValueError("the profiler measures CPU workloads on gloo ranks and does not run on CUDA yet; on GPUs "
                         "give the degrees (--r-fwd/--r-bwd or --layer-degrees), or pass --device cpu")


def check_train_job(job: JobConfig) -> None:
    """What can be checked once, before any rank starts (and again, cheaply, on every rank): the training
    rules, the gradient plan's syntax against the model's gradient stream; in the launching process also
    the data file and the run directory."""
    if job.schedule.planned:
        check_profiled_job(job)
    job.check_training()
    if job.schedule.gar_plan:
        from fsmoe.parallel.grad_plan import parse_plan
        from fsmoe.perf.partition import rank_stream

        parse_plan(job.schedule.gar_plan, rank_stream(job))
    if not _under_launcher():
        import torch

        from fsmoe.train.data import check_data
        from fsmoe.train.distributed import resolve_device

        par = job.parallel  # the device every rank will get, checked once here (each rank checks it again)
        resolve_device(job.run.device, local_rank=0, local_world_size=par.procs_per_node or par.nproc,
                       num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        from fsmoe.train.rundir import prepare_run_dir

        check_data(job.data, job.model.seq_len, job.model.vocab_size)
        prepare_run_dir(job)


def handle_train(job: JobConfig, args: argparse.Namespace) -> int:
    argv = args.argv
    from fsmoe.train.data import DataError
    from fsmoe.train.distributed import launch
    from fsmoe.train.trainer import run_train

    if job.parallel.distributed and not _under_launcher():
        # Not launched yet: start the ranks, each re-running this command line (validated here, once).
        if job.cluster.launcher == "local":
            return launch(argv, job.parallel.nproc, hang_timeout_s=job.parallel.hang_timeout_s)
        return _launch_on_cluster(job, argv)
    from fsmoe.train.trainer import TrainingDiverged

    try:
        run_train(job)
    except DataError as e:  # a missing, empty or too-short --data file
        raise UsageError(str(e)) from e
    except TrainingDiverged as e:  # every rank stops at the same step; one of them says why
        if os.environ.get("RANK", "0") == "0":
            print(f"fsmoe train: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _launch_on_cluster(job: JobConfig, argv: Sequence[str]) -> int:
    from fsmoe.cluster import ClusterUnavailable, EmulatedClusterSpec, launch_on_cluster
    from fsmoe.train.distributed import HangWatch

    cl, hang = job.cluster, job.parallel.hang_timeout_s
    spec = EmulatedClusterSpec.from_job(job)
    watchdog = None if hang is None else HangWatch(job.parallel.nproc, hang)
    try:
        # c10d warns on every rank that the namespace's addresses have no host name; keep the log readable
        quiet = {"TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
        code = launch_on_cluster(spec, [sys.executable, "-u", "-m", "fsmoe", *argv],
                                 allow_unshaped=cl.launcher == "auto", env=quiet, watchdog=watchdog)
    except ClusterUnavailable as e:
        raise UsageError(f"{e}; use --launcher auto to run unshaped anyway") from e
    return 0 if code == 0 else 1


# --- profile and plan ----------------------------------------------------------------------------------------
def _costs(job: JobConfig) -> Any:
    """The job's costs: the cached profile, or profiled now on ranks laid out as the job asks."""
    from fsmoe.cluster import ClusterUnavailable
    from fsmoe.perf.profile import run_profile

    try:
        return run_profile(job, cache_dir=Path(job.plan.profile_cache).expanduser(), reprofile=job.plan.reprofile,
                           budget_s=job.plan.profile_budget_s)
    except ClusterUnavailable as e:
        raise UsageError(f"{e}; use --launcher auto to run unshaped anyway") from e


def handle_profile(job: JobConfig, args: argparse.Namespace) -> int:
    from fsmoe.perf.profile import format_costs

    print(format_costs(_costs(job)))
    return 0


def handle_plan(job: JobConfig, args: argparse.Namespace) -> int:
    from fsmoe.perf.planner import plan_job

    name = job.schedule.name if job.schedule.name in PLANNED_SCHEDULES else "fsmoe"
    plan = plan_job(job, _costs(job), schedule=name, max_degree=job.plan.max_degree, min_gain=job.plan.min_gain)
    print(json.dumps(plan.to_dict(), indent=2, allow_nan=False) if args.json else plan.explain())
    return 0


def handle_cluster_cleanup(job: JobConfig, args: argparse.Namespace) -> int:
    from fsmoe.cluster import cleanup_command

    return cleanup_command()


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for machines)")


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `fsmoe train` (finished or still going)")


# --- bench ----------------------------------------------------------------------------------------------------
def handle_bench(run: Callable[[JobConfig], Any]) -> Callable[[JobConfig, argparse.Namespace], int]:
    def handle(job: JobConfig, args: argparse.Namespace) -> int:
        from fsmoe.cluster import ClusterUnavailable

        try:
            run(job)
        except ClusterUnavailable as e:  # --launcher emulated where namespaces cannot be built
            raise UsageError(str(e)) from e
        return 0

    return handle


def _lazy(path: str) -> Callable[..., Any]:
    """``module.function``, imported when first called: ``fsmoe --help`` and a refused flag stay fast."""
    module, _, name = path.rpartition(".")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


# --- the commands ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """One subcommand: its words (``("bench", "layer")``), the config sections its flags cover, the recipe
    it starts from, what ``--quick`` does (None: no such flag), an extra check of the resolved job, and
    the handler that runs it."""

    words: tuple[str, ...]
    help: str
    description: str
    sections: tuple[str, ...]
    handler: Callable[[JobConfig, argparse.Namespace], int]
    quick: Callable[[JobConfig], JobConfig] | None = None
    quick_help: str = ""
    check: Callable[[JobConfig], None] | None = None
    extra: Callable[[argparse.ArgumentParser], None] | None = None  # flags outside the job config

    @property
    def recipe(self) -> str:
        return " ".join(self.words)


SIM_SECTIONS = ("model", "moe", "sim", "run")

GROUP_HELP = {"bench": "side-by-side benchmarks on the emulated multi-node cluster",
              "cluster": "the emulated cluster: housekeeping"}
TRAIN_SECTIONS = ("model", "moe", "parallel", "schedule", "plan", "train", "data", "run", "cluster")

COMMANDS: tuple[Command, ...] = (
    Command(("train",), "train a GPT-MoE language model (one process or --nproc ranks)",
            "Train the GPT-MoE on one process or on --nproc ranks (started by fsmoe itself, on this machine or on an "
            "emulated cluster with --launcher emulated, or by torchrun). The resolved job is written to "
            "<out>/job.toml; --config reads such a file, and flags given override it.",
            TRAIN_SECTIONS, handle_train, check=check_train_job),
    Command(("profile",), "measure this job's operations on its own groups (alpha-beta per op; cached)",
            "Start the job's ranks (as `fsmoe train` would), time every operation of its MoE blocks on the real "
            "process groups — EP AlltoAll, ESP AllGather/ReduceScatter and the gradient all-reduce, idle and "
            "while experts compute; expert, gate and dense compute — fit t = alpha + beta*n per operation and "
            "cache the result (--profile-cache; --reprofile measures again).",
            TRAIN_SECTIONS, handle_profile, check=check_profiled_job),
    Command(("plan",), "the planner's choice for this job: pipeline degrees per layer, gradient plan, why",
            "Profile (or read the cached profile), then run FSMoE's planner: per MoE layer the forward and "
            "backward pipeline degrees, the bound case and the bottleneck, the predicted time of every schedule, "
            "and the gradient all-reduce plan. Same flags as `fsmoe train`; `fsmoe train --schedule fsmoe` "
            "does the same by itself when no degree is given.",
            TRAIN_SECTIONS, handle_plan, check=check_profiled_job, extra=_json_flag),
    Command(("cluster", "cleanup"), "remove what dead emulated clusters left (namespaces, bridges, their ranks)",
            "Remove the network namespaces (and the processes in them) of emulated clusters whose launcher is "
            "gone — e.g. after a SIGKILL; a live run's cluster is left alone. Needs root.",
            (), handle_cluster_cleanup),
    Command(("bench", "layer"), "one MoE layer: our schedules at several degrees and DeepSpeed-MoE, interleaved",
            "Time one MoE layer's forward + backward (+ the dense Gradient-AllReduce) under every schedule and degree, "
            "with DeepSpeed-MoE beside them, interleaved round by round on an emulated cluster; report medians, ratios "
            "to the fastest fsmoe schedule and to the per-channel lower bound, and peak memory. Results, chart and the "
            "resolved job.toml go to --out.",
            ("model", "moe", "parallel", "plan", "run", "cluster", "bench"),
            handle_bench(_lazy("fsmoe.bench.layer.run_layer_bench")),
            quick=_lazy("fsmoe.bench.layer.quick_layer_job"),
            quick_help="small sizes, 2 rounds: checks that everything runs (about half a minute)",
            check=_lazy("fsmoe.bench.layer.check_layer_job")),
    Command(("bench", "train"), "training tokens/s of the GPT-MoE: fsmoe vs the same model with DeepSpeed's MoE layer",
            "Train the GPT-MoE with fsmoe's schedules (exactly as `fsmoe train` does) and the same model with "
            "DeepSpeed-MoE's layer (same weights, gate rule, capacity and batches), one optimizer step each per round, "
            "interleaved on an emulated cluster; report the median step time, tokens/s, the ratio to DeepSpeed, and "
            "the losses. The pipelined rows use --r-fwd/--r-bwd.",
            (*TRAIN_SECTIONS, "bench"),
            handle_bench(_lazy("fsmoe.bench.train.run_train_bench")),
            quick=_lazy("fsmoe.bench.train.quick_train_job"), quick_help="short sequences, small batch, 1+3 steps",
            check=_lazy("fsmoe.bench.train.check_train_job")),
    Command(("simulate",), "predict every schedule's iteration time on a described cluster (no GPU needed)",
            "Play the schedules' own task lists for a whole model on a described cluster (a preset such as the "
            "paper's Testbed-A/B or DGX-H100, or this machine's profile) with alpha-beta costs: per-schedule "
            "iteration time, breakdown by task kind, speedups and the planner's degrees per layer; --trace writes "
            "the simulated timeline as a Chrome trace (Perfetto).",
            SIM_SECTIONS, _lazy("fsmoe.sim.commands.handle_simulate")),
    Command(("reproduce",), "the paper's experiments, simulated, beside the paper's numbers (markdown + plots)",
            "Simulate the paper's experiments (Tables 2, 5, 6; Figs. 6, 7; the forward/backward degree count; a "
            "scale study) and write a report to --out that puts each paper result beside ours with the difference.",
            ("run",), _lazy("fsmoe.sim.commands.handle_reproduce")),
    Command(("report",), "loss curves, expert-load heat map and a summary of a training run",
            "Read RUN_DIR (metrics.jsonl, job.toml, summary.json; the run may still be going) and write "
            "RUN_DIR/report/: loss curves (train and validation) and the per-layer expert-load heat map as PNG, "
            "and a markdown summary.",
            (), _lazy("fsmoe.train.report.handle_report"), extra=_run_dir_arg),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmoe", description="FSMoE: train and study sparse MoE models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        where = sub
        if len(cmd.words) == 2:
            if cmd.words[0] not in nested:
                group = sub.add_parser(cmd.words[0], help=GROUP_HELP[cmd.words[0]])
                nested[cmd.words[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="BENCHMARK")
            where = nested[cmd.words[0]]
        p = where.add_parser(cmd.words[-1], help=cmd.help, description=cmd.description)
        p.add_argument("--config", metavar="FILE", default=None,
                       help="a TOML job file (e.g. a run's job.toml); flags given override it")
        if cmd.quick is not None:
            p.add_argument("--quick", action="store_true", help=cmd.quick_help)
        if cmd.extra is not None:
            cmd.extra(p)
        add_job_flags(p, cmd.sections, RECIPES[cmd.recipe]())
        p.set_defaults(cmd=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsmoe`` and ``python -m fsmoe``; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    cmd: Command = args.cmd
    try:
        job = job_from_args(args, cmd)  # every rule of the job, checked here before any rank starts
    except ValueError as e:
        parser.exit(2, f"fsmoe {cmd.recipe}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"fsmoe {cmd.recipe}: interrupted\n")
    args.argv = argv
    try:
        return int(cmd.handler(job, args))
    except UsageError as e:
        parser.exit(2, f"fsmoe {cmd.recipe}: error: {e}\n")
    except KeyboardInterrupt:  # the launchers have stopped their ranks by now; a launched rank stays quiet
        parser.exit(130, "" if "RANK" in os.environ else f"fsmoe {cmd.recipe}: interrupted\n")
