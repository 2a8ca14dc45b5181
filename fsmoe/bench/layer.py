"""``fsmoe bench layer``: one MoE layer configuration, several implementations side by side in one run.

Legend: T tokens per rank, D model dim, H expert hidden, E experts, K top-k, R pipeline degree.

:func:`run_layer_bench` starts the ranks on an emulated cluster (:mod:`fsmoe.cluster`: one network
namespace per node, tbf-shaped links) — or, where this machine cannot build one, unshaped on loopback
with a warning — and runs :func:`fsmoe.bench.rank.layer_bench_rank` on every rank: our layer under
each schedule and degree, DeepSpeed-MoE beside it, and the per-channel probes of the lower bound, all
interleaved round by round (see :mod:`fsmoe.bench.rank`). It then prints a markdown table and writes
the JSON (``cfg.out``), a bar chart (PNG) and, with ``cfg.trace``, a Chrome trace of the fastest
``fsmoe`` step (every rank; open it in Perfetto).

What the numbers are is documented in :mod:`fsmoe.bench.summary` (medians, ratios, lower bound,
memory) and :mod:`fsmoe.bench.impls` (what one step and one probe run).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from fsmoe.bench.config import LayerBenchConfig
from fsmoe.bench.rank import RankResult, layer_bench_rank
from fsmoe.bench.report import finish_report, format_markdown, write_chart, write_traces
from fsmoe.bench.summary import summarize
from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec, LocalCluster, open_cluster


def bench_cluster(spec: EmulatedClusterSpec, launcher: str) -> EmulatedCluster | LocalCluster:
    """The cluster a benchmark runs on: ``emulated`` (namespaces; fail if impossible), ``local``
    (plain loopback, unshaped), ``auto`` (emulated where possible, else local with a warning)."""
    if launcher == "emulated":
        return EmulatedCluster(spec)
    if launcher == "local":
        return LocalCluster(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster = open_cluster(spec, allow_unshaped=True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    return cluster


def run_bench_ranks(
    name: str, cfg: Any, fn: Callable[[Any], Any], estimate: str, echo: Callable[[str], None]
) -> tuple[list[Any], dict[str, Any]]:
    """Run ``fn(cfg)`` on every rank of ``cfg``'s cluster (``cfg.cluster_spec()``, ``cfg.launcher``,
    ``cfg.timeout_s``), warning when the links are not shaped: the per-rank results and a description
    of the cluster for the payload."""
    cluster = bench_cluster(cfg.cluster_spec(), cfg.launcher)
    with cluster:
        shaped = isinstance(cluster, EmulatedCluster) and cluster.spec.shaped
        description = cluster.describe()
        if not shaped:
            print(f"warning: unshaped run ({description}): inter-node links are as fast as intra-node ones",
                  file=sys.stderr, flush=True)
        echo(f"[fsmoe bench {name}] {description}: {estimate} ...")
        results = cluster.run_function(fn, cfg, timeout=cfg.timeout_s)
    return results, {"description": description, "shaped": shaped, "launcher": type(cluster).__name__}


def _estimate(cfg: LayerBenchConfig) -> str:
    n = len(cfg.impls())
    return f"{n} implementations x {cfg.warmup + cfg.reps} rounds (+ probes, memory pass)"


def run_layer_bench(cfg: LayerBenchConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark of ``cfg``; print the table with ``echo``; write the files ``cfg`` names;
    return the payload (see :mod:`fsmoe.bench.summary`)."""
    t0 = time.perf_counter()
    results: list[RankResult]
    results, cluster_info = run_bench_ranks("layer", cfg, layer_bench_rank, _estimate(cfg), echo)
    payload = summarize(cfg, results, cluster=cluster_info)
    notes: list[str] = []
    if cfg.trace is not None:
        traces = {name: [e for r in results for e in r.traces.get(name, [])] for name in results[0].traces}
        single = None if cfg.trace_all else next(iter(traces), None)
        files = write_traces(cfg.trace, traces, single)
        payload["trace_files"] = files
        notes.append(f"trace: {', '.join(files)}" if files else "trace: no fsmoe step to trace")
    return finish_report(cfg, payload, t0, notes, format_markdown, write_chart, echo)
