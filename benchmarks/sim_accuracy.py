"""How well does the simulator predict measured layer times? Every row of a planner-accuracy run, replayed.

``benchmarks/planner_accuracy.py`` measured ``fsmoe bench layer`` on the emulated 2 x 2 cluster for 14 layer
configurations (every schedule at several degrees) and cached each configuration's profile. This script does
not measure anything: it reads that JSON, feeds the simulator each configuration's profile (from the path the
run recorded, or from ``--profile-dir``) and prints predicted beside measured per row, the median |error| per
schedule and over all rows (the issue's target: <= 10%), and writes them as JSON. What is replayed and how:
:mod:`fsmoe.sim.accuracy`.

    python benchmarks/sim_accuracy.py          # bench_results/planner_accuracy/planner_accuracy.json
    python benchmarks/sim_accuracy.py --run FILE --profile-dir ~/.cache/fsmoe/profiles --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.sim.accuracy import replay_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench_results" / "planner_accuracy" / "planner_accuracy.json"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(RUN), help="a planner_accuracy.json (default: %(default)s)")
    p.add_argument("--profile-dir", help="look for each case's profile file here (default: the path it recorded)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "sim_accuracy" / "sim_accuracy.json"),
                   help="results JSON (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        report = replay_run(args.run, args.profile_dir)
    except ValueError as e:
        print(f"sim_accuracy: error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), **report.to_dict()}, indent=1))
    print(f"wrote {out}")
    return 0 if report.rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
