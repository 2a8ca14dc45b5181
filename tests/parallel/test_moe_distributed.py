"""The distributed MoE layer equals the single-process layer (outputs and every gradient), for every
layout × dispatcher × gate × expert kind, with and without capacity drops. One spawn per layout."""

from __future__ import annotations

import pytest

from fsmoe.config import DISPATCHER_NAMES, GATE_NAMES
from tests.dist_utils import run_distributed
from tests.parallel.moe_cases import check_results, layer_vs_reference

LAYOUTS = {
    # name: (world, procs_per_node, ep, esp)
    "ep2": (2, 1, 2, 1),
    "ep4": (4, 2, 4, 1),
    "ep2xesp2": (4, 2, 2, 2),
    "dp2xep2": (4, 2, 2, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_matches_single_process(layout: str) -> None:
    world, ppn, ep, esp = LAYOUTS[layout]
    per_rank = run_distributed(
        layer_vs_reference, world, ppn=ppn, ep=ep, esp=esp, dispatchers=DISPATCHER_NAMES, gates=GATE_NAMES,
        timeout=240,
    )
    assert check_results(per_rank, tol=1e-5) > 0
