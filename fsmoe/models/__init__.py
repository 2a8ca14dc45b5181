"""Language models built from the MoE layer: GPT-2-MoE (:mod:`fsmoe.models.gpt_moe`) and a Mixtral-style
model (:mod:`fsmoe.models.mixtral`). Their sizes and presets are :class:`fsmoe.config.ModelConfig` and
:data:`fsmoe.config.MODEL_PRESETS`; :func:`build_lm` builds the one a config names."""

from torch import nn

from fsmoe.config import ModelConfig
from fsmoe.models.gpt_moe import MLP, Block, CausalSelfAttention, GPTMoE, ModelOutput


def build_lm(cfg: ModelConfig) -> nn.Module:
    """The language model of ``cfg.arch`` with fresh weights (from torch's current RNG state); its forward
    is ``(idx_BL, targets_BL=None) -> ModelOutput`` and it lists its MoE layers in ``moe_layers``."""
    if cfg.arch == "gpt":
        return GPTMoE(cfg)
    if cfg.arch == "mixtral":
        from fsmoe.models.mixtral import Mixtral

        return Mixtral(cfg)
    raise ValueError(f"unknown model arch {cfg.arch!r}")


__all__ = ["MLP", "Block", "CausalSelfAttention", "GPTMoE", "ModelOutput", "build_lm"]
