"""``fsmoe bench train``: tokens/s of the GPT-MoE trained with fsmoe vs the same model with DeepSpeed's MoE layer.

:func:`run_train_bench` starts the ranks on an emulated cluster (or, where namespaces cannot be built,
unshaped on loopback with a warning) and runs :func:`fsmoe.bench.train_rank.train_bench_rank` on every
rank: our schedules, trained exactly as ``fsmoe train`` trains, and the DeepSpeed-MoE twin
(:mod:`fsmoe.bench.deepspeed_train`: same weights, gate rule, capacity and batches), one optimizer step
each per round, interleaved. It prints a markdown table and writes the JSON (``cfg.out``) and a bar
chart of tokens/s (PNG). What the numbers are: :mod:`fsmoe.bench.train_report`.

:func:`add_train_parser` declares the ``fsmoe bench train`` flags; the CLI module hooks it in.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from fsmoe.bench.config import LAUNCHERS, config_from_args
from fsmoe.bench.layer import run_bench_ranks
from fsmoe.bench.report import finish_report
from fsmoe.bench.train_config import TrainBenchConfig, quick_train_config
from fsmoe.bench.train_rank import TrainRankResult, train_bench_rank
from fsmoe.bench.train_report import format_train_markdown, summarize_train, write_train_chart
from fsmoe.models.gpt_moe import MODEL_PRESETS
from fsmoe.schedule.schedules import SCHEDULES
from fsmoe.train.distributed import DISPATCHER_NAMES


def run_train_bench(cfg: TrainBenchConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark of ``cfg``; print the table with ``echo``; write the files ``cfg`` names;
    return the payload (see :mod:`fsmoe.bench.train_report`)."""
    t0 = time.perf_counter()
    estimate = f"{len(cfg.impls())} implementations x {cfg.warmup_steps + cfg.steps} steps"
    results: list[TrainRankResult]
    results, cluster_info = run_bench_ranks("train", cfg, train_bench_rank, estimate, echo)
    payload = summarize_train(cfg, results, cluster=cluster_info)
    return finish_report(cfg, payload, t0, [], format_train_markdown, write_train_chart, echo)


# --- the CLI ------------------------------------------------------------------------------------------------
def add_train_parser(which: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``fsmoe bench train`` under the ``bench`` subparsers ``which``; flags left out stay ``None``
    so that :func:`train_bench_config_from_args` keeps the defaults (or ``--quick``'s)."""
    d, q = TrainBenchConfig(), quick_train_config()
    tp = which.add_parser(
        "train", help="training tokens/s of the GPT-MoE: fsmoe vs the same model with DeepSpeed's MoE layer",
        description="Train the GPT-MoE with fsmoe's schedules (exactly as `fsmoe train` does) and the same "
                    "model with DeepSpeed-MoE's layer (same weights, gate rule, capacity and batches), one "
                    "optimizer step each per round, interleaved on an emulated cluster; report the median step "
                    "time, tokens/s, the ratio to DeepSpeed, and the losses. Flags left out keep the defaults "
                    "shown (--quick: a short run that finishes in well under a minute).",
    )

    def flag(group: argparse._ArgumentGroup, name: str, field: str, help: str, **kw: Any) -> None:
        default, quick = getattr(d, field), getattr(q, field)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        extra = "" if quick == default else f"; --quick: {quick}"
        kw.setdefault("metavar", {int: "N", float: "X"}.get(kw.get("type"), "NAME" if "choices" in kw else None))
        if "choices" in kw:
            help = f"{help}: {', '.join(kw['choices'])}"
        if default is None:
            told = "" if quick is None else f" (--quick: {quick})"
        else:
            told = f" (default {shown}{extra})"
        group.add_argument(name, dest=field, default=None, help=f"{help}{told}", **kw)

    model = tp.add_argument_group("model and data")
    flag(model, "--model", "model", "model preset", choices=list(MODEL_PRESETS))
    flag(model, "--seq-len", "seq_len", "sequence length L (default: the preset's)", type=int)
    flag(model, "--batch-size", "batch_size", "sequences per step over all ranks B", type=int)
    flag(model, "--data-bytes", "data_bytes", "bytes of the embedded corpus to load", type=int)
    flag(model, "--lr", "lr", "AdamW learning rate (cosine decay over the run)", type=float)
    cluster = tp.add_argument_group("cluster and layout")
    flag(cluster, "--nodes", "nodes", "emulated nodes", type=int)
    flag(cluster, "--procs-per-node", "procs_per_node", "ranks per node", type=int)
    flag(cluster, "--ep", "ep", "expert-parallel degree", type=int)
    flag(cluster, "--esp", "esp", "expert-sharding degree (DeepSpeed then runs EP-only)", type=int)
    flag(cluster, "--mp", "mp", "tensor-parallel degree of attention (DeepSpeed needs 1)", type=int)
    flag(cluster, "--link", "link", "each node's link rate (e.g. 1gbit, 200mbit) or 'unshaped'", metavar="RATE")
    flag(cluster, "--burst", "burst_bytes", "tbf bucket bytes of every link", type=int)
    flag(cluster, "--dispatcher", "dispatcher", "AlltoAll algorithm", choices=list(DISPATCHER_NAMES))
    flag(cluster, "--launcher", "launcher", "emulated (namespaces), local (loopback, unshaped), or auto",
         choices=LAUNCHERS)
    impls = tp.add_argument_group("implementations")
    flag(impls, "--schedules", "schedules", "our schedules to train", nargs="+", choices=list(SCHEDULES))
    flag(impls, "--r-fwd", "r_fwd", "forward pipeline degree of pipelined schedules", type=int)
    flag(impls, "--r-bwd", "r_bwd", "backward pipeline degree of pipelined schedules", type=int)
    impls.add_argument("--no-deepspeed", dest="include_deepspeed", action="store_false", default=None,
                       help="leave the DeepSpeed-MoE twin out (it is skipped with a note when not installed)")
    run = tp.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help="short sequences, small batch, 1+3 steps")
    flag(run, "--steps", "steps", "timed steps per implementation", type=int)
    flag(run, "--warmup-steps", "warmup_steps", "untimed steps first", type=int)
    flag(run, "--threads", "threads", "torch threads per rank", type=int)
    flag(run, "--seed", "seed", "weights and batches", type=int)
    flag(run, "--timeout", "timeout_s", "seconds before the ranks are stopped", type=float)
    flag(run, "--out", "out", "JSON result file", metavar="FILE")
    flag(run, "--chart", "chart", "PNG bar chart (default: --out with .png)", metavar="FILE")
    tp.set_defaults(bench_config=train_bench_config_from_args, bench_run=run_train_bench)
    return tp


def train_bench_config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    """The defaults (or ``--quick``'s) with every given flag applied on top."""
    return config_from_args(args, quick_train_config() if args.quick else TrainBenchConfig())
