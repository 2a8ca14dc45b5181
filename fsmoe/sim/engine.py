"""The simulator's engine: the schedule IR played for many configured layers at once, and each schedule's
choice of degrees and Gradient-AllReduce placement for one generalized layer.

Legend (arrays over N configured layers): T tokens per rank, D model dim, H expert hidden, E experts,
C capacity, r pipeline degree, K degree pairs (r_fwd, r_bwd).

* :func:`play_batch` plays one task list of :mod:`fsmoe.schedule.schedules` (the runtime's own lists, via
  :func:`fsmoe.perf.model.pass_tasks` and :func:`~fsmoe.schedule.schedules.lanes_for`) with the runtime's
  semantics — compute in list order, each communication lane FIFO, a task starting when its lane is free
  and its dependencies are done — on arrays of durations: the same max-plus recurrence as
  :func:`fsmoe.perf.model.play`, once for all N layers. Collectives take their *idle* lines (contention is
  not modelled: the paper's constants have no busy lines).
* :func:`layer_tables` plays forward and backward of every degree pair (C padded to lcm(r_fwd, r_bwd)),
  backward as a :class:`~fsmoe.perf.model.GarResponse` (A without the GAR slice, B through it), sharing
  plays between schedules with the same lists.
* :func:`schedule_layer` is one schedule's generalized layer (MoE block + gate + dense attention with its
  MP collectives) given n_gar bytes of gradient to all-reduce during its backward (a deep model's steady
  state: the gradient of the layer above, digest §5.2 Eq. 3):

  sequential / tutel   GAR after the backward, exposed;                    r_fwd = r_bwd (sequential: 1)
  tutel_improved       GAR beside the dense backward, the rest exposed;     r_fwd = r_bwd
  lina                 all of it in the MoE backward in 30 MB chunks;       r_fwd = r_bwd
  fsmoe_no_iio, fsmoe  x bytes in the MoE backward's slot, n − x beside the dense backward, the best x and
                       pair (r_fwd, r_bwd): step time is piecewise linear in x, minimised exactly over its
                       convex breakpoints (each pair's window A − B, the dense window, 0 and n).

Units: seconds, bytes, MACs. The ``costs`` here have expert α per GEMM (``Cluster.costs``); the engine
multiplies it by each layer's GEMM count. Dense lines are per MAC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fsmoe.config import ScheduleSpec
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import KIND_OP, degree_pairs, pass_tasks
from fsmoe.schedule.ir import Task
from fsmoe.schedule.schedules import lanes_for
from fsmoe.sim.presets import FP32_BYTES, Layout

MAX_DEGREE = 8
Array = np.ndarray


# --- the configured layers -------------------------------------------------------------------------------------
def capacity(tokens: Array, experts: Array, top_k: int, factor: Sequence[float | None]) -> Array:
    """C = ceil(k·f·T/E) in exact integer arithmetic (f to 1/1000), clamped to [1, T] as
    :func:`fsmoe.moe.gates.capacity_for`; f None (no drop): the balanced load ceil(k·T/E)."""
    f1000 = np.array([1000 if f is None else round(f * 1000) for f in factor], dtype=np.int64)
    num = top_k * f1000 * tokens.astype(np.int64)
    c = -(-num // (1000 * experts.astype(np.int64)))
    return np.clip(c, 1, tokens)


@dataclass(kw_only=True, frozen=True, eq=False)
class LayerBatch:
    """N generalized layers on one cluster layout (ep, esp, mp shared): per layer T = ``tokens`` per rank,
    ``seq_tokens`` = B·L (an MP group's gathered sequence), ``seq_len`` L, D, H, E, ``gemms``, the gate's
    C (``capacity_gate``), the dense ``grad_bytes`` one layer all-reduces, and ``kv_ratio`` (KV heads /
    heads; 1 for multi-head attention)."""

    tokens: Array
    seq_tokens: Array
    seq_len: Array
    d_model: Array
    d_hidden: Array
    experts: Array
    gemms: Array
    capacity_gate: Array
    grad_bytes: Array
    kv_ratio: Array
    ep: int
    esp: int
    mp: int

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, multiple: int) -> Array:
        """C rounded up to a multiple of lcm(r_fwd, r_bwd), as the pipelined block pads it."""
        return -(-self.capacity_gate // multiple) * multiple

    def with_grad(self, grad_bytes: Array) -> LayerBatch:
        """The same layers, repeated to ``len(grad_bytes)`` rows when there is one, with these gradients."""
        g = np.asarray(grad_bytes, dtype=float)
        rows = {k: (np.repeat(v, len(g)) if len(self) == 1 else v) for k, v in self.__dict__.items()
                if isinstance(v, np.ndarray)}
        return LayerBatch(**{**self.__dict__, **rows, "grad_bytes": g})

    @classmethod
    def of_layout(cls, layout: Layout) -> LayerBatch:
        """One row: a layer of ``layout.model`` on its cluster."""
        m = layout.model
        T = np.array([layout.tokens])
        E = np.array([layout.experts])
        return cls(tokens=T, seq_tokens=np.array([m.batch * m.seq_len]), seq_len=np.array([m.seq_len]),
                   d_model=np.array([m.d_model]), d_hidden=np.array([m.d_hidden]), experts=E,
                   gemms=np.array([m.gemms]), capacity_gate=capacity(T, E, m.top_k, [m.capacity_factor]),
                   grad_bytes=np.array([m.dense_grad_elems(layout.mp) * FP32_BYTES]),
                   kv_ratio=np.array([m.n_kv_heads / m.n_heads]), ep=layout.ep, esp=layout.esp, mp=layout.mp)


# --- durations and the player ----------------------------------------------------------------------------------
def _chunk(line: Linear, n: Array, r: int, alpha_scale: Array | float = 1.0) -> Array:
    """Eq. 1 per layer: α + β·n/r, 0 where n = 0 (a size-1 group runs no collective)."""
    return np.where(n > 0, line.alpha_s * alpha_scale + line.beta_s * n / r, 0.0)


def chunk_durations(batch: LayerBatch, costs: Costs, r: int, pad: int) -> dict[str, Array]:
    """Per-chunk time of each operation (``a2a``, ``ag``, ``rs``, ``expert_fwd``, ``expert_bwd``) at degree
    ``r`` with C padded to a multiple of ``pad``, in the shapes of :class:`fsmoe.perf.model.LayerWork`."""
    ecd = (batch.experts * batch.padded(pad) * batch.d_model).astype(float)
    n_a2a = ecd * FP32_BYTES if batch.ep > 1 else np.zeros_like(ecd)
    n_ag = batch.esp * ecd * FP32_BYTES if batch.esp > 1 else np.zeros_like(ecd)
    n_exp = batch.gemms * ecd * batch.d_hidden
    return {"a2a": _chunk(costs.op("a2a"), n_a2a, r), "ag": _chunk(costs.op("ag"), n_ag, r),
            "rs": _chunk(costs.op("rs"), n_ag, r),
            "expert_fwd": _chunk(costs.op("expert_fwd"), n_exp, r, batch.gemms.astype(float)),
            "expert_bwd": _chunk(costs.op("expert_bwd"), n_exp, r, batch.gemms.astype(float))}


def play_batch(tasks: Sequence[Task], lanes: Mapping[str, str], op_s: Mapping[str, Array],
               gar_s: Array | float = 0.0) -> Array:
    """The makespan of ``tasks`` for every layer: start = max(lane free, ends of deps), end = start +
    duration (the task kind's operation in ``op_s``, :data:`fsmoe.perf.model.KIND_OP`; ``gar`` takes
    ``gar_s``) — :func:`fsmoe.perf.model.play` on arrays."""
    free: dict[str, Array | float] = {}
    end: dict[tuple[str, int], Array | float] = {}
    span: Array | float = 0.0
    for t in tasks:
        lane = "compute" if t.channel == "compute" else lanes[t.channel]
        start = free.get(lane, 0.0)
        for d in t.deps:
            start = np.maximum(start, end[d])
        stop = start + (gar_s if t.kind == "gar" else op_s[KIND_OP[t.kind][0]])
        free[lane] = end[t.key] = stop
        span = np.maximum(span, stop)
    return np.asarray(span, dtype=float)


@dataclass(kw_only=True, frozen=True, eq=False)
class LayerTables:
    """One schedule's MoE block at each degree pair (rows K, columns N): forward makespan ``F``, backward
    A (no GAR slice) and B (through it, less its length; −∞ without a slot), and the summed task time of
    each operation over both passes (``busy``: ``a2a``, ``ag``, ``rs``, ``expert``)."""

    pairs: tuple[tuple[int, int], ...]
    F: Array
    A: Array
    B: Array
    busy: dict[str, Array] = field(default_factory=dict)


def layer_tables(spec: ScheduleSpec, batch: LayerBatch, costs: Costs, *, pairs: Sequence[tuple[int, int]] | None = None,
                 cache: dict | None = None) -> LayerTables:
    """Play ``spec``'s lists at every pair (default :func:`~fsmoe.perf.model.degree_pairs` up to 8); plays
    are cached in ``cache`` by (lanes, r, padding, pass) so schedules with the same lists share them."""
    pairs = tuple(degree_pairs(spec, MAX_DEGREE) if pairs is None else pairs)
    cache = {} if cache is None else cache
    lanes = lanes_for(spec)
    F, A, B = [], [], []
    busy: dict[str, list[Array]] = {"a2a": [], "ag": [], "rs": [], "expert": []}
    for rf, rb in pairs:
        pad = math.lcm(rf, rb)
        out = []
        for r, backward in ((rf, False), (rb, True)):
            key = (spec.separate_channels, r, pad, backward, backward and spec.gar_in_moe)
            if key not in cache:
                op_s = chunk_durations(batch, costs, r, pad)
                base = play_batch(pass_tasks(spec, r, backward=backward), lanes, op_s)
                b = np.full(len(batch), -np.inf)
                if key[-1]:
                    big = 2.0 * base + 1.0
                    b = play_batch(pass_tasks(spec, r, backward=True, with_gar=True), lanes, op_s, big) - big
                cache[key] = (base, b, op_s)
            out.append(cache[key])
        (f, _, of), (a, b, ob) = out
        F.append(f)
        A.append(a)
        B.append(b)
        busy["a2a"].append(2 * rf * of["a2a"] + 2 * rb * ob["a2a"])
        busy["ag"].append(rf * of["ag"] + rb * ob["ag"])
        busy["rs"].append(rf * of["rs"] + rb * ob["rs"])
        busy["expert"].append(rf * of["expert_fwd"] + rb * ob["expert_bwd"])
    return LayerTables(pairs=pairs, F=np.array(F), A=np.array(A), B=np.array(B),
                       busy={k: np.array(v) for k, v in busy.items()})


# --- the dense part ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, eq=False)
class DenseTimes:
    """The dense part of each generalized layer: attention forward/backward, its MP AllGather and
    ReduceScatter (sequence parallelism: gathered size B·L·D·4 bytes, each pass runs one of each), the gate
    (+ Order/I-Order)."""

    attn_fwd: Array
    attn_bwd: Array
    mp_comm: Array  # one pass's AG + RS
    gate_fwd: Array
    gate_bwd: Array

    @property
    def fwd_s(self) -> Array:
        return self.attn_fwd + self.mp_comm + self.gate_fwd

    @property
    def bwd_s(self) -> Array:
        """The dense backward, also the window beside which a Gradient-AllReduce can run."""
        return self.attn_bwd + self.mp_comm + self.gate_bwd


def dense_times(batch: LayerBatch, costs: Costs) -> DenseTimes:
    """Attention MACs per rank: Q, K, V (1 + 2·kv_ratio)·S·D² and the projection S·D² over the MP shard,
    scores and values 2·B·L²·D/mp (S = B·L, one GEMM launch each of 4); the gate one GEMM of T·D·E."""
    S, D = batch.seq_tokens.astype(float), batch.d_model.astype(float)
    macs = ((2 + 2 * batch.kv_ratio) * S * D * D + 2 * S * batch.seq_len * D) / batch.mp
    f, b = costs.op("dense_fwd"), costs.op("dense_bwd")
    n_mp = S * D * FP32_BYTES if batch.mp > 1 else np.zeros_like(S)
    mp_comm = _chunk(costs.op("ag"), n_mp, 1) + _chunk(costs.op("rs"), n_mp, 1)
    n_gate = batch.tokens * D * batch.experts
    return DenseTimes(attn_fwd=4 * f.alpha_s + f.beta_s * macs, attn_bwd=4 * b.alpha_s + b.beta_s * macs,
                      mp_comm=mp_comm, gate_fwd=costs.op("gate_fwd")(n_gate), gate_bwd=costs.op("gate_bwd")(n_gate))


# --- one schedule's generalized layer ---------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, eq=False)
class LayerResult:
    """One schedule over N generalized layers: forward, backward (exposed GAR included), the chosen pair
    (index into ``pairs``), the GAR time inside the MoE block, beside the dense backward, and exposed."""

    schedule: str
    pairs: tuple[tuple[int, int], ...]
    pair: Array
    fwd_s: Array
    bwd_s: Array
    gar_moe_s: Array
    gar_dense_s: Array
    gar_exposed_s: Array

    @property
    def total_s(self) -> Array:
        return self.fwd_s + self.bwd_s

    @property
    def r_fwd(self) -> Array:
        return np.array([p[0] for p in self.pairs])[self.pair]

    @property
    def r_bwd(self) -> Array:
        return np.array([p[1] for p in self.pairs])[self.pair]


def gar_time(line: Linear, n: Array, chunk: int | None = None) -> Array:
    """α per range (per ``chunk`` bytes, Lina) + β·n; 0 for nothing."""
    pieces = np.ceil(n / chunk) if chunk else 1.0
    return np.where(n > 0, line.alpha_s * pieces + line.beta_s * n, 0.0)


def schedule_layer(spec: ScheduleSpec, tables: LayerTables, dense: DenseTimes, grad_bytes: Array,
                   costs: Costs) -> LayerResult:
    """``spec``'s generalized layer with ``grad_bytes`` to all-reduce in its backward (module docstring)."""
    line = costs.op("gar")
    n = np.asarray(grad_bytes, dtype=float)
    N = len(n)
    cols = np.arange(N)
    F, A, B = tables.F, tables.A, tables.B
    full = gar_time(line, n)
    zero = np.zeros(N)
    if spec.independent_degrees:  # fsmoe, fsmoe_no_iio: split x bytes into the MoE slot, the rest dense

        def inv(t: Array) -> Array:  # the bytes that take t seconds (the paper's g_grad^inv)
            return np.maximum(t - line.alpha_s, 0.0) / line.beta_s if line.beta_s > 0 else np.zeros_like(t)

        cands = [zero, n, n - inv(dense.bwd_s)] + [inv(A[k] - B[k]) for k in range(len(tables.pairs))]
        best_t = np.full(N, np.inf)
        k, t_in, t_dense, exposed = np.zeros(N, dtype=int), zero, zero, zero
        for x in cands:
            x = np.clip(np.nan_to_num(x, nan=0.0, posinf=0.0), 0.0, n)
            x_in, x_dense = gar_time(line, x), gar_time(line, n - x)
            tot = F + np.maximum(A, B + x_in[None, :])  # (K, N)
            kx = np.argmin(tot, axis=0)
            x_exposed = np.maximum(x_dense - dense.bwd_s, 0.0)
            step = tot[kx, cols] + x_exposed
            better = step < best_t * (1 - 1e-12)  # first candidate on ties: nothing in the MoE slot
            best_t = np.where(better, step, best_t)
            k, t_in = np.where(better, kx, k), np.where(better, x_in, t_in)
            t_dense, exposed = np.where(better, x_dense, t_dense), np.where(better, x_exposed, exposed)
        block_b = np.maximum(A[k, cols], B[k, cols] + t_in)
    elif spec.gar_in_moe:  # lina: everything in the MoE backward, in fixed chunks
        t_in = gar_time(line, n, spec.gar_chunk_bytes)
        tot = F + np.maximum(A, B + t_in[None, :])
        k = np.argmin(tot, axis=0)
        block_b = np.maximum(A[k, cols], B[k, cols] + t_in)
        t_dense, exposed = zero, zero
    else:
        t_in = zero
        k = np.argmin(F + A, axis=0)
        block_b = A[k, cols]
        if spec.gar_overlap_dense:
            t_dense, exposed = full, np.maximum(full - dense.bwd_s, 0.0)
        else:
            t_dense, exposed = zero, full
    return LayerResult(schedule=spec.name, pairs=tables.pairs, pair=k, fwd_s=F[k, cols] + dense.fwd_s,
                       bwd_s=block_b + dense.bwd_s + exposed, gar_moe_s=t_in, gar_dense_s=t_dense,
                       gar_exposed_s=exposed)


__all__ = ["DenseTimes", "LayerBatch", "LayerResult", "LayerTables", "MAX_DEGREE", "capacity", "chunk_durations",
           "dense_times", "gar_time", "layer_tables", "play_batch", "schedule_layer"]
