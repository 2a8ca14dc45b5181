"""Language models built from the MoE layer: GPT-2-MoE (:mod:`fsmoe.models.gpt_moe`) and a Mixtral-style
model (:mod:`fsmoe.models.mixtral`). Their sizes and presets are :class:`fsmoe.config.ModelConfig` and
:data:`fsmoe.config.MODEL_PRESETS`; :func:`build_lm` builds the one a config names."""

from fsmoe.config import ModelConfig
from fsmoe.models.gpt_moe import MLP, Block, CausalSelfAttention, GPTMoE, ModelOutput, MoELanguageModel, PreNormBlock
from fsmoe.models.mixtral import GroupedQueryAttention, Mixtral, MixtralBlock, SwiGLU

LM_CLASSES: dict[str, type[MoELanguageModel]] = {"gpt": GPTMoE, "mixtral": Mixtral}


def build_lm(cfg: ModelConfig) -> MoELanguageModel:
    """The language model of ``cfg.arch`` with fresh weights (from torch's current RNG state); its forward
    is ``(idx_BL, targets_BL=None) -> ModelOutput`` and it lists its MoE layers in ``moe_layers``."""
    if cfg.arch not in LM_CLASSES:
        raise ValueError(f"unknown model arch {cfg.arch!r}; choose one of {', '.join(LM_CLASSES)}")
    return LM_CLASSES[cfg.arch](cfg)


__all__ = [
    "LM_CLASSES", "MLP", "Block", "CausalSelfAttention", "GPTMoE", "GroupedQueryAttention", "Mixtral", "MixtralBlock",
    "ModelOutput", "MoELanguageModel", "PreNormBlock", "SwiGLU", "build_lm",
]
