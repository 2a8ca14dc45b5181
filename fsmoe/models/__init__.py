"""Models built from the MoE layer: a GPT-2 style byte-level language model (its sizes and presets are
:class:`fsmoe.config.ModelConfig` and :data:`fsmoe.config.MODEL_PRESETS`)."""

from fsmoe.models.gpt_moe import MLP, Block, CausalSelfAttention, GPTMoE, ModelOutput

__all__ = ["MLP", "Block", "CausalSelfAttention", "GPTMoE", "ModelOutput"]
