"""Training tokens/s of the GPT-MoE: fsmoe vs the same model with DeepSpeed's MoE layer: ``fsmoe bench train``.

Our schedules train the model exactly as ``fsmoe train`` does; the DeepSpeed twin has the same weights,
gate rule, capacity, layout and batches; one optimizer step each per round, interleaved; median step
time, tokens/s, the ratio to DeepSpeed, and the losses; a markdown table, and in ``--out`` (a directory)
the JSON, a PNG chart and the resolved job.toml. This script is the CLI subcommand under another name
(same flags): ``python benchmarks/train.py --help``. What is measured is documented in :mod:`fsmoe.bench.train`.

Examples (2 emulated nodes x 2 ranks; needs root for the network namespaces)::

    python benchmarks/train.py --quick
    python benchmarks/train.py --link 1gbit --ep 4 --reps 8 --out bench_results/train_1gbit_ep4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make `fsmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmoe.cli import main as cli_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["bench", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
