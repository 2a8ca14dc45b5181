"""Every schedule × (r_fwd, r_bwd) × dispatcher × layout, FFN and SwiGLU experts: the pipelined
distributed layer's outputs and all gradients equal the single-process layer (fp32, 1e-5).
One spawn per layout; the schedules run on two channels' process groups, as in training."""

from __future__ import annotations

import itertools

import pytest

from fsmoe.config import DISPATCHER_NAMES, SCHEDULES
from tests.dist_utils import run_distributed
from tests.parallel.moe_cases import check_results, layer_vs_reference

DEGREES = (1, 2, 4)


def _pipelines() -> tuple[tuple[str, int, int], ...]:
    out = []
    for name, spec in SCHEDULES.items():
        for r_fwd, r_bwd in itertools.product(DEGREES, DEGREES):
            if not spec.pipelined and (r_fwd, r_bwd) != (1, 1):
                continue
            if not spec.independent_degrees and r_fwd != r_bwd:
                continue
            out.append((name, r_fwd, r_bwd))
    return tuple(out)


LAYOUTS = {"ep4": (4, 2, 4, 1), "ep2xesp2": (4, 2, 2, 2), "dp2xep2": (4, 2, 2, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_schedule_matches_single_process(layout: str) -> None:
    world, ppn, ep, esp = LAYOUTS[layout]
    pipelines = _pipelines()
    assert len(pipelines) == 28
    per_rank = run_distributed(
        layer_vs_reference, world, ppn=ppn, ep=ep, esp=esp, dispatchers=DISPATCHER_NAMES,
        gates=("gshard",), capacity_factors=(1.0,), pipelines=pipelines, channels=2, timeout=300,
    )
    assert check_results(per_rank, tol=1e-5) == world * 3 * 2 * len(pipelines)
