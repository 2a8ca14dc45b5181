"""Fitting α-β lines to timed calls: the sweep (sizes, repetitions, slowest rank, busy variant) and least squares.

Paper §3.2 and §6.2 (digest §1.4): each operation is timed over a range of sizes n and fitted by ordinary
least squares to t = α + β·n; the paper reports R² per operation (0.9987 for GEMM, ≥ 0.9999 for the
collectives on its GPUs). :mod:`fsmoe.perf.profile` says *what* to time (one :class:`Point` per size of an
operation, built by a builder that takes the size fractions and a scale); this module says *how*:

* :func:`measure` sweeps one operation on every rank within a share of the time budget: a probe call
  estimates a round, then fewer repetitions (down to ``MIN_REPS``; never fewer than two rounds, the
  second skipped past twice the share), only the sizes of r ∈ {1, 2, 4, 8} (``FEW_FRACTIONS``), and
  smaller sizes (last resort) when the share is tight; rounds visit the sizes in
  a rotated order, each sample starts after a world barrier, each round is MAX all-reduced (a collective
  ends when its last rank does), the line is fitted to the median per size, and a fit with R² below
  ``TARGET_R2`` gets extra rounds while its share lasts. Every branch is taken on all-reduced numbers,
  so all ranks enter the same collectives.
* :class:`ComputeBeside` runs a point's ``busy`` compute (expert GEMMs) on a thread, once per sample,
  started with the collective, and times it: the busy variant of a collective's line. The compute may
  end before the collective does (a chunk's GEMMs beside a longer AlltoAll, a layer's beside the
  Gradient-AllReduce), so a busy sample is only partly overlapped; :func:`slowdown` turns (busy time,
  compute time, idle time) into the factor κ by which full overlap stretches the collective, and
  :func:`contended_line` makes the busy line κ × the idle line, κ the median over the sizes. The same
  samples, read the other way round, say how much the collective slowed the compute
  (:func:`compute_slowdown`, σ): on shared cores both slow.
* :func:`fit_linear` is the least squares, with one constraint the models need: α and β are never
  negative (a negative start-up time, or a time that falls with the workload, is noise in the smallest
  points). When the unconstrained fit leaves the feasible set, the best line with the offending
  coefficient at 0 is taken instead (through the origin, or the mean); R² is always that of the returned
  line, so a constrained fit shows its cost there. :func:`fit_linear`, :func:`r_squared`, :func:`slowdown`,
  :func:`contended_line` and :func:`compute_slowdown` are pure.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsmoe.parallel.comm import collective_device
from fsmoe.perf.costs import ZERO, Linear

FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)  # of the job's size: the chunks of r = 8, 4, 2, 1 and between
FEW_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)  # when the budget is tight: r ∈ {8, 4, 2, 1} only
MIN_REPS, PLANNED_REPS, MAX_REPS = 3, 5, 40  # the paper averages 5 runs per point
TARGET_R2 = 0.99  # below it, extra rounds while the measurement's share of the budget lasts


def r_squared(n: Sequence[float], t: Sequence[float], alpha_s: float, beta_s: float) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot of t ≈ α + β·n. Constant ``t``: 1 when the line
    reproduces it exactly, else 0."""
    mean = math.fsum(t) / len(t)
    ss_res = math.fsum((y - alpha_s - beta_s * x) ** 2 for x, y in zip(n, t, strict=True))
    ss_tot = math.fsum((y - mean) ** 2 for y in t)
    if ss_tot == 0.0:
        return 1.0 if ss_res <= 1e-30 else 0.0
    return 1.0 - ss_res / ss_tot


def fit_linear(n: Sequence[float], t: Sequence[float]) -> Linear:
    """The least-squares line t ≈ α + β·n over the points (n_i, t_i), with α, β ≥ 0 (see the module doc).

    β = Σ(n − n̄)(t − t̄) / Σ(n − n̄)², α = t̄ − β·n̄. One distinct n gives β = 0, α = t̄.
    ``ValueError`` for no points, unequal lengths or a non-finite value."""
    if len(n) != len(t):
        raise ValueError(f"fit_linear: {len(n)} sizes but {len(t)} times")
    if not n:
        raise ValueError("fit_linear: no points to fit")
    if not all(math.isfinite(v) for v in (*n, *t)):
        raise ValueError(f"fit_linear: non-finite value in sizes {list(n)} or times {list(t)}")
    k = len(n)
    n_mean, t_mean = math.fsum(n) / k, math.fsum(t) / k
    s_nn = math.fsum((x - n_mean) ** 2 for x in n)
    s_nt = math.fsum((x - n_mean) * (y - t_mean) for x, y in zip(n, t, strict=True))
    beta = s_nt / s_nn if s_nn > 0 else 0.0
    alpha = t_mean - beta * n_mean
    if beta < 0:  # time does not grow with the workload here: the best constant
        alpha, beta = t_mean, 0.0
    elif alpha < 0:  # the best line through the origin: β = Σ n·t / Σ n²
        s_xx = math.fsum(x * x for x in n)
        alpha, beta = 0.0, (math.fsum(x * y for x, y in zip(n, t, strict=True)) / s_xx if s_xx > 0 else 0.0)
    alpha, beta = max(alpha, 0.0), max(beta, 0.0)
    return Linear(alpha_s=alpha, beta_s=beta, r2=r_squared(n, t, alpha, beta))


MAX_SLOWDOWN = 10.0  # κ of one size when the collective grew by about as long as the compute beside it ran


def slowdown(busy_s: float, beside_s: float, idle_s: float) -> float:
    """κ ≥ 1: how much slower a collective runs while compute runs beside it on the same cores, from one
    busy measurement. The collective (``idle_s`` alone) ran ``busy_s`` with ``beside_s`` of compute
    started with it. If the compute outlasted it, all of it was overlapped: κ = busy / idle. Else it
    progressed at 1/κ for ``beside_s`` and at full speed after: busy = beside + (idle − beside/κ), so
    κ = beside / (idle − busy + beside) — at most :data:`MAX_SLOWDOWN` (the denominator is noise-sized
    when the collective grew by about the compute's length)."""
    if idle_s <= 0 or busy_s <= 0:
        return 1.0
    if beside_s >= busy_s:
        kappa = busy_s / idle_s
    else:
        rest = idle_s - busy_s + beside_s
        kappa = beside_s / rest if rest > beside_s / MAX_SLOWDOWN else MAX_SLOWDOWN
    return min(max(kappa, 1.0), MAX_SLOWDOWN)


def contended_line(idle: Linear, n: Sequence[float], busy_s: Sequence[float], beside_s: Sequence[float]) -> Linear:
    """The collective fully overlapped with compute: ``idle`` × κ, κ the median of :func:`slowdown` over
    the sizes ``n`` (one factor per operation: robust where single busy samples are noisy), R² that of
    the returned line against each size's fully-overlapped time κ_i·idle(n_i)."""
    kappas = [slowdown(b, c, idle(x)) for x, b, c in zip(n, busy_s, beside_s, strict=True)]
    k = statistics.median(kappas)
    line = idle.scaled(k)
    return Linear(alpha_s=line.alpha_s, beta_s=line.beta_s,
                  r2=r_squared(n, [ki * idle(x) for ki, x in zip(kappas, n, strict=True)], line.alpha_s, line.beta_s))


def compute_slowdown(compute: Linear, busy_n: Sequence[float], beside_s: Sequence[float],
                     busy_s: Sequence[float]) -> float:
    """σ ≥ 1: how much slower compute runs while a collective runs beside it, from the same busy samples
    as :func:`contended_line` with the roles swapped: the compute of ``busy_n`` MACs (``compute`` alone)
    ran ``beside_s`` while the collective ran ``busy_s``; :func:`slowdown` of each size (the compute
    fully overlapped when the collective outlasted it, else progressing at 1/σ while it ran), the median
    over the sizes."""
    return statistics.median(slowdown(c, b, compute(x)) for x, c, b in zip(busy_n, beside_s, busy_s, strict=True))


# --- the sweep -----------------------------------------------------------------------------------------
def sweep_sizes(base: int, fractions: Sequence[float], scale: float = 1.0) -> list[int]:
    """Distinct sizes ⌈base·f·scale⌉ ≥ 1; at least three (1, 2, 3, 4 when ``base`` is that small)."""
    vals = sorted({max(1, math.ceil(base * f * scale)) for f in fractions})
    return vals if len(vals) >= 3 else [1, 2, 3, 4]


def nothing() -> None:
    return None


@dataclass(kw_only=True, frozen=True)
class Point:
    """One size of one operation: ``run`` is timed, ``prepare`` (untimed) runs before it, ``busy`` is the
    compute that a busy measurement runs beside it on another thread, ``busy_n`` its workload (MACs)."""

    n: float
    run: Callable[[], object]
    prepare: Callable[[], object] = nothing
    busy: Callable[[], object] = nothing
    busy_n: float = 0.0


def world_size() -> int:
    """The ranks taking part: the initialised world, or this process alone."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def max_all(values: Sequence[float]) -> list[float]:
    """Every rank's values, element-wise maximum over the world: the slowest rank's, the same everywhere."""
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device() if world_size() > 1 else None)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class ComputeBeside:
    """A thread that runs one point's ``busy`` compute once per sample, started together with the timed
    collective (:meth:`start`) and awaited after it (:meth:`wait`, untimed; ``last_s`` is how long the
    compute ran): chunk i's expert GEMMs beside
    chunk i+1's collective, as the pipelined runtime overlaps them (compute on the calling thread,
    collectives on lane threads; torch's GEMMs and gloo both release the GIL). One call per sample, not a
    loop: a compute loop that never pauses keeps every core's run queue full and makes a shaped AlltoAll
    10-30× slower here, far beyond what the pipeline meets (1.4-2.5×)."""

    def __init__(self) -> None:
        self._work: Callable[[], object] = nothing
        self._go, self._done = threading.Event(), threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self.last_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="fsmoe-profile-busy", daemon=True)

    def _loop(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._closing:
                return
            try:
                t0 = time.perf_counter()
                self._work()
                self.last_s = time.perf_counter() - t0
            except BaseException as e:  # raised again on the calling thread
                self._error = e
            self._done.set()

    def start(self, work: Callable[[], object]) -> None:
        self._done.clear()
        self._work = work
        self._go.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise RuntimeError("the compute beside a busy measurement failed") from self._error

    def __enter__(self) -> ComputeBeside:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self._go.set()
        self._thread.join()


def timed_sample(point: Point, beside: ComputeBeside | None = None) -> tuple[float, float]:
    """One sample: (seconds around the run — prepare, and the compute beside it finishing —, seconds of
    the run). The run starts right after a world barrier; with ``beside``, the point's ``busy`` compute
    starts with it."""
    t0 = time.perf_counter()
    point.prepare()
    extra = time.perf_counter() - t0
    barrier()
    if beside is not None:
        beside.start(point.busy)
    t0 = time.perf_counter()
    point.run()
    t1 = time.perf_counter()
    if beside is not None:
        beside.wait()
    return extra + time.perf_counter() - t1, t1 - t0


@dataclass(kw_only=True, frozen=True)
class Measured:
    """One operation's sweep: sizes, the slowest rank's median seconds per size, rounds, the fitted line,
    the seconds it took (max over ranks) and its largest size over the job's (below 1: scaled down to fit
    the budget; sizes with a floor, such as one sequence, may not shrink); with compute beside it,
    ``beside_s`` the median seconds that compute ran per size (the slowest rank's per sample) and
    ``busy_n`` its workload per size."""

    n: tuple[float, ...]
    median_s: tuple[float, ...]
    reps: int
    line: Linear
    seconds: float
    scale: float
    beside_s: tuple[float, ...] | None = None
    busy_n: tuple[float, ...] | None = None


def measure(build: Callable[[Sequence[float], float], list[Point]], share_s: float, barrier_s: float,
            beside: ComputeBeside | None = None) -> Measured:
    """Sweep one operation within about ``share_s`` seconds (see the module doc). ``build(fractions,
    scale)`` gives its points (sizes ascending); ``barrier_s`` is what a barrier costs (per sample);
    ``beside``: run each point's ``busy`` compute beside it. Collective: every rank calls it alike."""
    t_start = time.perf_counter()
    fractions, scale = FRACTIONS, 1.0
    points = build(fractions, scale)
    timed_sample(points[0], beside)  # warm-up: lazy initialisation, first touch of the buffers
    extra0, run0 = max_all(timed_sample(points[0], beside))
    n0, n_full = points[0].n, points[-1].n

    def round_s(pts: list[Point]) -> float:  # t(n) ≈ t(n0)·n/n0: an upper bound for n ≥ n0 when α ≥ 0
        return sum((extra0 + run0) * p.n / n0 + barrier_s for p in pts)

    if MIN_REPS * round_s(points) > share_s:
        fractions = FEW_FRACTIONS
        points = build(fractions, scale)
    if MIN_REPS * round_s(points) > share_s:
        scale = max(share_s / (MIN_REPS * round_s(points)), 1e-3)
        points = build(fractions, scale)
    reps = int(min(max(share_s // max(round_s(points), 1e-9), MIN_REPS), PLANNED_REPS))
    timed_sample(points[-1], beside)  # warm-up at the largest size
    samples: list[list[float]] = [[] for _ in points]
    beside_samples: list[list[float]] = [[] for _ in points]
    elapsed = 0.0
    rounds = 0
    line = ZERO

    def fit() -> Linear:
        return fit_linear([p.n for p in points], [statistics.median(s) for s in samples])

    def next_round_fits(limit_s: float) -> bool:  # the rounds so far, one more, within limit_s
        return elapsed * (rounds + 1) / rounds <= limit_s

    # the planned rounds (at least two, even when the probe underestimated: then within twice the share),
    # then more while the fit is poor and the share lasts
    while (rounds < reps and (rounds < 2 or next_round_fits(2 * share_s))) or (
            line.r2 is not None and line.r2 < TARGET_R2 and rounds < MAX_REPS and next_round_fits(share_s)):
        dts, cts = [0.0] * len(points), [0.0] * len(points)
        for k in range(len(points)):
            i = (k + rounds) % len(points)  # rotated order: a disturbance hits different sizes each round
            dts[i] = timed_sample(points[i], beside)[1]
            cts[i] = beside.last_s if beside is not None else 0.0
        *both, elapsed = max_all([*dts, *cts, time.perf_counter() - t_start])
        dts, cts = both[:len(points)], both[len(points):]
        for i, (dt, ct) in enumerate(zip(dts, cts, strict=True)):
            samples[i].append(dt)
            beside_samples[i].append(ct)
        rounds += 1
        if rounds >= min(reps, 2):
            line = fit()
    return Measured(n=tuple(p.n for p in points), median_s=tuple(statistics.median(s) for s in samples),
                    reps=rounds, line=line, seconds=elapsed, scale=points[-1].n / n_full,
                    beside_s=tuple(statistics.median(s) for s in beside_samples) if beside is not None else None,
                    busy_n=tuple(p.busy_n for p in points) if beside is not None else None)


def barrier_seconds() -> float:
    """What a world barrier costs (the slowest rank's median of five)."""
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        barrier()
        samples.append(time.perf_counter() - t0)
    return max_all([statistics.median(samples)])[0]
