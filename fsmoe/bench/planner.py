"""Planner accuracy: predicted vs measured over many layer configurations (``benchmarks/planner_accuracy.py``).

Legend: T tokens per rank, D model dim, H expert hidden, E experts, k top-k, C capacity slots, EP × ESP the
layout, r pipeline degree (r_fwd forward, r_bwd backward).

Each :class:`AccuracyCase` is one ``fsmoe bench layer`` run (:func:`~fsmoe.bench.layer.run_layer_bench`) of
the layer-benchmark recipe with the case's overrides: schedules ``sequential``, ``tutel``,
``fsmoe_no_iio`` and ``fsmoe`` at the degrees of :class:`AccuracySettings` (``fsmoe`` also at the mixed
pairs) plus the ``fsmoe auto`` row, without DeepSpeed-MoE and without the memory pass. Per case
(:func:`case_record`, pure, from that run's payload):

* ``median_abs_error``: the median over the rows of ours of \\|predicted / measured − 1\\| (the α-β model
  of :mod:`fsmoe.bench.layer_predict`); split by rows at r = 1 (``sequential``, ``r=1``: no overlap, idle
  lines) and pipelined rows (busy lines, chunking).
* ``probe_errors``: each lower-bound probe (one operation alone, same shapes) against its profiled
  line at that size — whether the α-β lines themselves are right; ``sequential_unmodelled``: the
  ``sequential`` row's measured time over the sum of its operations' probes (what a step costs beyond
  its operations: capacity agreement, autograd, copies).
* ``auto_over_best``: the ``fsmoe auto`` row's median over the best measured ``fsmoe`` row (auto
  included) — the planner's (r_fwd, r_bwd) is "within 5%" when ≤ 1.05; ``twin_over_auto``: the grid row at
  the same degrees (when the grid has it) over the auto row, the noise between two runs of the same thing.
* ``auto_over_sequential``: measured; the issue's target is ≤ 1.02.
* Noise (:func:`noise_record`, from the rows' per-round samples; every row runs once in every round):
  ``auto_over_best_heldout`` picks the best ``fsmoe`` row on half of the rounds and times it and the auto
  row on the other half (both halves, geometric mean): the minimum over many noisy rows is biased low (the
  winner's curse), this is not. ``auto_over_best_ci`` (of the held-out ratio) and ``auto_over_sequential_ci``:
  90% bootstrap intervals (rounds resampled, the same rounds for every row). ``best_verdict`` (held-out;
  raw with a single round) and ``sequential_verdict``: ``met`` at or under the target, ``missed`` when the
  whole interval is above it, ``noise`` in between.
* The measured check (:func:`model_record`; the layer benchmark's ``plan.tune``): ``model_pick`` the
  model's own choice, ``tune_changed`` whether the check moved the auto row off it, and
  ``model_over_best`` / ``model_over_best_heldout`` that choice's measured row over the best — the
  planner without the check.
* ``solve_ms_rank``: :func:`fsmoe.perf.planner.plan_layer`'s wall time on rank 0 during the run (the other
  ranks solve at the same time on the shared cores); ``solve_ms_alone``: the median of
  :data:`RESOLVE_TIMES` re-solves from the same costs in this process (and whether they agree).

:func:`run_planner_accuracy` runs the cases one after another, prints one table and a summary line,
writes ``planner_accuracy.json`` (and every case's own ``layer.json`` under ``cases/<name>/``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsmoe.bench.layer import check_layer_job, layer_impls, run_layer_bench
from fsmoe.bench.layer_predict import bench_work, gar_bytes, plan_auto, relative_error
from fsmoe.bench.report import Table, env_info, write_json
from fsmoe.config import JobConfig, layer_bench_recipe
from fsmoe.config.files import load_toml
from fsmoe.perf.costs import Costs

WITHIN_BEST = 1.05  # the planner's pair within 5% of the measured best fsmoe row
VS_SEQUENTIAL = 1.02  # fsmoe auto never more than 2% slower than sequential
TARGET_ERROR = 0.10  # median |error|
TARGET_SOLVE_MS = 20.0  # per layer
RESOLVE_TIMES = 5
BOOTSTRAP = 2000  # resamples of the rounds for the intervals (:func:`heldout_noise`, :func:`ratio_noise`)
CI = 0.90  # their coverage
BUSY_MACHINE = 0.10  # share of the CPU outside our ranks above which a case's times are suspect
SCHEDULES = ("sequential", "tutel", "fsmoe_no_iio", "fsmoe")


@dataclass(kw_only=True, frozen=True)
class AccuracyCase:
    """One layer configuration: a short ``name`` and the job keys it changes (``section.field`` → value)
    on the layer-benchmark recipe."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def case(name: str, **keys: Any) -> AccuracyCase:
    """``case("t1k", tokens=1024, link="200mbit")`` — short keys for the fields the cases vary."""
    short = {"tokens": "bench.tokens", "d": "model.d_model", "h": "moe.d_hidden", "e": "moe.num_experts",
             "k": "moe.top_k", "ep": "parallel.ep", "esp": "parallel.esp", "link": "cluster.link"}
    unknown = set(keys) - set(short)
    if unknown:
        raise ValueError(f"case {name!r}: unknown keys {sorted(unknown)}; use {', '.join(short)}")
    return AccuracyCase(name=name, overrides={short[k]: v for k, v in keys.items()})


# Base: T=512, D=256, H=512, E=4, k=2, f=1.2 (C=308), EP=4 on 2 nodes x 2 ranks, 1 Gbit/s links. Sizes are
# chosen so that one fwd+bwd of every row takes ~0.05-0.4 s on 2 shared cores, with compute-bound,
# AlltoAll-bound and ESP layouts among them.
BASE = {"tokens": 512, "d": 256, "h": 512, "e": 4, "k": 2}
DEFAULT_CASES: tuple[AccuracyCase, ...] = (
    case("base", **BASE),
    case("base 200M", **{**BASE, "link": "200mbit"}),
    case("esp2", **{**BASE, "ep": 2, "esp": 2}),
    case("esp2 200M", **{**BASE, "ep": 2, "esp": 2, "link": "200mbit"}),
    case("T1024", **{**BASE, "tokens": 1024}),
    case("T256 200M", **{**BASE, "tokens": 256, "link": "200mbit"}),
    case("H2048", **{**BASE, "h": 2048}),
    case("D512 H1024", **{**BASE, "tokens": 256, "d": 512, "h": 1024}),
    case("E8", **{**BASE, "e": 8}),
    case("E8 k1 esp2 200M", **{**BASE, "e": 8, "k": 1, "ep": 2, "esp": 2, "link": "200mbit"}),
    case("k1", **{**BASE, "k": 1}),
    case("E8 T1024 esp2", **{**BASE, "e": 8, "tokens": 1024, "ep": 2, "esp": 2}),
    case("D128 H256 T256", tokens=256, d=128, h=256, e=4, k=2),
    case("D512 200M", **{**BASE, "d": 512, "tokens": 256, "link": "200mbit"}),
)
TINY = {"tokens": 128, "d": 64, "h": 128, "e": 4, "k": 2}
QUICK_CASES: tuple[AccuracyCase, ...] = (
    case("tiny", **TINY),
    case("tiny 200M", **{**TINY, "link": "200mbit"}),
    case("tiny esp2", **{**TINY, "ep": 2, "esp": 2}),
)


@dataclass(kw_only=True, frozen=True)
class AccuracySettings:
    """How every case runs: ``launcher`` (``emulated`` needs root; ``local`` is loopback, unshaped),
    ``nproc`` ranks of ``procs_per_node``, ``warmup`` + ``reps`` rounds, the degree grid, the profile's
    budget and cache (None: the ``plan`` section's default), ``reprofile``, results under ``out``;
    ``schedules`` the rows' schedules (``fsmoe`` and ``sequential`` always: the targets compare them);
    ``tune`` / ``tune_rounds`` the measured check's (None: the ``plan`` section's; ``tune`` 1: none)."""

    launcher: str = "emulated"
    nproc: int = 4
    procs_per_node: int = 2
    reps: int = 10  # rounds: with 4, rows running the same code measured 5% apart in the median configuration
    warmup: int = 1
    degrees: tuple[int, ...] = (1, 2, 4, 8)
    mixed_degrees: tuple[tuple[int, int], ...] = ((2, 4), (4, 2), (4, 8), (8, 4))
    dense_grad_mb: float = 1.0
    profile_budget_s: float = 10.0
    profile_cache: str | None = None
    reprofile: bool = False
    timeout_s: float = 600.0
    out: str = "bench_results/planner_accuracy"
    schedules: tuple[str, ...] = SCHEDULES
    tune: int | None = None  # the measured check's degree pairs and rounds (None: the plan section's default)
    tune_rounds: int | None = None

    def __post_init__(self) -> None:
        missing = [name for name in ("sequential", "fsmoe") if name not in self.schedules]
        if missing:
            raise ValueError(f"planner accuracy: schedules {list(self.schedules)} lack {missing}; the targets "
                             "compare the fsmoe auto row with the fsmoe grid and with sequential")


QUICK_SETTINGS = AccuracySettings(reps=1, warmup=1, degrees=(1, 2), mixed_degrees=((1, 2),), dense_grad_mb=0.125,
                                  profile_budget_s=3.0, timeout_s=180.0, out="bench_results/planner_accuracy_quick")


def case_job(c: AccuracyCase, settings: AccuracySettings) -> JobConfig:
    """The ``fsmoe bench layer`` job of one case (EP over every rank unless the case says otherwise)."""
    s = settings
    keys: dict[str, Any] = {
        "parallel.nproc": s.nproc, "parallel.procs_per_node": s.procs_per_node, "parallel.ep": s.nproc,
        "parallel.esp": 1, "cluster.launcher": s.launcher, "bench.schedules": s.schedules, "bench.degrees": s.degrees,
        "bench.mixed_degrees": s.mixed_degrees, "bench.deepspeed": False, "bench.memory": False, "bench.reps": s.reps,
        "bench.warmup": s.warmup, "bench.dense_grad_mb": s.dense_grad_mb, "bench.timeout_s": s.timeout_s,
        "plan.profile_budget_s": s.profile_budget_s, "plan.reprofile": s.reprofile,
        "run.out": str(Path(s.out) / "cases" / _slug(c.name)),
    }
    given = {"plan.profile_cache": s.profile_cache, "plan.tune": s.tune, "plan.tune_rounds": s.tune_rounds}
    for key, value in given.items():
        if value is not None:
            keys[key] = value
    if "parallel.esp" in c.overrides and "parallel.ep" not in c.overrides:
        keys["parallel.ep"] = s.nproc // c.overrides["parallel.esp"]
    return layer_bench_recipe().with_overrides({**keys, **c.overrides})


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


# --- one case's record (pure) ----------------------------------------------------------------------------------
def probe_predictions(job: JobConfig, costs: Costs) -> dict[str, float]:
    """Each lower-bound probe of :mod:`fsmoe.bench.layer` as the profiled lines predict it (idle lines:
    a probe runs alone), by probe name."""
    w = bench_work(job)
    out = {"experts fwd+bwd": costs.op("expert_fwd")(w.n_exp) + costs.op("expert_bwd")(w.n_exp),
           "gate+order fwd+bwd": costs.op("gate_fwd")(w.n_gate) + costs.op("gate_bwd")(w.n_gate)}
    if w.n_ag:
        out["ESP AllGather+ReduceScatter"] = costs.op("ag")(w.n_ag) + costs.op("rs")(w.n_rs)
    if w.n_a2a:
        out["EP AlltoAll"] = costs.op("a2a")(w.n_a2a)
    if gar_bytes(job):
        out["dense GAR"] = costs.op("gar")(gar_bytes(job))
    return out


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _heldout_logs(rows: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """log(row 0 / best candidate) per resample: ``rounds`` (resamples × n) of the round indices, the best
    of ``rows[1:]`` chosen by the median over the even positions and all timed over the odd ones, then
    the other way round; the mean of the two logs."""
    out = np.zeros(rounds.shape[0])
    halves = (rounds[:, 0::2], rounds[:, 1::2])
    for pick, judge in (halves, halves[::-1]):
        best = 1 + np.argmin(np.median(rows[1:][:, pick], axis=-1), axis=0)  # per resample
        timed = np.median(rows[:, judge], axis=-1)  # rows × resamples
        out += np.log(timed[0] / timed[best, np.arange(rounds.shape[0])]) / 2
    return out


def heldout_over_best(auto: Sequence[float], candidates: Sequence[Sequence[float]]) -> float:
    """``auto``'s time over the best candidate's, the best chosen on the even rounds and both timed on the
    odd ones, then the other way round; the geometric mean of the two ratios. Unlike the best median over
    all rounds it is not biased low by the choice (the rows' samples are per round, aligned)."""
    rows = np.asarray([auto, *candidates], dtype=float)
    if rows.shape[1] < 2:
        raise ValueError(f"heldout_over_best: need at least 2 rounds, got {rows.shape[1]}")
    return float(np.exp(_heldout_logs(rows, np.arange(rows.shape[1])[None, :])[0]))


def _resampled(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def heldout_noise(auto: Sequence[float], candidates: Sequence[Sequence[float]], *, resamples: int = BOOTSTRAP,
                  ci: float = CI, seed: int = 0) -> tuple[float, float]:
    """A ``ci`` bootstrap interval of :func:`heldout_over_best`: the rounds resampled with replacement (the
    same rounds for every row, as they ran), ``resamples`` times; deterministic."""
    rows = np.asarray([auto, *candidates], dtype=float)
    ratios = np.exp(_heldout_logs(rows, _resampled(rows.shape[1], resamples, seed)))
    lo, hi = np.quantile(ratios, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def ratio_noise(num: Sequence[float], den: Sequence[float], *, resamples: int = BOOTSTRAP, ci: float = CI,
                seed: int = 0) -> tuple[float, float]:
    """A ``ci`` bootstrap interval of median(num) / median(den), the rounds resampled as in
    :func:`heldout_noise`."""
    rows = np.asarray([num, den], dtype=float)
    med = np.median(rows[:, _resampled(rows.shape[1], resamples, seed)], axis=-1)
    lo, hi = np.quantile(med[0] / med[1], [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def verdict(ratio: float | None, interval: tuple[float, float] | None, target: float) -> str | None:
    """``met`` (ratio ≤ target), ``noise`` (above, but the interval reaches it) or ``missed``."""
    if ratio is None:
        return None
    if ratio <= target:
        return "met"
    return "noise" if interval is not None and interval[0] <= target else "missed"


def case_record(c: AccuracyCase, job: JobConfig, payload: dict[str, Any], *, resolve: bool = True) -> dict[str, Any]:
    """What one case shows (see the module doc), from its ``run_layer_bench`` payload."""
    rows = [r for r in payload["implementations"] if r.get("predicted_s") is not None]
    by_name = {r["name"]: r for r in payload["implementations"]}
    errors = {r["name"]: r["predicted_error"] for r in rows}
    flat = [r for r in rows if r["family"] == "sequential" or max(r["r_fwd"], r["r_bwd"]) == 1]
    piped = [r for r in rows if r not in flat]
    costs = Costs.from_dict(payload["costs"])
    probes = {p["name"]: p for p in payload["lower_bound"]["probes"]}
    probe_errors = {name: relative_error(pred, probes[name]["median_s"])
                    for name, pred in probe_predictions(job, costs).items() if name in probes}
    seq = by_name.get("sequential")
    ops_s = sum(p["count"] * p["median_s"] for p in probes.values())
    auto = payload.get("auto")
    auto_row = by_name.get(auto["name"]) if auto else None
    fsmoe_rows = [r for r in payload["implementations"] if r["family"] == "fsmoe"]
    best = min(fsmoe_rows, key=lambda r: (r["median_s"], r["name"])) if fsmoe_rows else None
    twin = None  # the same degrees measured again (the noise floor); not when the auto row moved its GAR
    if auto_row is not None and not auto.get("gar_after"):
        twin = next((r for r in fsmoe_rows if not r.get("auto") and (r["r_fwd"], r["r_bwd"]) ==
                     (auto_row["r_fwd"], auto_row["r_bwd"])), None)
    record: dict[str, Any] = {
        "name": c.name, "overrides": dict(c.overrides),
        "config": {"tokens": job.bench.tokens, "d_model": job.model.d_model, "d_hidden": job.moe.d_hidden,
                   "experts": job.moe.num_experts, "top_k": job.moe.top_k, "ep": job.parallel.ep,
                   "esp": job.parallel.esp, "link": job.cluster.link, "capacity": payload["capacity"]},
        "cluster": payload["cluster"],
        "rows": [{"name": r["name"], "median_s": r["median_s"], "predicted_s": r["predicted_s"],
                  "error": r["predicted_error"]} for r in rows],
        "median_abs_error": _median([abs(e) for e in errors.values()]),
        "median_error": _median(list(errors.values())),
        "median_abs_error_r1": _median([abs(r["predicted_error"]) for r in flat]),
        "median_abs_error_pipelined": _median([abs(r["predicted_error"]) for r in piped]),
        "probe_errors": probe_errors,
        "sequential_unmodelled": seq["median_s"] / ops_s if seq and ops_s > 0 else None,
        "auto": auto,
        "auto_median_s": auto_row["median_s"] if auto_row else None,
        "best_fsmoe": best["name"] if best else None,
        "best_fsmoe_s": best["median_s"] if best else None,
        "auto_over_best": auto_row["median_s"] / best["median_s"] if auto_row and best else None,
        "twin_over_auto": twin["median_s"] / auto_row["median_s"] if twin and auto_row else None,
        "auto_over_sequential": auto_row["median_s"] / seq["median_s"] if auto_row and seq else None,
        "solve_ms_rank": 1e3 * auto["solve_s"] if auto else None,
        "profile": payload.get("profile"),
        "other_load_share": (payload.get("other_load") or {}).get("share"),
        "wall_s": payload.get("wall_s"),
    }
    record["within_5pct"] = None if record["auto_over_best"] is None else record["auto_over_best"] <= WITHIN_BEST
    record["auto_ok_vs_sequential"] = (None if record["auto_over_sequential"] is None
                                       else record["auto_over_sequential"] <= VS_SEQUENTIAL)
    record.update(noise_record(auto_row, fsmoe_rows, seq, record))
    record.update(model_record(auto, by_name, fsmoe_rows, best))
    if resolve and auto:
        times, same = [], True
        for _ in range(RESOLVE_TIMES):
            again = plan_auto(job, costs)
            times.append(again.solve_s)
            same &= (again.impl.r_fwd, again.impl.r_bwd) == (auto["r_fwd"], auto["r_bwd"])
        record["solve_ms_alone"] = 1e3 * statistics.median(times)
        record["resolve_same_degrees"] = same
    return record


def noise_record(auto_row: dict[str, Any] | None, fsmoe_rows: Sequence[dict[str, Any]],
                 seq: dict[str, Any] | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """The noise keys of a case record (module doc) from the rows' per-round samples."""
    out: dict[str, Any] = {"auto_over_best_heldout": None, "auto_over_best_ci": None, "auto_over_sequential_ci": None}
    rounds = len(auto_row["samples_s"]) if auto_row and auto_row.get("samples_s") else 0
    if rounds >= 2 and fsmoe_rows:
        grid = [r["samples_s"] for r in fsmoe_rows]
        out["auto_over_best_heldout"] = heldout_over_best(auto_row["samples_s"], grid)
        out["auto_over_best_ci"] = heldout_noise(auto_row["samples_s"], grid)
        if seq is not None:
            out["auto_over_sequential_ci"] = ratio_noise(auto_row["samples_s"], seq["samples_s"])
    heldout = out["auto_over_best_heldout"]
    out["best_verdict"] = verdict(record["auto_over_best"] if heldout is None else heldout, out["auto_over_best_ci"],
                                  WITHIN_BEST)
    out["sequential_verdict"] = verdict(record["auto_over_sequential"], out["auto_over_sequential_ci"], VS_SEQUENTIAL)
    return out


def model_record(auto: dict[str, Any] | None, by_name: Mapping[str, dict[str, Any]],
                 fsmoe_rows: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """The model's own choice before the measured check (module doc): its name, whether the check
    moved the auto row off it, and its measured row over the best (raw and held-out) — the auto row
    itself when the check kept it (or did not run), else the row the benchmark timed for it."""
    out: dict[str, Any] = {"model_pick": None, "tune_changed": None, "model_over_best": None,
                           "model_over_best_heldout": None}
    if not auto:
        return out
    tune = auto.get("tune")
    changed = bool(tune) and tune["picked"] != tune["model"]
    out["model_pick"] = tune["model"] if tune else auto["name"].replace(" auto", "")
    out["tune_changed"] = changed if tune else None
    row = by_name.get(out["model_pick"]) if changed else by_name.get(auto["name"])
    if row is not None and best is not None:
        out["model_over_best"] = row["median_s"] / best["median_s"]
        if len(row.get("samples_s") or ()) >= 2:
            out["model_over_best_heldout"] = heldout_over_best(row["samples_s"], [r["samples_s"] for r in fsmoe_rows])
    return out


def _count_within(values: Sequence[float | None], target: float) -> str | None:
    known = [v for v in values if v is not None]
    return f"{sum(v <= target for v in known)}/{len(known)}" if known else None


def summarize_accuracy(records: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Totals over the cases."""
    def count(key: str) -> str:
        vals = [r[key] for r in records if r.get(key) is not None]
        return f"{sum(vals)}/{len(vals)}"

    all_errors = [abs(row["error"]) for r in records for row in r["rows"] if row["error"] is not None]
    solves = [r["solve_ms_rank"] for r in records if r.get("solve_ms_rank") is not None]
    alone = [r["solve_ms_alone"] for r in records if r.get("solve_ms_alone") is not None]
    probe_names = sorted({n for r in records for n in r["probe_errors"]})
    median_error = _median(all_errors)
    twins = [abs(r["twin_over_auto"] - 1.0) for r in records if r.get("twin_over_auto") is not None]
    return {
        "cases": len(records),
        "median_abs_error": median_error,
        "median_of_case_medians": _median([r["median_abs_error"] for r in records
                                           if r["median_abs_error"] is not None]),
        "median_abs_error_r1": _median([r["median_abs_error_r1"] for r in records
                                        if r["median_abs_error_r1"] is not None]),
        "median_abs_error_pipelined": _median([r["median_abs_error_pipelined"] for r in records
                                               if r["median_abs_error_pipelined"] is not None]),
        "median_error_signed": _median([row["error"] for r in records for row in r["rows"]
                                        if row["error"] is not None]),
        "probe_median_errors": {n: _median([r["probe_errors"][n] for r in records
                                            if r["probe_errors"].get(n) is not None]) for n in probe_names},
        "sequential_unmodelled": _median([r["sequential_unmodelled"] for r in records
                                          if r["sequential_unmodelled"] is not None]),
        "within_5pct": count("within_5pct"),
        "auto_ok_vs_sequential": count("auto_ok_vs_sequential"),
        "within_5pct_heldout": _count_within([r.get("auto_over_best_heldout") for r in records], WITHIN_BEST),
        "best_missed": [r["name"] for r in records if r.get("best_verdict") == "missed"],
        "model_within_5pct_heldout": _count_within([r.get("model_over_best_heldout") for r in records], WITHIN_BEST),
        "tune_changed": [r["name"] for r in records if r.get("tune_changed")],
        "tuned": sum(r.get("tune_changed") is not None for r in records),
        "sequential_missed": [r["name"] for r in records if r.get("sequential_verdict") == "missed"],
        # the same degrees measured twice in one run (the grid row and the auto row): the noise floor that
        # "within 5% of the best" is judged against
        "twin_noise_median": _median(twins),
        "twin_noise_max": max(twins) if twins else None,
        "twin_noise_configs": len(twins),
        "max_solve_ms_rank": max(solves) if solves else None,
        "max_solve_ms_alone": max(alone) if alone else None,
        "median_solve_ms_rank": _median(solves),
        "median_solve_ms_alone": _median(alone),
        "busy_machine": [r["name"] for r in records if (r.get("other_load_share") or 0) > BUSY_MACHINE],
        "targets": {"median_abs_error": TARGET_ERROR, "within_best": WITHIN_BEST, "vs_sequential": VS_SEQUENTIAL,
                    "solve_ms": TARGET_SOLVE_MS},
        "target_error_met": None if median_error is None else median_error <= TARGET_ERROR,
        "wall_s": wall_s,
    }


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.0f}%" if signed else f"{100 * x:.0f}%"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _short(name: str | None) -> str:
    """A row name without the schedule: ``fsmoe auto r=2/4 GAR after`` → ``2/4 after``."""
    if not name:
        return "-"
    return name.replace("fsmoe ", "").replace("auto ", "").replace("r=", "").replace("GAR after", "after")


def _ci(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"


def format_accuracy(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per case, then the summary lines."""
    table = Table(["config", "T", "D", "H", "E", "k", "EPxESP", "link", "C", "med|err|", "r=1", "piped",
                   "model r", "planner r", "best fsmoe", "model/best", "auto/best", "90% ci", "held-out", "twin/auto",
                   "auto/seq", "90% ci",
                   "solve ms", "alone ms",
                   "profile s", "other load"])
    for r in records:
        cfg, auto, prof = r["config"], r["auto"] or {}, r["profile"] or {}
        best = (r["best_fsmoe"] or "-").replace("fsmoe ", "")
        cached = " (cached)" if prof.get("cache_hit") else ""
        prof_s = "-" if prof.get("wall_s") is None else f"{prof['wall_s']:.1f}{cached}"
        table.add([r["name"], cfg["tokens"], cfg["d_model"], cfg["d_hidden"], cfg["experts"], cfg["top_k"],
                   f"{cfg['ep']}x{cfg['esp']}", cfg["link"], cfg["capacity"], _pct(r["median_abs_error"]),
                   _pct(r["median_abs_error_r1"]), _pct(r["median_abs_error_pipelined"]),
                   _short(r.get("model_pick")), _short(auto.get("name")), best, _x(r.get("model_over_best_heldout")),
                   _x(r["auto_over_best"]),
                   _ci(r.get("auto_over_best_ci")), _x(r.get("auto_over_best_heldout")), _x(r["twin_over_auto"]),
                   _x(r["auto_over_sequential"]), _ci(r.get("auto_over_sequential_ci")),
                   "-" if r["solve_ms_rank"] is None else f"{r['solve_ms_rank']:.1f}",
                   "-" if r.get("solve_ms_alone") is None else f"{r['solve_ms_alone']:.1f}", prof_s,
                   _pct(r.get("other_load_share"))])
    s = summary
    probes = ", ".join(f"{n} {_pct(e, signed=True)}" for n, e in s["probe_median_errors"].items())
    lines = [str(table), "",
             f"summary: {s['cases']} configs; median |error| {_pct(s['median_abs_error'])} over all rows "
             f"(target <= {_pct(TARGET_ERROR)}; median of per-config medians {_pct(s['median_of_case_medians'])}; "
             f"r=1 rows {_pct(s['median_abs_error_r1'])}, pipelined rows {_pct(s['median_abs_error_pipelined'])}; "
             f"signed {_pct(s['median_error_signed'], signed=True)}); planner within 5% of the best measured fsmoe "
             f"row in {s['within_5pct']}; fsmoe auto <= {VS_SEQUENTIAL:g}x sequential in {s['auto_ok_vs_sequential']};"
             f" solve per layer median {_x(s['median_solve_ms_rank'])} ms (max {_x(s['max_solve_ms_rank'])}) on the "
             f"ranks, {_x(s['median_solve_ms_alone'])} ms (max {_x(s['max_solve_ms_alone'])}) alone (target <= "
             f"{TARGET_SOLVE_MS:g} ms); wall {s['wall_s']:.0f} s",
             f"where the error comes from: each operation alone vs its profiled line (median over configs): {probes}; "
             f"sequential row / sum of its operations timed alone: {_x(s['sequential_unmodelled'])}x"]
    if s.get("within_5pct_heldout") is not None:
        lines.append(f"noise: planner within 5% of the best row chosen on half the rounds and timed on the other half "
                     f"in {s['within_5pct_heldout']}; beyond the 90% interval of the noise (whole interval above "
                     f"the target): within 5% missed in {_names(s['best_missed'])}, <= {VS_SEQUENTIAL:g}x sequential "
                     f"missed in {_names(s['sequential_missed'])}")
    if s.get("tuned"):
        lines.append(f"measured check: the model's own choice within 5% of the best (held-out) in "
                     f"{s['model_within_5pct_heldout']}; the check moved the auto row off it in "
                     f"{len(s['tune_changed'])}/{s['tuned']} ({_names(s['tune_changed'])})")
    if s.get("twin_noise_configs"):
        lines.append(f"run-to-run noise: where the planner's degrees are also a grid row, the two measurements of the "
                     f"same thing differ by {_pct(s['twin_noise_median'])} (median; max {_pct(s['twin_noise_max'])}, "
                     f"{s['twin_noise_configs']} configs)")
    if s.get("busy_machine"):
        lines.append(f"busy machine (> {_pct(BUSY_MACHINE)} of the CPU outside our ranks; times suspect): "
                     f"{', '.join(s['busy_machine'])}")
    return "\n".join(lines)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def recompute_record(record: dict[str, Any], case_dir: Path) -> dict[str, Any]:
    """``record`` derived again with this version's :func:`case_record` from the case's saved ``layer.json``
    and ``job.toml`` (the solve times re-measured at the time are kept)."""
    payload = json.loads((case_dir / "layer.json").read_text())
    job = load_toml(case_dir / "job.toml", layer_bench_recipe())
    again = case_record(AccuracyCase(name=record["name"], overrides=record.get("overrides", {})), job, payload,
                        resolve=False)
    return {**again, **{k: record[k] for k in ("solve_ms_alone", "resolve_same_degrees") if k in record}}


def show_planner_accuracy(path: str | Path) -> str:
    """The table and summary of a saved ``planner_accuracy.json``, re-summarised with this version's
    :func:`summarize_accuracy` (keeping its wall time); each case derived again from its saved run
    (:func:`recompute_record`) where ``cases/<name>/`` beside it still holds one."""
    path = Path(path)
    data = json.loads(path.read_text())
    records = []
    for r in data["cases"]:
        case_dir = path.parent / "cases" / _slug(r["name"])
        found = (case_dir / "layer.json").is_file() and (case_dir / "job.toml").is_file()
        records.append(recompute_record(r, case_dir) if found else r)
    return format_accuracy(records, summarize_accuracy(records, data["summary"]["wall_s"]))


# --- the run ---------------------------------------------------------------------------------------------------
def run_planner_accuracy(cases: Sequence[AccuracyCase], settings: AccuracySettings = AccuracySettings(), *,
                         echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every case (see the module doc), print the table, write ``<out>/planner_accuracy.json``;
    return ``{"settings", "cases", "summary", "env"}``."""
    if not cases:
        raise ValueError("run_planner_accuracy: give at least one case")
    jobs = [case_job(c, settings) for c in cases]
    for job in jobs:  # every job is checked before any rank starts
        check_layer_job(job)
    s = settings
    rows = len(layer_impls(jobs[0])) + 1
    echo(f"[planner accuracy] {len(cases)} configs on {s.nproc} ranks ({s.launcher}), each: a profile (cached, or up "
         f"to {s.profile_budget_s:g} s) then {s.warmup}+{s.reps} rounds of {rows} rows + probes; about "
         f"{len(cases) * (s.profile_budget_s + 8 + (s.warmup + s.reps) * rows * 0.3) / 60:.0f} min at ~0.3 s a row")
    t0 = time.perf_counter()
    records = []
    for i, (c, job) in enumerate(zip(cases, jobs, strict=True)):
        echo(f"[planner accuracy] {i + 1}/{len(cases)} {c.name} ({time.perf_counter() - t0:.0f} s so far)")
        quiet: Callable[[str], None] = lambda _line: None  # noqa: E731 -- the case's own table is in its layer.json
        payload = run_layer_bench(job, echo=quiet)
        records.append(case_record(c, job, payload))
        r = records[-1]
        echo(f"  median |error| {_pct(r['median_abs_error'])}, planner {r['auto']['name'] if r['auto'] else '-'}, "
             f"auto/best {_x(r['auto_over_best'])}, auto/sequential {_x(r['auto_over_sequential'])}, "
             f"{r['wall_s']:.0f} s")
    summary = summarize_accuracy(records, time.perf_counter() - t0)
    echo(format_accuracy(records, summary))
    result = {"settings": dataclasses.asdict(settings), "cases": records, "summary": summary, "env": env_info()}
    path = write_json(Path(settings.out) / "planner_accuracy.json", result)
    echo(f"json: {path}")
    return result


__all__ = ["AccuracyCase", "AccuracySettings", "DEFAULT_CASES", "QUICK_CASES", "QUICK_SETTINGS", "case",
           "heldout_noise", "heldout_over_best", "noise_record", "ratio_noise", "recompute_record", "verdict",
           "case_job", "case_record", "format_accuracy", "probe_predictions", "run_planner_accuracy",
           "show_planner_accuracy", "summarize_accuracy"]
