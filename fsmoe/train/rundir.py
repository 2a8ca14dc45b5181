"""A training run's directory and what it shows while it runs: the file names, checking and preparing
``--out`` before any rank starts (:func:`prepare_run_dir`), the status file, strict-JSON metrics records and
their trimming on resume, and the progress display (plain lines or a tqdm bar)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fsmoe.config import JobConfig
from fsmoe.train.checkpoint import CHECKPOINTS_DIR, Checkpoint, check_resume
from fsmoe.train.distributed import DistContext

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
CONFIG_FILE = "job.toml"
PLAN_FILE = "plan.json"


def format_line(rec: dict[str, Any], steps: int) -> str:
    return (
        f"step {rec['step']:>{len(str(steps))}}/{steps} | loss {rec['loss']:.4f} | aux {rec['aux_loss']:.4f}"
        f" | dropped {rec['dropped_fraction']:.3f} | lr {rec['lr']:.2e} | {rec['tokens_per_s']:,.0f} tok/s"
    )


RUN_FILES = (CONFIG_FILE, PLAN_FILE, METRICS_FILE, SUMMARY_FILE, STATUS_FILE, CHECKPOINTS_DIR)


def resumes_in_place(job: JobConfig, ckpt: Checkpoint | None) -> bool:
    """Whether ``job`` resumes ``ckpt`` into the run directory that holds it (``run.out``)."""
    run_dir = None if ckpt is None else ckpt.run_dir
    return run_dir is not None and run_dir.resolve() == Path(job.run.out).resolve()


def prepare_run_dir(job: JobConfig) -> None:
    """Check ``run.out`` before any rank starts: it must be a directory this process can create and write,
    and it must not hold a previous run unless ``run.overwrite`` (then that run's files and checkpoints are
    removed, and nothing else) or the job resumes that run's checkpoint (then they are kept; see
    :func:`resumes_in_place`). Checks the checkpoint to resume (:func:`~fsmoe.train.checkpoint.check_resume`).
    ``ValueError`` naming the path and the reason."""
    out = Path(job.run.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    in_place = resumes_in_place(job, check_resume(job))
    previous = [] if in_place else [f for f in RUN_FILES if (out / f).exists()]
    if previous and not job.run.overwrite:
        raise ValueError(f"--out {str(out)!r} holds a previous run ({', '.join(previous)}); pass --overwrite to "
                         "replace it, or choose another --out")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:  # the one reliable test (root passes every permission check): make it, write in it, leave no trace
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        for f in previous:
            if (out / f).is_dir():
                shutil.rmtree(out / f)
            else:
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


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a non-finite float becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Progress:
    """Where the main rank shows progress: plain lines (``print``), or a tqdm bar over the steps with the
    latest logged loss in its postfix (``mode`` ``bar``, or ``auto`` when stdout is a terminal). Other
    ranks show nothing."""

    def __init__(self, mode: str, main: bool, steps: int, done: int) -> None:
        self.main = main
        self.steps = steps
        use_bar = main and (mode == "bar" or (mode == "auto" and sys.stdout.isatty()))
        self.bar = (tqdm(total=steps, initial=done, unit="step", file=sys.stdout, dynamic_ncols=True) if use_bar
                    else None)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def record(self, rec: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:,.0f}")
        elif self.main:
            print(format_line(rec, self.steps), flush=True)

    def echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows."""
    return math.exp(loss) if loss < 709.0 else math.inf


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps up to ``step`` in a metrics file (resuming from ``step`` into its
    run; a line cut short by a killed run is dropped too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".tmp-{path.name}")  # written beside it, then renamed: a kill keeps the old file
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
