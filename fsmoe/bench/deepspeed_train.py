"""The GPT-MoE twin whose MoE layers are DeepSpeed-MoE's (optional; ``pip install -e .[bench]``).

Legend: T tokens per rank, D model dim, H expert hidden, E experts, e = E / EP local experts, K top-k.

:func:`build_deepspeed_twin` builds the full model from the trainer's seed exactly as
:func:`~fsmoe.train.trainer.build_model` does, then replaces every :class:`~fsmoe.moe.layer.MoELayer`
with ``deepspeed.moe.layer.MoE`` holding the *same* weights: the gate's ``wg``, and this rank's e experts
(DeepSpeed's EP rank p holds experts p·e .. p·e + e - 1, the experts our EP coordinate p holds) copied
from the stacked ``w1_eDH``/``b1_eH``/... into per-expert ``nn.Linear`` modules. Dense weights are the
same tensors' values. DeepSpeed routes like our renormalising top-k gate (argmax first choice, then the
best other; all first choices before second ones in token order; C = ceil(K·f·T/E); kept weights
renormalised for K = 2) and its aux loss is the same GShard balance loss, which the wrapper weights by
the layer's ``aux_loss_coef``: from the same weights the two models compute the same loss.

Training then runs through the trainer's own :func:`~fsmoe.train.trainer.train_step` with our bucketed
:class:`~fsmoe.parallel.grad_sync.GradSync` after the backward (what DeepSpeed's engine does: dense
gradients all-reduced over the world, expert gradients over the expert-data-parallel group, here of
size 1 whenever EP spans the world). DeepSpeed's engine itself (ZeRO, its optimizer, fp16) is not used.

Known difference: :func:`~fsmoe.train.trainer.build_optimizer` decays parameters of 2+ dims; our stacked
expert biases (e, H) are 2-D and decayed, DeepSpeed's per-expert biases (H,) are not. Over a few steps
at the default lr that is far below the loss's noise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.bench.deepspeed_peer import FFN, SwiGLU, init_deepspeed
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.moe.config import MoEConfig
from fsmoe.moe.experts import Experts
from fsmoe.moe.gates import capacity_for
from fsmoe.moe.layer import MoELayer, MoEStats
from fsmoe.parallel.grad_sync import mark_replicas
from fsmoe.train.distributed import DistContext
from fsmoe.train.trainer import TrainConfig


class DeepSpeedMoEBlock(nn.Module):
    """``forward(x_BLD) -> y_BLD`` through a DeepSpeed-MoE layer; sets ``last_stats`` like
    :class:`~fsmoe.moe.layer.MoELayer`, so :class:`~fsmoe.models.gpt_moe.GPTMoE` adds its aux loss."""

    def __init__(self, moe: nn.Module, cfg: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.cfg = cfg
        self.last_stats: MoEStats | None = None

    def forward(self, x_BLD: Tensor) -> Tensor:
        y_BLD, l_aux, counts_E = self.moe(x_BLD)
        cfg = self.cfg
        T = x_BLD.numel() // x_BLD.shape[-1]
        C = capacity_for(T, cfg.num_experts, cfg.top_k, cfg)
        # DeepSpeed's counts are before dropping; with position priority each expert drops what exceeds C.
        dropped = (counts_E - C).clamp(min=0).sum()
        self.last_stats = MoEStats(cfg.aux_loss_coef * l_aux, dropped, T * cfg.top_k)
        return y_BLD


@torch.no_grad()
def _load_experts(ds_experts: nn.ModuleList, full: Experts, first: int, kind: str) -> None:
    """Copy experts ``first .. first + len(ds_experts) - 1`` of our stacked ``full`` into DeepSpeed's
    per-expert modules (``nn.Linear`` stores (out, in), hence the transposes)."""
    for i, ex in enumerate(ds_experts):
        g = first + i
        if kind == "ffn":
            ex.fc1.weight.copy_(full.w1_eDH[g].t())
            ex.fc1.bias.copy_(full.b1_eH[g])
            ex.fc2.weight.copy_(full.w2_eHD[g].t())
            ex.fc2.bias.copy_(full.b2_eD[g])
        else:
            ex.w1.weight.copy_(full.w1_eDH[g].t())
            ex.w3.weight.copy_(full.w3_eDH[g].t())
            ex.w2.weight.copy_(full.w2_eHD[g].t())


def build_deepspeed_twin(cfg: TrainConfig, ctx: DistContext, threads: int) -> tuple[GPTMoE, str] | str:
    """This rank's twin model and a note for the table, or why it cannot be built (one line).
    Collective over the world (DeepSpeed creates process groups): call it on every rank."""
    ds = init_deepspeed(threads)
    if isinstance(ds, str):
        return ds
    MoE, ds_groups = ds
    moe_cfg, par = cfg.model.moe, cfg.parallel
    torch.manual_seed(cfg.seed)  # the same full model build_model starts from
    model = GPTMoE(cfg.model)
    D, H, E = cfg.model.d_model, moe_cfg.d_hidden, moe_cfg.num_experts
    e = E // par.ep
    for block in model.blocks:
        if not isinstance(block.mlp, MoELayer):
            continue
        ours: MoELayer = block.mlp
        expert: nn.Module = FFN(D, H) if moe_cfg.expert == "ffn" else SwiGLU(D, H)
        moe = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=par.ep, k=moe_cfg.top_k,
                  capacity_factor=moe_cfg.capacity_factor, eval_capacity_factor=moe_cfg.capacity_factor,
                  min_capacity=moe_cfg.min_capacity, drop_tokens=True, use_rts=False,
                  top2_2nd_expert_sampling=False)
        # DeepSpeed's default layout: EP groups of contiguous ranks, expert-DP groups of stride EP -- ours
        # for ESP = 1 (checked below).
        moe.set_deepspeed_parallelism(use_data_before_expert_parallel_=False)
        inner = moe.deepspeed_moe
        ep_ranks = dist.get_process_group_ranks(inner.ep_group) if par.ep > 1 else [ctx.rank]
        if sorted(ep_ranks) != sorted(ctx.groups.ranks["ep"]):
            return f"DeepSpeed's EP group {ep_ranks} differs from ours {list(ctx.groups.ranks['ep'])}"
        edp_group = ds_groups._get_expert_data_parallel_group(moe.expert_group_name)
        edp_ranks = dist.get_process_group_ranks(edp_group)
        if sorted(edp_ranks) != sorted(ctx.groups.ranks["expert_dp"]):
            return f"DeepSpeed's expert-DP group {edp_ranks} differs from ours {list(ctx.groups.ranks['expert_dp'])}"
        ep_rank = dist.get_rank(inner.ep_group) if par.ep > 1 else 0
        with torch.no_grad():
            inner.gate.wg.weight.copy_(ours.gate.wg.weight)
        _load_experts(inner.experts.deepspeed_experts, ours.experts, ep_rank * e, moe_cfg.expert)
        mark_replicas(inner.experts.parameters(), "expert_dp")
        block.mlp = DeepSpeedMoEBlock(moe, moe_cfg)
    model.train()
    note = f"deepspeed.moe.layer.MoE (EP={par.ep}); GAR after the backward"
    return model, note
