"""Shared fixtures of the model tests (tests/perf, tests/sim): one small layer whose workloads are worked
out by hand, and the relative tolerance of "equal" between the evaluator and a closed form."""

from __future__ import annotations

from fsmoe.perf.model import LayerWork

REL = 1e-9

# W = 2, S = 2, E = 4, C = 32, D = 8, H = 16, FFN: n_a2a = 4·32·8·4 = 4096 B, n_ag = n_rs = 8192 B,
# n_exp = 2·4·32·8·16 = 32768 MACs.
WORK = LayerWork(tokens=64, d_model=8, d_hidden=16, num_experts=4, ep=2, esp=2, gemms=2, gate_width=4,
                 capacity_gate=32)
