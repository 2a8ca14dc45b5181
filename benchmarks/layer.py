"""One MoE layer, several implementations side by side on the emulated cluster: ``fsmoe bench layer``.

Our schedules (sequential, tutel, fsmoe_no_iio, fsmoe, ...) at several pipeline degrees and
DeepSpeed-MoE, interleaved round by round; medians, ratios to the fastest fsmoe schedule and to the
per-channel lower bound, peak memory; a markdown table, and in ``--out`` (a directory) the JSON, a PNG
chart and the resolved job.toml. This script is the CLI subcommand under another name (same flags):
``python benchmarks/layer.py --help``. What is measured is documented in :mod:`fsmoe.bench.layer`.

Examples (2 emulated nodes x 2 ranks; needs root for the network namespaces)::

    python benchmarks/layer.py --quick
    python benchmarks/layer.py --link 200mbit --ep 2 --esp 2 --reps 3 --out bench_results/layer_200m_esp
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.cli import main as cli_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["bench", "layer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
