"""Every gate × order, forward + backward, with DeepSpeed's top-1/top-2 gating side by side.

The command line of :mod:`fsmoe.bench.gates` (what is measured is documented there): every flag is a
field of :class:`~fsmoe.bench.gates.GateBenchConfig`, named as in the job config (``--top-k``,
``--experts``, ``--capacity-factor``, ``--d-model`` ...; list-valued here). Results go to
``<--out>/gates.json``. Run ``python benchmarks/gates.py --help``.
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

from fsmoe.bench.gates import (  # noqa: E402
    OUT_FILE,
    GateBenchConfig,
    format_gates_report,
    quick_gates_config,
    run_gates_bench,
)


def build_parser() -> argparse.ArgumentParser:
    """One flag per config field (its metadata: flag, help, parser, nargs); left out, a flag keeps the
    default (or ``--quick``'s)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fast run: T in {256, 1024}, fewer reps")
    defaults, quick = GateBenchConfig(), quick_gates_config()

    def shown(value: Any) -> str:
        return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    for f in dataclasses.fields(GateBenchConfig):
        meta, default, fast = f.metadata, getattr(defaults, f.name), getattr(quick, f.name)
        extra = "" if fast == default else f"; --quick: {shown(fast)}"
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        text = f"{meta['help']} (default {shown(default)}{extra})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=meta["parse"] or str, nargs=meta["nargs"], **kw)
    return p


def config_from_argv(argv: Sequence[str] | None) -> GateBenchConfig:
    p = build_parser()
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GateBenchConfig)
             if getattr(args, f.name) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        return quick_gates_config(**given) if args.quick else GateBenchConfig(**given)
    except ValueError as e:
        p.error(str(e))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = config_from_argv(argv)
    payload = run_gates_bench(cfg)
    print(format_gates_report(payload))
    print(f"\nwrote {Path(cfg.out) / OUT_FILE}")
    return payload


if __name__ == "__main__":
    main()
