"""Side-by-side benchmarks on the emulated cluster.

* ``fsmoe bench layer`` — one MoE layer configuration; our schedules at several pipeline degrees and
  DeepSpeed-MoE, interleaved in one run; medians, ratios to the fastest ``fsmoe`` schedule and to the
  per-channel lower bound, peak memory (:func:`run_layer_bench`, :class:`LayerBenchConfig`).
* ``fsmoe bench train`` — tokens/s of the GPT-MoE trained with our schedules vs the same model with
  DeepSpeed-MoE's layer (same weights, batches and layout), interleaved step by step
  (:func:`run_train_bench`, :class:`TrainBenchConfig`).
"""

from fsmoe.bench.config import ImplSpec, LayerBenchConfig, quick_layer_config
from fsmoe.bench.layer import run_layer_bench
from fsmoe.bench.summary import summarize
from fsmoe.bench.train import run_train_bench
from fsmoe.bench.train_config import TrainBenchConfig, quick_train_config

__all__ = ["ImplSpec", "LayerBenchConfig", "TrainBenchConfig", "quick_layer_config", "quick_train_config",
           "run_layer_bench", "run_train_bench", "summarize"]
