"""Rank-side body of the distributed training-step test (importable by spawned ranks)."""

from __future__ import annotations

import torch

from fsmoe.config import JobConfig, ModelConfig, MoEConfig, ParallelConfig, ScheduleConfig, TrainConfig
from fsmoe.moe.experts import shard_index
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.parallel.parallelize import reference_grid
from fsmoe.train.distributed import DistContext, clip_grads_
from fsmoe.train.trainer import build_grad_sync, build_model, build_optimizer


def _ref_slice(name: str, p: torch.Tensor, ref: dict[str, torch.Tensor], coords, e: int, h: int, mp: int,  # noqa: ANN001
               model: ModelConfig):
    """The part of the single-process tensor ``ref[...]`` that the distributed parameter ``name`` holds (a
    fused ``qkv`` is [N query heads | G key heads | G value heads]: G = N for GPT-MoE, fewer for GQA)."""
    if ".mlp.experts." in name:
        full = ref[name.replace(".mlp.experts.", ".mlp.layer.experts.")]
        return full[shard_index(name.rsplit(".", 1)[1], p.shape, coords.ep * e, coords.esp * h)]
    if ".mlp.gate." in name:
        return ref[name.replace(".mlp.gate.", ".mlp.layer.gate.")]
    if ".attn.proj_bias" in name:
        return ref[name.replace(".attn.proj_bias", ".attn.proj.bias")]
    if ".attn.qkv." in name and mp > 1:
        Dh = model.d_model // model.n_heads
        N, G = model.n_heads * Dh, model.kv_heads * Dh  # rows of the q part and of the k (and v) part
        parts = ((0, N), (N, G), (N + G, G))  # (first row, rows) of q, k, v
        rows = torch.cat([torch.arange(start + coords.mp * size // mp, start + (coords.mp + 1) * size // mp)
                          for start, size in parts])
        return ref[name][rows]
    if ".attn.proj.weight" in name and mp > 1:
        d = p.shape[1]
        return ref[name][:, coords.mp * d : (coords.mp + 1) * d]
    return ref[name]


def train_step_vs_reference(rank: int, world: int, *, ppn: int, mp: int, ep: int, esp: int,
                            schedules: tuple[tuple[str, int, int] | tuple[str, int, int, str], ...],
                            expert: str = "ffn", arch: str = "gpt") -> list[tuple[str, dict, list[str]]]:
    gqa = {"n_kv_heads": 2, "tie_embeddings": False} if arch == "mixtral" else {}
    model_cfg = ModelConfig(
        arch=arch, seq_len=16, d_model=16, n_layers=2, n_heads=4, d_ff=32, **gqa,
        moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32, expert=expert, capacity_factor=1.0),
    )
    results = []
    groups = None
    for sched, r_fwd, r_bwd, *plan in schedules:
        par = ParallelConfig(nproc=world, procs_per_node=ppn, mp=mp, ep=ep, esp=esp)
        sched_cfg = ScheduleConfig(name=sched, r_fwd=r_fwd, r_bwd=r_bwd, gar_plan=plan[0] if plan else None)
        train_cfg = TrainConfig(batch_size=4, lr=1e-2, grad_clip=0.5, lr_warmup=0)
        job = JobConfig(model=model_cfg, parallel=par, train=train_cfg, schedule=sched_cfg)
        cfg = job.train
        dims = ParallelDims.from_config(par)
        if groups is None:
            groups = build_groups(dims, channels=2)
        ctx = DistContext(rank, world, groups)
        coords = dims.rank_layout(rank)

        gen = torch.Generator().manual_seed(7)
        x_BL = torch.randint(0, 256, (cfg.batch_size, model_cfg.seq_len), generator=gen)
        y_BL = torch.randint(0, 256, (cfg.batch_size, model_cfg.seq_len), generator=gen)

        # Single-process reference: the same model, each rank's tokens routed as one group.
        single = job.replace(parallel=ParallelConfig(), schedule=ScheduleConfig())
        ref = reference_grid(build_model(single, None),
                             dims.dense_dp, mp)
        out = ref(x_BL, y_BL)
        (out.loss + out.aux_loss).backward()
        ref_norm = clip_grads_(ref, cfg.grad_clip, 1, None)
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_opt = build_optimizer(ref, cfg)
        for group in ref_opt.param_groups:
            group["lr"] = cfg.lr
        ref_opt.step()
        ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}

        # Distributed step, exactly as the trainer does it.
        model = build_model(job, ctx)
        sync = build_grad_sync(model, job, ctx)
        rows = cfg.batch_size // dims.dense_dp
        mine = slice(coords.dp * rows, (coords.dp + 1) * rows)
        out_d = model(x_BL[mine], y_BL[mine])
        (out_d.loss + out_d.aux_loss).backward()
        sync.sync()
        fired = [slot for slot, _ in getattr(sync, "history", [])]
        norm = clip_grads_(model, cfg.grad_clip, world, groups)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, cfg)
        for group in opt.param_groups:
            group["lr"] = cfg.lr
        opt.step()

        loss = out_d.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        e = model_cfg.moe.num_experts // ep
        h = model_cfg.moe.d_hidden // esp
        errs = {"loss": abs(float(loss) / world - float(out.loss.detach())), "grad_norm": abs(norm - ref_norm)}
        loads = torch.stack([st.expert_load_E.double() for st in out_d.moe_stats])  # tokens kept per expert
        torch.distributed.all_reduce(loads)  # every rank routes its own group: the sum is the grid's
        ref_loads = torch.stack([st.expert_load_E.double() for st in out.moe_stats])
        errs["expert_load"] = float((loads - ref_loads).abs().max())
        shard = (coords, e, h, mp, model_cfg)
        for n, p in model.named_parameters():
            errs[f"grad:{n}"] = float((grads[n] - _ref_slice(n, p, ref_grads, *shard)).abs().max())
            errs[f"param:{n}"] = float((p.detach() - _ref_slice(n, p, ref_params, *shard)).abs().max())
        results.append((f"{sched}/{r_fwd}/{r_bwd}/{plan}", errs, fired))
    return results
