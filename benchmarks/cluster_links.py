"""How faithful is the emulated cluster? Intra- vs inter-node AlltoAll, and AlltoAll/matmul overlap.

For every ``--links`` rate and every ``--layouts`` NODESxPPN, the script builds an emulated cluster
(``fsmoe.cluster``: one network namespace per node, uplink and downlink shaped by ``tc tbf``) and runs
:func:`fsmoe.cluster.linkcheck.survey` on its ranks (:func:`~fsmoe.cluster.linkcheck.survey_cluster`):

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.bench.report import REPO_ROOT, Table, env_info, write_json  # noqa: E402
from fsmoe.cluster import EmulatedClusterSpec, check_privileges, format_rate  # noqa: E402
from fsmoe.cluster.linkcheck import ClusterSurvey, survey_cluster  # noqa: E402

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


def _add_rows(links: Table, overlap: Table, res: ClusterSurvey) -> None:
    spec = res.spec
    rate, layout = spec.rate_bits, f"{spec.nodes}x{spec.procs_per_node}"
    for t in res.survey.links:
        share = f"{t.uplink_bits_per_s / rate:.0%}" if rate else "-"
        # one rank per node: the intra-node "group" is a copy to itself
        intra = [t.intra_s * 1e3, f"{t.ratio:.1f}x", t.rank_bytes_per_s("intra") / 1e9]
        intra = intra if spec.procs_per_node > 1 else ["-", "-", "-"]
        row = [format_rate(rate), layout, t.nbytes / 2**20, intra[0], t.inter_s * 1e3, *intra[1:]]
        links.add([*row, t.uplink_bits_per_s / 1e6, share])
    o = res.survey.overlap
    if o is not None:
        row = [format_rate(rate), layout, o.nbytes / 2**20, o.a2a_s * 1e3, o.matmul_n, o.matmul_s * 1e3]
        overlap.add([*row, o.both_s * 1e3, f"{o.overlap_ratio:.2f}"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    reason = check_privileges()
    if reason is not None:
        raise SystemExit(f"cluster_links: cannot build an emulated cluster here: {reason}")
    links = Table(["link", "layout", "MiB/rank", "intra ms", "inter ms", "inter/intra", "intra GB/s/rank",
                   "uplink Mbit/s", "of nominal"])  # fmt: skip
    overlap = Table(["link", "layout", "a2a MiB", "a2a ms", "matmul n", "matmul ms", "both ms", "overlap"])
    surveys = []
    for nodes, ppn in args.layouts:
        for link in args.links:
            spec = EmulatedClusterSpec(nodes=nodes, procs_per_node=ppn, link=link, latency_ms=args.latency_ms)
            res = survey_cluster(
                spec, sizes=args.sizes, overlap_nbytes=args.overlap_bytes, reps=args.reps, timeout=args.timeout
            )
            _add_rows(links, overlap, res)
            surveys.append(res)
            print(f"done {spec.describe()} in {res.wall_s:.1f} s", file=sys.stderr, flush=True)
    print(f"AlltoAll on intra-node vs inter-node groups (median of slowest-rank samples)\n{links}")
    print(f"\nInter-node AlltoAll overlapped with a matmul of about the same length\n{overlap}")
    busy = [
        f"  {s.spec.describe()}: load {s.load_avg_1m:g} on {os.cpu_count()} CPUs" for s in surveys if s.oversubscribed
    ]
    if busy:
        print("\nWARNING: other work competed for the CPUs (overlap and intra-node times suffer most):")
        print("\n".join(busy))
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
        "results": [s.to_json() for s in surveys],
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
