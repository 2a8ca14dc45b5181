"""From the train benchmark's rank results to its payload, markdown table and bar chart.

:func:`summarize_train` is pure (no processes, no files):

* ``median_s``: the median over the timed steps of the slowest rank's optimizer-step time (forward,
  backward, gradient sync, clipping, AdamW); ``tokens_per_s`` = B·L / ``median_s`` (global tokens).
* ``deepspeed_over_this``: DeepSpeed's ``median_s`` / this row's (above 1: this row is faster).
  ``best_ours``: our fastest row on DeepSpeed's layout (the like-for-like one), and ``speedup_vs_deepspeed``
  its ratio.
* ``losses``: every step's LM loss averaged over the ranks, warm-up included; ``loss_first`` is the loss
  of the first step (before any update: same weights, same batch for every row), ``loss_last`` the
  last step's. ``initial_loss_check`` compares DeepSpeed's first loss with ours (``INITIAL_LOSS_TOL``).
* CPU: the machine's busy CPU during the runs and the share spent outside our ranks, as in
  :mod:`fsmoe.bench.summary`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsmoe.bench.config import DEEPSPEED
from fsmoe.bench.report import FAMILY_COLORS, OTHER_LOAD_WARN
from fsmoe.bench.summary import cpu_stats, other_load
from fsmoe.bench.train_config import TrainBenchConfig
from fsmoe.bench.train_rank import TrainRankResult

INITIAL_LOSS_TOL = 1e-4  # nats: same weights and batch; only float summation order differs


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarize_train(cfg: TrainBenchConfig, results: Sequence[TrainRankResult], *,
                    cluster: dict[str, Any]) -> dict[str, Any]:
    """The payload of one run (see the module doc); ``cluster`` describes where it ran."""
    first = results[0]
    impls = {i.name: i for i in cfg.impls()}
    tokens = cfg.tokens_per_step
    rows: list[dict[str, Any]] = []
    for name in first.rows:
        impl, samples = impls[name], first.samples_s[name]
        median = statistics.median(samples)
        losses = first.losses[name]
        rows.append({
            "name": name, "family": impl.spec.family, "layout": impl.layout, "ep": impl.parallel.ep,
            "esp": impl.parallel.esp, "mp": impl.parallel.mp, "r_fwd": impl.spec.r_fwd, "r_bwd": impl.spec.r_bwd,
            "median_s": median, "min_s": min(samples), "samples_s": samples, "tokens_per_s": tokens / median,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "note": first.notes.get(name, ""),
            "params_rank0": first.num_params.get(name), **cpu_stats(first, name),
        })
    ds = next((r for r in rows if r["family"] == DEEPSPEED), None)
    for r in rows:
        r["deepspeed_over_this"] = _ratio(ds["median_s"], r["median_s"]) if ds else None
    ours = [r for r in rows if r["family"] != DEEPSPEED]
    like = [r for r in ours if ds is None or r["layout"] == ds["layout"]]
    best = min(like, key=lambda r: (r["median_s"], r["name"])) if like else None
    check = None
    if ds is not None and ours:
        diff = abs(ds["loss_first"] - ours[0]["loss_first"])
        check = {"ours": ours[0]["name"], "ours_loss": ours[0]["loss_first"], "deepspeed_loss": ds["loss_first"],
                 "abs_diff": diff, "tolerance": INITIAL_LOSS_TOL, "match": diff <= INITIAL_LOSS_TOL}
    model = cfg.model_config()
    return {
        "benchmark": "train",
        "cluster": cluster,
        "config": dataclasses.asdict(cfg),
        "model": {"preset": cfg.model, "n_layers": model.n_layers, "d_model": model.d_model,
                  "moe_layers": model.num_moe_layers, "experts": model.moe.num_experts, "top_k": model.moe.top_k,
                  "d_hidden": model.moe.d_hidden, "capacity_factor": model.moe.capacity_factor,
                  "gate": model.moe.gate, "expert": model.moe.expert, "seq_len": model.seq_len},
        "tokens_per_step": tokens,
        "implementations": rows,
        "skipped": first.skipped,
        "best_ours": best["name"] if best else None,
        "speedup_vs_deepspeed": best["deepspeed_over_this"] if best else None,
        "initial_loss_check": check,
        "ours_agree_at_first_step": (max(r["loss_first"] for r in ours) - min(r["loss_first"] for r in ours)
                                     if ours else None),
        "other_load": other_load(first, rows, []),
        "rank_wall_s": max(r.wall_s for r in results),
    }


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_train_markdown(payload: dict[str, Any]) -> str:
    cfg, m, cluster = payload["config"], payload["model"], payload["cluster"]
    lines = [
        f"### Training steps: GPT-MoE `{m['preset']}` ({m['n_layers']} layers, D={m['d_model']}, {m['moe_layers']} "
        f"MoE layers: E={m['experts']}, top-{m['top_k']}, H={m['d_hidden']}, f={m['capacity_factor']}, "
        f"{m['gate']}/{m['expert']}), B={cfg['batch_size']} x L={m['seq_len']} = {payload['tokens_per_step']} "
        "tokens/step, fp32",
        f"{cluster['description']}; dispatcher {cfg['dispatcher']}; median of {cfg['steps']} interleaved steps "
        f"(+{cfg['warmup_steps']} warm-up), slowest rank per step; every row trains on the same batches",
    ]
    load = payload.get("other_load")
    if load and load["share"] is not None and load["share"] > OTHER_LOAD_WARN:
        lines.append(f"**BUSY MACHINE: {100 * load['share']:.0f}% of the CPU went outside our ranks during the steps; "
                     "another job shared the cores, so the times are suspect. Rerun on a quiet machine.**")
    if not cluster.get("shaped", False):
        lines.append("**UNSHAPED: inter-node traffic runs at loopback speed.**")
    steps = cfg["warmup_steps"] + cfg["steps"]
    lines += ["", f"| implementation | layout | median step s | tokens/s | DeepSpeed / this | loss step 1 "
              f"| loss step {steps} | CPU busy | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in payload["implementations"]:
        busy = "-" if r["cpu_utilization"] is None else f"{100 * r['cpu_utilization']:.0f}%"
        lines.append(f"| {r['name']} | {r['layout']} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{_f(r['deepspeed_over_this'], '.2f')}{'x' if r['deepspeed_over_this'] else ''} | "
                     f"{r['loss_first']:.4f} | {r['loss_last']:.4f} | {busy} | {r['note']} |")
    for name, why in payload["skipped"].items():
        lines.append(f"| {name} | - | - | - | - | - | - | - | not run: {why} |")
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
    """A bar per row (tokens/s); returns a note when matplotlib is missing (then nothing is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e .[bench])"
    rows = payload["implementations"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    bars = ax.bar([r["name"] for r in rows], [r["tokens_per_s"] for r in rows],
                  color=[FAMILY_COLORS.get(r["family"], "#999999") for r in rows])
    ax.bar_label(bars, labels=[f"{r['tokens_per_s']:,.0f}" for r in rows], fontsize=8)
    cfg, m = payload["config"], payload["model"]
    ax.set_title(f"GPT-MoE {m['preset']} training, {payload['tokens_per_step']} tokens/step, EP={cfg['ep']} "
                 f"ESP={cfg['esp']}\n{payload['cluster']['description']}", fontsize=8)
    ax.set_ylabel("tokens/s (median step, slowest rank)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
