"""Device and backend selection (``--device auto|cpu|cuda``): the pure decision with the GPU count faked,
and :func:`~fsmoe.train.distributed.setup` following it on two real gloo ranks (CPU), a bad device
raising the same error on every rank before any collective."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fsmoe.config import ParallelConfig
from fsmoe.parallel.comm import collective_device
from fsmoe.train.distributed import Placement, global_grad_norm, rank_placement, resolve_device, setup
from tests.dist_utils import run_cases

CPU = Placement(torch.device("cpu"), "gloo")


@pytest.mark.parametrize(("device", "local_rank", "local_world", "gpus", "want"), [
    ("auto", 0, 1, 0, CPU),
    ("auto", 1, 2, 0, CPU),
    ("cpu", 0, 1, 8, CPU),  # cpu wins over GPUs that are there
    ("auto", 0, 1, 1, Placement(torch.device("cuda", 0), "nccl")),
    ("auto", 3, 4, 8, Placement(torch.device("cuda", 3), "nccl")),
    ("cuda", 1, 2, 2, Placement(torch.device("cuda", 1), "nccl")),
])
def test_each_rank_gets_its_device_and_backend(device, local_rank, local_world, gpus, want) -> None:
    got = resolve_device(device, local_rank=local_rank, local_world_size=local_world, num_gpus=gpus)
    assert got == want
    assert got.is_cuda == (want.backend == "nccl")


@pytest.mark.parametrize(("device", "local_rank", "local_world", "gpus", "match"), [
    ("cuda", 0, 1, 0, r"--device cuda, but CUDA is not available .*use --device cpu or auto"),
    ("cuda", 0, 4, 2, r"--device cuda: 4 ranks on this node but only 2 GPU\(s\) visible"),
    ("auto", 2, 3, 2, r"--device auto: 3 ranks on this node but only 2 GPU\(s\) visible"),
    ("gpu", 0, 1, 1, r"unknown device 'gpu'; choose one of auto, cpu, cuda"),
    ("cpu", 2, 2, 0, r"local rank 2 is outside 0..1 \(LOCAL_WORLD_SIZE\)"),
])
def test_a_placement_that_cannot_be_met_is_refused_naming_the_numbers(device, local_rank, local_world, gpus,
                                                                      match) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_device(device, local_rank=local_rank, local_world_size=local_world, num_gpus=gpus)


def test_the_process_placement_reads_the_launcher_variables() -> None:
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert rank_placement("cpu", env) == CPU
    assert rank_placement("cpu", {}) == CPU  # one process: local rank 0 of 1
    with pytest.raises(ValueError, match="outside 0..0"):
        rank_placement("cpu", {"LOCAL_RANK": "1"})
    if torch.cuda.is_available():
        assert rank_placement("auto", {}).device == torch.device("cuda", 0)
    else:
        assert rank_placement("auto", env) == CPU
        with pytest.raises(ValueError, match="CUDA is not available"):
            rank_placement("cuda", env)


# --- two gloo ranks ----------------------------------------------------------------------------------


def case_setup_on_the_cpu(rank: int, world: int) -> tuple:
    ctx = setup(ParallelConfig(nproc=world), "device-test", device="auto" if not torch.cuda.is_available() else "cpu")
    assert ctx is not None
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, float(rank + 1))  # 'world'-replicated: each rank counts half of its own
    norm = global_grad_norm(model, world, ctx.groups)
    assert collective_device() == collective_device(ctx.groups.group("ep")) == ctx.device  # gloo: the CPU
    return str(ctx.device), dist.get_backend(), ctx.rank, ctx.world, float(norm)


def case_cuda_without_enough_gpus_fails_alike_on_every_rank(rank: int, world: int) -> str:
    with pytest.raises(ValueError) as err:
        setup(ParallelConfig(nproc=world), "device-test", device="cuda")
    dist.barrier()  # no rank entered a collective: the next one still lines up
    return str(err.value)


def test_setup_follows_the_placement_on_two_gloo_ranks() -> None:
    out = run_cases([case_setup_on_the_cpu, case_cuda_without_enough_gpus_fails_alike_on_every_rank], 2)
    values = out["case_setup_on_the_cpu"].result()
    want_norm = ((8 * 1 + 8 * 4) / 2) ** 0.5  # 8 elements, grads 1 and 2, each counted once over the world
    for rank, (device, backend, r, world, norm) in enumerate(values):
        assert (device, backend, r, world) == ("cpu", "gloo", rank, 2)
        assert norm == pytest.approx(want_norm)
    errors = out["case_cuda_without_enough_gpus_fails_alike_on_every_rank"].result()
    assert errors[0] == errors[1]
    assert "CUDA is not available" in errors[0] or "GPU(s) visible" in errors[0]


@pytest.mark.parametrize("schedule", [{}, {"schedule.name": "fsmoe", "schedule.r_fwd": 2, "schedule.r_bwd": 2}])
def test_bf16_training_step_runs_the_forward_under_autocast_with_an_fp32_loss(schedule: dict) -> None:
    """``train_step(dtype="bf16")``, plain and pipelined (whose backward runs in the forward's autocast
    state): the first step's loss is fp32, close to the fp32 step's and not equal to it (the matmuls ran in
    bf16); the master weights stay fp32."""
    from fsmoe.config import JobConfig
    from fsmoe.train.data import BatchSampler
    from fsmoe.train.trainer import build_grad_sync, build_model, build_optimizer, train_step

    job = JobConfig().with_overrides({"model.seq_len": 16, "model.d_model": 32, "model.n_layers": 2,
                                      "model.n_heads": 2, "model.d_ff": 64, "moe.d_hidden": 32,
                                      "train.batch_size": 2, "train.lr_warmup": 1, **schedule})
    batch = BatchSampler(torch.arange(400) % 256, batch_size=2, seq_len=16, seed=0).sample()
    results = {}
    for dtype in ("fp32", "bf16"):
        model = build_model(job, None)
        opt, sync = build_optimizer(model, job.train), build_grad_sync(model, job, None)
        out = train_step(model, opt, sync, batch, 1, job.train, None, dtype=dtype)
        results[dtype] = (out.loss.detach(), out.logits.dtype, {p.dtype for p in model.parameters()})
    (l32, logits32, p32), (l16, logits16, p16) = results["fp32"], results["bf16"]
    assert logits32 == torch.float32 and logits16 == torch.bfloat16
    assert l16.dtype == torch.float32 and p16 == p32 == {torch.float32}
    assert float(l16) != float(l32) and float(l16) == pytest.approx(float(l32), rel=2e-2)


@pytest.mark.parametrize(("argv", "message"), [
    (["plan", "--device", "cuda"], "the profiler measures CPU workloads"),
    (["train", "--device", "cuda", "--schedule", "fsmoe"], "the profiler measures CPU workloads"),
    (["bench", "layer", "--device", "cuda"], "bench layer: the benchmark's ranks run on the CPU with gloo"),
    (["bench", "layer", "--dtype", "bf16"], "bench layer: the layer is timed in fp32"),
    (["bench", "train", "--device", "cuda"], "bench train: the benchmark's ranks run on the CPU with gloo"),
])
def test_what_does_not_run_on_a_gpu_yet_is_refused_not_ignored(argv: list[str], message: str,
                                                                tmp_path, monkeypatch, capsys) -> None:
    from fsmoe.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_train_on_cuda_without_cuda_is_refused_before_any_rank_starts(tmp_path, monkeypatch, capsys) -> None:
    from fsmoe.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "cuda", "--nproc", "2", "--ep", "2", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "--device cuda, but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
