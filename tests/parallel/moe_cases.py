"""Rank-side bodies of the distributed MoE layer tests (importable, so spawned ranks can run them).

Each rank builds the single-process reference layer with the same seed (so the global weights are
identical everywhere), runs it on the whole global batch one routing group per rank, then builds the
distributed layer, loads its shard of the global weights, runs its own group and compares: outputs,
input gradients, gate gradients (summed over the world) and expert-shard gradients (summed over the
expert replicas) against the reference.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from fsmoe.moe import MoEConfig, MoELayer
from fsmoe.moe.experts import shard_index
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.parallel.dispatch import build_dispatcher
from fsmoe.parallel.parallelize import apply_pipeline

T, D, H, E = 12, 8, 16, 4


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def check_results(per_rank: list[list[tuple[str, dict[str, float]]]], tol: float = 1e-5) -> int:
    """Assert every error of every rank's cases is within ``tol`` (listing the first failures); returns
    how many (rank, case) results were checked."""
    failures, checked = [], 0
    for rank, results in enumerate(per_rank):
        for case, errs in results:
            checked += 1
            bad = {k: v for k, v in errs.items() if not v <= tol}
            if bad:
                failures.append(f"rank {rank} {case}: {bad}")
    assert not failures, "\n".join(failures[:20])
    return checked


def layer_vs_reference(
    rank: int, world: int, *, ppn: int, ep: int, esp: int, dispatchers: tuple[str, ...],
    gates: tuple[str, ...], experts: tuple[str, ...] = ("ffn", "swiglu"),
    capacity_factors: tuple[float | None, ...] = (1.0, None),
    pipelines: tuple[tuple[str, int, int] | None, ...] = (None,), channels: int = 1,
) -> list[tuple[str, dict[str, float]]]:
    dims = ParallelDims(world_size=world, procs_per_node=ppn, dp=world, ep=ep, esp=esp)
    groups = build_groups(dims, channels=channels)
    coords = dims.rank_layout(rank)
    built = {name: build_dispatcher(name, groups) for name in dispatchers}
    results = []
    cases = itertools.product(dispatchers, gates, experts, capacity_factors, pipelines)
    for disp_name, gate, expert, cf, pipe in cases:
        if gate == "expert_choice" and cf is None:
            continue
        k = 1 if gate == "switch" else 2
        cfg = MoEConfig(num_experts=E, top_k=k, d_hidden=H, gate=gate, expert=expert, capacity_factor=cf,
                        z_loss_coef=0.001)
        torch.manual_seed(1234)
        ref = MoELayer.from_config(cfg, D)
        gen = torch.Generator().manual_seed(99)
        x_all = torch.randn(world, T, D, generator=gen)
        g_all = torch.randn(world, T, D, generator=gen)

        x_ref = x_all.clone().requires_grad_()
        y_ref, loss = [], 0.0
        for r in range(world):
            y = ref(x_ref[r])
            y_ref.append(y.detach())
            loss = loss + (y * g_all[r]).sum() + ref.last_stats.aux_loss
        loss.backward()

        layer = MoELayer.from_config(cfg, D, dispatcher=built[disp_name])
        if pipe is not None:
            apply_pipeline(layer, pipe[0], (pipe[1], pipe[2]))
        layer.gate.load_state_dict(ref.gate.state_dict())
        e_local, h_local = layer.experts.num_local, layer.experts.d_hidden
        layer.experts.load_shard(ref.experts, coords.ep * e_local, coords.esp * h_local)
        x = x_all[rank].clone().requires_grad_()
        y = layer(x)
        ((y * g_all[rank]).sum() + layer.last_stats.aux_loss).backward()

        errs = {"y": _max_err(y.detach(), y_ref[rank]), "dx": _max_err(x.grad, x_ref.grad[rank])}
        for name, p in layer.gate.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            errs[f"gate.{name}"] = _max_err(grad, dict(ref.gate.named_parameters())[name].grad)
        for name, p in layer.experts.named_parameters():
            grad = p.grad.clone()
            if dims.expert_dp > 1:
                dist.all_reduce(grad, group=groups.group("expert_dp"))
            full = dict(ref.experts.named_parameters())[name].grad
            errs[f"experts.{name}"] = _max_err(
                grad, full[shard_index(name, p.shape, coords.ep * e_local, coords.esp * h_local)]
            )
        results.append((f"{disp_name}/{gate}/{expert}/cf={cf}/pipe={pipe}", errs))
    return results
