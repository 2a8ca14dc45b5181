"""What profiling measures and the performance models consume: one α-β line per operation.

Paper §4.1 (Eq. 1), digest §4.1: every task of a pipelined MoE block costs t = α + β·n for its workload
n — bytes for a collective, multiply-accumulates for a GEMM — and a chunk of 1/r of the work costs
α + β·n/r. :class:`Linear` is one such line, :class:`Costs` the set for one job on one cluster.

Collectives are measured twice (see :mod:`fsmoe.perf.profile`): idle, and while expert compute runs on
the same cores (``*_busy``). On CPU ranks that share cores, a chunked
AlltoAll that overlaps compute is 1.4–2.5× slower than idle, and the models use what the task will meet.
The same measurement times the compute beside the collective: on shared cores it slows too (1.0–2.3×
here), a factor per collective (``Costs.beside``); the models apply the Gradient-AllReduce's to compute
while it overlaps one (:data:`fsmoe.perf.model.SLOWING`).

Pure: no torch, no processes. Units: seconds; n in bytes (collectives) or MACs (GEMMs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, frozen=True)
class Linear:
    """t(n) = ``alpha_s`` + ``beta_s`` · n, fitted with coefficient of determination ``r2`` (None: not fitted,
    e.g. a preset from the paper)."""

    alpha_s: float
    beta_s: float
    r2: float | None = None

    def __post_init__(self) -> None:
        if not (self.alpha_s >= 0 and self.beta_s >= 0):
            raise ValueError(f"Linear: alpha_s and beta_s must be >= 0, got {self.alpha_s}, {self.beta_s}")

    def __call__(self, n: float) -> float:
        return self.alpha_s + self.beta_s * n

    def chunk(self, n: float, r: float) -> float:
        """Time of one of ``r`` equal chunks of workload ``n`` (Eq. 1)."""
        return self.alpha_s + self.beta_s * n / r

    def inverse(self, t: float) -> float:
        """The workload that takes ``t`` seconds (the paper's g_grad^inv); 0 when t ≤ α."""
        return max(t - self.alpha_s, 0.0) / self.beta_s if self.beta_s > 0 else 0.0

    def scaled(self, k: float) -> Linear:
        """k times as long (e.g. the backward GEMMs: twice the forward's, digest §4.4)."""
        return Linear(alpha_s=self.alpha_s * k, beta_s=self.beta_s * k, r2=self.r2)


ZERO = Linear(alpha_s=0.0, beta_s=0.0)

# Operation names, in the order the profiler measures and the JSON stores them.
COLLECTIVES = ("a2a", "ag", "rs", "gar")
COMPUTE = ("expert_fwd", "expert_bwd", "gate_fwd", "gate_bwd", "dense_fwd", "dense_bwd")


@dataclass(kw_only=True, frozen=True)
class Costs:
    """α-β lines of every operation one job runs, on one cluster.

    Collectives (n = bytes this rank contributes): ``a2a`` the EP AlltoAll (inter-node channel), ``ag``
    / ``rs`` the ESP AllGather / ReduceScatter (n = the gathered size; intra-node), ``gar`` the dense
    Gradient-AllReduce; ``busy`` holds the same collectives measured while compute runs (missing keys:
    as idle), ``beside`` how much slower compute runs while each collective runs beside it (σ ≥ 1: a
    compute task fully overlapped by the collective takes σ × its line; missing keys: 1, no slowdown).
    Compute (n = MACs): ``expert_fwd`` / ``expert_bwd`` one expert GEMM pass over a chunk
    (all GEMMs of the expert type), ``gate_fwd`` / ``gate_bwd`` gate + Order + I-Order (n = tokens·D·E),
    ``dense_fwd`` / ``dense_bwd`` a generalized layer's dense part (attention etc.; n = tokens·D²)."""

    ops: dict[str, Linear]
    busy: dict[str, Linear] = field(default_factory=dict)
    beside: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # where and when it was measured

    def __post_init__(self) -> None:
        missing = [op for op in COLLECTIVES + COMPUTE if op not in self.ops]
        if missing:
            raise ValueError(f"Costs: no model for {', '.join(missing)}")
        unknown = [op for op in [*self.ops, *self.busy] if op not in COLLECTIVES + COMPUTE]
        unknown += [op for op in self.beside if op not in COLLECTIVES]
        if unknown:
            raise ValueError(f"Costs: unknown operations {', '.join(unknown)}")
        bad = {op: s for op, s in self.beside.items() if not s >= 1.0}
        if bad:
            raise ValueError(f"Costs: compute slowdowns beside collectives must be >= 1, got {bad}")

    def op(self, name: str, *, busy: bool = False) -> Linear:
        """The line of ``name``; with ``busy``, the one measured under concurrent compute when there is one."""
        if busy and name in self.busy:
            return self.busy[name]
        return self.ops[name]

    def slows(self, collective: str) -> float:
        """σ of ``collective``: how much slower compute runs fully overlapped by it (1: not slowed)."""
        return self.beside.get(collective, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"ops": {k: dataclasses.asdict(v) for k, v in self.ops.items()},
                "busy": {k: dataclasses.asdict(v) for k, v in self.busy.items()},
                "beside": dict(self.beside), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Costs:
        try:
            return cls(ops={k: Linear(**v) for k, v in data["ops"].items()},
                       busy={k: Linear(**v) for k, v in data.get("busy", {}).items()},
                       beside={k: float(v) for k, v in data.get("beside", {}).items()}, meta=data.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a costs record: {e}") from None
