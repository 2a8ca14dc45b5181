"""The paper's reported results that ``fsmoe reproduce`` puts ours beside, with where each comes from.

Section numbers are of the digest (``../shared/paper/FSMoE-digest.md``), which quotes the paper
(arXiv 2501.10714). Figure bar values are not in the text (digest §8): for Fig. 6 only ranges and averages
are reported, for Fig. 7 the per-point speedups quoted in §6.4 of the paper.
"""

from __future__ import annotations

# Table 2 (digest §3.5): ms per transformer layer, B = 4, L = 1024. Kinds: AlltoAll, AllReduce, AllGather,
# ReduceScatter, Experts, Routing + Order (summed here: our gate line prices them together), Attention.
TABLE2_KINDS = ("a2a", "allreduce", "ag", "rs", "experts", "routing_order", "attention")
TABLE2: dict[tuple[str, str, str], tuple[float, ...]] = {
    ("testbed-a", "gpt2-xl-moe", "fwd"): (6.9, 0.0, 4.6, 5.4, 3.1, 0.1 + 0.3, 1.7),
    ("testbed-a", "gpt2-xl-moe", "bwd"): (6.9, 5.26, 4.6, 5.4, 6.1, 0.1 + 0.4, 3.6),
    ("testbed-a", "mixtral-8x7b", "fwd"): (19.5, 0.0, 12.3, 13.7, 15.6, 0.1 + 0.3, 4.1),
    ("testbed-a", "mixtral-8x7b", "bwd"): (19.6, 26.45, 12.3, 13.7, 31.8, 0.1 + 0.5, 7.7),
    ("testbed-b", "gpt2-xl-moe", "fwd"): (11.2, 0.0, 15.5, 15.7, 6.7, 0.1 + 0.3, 4.5),
    ("testbed-b", "gpt2-xl-moe", "bwd"): (11.2, 7.3, 15.5, 15.2, 13.0, 0.1 + 0.3, 8.6),
    ("testbed-b", "mixtral-8x7b", "fwd"): (28.3, 0.0, 39.6, 40.8, 58.5, 0.1 + 0.7, 9.5),
    ("testbed-b", "mixtral-8x7b", "bwd"): (30.8, 32.1, 40.1, 41.8, 119.7, 0.2 + 1.2, 18.1),
}

# Table 6 (digest §2.4): Testbed-B, GPT2-XL, ms per iteration: (DeepSpeed-MoE, FSMoE, speedup).
TABLE6 = {"gshard": (968.1, 707.7, 1.37), "xmoe": (1064.0, 746.9, 1.42), "sigmoid": (986.6, 721.0, 1.37),
          "expert_choice": (909.9, 685.5, 1.33)}

# Fig. 6 (digest §6.5): FSMoE over DS-MoE 1.28x-3.01x, Tutel over DS-MoE 1.16x-2.59x; FSMoE's average
# speedup over each baseline.
FIG6_RANGES = {"fsmoe": (1.28, 3.01), "tutel": (1.16, 2.59)}
FIG6_FSMOE_OVER = {"tutel": 1.19, "tutel_improved": 1.12, "lina": 1.14, "fsmoe_no_iio": 1.07}
FIG6_MODELS = (("gpt2-xl-moe", "testbed-a"), ("mixtral-8x7b", "testbed-a"), ("mixtral-8x22b", "testbed-a"),
               ("gpt2-xl-moe", "testbed-b"), ("mixtral-8x7b", "testbed-b"))

# Fig. 7 (digest §6.5), Testbed-A: FSMoE over (DS-MoE, Tutel). Vary L at P = 48; vary P at L = 1024.
FIG7_L = {512: (2.17, 1.17), 1024: (2.72, 1.19), 2048: (3.14, 1.17)}
FIG7_P = {16: (2.25, 1.20), 32: (2.27, 1.16), 48: (2.72, 1.19)}

__all__ = ["FIG6_FSMOE_OVER", "FIG6_MODELS", "FIG6_RANGES", "FIG7_L", "FIG7_P", "TABLE2", "TABLE2_KINDS", "TABLE6"]
