"""Launching ranks: a short distributed run through the CLI, bad layouts refused before anything starts,
and a failing rank stopping the whole job quickly instead of leaving the others hanging."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from fsmoe.cli import main
from fsmoe.config import JobConfig, ParallelConfig, TrainConfig, gpt2_moe_tiny
from fsmoe.train.distributed import launch


def test_cli_runs_two_ranks_with_expert_parallelism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--out", str(tmp_path / "run"), "--nproc", "2", "--ep", "2", "--steps", "3",
               "--log-every", "1", "--eval-iters", "1", "--batch-size", "4", "--schedule", "fsmoe",
               "--r-fwd", "2", "--r-bwd", "1", "--data-bytes", "200000"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_loss"] > 0


def test_failing_rank_stops_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # so `-m tests.train.failing_rank` imports
    start = time.monotonic()
    rc = launch([], 2, module="tests.train.failing_rank")
    assert rc == 1
    assert time.monotonic() - start < 60  # the barrier's own timeout is 600 s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc": 4, "mp": 3}, "MP degree 3 does not divide the 4 ranks"),
        ({"nproc": 4, "procs_per_node": 3}, "procs_per_node=3 must divide world_size=4"),
        ({"nproc": 4, "procs_per_node": 1, "esp": 2}, r"esp=2 must divide procs_per_node=1"),
        ({"nproc": 4, "ep": 3}, r"ep\*esp must divide world_size"),
        ({"nproc": 2, "dispatcher": "ring"}, "unknown dispatcher 'ring'; choose one of a2a, 2dh, 1dh"),
    ],
)
def test_bad_layouts_are_refused_with_the_numbers(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_bad_degrees_are_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="r_fwd=2 != r_bwd=4"):
        JobConfig().with_overrides({"schedule.name": "tutel", "schedule.r_fwd": 2, "schedule.r_bwd": 4})


def _tiny(d_hidden: int = 256):  # noqa: ANN202
    base = gpt2_moe_tiny()
    return dataclasses.replace(base, moe=dataclasses.replace(base.moe, d_hidden=d_hidden))


@pytest.mark.parametrize(
    ("parallel", "d_hidden", "message"),
    [
        (ParallelConfig(nproc=4, ep=4, procs_per_node=4), 256, None),
        (ParallelConfig(nproc=4, esp=4, procs_per_node=4), 250, "expert hidden dim H=250 is not divisible by ESP=4"),
        (ParallelConfig(nproc=8, ep=8, procs_per_node=8), 256, "number of experts E=4 is not divisible by EP=8"),
        (ParallelConfig(nproc=3, mp=3, procs_per_node=3), 256, "attention heads 4 are not divisible by MP=3"),
        (ParallelConfig(nproc=2, mp=2, procs_per_node=2), 256, None),
    ],
)
def test_model_must_fit_the_layout(parallel: ParallelConfig, d_hidden: int, message: str | None) -> None:
    if message is None:
        JobConfig(parallel=parallel, model=_tiny(d_hidden))
    else:
        with pytest.raises(ValueError, match=message):
            JobConfig(parallel=parallel, model=_tiny(d_hidden))


def test_batch_must_split_over_data_parallel_ranks() -> None:
    job = JobConfig(parallel=ParallelConfig(nproc=4, ep=2, procs_per_node=4), train=TrainConfig(batch_size=6))
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the dense data-parallel degree 4"):
        job.check_training()


def test_cli_refuses_a_bad_layout_before_starting_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--nproc", "4", "--ep", "3", "--steps", "1"])
    assert exc.value.code == 2
    assert "ep*esp must divide world_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--nproc", "4", "--batch-size", "6", "--steps", "1"])
    assert exc.value.code == 2
    assert "global batch 6 is not divisible by the dense data-parallel degree 4" in capsys.readouterr().err
