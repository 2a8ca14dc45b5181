"""The simulator's engine: the schedule IR played for many configured layers at once, and each schedule's
choice of degrees and Gradient-AllReduce placement for one generalized layer.

Legend (arrays over N configured layers): T tokens per rank, D model dim, H expert hidden, E experts,
C capacity, r pipeline degree, K degree pairs (r_fwd, r_bwd).

* :func:`play_batch` plays one task list of :mod:`fsmoe.schedule.schedules` (the runtime's own lists, via
  :func:`fsmoe.perf.model.pass_tasks` and :func:`~fsmoe.schedule.schedules.lanes_for`) with the runtime's
  semantics — compute in list order, each communication lane FIFO, a task starting when its lane is free
  and its dependencies are done — on arrays of durations: the same max-plus recurrence as
  :func:`fsmoe.perf.model.play`, once for all N layers. Collectives take their idle lines; where the costs
  also have *busy* lines (a profile of this machine: collectives measured beside compute) each one's
  overlap with compute is found by replaying, as :func:`fsmoe.perf.model.play_contended` does
  (:func:`contended_durations`). The paper's constants have no busy lines.
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

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fsmoe.config import ScheduleSpec
from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import (
    CONTENTION_PLAYS,
    CONTENTION_TOL,
    KIND_OP,
    MAX_SLOW_WEIGHT,
    RATE_KINDS,
    degree_pairs,
    model_slows,
    pass_tasks,
    slice_durations,
)
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


def chunk_durations(batch: LayerBatch, costs: Costs, r: int, pad: int, *, busy: bool = False) -> dict[str, Array]:
    """Per-chunk time of each operation (``a2a``, ``ag``, ``rs``, ``expert_fwd``, ``expert_bwd``) at degree
    ``r`` with C padded to a multiple of ``pad``, in the shapes of :class:`fsmoe.perf.model.LayerWork`;
    ``busy``: the collectives' lines measured beside compute (where the costs have them)."""
    ecd = (batch.experts * batch.padded(pad) * batch.d_model).astype(float)
    n_a2a = ecd * FP32_BYTES if batch.ep > 1 else np.zeros_like(ecd)
    n_ag = batch.esp * ecd * FP32_BYTES if batch.esp > 1 else np.zeros_like(ecd)
    n_exp = batch.gemms * ecd * batch.d_hidden
    return {"a2a": _chunk(costs.op("a2a", busy=busy), n_a2a, r), "ag": _chunk(costs.op("ag", busy=busy), n_ag, r),
            "rs": _chunk(costs.op("rs", busy=busy), n_ag, r),
            "expert_fwd": _chunk(costs.op("expert_fwd"), n_exp, r, batch.gemms.astype(float)),
            "expert_bwd": _chunk(costs.op("expert_bwd"), n_exp, r, batch.gemms.astype(float))}


Spans = dict[tuple[str, int], tuple[Array, Array]]


def play_spans(tasks: Sequence[Task], lanes: Mapping[str, str],
               durations: Mapping[tuple[str, int], Array | float]) -> Spans:
    """(start, end) of every task for every layer, as the runtime runs them: compute in list order, each
    communication lane FIFO, start = max(lane free, ends of deps) — :func:`fsmoe.perf.model.play` on arrays."""
    free: dict[str, Array | float] = {}
    spans: Spans = {}
    for t in tasks:
        lane = "compute" if t.channel == "compute" else lanes[t.channel]
        start = free.get(lane, 0.0)
        for d in t.deps:
            start = np.maximum(start, spans[d][1])
        stop = start + durations[t.key]
        free[lane] = stop
        spans[t.key] = (np.asarray(start, dtype=float), np.asarray(stop, dtype=float))
    return spans


def makespan(spans: Spans) -> Array:
    return np.asarray(functools.reduce(np.maximum, (e for _, e in spans.values()), 0.0), dtype=float)


def contended(lo: Array, hi: Array, d: Array, covered: Array, inside: Array) -> Array:
    """:func:`fsmoe.perf.model.contended_duration` on arrays: the duration x = lo + (overlap(x)/x)·(hi − lo)
    of a collective that lasted ``d`` with ``covered`` seconds beside compute, its overlap extended linearly
    from its current end (slope 1 when the end lies ``inside`` a compute task), within [lo, hi]."""
    k = hi - lo
    m = inside.astype(float)
    b, c = lo + k * m, k * (covered - m * d)
    disc = b * b + 4 * c
    safe_d = np.where(d > 0, d, 1.0)
    x = np.where(disc >= 0, (b + np.sqrt(np.maximum(disc, 0.0))) / 2, lo + covered / safe_d * k)
    return np.where((k <= 0) | (d <= 0), lo, np.clip(x, lo, np.maximum(hi, lo)))


def rate(lo: Array, hi: Array, d: Array, covered: Array, room: Array) -> Array:
    """:func:`fsmoe.perf.model.rate_duration` on arrays: a collective progressing at lo/hi of its speed
    beside compute, ``room`` the compute left after its current end in the task around it (0: outside)."""
    w = 1.0 - lo / np.where(hi > 0, hi, 1.0)
    stays = (lo + w * (covered - d)) / np.maximum(1.0 - w, 1e-12)
    x = np.where(room > 0, np.where(stays > d + room, lo + w * (covered + room), stays), lo + w * covered)
    return np.where((hi <= lo) | (d <= 0) | (lo <= 0), lo, np.clip(x, lo, np.maximum(hi, lo)))


def slowed(lo: Array, d: Array, covered: Array, weight: Array) -> Array:
    """:func:`fsmoe.perf.model.slowed_duration` on arrays: a compute task (``lo`` alone) that lasted ``d``
    with ``covered`` weighted seconds of communication beside it and ``weight`` at its end."""
    w = np.minimum(weight, MAX_SLOW_WEIGHT)
    return np.maximum((lo + covered - w * d) / (1.0 - w), lo)


def contended_durations(tasks: Sequence[Task], lanes: Mapping[str, str], op_s: Mapping[str, Array],
                        gar_s: Array | float = 0.0, busy_s: Mapping[str, Array] | None = None,
                        gar_busy_s: Array | float | None = None,
                        slows: Mapping[str, float] | None = None) -> dict[tuple[str, int], Array | float]:
    """Every task's duration per layer: the task kind's operation in ``op_s`` (:data:`fsmoe.perf.model.KIND_OP`;
    ``gar`` takes ``gar_s``). With ``busy_s`` (the collectives beside compute) each communication task's is then
    found as :func:`fsmoe.perf.model.play_contended` finds it: after each play it takes :func:`contended` against
    that play's compute spans (``gar``: :func:`rate`), replayed until no duration of a layer moves by more than
    ``CONTENTION_TOL`` of its makespan, at most ``CONTENTION_PLAYS`` plays; a layer that has settled keeps its
    durations, so each row is played exactly as alone. ``gar`` is contended too when ``gar_busy_s`` is given
    (``gar_s`` then is its idle time), as ``play_pass(t_gar=, t_gar_idle=)`` does. With ``slows`` (σ per collective,
    ``Costs.beside``) compute tasks slow beside the collectives as there (:func:`slowed`; the weights' sum is capped
    at the task's end and over its span, where the evaluator caps it segment by segment: the same while the sum
    stays below ``MAX_SLOW_WEIGHT``)."""
    durations: dict[tuple[str, int], Array | float] = {
        t.key: (gar_s if t.kind == "gar" else op_s[KIND_OP[t.kind][0]]) for t in tasks}
    weight = {t.key: 1.0 - 1.0 / (slows or {}).get("gar" if t.kind == "gar" else KIND_OP[t.kind][0], 1.0)
              for t in tasks if t.channel != "compute"}
    weight = {k: w for k, w in weight.items() if w > 0}
    if busy_s is None and not weight:
        return durations
    lo = dict(durations)
    comm = [t for t in tasks if t.channel != "compute" and (t.kind != "gar" or gar_busy_s is not None)]
    comm = comm if busy_s is not None else []
    computes = [t for t in tasks if t.channel == "compute"] if weight else []

    def busy_of(t: Task) -> Array:
        assert busy_s is not None
        return np.asarray(gar_busy_s if t.kind == "gar" else busy_s[KIND_OP[t.kind][0]], dtype=float)

    spans = play_spans(tasks, lanes, durations)
    active: Array | bool = True
    for _ in range(CONTENTION_PLAYS - 1):
        compute = [spans[t.key] for t in tasks if t.channel == "compute"]
        new = dict(durations)
        moved: Array | float = 0.0
        for t in comm:
            s, e = spans[t.key]
            covered = sum((np.maximum(0.0, np.minimum(e, ce) - np.maximum(s, cs)) for cs, ce in compute),
                          np.zeros_like(s))
            inside = functools.reduce(np.logical_or, ((cs < e) & (e < ce) for cs, ce in compute),
                                      np.zeros_like(s, dtype=bool))
            if t.kind in RATE_KINDS:
                room = sum((np.where((cs < e) & (e < ce), ce - e, 0.0) for cs, ce in compute), np.zeros_like(s))
                new[t.key] = rate(np.asarray(lo[t.key], dtype=float), busy_of(t), e - s, covered, room)
            else:
                new[t.key] = contended(np.asarray(lo[t.key], dtype=float), busy_of(t), e - s, covered, inside)
            moved = np.maximum(moved, np.abs(new[t.key] - durations[t.key]))
        for t in computes:
            s, e = spans[t.key]
            covered, at = np.zeros_like(s), np.zeros_like(s)
            for key, w in weight.items():
                ws, we = spans[key]
                covered = covered + w * np.maximum(0.0, np.minimum(e, we) - np.maximum(s, ws))
                at = at + w * ((ws <= e) & (e < we))
            covered = np.minimum(covered, MAX_SLOW_WEIGHT * (e - s))
            new[t.key] = slowed(np.asarray(lo[t.key], dtype=float), e - s, covered, at)
            moved = np.maximum(moved, np.abs(new[t.key] - durations[t.key]))
        active = active & (moved > CONTENTION_TOL * makespan(spans))
        if not np.any(active):
            break
        durations = {k: np.where(active, new[k], durations[k]) for k in durations}
        spans = play_spans(tasks, lanes, durations)
    return durations


def play_batch(tasks: Sequence[Task], lanes: Mapping[str, str], op_s: Mapping[str, Array],
               gar_s: Array | float = 0.0, busy_s: Mapping[str, Array] | None = None,
               slows: Mapping[str, float] | None = None) -> Array:
    """The makespan of ``tasks`` for every layer with :func:`contended_durations` (without ``busy_s``: the
    idle lines, :func:`fsmoe.perf.model.play`; with it: :func:`fsmoe.perf.model.play_contended`)."""
    return makespan(play_spans(tasks, lanes, contended_durations(tasks, lanes, op_s, gar_s, busy_s, slows=slows)))


@dataclass(kw_only=True, frozen=True, eq=False)
class LayerTables:
    """One schedule's MoE block at each degree pair (rows K, columns N): forward makespan ``F``, backward
    A (no GAR slice) and B (through it, less its length; −∞ without a slot), and the summed task time of
    each operation over both passes (``busy``: ``a2a``, ``ag``, ``rs``, ``expert``). Where the GAR slows
    compute (σ > 1), ``W``, ``LEAD`` and ``COVER`` are :class:`~fsmoe.perf.model.GarResponse`'s ``slow``,
    ``lead_s`` and ``cover_s``: the backward with a slice of t is max(A + W·min(max(t − LEAD, 0), COVER),
    B + t) (:meth:`backward`); ``OVERLAP`` its ``overlap_s``, the compute a slice has beside it
    (:meth:`slices`)."""

    pairs: tuple[tuple[int, int], ...]
    F: Array
    A: Array
    B: Array
    busy: dict[str, Array] = field(default_factory=dict)
    W: float = 0.0
    LEAD: Array | float = 0.0
    COVER: Array | float = 0.0
    OVERLAP: Array | float = 0.0

    def backward(self, t_gar: Array) -> Array:
        """(K, N) backward blocks with a GAR slice of ``t_gar`` seconds in the slot: (N,), or (K, N) a
        slice per pair."""
        t = t_gar if t_gar.ndim == 2 else t_gar[None, :]
        grown = self.A + self.W * np.minimum(np.maximum(t - self.LEAD, 0.0), self.COVER)
        return np.maximum(grown, self.B + t)

    def slices(self, t_idle: Array, t_busy: Array) -> Array:
        """(K, N) durations of a slice of ``t_idle`` (N,) alone and ``t_busy`` beside compute all along, in
        each pair's slot: :meth:`~fsmoe.perf.model.GarResponse.slice_s` (``OVERLAP``: its ``overlap_s``)."""
        out = slice_durations(t_idle[None, :], t_busy[None, :], np.asarray(self.LEAD), np.asarray(self.OVERLAP))
        return np.broadcast_to(out, np.broadcast_shapes(out.shape, self.A.shape))


def layer_tables(spec: ScheduleSpec, batch: LayerBatch, costs: Costs, *, pairs: Sequence[tuple[int, int]] | None = None,
                 cache: dict | None = None) -> LayerTables:
    """Play ``spec``'s lists at every pair (default :func:`~fsmoe.perf.model.degree_pairs` up to 8); plays
    are cached in ``cache`` by (lanes, r, padding, pass) so schedules with the same lists share them."""
    pairs = tuple(degree_pairs(spec, MAX_DEGREE) if pairs is None else pairs)
    cache = {} if cache is None else cache
    lanes = lanes_for(spec)
    slows = model_slows(costs) or None
    sigma = slows.get("gar", 1.0) if slows else 1.0
    F, A, B, LEAD, COVER, OVERLAP = [], [], [], [], [], []
    busy: dict[str, list[Array]] = {"a2a": [], "ag": [], "rs": [], "expert": []}
    none = np.zeros(len(batch))
    for rf, rb in pairs:
        pad = math.lcm(rf, rb)
        out = []
        for r, backward in ((rf, False), (rb, True)):
            key = (spec.separate_channels, r, pad, backward, backward and spec.gar_in_moe)
            if key not in cache:
                op_s = chunk_durations(batch, costs, r, pad)
                busy_s = chunk_durations(batch, costs, r, pad, busy=True) if costs.busy else None
                tasks = pass_tasks(spec, r, backward=backward)
                durations = contended_durations(tasks, lanes, op_s, busy_s=busy_s, slows=slows)
                spans = play_spans(tasks, lanes, durations)
                base = makespan(spans)
                b, lead, cover, after = np.full(len(batch), -np.inf), none, none, none
                if key[-1]:
                    big = 2.0 * base + 1.0
                    with_gar = pass_tasks(spec, r, backward=True, with_gar=True)
                    through = play_spans(with_gar, lanes, contended_durations(with_gar, lanes, op_s, big, busy_s,
                                                                              slows=slows))
                    b = makespan(through) - big
                    # GarResponse's lead, cover and beside (fsmoe.perf.model.gar_response)
                    g = through[("gar", 0)][0]
                    later = [(s, e) for t in tasks if t.channel == "compute" for s, e in [spans[t.key]]]
                    first = functools.reduce(np.minimum, (np.where(e > g, s, np.inf) for s, e in later),
                                             np.full(len(batch), np.inf))
                    lead = np.where(np.isfinite(first), np.maximum(first - g, 0.0), 0.0)
                    after = sum((np.where(e > g, e - np.maximum(s, g), 0.0) for s, e in later), none)
                    cover = sigma * after if sigma > 1.0 else none
                summed: dict[str, Array] = {}
                for t in tasks:
                    op = KIND_OP[t.kind][0]
                    summed[op] = summed.get(op, 0.0) + durations[t.key]
                cache[key] = (base, b, summed, lead, cover, after)
            out.append(cache[key])
        (f, _, of, _, _, _), (a, b, ob, lead, cover, after) = out
        F.append(f)
        A.append(a)
        B.append(b)
        LEAD.append(lead)
        COVER.append(cover)
        OVERLAP.append(cover if sigma > 1.0 else after)
        for kind, ops in (("a2a", ("a2a",)), ("ag", ("ag",)), ("rs", ("rs",)),
                          ("expert", ("expert_fwd", "expert_bwd"))):
            busy[kind].append(sum((d.get(op, 0.0) for d in (of, ob) for op in ops), np.zeros(len(batch))))
    return LayerTables(pairs=pairs, F=np.array(F), A=np.array(A), B=np.array(B),
                       busy={k: np.array(v) for k, v in busy.items()}, W=1.0 - 1.0 / sigma, LEAD=np.array(LEAD),
                       COVER=np.array(COVER), OVERLAP=np.array(OVERLAP))


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
    """``spec``'s generalized layer with ``grad_bytes`` to all-reduce in its backward (module docstring). A
    slice in the MoE block's slot overlaps the experts: at each pair its rate-model duration beside that
    pair's compute, between the GAR's idle and busy lines (:meth:`LayerTables.slices`, as the planner;
    idle where the costs have no busy line, as the paper's presets); beside the dense backward and
    exposed, the idle line. Where
    the GAR slows compute (σ > 1), the slot's slice slows the block as :meth:`LayerTables.backward` says
    and the dense part's slice its dense backward by (1 − 1/σ)·min(t, σ·dense), as the planner's step
    model does."""
    line = costs.op("gar")
    slot = costs.op("gar", busy=True)
    sigma = costs.slows("gar")
    n = np.asarray(grad_bytes, dtype=float)
    N = len(n)
    cols = np.arange(N)
    F = tables.F
    full = gar_time(line, n)
    zero = np.zeros(N)

    def beside_dense(t: Array) -> Array:  # how much longer the dense backward runs beside a slice of t
        return (1.0 - 1.0 / sigma) * np.minimum(t, sigma * dense.bwd_s)

    if spec.independent_degrees:  # fsmoe, fsmoe_no_iio: split x bytes into the MoE slot, the rest dense

        def inv(line: Linear, t: Array) -> Array:  # the bytes that take t seconds (the paper's g_grad^inv)
            return np.maximum(t - line.alpha_s, 0.0) / line.beta_s if line.beta_s > 0 else np.zeros_like(t)

        A, B = tables.A, tables.B
        cands = [zero, n, n - inv(line, dense.bwd_s)] + [inv(slot, A[k] - B[k]) for k in range(len(tables.pairs))]
        best_t = np.full(N, np.inf)
        k, t_in, t_dense, exposed, slowed = np.zeros(N, dtype=int), zero, zero, zero, zero
        for x in cands:
            x = np.clip(np.nan_to_num(x, nan=0.0, posinf=0.0), 0.0, n)
            slices, x_dense = tables.slices(gar_time(line, x), gar_time(slot, x)), gar_time(line, n - x)
            tot = F + tables.backward(slices)  # (K, N)
            kx = np.argmin(tot, axis=0)
            x_in = slices[kx, cols]
            x_slowed = beside_dense(x_dense)
            x_exposed = np.maximum(x_dense - dense.bwd_s - x_slowed, 0.0)
            step = tot[kx, cols] + x_slowed + x_exposed
            better = step < best_t * (1 - 1e-12)  # first candidate on ties: nothing in the MoE slot
            best_t = np.where(better, step, best_t)
            k, t_in = np.where(better, kx, k), np.where(better, x_in, t_in)
            t_dense, exposed = np.where(better, x_dense, t_dense), np.where(better, x_exposed, exposed)
            slowed = np.where(better, x_slowed, slowed)
        block_b = tables.backward(t_in)[k, cols]
    elif spec.gar_in_moe:  # lina: everything in the MoE backward, in fixed chunks
        slices = tables.slices(gar_time(line, n, spec.gar_chunk_bytes), gar_time(slot, n, spec.gar_chunk_bytes))
        tot = F + tables.backward(slices)
        k = np.argmin(tot, axis=0)
        t_in = slices[k, cols]
        block_b = tables.backward(slices)[k, cols]
        t_dense, exposed, slowed = zero, zero, zero
    else:
        t_in = zero
        k = np.argmin(F + tables.A, axis=0)
        block_b = tables.A[k, cols]
        if spec.gar_overlap_dense:
            t_dense, slowed = full, beside_dense(full)
            exposed = np.maximum(full - dense.bwd_s - slowed, 0.0)
        else:
            t_dense, exposed, slowed = zero, full, zero
    return LayerResult(schedule=spec.name, pairs=tables.pairs, pair=k, fwd_s=F[k, cols] + dense.fwd_s,
                       bwd_s=block_b + dense.bwd_s + slowed + exposed, gar_moe_s=t_in, gar_dense_s=t_dense,
                       gar_exposed_s=exposed)


__all__ = ["DenseTimes", "LayerBatch", "LayerResult", "LayerTables", "MAX_DEGREE", "capacity", "chunk_durations",
           "dense_times", "gar_time", "layer_tables", "play_batch", "schedule_layer"]
