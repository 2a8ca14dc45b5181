"""Models built from the MoE layer: a GPT-2 style byte-level language model."""

from fsmoe.models.gpt_moe import (
    MLP,
    MODEL_PRESETS,
    Block,
    CausalSelfAttention,
    GPTMoE,
    GPTMoEConfig,
    ModelOutput,
    gpt2_moe_small,
    gpt2_moe_tiny,
    model_preset,
)

__all__ = [
    "MLP", "MODEL_PRESETS", "Block", "CausalSelfAttention", "GPTMoE", "GPTMoEConfig", "ModelOutput",
    "gpt2_moe_small", "gpt2_moe_tiny", "model_preset",
]
