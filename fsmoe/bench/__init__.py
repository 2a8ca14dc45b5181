"""Side-by-side benchmarks: one harness (:mod:`~fsmoe.bench.harness`: ranks on the emulated cluster,
interleaved rounds, slowest-rank timing, CPU accounting, memory; :mod:`~fsmoe.bench.report`: JSON,
job.toml, tables, charts) and its workloads, each driven by a :class:`~fsmoe.config.JobConfig`:

* ``fsmoe bench layer`` — one MoE layer configuration; our schedules at several pipeline degrees and
  DeepSpeed-MoE, interleaved in one run; medians, ratios to the fastest ``fsmoe`` schedule and to the
  per-channel lower bound, peak memory (:mod:`~fsmoe.bench.layer`, :mod:`~fsmoe.bench.layer_report`).
* ``fsmoe bench train`` — tokens/s of the GPT-MoE trained with our schedules vs the same model with
  DeepSpeed-MoE's layer (same weights, batches and layout), interleaved step by step (:mod:`~fsmoe.bench.train`).
* ``benchmarks/gates.py`` — every gate × order in one process, beside DeepSpeed's gating (:mod:`~fsmoe.bench.gates`).
* ``benchmarks/planner_accuracy.py`` — the performance model and planner against measurement over many layer
  configurations, each a ``fsmoe bench layer`` run (:mod:`~fsmoe.bench.planner`).

Both side-by-side benchmarks carry FSMoE's planner: with ``fsmoe`` among ``bench.schedules`` they add an
``fsmoe auto`` row at the planned degrees, and put the α-β model's predicted time beside the measured one
(layer: :mod:`~fsmoe.bench.layer_predict`, every row of ours; train: the plan's predicted step).

DeepSpeed-MoE is an optional peer (:mod:`~fsmoe.bench.deepspeed_peer`). Per workload: ``run_*_bench(job)``
runs it, ``quick_*_job(job)`` is ``--quick``, ``check_*_job(job)`` raises ``ValueError`` for what it
cannot run (call it before any rank starts; ``run_*`` calls it too).
"""

from fsmoe.bench.harness import DEEPSPEED, ImplSpec
from fsmoe.bench.layer import QUICK_LAYER, check_layer_job, layer_impls, quick_layer_job, run_layer_bench
from fsmoe.bench.layer_report import summarize
from fsmoe.bench.planner import AccuracyCase, AccuracySettings, run_planner_accuracy
from fsmoe.bench.train import (
    QUICK_TRAIN,
    check_train_job,
    quick_train_job,
    run_train_bench,
    summarize_train,
    train_rows,
)

__all__ = ["DEEPSPEED", "QUICK_LAYER", "QUICK_TRAIN", "AccuracyCase", "AccuracySettings", "ImplSpec", "check_layer_job",
           "check_train_job", "layer_impls", "quick_layer_job", "quick_train_job", "run_layer_bench",
           "run_planner_accuracy", "run_train_bench", "summarize", "summarize_train", "train_rows"]
