"""``Gate.static_capacity``: the promise that lets a distributed dispatcher skip the per-forward capacity
exchange (see ``tests/parallel/test_capacity_agreement.py``). A gate that claims it must give the same C
for every input of the same T; the local dispatcher never changes C."""

from __future__ import annotations

import pytest
import torch

from fsmoe.config import GATE_NAMES, MoEConfig
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.gates import build_gate

D, E = 8, 4


def _cfg(gate: str, capacity_factor: float | None) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=1 if gate == "switch" else 2, d_hidden=16, gate=gate,
                     capacity_factor=capacity_factor)


# expert_choice needs a factor; softmoe ignores it (and warns when it is changed)
CASES = [(g, cf) for g in GATE_NAMES for cf in (1.25, None) if not (g in ("expert_choice", "softmoe") and cf is None)]


@pytest.mark.parametrize(("gate", "cf"), CASES, ids=[f"{g}-cf{cf}" for g, cf in CASES])
def test_static_capacity_is_what_the_gate_does(gate: str, cf: float | None) -> None:
    torch.manual_seed(0)
    g = build_gate(_cfg(gate, cf), D)
    expected = cf is not None
    assert g.static_capacity is expected
    # Inputs of one T that load the experts very differently: a static gate's C must not move.
    T = 16
    skewed = torch.zeros(T, D)
    skewed[:, 0] = 5.0
    with torch.no_grad():
        caps = {g(x).capacity for x in (torch.randn(T, D), skewed, -skewed, torch.randn(T, D) * 10)}
    if expected:
        assert len(caps) == 1, caps
    else:  # data-dependent C (the busiest expert's load): the skewed inputs pile onto one expert
        assert len(caps) > 1, caps


def test_local_dispatcher_keeps_its_capacity() -> None:
    d = Dispatcher()
    assert d.agree_capacity(7) == 7
    assert d.agree_capacity(7, num_tokens=12, static=True) == 7
