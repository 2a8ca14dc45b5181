"""One rank started as a subprocess: ``python -m fsmoe.cluster.worker``.

The launcher starts it (inside a node's namespace on the emulated cluster) with the torchrun
variables and ``FSMOE_RANK_DIR`` set; the rank's whole life is :func:`fsmoe.cluster.ranks.rank_main`,
the same body a forked rank runs. This module exists so that the entry point is not the harness
module itself (``-m`` on an imported module would load it twice).
"""

from __future__ import annotations

import os
import sys

from fsmoe.cluster.ranks import RANK_DIR_ENV, rank_main


def main() -> int:
    if len(sys.argv) != 1 or RANK_DIR_ENV not in os.environ:
        print(
            f"usage: {RANK_DIR_ENV}=FOLDER RANK=r WORLD_SIZE=n ... python -m fsmoe.cluster.worker "
            "(started by fsmoe.cluster's launchers, not by hand)",
            file=sys.stderr,
        )
        return 2
    rank_main()


if __name__ == "__main__":
    sys.exit(main())
