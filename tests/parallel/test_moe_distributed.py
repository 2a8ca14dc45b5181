"""The distributed MoE layer equals the single-process layer (outputs and every gradient), for every
layout × dispatcher × gate × expert kind, with and without capacity drops. One spawn per layout."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parallel.moe_cases import layer_vs_reference

ALL_GATES = ("gshard", "switch", "sigmoid", "xmoe", "expert_choice", "softmoe")
DISPATCHERS = ("a2a", "2dh", "1dh")

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
        layer_vs_reference, world, ppn=ppn, ep=ep, esp=esp, dispatchers=DISPATCHERS, gates=ALL_GATES,
        timeout=240,
    )
    failures = []
    checked = 0
    for rank, results in enumerate(per_rank):
        for case, errs in results:
            checked += 1
            bad = {k: v for k, v in errs.items() if not v <= 1e-5}
            if bad:
                failures.append(f"rank {rank} {case}: {bad}")
    assert checked > 0
    assert not failures, "\n".join(failures[:20])
