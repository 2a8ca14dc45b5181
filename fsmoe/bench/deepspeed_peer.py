"""DeepSpeed-MoE as a peer in the layer benchmark (optional; ``pip install -e .[bench]``).

Legend: T tokens per rank, D model dim, H expert hidden, E experts, K top-k.

``deepspeed.moe.layer.MoE`` is built on this rank's existing gloo process group, without DeepSpeed's
launcher or engine: ``deepspeed.init_distributed(dist_backend="gloo")`` wraps the group we already
joined, and ``MoE.set_deepspeed_parallelism`` creates its expert groups. It gets the same T, D, H, E,
K and capacity factor as our layer, a GELU FFN expert (D → H → D, biases, like our ``ffn``), fixed
capacity (``drop_tokens=True``, ``min_capacity=0``), no random token selection and no sampled second
expert, so it routes by the same top-k rule into the same C = ceil(K·f·T/E) slots per expert.

Its EP groups use DeepSpeed's data-before-expert order (EP stride world/ep), which equals our EP
groups (stride esp) whenever ep·esp = world, so its AlltoAlls cross the same shaped links as ours.
DeepSpeed-MoE cannot shard an expert's H over ranks (no ESP): with esp > 1 it runs at the same EP
degree with whole experts replicated over world/ep ranks, which does the same expert FLOPs per rank
but must all-reduce the expert gradients over the replicas after the backward (what its engine would
do); that AllReduce is timed with it, and the table says so. The dense GAR follows the backward, as
in DeepSpeed's engine.

DeepSpeed's first ``init_distributed`` on a CPU machine compiles a small shared-memory extension
(~1–2 min on 2 cores) into ``TORCH_EXTENSIONS_DIR``; later runs load it.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.bench.config import DEEPSPEED, ImplSpec
from fsmoe.bench.impls import LayerWorkload, Outputs, Step


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


def deepspeed_version() -> str | None:
    """The installed DeepSpeed's version (without importing it), or None."""
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_deepspeed_step(work: LayerWorkload, threads: int) -> Step | str:
    """DeepSpeed-MoE's step on this rank, or why it cannot run (a one-line reason for the table).
    Collective over the world (DeepSpeed creates process groups): call it on every rank."""
    cfg = work.cfg
    if cfg.gate not in ("gshard", "switch"):
        return f"DeepSpeed-MoE has only top-k softmax gating, not {cfg.gate!r}"
    ds = init_deepspeed(threads)
    if isinstance(ds, str):
        return ds
    MoE, ds_groups = ds
    torch.manual_seed(cfg.seed)
    expert: nn.Module = FFN(cfg.d_model, cfg.d_hidden) if cfg.expert == "ffn" else SwiGLU(cfg.d_model, cfg.d_hidden)
    moe = MoE(hidden_size=cfg.d_model, expert=expert, num_experts=cfg.experts, ep_size=cfg.ep, k=cfg.top_k,
              capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor, min_capacity=0,
              drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism(use_data_before_expert_parallel_=True)
    moe.train()
    ep_ranks = tuple(dist.get_process_group_ranks(moe.deepspeed_moe.ep_group))
    if sorted(ep_ranks) != sorted(work.groups.ranks["ep"]):
        return f"DeepSpeed's EP group {list(ep_ranks)} differs from ours {list(work.groups.ranks['ep'])}"
    name = moe.expert_group_name
    expert_dp_group = ds_groups._get_expert_data_parallel_group(name)
    expert_dp = dist.get_world_size(expert_dp_group)
    expert_params = [p for p in moe.deepspeed_moe.experts.parameters()]

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
    if cfg.esp > 1:
        note = (f"no ESP in DeepSpeed-MoE: EP={cfg.ep} with whole experts replicated x{expert_dp}, "
                f"+ expert-grad AllReduce; {note}")
    return Step(ImplSpec(DEEPSPEED), forward, zero_grad, after_backward, None, note=note)
