"""Performance models of the pipelined MoE block: workloads, the paper's closed forms, an exact evaluator.

Legend: T tokens per rank, D model dim (the paper's M), H expert hidden (full; a rank holds H/S),
E experts, e = E/W local experts, W = N_EP, S = N_ESP, K top-k, C capacity slots per expert,
R pipeline degree, F dense MLP hidden. Times in seconds; collective workloads n in bytes, GEMM
workloads in multiply-accumulates (MACs), as in :mod:`fsmoe.perf.costs`.

Three layers, each usable alone:

* :class:`LayerWork` — what one MoE layer moves and computes on one rank, with the exact shapes of
  :mod:`fsmoe.schedule.pipelined` and :mod:`fsmoe.parallel.dispatch` (see its docstring).
* The closed forms of paper §4 (digest §4.1–4.4): per-chunk times (Eq. 1, :meth:`PassModel.chunk`),
  predicates Q1–Q7 (:func:`predicates`), Cases 1–4 with their times (:func:`case_time`, Eq. 2), the
  case that holds (:func:`closed_form`) and the inter-node window each case leaves (:func:`window`,
  §5.2). Forward: t_gar = 0 and the ``expert_fwd`` line. Backward: the ``expert_bwd`` line at the same
  n — the measured backward *time* (≈ 2× forward: dgrad + wgrad), not the forward n doubled — and the
  layer's t_gar. No-IIO (one communication channel): AllGather and ReduceScatter serialise with the
  AlltoAll, folded into it (``PassModel.one_channel``).
* :func:`play` — an exact evaluator of the schedule IR (:mod:`fsmoe.schedule.schedules`) under the
  runtime's semantics (:mod:`fsmoe.schedule.runtime`): compute in list order, each communication lane
  FIFO in list order (one-channel schedules share one lane, :func:`~fsmoe.schedule.schedules.lanes_for`),
  a task starting when its lane is free and its dependencies are done. :func:`play_pass` feeds it the
  modelled durations of one pass of one layer.

Contention (:func:`play_contended`): a collective that overlaps expert compute on the same rank is
slower (on CPU ranks that share cores, 1.4–2.5×; :mod:`fsmoe.perf.profile` measures both lines — idle,
and *busy*: fully overlapped). How much of a task overlaps depends on the schedule and the degree, so the
evaluator finds it by playing: all collectives at their idle lines first; then each communication task
of each chunk gets t = t_idle + f·(t_busy − t_idle), f the share of its span that overlaps a compute task
of the same rank in the last play; replayed until no duration moves by more than
:data:`CONTENTION_TOL` of the makespan, at most :data:`CONTENTION_PLAYS` plays. With r = 1 no chunk's
collective overlaps (f = 0: the idle lines); the pipeline's fill (chunk 0's first-half
collectives) and drain (chunk r−1's second half) come out idle, the steady state busy. Convergence: each
duration stays in [t_idle, t_busy]. Plain iteration of d ↦ t_idle + f(d)·(t_busy − t_idle) oscillates
(a collective that sticks out of compute overlaps a smaller share the longer it gets), so each update
solves that equation for the task against the last play's compute spans, with its overlap extended
linearly from its current end (:func:`contended_duration`): exact while the end stays on the same piece
(inside a compute task, or past it), so the durations settle once the tasks' ends stop crossing compute
edges — and the compute tasks move only through dependencies. The cap keeps the planner's cost bounded
(then the last play is kept; ``Timeline.plays`` says how many ran). The closed forms describe the
pipelined steady state and take the busy lines (:meth:`PassModel.of`, ``busy=True``; fill and drain
included); where busy = idle the evaluator and the closed forms agree in each pure regime.

The profile derives t_busy from a partly overlapped measurement with a progress-rate model (the
collective runs at 1/κ of its speed while compute runs, :func:`fsmoe.perf.fit.slowdown`), not with the
interpolation above; the two agree at f = 0 and f = 1 only. Replaying the planner-accuracy profiles with
the rate model here instead (t = t_idle + (1 − 1/κ)·overlap) gave a larger median error (7% vs 6%,
signed −7% vs 0%): on the emulated 2-core cluster a collective often grows by more than the compute
beside it ran (κ at its cap), which only the interpolation can express. The Gradient-AllReduce slice is the
exception (:data:`RATE_KINDS`, :func:`rate_duration`): its busy line, measured beside a whole layer's GEMMs,
is usually κ = 10 × idle (the cap); interpolated toward it a 13 ms slice beside a 39 ms expert backward
became 133 ms (each replay stretching it by its own overlap), and the planner, which took the busy line for
the slice's duration, put the GAR inside the block in 1 of 14 configurations — while ``fsmoe r=1`` (slice
inside) measured 0.95–1.0× ``tutel r=1`` (after) in the median configuration of three planner-accuracy runs.
Under the rate model (here, and per degree pair in :meth:`GarResponse.slice_s`, which the planner and the
step model use) the slice progresses at 1/κ beside compute and at full speed after it. Replaying those three
runs: the model's median |error| 8.5%, 9.6%, 6.6% → 6.9%, 7.3%, 6.1%; the planner's degrees within 5% of the
best measured row in 8, 7, 8 of 12 configurations (6, 6, 8 before; geometric mean over the best 1.035,
1.028, 1.051 against 1.079, 1.045, 1.055).

Compute slows beside communication too (:attr:`fsmoe.perf.costs.Costs.beside`: σ per collective, 1.0–2.3×
on the emulated 2-core cluster, where a collective's copying and TCP work takes the GEMMs' cores). With
σ > 1 the plays also update each compute task, by the rate model: it runs at 1/σ of its speed while a
collective runs beside it (weights 1 − 1/σ add over lanes), solved against the last play's communication
spans with the same linear extension at its end (:func:`slowed_duration`). The models apply the
Gradient-AllReduce's σ only (:data:`SLOWING`): replaying two planner-accuracy runs (28 configurations),
slowing the experts beside the block's own chunked collectives as well raised the median error from
6.1–7.9% to 8.8–9.2% — their busy lines, fitted from the same samples, already carry the pipeline's
mutual slowdown — while the GAR's σ left it at 6.6–8.0%; and without it, overlapping the GAR with the
dense backward looked free on such ranks: the planner's partitions measured 5–17% slower than running
the GAR after the backward in ``fsmoe bench train``.

A Gradient-AllReduce slice inside the block (``gar``) takes the time the caller gives (``t_gar``); with
``t_gar_idle`` as well it is contended like the other collectives (``t_gar`` then is its busy time).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from fsmoe.config import JobConfig, ModelConfig, ScheduleSpec
from fsmoe.moe.gates import capacity_for, fit_capacity
from fsmoe.perf.costs import Costs, Linear
from fsmoe.schedule.ir import Task
from fsmoe.schedule.runtime import TraceEvent
from fsmoe.schedule.schedules import backward_tasks, forward_tasks, lanes_for

FP32_BYTES = 4
GEMMS = {"ffn": 2, "swiglu": 3}  # GEMMs of one expert (each E·C·D·H MACs per rank, see LayerWork)


# --- workloads -----------------------------------------------------------------------------------------------
def tokens_per_rank(job: JobConfig) -> int:
    """T of a training job: each rank holds batch_size/dense_dp sequences of seq_len/mp tokens (sequence
    parallelism), and routes them as one group."""
    par, m = job.parallel, job.model
    return job.train.batch_size // par.dense_dp * (m.seq_len // par.mp)


@dataclass(kw_only=True, frozen=True)
class LayerWork:
    """One MoE layer's work on one rank, in the shapes the pipelined block moves (fp32).

    * Dispatch sends this rank's (E, C, D) slots, cut into W pieces: n_a2a = E·C·D·4 bytes (the whole
      send buffer; the combine moves the same). W = 1: no AlltoAll, n_a2a = 0.
    * The ESP AllGather turns (e, W·C, D) into (e, S·W·C, D): n_ag = e·S·W·C·D·4 = S·E·C·D·4 bytes, the
      gathered size; the ReduceScatter takes the same (n_rs = n_ag). S = 1: no AllGather/ReduceScatter.
    * The experts run (e, S·W·C, D) slots with H/S hidden: each GEMM is e·(S·W·C)·D·(H/S) = E·C·D·H
      MACs, n_exp = GEMMS[expert]·E·C·D·H (forward; the backward runs its own line at the same n).
    * Gate + Order + I-Order: n_gate = T·D·(logits per token: E, or E·slots for SoftMoE).
    * The dense part (attention) of its block: n_dense = T·D² (:class:`BlockWork`).

    C is the gate's capacity (:func:`fsmoe.moe.gates.capacity_for`; with no capacity factor the
    balanced estimate ceil(K·T/E), ``capacity_estimated``) padded to ``capacity_multiple`` =
    lcm(r_fwd, r_bwd) as the layer pads it (:meth:`padded`), so padding changes every n."""

    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    ep: int = 1
    esp: int = 1
    gemms: int = 2
    gate_width: int
    capacity_gate: int
    capacity_multiple: int = 1
    capacity_estimated: bool = False

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model", "d_hidden", "num_experts", "ep", "esp", "gemms", "gate_width",
                     "capacity_gate", "capacity_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerWork: {name} must be an int >= 1, got {value!r}")
        if self.num_experts % self.ep:
            raise ValueError(f"LayerWork: E={self.num_experts} is not divisible by EP={self.ep}")
        if self.d_hidden % self.esp:
            raise ValueError(f"LayerWork: H={self.d_hidden} is not divisible by ESP={self.esp}")

    @property
    def capacity(self) -> int:
        """C as the block runs it: the gate's C rounded up to ``capacity_multiple`` (``fit_capacity``)."""
        return fit_capacity(self.capacity_gate, multiple=self.capacity_multiple)

    def padded(self, multiple: int) -> LayerWork:
        """This layer with C padded to a multiple of ``multiple`` (lcm(r_fwd, r_bwd))."""
        return replace(self, capacity_multiple=multiple)

    @property
    def n_a2a(self) -> int:
        return self.num_experts * self.capacity * self.d_model * FP32_BYTES if self.ep > 1 else 0

    @property
    def n_ag(self) -> int:
        return self.esp * self.num_experts * self.capacity * self.d_model * FP32_BYTES if self.esp > 1 else 0

    @property
    def n_rs(self) -> int:
        return self.n_ag

    @property
    def n_exp(self) -> int:
        return self.gemms * self.num_experts * self.capacity * self.d_model * self.d_hidden

    @property
    def n_gate(self) -> int:
        return self.tokens * self.d_model * self.gate_width

    @property
    def n_dense(self) -> int:
        """One attention of this rank's T tokens in the ``dense_*`` lines' unit, T·D² (see :class:`BlockWork`)."""
        return self.tokens * self.d_model * self.d_model

    def to_dict(self) -> dict[str, int | bool]:
        return {"tokens": self.tokens, "capacity_gate": self.capacity_gate, "capacity": self.capacity,
                "capacity_estimated": self.capacity_estimated, "n_a2a": self.n_a2a, "n_ag": self.n_ag,
                "n_rs": self.n_rs, "n_exp": self.n_exp, "n_gate": self.n_gate, "n_dense": self.n_dense}


def layer_work(job: JobConfig, *, tokens: int | None = None) -> LayerWork:
    """The work of each MoE layer of ``job`` on one rank: T = ``tokens`` (e.g. ``job.bench.tokens`` for
    the layer benchmark) or the training job's :func:`tokens_per_rank`."""
    cfg, par = job.moe, job.parallel
    T = tokens if tokens is not None else tokens_per_rank(job)
    E, K = cfg.num_experts, cfg.top_k
    estimated = False
    if cfg.gate == "softmoe":
        capacity, width = cfg.softmoe_slots, E * cfg.softmoe_slots
    elif cfg.capacity_factor is None:  # C is the busiest expert's load at run time: assume balanced routing
        balanced = math.ceil(Fraction(K * T, E))
        capacity, width, estimated = fit_capacity(balanced, minimum=cfg.min_capacity,
                                                  multiple=cfg.capacity_multiple), E, True
    else:
        capacity, width = capacity_for(T, E, K, cfg), E
    return LayerWork(tokens=T, d_model=job.model.d_model, d_hidden=cfg.d_hidden, num_experts=E, ep=par.ep,
                     esp=par.esp, gemms=GEMMS[cfg.expert], gate_width=width, capacity_gate=capacity,
                     capacity_estimated=estimated)


@dataclass(kw_only=True, frozen=True)
class BlockWork:
    """The dense part of one transformer block on one rank, in units of the ``dense_*`` lines
    (n = tokens·D²): an attention (its MP shard over mp·T tokens: 4·T·D² MACs) is n_attn = T·D²; a dense
    MLP (2·D·F MACs per token on T tokens) is F/(2D) attentions, n_mlp = T·D·F/2; an MoE block has
    none (its MLP is the MoE layer)."""

    moe: bool
    n_attn: float
    n_mlp: float


def block_work(model: ModelConfig, tokens: int) -> tuple[BlockWork, ...]:
    T, D = tokens, model.d_model
    """Every block's dense work for T = ``tokens`` per rank (n_attn = :attr:`LayerWork.n_dense`)."""
    return tuple(BlockWork(moe=model.is_moe_layer(i), n_attn=float(T * D * D),
                           n_mlp=0.0 if model.is_moe_layer(i) else T * D * model.d_ff / 2)
                 for i in range(model.n_layers))


# --- the closed forms (paper §4) -----------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class ChunkTimes:
    """Per-chunk times of Eq. 1 at one degree r (0 for a collective the layout does not run)."""

    a2a_s: float
    ag_s: float
    rs_s: float
    exp_s: float


@dataclass(kw_only=True, frozen=True)
class PassModel:
    """The inputs of Eq. 1 for one pass of one MoE block: the α-β lines and workloads of the AlltoAll,
    AllGather, ReduceScatter and expert compute. ``one_channel`` (No-IIO: tutel, fsmoe_no_iio) folds
    AllGather and ReduceScatter into the AlltoAll, as they queue on its channel."""

    a2a: Linear
    ag: Linear
    rs: Linear
    exp: Linear
    n_a2a: float
    n_ag: float
    n_rs: float
    n_exp: float
    one_channel: bool = False

    @classmethod
    def of(cls, work: LayerWork, costs: Costs, *, backward: bool, one_channel: bool = False,
           busy: bool = True) -> PassModel:
        """Forward (``expert_fwd``) or backward (``expert_bwd``) of ``work``; ``busy``: the collectives'
        lines measured under concurrent compute, the pipelined steady state."""
        return cls(a2a=costs.op("a2a", busy=busy), ag=costs.op("ag", busy=busy), rs=costs.op("rs", busy=busy),
                   exp=costs.op("expert_bwd" if backward else "expert_fwd"), n_a2a=work.n_a2a, n_ag=work.n_ag,
                   n_rs=work.n_rs, n_exp=work.n_exp, one_channel=one_channel)

    def chunk(self, r: float) -> ChunkTimes:
        """Eq. 1: t_x,r = α_x + (n_x / r)·β_x for each task x (0 when n_x = 0: no such collective). With
        ``one_channel``: t_a2a ← t_a2a + (t_ag + t_rs)/2 and t_ag = t_rs = 0, so that 2·t_a2a is the
        chunk's whole communication on the one channel."""
        a2a, ag, rs = (line.chunk(n, r) if n > 0 else 0.0
                       for line, n in ((self.a2a, self.n_a2a), (self.ag, self.n_ag), (self.rs, self.n_rs)))
        exp = self.exp.chunk(self.n_exp, r)
        return self._fold(a2a, ag, rs, exp)

    def slope(self, r: float) -> ChunkTimes:
        """d/dr of :meth:`chunk`: −n_x·β_x / r² per task (for SLSQP's gradients)."""
        a2a, ag, rs, exp = (-line.beta_s * n / (r * r) if n > 0 else 0.0 for line, n in (
            (self.a2a, self.n_a2a), (self.ag, self.n_ag), (self.rs, self.n_rs), (self.exp, self.n_exp)))
        return self._fold(a2a, ag, rs, exp)

    def _fold(self, a2a: float, ag: float, rs: float, exp: float) -> ChunkTimes:
        if self.one_channel:
            return ChunkTimes(a2a_s=a2a + (ag + rs) / 2, ag_s=0.0, rs_s=0.0, exp_s=exp)
        return ChunkTimes(a2a_s=a2a, ag_s=ag, rs_s=rs, exp_s=exp)


@dataclass(kw_only=True, frozen=True)
class Predicates:
    """Q1–Q7 of paper §4.2 (digest table) at one r and t_gar:

    Q1 t_a2a > t_ag; Q2 r·t_exp > 2(r−1)·t_a2a; Q3 r·t_exp > (r−1)(t_ag + t_rs); Q4 t_gar > t_ag + t_rs;
    Q5 t_gar > r·t_exp − 2(r−1)·t_a2a + t_ag + t_rs; Q6 t_gar > r·t_ag + r·t_rs − 2(r−1)·t_a2a;
    Q7 t_gar > t_ag + t_rs + r·t_exp − 2(r−1)·t_a2a."""

    q1: bool
    q2: bool
    q3: bool
    q4: bool
    q5: bool
    q6: bool
    q7: bool


def predicate_margins(c: ChunkTimes, r: float, t_gar: float) -> tuple[float, ...]:
    """Q1–Q7 as margins m_i (Q_i ⇔ m_i > 0), the inequality constraints of Algorithm 1."""
    a, g, s, x = c.a2a_s, c.ag_s, c.rs_s, c.exp_s
    return (a - g, r * x - 2 * (r - 1) * a, r * x - (r - 1) * (g + s), t_gar - (g + s),
            t_gar - (r * x - 2 * (r - 1) * a + g + s), t_gar - (r * g + r * s - 2 * (r - 1) * a),
            t_gar - (g + s + r * x - 2 * (r - 1) * a))


def predicates(c: ChunkTimes, r: float, t_gar: float = 0.0) -> Predicates:
    m = predicate_margins(c, r, t_gar)
    return Predicates(**{f"q{i + 1}": m[i] > 0 for i in range(7)})


# Each case's condition (paper Fig. 4) as a disjunction of conjunctions of signed predicates: (i, True)
# means Q_i, (i, False) means ¬Q_i. Algorithm 1 solves one SLSQP sub-problem per conjunction.
CASE_CLAUSES: dict[int, tuple[tuple[tuple[int, bool], ...], ...]] = {
    1: (((1, True), (2, False), (4, True)), ((1, True), (2, True), (5, True)),
        ((1, False), (3, False), (6, True)), ((1, False), (3, True), (7, True))),
    2: (((1, True), (2, True), (5, False)), ((1, False), (3, True), (7, False))),
    3: (((1, True), (2, False), (4, False)),),
    4: (((1, False), (3, False), (6, False)),),
}
CASE_WORDS = {1: "inter-node AlltoAll + GAR bound", 2: "expert compute bound", 3: "inter-node AlltoAll bound",
              4: "intra-node AllGather/ReduceScatter bound"}
ONE_CHANNEL_WORDS = {1: "communication + GAR bound (one channel)", 2: "expert compute bound",
                     3: "communication bound (one channel: AlltoAll + AllGather/ReduceScatter)"}


def case_of(q: Predicates) -> int:
    """The case whose condition holds (paper §4.3); exactly one does."""
    flags = (q.q1, q.q2, q.q3, q.q4, q.q5, q.q6, q.q7)
    for case, clauses in CASE_CLAUSES.items():
        if any(all(flags[i - 1] == want for i, want in clause) for clause in clauses):
            return case
    raise AssertionError(f"no case holds for {q}")  # the conditions partition every (Q1..Q7)


def case_time(case: int, c: ChunkTimes, r: float, t_gar: float = 0.0) -> float:
    """The time of one pass in ``case`` (paper §4.3):

    Case 1 (inter-node bound, Eq. 2): t₁ = 2r·t_a2a + t_gar;
    Case 2 (expert compute bound):   t₂ = 2·t_a2a + t_ag + t_rs + r·t_exp;
    Case 3 (AlltoAll bound):         t₃ = 2r·t_a2a + t_ag + t_rs;
    Case 4 (intra-node bound):       t₄ = 2·t_a2a + r·t_ag + r·t_rs.

    Each is the length of one chain of tasks of the fsmoe schedule (the inter channel's work; the
    first dispatch, every expert, the last combine; the inter channel with one ReduceScatter wait; the
    intra channel's work), so each bounds the makespan from below and Q1–Q7 pick the longest."""
    a, g, s, x = c.a2a_s, c.ag_s, c.rs_s, c.exp_s
    if case == 1:
        return 2 * r * a + t_gar
    if case == 2:
        return 2 * a + g + s + r * x
    if case == 3:
        return 2 * r * a + g + s
    if case == 4:
        return 2 * a + r * g + r * s
    raise ValueError(f"unknown case {case}; the cases are 1, 2, 3, 4")


def closed_form(pm: PassModel, r: float, t_gar: float = 0.0) -> tuple[int, float]:
    """(case, time) of one pass at degree r with ``t_gar`` of Gradient-AllReduce inside it (0 forward)."""
    c = pm.chunk(r)
    case = case_of(predicates(c, r, t_gar))
    return case, case_time(case, c, r, t_gar)


def window(case: int, c: ChunkTimes, r: float) -> float:
    """t_olp,moe (digest §5.2): the inter-node idle time a backward pass at degree r leaves for a
    Gradient-AllReduce (with t_gar = 0 only Cases 2–4 occur): Case 2 r·t_exp + t_ag + t_rs − 2(r−1)·t_a2a;
    Case 3 t_ag + t_rs; Case 4 r·t_ag + r·t_rs − 2(r−1)·t_a2a."""
    a, g, s, x = c.a2a_s, c.ag_s, c.rs_s, c.exp_s
    if case == 2:
        return max(r * x + g + s - 2 * (r - 1) * a, 0.0)
    if case == 3:
        return g + s
    if case == 4:
        return max(r * g + r * s - 2 * (r - 1) * a, 0.0)
    return 0.0


# --- the exact evaluator ---------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class TaskSpan:
    """One task as played: ``lane`` is where it ran (``compute`` or a communication lane)."""

    kind: str
    chunk: int
    lane: str
    start_s: float
    end_s: float

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.chunk}]"


@dataclass(kw_only=True, frozen=True)
class Timeline:
    """A played task list: the makespan and every task's span, in list order."""

    makespan_s: float
    spans: tuple[TaskSpan, ...]
    plays: int = 1  # how many plays :func:`play_contended` needed (1: a plain :func:`play`)

    def span(self, kind: str, chunk: int = 0) -> TaskSpan:
        for s in self.spans:
            if (s.kind, s.chunk) == (kind, chunk):
                return s
        raise KeyError(f"no task {kind}[{chunk}] in this timeline")

    def predicted_s(self) -> dict[str, float]:
        """Duration per task name (``dispatch[0]`` …), e.g. to put beside a measured trace."""
        return {s.name: s.end_s - s.start_s for s in self.spans}

    def trace_events(self, *, rank: int = 0, start_s: float = 0.0) -> list[TraceEvent]:
        """The spans as :class:`~fsmoe.schedule.runtime.TraceEvent` s on tracks ``predicted:<lane>`` (so
        :func:`~fsmoe.schedule.runtime.chrome_trace` shows them beside the measured lanes), from ``start_s``."""
        return [TraceEvent(name=s.name, channel=f"predicted:{s.lane}", start_s=start_s + s.start_s,
                           end_s=start_s + s.end_s, rank=rank) for s in self.spans]


def play(tasks: Sequence[Task], lanes: Mapping[str, str], duration: Callable[[Task], float], *,
         free_at_s: Mapping[str, float] | None = None) -> Timeline:
    """Play ``tasks`` as :class:`~fsmoe.schedule.runtime.Runtime` runs them: compute tasks one after
    another in list order, each communication channel on its lane (``lanes``, from ``lanes_for``) FIFO in
    list order, every task starting when its lane is free and its dependencies are done:
    start = max(lane free, ends of deps), end = start + ``duration(task)``. Lanes start free at 0, or at
    ``free_at_s[lane]``. Exact for the model: deps and lane predecessors precede a task in the list."""
    free = {"compute": 0.0, **{lane: 0.0 for lane in lanes.values()}}
    free.update(free_at_s or {})
    end: dict[tuple[str, int], float] = {}
    spans = []
    for t in tasks:
        lane = "compute" if t.channel == "compute" else lanes[t.channel]
        start = max([free[lane], *(end[d] for d in t.deps)])
        stop = start + duration(t)
        free[lane] = end[t.key] = stop
        spans.append(TaskSpan(kind=t.kind, chunk=t.chunk, lane=lane, start_s=start, end_s=stop))
    return Timeline(makespan_s=max((s.end_s for s in spans), default=0.0), spans=tuple(spans))


# Task kind -> (operation, first half of the chunk's path?) for both passes. Backward: the gradient's
# AlltoAll (adjoint of combine), AllGather (adjoint of the ReduceScatter), expert backward,
# ReduceScatter (adjoint of the AllGather), AlltoAll (adjoint of dispatch).
KIND_OP: dict[str, tuple[str, bool]] = {
    "dispatch": ("a2a", True), "gather": ("ag", True), "expert": ("expert_fwd", True), "reduce": ("rs", False),
    "combine": ("a2a", False), "combine_bwd": ("a2a", True), "reduce_bwd": ("ag", True),
    "expert_bwd": ("expert_bwd", True), "gather_bwd": ("rs", False), "dispatch_bwd": ("a2a", False),
}


def uses_busy_line(kind: str, chunk: int, r: int) -> bool:
    """Whether a collective overlaps expert compute in the pipelined steady state: never at r = 1; at
    r > 1 all but the first-half collectives of chunk 0 and the second-half ones of chunk r−1; ``gar``
    always. (The evaluator finds the overlap by playing instead, :func:`play_contended`; this is the
    rule its result reduces to when every overlapping task overlaps fully.)"""
    if kind == "gar":
        return True
    if r == 1:
        return False
    first_half = KIND_OP[kind][1]
    return chunk > 0 if first_half else chunk < r - 1


def pass_durations(work: LayerWork, costs: Costs, r: int, *, t_gar: float = 0.0,
                   busy: bool = False) -> Callable[[Task], float]:
    """Modelled duration of each task of one pass of ``work`` at degree ``r`` (Eq. 1 per chunk): the
    collectives' idle lines, or with ``busy`` their lines fully overlapped with compute; ``gar`` takes
    ``t_gar``."""
    n = {"a2a": work.n_a2a, "ag": work.n_ag, "rs": work.n_rs, "expert_fwd": work.n_exp, "expert_bwd": work.n_exp}

    def duration(task: Task) -> float:
        if task.kind == "gar":
            return t_gar
        op = KIND_OP[task.kind][0]
        if n[op] == 0:  # a size-1 group: the collective returns its input
            return 0.0
        return costs.op(op, busy=busy).chunk(n[op], r)

    return duration


CONTENTION_PLAYS = 4  # at most this many plays of one task list (the first at the idle lines)
CONTENTION_TOL = 1e-3  # of the makespan: durations that move less have settled


class ComputeCover:
    """The compute spans of one play (one compute lane: sorted, never overlapping) with their running
    total, so that the compute time inside any interval is two binary searches, not a scan."""

    def __init__(self, spans: Sequence[tuple[float, float]]) -> None:
        self.starts = [a for a, _ in spans]
        self.ends = [b for _, b in spans]
        self.before = [0.0]  # before[i]: compute time of spans[:i]
        for a, b in spans:
            self.before.append(self.before[-1] + (b - a))

    def upto(self, x: float) -> float:
        """Compute time in (-inf, x]."""
        i = bisect.bisect_right(self.starts, x) - 1
        return 0.0 if i < 0 else self.before[i] + min(x, self.ends[i]) - self.starts[i]

    def inside(self, x: float) -> bool:
        """Whether x lies strictly inside a compute span."""
        i = bisect.bisect_right(self.starts, x) - 1
        return i >= 0 and self.starts[i] < x < self.ends[i]

    def end_of(self, x: float) -> float:
        """The end of the compute span x lies in (x itself outside every span)."""
        i = bisect.bisect_right(self.starts, x) - 1
        return self.ends[i] if i >= 0 and self.starts[i] < x < self.ends[i] else x


MAX_SLOW_WEIGHT = 0.9  # cap of the summed weights of overlapping collectives (compute at ≥ 1/10 of its speed)


class CommCover:
    """The communication spans of one play, each weighted by how much it slows compute beside it
    (w = 1 − 1/σ, :meth:`fsmoe.perf.costs.Costs.slows`); spans on different lanes may overlap, and their
    weights add, up to :data:`MAX_SLOW_WEIGHT`. The weighted time inside any interval is two binary
    searches."""

    def __init__(self, spans: Sequence[tuple[float, float, float]]) -> None:
        self.xs = sorted({x for a, b, w in spans if w > 0 and b > a for x in (a, b)})
        density = [0.0] * len(self.xs)  # on [xs[i], xs[i+1])
        for a, b, w in spans:
            if w > 0 and b > a:
                for i in range(bisect.bisect_left(self.xs, a), bisect.bisect_left(self.xs, b)):
                    density[i] += w
        self.density = [min(d, MAX_SLOW_WEIGHT) for d in density]
        self.before = [0.0]  # before[i]: weighted time up to xs[i]
        for i in range(len(self.xs) - 1):
            self.before.append(self.before[-1] + self.density[i] * (self.xs[i + 1] - self.xs[i]))

    def __bool__(self) -> bool:
        return bool(self.xs)

    def upto(self, x: float) -> float:
        """Weighted communication time in (-inf, x]."""
        i = bisect.bisect_right(self.xs, x) - 1
        return 0.0 if i < 0 else self.before[i] + self.density[i] * (x - self.xs[i])

    def at(self, x: float) -> float:
        """The weight just after x (the slope of :meth:`upto` there)."""
        i = bisect.bisect_right(self.xs, x) - 1
        return self.density[i] if i >= 0 else 0.0


def slowed_duration(lo: float, d: float, covered: float, weight: float) -> float:
    """The duration x of a compute task (``lo`` alone) that lasted ``d`` with ``covered`` weighted seconds
    of communication beside it (:class:`CommCover`), solved with the communication at its end
    (``weight``) extended linearly: the rate model x = lo + covered + weight·(x − d) — compute runs at
    1/σ of its speed while a collective of weight 1 − 1/σ runs beside it, so a task overlapped all along
    takes σ·lo. At least ``lo``; ``weight`` at most :data:`MAX_SLOW_WEIGHT`."""
    w = min(weight, MAX_SLOW_WEIGHT)
    return max((lo + covered - w * d) / (1.0 - w), lo)


def _overlap(span: TaskSpan, cover: ComputeCover) -> tuple[float, bool]:
    """(seconds of ``span`` that overlap the compute spans, whether its end lies strictly inside one)."""
    return max(cover.upto(span.end_s) - cover.upto(span.start_s), 0.0), cover.inside(span.end_s)


def _cover(timeline: Timeline) -> ComputeCover:
    return ComputeCover(sorted((s.start_s, s.end_s) for s in timeline.spans if s.lane == "compute"))


def overlap_fractions(timeline: Timeline) -> dict[tuple[str, int], float]:
    """For each communication task of ``timeline``: the share of its span that overlaps a compute task
    (compute spans never overlap each other: one compute lane). 0 for a task of zero length."""
    cover = _cover(timeline)
    out = {}
    for s in timeline.spans:
        if s.lane != "compute":
            length = s.end_s - s.start_s
            out[(s.kind, s.chunk)] = min(_overlap(s, cover)[0] / length, 1.0) if length > 0 else 0.0
    return out


def contended_duration(lo: float, hi: float, d: float, covered: float, end_inside: bool) -> float:
    """The duration x = lo + (overlap(x) / x)·(hi − lo) of a collective that lasted ``d`` with ``covered``
    seconds beside compute, solved with its overlap extended linearly from there: overlap(x) = covered +
    (x − d) when its end lies inside a compute task (``end_inside``), else ``covered``. Exact as long as
    the end stays on the same piece; the larger root of x² − (lo + k·m)·x − k·(covered − m·d) = 0
    (k = hi − lo, m = 1 or 0), within [lo, hi]."""
    k = hi - lo
    if k <= 0 or d <= 0:
        return lo
    m = 1.0 if end_inside else 0.0
    b, c = lo + k * m, k * (covered - m * d)
    disc = b * b + 4 * c
    x = (b + math.sqrt(disc)) / 2 if disc >= 0 else lo + covered / d * k
    return min(max(x, lo), hi)


def rate_duration(lo: float, hi: float, d: float, covered: float, room: float) -> float:
    """The duration x = lo + (1 − lo/hi)·overlap(x) of a collective that progresses at lo/hi of its speed
    while compute runs beside it and at full speed otherwise (the rate model of
    :func:`fsmoe.perf.fit.slowdown`, κ = hi/lo). It lasted ``d`` with ``covered`` seconds beside compute
    in the last play; ``room``: how much longer the compute task around its end runs (0: its end lies
    outside compute). The end either stays inside that task (overlap grows with x) or passes it (the
    whole task overlapped, nothing after it counted). Within [lo, hi]."""
    if hi <= lo or d <= 0 or lo <= 0:
        return lo
    w = 1.0 - lo / hi
    if room > 0:
        x = (lo + w * (covered - d)) / (1.0 - w)  # the end stays inside the compute task
        if x > d + room:
            x = lo + w * (covered + room)  # it passes the task's end
    else:
        x = lo + w * covered
    return min(max(x, lo), hi)


RATE_KINDS = frozenset({"gar"})  # the collectives contended by the rate model (module doc); the others interpolate


def play_contended(tasks: Sequence[Task], lanes: Mapping[str, str], idle: Callable[[Task], float],
                   busy: Callable[[Task], float], *, slows: Callable[[Task], float] | None = None,
                   free_at_s: Mapping[str, float] | None = None, max_plays: int = CONTENTION_PLAYS) -> Timeline:
    """:func:`play` with contention (module doc): each communication task, after a play, takes the
    duration x = idle + (overlap(x) / x)·(busy − idle) solved against that play's compute spans
    (:func:`contended_duration`; all idle in the first play); each compute task takes ``idle(task)``, or
    with ``slows`` (σ ≥ 1 of each communication task: compute beside it runs σ× slower) the duration
    :func:`slowed_duration` finds against that play's communication spans. Replays until no duration
    moves by more than :data:`CONTENTION_TOL` of the makespan, or ``max_plays``; the last play, with
    ``plays`` set."""
    if max_plays < 1:
        raise ValueError(f"play_contended: max_plays must be >= 1, got {max_plays}")
    lo = {t.key: idle(t) for t in tasks}
    hi = {t.key: (busy(t) if t.channel != "compute" else lo[t.key]) for t in tasks}
    weight = {t.key: 1.0 - 1.0 / slows(t) for t in tasks if t.channel != "compute"} if slows else {}
    durations = dict(lo)
    timeline = play(tasks, lanes, lambda t: durations[t.key], free_at_s=free_at_s)
    plays = 1
    while plays < max_plays:
        cover = _cover(timeline)
        comm = CommCover([(sp.start_s, sp.end_s, weight[(sp.kind, sp.chunk)]) for sp in timeline.spans
                          if sp.lane != "compute"]) if weight else None
        new = dict(durations)
        for sp in timeline.spans:
            key = (sp.kind, sp.chunk)
            if sp.lane != "compute":
                covered, inside = _overlap(sp, cover)
                if sp.kind in RATE_KINDS:
                    room = cover.end_of(sp.end_s) - sp.end_s if inside else 0.0
                    new[key] = rate_duration(lo[key], hi[key], sp.end_s - sp.start_s, covered, room)
                else:
                    new[key] = contended_duration(lo[key], hi[key], sp.end_s - sp.start_s, covered, inside)
            elif comm:
                new[key] = slowed_duration(lo[key], sp.end_s - sp.start_s,
                                           comm.upto(sp.end_s) - comm.upto(sp.start_s), comm.at(sp.end_s))
        if max((abs(new[k] - durations[k]) for k in lo), default=0.0) <= CONTENTION_TOL * timeline.makespan_s:
            break
        durations = new
        timeline = play(tasks, lanes, lambda t, d=new: d[t.key], free_at_s=free_at_s)
        plays += 1
    return replace(timeline, plays=plays)


@functools.lru_cache(maxsize=256)
def pass_tasks(spec: ScheduleSpec, r: int, *, backward: bool, with_gar: bool = False) -> tuple[Task, ...]:
    """The schedule's own task list of one pass (cached: the builders are pure)."""
    return tuple(backward_tasks(spec, r, with_gar) if backward else forward_tasks(spec, r))


def play_pass(spec: ScheduleSpec, work: LayerWork, costs: Costs, r: int, *, backward: bool,
              t_gar: float | None = None, t_gar_idle: float | None = None,
              free_at_s: Mapping[str, float] | None = None) -> Timeline:
    """One pass of one MoE block of ``work`` (pad it first: :meth:`LayerWork.padded`) under ``spec`` at
    degree ``r``, played with contention (:func:`play_contended`); backward with ``t_gar`` (not None)
    runs the schedule's Gradient-AllReduce slice (``spec.gar_in_moe``) for that long — or, with
    ``t_gar_idle``, between that (overlapped) and ``t_gar_idle`` (alone) by its overlap with the experts.
    ``sequential`` is the r = 1 case."""
    tasks = pass_tasks(spec, r, backward=backward, with_gar=backward and t_gar is not None)
    gar_busy = t_gar or 0.0
    gar_idle = gar_busy if t_gar_idle is None else t_gar_idle
    return play_contended(tasks, lanes_for(spec), pass_durations(work, costs, r, t_gar=gar_idle),
                          pass_durations(work, costs, r, t_gar=gar_busy, busy=True), slows=pass_slows(costs),
                          free_at_s=free_at_s)


SLOWING = ("gar",)  # the collectives whose σ the models apply (module doc)


def model_slows(costs: Costs) -> dict[str, float]:
    """σ of the collectives in :data:`SLOWING` that slow compute (σ > 1)."""
    return {op: costs.slows(op) for op in SLOWING if costs.slows(op) > 1.0}


def pass_slows(costs: Costs) -> Callable[[Task], float] | None:
    """σ of each communication task of a pass (:func:`model_slows`; 1 for the others), or None when none
    slows compute (then compute tasks keep their lines and the plays are as before)."""
    slows = model_slows(costs)
    if not slows:
        return None
    return lambda t: slows.get("gar" if t.kind == "gar" else KIND_OP[t.kind][0], 1.0)


@dataclass(kw_only=True, frozen=True)
class GarResponse:
    """A backward pass's makespan as a function of its Gradient-AllReduce slice: with fixed durations the
    played schedule is a max-plus system (every start is a max of sums of durations), so makespan(t_gar)
    = max(A, B + t_gar) exactly, with A the longest path avoiding ``gar`` and B the longest path through
    it less its duration. With contention (:func:`play_contended`) the durations of the collectives
    queued behind ``gar`` depend on where it ends: A is played without it and B with a long one (the
    tasks behind it then run after the experts, idle), so the response is exact at both ends and an
    approximation in between. ``window_s`` = max(A − B, 0) is the slice that fits without delaying the
    link (t_olp,moe, §5.2, measured on the played schedule). A block without a GAR slot has B = −∞ and no window.

    Where the GAR slows compute beside it (σ > 1, ``Costs.beside``), the path avoiding it grows too:
    A + w·min(max(t_gar − ``lead_s``, 0), ``cover_s``), w = 1 − 1/σ (``slow``), ``lead_s`` the time from
    the slice's start to the next compute and ``cover_s`` σ × the compute after it (the longest overlap
    that still slows it: the rate model of :func:`slowed_duration`).

    The slice's own duration t_gar depends on the compute beside it too (:meth:`slice_s`): ``beside_s``
    is the compute after its start (in the play without it), ``lead_s`` the time until that compute."""

    a_s: float
    b_s: float
    slow: float = 0.0
    lead_s: float = 0.0
    cover_s: float = 0.0
    beside_s: float = 0.0

    def __call__(self, t_gar: float) -> float:
        return max(self.a_s + self.slow * min(max(t_gar - self.lead_s, 0.0), self.cover_s), self.b_s + t_gar)

    def slice_s(self, t_idle: float, t_busy: float) -> float:
        """The slice's duration launched at its slot, t_idle alone and t_busy with compute beside it all
        along: the rate model (:func:`rate_duration`) — full speed for ``lead_s``, t_idle/t_busy of it
        beside the compute after that (``beside_s``, σ× longer while the slice slows it: ``cover_s``),
        full speed after."""
        return float(slice_durations(np.float64(t_idle), np.float64(t_busy), np.float64(self.lead_s),
                                     np.float64(self.overlap_s)))

    @property
    def overlap_s(self) -> float:
        """The compute a slice can have beside it: ``beside_s``, stretched to ``cover_s`` where it slows."""
        return self.cover_s if self.slow > 0 else self.beside_s

    @property
    def window_s(self) -> float:
        return max(self.a_s - self.b_s, 0.0) if math.isfinite(self.b_s) else 0.0


def slice_durations(t_idle: np.ndarray, t_busy: np.ndarray, lead: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """:meth:`GarResponse.slice_s` on arrays (broadcast): a slice of ``t_idle`` alone
    (``t_busy`` beside compute all along, κ = t_busy/t_idle) runs ``lead`` at full speed, then at 1/κ beside
    ``overlap`` seconds of compute, then at full speed."""
    positive = t_idle > 0
    kappa = np.where(positive, np.maximum(t_busy, t_idle) / np.where(positive, t_idle, 1.0), 1.0)
    rest = np.maximum(t_idle - lead, 0.0)
    beside = np.minimum(rest * kappa, overlap)
    return np.where(t_idle > lead, lead + beside + rest - beside / kappa, t_idle)


def gar_response(spec: ScheduleSpec, work: LayerWork, costs: Costs, r: int) -> GarResponse:
    """A and B of :class:`GarResponse` from two plays (durations do not depend on t_gar); B = −∞ when
    the schedule runs no GAR slot inside the block (``spec.gar_in_moe`` False). The compute the slice
    slows: that of the play without it, after the slice's start in the play with it."""
    base = play_pass(spec, work, costs, r, backward=True)
    if not spec.gar_in_moe:
        return GarResponse(a_s=base.makespan_s, b_s=-math.inf)
    big = 2.0 * base.makespan_s + 1.0  # long enough that the path through gar is the longest: B + big > A
    through = play_pass(spec, work, costs, r, backward=True, t_gar=big)
    sigma = costs.slows("gar")
    start = through.span("gar").start_s
    later = [s for s in base.spans if s.lane == "compute" and s.end_s > start]
    lead = max(min((s.start_s for s in later), default=start) - start, 0.0)
    after = sum(s.end_s - max(s.start_s, start) for s in later)
    return GarResponse(a_s=base.makespan_s, b_s=through.makespan_s - big, slow=1.0 - 1.0 / sigma, lead_s=lead,
                       cover_s=sigma * after if sigma > 1.0 else 0.0, beside_s=after)


def degrees_up_to(max_degree: int) -> tuple[int, ...]:
    """The feasible degrees: powers of two up to ``max_degree`` (equal chunks after padding C to lcm)."""
    if max_degree < 1:
        raise ValueError(f"max_degree must be >= 1, got {max_degree}")
    return tuple(2**k for k in range(max_degree.bit_length()) if 2**k <= max_degree)


def padded_for(work: LayerWork, r_fwd: int, r_bwd: int) -> LayerWork:
    """``work`` padded as the pipelined block pads it: C a multiple of lcm(r_fwd, r_bwd)."""
    return work.padded(math.lcm(r_fwd, r_bwd))




# --- one layer at every degree pair ----------------------------------------------------------------------------
def degree_pairs(spec: ScheduleSpec, max_degree: int = 8) -> tuple[tuple[int, int], ...]:
    """Every (r_fwd, r_bwd) ``spec`` allows with powers of two up to ``max_degree``: (1, 1) without
    pipelining, r_fwd = r_bwd without independent degrees. Smallest first (padding, then r_fwd + r_bwd),
    so that ties go to the cheaper pipeline and r = 1 wins when pipelining does not pay."""
    rs = degrees_up_to(max_degree) if spec.pipelined else (1,)
    pairs = [(f, b) for f in rs for b in rs if spec.independent_degrees or f == b]
    return tuple(sorted(pairs, key=lambda p: (max(p), sum(p), p[0])))


@dataclass(kw_only=True, frozen=True)
class LayerTable:
    """One MoE layer under one schedule, played at each degree pair (C padded to lcm(r_fwd, r_bwd)): the
    forward block's makespan and the backward's :class:`GarResponse`."""

    pairs: tuple[tuple[int, int], ...]
    fwd_s: tuple[float, ...]
    bwd: tuple[GarResponse, ...]

    def total_s(self, k: int, t_gar: float = 0.0) -> float:
        return self.fwd_s[k] + self.bwd[k](t_gar)

    def best(self, t_gar: float = 0.0) -> int:
        """The pair minimising forward + backward with ``t_gar`` inside the backward (first on ties)."""
        return min(range(len(self.pairs)), key=lambda k: (self.total_s(k, t_gar), k))


def layer_table(spec: ScheduleSpec, work: LayerWork, costs: Costs,
                pairs: Sequence[tuple[int, int]]) -> LayerTable:
    """Each pass is played once per (padded C, r): pairs whose lcm pads C alike share their plays."""
    fwd_of: dict[tuple[int, int], float] = {}
    bwd_of: dict[tuple[int, int], GarResponse] = {}
    fwd, bwd = [], []
    for r_fwd, r_bwd in pairs:
        w = padded_for(work, r_fwd, r_bwd)
        if (w.capacity, r_fwd) not in fwd_of:
            fwd_of[(w.capacity, r_fwd)] = play_pass(spec, w, costs, r_fwd, backward=False).makespan_s
        if (w.capacity, r_bwd) not in bwd_of:
            bwd_of[(w.capacity, r_bwd)] = gar_response(spec, w, costs, r_bwd)
        fwd.append(fwd_of[(w.capacity, r_fwd)])
        bwd.append(bwd_of[(w.capacity, r_bwd)])
    return LayerTable(pairs=tuple(pairs), fwd_s=tuple(fwd), bwd=tuple(bwd))


__all__ = [
    "BlockWork", "CASE_CLAUSES", "CASE_WORDS", "CONTENTION_PLAYS", "CONTENTION_TOL", "ChunkTimes", "CommCover",
    "FP32_BYTES", "GarResponse", "LayerTable", "LayerWork", "MAX_SLOW_WEIGHT", "ONE_CHANNEL_WORDS", "PassModel",
    "Predicates", "SLOWING", "TaskSpan", "Timeline", "block_work", "case_of", "case_time", "closed_form",
    "contended_duration", "degree_pairs", "degrees_up_to", "gar_response", "layer_table", "layer_work", "model_slows",
    "overlap_fractions", "padded_for", "pass_durations", "pass_slows", "pass_tasks", "play", "play_contended",
    "play_pass", "predicate_margins", "predicates", "rate_duration", "slice_durations", "slowed_duration",
    "tokens_per_rank", "uses_busy_line", "window",
]
