"""The reproduction's PNG plots (matplotlib, Agg backend: no display needed). Each takes plain data — the
grid, per-schedule speedups, the scale studies — and writes one file; :func:`write_plots` writes them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsmoe.config import SCHEDULES
from fsmoe.sim.grid import GridReport
from fsmoe.sim.scale import ScaleStudy

Series = dict[int, dict[str, float]]  # x (L or P) -> schedule -> speedup


def _plt() -> Any:
    """pyplot on the Agg backend, imported when a plot is drawn (``fsmoe simulate`` never draws one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table5(grid: GridReport, path: Path) -> None:
    """Bars: mean speedup over tutel per schedule and testbed, paper beside ours."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, paper, ours = [], [], []
    for tb, s, p, o, _ in grid.table5():
        labels.append(f"{tb[-1].upper()}: {s}")
        paper.append(p)
        ours.append(o)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], paper, 0.4, label="paper (Table 5)")
    ax.bar([i + 0.2 for i in x], ours, 0.4, label="simulated")
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("mean speedup over tutel")
    ax.set_title(f"Table 5: {len(grid.testbeds[0].configs)} configured layers per testbed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig6(bars: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: every schedule over DS-MoE (our ``sequential``) per model and testbed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    groups = list(bars)
    width = 0.8 / len(SCHEDULES)
    for j, s in enumerate(SCHEDULES):
        ax.bar([i + (j - len(SCHEDULES) / 2 + 0.5) * width for i in range(len(groups))], [bars[g][s] for g in groups],
               width, label=s)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speedup over DS-MoE (sequential)")
    ax.set_title("Fig. 6: real models (paper: FSMoE 1.28x-3.01x over DS-MoE)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig7(series: dict[str, Series], paper: dict[str, dict[int, tuple[float, float]]], path: Path) -> None:
    """Two panels (vary L, vary P): fsmoe over DS-MoE and over tutel, simulated and the paper's points."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, xlabel in zip(axes, ("L", "P"), ("sequence length L (48 GPUs)", "GPUs P (L = 1024)"), strict=True):
        xs = sorted(series[key])
        for idx, (base, style) in enumerate((("sequential", "o-"), ("tutel", "s-"))):
            name = "DS-MoE" if base == "sequential" else base
            ax.plot(xs, [series[key][x]["fsmoe"] / series[key][x][base] for x in xs], style, label=f"ours / {name}")
            ax.plot(xs, [paper[key][x][idx] for x in xs], style.replace("-", "--"), alpha=0.6,
                    label=f"paper / {name}")
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs)
        ax.set_ylabel("fsmoe speedup")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 7: Testbed-A, GPT2-XL-MoE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scale(studies: tuple[ScaleStudy, ...], path: Path) -> None:
    """One panel per study: iteration time per schedule against GPUs (log x); flat is ideal weak scaling."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies), 3.5), squeeze=False)
    for ax, study in zip(axes[0], studies, strict=True):
        gpus = [p.gpus for p in study.points]
        for s in (r.schedule for r in study.points[0].runs):
            ax.plot(gpus, [p.run(s).iteration_s * 1e3 for p in study.points], "o-", ms=3, label=s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set_xlabel("GPUs (weak scaling: tokens per GPU fixed)")
        ax.set_ylabel("iteration ms")
        ax.set_title(f"{study.model} on {study.cluster}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(grid: GridReport, bars: dict[str, dict[str, float]], series: dict[str, Series],
                paper: dict[str, dict[int, tuple[float, float]]], studies: tuple[ScaleStudy, ...],
                out: Path) -> list[str]:
    """Every plot into ``out``; the file names written."""
    plot_table5(grid, out / "table5.png")
    plot_fig6(bars, out / "fig6.png")
    plot_fig7(series, paper, out / "fig7.png")
    plot_scale(studies, out / "scale.png")
    return ["table5.png", "fig6.png", "fig7.png", "scale.png"]


__all__ = ["plot_fig6", "plot_fig7", "plot_scale", "plot_table5", "write_plots"]
