"""Time each collective on its real process group across message sizes, and fit t = α + β·n.

The script runs ``--world`` gloo ranks forked on this machine (:func:`fsmoe.cluster.run_distributed`),
builds the groups of ``ParallelDims(world, procs_per_node, ep, esp, mp)`` and times, on every rank at
once (so all groups of a kind run concurrently, as in training), with
:func:`fsmoe.cluster.linkcheck.time_collectives`:

* ``all_to_all``     on the EP group     (dispatch / combine)
* ``all_gather``     on the ESP group    (ESP-AllGather)
* ``reduce_scatter`` on the ESP group    (ESP-ReduceScatter)
* ``all_reduce``     on the dense-DP group (Gradient-AllReduce)

Message size n (bytes, float32) follows the paper's §4 convention: the per-rank input for all_to_all
and all_reduce, the gathered output for all_gather, the input before scattering for reduce_scatter
(n_ag = n_rs = the gathered size). One sample: a world barrier, then ``--inner`` calls back to back,
divided by ``--inner``; the slowest rank's sample counts (a collective ends when its last rank does);
the median of ``--reps`` samples is reported. α (s) and β (s/byte) are fitted by least squares over
the sizes, with R². On one machine "intra" and "inter" groups share the same loopback path.

Run ``python benchmarks/collectives.py --help``; results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.bench.report import REPO_ROOT, Table, env_info, write_json  # noqa: E402
from fsmoe.cluster.linkcheck import COLLECTIVE_GROUPS, time_collectives  # noqa: E402
from fsmoe.parallel.dims import ParallelDims  # noqa: E402

DEFAULT_SIZES = tuple(4096 * 4**i for i in range(6))  # 4 KiB .. 4 MiB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--procs-per-node", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--esp", type=int, default=2)
    p.add_argument("--mp", type=int, default=None, help="MP degree (default: esp, the paper's layout)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="message bytes")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=str(REPO_ROOT / "bench_results" / "collectives.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mp = args.esp if args.mp is None else args.mp
    if args.world % mp:
        raise ValueError(f"--mp={mp} must divide --world={args.world}")
    dims = ParallelDims(
        world_size=args.world, procs_per_node=args.procs_per_node, dp=args.world // mp, mp=mp, ep=args.ep, esp=args.esp
    )
    fits, wall_s = time_collectives(
        dims, sizes=args.sizes, reps=args.reps, inner=args.inner, warmup=args.warmup, timeout=args.timeout
    )

    times = Table(["bytes", *(f"{op} ms" for op in COLLECTIVE_GROUPS)])
    for i, nbytes in enumerate(args.sizes):
        times.add([nbytes, *(f"{f.timings[i].seconds * 1e3:.3f}" for f in fits)])
    table = Table(["op", "group", "size", "where", "alpha us", "beta ns/B", "GB/s", "R2"])
    for f in fits:
        t = f.timings[0]
        where = "intra" if t.intra else "inter"
        row = [f.op, t.group, len(t.group_ranks), where, f.fit.alpha_s * 1e6, f.fit.beta_s_per_byte * 1e9]
        table.add([*row, f.fit.bytes_per_s / 1e9, f"{f.fit.r2:.4f}"])
    print(f"{dims}  ({wall_s:.1f} s including start-up)\n{times}\n\n{table}")

    config = {f: getattr(dims, f) for f in ("world_size", "procs_per_node", "dp", "mp", "ep", "esp")}
    payload = {
        "benchmark": "collectives",
        "env": {**env_info("cpu"), "backend": "gloo", "threads_per_rank": 1},
        "config": {
            "dims": config,
            "sizes": list(args.sizes),
            "reps": args.reps,
            "inner": args.inner,
            "warmup": args.warmup,
            "dtype": "float32",
        },
        "bytes_definition": "per-rank input for all_to_all and all_reduce; gathered output for all_gather; "
        "input before scattering for reduce_scatter",
        "wall_s": wall_s,
        "results": [f.to_json() for f in fits],
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
