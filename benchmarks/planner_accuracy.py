"""How good are FSMoE's performance models and planner? Predicted vs measured over many layer configurations.

Every configuration (:data:`fsmoe.bench.planner.DEFAULT_CASES`: T, D, H, E, k, EP=4 vs EP=2 x ESP=2, links
1 Gbit/s and 200 Mbit/s) is one ``fsmoe bench layer`` run on the emulated 2 x 2 cluster: sequential, tutel,
fsmoe_no_iio and fsmoe over the degree grid plus the ``fsmoe auto`` row. The table shows per configuration
the model's median |error| over the rows, the planner's degrees against the best measured fsmoe row, fsmoe
auto against sequential and the planner's solve time; the summary says where the error comes from (each
operation alone against its profiled line). What each column means: :mod:`fsmoe.bench.planner`.

    python benchmarks/planner_accuracy.py                # 14 configurations, 10 rounds, about 20 min on 2 cores (root)
    python benchmarks/planner_accuracy.py --quick        # 3 tiny configurations, about 30 s
    python benchmarks/planner_accuracy.py --launcher local --quick   # no namespaces: loopback, unshaped
    python benchmarks/planner_accuracy.py --show bench_results/planner_accuracy/planner_accuracy.json
    python benchmarks/planner_accuracy.py --schedules sequential fsmoe --reps 40   # fewer rows, less noise

Profiles are cached (the ``plan`` section's cache; ``--reprofile`` measures again), so a rerun skips them.

Results: ``--out``/planner_accuracy.json and each configuration's ``layer.json`` under ``--out``/cases/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.bench import planner as accuracy  # noqa: E402
from fsmoe.bench.report import REPO_ROOT  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 tiny configurations, 1 round, degrees 1 and 2")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="run only these configurations (by name)")
    p.add_argument("--launcher", choices=("emulated", "local", "auto"), help="default: emulated")
    p.add_argument("--reps", type=int, help="timed rounds per configuration")
    p.add_argument("--schedules", nargs="+", metavar="NAME",
                   help="the rows' schedules (default: sequential tutel fsmoe_no_iio fsmoe; sequential and fsmoe "
                        "always): fewer rows, more rounds in the same time")
    p.add_argument("--profile-budget", type=float, help="seconds each configuration's profile may take")
    p.add_argument("--profile-cache", help="directory of cached profiles (default: the plan section's)")
    p.add_argument("--reprofile", action="store_true", help="profile again even when a cached profile matches")
    p.add_argument("--tune", type=int, help="degree pairs the measured check times (1: none; default: the plan "
                   "section's)")
    p.add_argument("--tune-rounds", type=int, help="rounds per candidate of the measured check")
    p.add_argument("--out", help="results directory")
    p.add_argument("--show", metavar="JSON", help="only print the table of a saved planner_accuracy.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.show:
        print(accuracy.show_planner_accuracy(args.show))
        return {}
    settings = accuracy.QUICK_SETTINGS if args.quick else accuracy.AccuracySettings()
    settings = dataclasses.replace(settings, out=str(REPO_ROOT / "bench_results" / Path(settings.out).name))
    cases = accuracy.QUICK_CASES if args.quick else accuracy.DEFAULT_CASES
    if args.cases:
        known = {c.name: c for c in (*accuracy.DEFAULT_CASES, *accuracy.QUICK_CASES)}
        missing = [n for n in args.cases if n not in known]
        if missing:
            sys.exit(f"unknown configurations {missing}; choose from {', '.join(known)}")
        cases = tuple(known[n] for n in args.cases)
    changes = {"launcher": args.launcher, "reps": args.reps,
               "schedules": tuple(args.schedules) if args.schedules else None, "profile_budget_s": args.profile_budget,
               "profile_cache": args.profile_cache, "out": args.out, "tune": args.tune, "tune_rounds": args.tune_rounds}
    try:
        settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None},
                                       reprofile=args.reprofile or settings.reprofile)
    except ValueError as e:
        sys.exit(str(e))
    return accuracy.run_planner_accuracy(cases, settings)


if __name__ == "__main__":
    main()
