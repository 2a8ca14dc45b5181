"""The Mixtral model's distributed step equals its single-process step: on 4 gloo ranks (one start), for
MP=2 × EP=2 (grouped-query attention split by heads and kv heads, sequence parallel, RoPE at global
positions), EP=2 × ESP=2 and EP=4, each plain and pipelined with a gradient plan, the loss and every
parameter's synchronised gradient match the single-device model with the same weights and global batch,
shard by shard."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fsmoe.config import JobConfig, ModelConfig, MoEConfig, ParallelConfig, ScheduleConfig, TrainConfig
from fsmoe.moe.experts import shard_index
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.parallel.parallelize import reference_grid
from fsmoe.parallel.tensor_parallel import TensorParallelGQA
from fsmoe.train.distributed import DistContext
from fsmoe.train.trainer import build_grad_sync, build_model
from tests.dist_utils import CaseOutcome, run_cases

MODEL = ModelConfig(
    name="mixtral-tiny", arch="mixtral", seq_len=16, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
    moe_every=1, tie_embeddings=False,
    moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32, expert="swiglu", capacity_factor=1.0),
)
# Three MoE blocks; then a dense block (SwiGLU MLP) followed by an MoE block.
MODEL_CFGS = (MODEL, dataclasses.replace(MODEL, n_layers=2, moe_every=2))
SCHEDULES = (("sequential", 1, 1), ("fsmoe", 2, 2))  # fsmoe: pipelined MoE, gradients all-reduced inside backward


def _ref_slice(name: str, p: torch.Tensor, ref: dict[str, torch.Tensor], coords, job: JobConfig) -> torch.Tensor:  # noqa: ANN001
    """The part of the single-process tensor that the distributed parameter ``name`` holds."""
    m, par = job.model, job.parallel
    if ".mlp.experts." in name:
        full = ref[name.replace(".mlp.experts.", ".mlp.layer.experts.")]
        e, h = m.moe.num_experts // par.ep, m.moe.d_hidden // par.esp
        return full[shard_index(name.rsplit(".", 1)[1], p.shape, coords.ep * e, coords.esp * h)]
    if ".mlp.gate." in name:
        return ref[name.replace(".mlp.gate.", ".mlp.layer.gate.")]
    if ".attn." in name and par.mp > 1:
        Dh, r = m.d_model // m.n_heads, coords.mp
        n, g = m.n_heads // par.mp * Dh, m.kv_heads // par.mp * Dh  # local q rows, local k (and v) rows
        if name.endswith("qkv.weight"):
            q0, k0, v0 = 0, m.n_heads * Dh, (m.n_heads + m.kv_heads) * Dh
            return torch.cat([ref[name][q0 + r * n : q0 + (r + 1) * n], ref[name][k0 + r * g : k0 + (r + 1) * g],
                              ref[name][v0 + r * g : v0 + (r + 1) * g]])
        return ref[name][:, r * n : (r + 1) * n]
    return ref[name]


def _step_vs_reference(rank: int, world: int, mp: int, ep: int, esp: int) -> dict[str, float]:
    """|distributed − single-process| of the loss and of every gradient, for every model × schedule."""
    par = ParallelConfig(nproc=world, procs_per_node=2, mp=mp, ep=ep, esp=esp)
    dims = ParallelDims.from_config(par)
    groups = build_groups(dims, channels=2)
    ctx = DistContext(rank, world, groups)
    coords = dims.rank_layout(rank)
    errs: dict[str, float] = {}
    for model_cfg in MODEL_CFGS:
        for sched, r_fwd, r_bwd in SCHEDULES:
            job = JobConfig(model=model_cfg, parallel=par, train=TrainConfig(batch_size=4),
                            schedule=ScheduleConfig(name=sched, r_fwd=r_fwd, r_bwd=r_bwd))
            gen = torch.Generator().manual_seed(11)
            x_BL = torch.randint(0, 256, (4, model_cfg.seq_len), generator=gen)
            y_BL = torch.randint(0, 256, (4, model_cfg.seq_len), generator=gen)

            # Single-process reference: the same weights, each rank's tokens routed as one group.
            ref = reference_grid(build_model(job.replace(parallel=ParallelConfig(), schedule=ScheduleConfig()), None),
                                 dims.dense_dp, mp)
            out = ref(x_BL, y_BL)
            (out.loss + out.aux_loss).backward()
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}

            model = build_model(job, ctx)
            if mp > 1:
                assert all(isinstance(b.attn, TensorParallelGQA) for b in model.blocks)
            sync = build_grad_sync(model, job, ctx)
            rows = 4 // dims.dense_dp
            mine = slice(coords.dp * rows, (coords.dp + 1) * rows)
            out_d = model(x_BL[mine], y_BL[mine])
            (out_d.loss + out_d.aux_loss).backward()
            sync.sync()
            loss = out_d.loss.detach().clone()
            torch.distributed.all_reduce(loss)
            case = f"{model_cfg.num_moe_layers}moe/{sched}"
            errs[f"{case}/loss"] = abs(float(loss) / world - float(out.loss))
            for n, p in model.named_parameters():
                errs[f"{case}/grad:{n}"] = float((p.grad - _ref_slice(n, p, ref_grads, coords, job)).abs().max())
    return errs


def case_mp2_ep2(rank: int, world: int) -> dict[str, float]:
    return _step_vs_reference(rank, world, mp=2, ep=2, esp=1)


def case_ep2_esp2(rank: int, world: int) -> dict[str, float]:
    return _step_vs_reference(rank, world, mp=1, ep=2, esp=2)


def case_ep4(rank: int, world: int) -> dict[str, float]:
    return _step_vs_reference(rank, world, mp=1, ep=4, esp=1)


CASES = (case_mp2_ep2, case_ep2_esp2, case_ep4)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, CaseOutcome]:
    return run_cases(CASES, 4, timeout=240)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_mixtral_step_matches_single_process(outcomes: dict[str, CaseOutcome], case: str) -> None:
    per_rank = outcomes[case].result()
    for rank, errs in enumerate(per_rank):
        assert len(errs) > len(MODEL_CFGS) * len(SCHEDULES) * 10, (rank, sorted(errs))
        bad = {k: v for k, v in errs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"
