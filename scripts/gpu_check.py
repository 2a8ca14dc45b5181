"""``make gpu-check``: prove the GPU path on a machine with one NVIDIA GPU, in at most 8 minutes.

Prints one compact report, one line per check, and exits non-zero when a check fails:

1. ``pytest -m cuda`` (tests/cuda: every test there asserts what the lines below print);
2. the MoE layer on CUDA in fp32 equal to the CPU for every gate × order × expert;
3. the layer under bf16 autocast: the same routing as fp32 and errors within the stated tolerance;
4. the pipelined block on CUDA streams equal to the thread lanes on the CPU;
5. the stream runtime overlapping a long communication-like kernel with expert compute, timed with CUDA
   events (overlapped ≤ 1.15 × the longer part);
6. a tiny GPT-MoE trained on the GPU (fp32 and bf16): its loss falls;
7. ``benchmarks/gates.py --device cuda --quick`` (beside DeepSpeed's gating where DeepSpeed is installed).

Multi-rank NCCL cannot run on one GPU; those paths (the distributed dispatchers, gradient sync, the
trainer's steps) are covered on the CPU by the same tests with gloo, and the report says so.

``--dry-run`` needs no GPU: it parses the flags, imports the checks and prints the plan and the report
with every check marked as not run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: make `fsmoe` and `tests` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.cuda import checks  # noqa: E402

BUDGET_S = 480.0  # the whole script
NCCL_NOTE = ("multi-rank NCCL cannot run on one GPU: the distributed paths (AlltoAll dispatchers, ESP "
             "gather/reduce, gradient sync, distributed training steps) are covered on the CPU by the same "
             "tests with gloo (tests/parallel, tests/schedule, tests/train)")


@dataclass(frozen=True)
class Result:
    """One line of the report: ``ok`` True (PASS), False (FAIL) or None (INFO / not run)."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        tag = {True: "PASS", False: "FAIL", None: "INFO"}[self.ok]
        return f"[{tag}] {self.name}: {self.detail}"


@dataclass(frozen=True)
class Step:
    """One check: its ``name`` (for ``--only``), the seconds it should take, and what runs it."""

    name: str
    budget_s: float  # what it is expected to take on one H200-class GPU, with margin
    run: Callable[[torch.device, float], Result]  # (device, seconds left) -> result


# tests/cuda/test_gpu.py tests that steps 2-6 repeat (the same checks.py functions): not run twice
DONE_BY_STEPS = ("every_gate_order_expert", "bf16_autocast_on_cuda", "pipelined_block_on_cuda",
                 "stream_runtime_overlaps", "tiny_gpt_moe_learns")


def step_pytest(device: torch.device, left_s: float) -> Result:
    # the CUDA tests whose checks the steps below run themselves (and report with numbers) are left to them
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/cuda", "-k",
           f"not ({' or '.join(DONE_BY_STEPS)})"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left_s)
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1]
    ok = out.returncode == 0 and "skipped" not in summary and "passed" in summary
    if not ok:
        failed = [ln for ln in out.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        summary = "; ".join([summary, *failed[:5]])
    return Result("pytest -m cuda", ok, summary)


def step_layer(device: torch.device, left_s: float) -> Result:
    rows = checks.layer_diffs(device)
    bad = [f"{r.gate}/{r.order}/{r.expert}" for r in rows if not r.ok(checks.FP32_TOL)]
    worst = max(max(r.y_rel, r.dx_rel, r.grad_rel) for r in rows)
    detail = (f"{len(rows) - len(bad)}/{len(rows)} gate×order×expert equal (same routing), worst rel err "
              f"{worst:.1e} (tol {checks.FP32_TOL:g})" + (f"; differ: {', '.join(bad)}" if bad else ""))
    return Result("layer fp32 CUDA = CPU", not bad, detail)


def step_bf16(device: torch.device, left_s: float) -> Result:
    rows = checks.bf16_diffs(device)
    bad = [f"{r.gate}/{r.order}" for r in rows if not r.ok(checks.BF16_TOL)]
    detail = (f"{sum(r.same_routing for r in rows)}/{len(rows)} route as fp32; worst rel err y "
              f"{max(r.y_rel for r in rows):.1e}, dx {max(r.dx_rel for r in rows):.1e}, grads "
              f"{max(r.grad_rel for r in rows):.1e} (tol {checks.BF16_TOL:g})")
    if bad:
        detail += f"; over: {', '.join(bad)}"
    return Result("layer bf16 autocast vs fp32", not bad, detail)


def step_pipelined(device: torch.device, left_s: float) -> Result:
    err = checks.pipelined_diff(device)
    return Result("pipelined block, CUDA streams = CPU threads", err <= checks.FP32_TOL,
                  f"fsmoe (r_fwd, r_bwd) = (2, 4), worst rel err {err:.1e} (tol {checks.FP32_TOL:g})")


def step_overlap(device: torch.device, left_s: float) -> Result:
    o = checks.measure_overlap(device)
    return Result("stream overlap (CUDA events)", o.ratio <= checks.OVERLAP_LIMIT,
                  f"comm-like {o.comm_ms:.1f} ms, expert compute {o.compute_ms:.1f} ms, both {o.both_ms:.1f} ms "
                  f"= {o.ratio:.2f}x the longer (limit {checks.OVERLAP_LIMIT}x)")


def step_train(dtype: str) -> Callable[[torch.device, float], Result]:
    def run(device: torch.device, left_s: float) -> Result:
        start = time.perf_counter()
        losses = checks.train_tiny(device, dtype=dtype)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        return Result(f"tiny GPT-MoE {dtype}, 1 GPU", last < 0.6 * first,
                      f"loss {first:.2f} -> {last:.2f} (mean of first/last 5 of {len(losses)} steps, must fall "
                      f"below 0.6x) in {time.perf_counter() - start:.1f} s")

    return run


def step_gates_bench(device: torch.device, left_s: float) -> Result:
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "benchmarks/gates.py", "--device", "cuda", "--quick", "--out", out_dir]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left_s)
    if out.returncode != 0:
        return Result("gates benchmark --device cuda", False, (out.stderr.strip().splitlines() or ["failed"])[-1])
    text = out.stdout
    report = text[text.index("forward+backward") :] if "forward+backward" in text else text
    target = re.search(r"target never slower.*: (MET|NOT MET)", text)
    verdict = "DeepSpeed not installed, ours only" if target is None else f"never slower than DeepSpeed: {target[1]}"
    detail = verdict + "\n" + "\n".join("    " + ln for ln in report.strip().splitlines() if not ln.startswith("wrote"))
    return Result("gates benchmark --device cuda --quick", None if target is None else target[1] == "MET", detail)


STEPS = (
    Step("pytest", 60, step_pytest),
    Step("layer", 30, step_layer),
    Step("bf16", 20, step_bf16),
    Step("pipelined", 10, step_pipelined),
    Step("overlap", 15, step_overlap),
    Step("train-fp32", 30, step_train("fp32")),
    Step("train-bf16", 30, step_train("bf16")),
    Step("gates", 150, step_gates_bench),
)


def environment() -> str:
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}), no CUDA device visible"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
    return (f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, NCCL {nccl}")


def format_report(env: str, results: Sequence[Result], elapsed_s: float) -> str:
    """The report: the machine, one line per check, the NCCL note and the verdict (FAIL if any failed)."""
    failed = [r for r in results if r.ok is False]
    passed = [r for r in results if r.ok is True]
    verdict = "FAIL" if failed else "PASS" if passed else "NOT RUN"
    return "\n".join([
        f"fsmoe gpu-check: {env}",
        *(r.line() for r in results),
        f"[NOTE] {NCCL_NOTE}",
        f"result: {verdict} ({len(passed)} passed, {len(failed)} failed, {len(results) - len(passed) - len(failed)} "
        f"info/not run) in {elapsed_s:.0f} s",
    ])


def run_steps(steps: Sequence[Step], device: torch.device, budget_s: float,
              echo: Callable[[str], None]) -> list[Result]:
    """Every step in order within ``budget_s`` in all; a step that raises or runs out of time fails."""
    deadline = time.monotonic() + budget_s
    results = []
    for step in steps:
        left = deadline - time.monotonic()
        if left < 5:
            results.append(Result(step.name, False, f"not run: the {budget_s:.0f} s budget is spent"))
            continue
        echo(f"... {step.name} (expected under {step.budget_s:.0f} s)")
        try:
            results.append(step.run(device, left))
        except subprocess.TimeoutExpired:
            results.append(Result(step.name, False, f"timed out after {left:.0f} s"))
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            results.append(Result(step.name, False, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: print the plan and an empty report")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"wall-clock limit (default {BUDGET_S:g})")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], metavar="STEP",
                   help="run only these steps, of: " + " ".join(s.name for s in STEPS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.budget_s > 0:
        raise SystemExit(f"gpu_check: --budget-s must be > 0, got {args.budget_s}")
    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    start = time.monotonic()
    if args.dry_run:
        print("plan (expected seconds on one GPU): "
              + ", ".join(f"{s.name} {s.budget_s:.0f}" for s in steps)
              + f"; total {sum(s.budget_s for s in steps):.0f} of a {args.budget_s:.0f} s budget")
        results = [Result(s.name, None, "not run (dry run)") for s in steps]
        print(format_report(environment(), results, time.monotonic() - start))
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device ({environment()}); run it on a GPU machine, or --dry-run", file=sys.stderr)
        return 2
    results = run_steps(steps, torch.device("cuda", 0), args.budget_s, lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(environment(), results, time.monotonic() - start))
    return 1 if any(r.ok is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
