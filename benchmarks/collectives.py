"""Time each collective on its real process group across message sizes, and fit t = α + β·n.

The script spawns ``--world`` gloo ranks itself (through ``tests.dist_utils.run_distributed``), builds
the groups of ``ParallelDims(world, procs_per_node, ep, esp, mp)`` and times, on every rank at once
(so all groups of a kind run concurrently, as in training):

* ``all_to_all``     on the EP group     (dispatch / combine)
* ``all_gather``     on the ESP group    (ESP-AllGather)
* ``reduce_scatter`` on the ESP group    (ESP-ReduceScatter)
* ``all_reduce``     on the dense-DP group (Gradient-AllReduce)

Message size n (bytes, float32) follows the paper's §4 convention: the per-rank input for all_to_all
and all_reduce, the gathered output for all_gather, the input before scattering for reduce_scatter
(n_ag = n_rs = the gathered size). The raw calls of ``fsmoe.parallel.comm`` run on preallocated
buffers. One sample: a world barrier, then ``--inner`` calls back to back, divided by ``--inner``;
the slowest rank's sample counts (a collective ends when its last rank does); the median of
``--reps`` samples is reported. α (s) and β (s/byte) are fitted by least squares over the sizes,
with R². On one machine "intra" and "inter" groups share the same loopback path.

Run ``python benchmarks/collectives.py --help``; results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO_ROOT, Table, env_info, write_json  # noqa: E402
from fsmoe.parallel.comm import all_gather_into, all_reduce_, all_to_all_into, reduce_scatter_into  # noqa: E402
from fsmoe.parallel.dims import GroupKind, ParallelDims, ProcessGroups, build_groups  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

# collective name -> the group kind it runs on in a MoE layer
OPS: dict[str, GroupKind] = {
    "all_to_all": "ep",
    "all_gather": "esp",
    "reduce_scatter": "esp",
    "all_reduce": "dense_dp",
}
DEFAULT_SIZES = tuple(4096 * 4**i for i in range(6))  # 4 KiB .. 4 MiB


def _collective(op: str, nbytes: int, groups: ProcessGroups) -> Callable[[], object]:
    """A call of ``op`` on its group, with buffers for a message of ``nbytes`` (see the module doc)."""
    kind = OPS[op]
    group, size = groups.group(kind), groups.size(kind)
    numel = max(size, nbytes // 4 // size * size)  # float32, divisible by the group size
    full = torch.randn(numel)
    part = torch.empty(numel // size)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: all_to_all_into(out, full, group)
    if op == "all_gather":
        return lambda: all_gather_into(full, part, group)
    if op == "reduce_scatter":
        return lambda: reduce_scatter_into(part, full, group)
    return lambda: all_reduce_(full, group)


def measure(
    rank: int, world: int, dims: ParallelDims, sizes: Sequence[int], reps: int, inner: int, warmup: int
) -> list[dict[str, Any]]:
    """Runs on every rank; returns this rank's view: one record per (op, size), slowest-rank seconds."""
    groups = build_groups(dims)
    records = []
    for op, kind in OPS.items():
        for nbytes in sizes:
            call = _collective(op, nbytes, groups)
            for _ in range(warmup):
                call()
            samples = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(inner):
                    call()
                sample = torch.tensor([(time.perf_counter() - t0) / inner], dtype=torch.float64)
                dist.all_reduce(sample, op=dist.ReduceOp.MAX)
                samples.append(sample.item())
            records.append(
                {
                    "op": op,
                    "group": kind,
                    "group_ranks": list(groups.ranks[kind]),
                    "intra": groups.is_intra(kind),
                    "bytes": nbytes,
                    "seconds": statistics.median(samples),
                    "samples_s": samples,
                }
            )
    return records


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares t = α + β·n; returns (α seconds, β seconds per byte, R²)."""
    n = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    A = np.stack([np.ones_like(n), n], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, t, rcond=None)
    ss_res = float(np.sum((t - (alpha + beta * n)) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(alpha), float(beta), r2


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
    t0 = time.perf_counter()
    per_rank = run_distributed(
        measure, args.world, dims, args.sizes, args.reps, args.inner, args.warmup, timeout=args.timeout
    )
    wall_s = time.perf_counter() - t0
    records = per_rank[0]  # every rank holds the same slowest-rank seconds; rank 0's groups are shown

    results = []
    for op, kind in OPS.items():
        points = [r for r in records if r["op"] == op]
        alpha, beta, r2 = fit_alpha_beta([r["bytes"] for r in points], [r["seconds"] for r in points])
        results.append(
            {
                "op": op,
                "group": kind,
                "group_size": len(points[0]["group_ranks"]),
                "rank0_group_ranks": points[0]["group_ranks"],
                "intra": points[0]["intra"],
                "alpha_s": alpha,
                "beta_s_per_byte": beta,
                "r2": r2,
                "points": [{"bytes": r["bytes"], "seconds": r["seconds"], "samples_s": r["samples_s"]} for r in points],
            }
        )

    times = Table(["bytes", *(f"{op} ms" for op in OPS)])
    for nbytes in args.sizes:
        row = [next(r["seconds"] for r in records if r["op"] == op and r["bytes"] == nbytes) for op in OPS]
        times.add([nbytes, *(f"{s * 1e3:.3f}" for s in row)])
    fits = Table(["op", "group", "size", "where", "alpha us", "beta ns/B", "GB/s", "R2"])
    for r in results:
        gbps = 1e-9 / r["beta_s_per_byte"] if r["beta_s_per_byte"] > 0 else float("nan")
        where = "intra" if r["intra"] else "inter"
        fits.add(
            [
                r["op"],
                r["group"],
                r["group_size"],
                where,
                r["alpha_s"] * 1e6,
                r["beta_s_per_byte"] * 1e9,
                gbps,
                f"{r['r2']:.4f}",
            ]
        )
    print(f"{dims}  ({wall_s:.1f} s including start-up)")
    print(times)
    print()
    print(fits)

    payload = {
        "benchmark": "collectives",
        "env": {**env_info("cpu"), "backend": "gloo", "threads_per_rank": 1},
        "config": {
            "dims": {f: getattr(dims, f) for f in ("world_size", "procs_per_node", "dp", "mp", "ep", "esp")},
            "sizes": list(args.sizes),
            "reps": args.reps,
            "inner": args.inner,
            "warmup": args.warmup,
            "dtype": "float32",
        },
        "bytes_definition": "per-rank input for all_to_all and all_reduce; gathered output for all_gather; "
        "input before scattering for reduce_scatter",
        "wall_s": wall_s,
        "results": results,
    }
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
