"""DeepSpeed-MoE as a peer in both benchmarks (optional; ``pip install -e .[bench]``).

Legend: T tokens per rank, D model dim, H expert hidden, E experts, e = E / EP local experts, K top-k.

``deepspeed.moe.layer.MoE`` is built on this rank's existing gloo process group, without DeepSpeed's
launcher or engine: ``deepspeed.init_distributed(dist_backend="gloo")`` wraps the group we already
joined (:func:`init_deepspeed`), and ``MoE.set_deepspeed_parallelism`` creates its expert groups. It
gets a GELU FFN expert (D → H → D, biases, like our ``ffn``) or a SwiGLU one, fixed capacity
(``drop_tokens=True``), no random token selection and no sampled second expert, so it routes by the
same top-k rule into the same C = ceil(K·f·T/E) slots per expert as our layer.

**Layer benchmark** (:func:`build_deepspeed_step`): the same T, D, H, E, K and capacity factor as our
layer, on the same input. Its EP groups use DeepSpeed's data-before-expert order (EP stride world/ep),
which equals our EP groups (stride esp) whenever ep·esp = world, so its AlltoAlls cross the same shaped
links as ours. DeepSpeed-MoE cannot shard an expert's H over ranks (no ESP): with esp > 1 it runs at
the same EP degree with whole experts replicated over world/ep ranks, which does the same expert FLOPs
per rank but must all-reduce the expert gradients over the replicas after the backward (what its
engine would do); that AllReduce is timed with it, and the table says so. The dense GAR follows the
backward, as in DeepSpeed's engine.

**Train benchmark** (:func:`build_deepspeed_twin`): the GPT-MoE built from the job's seed exactly as
the trainer builds it, with every :class:`~fsmoe.moe.layer.MoELayer` replaced by DeepSpeed's ``MoE``
holding the *same* weights: the gate's ``wg``, and this rank's e experts (DeepSpeed's EP rank p holds
experts p·e .. p·e + e - 1, the experts our EP coordinate p holds) copied from the stacked
``w1_eDH``/``b1_eH``/... into per-expert ``nn.Linear`` modules. DeepSpeed routes like our renormalising
top-k gate (argmax first choice, then the best other; all first choices before second ones in token
order; kept weights renormalised for K = 2) and its aux loss is the same GShard balance loss, which
the wrapper weights by the layer's ``aux_loss_coef``: from the same weights the two models compute the
same loss. Training then runs through the trainer's own ``train_step`` with our bucketed
:class:`~fsmoe.parallel.grad_sync.GradSync` after the backward (what DeepSpeed's engine does). Its
engine itself (ZeRO, its optimizer, fp16) is not used. Known difference: the trainer decays
parameters of 2+ dims; our stacked expert biases (e, H) are 2-D and decayed, DeepSpeed's per-expert
biases (H,) are not; over a few steps at the default lr that is far below the loss's noise.
:func:`deepspeed_unable` says (purely) when the twin cannot mirror a job.

DeepSpeed's first ``init_distributed`` on a CPU machine compiles a small shared-memory extension
(~1–2 min on 2 cores) into ``TORCH_EXTENSIONS_DIR``; later runs load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.bench.harness import DEEPSPEED, ImplSpec
from fsmoe.bench.layer_workload import LayerWorkload, Outputs, Step
from fsmoe.config import JobConfig, MoEConfig
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.moe.experts import Experts
from fsmoe.moe.gates import capacity_for
from fsmoe.moe.layer import MoELayer, MoEStats
from fsmoe.parallel.grad_sync import mark_replicas

if TYPE_CHECKING:
    from fsmoe.train.distributed import DistContext

DS_GATES = ("gshard", "switch")  # DeepSpeed-MoE's top-k softmax gating
DS_TOP_K = (1, 2)  # top1gating / top2gating; its top-k>2 gate scales the aux loss by 1/k


class FFN(nn.Module):
    """One expert, y = GELU(x·W1 + b1)·W2 + b2 (our ``ffn`` expert as a plain module)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """One expert, y = (SiLU(x·W1) ⊙ x·W3)·W2 (our ``swiglu`` expert as a plain module)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def default_extensions_dir() -> str:
    """Where DeepSpeed caches its compiled extension: ``TORCH_EXTENSIONS_DIR`` if set, else
    ``.torch_extensions`` in the source checkout fsmoe runs from (else torch's default)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():
        return str(root / ".torch_extensions")
    return str(Path.home() / ".cache" / "torch_extensions")


def init_deepspeed(threads: int) -> tuple[Any, Any] | str:
    """Import DeepSpeed and join it to this rank's gloo group: ``(MoE class, deepspeed.utils.groups)``,
    or why it cannot (a one-line reason). Collective over the world: call it on every rank."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups as ds_groups
    except ImportError as err:
        return f"DeepSpeed is not installed ({err}); pip install -e .[bench]"
    # DeepSpeed's CPU shared-memory all-reduce kernel (inference only, unused here) sometimes aborted a
    # rank at start-up ("terminate called without an active exception"); keep it out.
    from deepspeed.accelerator import get_accelerator

    shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if shm is not None:
        deepspeed.ops.__compatible_ops__[shm.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the gloo group this rank already joined
    torch.set_num_threads(threads)  # whatever DeepSpeed's import did to the thread pool
    return MoE, ds_groups


def _ds_moe(MoE: Any, moe: MoEConfig, d_model: int, ep: int) -> nn.Module:
    """DeepSpeed's layer for ``moe`` at D = ``d_model`` over ``ep`` ranks (see the module doc)."""
    expert: nn.Module = FFN(d_model, moe.d_hidden) if moe.expert == "ffn" else SwiGLU(d_model, moe.d_hidden)
    return MoE(hidden_size=d_model, expert=expert, num_experts=moe.num_experts, ep_size=ep, k=moe.top_k,
               capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.capacity_factor,
               min_capacity=moe.min_capacity, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)


# --- the layer benchmark's peer -----------------------------------------------------------------------------
def build_deepspeed_step(work: LayerWorkload, threads: int) -> Step | str:
    """DeepSpeed-MoE's step on this rank, or why it cannot run (a one-line reason for the table).
    Collective over the world (DeepSpeed creates process groups): call it on every rank."""
    job = work.job
    moe_cfg, par = job.moe, job.parallel
    if moe_cfg.gate not in DS_GATES:
        return f"DeepSpeed-MoE has only top-k softmax gating, not {moe_cfg.gate!r}"
    if moe_cfg.capacity_factor is None:
        return "DeepSpeed-MoE runs here with a fixed capacity factor (drop_tokens=True), not 'none'"
    ds = init_deepspeed(threads)
    if isinstance(ds, str):
        return ds
    MoE, ds_groups = ds
    torch.manual_seed(job.run.seed)
    moe = _ds_moe(MoE, moe_cfg, job.model.d_model, par.ep)
    moe.set_deepspeed_parallelism(use_data_before_expert_parallel_=True)
    moe.train()
    ep_ranks = tuple(dist.get_process_group_ranks(moe.deepspeed_moe.ep_group))
    if sorted(ep_ranks) != sorted(work.groups.ranks["ep"]):
        return f"DeepSpeed's EP group {list(ep_ranks)} differs from ours {list(work.groups.ranks['ep'])}"
    expert_dp_group = ds_groups._get_expert_data_parallel_group(moe.expert_group_name)
    expert_dp = dist.get_world_size(expert_dp_group)
    expert_params = list(moe.deepspeed_moe.experts.parameters())

    def forward() -> Outputs:
        y_TD, aux, _ = moe(work.x_TD.detach().requires_grad_())
        return [(y_TD, work.dy_TD), (aux, work.one)]

    def zero_grad() -> None:
        moe.zero_grad(set_to_none=True)

    def after_backward() -> None:
        work.gar()
        if expert_dp > 1:  # replicated experts: their gradients are summed over the replicas
            flat = torch.cat([p.grad.reshape(-1) for p in expert_params if p.grad is not None])
            dist.all_reduce(flat, group=expert_dp_group)

    note = "GAR after the backward"
    if par.esp > 1:
        note = (f"no ESP in DeepSpeed-MoE: EP={par.ep} with whole experts replicated x{expert_dp}, "
                f"+ expert-grad AllReduce; {note}")
    return Step(spec=ImplSpec(DEEPSPEED), forward=forward, zero_grad=zero_grad, after_backward=after_backward,
                note=note)


# --- the train benchmark's twin -------------------------------------------------------------------------------
def deepspeed_unable(job: JobConfig) -> str | None:
    """Why the DeepSpeed twin cannot mirror ``job``'s model and layout (pure checks), or None."""
    moe, par = job.moe, job.parallel
    if job.model.arch != "gpt":
        return f"the DeepSpeed twin is built on the GPT-MoE model, not arch {job.model.arch!r}"
    if par.mp > 1:
        return f"the DeepSpeed twin runs without tensor parallelism (mp=1), got mp={par.mp}"
    if moe.gate not in DS_GATES or moe.noisy:
        return f"DeepSpeed-MoE has only (noise-free) top-k softmax gating, not {moe.gate!r}"
    if moe.top_k not in DS_TOP_K:
        return f"the DeepSpeed twin supports top-1 and top-2 (its top-k gate scales the aux loss), got k={moe.top_k}"
    if moe.capacity_factor is None:
        return "the DeepSpeed twin runs with a fixed capacity factor (drop_tokens=True), not 'none'"
    if moe.z_loss_coef:
        return "DeepSpeed-MoE's gate has no router z-loss"
    ep = par.ep * par.esp
    if par.esp > 1 and moe.num_experts % ep:
        return (f"no ESP in DeepSpeed-MoE, and E={moe.num_experts} experts do not split over the EP-only "
                f"layout's EP={ep} ranks")
    return None


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
        self.last_stats = MoEStats(aux_loss=cfg.aux_loss_coef * l_aux, num_dropped=dropped,
                                   num_assignments=T * cfg.top_k)
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


def _full_model(job: JobConfig) -> GPTMoE:
    """The single-device model the trainer's ``build_model`` starts from (seeded the same way)."""
    torch.manual_seed(job.run.seed)
    return GPTMoE(job.model)


def build_deepspeed_twin(job: JobConfig, ctx: DistContext, threads: int) -> tuple[GPTMoE, str] | str:
    """This rank's twin of ``job``'s model (a row's job: its layout is EP-only) and a note for the table,
    or why it cannot be built (one line). Collective over the world: call it on every rank."""
    ds = init_deepspeed(threads)
    if isinstance(ds, str):
        return ds
    MoE, ds_groups = ds
    moe_cfg, par = job.moe, job.parallel
    model = _full_model(job)
    e = moe_cfg.num_experts // par.ep
    for block in model.blocks:
        if not isinstance(block.mlp, MoELayer):
            continue
        ours: MoELayer = block.mlp
        moe = _ds_moe(MoE, moe_cfg, job.model.d_model, par.ep)
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
    return model, f"deepspeed.moe.layer.MoE (EP={par.ep}); GAR after the backward"
