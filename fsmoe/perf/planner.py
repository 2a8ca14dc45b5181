"""The planner: pipeline degrees per MoE layer (Algorithm 1) and the gradient plan (paper §4.4, §5).

Legend: r pipeline degree (r_fwd forward, r_bwd backward), t_gar the Gradient-AllReduce time inside a
layer's backward, C capacity, T tokens per rank.

* :func:`algorithm1` — paper §4.4 (digest §4.4): for each case j and each conjunction of its condition
  (``CASE_CLAUSES``), minimise the case's time f_j(r) with ``scipy.optimize.minimize(method="SLSQP")``
  under the clause's predicates as inequality constraints and 1 ≤ r ≤ ``max_degree`` (continuous r);
  the answer is the argmin over all sub-problems. The continuous r* is then rounded to the feasible
  degrees below and above it (powers of two), with C padded for that degree, and scored.
* :func:`plan_layer` — the degrees actually chosen: every rounded candidate and every feasible pair
  (r_fwd, r_bwd) is checked with the exact evaluator (:mod:`fsmoe.perf.model`, C padded to
  lcm(r_fwd, r_bwd)), the best kept, smallest on ties — so r = 1 when pipelining does not pay.
* :func:`plan_job` — the whole job: per MoE layer r_fwd and r_bwd, the adaptive gradient partition
  (:func:`fsmoe.perf.partition.partition`, which re-solves each r_bwd with its layer's t_gar), the
  predicted step of every schedule, and the :class:`GradientPlan` with its ``--gar-plan`` text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from fsmoe.config import SCHEDULES, JobConfig, ScheduleSpec, get_schedule
from fsmoe.parallel.grad_plan import GradientPlan, StreamLayout
from fsmoe.perf.costs import Costs
from fsmoe.perf.model import (
    CASE_CLAUSES,
    CASE_WORDS,
    ONE_CHANNEL_WORDS,
    LayerTable,
    LayerWork,
    PassModel,
    block_work,
    case_time,
    closed_form,
    degree_pairs,
    degrees_up_to,
    layer_table,
    layer_work,
    padded_for,
    play_pass,
    predicate_margins,
)
from fsmoe.perf.partition import (
    StepModel,
    StepPrediction,
    StreamBytes,
    default_plan,
    partition,
    plan_text,
    rank_stream,
    replica_sizes,
)

MAX_DEGREE = 8
PLANNED = "fsmoe"  # the schedule plan_job plans by default
_GRID = 17  # points of [1, max_degree] on which a clause's feasibility is checked before SLSQP
# SLSQP's iterations per clause. In one dimension it converges in about 4 when the optimum is inside the
# clause; where it lies on a predicate's boundary SLSQP crawls along it (31 iterations, then "positive
# directional derivative"), a third of the solve time. Capped at 10, r* moved by nothing and no plan
# changed on the 42 planner-accuracy profiles; the degrees are the evaluator's choice anyway.
SLSQP_MAXITER = 10


# --- Algorithm 1 -----------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class Algorithm1:
    """Algorithm 1's answer for one pass: the continuous optimum ``r_star`` of the winning ``case`` with
    its time, and ``r`` = r* rounded to the better feasible degree (C padded for it) with its time."""

    case: int
    r_star: float
    time_star_s: float
    r: int
    time_s: float


def _slopes(pm: PassModel, r: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """d/dr of the four case times and of the seven predicate margins at r (SLSQP's gradients)."""
    c, d = pm.chunk(r), pm.slope(r)
    a, g, s, x = c.a2a_s, c.ag_s, c.rs_s, c.exp_s
    da, dg, ds, dx = d.a2a_s, d.ag_s, d.rs_s, d.exp_s
    cases = (2 * a + 2 * r * da, 2 * da + dg + ds + x + r * dx, 2 * a + 2 * r * da + dg + ds,
             2 * da + g + r * dg + s + r * ds)
    m2 = x + r * dx - 2 * a - 2 * (r - 1) * da
    margins = (da - dg, m2, x + r * dx - (g + s) - (r - 1) * (dg + ds), -(dg + ds), -(m2 + dg + ds),
               -(g + s + r * (dg + ds) - 2 * a - 2 * (r - 1) * da), -(dg + ds + m2))
    return cases, margins


def _clause_constraints(pm: PassModel, clause: tuple[tuple[int, bool], ...], t_gar: float,
                        scale: float) -> list[dict[str, Any]]:
    def margin(x: np.ndarray, i: int, sign: float) -> float:
        return sign * predicate_margins(pm.chunk(float(x[0])), float(x[0]), t_gar)[i - 1] / scale

    def grad(x: np.ndarray, i: int, sign: float) -> np.ndarray:
        return np.array([sign * _slopes(pm, float(x[0]))[1][i - 1] / scale])

    return [{"type": "ineq", "fun": margin, "jac": grad, "args": (i, 1.0 if want else -1.0)} for i, want in clause]


def _feasible(pm: PassModel, clause: tuple[tuple[int, bool], ...], r: float, t_gar: float, tol: float) -> bool:
    m = predicate_margins(pm.chunk(r), r, t_gar)
    return all((m[i - 1] if want else -m[i - 1]) >= -tol for i, want in clause)


def algorithm1(pm: PassModel, *, t_gar: float = 0.0, max_degree: int = MAX_DEGREE,
               work: LayerWork | None = None, costs: Costs | None = None, backward: bool = False) -> Algorithm1:
    """Algorithm 1 (FindOptimalPipelineDegree) on one pass. A clause infeasible on a grid of ``_GRID``
    points of [1, max_degree] is skipped; SLSQP starts from the clause's best grid point. With ``work``
    and ``costs`` the rounded candidates are scored with C padded to their degree (else on ``pm``)."""
    scale = max(case_time(c, pm.chunk(1.0), 1.0, t_gar) for c in (1, 2, 3, 4)) or 1.0
    tol = 1e-9 * scale
    grid = np.geomspace(1.0, float(max_degree), _GRID) if max_degree > 1 else np.array([1.0])
    best: tuple[float, float, int] | None = None  # (time, r, case)
    for case, clauses in CASE_CLAUSES.items():
        if pm.one_channel and case == 4:
            continue

        def f(x: np.ndarray, case: int = case) -> float:
            return case_time(case, pm.chunk(float(x[0])), float(x[0]), t_gar) / scale

        def df(x: np.ndarray, case: int = case) -> np.ndarray:
            return np.array([_slopes(pm, float(x[0]))[0][case - 1] / scale])

        for clause in clauses:
            starts = [r for r in grid if _feasible(pm, clause, r, t_gar, tol)]
            if not starts:
                continue
            x0 = min(starts, key=lambda r: f(np.array([r])))
            cand = [(f(np.array([x0])), x0)]
            if max_degree > 1:
                res = minimize(f, np.array([x0]), jac=df, method="SLSQP", bounds=[(1.0, float(max_degree))],
                               constraints=_clause_constraints(pm, clause, t_gar, scale),
                               options={"ftol": 1e-12, "maxiter": SLSQP_MAXITER})
                r = float(np.clip(res.x[0], 1.0, max_degree))
                if _feasible(pm, clause, r, t_gar, tol):
                    cand.append((f(np.array([r])), r))
            t, r = min(cand)
            if best is None or t < best[0]:
                best = (t, r, case)
    assert best is not None  # every r lies in some case
    t_star, r_star, case = best[0] * scale, best[1], best[2]
    feasible = degrees_up_to(max_degree)
    below = max(d for d in feasible if d <= r_star + 1e-9)
    above = min((d for d in feasible if d >= r_star - 1e-9), default=below)

    def score(d: int) -> float:
        if work is not None and costs is not None:
            p = PassModel.of(padded_for(work, d, d), costs, backward=backward, one_channel=pm.one_channel)
            return closed_form(p, d, t_gar)[1]
        return closed_form(pm, d, t_gar)[1]

    r = min((below, above), key=lambda d: (score(d), d))
    return Algorithm1(case=case, r_star=r_star, time_star_s=t_star, r=r, time_s=score(r))


# --- one layer -------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class LayerPlan:
    """One MoE layer's plan: degrees, padded capacity, each pass's case and bottleneck at those degrees
    (closed forms, busy lines), predicted block times (evaluator; backward with its GAR slice), the
    slice's bytes and time, and Algorithm 1's continuous answers. ``gar_after_s``: the GAR the plan
    leaves after the backward instead (exposed, idle line; 0 when it runs inside or there is none)."""

    block: int
    r_fwd: int
    r_bwd: int
    capacity: int
    case_fwd: int
    case_bwd: int
    bottleneck_fwd: str
    bottleneck_bwd: str
    fwd_s: float
    bwd_s: float
    gar_bytes: int
    gar_s: float
    r_star_fwd: float
    r_star_bwd: float
    gar_after_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.gar_after_s

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _words(case: int, one_channel: bool) -> str:
    return ONE_CHANNEL_WORDS.get(case, CASE_WORDS[case]) if one_channel else CASE_WORDS[case]


def describe_layer(spec: ScheduleSpec, work: LayerWork, costs: Costs, *, block: int, r_fwd: int, r_bwd: int,
                   fwd_s: float, bwd_s: float, gar_bytes: int = 0, gar_s: float = 0.0,
                   max_degree: int = MAX_DEGREE, cache: dict | None = None) -> LayerPlan:
    """The :class:`LayerPlan` of a layer run at (r_fwd, r_bwd): cases from the closed forms, r* from
    :func:`algorithm1` (forward with t_gar = 0, backward with ``gar_s``; answers kept in ``cache``, one
    per costs, across layers)."""
    one = not spec.separate_channels
    w = padded_for(work, r_fwd, r_bwd)
    pf = PassModel.of(w, costs, backward=False, one_channel=one)
    pb = PassModel.of(w, costs, backward=True, one_channel=one)
    case_f, case_b = closed_form(pf, r_fwd)[0], closed_form(pb, r_bwd, gar_s)[0]
    top = max_degree if spec.pipelined else 1
    cache = {} if cache is None else cache
    answers = []
    for backward, t_gar in ((False, 0.0), (True, gar_s)):
        key = (work, backward, one, t_gar, top)
        if key not in cache:
            pm = PassModel.of(work, costs, backward=backward, one_channel=one)
            cache[key] = algorithm1(pm, t_gar=t_gar, max_degree=top, work=work, costs=costs, backward=backward)
        answers.append(cache[key])
    a_f, a_b = answers
    return LayerPlan(block=block, r_fwd=r_fwd, r_bwd=r_bwd, capacity=w.capacity, case_fwd=case_f, case_bwd=case_b,
                     bottleneck_fwd=_words(case_f, one), bottleneck_bwd=_words(case_b, one), fwd_s=fwd_s, bwd_s=bwd_s,
                     gar_bytes=gar_bytes, gar_s=gar_s, r_star_fwd=a_f.r_star, r_star_bwd=a_b.r_star)


def _played(spec: ScheduleSpec, work: LayerWork, costs: Costs, t_gar: float, t_gar_idle: float | None,
            max_degree: int) -> tuple[LayerTable, list[float]]:
    """The layer's table over every feasible pair and each pair's GAR slice inside its backward."""
    table = layer_table(spec, work, costs, degree_pairs(spec, max_degree))
    slices = [0.0] * len(table.pairs)
    if spec.gar_in_moe:
        slices = [t_gar if t_gar_idle is None else g.slice_s(t_gar_idle, t_gar) for g in table.bwd]
    return table, slices


@dataclass(kw_only=True, frozen=True)
class LayerOption:
    """One way to run a layer that :func:`plan_layer` weighs: degrees, the GAR inside the backward or
    after it (``gar_after``), and the modelled forward + backward (+ the GAR after it)."""

    r_fwd: int
    r_bwd: int
    gar_after: bool
    predicted_s: float

    @property
    def pair(self) -> tuple[int, int]:
        return self.r_fwd, self.r_bwd


def layer_options(spec: ScheduleSpec | str, work: LayerWork, costs: Costs, *, t_gar: float = 0.0,
                  t_gar_after: float | None = None, t_gar_idle: float | None = None,
                  max_degree: int = MAX_DEGREE) -> list[LayerOption]:
    """Every option :func:`plan_layer` weighs with the same arguments (the GAR after the backward only when
    ``t_gar_after`` is given and the schedule has a GAR slot), fastest modelled first (ties: the
    smaller pair, then the GAR inside). Without ``min_gain``: the ranking is the model's alone."""
    spec = get_schedule(spec) if isinstance(spec, str) else spec
    table, slices = _played(spec, work, costs, t_gar, t_gar_idle, max_degree)
    options = [LayerOption(r_fwd=f, r_bwd=b, gar_after=False, predicted_s=table.total_s(k, slices[k]))
               for k, (f, b) in enumerate(table.pairs)]
    if spec.gar_in_moe and t_gar_after is not None:
        options += [LayerOption(r_fwd=f, r_bwd=b, gar_after=True, predicted_s=table.total_s(k) + t_gar_after)
                    for k, (f, b) in enumerate(table.pairs)]
    order = {pair: k for k, pair in enumerate(table.pairs)}
    return sorted(options, key=lambda o: (o.predicted_s, order[o.pair], o.gar_after))


def plan_layer(spec: ScheduleSpec | str, work: LayerWork, costs: Costs, *, t_gar: float = 0.0,
               t_gar_after: float | None = None, t_gar_idle: float | None = None, max_degree: int = MAX_DEGREE,
               block: int = 0, min_gain: float = 0.0) -> LayerPlan:
    """The degrees of one layer: Algorithm 1's rounded answers and every feasible pair, each played by
    the evaluator (forward + backward with ``t_gar`` inside it, C padded to lcm(r_fwd, r_bwd)); the
    fastest, smallest on ties. Schedules without a GAR slot in the block ignore ``t_gar``. With
    ``t_gar_after`` (the same GAR run after the backward, exposed) the GAR's place is chosen too, the
    layer's whole-step partition (§5) in its two extremes: inside the backward when that is faster,
    else after it (``gar_after_s``; ties go inside) — on CPU ranks sharing cores a GAR beside the experts
    can cost more than it hides (``Costs.beside``). A choice predicted less than ``min_gain`` (a
    fraction) faster than the plain one — r = 1, the GAR after the backward when offered — gives way to
    it (``plan.min_gain``). ``t_gar`` is the slice's time with compute beside it all along (the busy
    line); with ``t_gar_idle`` (alone) each pair gets the slice's rate-model duration beside its own
    compute (:meth:`~fsmoe.perf.model.GarResponse.slice_s`), else ``t_gar`` as it is."""
    spec = get_schedule(spec) if isinstance(spec, str) else spec
    table, slices = _played(spec, work, costs, t_gar, t_gar_idle, max_degree)
    k = min(range(len(table.pairs)), key=lambda i: (table.total_s(i, slices[i]), i))
    gar = slices[k]
    after = 0.0
    if spec.gar_in_moe and t_gar_after is not None:
        k_after = table.best(0.0)
        if table.total_s(k_after) + t_gar_after < table.total_s(k, gar):
            k, gar, after = k_after, 0.0, t_gar_after
    plain = table.pairs.index((1, 1))
    plain_gar, plain_after = (0.0, t_gar_after) if spec.gar_in_moe and t_gar_after is not None else (slices[plain], 0.0)
    plain_s = table.total_s(plain, plain_gar) + plain_after
    if table.total_s(k, gar) + after > plain_s / (1.0 + min_gain):
        k, gar, after = plain, plain_gar, plain_after
    r_fwd, r_bwd = table.pairs[k]
    plan = describe_layer(spec, work, costs, block=block, r_fwd=r_fwd, r_bwd=r_bwd, fwd_s=table.fwd_s[k],
                          bwd_s=table.bwd[k](gar), gar_s=gar, max_degree=max_degree)
    return replace(plan, gar_after_s=after)


@dataclass(kw_only=True, frozen=True)
class LayerPrediction:
    """One MoE layer's forward + backward as the layer benchmark times it: gate, Order and I-Order
    around the block, and a Gradient-AllReduce of ``gar_bytes`` inside the backward (schedules with a
    GAR slot; between its busy and idle lines by its overlap with the experts) or after it (the others,
    idle line, exposed)."""

    fwd_s: float
    bwd_s: float
    gar_after_s: float

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.gar_after_s


def predict_layer(spec: ScheduleSpec | str, work: LayerWork, costs: Costs, r_fwd: int = 1, r_bwd: int = 1, *,
                  gar_bytes: int = 0, gar_after: bool = False) -> LayerPrediction:
    """The modelled time of one MoE layer of ``work`` under ``spec`` at (r_fwd, r_bwd) (C padded to their
    lcm), with the layer benchmark's dense Gradient-AllReduce of ``gar_bytes`` (after the backward when the
    schedule has no slot for it, or ``gar_after``)."""
    spec = get_schedule(spec) if isinstance(spec, str) else spec
    w = padded_for(work, r_fwd, r_bwd)
    gate_f, gate_b = costs.op("gate_fwd")(w.n_gate), costs.op("gate_bwd")(w.n_gate)
    fwd = gate_f + play_pass(spec, w, costs, r_fwd, backward=False).makespan_s
    inside = spec.gar_in_moe and not gar_after
    if inside and gar_bytes > 0:  # contended by its overlap with the experts (fsmoe.perf.model)
        bwd = play_pass(spec, w, costs, r_bwd, backward=True, t_gar=costs.op("gar", busy=True)(gar_bytes),
                        t_gar_idle=costs.op("gar")(gar_bytes))
        return LayerPrediction(fwd_s=fwd, bwd_s=gate_b + bwd.makespan_s, gar_after_s=0.0)
    after = costs.op("gar")(gar_bytes) if gar_bytes > 0 and not inside else 0.0
    bwd = play_pass(spec, w, costs, r_bwd, backward=True)
    return LayerPrediction(fwd_s=fwd, bwd_s=gate_b + bwd.makespan_s, gar_after_s=after)


# --- the job ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class JobPlan:
    """The plan of one job for ``schedule``: per MoE layer (block order) its :class:`LayerPlan`; the
    predicted step of every schedule (``predictions``; pipelined ones other than the planned at their
    best common degree, with the gradient plan the trainer gives them by default); the gradient stream's
    bytes per slot (``ready_bytes`` newly ready at each slot, ``slot_bytes`` launched there) and the
    :class:`GradientPlan` with its ``--gar-plan`` text; how the partition was found; the solve time."""

    schedule: str
    tokens: int
    capacity_gate: int
    layers: tuple[LayerPlan, ...]
    predictions: tuple[StepPrediction, ...]
    ready_bytes: tuple[tuple[str, int], ...]
    slot_bytes: tuple[tuple[str, int], ...]
    gradient_plan: GradientPlan
    gar_plan: str
    partition: str
    solve_s: float
    # the other whole-step plans weighed (the planned partition, the plain plan, the trainer's default at each
    # common degree): other degrees than the chosen ones first, each part fastest modelled first
    alternatives: tuple[StepPrediction, ...] = ()
    check: dict[str, Any] | None = None  # the measured check (fsmoe.train.trainer.check_plan), when it ran

    @property
    def degrees(self) -> tuple[tuple[int, int], ...]:
        """(r_fwd, r_bwd) per MoE layer, as :func:`fsmoe.parallel.parallelize.apply_pipeline` takes them."""
        return tuple((lp.r_fwd, lp.r_bwd) for lp in self.layers)

    def prediction(self, schedule: str) -> StepPrediction:
        for p in self.predictions:
            if p.schedule == schedule:
                return p
        have = ", ".join(p.schedule for p in self.predictions)
        raise KeyError(f"no prediction for schedule {schedule!r}; have {have}")

    @property
    def step_s(self) -> float:
        return self.prediction(self.schedule).step_s

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (no NaN or infinity)."""
        data = {
            "schedule": self.schedule, "tokens": self.tokens, "capacity_gate": self.capacity_gate,
            "step_s": self.step_s, "degrees": [list(d) for d in self.degrees],
            "layers": [lp.to_dict() for lp in self.layers],
            "predictions": {p.schedule: p.to_dict() for p in self.predictions},
            "ready_bytes": dict(self.ready_bytes), "slot_bytes": dict(self.slot_bytes),
            "gar_plan": self.gar_plan, "partition": self.partition, "solve_s": self.solve_s,
            "alternatives": [{**p.to_dict(), "gar_plan": plan_text(p.gradient_plan())} for p in self.alternatives],
            "check": self.check,
        }
        json.dumps(data, allow_nan=False)  # raises on a non-finite number
        return data

    def explain(self) -> str:
        """A compact table: the layers, then every schedule's predicted step, then the gradient plan."""
        ms = 1e3
        lines = [f"plan for {self.schedule}: T={self.tokens} tokens/rank, C={self.capacity_gate} (gate), "
                 f"predicted step {self.step_s * ms:.2f} ms (solved in {self.solve_s * ms:.0f} ms)",
                 f"{'block':>5} {'r_fwd':>5} {'r_bwd':>5} {'C':>6} {'fwd ms':>8} {'bwd ms':>8} {'GAR KiB':>8}  "
                 "bottleneck (fwd / bwd)"]
        for lp in self.layers:
            lines.append(f"{lp.block:>5} {lp.r_fwd:>5} {lp.r_bwd:>5} {lp.capacity:>6} {lp.fwd_s * ms:>8.3f} "
                         f"{lp.bwd_s * ms:>8.3f} {lp.gar_bytes / 1024:>8.1f}  case {lp.case_fwd}: {lp.bottleneck_fwd}"
                         f" / case {lp.case_bwd}: {lp.bottleneck_bwd}")
        lines.append(f"{'schedule':<15} {'step ms':>9} {'fwd ms':>8} {'bwd ms':>8}  degrees")
        for p in self.predictions:
            degrees = sorted(set(p.pairs))
            deg = ", ".join(f"{f}/{b}" for f, b in degrees) if degrees else "-"
            lines.append(f"{p.schedule:<15} {p.step_s * ms:>9.3f} {p.fwd_s * ms:>8.3f} {p.bwd_s * ms:>8.3f}  {deg}")
        launched = ", ".join(f"{s} {n / 1024:.1f} KiB" for s, n in self.slot_bytes if n > 0) or "nothing"
        lines.append(f"gradient plan ({self.partition}): {launched}")
        if self.alternatives:
            weighed = [(" ".join(f"{a}/{b}" for a, b in sorted(set(p.pairs))), p.step_s * ms, p.method.split(":")[0])
                       for p in self.alternatives]
            lines.append("also weighed: " + "; ".join(f"{deg} {t:.2f} ms ({how})" for deg, t, how in weighed))
        if self.check:
            timed = ", ".join(f"{c['label']} {c['median_s'] * ms:.1f} ms (predicted {c['predicted_s'] * ms:.1f})"
                              for c in self.check["candidates"])
            lines.append(f"measured check ({self.check['rounds']} steps each): {timed}; running {self.check['picked']}")
        return "\n".join(lines)


def step_model(spec: ScheduleSpec, job: JobConfig, work: LayerWork, costs: Costs, stream: StreamBytes, *,
               pairs: tuple[tuple[int, int], ...], tables: dict[tuple[str, tuple], LayerTable] | None = None
               ) -> StepModel:
    """The :class:`StepModel` of ``job`` under ``spec`` with every MoE layer free to use any of ``pairs``
    (``tables`` caches the layers' played tables across calls)."""
    tables = {} if tables is None else tables
    key = (spec.name, pairs)
    if key not in tables:  # every MoE layer of a GPT-MoE has the same work: one table per schedule
        tables[key] = layer_table(spec, work, costs, pairs)
    m = job.model
    n_moe = m.num_moe_layers
    return StepModel(spec=spec, blocks=block_work(m, work.tokens), tables=[tables[key]] * n_moe,
                     gate_n=[float(work.n_gate)] * n_moe, head_n=work.tokens * m.vocab_size * m.d_model / 4,
                     costs=costs, stream=stream)


def default_steps(spec: ScheduleSpec, job: JobConfig, work: LayerWork, costs: Costs, layout: StreamLayout,
                  stream: StreamBytes, *, max_degree: int = MAX_DEGREE,
                  tables: dict[tuple[str, tuple], LayerTable] | None = None) -> list[StepPrediction]:
    """The modelled step of ``spec`` as the trainer runs it without a plan, at each common degree
    (r_fwd = r_bwd in every layer; smallest first) with the schedule's default gradient plan."""
    tables = {} if tables is None else tables
    out = []
    for pair in degree_pairs(spec, max_degree):
        if pair[0] != pair[1]:
            continue
        model = step_model(spec, job, work, costs, stream, pairs=(pair,), tables=tables)
        out.append(model.predict(model.run(fixed=model.fixed_plan(default_plan(model, layout))), method="default"))
    return out


def predict_schedule(spec: ScheduleSpec, job: JobConfig, work: LayerWork, costs: Costs, layout: StreamLayout,
                     stream: StreamBytes, *, max_degree: int = MAX_DEGREE,
                     tables: dict[tuple[str, tuple], LayerTable] | None = None) -> StepPrediction:
    """The modelled step of ``spec`` as the trainer runs it without a plan: the best common degree
    (:func:`default_steps`; the smaller on ties) and the schedule's default gradient plan."""
    return _fastest(default_steps(spec, job, work, costs, layout, stream, max_degree=max_degree, tables=tables))


def _fastest(preds: list[StepPrediction]) -> StepPrediction:
    """The fastest modelled step (the first on ties within rounding)."""
    best = preds[0]
    for pred in preds[1:]:
        if pred.step_s < best.step_s * (1 - 1e-12):
            best = pred
    return best


def plan_job(job: JobConfig, costs: Costs, *, tokens: int | None = None, schedule: str = PLANNED,
             max_degree: int = MAX_DEGREE, layout: StreamLayout | None = None, seed: int = 0,
             min_gain: float = 0.0) -> JobPlan:
    """Plan ``job`` for ``schedule`` and predict every schedule's step: fsmoe and fsmoe_no_iio get per-layer
    degrees and a planned partition (or the schedule's default — one degree, the trainer's greedy
    gradient plan — when that is predicted faster) — or the plain plan (r = 1 everywhere, the whole GAR after the
    backward) when that is predicted at most ``min_gain`` (a fraction) slower; the others their best
    common degree and default gradient plan. ``tokens``: T per rank (else the training job's);
    ``layout``: the real model's gradient stream (else :func:`rank_stream` on the meta device).
    Deterministic (``seed`` for differential evolution)."""
    start = time.perf_counter()
    spec = get_schedule(schedule)
    work = layer_work(job, tokens=tokens)
    layout = rank_stream(job) if layout is None else layout
    stream = StreamBytes(layout, replica_sizes(job.parallel))
    tables: dict[tuple[str, tuple], LayerTable] = {}
    predictions = {}
    weighed: dict[str, list[StepPrediction]] = {}
    for name, other in SCHEDULES.items():
        if other.independent_degrees:  # fsmoe, fsmoe_no_iio: per-layer degrees and a planned partition
            model = step_model(other, job, work, costs, stream, pairs=degree_pairs(other, max_degree), tables=tables)
            planned = partition(model, seed=seed)
            defaults = default_steps(other, job, work, costs, layout, stream, max_degree=max_degree, tables=tables)
            default = _fastest(defaults)
            if default.step_s < planned.step_s:  # the trainer's greedy plan at one degree is a candidate too
                gain = planned.step_s / default.step_s - 1.0
                planned = replace(default, method=f"default (greedy at r = {default.pairs[0][0]}/{default.pairs[0][1]}"
                                                  f", {100 * gain:.1f}% faster than {planned.method})")
            flat = step_model(other, job, work, costs, stream, pairs=((1, 1),), tables=tables)
            plain = flat.predict(flat.run(fixed=np.zeros((1, len(stream.slots)))))
            weighed[name] = [planned, replace(plain, method="plain (r = 1, GAR after the backward)"), *defaults]
            gain = plain.step_s / planned.step_s - 1.0
            predictions[name] = planned if gain > min_gain else replace(
                plain, method=f"plain (r = 1, GAR after the backward): the best plan ({planned.method}) was "
                              f"predicted {100 * gain:.1f}% faster, within min_gain {100 * min_gain:g}%")
        else:
            predictions[name] = predict_schedule(other, job, work, costs, layout, stream, max_degree=max_degree,
                                                 tables=tables)
    chosen = predictions[spec.name]
    alternatives: list[StepPrediction] = []  # other degrees first (the model's errors move a degree together)
    ranked = sorted(weighed.get(spec.name, ()), key=lambda p: p.step_s)
    for p in [p for p in ranked if p.pairs != chosen.pairs] + [p for p in ranked if p.pairs == chosen.pairs]:
        if all(_runs_differently(p, q) for q in (chosen, *alternatives)):
            alternatives.append(p)
    moe_blocks = [i for i in range(job.model.n_layers) if job.model.is_moe_layer(i)]
    cache: dict = {}
    layers = tuple(
        describe_layer(spec, work, costs, block=b, r_fwd=pair[0], r_bwd=pair[1], fwd_s=f, bwd_s=bw,
                       gar_bytes=dict(chosen.slot_bytes).get(f"moe:{b}", 0) if spec.gar_in_moe else 0, gar_s=g,
                       max_degree=max_degree, cache=cache)
        for b, pair, f, bw, g in zip(moe_blocks, chosen.pairs, chosen.layer_fwd_s, chosen.layer_bwd_s,
                                     chosen.layer_gar_s, strict=True))
    plan = chosen.gradient_plan()
    ready, prev = [], 0
    for s, n in layout.ready_bytes().items():
        ready.append((s, n - prev))
        prev = n
    return JobPlan(schedule=spec.name, tokens=work.tokens, capacity_gate=work.capacity_gate, layers=layers,
                   predictions=tuple(predictions[n] for n in SCHEDULES), ready_bytes=tuple(ready),
                   slot_bytes=chosen.slot_bytes, gradient_plan=plan, gar_plan=plan_text(plan),
                   partition=chosen.method, solve_s=time.perf_counter() - start, alternatives=tuple(alternatives))


def _runs_differently(a: StepPrediction, b: StepPrediction) -> bool:
    """Whether two whole-step plans run differently: other degrees or another gradient plan."""
    return a.pairs != b.pairs or a.gradient_plan() != b.gradient_plan()


__all__ = ["Algorithm1", "JobPlan", "LayerOption", "LayerPlan", "LayerPrediction", "MAX_DEGREE", "algorithm1",
           "default_steps", "describe_layer", "layer_options", "plan_job", "plan_layer", "predict_layer",
           "predict_schedule", "step_model"]
