"""Exact resume: 20 steps straight equal 10 steps, a checkpoint, and 10 more steps in fresh processes, bit
for bit (fp32 on CPU), with dropout and noisy gating on so that every rank's RNG must be restored too;
on one process (resuming into the same run directory, whose metrics.jsonl is appended to) and on 4
gloo ranks (MP=2 x EP=2: attention shards, expert shards, a per-rank RNG). Also what the run logs:
per-expert loads summed over ranks, validation records, the progress bar."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsmoe.config import (
    DataConfig,
    JobConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    dump_toml,
)
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.train import run_train
from fsmoe.train.checkpoint import check_resume
from fsmoe.train.data import load_corpus
from fsmoe.train.distributed import DistContext
from fsmoe.train.trainer import train
from tests.dist_utils import run_distributed

MODEL = ModelConfig(seq_len=16, d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.1,
                    moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32, noisy=True))


def _job(out: Path, parallel: ParallelConfig | None = None, **train: object) -> JobConfig:
    fields: dict[str, object] = dict(steps=20, batch_size=4, lr=3e-3, lr_warmup=4, log_every=1, eval_iters=1,
                                     save_every=10)
    fields.update(train)
    return JobConfig(model=MODEL, data=DataConfig(max_bytes=50_000), train=TrainConfig(**fields),  # type: ignore[arg-type]
                     parallel=parallel or ParallelConfig(), run=RunConfig(out=str(out), progress="lines", threads=1))


def train_losses(metrics: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_single_process_resume_into_the_same_run_is_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(_job(out))
    straight = train_losses(out / "metrics.jsonl")
    assert [s for s, _ in straight] == list(range(1, 21))
    # A fresh process resumes from step 10 into the same run directory: the records after step 10 are
    # dropped and written again by the resumed run, identical to the straight run's.
    (tmp_path / "job.toml").write_text(dump_toml(_job(out, resume=str(out / "checkpoints" / "step_000010"))))
    script = "import sys; from fsmoe.config import load_toml; from fsmoe.train import run_train; " \
             "run_train(load_toml(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "job.toml")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "at step 10" in done.stdout
    assert train_losses(out / "metrics.jsonl") == straight
    val_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "val"]
    assert val_steps == [20]  # the straight run's final evaluation was dropped with its later records
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


def test_resuming_in_place_rewinds_latest_to_the_checkpoint_it_continues(tmp_path: Path) -> None:
    """A run resumed in place from step 10 that saves nothing more: ``latest`` names step 10 again (not the
    abandoned step 20), so a further resume continues this run's history."""
    out = tmp_path / "run"
    run_train(_job(out, steps=12, save_every=5, eval_every=None))  # checkpoints at 5, 10 and 12
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000012"
    run_train(_job(out, steps=12, save_every=None, resume=str(out / "checkpoints" / "step_000005")))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000005"
    assert [s for s, _ in train_losses(out / "metrics.jsonl")] == list(range(1, 13))


# --- 4 ranks: MP=2 x EP=2 --------------------------------------------------------------------------------

LAYOUT = ParallelConfig(nproc=4, procs_per_node=4, mp=2, ep=2)


def train_on_ranks(rank: int, world: int, out: str, resume: str | None) -> list[dict] | None:
    """One job run by the trainer on the harness's gloo group; rank 0 returns the metrics records."""
    job = _job(Path(out), LAYOUT, resume=resume, eval_every=5)
    ctx = DistContext(rank, world, build_groups(ParallelDims.from_config(job.parallel), channels=2))
    result = train(job, load_corpus(job.data, job.model.seq_len), ctx, check_resume(job))
    return [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()] if rank == 0 else None


def test_distributed_resume_in_fresh_ranks_is_bit_exact(tmp_path: Path) -> None:
    straight = run_distributed(train_on_ranks, 4, str(tmp_path / "a"), None, timeout=120)[0]
    resumed = run_distributed(train_on_ranks, 4, str(tmp_path / "b"),
                              str(tmp_path / "a" / "checkpoints" / "step_000010"), timeout=120)[0]
    losses = [[(r["step"], r["loss"]) for r in records if r["kind"] == "train"] for records in (straight, resumed)]
    assert [s for s, _ in losses[1]] == list(range(11, 21))
    assert losses[1] == losses[0][10:]
    assert [r["step"] for r in straight if r["kind"] == "val"] == [5, 10, 15, 20]
    assert [r for r in resumed if r["kind"] == "val"] == [r for r in straight if r["kind"] == "val"][2:]

    # Every logged step: the experts' kept assignments, summed over the 4 ranks, are the global batch's
    # 4 x 16 tokens x top-2 less the dropped share of each MoE layer.
    for r in straight:
        if r["kind"] == "train":
            assert len(r["expert_load"]) == len(r["dropped_per_layer"]) == MODEL.num_moe_layers
            for load, dropped in zip(r["expert_load"], r["dropped_per_layer"], strict=True):
                assert len(load) == 4 and min(load) >= 0
                assert sum(load) == round((1 - dropped) * 4 * 16 * 2)
    assert any(d > 0 for r in straight if r["kind"] == "train" for d in r["dropped_per_layer"])


def test_the_progress_bar_replaces_the_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job(tmp_path / "run", steps=3, save_every=None)
    run_train(job.replace(run=dataclasses.replace(job.run, progress="bar")))
    out = capsys.readouterr().out
    assert "3/3" in out and "loss=" in out  # the bar, with the loss in its postfix
    assert "step 3/3 | loss" not in out and "step 3: val loss" in out
