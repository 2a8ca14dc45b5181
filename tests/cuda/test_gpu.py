"""The GPU path on one CUDA device (``pytest -m cuda``; skipped without CUDA): the layer against the CPU,
bf16 against fp32, the stream runtime against thread lanes and its overlap, NCCL joining, a tiny training
run. Multi-rank NCCL needs several GPUs: those paths are covered on CPU by the same tests with gloo."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from fsmoe.train.distributed import global_grad_norm, rank_placement, use_device
from tests.cuda import checks

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on a GPU machine)"),
]


@pytest.fixture(scope="module")
def device() -> torch.device:
    placement = rank_placement("auto", {})
    use_device(placement)
    return placement.device


def _failing(rows: list[checks.LayerDiff], tol: float) -> list[str]:
    return [f"{r.gate}/{r.order}/{r.expert}: routing same {r.same_routing}, y {r.y_rel:.2e}, dx {r.dx_rel:.2e}, "
            f"grads {r.grad_rel:.2e}" for r in rows if not r.ok(tol)]


def test_auto_places_the_rank_on_its_gpu_with_nccl(device: torch.device) -> None:
    assert device == torch.device("cuda", 0)
    assert rank_placement("auto", {}).backend == "nccl"
    assert torch.cuda.current_device() == 0


def test_every_gate_order_expert_on_cuda_equals_the_cpu(device: torch.device) -> None:
    rows = checks.layer_diffs(device)
    assert len(rows) == 24
    assert not _failing(rows, checks.FP32_TOL)


def test_bf16_autocast_on_cuda_routes_as_fp32_and_stays_within_tolerance(device: torch.device) -> None:
    rows = checks.bf16_diffs(device)
    assert not _failing(rows, checks.BF16_TOL)


def test_the_pipelined_block_on_cuda_streams_equals_thread_lanes_on_the_cpu(device: torch.device) -> None:
    assert checks.pipelined_diff(device) <= checks.FP32_TOL


def test_the_stream_runtime_overlaps_a_long_comm_task_with_expert_compute(device: torch.device) -> None:
    o = checks.measure_overlap(device)
    assert o.ratio <= checks.OVERLAP_LIMIT, o


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_tiny_gpt_moe_learns_on_one_gpu(device: torch.device, dtype: str) -> None:
    losses = checks.train_tiny(device, dtype=dtype)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_nccl_joins_on_the_placed_device_and_reduces_the_grad_norm(device: torch.device,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4
        model = torch.nn.Linear(3, 2).to(device)
        for p in model.parameters():
            p.grad = torch.full_like(p, 2.0)
        assert float(global_grad_norm(model, 1, None)) == pytest.approx(32**0.5)
    finally:
        dist.destroy_process_group()
