"""Training under load: 4-rank ``fsmoe train`` runs of every schedule while CPU hogs keep the cores busy.

Each run is a fresh ``python -m fsmoe train`` (2 declared nodes × 2 ranks, EP = 2, ESP = 2, pipelined
schedules at r = 2) with a wall-clock limit; ``--hogs`` busy-loop processes run for the whole benchmark,
so the ranks compete for the cores as they do when other jobs share the machine. A run passes when it
exits 0 and writes a finished ``status.json``. Prints one line per run and a summary; writes JSON.

    python benchmarks/stress.py                 # 2 rounds x 6 schedules, 2 hogs
    python benchmarks/stress.py --rounds 1 --schedules fsmoe_no_iio
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEDULES = ("sequential", "tutel", "tutel_improved", "lina", "fsmoe_no_iio", "fsmoe")


def _hog(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_once(schedule: str, steps: int, out: Path, timeout_s: float) -> dict:
    degrees = [] if schedule == "sequential" else ["--r-fwd", "2", "--r-bwd", "2"]
    argv = [sys.executable, "-m", "fsmoe", "train", "--nproc", "4", "--procs-per-node", "2", "--ep", "2", "--esp", "2",
            "--schedule", schedule, *degrees, "--steps", str(steps), "--batch-size", "8", "--log-every", str(steps),
            "--eval-iters", "1", "--data-bytes", "200000", "--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        code, tail = None, f"timed out after {timeout_s} s: {(e.stdout or b'')[-1000:]!r}"
    status = out / "status.json"
    state = json.loads(status.read_text())["state"] if status.exists() else None
    ok = code == 0 and state == "finished"
    return {"schedule": schedule, "ok": ok, "exit": code, "state": state, "wall_s": time.perf_counter() - start,
            "tail": "" if ok else tail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="runs of every schedule")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--steps", type=int, default=10, help="training steps per run")
    p.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy-loop processes (default: one per core)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--out", default="bench_results/stress.json", help="JSON result file")
    args = p.parse_args(argv)
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,), daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="fsmoe-stress-") as tmp:
            for r in range(args.rounds):
                for schedule in args.schedules:
                    res = run_once(schedule, args.steps, Path(tmp) / f"{r}-{schedule}", args.timeout)
                    results.append(res)
                    print(f"round {r + 1} {schedule:<15} {'ok' if res['ok'] else 'FAILED'} exit={res['exit']} "
                          f"{res['wall_s']:.1f} s", flush=True)
                    if not res["ok"]:
                        print(res["tail"], flush=True)
    finally:
        stop.set()
        for h in hogs:
            h.join(timeout=5)
    failed = [r for r in results if not r["ok"]]
    passed = len(results) - len(failed)
    print(f"{passed}/{len(results)} runs passed with {args.hogs} CPU hogs on {os.cpu_count()} cores")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"hogs": args.hogs, "steps": args.steps, "runs": results}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
