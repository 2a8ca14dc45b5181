"""How faithful is the emulated cluster? Intra- vs inter-node AlltoAll, and AlltoAll/matmul overlap.

For every ``--links`` rate and every ``--layouts`` NODESxPPN, the script builds an emulated cluster
(``fsmoe.cluster``: one network namespace per node, uplink and downlink shaped by ``tc tbf``) and runs
:func:`fsmoe.cluster.linkcheck.survey` on its ranks:

* an AlltoAll of each ``--sizes`` bytes per rank on the intra-node groups (the nodes) and on the
  inter-node groups (same local rank on every node); median of ``--reps`` samples, each the slowest
  rank's time. ``uplink Mbit/s`` is what one node pushed through its shaped uplink, to compare with
  the nominal rate; ``inter/intra`` is how much slower the slow channel is;
* an inter-node AlltoAll of ``--overlap-bytes`` alone, a matmul sized to take about as long alone, and
  the AlltoAll issued async with the matmul run meanwhile: ``overlap`` = (t_mm + t_a2a - t_both) /
  min(t_mm, t_a2a), 1 when fully hidden, 0 when back to back.

``unshaped`` in ``--links`` builds the namespaces without tc (veth + bridge only), as a reference.
Each rank runs with one torch thread. Overlap needs spare CPU (gloo's thread copies while the matmul
runs): on a busy or small machine it reads low or negative; the table warns when the 1-minute load
exceeded the CPU count plus the cluster's own ranks during its run. Needs root (network namespaces);
prints why not otherwise.
Run ``python benchmarks/cluster_links.py --help``; results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO_ROOT, Table, env_info, write_json  # noqa: E402
from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec, check_privileges, format_rate  # noqa: E402
from fsmoe.cluster.linkcheck import LinkSurvey, survey  # noqa: E402

_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30}


def _bytes(text: str) -> int:
    """``4M`` -> 4194304; ``65536`` -> 65536 (binary units k, m, g)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(t[-1:], 1)
    return int(float(t[:-1] if scale != 1 else t) * scale)


def _layout(text: str) -> tuple[int, int]:
    nodes, _, ppn = text.lower().partition("x")
    try:
        return int(nodes), int(ppn)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NODESxPPN such as 2x2, got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--links", nargs="+", default=["1gbit", "200mbit", "unshaped"], help="link rates")
    p.add_argument("--layouts", nargs="+", type=_layout, default=[(2, 2), (2, 1)], help="NODESxPPN")
    p.add_argument(
        "--sizes",
        nargs="+",
        type=_bytes,
        default=[2**20, 4 * 2**20, 16 * 2**20],
        help="AlltoAll bytes per rank (k/m/g suffixes)",
    )
    p.add_argument("--overlap-bytes", type=_bytes, default=4 * 2**20, help="AlltoAll bytes of the overlap test")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--latency-ms", type=float, default=50.0, help="tbf queue bound")
    p.add_argument("--timeout", type=float, default=300.0, help="per cluster")
    p.add_argument("--out", default=str(REPO_ROOT / "bench_results" / "cluster_links.json"))
    return p.parse_args(argv)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _run_one(spec: EmulatedClusterSpec, args: argparse.Namespace) -> tuple[LinkSurvey, float]:
    t0 = time.perf_counter()
    with EmulatedCluster(spec) as cluster:
        result = cluster.run_function(
            survey,
            procs_per_node=spec.procs_per_node,
            sizes=tuple(args.sizes),
            overlap_nbytes=args.overlap_bytes,
            reps=args.reps,
            timeout=args.timeout,
        )[0]  # every rank holds the same MAX-reduced times
    return result, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    reason = check_privileges()
    if reason is not None:
        raise SystemExit(f"cluster_links: cannot build an emulated cluster here: {reason}")
    links = Table(
        [
            "link",
            "layout",
            "MiB/rank",
            "intra ms",
            "inter ms",
            "inter/intra",
            "intra GB/s/rank",
            "uplink Mbit/s",
            "of nominal",
        ]
    )
    overlap = Table(["link", "layout", "a2a MiB", "a2a ms", "matmul n", "matmul ms", "both ms", "overlap"])
    results = []
    busy: list[str] = []  # clusters measured while the machine was oversubscribed
    for nodes, ppn in args.layouts:
        for link in args.links:
            spec = EmulatedClusterSpec(nodes=nodes, procs_per_node=ppn, link=link, latency_ms=args.latency_ms)
            load_before = _load()
            res, wall_s = _run_one(spec, args)
            load = max(load_before, _load())
            if load > (os.cpu_count() or 1) + spec.world_size:  # the ranks themselves add world_size
                busy.append(f"{spec.describe()}: load {load:g} on {os.cpu_count()} CPUs")
            layout = f"{nodes}x{ppn}"
            rate = spec.rate_bits
            for t in res.links:
                share = f"{t.uplink_bits_per_s / rate:.0%}" if rate else "-"
                intra = (
                    [t.intra_s * 1e3, f"{t.ratio:.1f}x", t.rank_bytes_per_s("intra") / 1e9]
                    if ppn > 1
                    else ["-", "-", "-"]
                )  # one rank per node: the intra-node "group" is a copy to itself
                links.add(
                    [
                        format_rate(rate),
                        layout,
                        t.nbytes / 2**20,
                        intra[0],
                        t.inter_s * 1e3,
                        *intra[1:],
                        t.uplink_bits_per_s / 1e6,
                        share,
                    ]
                )
            o = res.overlap
            if o is not None:
                overlap.add(
                    [
                        format_rate(rate),
                        layout,
                        o.nbytes / 2**20,
                        o.a2a_s * 1e3,
                        o.matmul_n,
                        o.matmul_s * 1e3,
                        o.both_s * 1e3,
                        f"{o.overlap_ratio:.2f}",
                    ]
                )
            results.append(
                {
                    "link": link,
                    "rate_bits_per_s": rate,
                    "tbf": spec.tbf(),
                    "nodes": nodes,
                    "procs_per_node": ppn,
                    "wall_s": wall_s,
                    "load_avg_1m": load,
                    "links": [
                        {**vars(t), "ratio": t.ratio, "uplink_bits_per_s": t.uplink_bits_per_s} for t in res.links
                    ],
                    "overlap": None if o is None else {**vars(o), "overlap_ratio": o.overlap_ratio},
                }
            )
            print(f"done {spec.describe()} in {wall_s:.1f} s", file=sys.stderr, flush=True)
    print("AlltoAll on intra-node vs inter-node groups (median of slowest-rank samples)")
    print(links)
    print("\nInter-node AlltoAll overlapped with a matmul of about the same length")
    print(overlap)
    if busy:
        print("\nWARNING: other work competed for the CPUs (overlap and intra-node times suffer most):")
        print("\n".join(f"  {line}" for line in busy))
    payload = {
        "benchmark": "cluster_links",
        "env": {**env_info("cpu"), "backend": "gloo", "threads_per_rank": 1},
        "config": {
            "links": args.links,
            "layouts": [list(x) for x in args.layouts],
            "sizes": args.sizes,
            "overlap_bytes": args.overlap_bytes,
            "reps": args.reps,
            "latency_ms": args.latency_ms,
        },
        "definitions": {
            "nbytes": "AlltoAll input bytes per rank (float32)",
            "uplink_bits_per_s": "procs_per_node * nbytes * (nodes-1)/nodes * 8 / inter_s",
            "overlap_ratio": "(matmul_s + a2a_s - both_s) / min(matmul_s, a2a_s); 1 = fully hidden",
        },
        "results": results,
    }
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
