"""``fsmoe report RUN_DIR``: what a training run did, as pictures and one markdown page.

Legend: S logged steps that carry expert loads, L MoE layers, E experts.

The run directory is the one ``fsmoe train`` writes (``--out``): ``metrics.jsonl`` (one JSON object per line,
appended while the run goes), ``job.toml``, and at the end ``summary.json``; ``status.json`` says whether it
is ``running``, ``finished``, ``failed`` or ``interrupted``. The report goes to ``RUN_DIR/report/``:

* ``loss.png``: the training loss (each logged point is the mean over its logging interval) against the
  step, and the validation losses as points;
* ``expert_load.png`` (when the records carry ``expert_load``): per MoE layer a heat map of each expert's
  share of the layer's kept (not dropped) token assignments over the steps;
* ``report.md``: the model and layout, steps done and planned, the state, first and last training loss, best
  and last validation loss and perplexity, tokens/s, the dropped fraction, the most and least loaded
  expert of each layer, and the two pictures.

Records of ``metrics.jsonl``: training ``{"kind": "train", "step", "loss", ...}`` (older runs have no
``kind``; ``aux_loss``, ``dropped_fraction``, ``tokens_per_s``, ``expert_load`` — counts per expert per MoE
layer — and ``dropped_per_layer`` are optional) and validation ``{"kind": "val", "step", "val_loss",
"val_ppl"}``. A run that is still going may have written half a line last: that line is skipped. The
report can be written again at any time; it reads nothing but the run's files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsmoe.config import JobConfig, load_toml
from fsmoe.train.rundir import CONFIG_FILE, METRICS_FILE, STATUS_FILE, SUMMARY_FILE, perplexity

REPORT_DIR = "report"
LOSS_PNG = "loss.png"
LOAD_PNG = "expert_load.png"
REPORT_MD = "report.md"


@dataclass(frozen=True)
class RunLog:
    """The records of ``metrics.jsonl`` by kind, in file order; ``partial_last_line`` says a broken last
    line (a run still writing) was skipped."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    partial_last_line: bool = False


def read_metrics(path: Path) -> RunLog:
    """Parse ``metrics.jsonl`` (see the module docstring). ``ValueError`` naming the file and line for a
    broken line that is not the last one, or when there is no training record yet."""
    lines = path.read_text(errors="replace").splitlines()
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    partial = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as e:
            if number == len(lines):  # the run is writing this line right now
                partial = True
                continue
            raise ValueError(f"{str(path)!r}, line {number}: {e}") from None
        kind = record.get("kind", "train")
        if kind == "train":
            train.append(record)
        elif kind == "val":
            val.append(record)
    if not train:
        raise ValueError(f"{str(path)!r} holds no training record yet (the first one is written after step 1)")
    return RunLog(train=train, val=val, partial_last_line=partial)


@dataclass
class RunFiles:
    """Everything the report reads from a run directory; ``notes`` says what was missing or unreadable."""

    log: RunLog
    job: JobConfig | None
    summary: dict[str, Any] | None
    status: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> RunFiles:
    """The run's files; only a missing directory or ``metrics.jsonl`` is an error (``ValueError``), the
    other files are optional (a run that is going has no summary yet; an old run may lack the status)."""
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist or is not a directory")
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"{str(run_dir)!r} has no {METRICS_FILE}: not a run directory of `fsmoe train`, or the run "
                         "has not logged its first step yet")
    files = RunFiles(log=read_metrics(metrics), job=None, summary=None, status=None)
    if (run_dir / CONFIG_FILE).is_file():
        try:
            files.job = load_toml(run_dir / CONFIG_FILE)
        except ValueError as e:
            files.notes.append(f"{CONFIG_FILE} could not be read ({e})")
    else:
        files.notes.append(f"no {CONFIG_FILE}: model and layout unknown")
    files.summary = _read_json(run_dir / SUMMARY_FILE, files.notes)
    files.status = _read_json(run_dir / STATUS_FILE, files.notes)
    return files


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    """A small JSON object, or None when absent; one that cannot be read (written right now) is a note."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} could not be read ({e})")
        return None
    return value if isinstance(value, dict) else None


# --- numbers ----------------------------------------------------------------------------------------------------
def _float(value: Any) -> float:
    """A logged number as a float; null (a non-finite value, written as null) and absence are NaN."""
    return float(value) if isinstance(value, int | float) else math.nan


def _fmt(value: float, spec: str = ".4f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def expert_shares(train: list[dict[str, Any]]) -> tuple[list[int], np.ndarray]:
    """The steps whose records carry ``expert_load``, and each expert's share of its layer's kept
    assignments there: ``share_SLE`` (rows of zeros where a layer routed nothing). Empty when no record has it."""
    with_load = [r for r in train if r.get("expert_load")]
    if not with_load:
        return [], np.zeros((0, 0, 0))
    try:
        counts_SLE = np.array([r["expert_load"] for r in with_load], dtype=np.float64)
    except ValueError:  # ragged: the records disagree on the number of layers or experts
        counts_SLE = np.zeros(0)
    if counts_SLE.ndim != 3:
        raise ValueError(f"{METRICS_FILE}: expert_load must be [[count per expert] per MoE layer], of one shape in "
                         "every record")
    totals_SL1 = counts_SLE.sum(axis=2, keepdims=True)
    return [int(r["step"]) for r in with_load], np.divide(counts_SLE, totals_SL1, out=np.zeros_like(counts_SLE),
                                                           where=totals_SL1 > 0)


def _val_points(files: RunFiles) -> list[tuple[int, float]]:
    """(step, validation loss) of the run: its val records, else the final one of ``summary.json``."""
    points = [(int(r["step"]), _float(r.get("val_loss"))) for r in files.log.val]
    if not points and files.summary is not None and "val_loss" in files.summary:
        points = [(int(files.summary.get("steps", files.log.train[-1]["step"])), _float(files.summary["val_loss"]))]
    return [(s, v) for s, v in points if not math.isnan(v)]


# --- pictures ---------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(path: Path, train: list[dict[str, Any]], val_points: list[tuple[int, float]], title: str) -> None:
    """Training loss per logged step (a line) and validation losses (points), in nats."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    losses = [_float(r.get("loss")) for r in train]
    ax.plot([r["step"] for r in train], losses, marker=".", label="train (mean over each logging interval)")
    if val_points:
        ax.scatter(*zip(*val_points, strict=True), color="tab:red", zorder=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(path: Path, steps_S: list[int], share_SLE: np.ndarray) -> None:
    """One heat map per MoE layer: expert (rows) by logged step (columns), colour = share of the layer's
    kept assignments; a column spans from half-way to the previous logged step to half-way to the next."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    _, L, E = share_SLE.shape
    s = np.asarray(steps_S, dtype=np.float64)
    mids = (s[1:] + s[:-1]) / 2
    edges_S1 = np.concatenate([[s[0] - 0.5], mids, [s[-1] + 0.5]])
    panel_height = 0.6 + min(0.25 * E, 2.5)  # inches; many experts share a panel's rows
    fig, axes = plt.subplots(L, 1, figsize=(7.0, 1.0 + panel_height * L), sharex=True, squeeze=False)
    vmax = max(float(share_SLE.max()), 1e-9)
    for layer, ax in enumerate(axes[:, 0]):
        mesh = ax.pcolormesh(edges_S1, np.arange(E + 1) - 0.5, share_SLE[:, layer, :].T, vmin=0.0, vmax=vmax,
                             cmap="viridis")
        ax.set_ylabel(f"MoE layer {layer}\nexpert", fontsize=8)
        ax.set_yticks(range(E) if E <= 16 else range(0, E, max(E // 8, 1)))
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"each expert's share of its layer's kept assignments (uniform: {1 / E:.3f})", fontsize=9)
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="share")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the page ---------------------------------------------------------------------------------------------------
def _model_text(job: JobConfig) -> str:
    m, moe = job.model, job.model.moe
    return (f"{m.name} ({m.arch}): {m.n_layers} layers, {m.num_moe_layers} MoE ({moe.num_experts} experts, "
            f"top-{moe.top_k}, gate {moe.gate}), d_model {m.d_model}, vocab {m.vocab_size}, seq_len {m.seq_len}")


def _layout_text(job: JobConfig) -> str:
    par, sched = job.parallel, job.schedule
    if not par.distributed:
        return f"1 process, schedule {sched.name}"
    degrees = " ".join(f"{a}/{b}" for a, b in (sched.layer_degrees or (sched.degrees,)))
    return (f"{par.nproc} ranks (MP={par.mp}, EP={par.ep}, ESP={par.esp}), dispatcher {par.dispatcher}, "
            f"schedule {sched.name} r={degrees}")


def report_markdown(files: RunFiles, run_dir: Path, steps_S: list[int], share_SLE: np.ndarray) -> str:
    """The text of ``report.md`` (see the module docstring)."""
    log, job, summary = files.log, files.job, files.summary or {}
    first, last = log.train[0], log.train[-1]
    state = (files.status or {}).get("state", "unknown (no status.json)")
    error = (files.status or {}).get("error")
    done = int(summary.get("steps", last["step"]))
    planned = "?" if job is None else str(job.train.steps)
    rows = [
        ("state", f"{state}" + (f": {error}" if error else "")
         + (" (the last line of metrics.jsonl was partial, skipped)" if log.partial_last_line else "")),
        ("model", "unknown" if job is None else _model_text(job)),
        ("layout", "unknown" if job is None else _layout_text(job)),
        ("data", "unknown" if job is None else (job.data.path or "the embedded Python stdlib corpus")),
        ("steps", f"{done} of {planned}" + ("" if job is None else f" ({job.train.batch_size} x {job.model.seq_len} "
                                                                     "tokens each)")),
        ("train loss", f"first {_fmt(_float(first.get('loss')))} (step {first['step']}), last "
                       f"{_fmt(_float(last.get('loss')))} (step {last['step']}, mean of its "
                       f"{last.get('loss_steps', '?')} steps)"),
    ]
    val = _val_points(files)
    if val:
        best = min(val, key=lambda p: p[1])
        rows.append(("validation loss", f"best {best[1]:.4f} (step {best[0]}, perplexity {perplexity(best[1]):.2f}), "
                                        f"last {val[-1][1]:.4f} (step {val[-1][0]}, perplexity "
                                        f"{perplexity(val[-1][1]):.2f})"))
    else:
        rows.append(("validation loss", "none yet"))
    if "tokens_per_s" in summary:
        rows.append(("tokens/s", f"{_float(summary['tokens_per_s']):,.0f} (training steps of the whole run)"))
    else:
        rates = [_float(r.get("tokens_per_s")) for r in log.train if r.get("tokens_per_s") is not None]
        rows.append(("tokens/s", f"{statistics.median(rates):,.0f} (median of the logged intervals)" if rates
                     else "n/a"))
    dropped = [_float(r.get("dropped_fraction")) for r in log.train if r.get("dropped_fraction") is not None]
    rows.append(("dropped fraction", f"last {dropped[-1]:.4f}, mean {statistics.fmean(dropped):.4f} over "
                                     f"{len(dropped)} logged steps" if dropped else "n/a"))

    out = [f"# Training report: `{run_dir}`", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    out += ["", "## Loss", "", f"![loss curves]({LOSS_PNG})", "", "## Expert load", ""]
    if steps_S:
        out += _load_table(last, share_SLE)
        out += ["", f"![expert load per MoE layer]({LOAD_PNG})"]
    else:
        out.append("No `expert_load` in metrics.jsonl (a run from before it was logged): no heat map.")
    if files.notes:
        out += ["", "## Notes", "", *(f"* {n}" for n in files.notes)]
    return "\n".join(out) + "\n"


def _load_table(last: dict[str, Any], share_SLE: np.ndarray) -> list[str]:
    """Per MoE layer, the most and least loaded expert over all logged steps (mean share), and the layer's
    last dropped fraction when logged."""
    mean_LE = share_SLE.mean(axis=0)
    dropped = last.get("dropped_per_layer")
    lines = ["Each expert's share of its layer's kept token assignments, averaged over the logged steps "
             f"(uniform: {1 / share_SLE.shape[2]:.3f}).", "",
             "| MoE layer | most loaded expert | least loaded expert | dropped (last step) |", "|---|---|---|---|"]
    for layer, share_E in enumerate(mean_LE):
        hi, lo = int(share_E.argmax()), int(share_E.argmin())
        drop = _fmt(_float(dropped[layer])) if isinstance(dropped, list) and layer < len(dropped) else "n/a"
        lines.append(f"| {layer} | {hi} ({share_E[hi]:.3f}) | {lo} ({share_E[lo]:.3f}) | {drop} |")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/`` (see the module docstring) and return the path of its ``report.md``.
    ``ValueError`` (one line) when ``run_dir`` is not a run directory or has no training record yet."""
    run_dir = Path(run_dir)
    files = read_run(run_dir)
    steps_S, share_SLE = expert_shares(files.log.train)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    title = str(run_dir) if files.job is None else f"{run_dir}\n{_model_text(files.job)}"
    plot_loss(out / LOSS_PNG, files.log.train, _val_points(files), title)
    if steps_S:
        plot_expert_load(out / LOAD_PNG, steps_S, share_SLE)
    else:
        (out / LOAD_PNG).unlink(missing_ok=True)  # a picture of an earlier report would not be this run's
    path = out / REPORT_MD
    path.write_text(report_markdown(files, run_dir, steps_S, share_SLE))
    return path


def handle_report(job: JobConfig, args: argparse.Namespace) -> int:
    """``fsmoe report RUN_DIR``: write the report; a run directory that cannot be read is a one-line error,
    exit status 2 (as the CLI's usage errors)."""
    try:
        path = write_report(args.run_dir)
    except ValueError as e:
        print(f"fsmoe report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path} (with {', '.join(p.name for p in sorted(path.parent.glob('*.png')))})")
    return 0
