"""The modelled training step and adaptive gradient partitioning (paper §5, digest §5.1–5.3).

Legend: T tokens per rank, D model dim, V vocabulary, P population (candidate plans scored at once),
K degree pairs of a layer.

:class:`StepModel` plays one training step of one schedule: the forward, then the backward block by
block from the last, firing the gradient slots of :mod:`fsmoe.parallel.grad_plan` in their order. A
range launched at a slot occupies the inter-node link (one FIFO, like the runtime's inter lane):

* ``moe:i`` (schedules with ``gar_in_moe``): the range is MoE layer i's ``gar`` task; the layer's
  backward then takes max(A, B + t_gar) at its best degree pair (:class:`fsmoe.perf.model.GarResponse`,
  exact for the played schedule), t_gar the range's duration beside that pair's compute
  (:meth:`~fsmoe.perf.model.GarResponse.slice_s`: between its idle and busy lines), so r_bwd is
  re-solved with the layer's slice;
* ``dense:i``: the range starts when the link is free and overlaps the dense backward up to the next
  MoE layer, which waits for the link if the range is still running (its first AlltoAll needs it);
* ``tail``: what is left is all-reduced after the backward, exposed.

Ranges inside the backward overlap compute (busy line while it runs beside them), the tail the idle line; a
``dense:i`` range that outlasts the compute beside it (up to the next link user) runs at the busy rate
while that compute runs and at the idle rate after it (the profile's rate model,
:func:`fsmoe.perf.fit.slowdown`). Charged the busy line throughout, a 3.2 MB range of the d = 256 model of
``fsmoe bench train`` cost 93 ms (κ = 2.26 × its idle 41 ms) though little compute ran beside it, and the
trainer's greedy plan, measured 3-7% faster than sequential there, was predicted 3% slower. Where
the GAR slows compute beside it (σ = ``Costs.slows("gar")`` > 1: CPU ranks sharing cores), the compute
that a range overlaps runs at 1/σ of its speed (the MoE block through its
:class:`~fsmoe.perf.model.GarResponse`, the dense backward while the link is busy). Each
range pays one α (a range spanning two replica kinds pays two in the runtime; ignored) and only its
bytes whose replica group has more than one rank cost anything (expert shards with EP × ESP = world
are never all-reduced). Lina's fixed-size chunks pay one α each; its non-blocking slice is modelled on
the link like the others (it shares the link's bandwidth either way).

:func:`partition` is §5's two steps: step 1 greedily fills each slot's overlappable window in stream
order (Eqs. 3–4: a range never holds a gradient before the slot it becomes ready at, and what does not
fit waits for the next slot); step 2 gives each MoE slot an extra time budget τ_i beyond its window,
searched by ``scipy.optimize.differential_evolution`` (Eq. 5, with the readiness constraint built in:
the walk only ever takes ready bytes), kept only if it beats step 1. The best of no partition, step 1
and step 2 is returned, so partitioning never increases the modelled step time.

This module owns the rank's gradient stream for modelling (:func:`rank_stream`), the step model and
the partition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import differential_evolution
from torch import nn
from torch.overrides import TorchFunctionMode

from fsmoe.config import JobConfig, ParallelConfig, ScheduleSpec
from fsmoe.models import build_lm
from fsmoe.parallel.grad_plan import NO_PLAN, TAIL, GradientPlan, StreamLayout, greedy_plan
from fsmoe.parallel.grad_sync import REPLICA_ATTR, mark_replicas
from fsmoe.parallel.parallelize import gpt_gradient_stream
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import FP32_BYTES, BlockWork, LayerTable, slice_durations

GRAD_SYNC_BUCKET_BYTES = 25 * 2**20  # fsmoe.parallel.grad_sync.GradSync's default bucket
_EXPERT_PARAM = re.compile(r"^blocks\.\d+\.mlp\.experts\.\w+_([eDH]+)$")
_MP_PARAM = re.compile(r"^blocks\.\d+\.attn\.(qkv\.weight|qkv\.bias|proj\.weight)$")


# --- the gradient stream ---------------------------------------------------------------------------------------
class _SkipRandomInit(TorchFunctionMode):
    """Skips random initialisation (``nn.init.normal_``, ``Tensor.uniform_``, …) while building on the meta
    device: a meta tensor holds no values, and torch's meta random fills import its compiler stack (≈1 s)."""

    FILLS = frozenset({"normal_", "uniform_", "orthogonal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                       "xavier_uniform_", "xavier_normal_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def rank_stream(job: JobConfig) -> StreamLayout:
    """Rank 0's gradient stream for ``job`` without allocating the model: the single-device model on
    the meta device, its :func:`~fsmoe.parallel.parallelize.gpt_gradient_stream`, and each parameter cut
    as :func:`~fsmoe.parallel.parallelize.parallelize_gpt` cuts it — experts by their axis names (e/EP,
    H/ESP; rank 0 owns its ESP group's output bias), attention weights by MP — with its replica mark.
    Flat meta parameters of those sizes: :func:`~fsmoe.parallel.grad_plan.parse_plan` and
    :class:`~fsmoe.parallel.grad_plan.PlannedGradSync` accept it; the real model's stream has the same
    bytes per slot."""
    with torch.device("meta"), _SkipRandomInit():
        full = build_lm(job.model)
    layout = gpt_gradient_stream(full)
    par = job.parallel
    params = []
    for name, p in zip(layout.names, layout.params, strict=True):
        numel, kind = p.numel(), "world"
        if m := _EXPERT_PARAM.match(name):
            cut = {"e": par.ep, "H": par.esp, "D": 1}
            numel, kind = math.prod(n // cut[a] for n, a in zip(p.shape, m.group(1), strict=True)), "expert_dp"
        elif par.mp > 1 and _MP_PARAM.match(name):
            numel, kind = numel // par.mp, "dense_dp"
        q = nn.Parameter(torch.empty(numel, device="meta", dtype=p.dtype), requires_grad=p.requires_grad)
        mark_replicas([q], kind)
        params.append(q)
    return StreamLayout(slots=layout.slots, params=tuple(params), names=layout.names, ready=layout.ready)


def replica_sizes(par: ParallelConfig) -> dict[str, int]:
    """Ranks holding each replica kind (:mod:`fsmoe.parallel.grad_sync`)."""
    return {"world": par.nproc, "dense_dp": par.dense_dp, "expert_dp": par.nproc // (par.ep * par.esp)}


class StreamBytes:
    """The stream as byte positions: ``xk``/``ck`` the cumulative bytes / all-reduced bytes at parameter
    boundaries (C(x), piecewise linear), ``ready`` the bytes ready when each slot fires."""

    def __init__(self, layout: StreamLayout, sizes: dict[str, int]) -> None:
        nbytes = [p.numel() * p.element_size() for p in layout.params]
        comm = [n if sizes[getattr(p, REPLICA_ATTR, "world")] > 1 else 0
                for n, p in zip(nbytes, layout.params, strict=True)]
        self.slots = layout.slots
        self.xk = np.concatenate([[0.0], np.cumsum(nbytes, dtype=float)])
        self.ck = np.concatenate([[0.0], np.cumsum(comm, dtype=float)])
        ready = layout.ready_bytes()
        self.ready = np.array([float(ready[s]) for s in layout.slots])
        self.total = float(self.xk[-1])

    def comm(self, x: np.ndarray) -> np.ndarray:
        return np.interp(x, self.xk, self.ck)

    def fit(self, pos: np.ndarray, budget: np.ndarray, line: Linear) -> np.ndarray:
        """The furthest position b ≥ pos with α + β·(C(b) − C(pos)) ≤ ``budget`` (Eq. 3's g_grad^inv):
        free bytes (C flat) ride along; nothing that costs when the budget is below α."""
        c0 = self.comm(pos)
        extra = np.where(budget > line.alpha_s, (budget - line.alpha_s) / line.beta_s if line.beta_s > 0 else np.inf,
                         0.0)
        target = np.minimum(c0 + extra, self.ck[-1])
        idx = np.searchsorted(self.ck, target, side="right") - 1
        x = np.where(idx >= len(self.xk) - 1, self.total, self.xk[np.minimum(idx, len(self.xk) - 1)]
                     + (target - self.ck[np.minimum(idx, len(self.ck) - 1)]))
        return np.maximum(x, pos)


# --- the step model --------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class StepPrediction:
    """One schedule's modelled step: totals, and per MoE layer (block order, last first as fired) the
    degree pair, forward and backward block time and its GAR slice; launched bytes per slot."""

    schedule: str
    step_s: float
    fwd_s: float
    bwd_s: float
    pairs: tuple[tuple[int, int], ...]
    layer_fwd_s: tuple[float, ...]
    layer_bwd_s: tuple[float, ...]
    layer_gar_s: tuple[float, ...]
    slot_bytes: tuple[tuple[str, int], ...]
    method: str = ""

    def gradient_plan(self) -> GradientPlan:
        return GradientPlan(tuple((s, n) for s, n in self.slot_bytes if s != TAIL and n > 0))

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "step_s": self.step_s, "fwd_s": self.fwd_s, "bwd_s": self.bwd_s,
                "degrees": [list(p) for p in self.pairs], "method": self.method}


class StepModel:
    """One training step of ``spec`` (module docstring). ``tables[m]`` is MoE layer m's
    :class:`LayerTable` (layers in block order); ``blocks`` the model's dense work; ``stream`` the
    gradient stream; ``head_n`` the LM head's dense work (n = T·V·D/4, on the ``dense_*`` lines). Not
    modelled: embeddings, the loss, gradient clipping and the optimizer step."""

    def __init__(self, *, spec: ScheduleSpec, blocks: tuple[BlockWork, ...], tables: list[LayerTable],
                 gate_n: list[float], head_n: float, costs: Costs, stream: StreamBytes) -> None:
        self.spec, self.stream = spec, stream
        self.in_moe, self.in_dense = spec.gar_in_moe, spec.gar_in_moe or spec.gar_overlap_dense
        self.chunk = spec.gar_chunk_bytes
        self.tail_chunk = None if self.in_dense else GRAD_SYNC_BUCKET_BYTES
        self.busy, self.idle = costs.op("gar", busy=True), costs.op("gar")
        self.sigma = costs.slows("gar")
        self.F = [np.array(t.fwd_s) for t in tables]
        self.A = [np.array([g.a_s for g in t.bwd]) for t in tables]
        self.B = [np.array([g.b_s for g in t.bwd]) for t in tables]
        self.W = [np.array([g.slow for g in t.bwd]) for t in tables]
        self.lead = [np.array([g.lead_s for g in t.bwd]) for t in tables]
        self.cover = [np.array([g.cover_s for g in t.bwd]) for t in tables]
        self.overlap = [np.array([g.overlap_s for g in t.bwd]) for t in tables]
        self.pairs = [t.pairs for t in tables]
        self.window0 = [t.bwd[t.best(0.0)].window_s for t in tables]
        dense_f, dense_b = costs.op("dense_fwd"), costs.op("dense_bwd")

        def split(line: Linear, b: BlockWork) -> tuple[float, float]:  # one α per block, split by work
            n = b.n_attn + b.n_mlp
            return (line(n) * b.n_attn / n, line(n) * b.n_mlp / n) if n > 0 else (0.0, 0.0)

        self.attn_bwd, self.mlp_bwd = zip(*(split(dense_b, b) for b in blocks), strict=True)
        gate_f, gate_b = costs.op("gate_fwd"), costs.op("gate_bwd")
        self.gate_bwd = [gate_b(n) for n in gate_n]
        self.head_bwd = dense_b(head_n)
        self.fwd_static = dense_f(head_n) + sum(dense_f(b.n_attn + b.n_mlp) for b in blocks) + sum(map(gate_f, gate_n))
        # compute from dense:j firing until the next link user (the next MoE layer below, or the tail)
        self.gap = [self.attn_bwd[j] + self._below(blocks, j) for j in range(len(blocks))]
        self.moe_of_slot = {}
        m = 0
        for s in stream.slots:
            if s.startswith("moe:"):
                self.moe_of_slot[s] = m
                m += 1
        self.n_moe = m
        if m != len(tables):
            raise ValueError(f"StepModel: {len(tables)} layer tables for {m} MoE slots")
        # tables are in block order; slots fire from the last block: map slot order -> table
        order = sorted(self.moe_of_slot, key=lambda s: int(s.split(":")[1]))
        self.table_of = {s: order.index(s) for s in self.moe_of_slot}

    def _below(self, blocks: tuple[BlockWork, ...], j: int) -> float:
        """Dense backward of the blocks below j up to (not including) the next MoE block."""
        total = 0.0
        for i in range(j - 1, -1, -1):
            if blocks[i].moe:
                break
            total += self.mlp_bwd[i] + self.attn_bwd[i]
        return total

    def _compute(self, t: np.ndarray, x: float, link: np.ndarray) -> np.ndarray:
        """``t`` after ``x`` seconds of compute that the link's GAR range (busy until ``link``) overlaps:
        at 1/σ of its speed while it does (rate model), x + (1 − 1/σ)·min(link − t, σ·x)."""
        if self.sigma == 1.0:
            return t + x
        return t + x + (1.0 - 1.0 / self.sigma) * np.minimum(np.maximum(link - t, 0.0), self.sigma * x)

    def _cost(self, pos: np.ndarray, amount: np.ndarray, line: Linear, chunk: int | None) -> np.ndarray:
        comm = self.stream.comm(pos + amount) - self.stream.comm(pos)
        pieces = np.ceil(amount / chunk) if chunk else 1.0
        return np.where(comm > 0, line.alpha_s * pieces + line.beta_s * comm, 0.0)

    def _take(self, s: int, pos: np.ndarray, budget: np.ndarray | None, fixed: np.ndarray | None) -> np.ndarray:
        room = np.maximum(self.stream.ready[s] - pos, 0.0)
        if fixed is not None:
            return np.minimum(fixed[:, s], room)
        assert budget is not None
        want = self.stream.fit(pos, budget, self.busy) - pos
        return np.floor(np.minimum(want, room) / FP32_BYTES) * FP32_BYTES

    def run(self, *, tau: np.ndarray | None = None, fixed: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Play the step for P candidates at once: ``tau`` (P, n_moe) extra budgets of the MoE slots in
        firing order (step 2; zeros = step 1), or ``fixed`` (P, n_slots) bytes per slot (a given plan).
        Returns arrays: step_s, fwd_s, bwd_s (P,), amounts (P, n_slots), pair index, block fwd/bwd, gar
        (P, n_moe, in firing order)."""
        P = len(tau) if tau is not None else (len(fixed) if fixed is not None else 1)
        st = self.stream
        t, link, pos = np.full(P, self.head_bwd), np.zeros(P), np.zeros(P)
        fwd = np.full(P, self.fwd_static)
        amounts = np.zeros((P, len(st.slots)))
        out = {k: np.zeros((P, self.n_moe)) for k in ("pair", "fwd", "bwd", "gar")}
        for s, slot in enumerate(st.slots):
            if slot == TAIL:
                amounts[:, s] = st.total - pos
                cost = self._cost(pos, amounts[:, s], self.idle, self.tail_chunk)
                end = np.maximum(t, np.where(cost > 0, np.maximum(link, t) + cost, link))
                break
            kind, j = slot.split(":")
            j = int(j)
            if kind == "moe":
                f = self.moe_of_slot[slot]
                m = self.table_of[slot]
                F, A, B = self.F[m], self.A[m], self.B[m]
                W, lead, cov = self.W[m], self.lead[m], self.cover[m]  # GarResponse's slowed compute
                gar = np.zeros((P, len(F)))
                if self.in_moe:
                    budget = None if fixed is not None else self.window0[m] + (tau[:, f] if tau is not None else 0.0)
                    amounts[:, s] = self._take(s, pos, budget, fixed)
                    busy = self._cost(pos, amounts[:, s], self.busy, self.chunk)
                    idle = self._cost(pos, amounts[:, s], self.idle, self.chunk)
                    # the slice's duration at each pair: the rate model beside that pair's compute
                    gar = slice_durations(idle[:, None], busy[:, None], lead[None, :], self.overlap[m][None, :])
                    pos = pos + amounts[:, s]
                slowed = W[None, :] * np.minimum(np.maximum(gar - lead[None, :], 0.0), cov[None, :])
                total = F[None, :] + np.maximum(A[None, :] + slowed, B[None, :] + gar)
                k = np.argmin(total, axis=1)  # first on ties: the smallest pair
                rows = np.arange(len(k))
                block = np.maximum(A[k] + slowed[rows, k], B[k] + gar[rows, k])
                gar = gar[rows, k]
                t = t + np.maximum(link - t, 0.0) + block  # its first AlltoAll waits for the link
                link = t.copy()
                t = t + self.gate_bwd[m]
                fwd = fwd + F[k]
                out["pair"][:, f], out["fwd"][:, f], out["bwd"][:, f], out["gar"][:, f] = k, F[k], block, gar
            else:
                t = self._compute(t, self.mlp_bwd[j], link)
                if self.in_dense:
                    start = np.maximum(link, t)
                    budget = None if fixed is not None else t + self.gap[j] - start
                    amounts[:, s] = self._take(s, pos, budget, fixed)
                    # the rate model beside the compute left before the next link user, idle after it
                    cost = slice_durations(self._cost(pos, amounts[:, s], self.idle, self.chunk),
                                           self._cost(pos, amounts[:, s], self.busy, self.chunk), 0.0,
                                           np.maximum(t + self.gap[j] - start, 0.0))
                    pos = pos + amounts[:, s]
                    link = np.where(cost > 0, start + cost, link)
                t = self._compute(t, self.attn_bwd[j], link)
        return {"step_s": fwd + end, "fwd_s": fwd, "bwd_s": end, "amounts": amounts, **out}

    def predict(self, result: dict[str, np.ndarray], i: int = 0, method: str = "") -> StepPrediction:
        """Candidate ``i`` of a :meth:`run` result as a :class:`StepPrediction` (layers in block order)."""
        by_block = sorted(self.moe_of_slot, key=lambda s: int(s.split(":")[1]))
        fi = [self.moe_of_slot[s] for s in by_block]
        pairs = tuple(self.pairs[self.table_of[s]][int(result["pair"][i, f])] for s, f in zip(by_block, fi,
                                                                                             strict=True))
        return StepPrediction(
            schedule=self.spec.name, step_s=float(result["step_s"][i]), fwd_s=float(result["fwd_s"][i]),
            bwd_s=float(result["bwd_s"][i]), pairs=pairs,
            layer_fwd_s=tuple(float(result["fwd"][i, f]) for f in fi),
            layer_bwd_s=tuple(float(result["bwd"][i, f]) for f in fi),
            layer_gar_s=tuple(float(result["gar"][i, f]) for f in fi),
            slot_bytes=tuple((s, int(result["amounts"][i, k])) for k, s in enumerate(self.stream.slots)),
            method=method,
        )

    def fixed_plan(self, plan: GradientPlan) -> np.ndarray:
        """(1, n_slots) bytes per slot of ``plan`` (for :meth:`run`'s ``fixed``)."""
        row = np.zeros((1, len(self.stream.slots)))
        index = {s: k for k, s in enumerate(self.stream.slots)}
        for slot, n in plan.ranges:
            row[0, index[slot]] += n
        return row


# --- partitioning ----------------------------------------------------------------------------------------------
def default_plan(model: StepModel, layout: StreamLayout) -> GradientPlan:
    """What the trainer runs without ``--gar-plan`` (``fsmoe.train.trainer.build_grad_sync``): every range
    as soon as ready (dense slots only for tutel_improved; 30 MB chunks for lina), or nothing in backward."""
    spec = model.spec
    if not model.in_dense:
        return GradientPlan()
    allowed = (lambda s: True) if spec.gar_in_moe else (lambda s: s.startswith("dense:"))
    return greedy_plan(layout, allowed, chunk_bytes=spec.gar_chunk_bytes)


def partition(model: StepModel, *, seed: int = 0, maxiter: int = 40, popsize: int = 8) -> StepPrediction:
    """Adaptive gradient partitioning (§5): the best modelled step among no partition, step 1 (greedy,
    Eqs. 3–4) and step 2 (differential evolution over the MoE slots' extra budgets, Eq. 5; fixed
    ``seed``). ``method`` names the winner."""
    none = model.predict(model.run(fixed=np.zeros((1, len(model.stream.slots)))), method="none")
    if not model.in_dense:
        return none
    step1 = model.predict(model.run(tau=np.zeros((1, model.n_moe))), method="greedy (step 1)")
    best = min((none, step1), key=lambda p: p.step_s)
    if not model.in_moe or model.n_moe == 0 or step1.slot_bytes[-1][1] == 0:
        return best
    tau_max = model.busy.alpha_s * model.n_moe + model.busy.beta_s * model.stream.ck[-1]

    def objective(x_NP: np.ndarray) -> np.ndarray:
        return model.run(tau=np.atleast_2d(x_NP.T))["step_s"]

    res = differential_evolution(objective, [(0.0, tau_max)] * model.n_moe, seed=seed, maxiter=maxiter,
                                 popsize=popsize, polish=False, vectorized=True, updating="deferred",
                                 x0=np.zeros(model.n_moe), tol=1e-6)
    step2 = model.predict(model.run(tau=np.atleast_2d(res.x)), method="differential evolution (step 2)")
    return step2 if step2.step_s < best.step_s else best


def plan_text(plan: GradientPlan) -> str:
    """The plan in the form ``--gar-plan`` reads (:func:`fsmoe.parallel.grad_plan.parse_plan`): exact bytes
    per slot, e.g. ``moe:3=1048576B,dense:3=4096B``; ``after`` when nothing runs inside the backward."""
    return ",".join(f"{slot}={n}B" for slot, n in plan.ranges) or NO_PLAN


__all__ = ["StepModel", "StepPrediction", "StreamBytes", "default_plan", "partition", "plan_text", "rank_stream",
           "replica_sizes"]
