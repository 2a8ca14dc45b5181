"""Side-by-side benchmarks on the emulated cluster.

* ``fsmoe bench layer`` — one MoE layer configuration; our schedules at several pipeline degrees and
  DeepSpeed-MoE, interleaved in one run; medians, ratios to the fastest ``fsmoe`` schedule and to the
  per-channel lower bound, peak memory (:func:`run_layer_bench`, :class:`LayerBenchConfig`).
"""

from fsmoe.bench.config import ImplSpec, LayerBenchConfig, quick_layer_config
from fsmoe.bench.layer import run_layer_bench
from fsmoe.bench.summary import summarize

__all__ = ["ImplSpec", "LayerBenchConfig", "quick_layer_config", "run_layer_bench", "summarize"]
