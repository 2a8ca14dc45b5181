"""The ``fsmoe`` command: a thin layer that parses flags into typed configs and calls the typed functions.

Only this module reads ``sys.argv``. Each subcommand has an ``_add_<name>`` function that declares its
flags, a ``<name>_config_from_args`` function that turns them into a config (tests call it directly),
and a handler that calls the library; a new subcommand (bench, profile, plan, simulate, ...) adds one
such trio and one line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fsmoe.bench.config import LAUNCHERS, LayerBenchConfig, config_from_args, quick_layer_config
from fsmoe.bench.layer import run_layer_bench
from fsmoe.cluster import ClusterUnavailable, EmulatedClusterSpec, launch_on_cluster
from fsmoe.models.gpt_moe import MODEL_PRESETS, GPTMoEConfig, model_preset
from fsmoe.moe.config import EXPERT_NAMES, GATE_NAMES, ORDER_NAMES
from fsmoe.schedule.schedules import SCHEDULES
from fsmoe.train.data import DataConfig, DataError
from fsmoe.train.distributed import DISPATCHER_NAMES, ParallelConfig, env_world_size, launch
from fsmoe.train.trainer import TrainConfig, run_train

_TRAIN_DEFAULTS = TrainConfig()


class UsageError(Exception):
    """A mistake in what the user asked for: reported as a one-line error with exit status 2."""


def _capacity_factor(text: str) -> float | None:
    """``none`` (any case) means no capacity limit; anything else must be a positive float."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def _add_train(sub: argparse._SubParsersAction) -> None:
    d = _TRAIN_DEFAULTS
    p = sub.add_parser("train", help="train a GPT-MoE language model (one process or --nproc ranks)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d.out_dir, help="output directory (metrics.jsonl, summary.json)")
    run.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    run.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    run.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    run.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on matrices")
    run.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    run.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables clipping")
    run.add_argument("--seed", type=int, default=d.seed, help="seeds the model and the batches")
    run.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    run.add_argument("--eval-iters", type=int, default=d.eval_iters, help="validation batches at the end")
    run.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads; None: torch's")
    run.add_argument("--max-seconds", type=float, default=d.max_seconds, help="training time budget")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=argparse.SUPPRESS,
                      help="a text file to train on (default: the embedded Python stdlib corpus)")
    data.add_argument("--data-bytes", type=int, default=d.data.max_bytes, help="embedded corpus size")
    model = p.add_argument_group("model (overrides of the preset)")
    model.add_argument("--preset", choices=list(MODEL_PRESETS), default="tiny", help="model size")
    model.add_argument("--moe-every", type=int, default=argparse.SUPPRESS,
                       help="block i is MoE when (i+1) %% N == 0 (default: the preset's)")
    # default None below: keep the preset's value
    model.add_argument("--gate", choices=GATE_NAMES, default=None, help="router")
    model.add_argument("--order", choices=ORDER_NAMES, default=None, help="token layout implementation")
    model.add_argument("--expert", choices=EXPERT_NAMES, default=None, help="expert network")
    model.add_argument("--experts", type=int, default=None, help="number of experts E")
    model.add_argument("--top-k", type=int, default=None, help="experts per token (switch: 1)")
    # SUPPRESS: the attribute exists only when the flag is given, which tells "--capacity-factor none"
    # (no dropping) apart from "not given" (keep the preset's factor).
    model.add_argument("--capacity-factor", type=_capacity_factor, default=argparse.SUPPRESS,
                       help="capacity factor f, or 'none' for no token dropping (default: the preset's)")
    par = p.add_argument_group("parallelism (ranks are started by fsmoe itself, or by torchrun)")
    pd = ParallelConfig()
    par.add_argument("--nproc", type=int, default=None,
                     help="number of ranks (processes); under torchrun: its WORLD_SIZE (leave it out there)")
    par.add_argument("--procs-per-node", type=int, default=None,
                     help="ranks per declared node (decides intra/inter groups); default: all on one node")
    par.add_argument("--mp", type=int, default=pd.mp, help="tensor-parallel degree of attention (+ sequence parallel)")
    par.add_argument("--ep", type=int, default=pd.ep, help="expert-parallel degree")
    par.add_argument("--esp", type=int, default=pd.esp, help="expert-sharding degree (H split across ranks)")
    par.add_argument("--dispatcher", choices=DISPATCHER_NAMES, default=pd.dispatcher, help="AlltoAll algorithm")
    par.add_argument("--schedule", choices=list(SCHEDULES), default=pd.schedule, help="MoE block schedule")
    par.add_argument("--r-fwd", type=int, default=pd.r_fwd, help="forward pipeline degree")
    par.add_argument("--r-bwd", type=int, default=pd.r_bwd, help="backward pipeline degree")
    par.add_argument("--gar-plan", default=None,
                     help="gradient all-reduce plan, e.g. 'moe:3=2MB,dense:3=ready' (default: the schedule's)")
    par.add_argument("--trace", default=None, help="write a Chrome-trace JSON of the MoE tasks (rank 0)")
    emu = p.add_argument_group("emulated cluster (one network namespace per node, tbf-shaped links; needs root)")
    emu.add_argument("--emulate-nodes", type=int, default=None, metavar="N",
                     help="run the --nproc ranks as N emulated nodes of --nproc/N ranks each")
    emu.add_argument("--link", default="1gbit", metavar="RATE",
                     help="each node's uplink and downlink rate, e.g. 1gbit, 200mbit, or 'unshaped'")
    emu.add_argument("--allow-unshaped", action="store_true",
                     help="where namespaces cannot be built, run on loopback (unshaped) with a warning")
    p.set_defaults(handler=_handle_train)


# Flags that only the launching process reads; the ranks it starts get the rest of the command line.
_EMULATION_FLAGS = {"--emulate-nodes": True, "--link": True, "--allow-unshaped": False}


def _rank_argv(argv: Sequence[str], procs_per_node: int) -> list[str]:
    """``argv`` without the emulation flags (``--flag value`` and ``--flag=value`` forms), with
    ``--procs-per-node`` set to the emulated node size."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _EMULATION_FLAGS or name == "--procs-per-node":
            skip = "=" not in a and (_EMULATION_FLAGS.get(name, True))
            continue
        out.append(a)
    return [*out, "--procs-per-node", str(procs_per_node)]


def emulated_cluster_spec(args: argparse.Namespace, nproc: int) -> EmulatedClusterSpec:
    """The cluster ``--emulate-nodes`` asks for; ValueError naming the values when it does not fit."""
    nodes = args.emulate_nodes
    if nodes < 1:
        raise ValueError(f"--emulate-nodes must be >= 1, got {nodes}")
    if nproc % nodes:
        raise ValueError(f"--nproc {nproc} ranks cannot be split evenly over --emulate-nodes {nodes} nodes")
    per_node = nproc // nodes
    if args.procs_per_node is not None and args.procs_per_node != per_node:
        raise ValueError(
            f"--procs-per-node {args.procs_per_node} contradicts --nproc {nproc} over --emulate-nodes {nodes} "
            f"({per_node} ranks per node); leave --procs-per-node out"
        )
    return EmulatedClusterSpec(nodes=nodes, procs_per_node=per_node, link=args.link)


def model_config_from_args(args: argparse.Namespace) -> GPTMoEConfig:
    """The preset with the flags that were given applied on top (flags left unset keep the preset's)."""
    base = model_preset(args.preset)
    moe_overrides = {
        name: value
        for name, value in (
            ("gate", args.gate), ("order", args.order), ("expert", args.expert),
            ("num_experts", args.experts), ("top_k", args.top_k),
        )
        if value is not None
    }
    if hasattr(args, "capacity_factor"):
        moe_overrides["capacity_factor"] = args.capacity_factor
    # The switch gate is top-1 by definition; pick k=1 for it unless the user chose a k.
    if args.gate == "switch" and args.top_k is None:
        moe_overrides["top_k"] = 1
    moe = dataclasses.replace(base.moe, **moe_overrides)
    model_overrides: dict[str, object] = {"moe": moe}
    if hasattr(args, "moe_every"):
        model_overrides["moe_every"] = args.moe_every
    return dataclasses.replace(base, **model_overrides)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=model_config_from_args(args),
        data=DataConfig(path=getattr(args, "data", None), max_bytes=args.data_bytes),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip if args.grad_clip else None,
        seed=args.seed,
        log_every=args.log_every,
        eval_iters=args.eval_iters,
        out_dir=args.out,
        threads=args.threads,
        max_seconds=args.max_seconds,
        parallel=ParallelConfig(
            nproc=args.nproc if args.nproc is not None else env_world_size(),
            procs_per_node=args.procs_per_node, mp=args.mp, ep=args.ep, esp=args.esp,
            dispatcher=args.dispatcher, schedule=args.schedule, r_fwd=args.r_fwd, r_bwd=args.r_bwd,
            gar_plan=args.gar_plan,
        ),
        trace=args.trace,
    )


def _handle_train(args: argparse.Namespace) -> int:
    try:
        cfg = train_config_from_args(args)  # config validation raises ValueError naming the values
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.emulate_nodes is not None and env_world_size() == 1:
        try:
            spec = emulated_cluster_spec(args, cfg.parallel.nproc)
            # the layout on the emulated nodes, checked here once, before any rank starts
            dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, procs_per_node=spec.procs_per_node))
        except ValueError as e:
            raise UsageError(str(e)) from e
        argv = [sys.executable, "-u", "-m", "fsmoe", *_rank_argv(args.argv, spec.procs_per_node)]
        try:
            # c10d warns on every rank that the namespace's addresses have no host name; keep the log readable
            quiet = {"TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
            code = launch_on_cluster(spec, argv, allow_unshaped=args.allow_unshaped, env=quiet)
        except ClusterUnavailable as e:
            raise UsageError(f"{e}; pass --allow-unshaped to run so anyway") from e
        return 0 if code == 0 else 1
    if cfg.parallel.distributed and env_world_size() == 1:
        # Not launched yet: start the ranks, each re-running this command line (validated above, once).
        return launch(args.argv, cfg.parallel.nproc)
    try:
        run_train(cfg)
    except DataError as e:  # a missing, empty or too-short --data file
        raise UsageError(str(e)) from e
    return 0


def _degree_pair(text: str) -> tuple[int, int]:
    """``4/8`` -> (4, 8): a forward and a backward pipeline degree."""
    fwd, sep, bwd = text.partition("/")
    try:
        pair = (int(fwd), int(bwd))
    except ValueError:
        pair = None
    if not sep or pair is None:
        raise argparse.ArgumentTypeError(f"expected R_FWD/R_BWD such as 4/8, got {text!r}")
    return pair


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks on the emulated multi-node cluster")
    p.set_defaults(handler=_handle_bench)
    which = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    d, q = LayerBenchConfig(), quick_layer_config()
    lp = which.add_parser(
        "layer", help="one MoE layer: our schedules at several degrees and DeepSpeed-MoE, interleaved",
        description="Time one MoE layer's forward + backward (+ the dense Gradient-AllReduce) under every "
                    "schedule and degree, with DeepSpeed-MoE beside them, interleaved round by round on an "
                    "emulated cluster; report medians, ratios to the fastest fsmoe schedule and to the "
                    "per-channel lower bound, and peak memory. Flags left out keep the defaults shown "
                    "(--quick: small sizes that finish in about half a minute).",
    )

    def shown(value: object) -> str:
        if isinstance(value, tuple):
            return " ".join(f"{v[0]}/{v[1]}" if isinstance(v, tuple) else str(v) for v in value)
        return str(value)

    def flag(group: argparse._ArgumentGroup, name: str, field: str, help: str, **kw: Any) -> None:
        default, quick = getattr(d, field), getattr(q, field)
        extra = "" if quick == default else f"; --quick: {shown(quick)}"
        kw.setdefault("metavar", {int: "N", float: "X"}.get(kw.get("type"), "NAME" if "choices" in kw else None))
        if "choices" in kw:
            help = f"{help}: {', '.join(kw['choices'])}"
        told = "" if default is None else f" (default {shown(default)}{extra})"
        group.add_argument(name, dest=field, default=None, help=f"{help}{told}", **kw)

    layer = lp.add_argument_group("layer")
    flag(layer, "--tokens", "tokens", "tokens per rank T", type=int)
    flag(layer, "--d-model", "d_model", "model dim D", type=int)
    flag(layer, "--hidden", "d_hidden", "expert hidden dim H", type=int)
    flag(layer, "--experts", "experts", "experts E", type=int)
    flag(layer, "--top-k", "top_k", "experts per token k", type=int)
    flag(layer, "--capacity-factor", "capacity_factor", "capacity factor f", type=float)
    flag(layer, "--gate", "gate", "router", choices=list(GATE_NAMES))
    flag(layer, "--expert", "expert", "expert network", choices=list(EXPERT_NAMES))
    flag(layer, "--order", "order", "token layout implementation", choices=list(ORDER_NAMES))
    flag(layer, "--dense-grad-mb", "dense_grad_mb", "dense Gradient-AllReduce per layer, MiB", type=float)
    cluster = lp.add_argument_group("cluster and layout")
    flag(cluster, "--nodes", "nodes", "emulated nodes", type=int)
    flag(cluster, "--procs-per-node", "procs_per_node", "ranks per node", type=int)
    flag(cluster, "--ep", "ep", "expert-parallel degree", type=int)
    flag(cluster, "--esp", "esp", "expert-sharding degree", type=int)
    flag(cluster, "--link", "link", "each node's link rate (e.g. 1gbit, 200mbit) or 'unshaped'", metavar="RATE")
    flag(cluster, "--burst", "burst_bytes", "tbf bucket bytes of every link (default: the cluster's)", type=int)
    flag(cluster, "--dispatcher", "dispatcher", "AlltoAll algorithm",
         choices=list(DISPATCHER_NAMES))
    flag(cluster, "--launcher", "launcher", "emulated (namespaces), local (loopback, unshaped), or auto",
         choices=LAUNCHERS)
    impls = lp.add_argument_group("implementations")
    flag(impls, "--schedules", "schedules", "schedules to run", nargs="+", choices=list(SCHEDULES))
    flag(impls, "--r", "degrees", "pipeline degrees (r_fwd = r_bwd) for every pipelined schedule", nargs="+",
         type=int)
    flag(impls, "--mixed", "mixed_degrees", "extra R_FWD/R_BWD pairs for fsmoe", nargs="*", type=_degree_pair,
         metavar="RF/RB")
    impls.add_argument("--no-deepspeed", dest="include_deepspeed", action="store_false", default=None,
                       help="leave DeepSpeed-MoE out (it is skipped with a note when not installed)")
    run = lp.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: checks that all runs")
    flag(run, "--reps", "reps", "timed rounds", type=int)
    flag(run, "--warmup", "warmup", "untimed rounds first", type=int)
    run.add_argument("--no-memory", dest="memory", action="store_false", default=None,
                     help="skip the peak-memory pass")
    flag(run, "--threads", "threads", "torch threads per rank", type=int)
    flag(run, "--seed", "seed", "weights and inputs", type=int)
    flag(run, "--timeout", "timeout_s", "seconds before the ranks are stopped", type=float)
    flag(run, "--out", "out", "JSON result file", metavar="FILE")
    flag(run, "--chart", "chart", "PNG bar chart (default: --out with .png)", metavar="FILE")
    flag(run, "--trace", "trace", "Chrome-trace JSON of the fastest fsmoe step, every rank", metavar="FILE")
    run.add_argument("--trace-all", dest="trace_all", action="store_true", default=None,
                     help="with --trace: one trace file per implementation (<trace>-<name>.json)")
    lp.set_defaults(bench_config=bench_layer_config_from_args, bench_run=run_layer_bench)
    from fsmoe.bench.train import add_train_parser  # declares `fsmoe bench train` and its handler

    add_train_parser(which)


def bench_layer_config_from_args(args: argparse.Namespace) -> LayerBenchConfig:
    """The defaults (or ``--quick``'s) with every given flag applied on top."""
    return config_from_args(args, quick_layer_config() if args.quick else LayerBenchConfig())


def _handle_bench(args: argparse.Namespace) -> int:
    """Every ``fsmoe bench`` subcommand: its parser sets ``bench_config`` (flags -> config) and ``bench_run``."""
    try:
        cfg = args.bench_config(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        args.bench_run(cfg)
    except ClusterUnavailable as e:  # --launcher emulated where namespaces cannot be built
        raise UsageError(str(e)) from e
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmoe", description="FSMoE: train and study sparse MoE models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsmoe`` and ``python -m fsmoe``; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.handler(args))
    except UsageError as e:
        parser.exit(2, f"fsmoe {args.command}: error: {e}\n")
