"""The trainer (run_train on a tiny model), its schedule and config, and the CLI over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsmoe.cli import main
from fsmoe.config import DataConfig, JobConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig, load_toml
from fsmoe.train import lr_at, run_train

METRIC_KEYS = {"step", "loss", "tokens_per_s", "aux_loss", "dropped_fraction", "lr"}
TEST_MODEL = ModelConfig(
    seq_len=32, d_model=48, n_layers=2, n_heads=2, d_ff=96, moe=MoEConfig(num_experts=4, top_k=2, d_hidden=48),
)
TEST_DATA = DataConfig(max_bytes=200_000)


def quick_cfg(tmp_path: Path, out: str = "run", **overrides: object) -> JobConfig:
    fields: dict[str, object] = dict(steps=40, batch_size=8, lr=3e-3, lr_warmup=5, log_every=10, eval_iters=2)
    fields.update(overrides)
    return JobConfig(model=TEST_MODEL, data=TEST_DATA, train=TrainConfig(**fields),  # type: ignore[arg-type]
                     run=RunConfig(out=str(tmp_path / out)))


def read_metrics(path: str | Path, kind: str = "train") -> list[dict[str, float]]:
    """The records of one ``kind`` (train or val) in a metrics.jsonl."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == kind]


def test_short_run_learns_and_writes_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_train(quick_cfg(tmp_path))
    assert result.steps == 40
    assert result.first_loss > 5.0  # ~ln 256 before any learning
    assert result.last_loss < result.first_loss - 1.0
    assert result.val_loss < result.first_loss - 1.0
    assert result.tokens_per_s > 0

    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40]
    assert all(METRIC_KEYS <= r.keys() for r in records)
    assert records[0]["loss"] == pytest.approx(result.first_loss)
    assert records[-1]["loss"] == pytest.approx(result.last_loss)
    assert all(0.0 <= r["dropped_fraction"] <= 1.0 and r["aux_loss"] > 0 for r in records)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(result.val_loss)
    assert load_toml(tmp_path / "run" / "job.toml") == quick_cfg(tmp_path)  # the resolved job, round-tripped

    out = capsys.readouterr().out
    assert "step 40/40 | loss" in out and "tok/s" in out and "val loss" in out


def test_runs_are_reproducible(tmp_path: Path) -> None:
    a = run_train(quick_cfg(tmp_path, "a", steps=3, log_every=1))
    b = run_train(quick_cfg(tmp_path, "b", steps=3, log_every=1))
    losses = [[r["loss"] for r in read_metrics(x.metrics_path)] for x in (a, b)]
    assert losses[0] == losses[1]
    assert a.val_loss == b.val_loss


def test_max_seconds_stops_early(tmp_path: Path) -> None:
    result = run_train(quick_cfg(tmp_path, steps=1000, max_seconds=1e-6))
    assert result.steps == 1
    assert [r["step"] for r in read_metrics(result.metrics_path)] == [1]


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=100, lr_warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(1, TrainConfig(lr_warmup=0, lr=1.0)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"grad_clip": 0.0}, "grad_clip"),
     ({"max_seconds": -1.0}, "max_seconds"), ({"lr_warmup": -1}, "lr_warmup")],
)
def test_train_config_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)  # type: ignore[arg-type]


def test_run_config_validation() -> None:
    with pytest.raises(ValueError, match="threads must be an int >= 1, got 0"):
        RunConfig(threads=0)


def test_cli_train_run(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    rc = main(["train", "--out", str(out), "--steps", "3", "--batch-size", "2", "--log-every", "1",
               "--eval-iters", "1", "--data-bytes", "50000", "--experts", "2", "--seed", "1"])
    assert rc == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    job = load_toml(out / "job.toml")
    assert (job.moe.num_experts, job.run.seed, job.train.steps, job.run.out) == (2, 1, 3, str(out))


@pytest.mark.parametrize(
    "argv",
    [["--top-k", "9"], ["--capacity-factor", "-1"], ["--gate", "nope"], ["--steps", "0"]],
)
def test_cli_rejects_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_reports_a_bad_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("abc")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "has 3 bytes, too short for seq_len=128" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_model_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmoe.cli import COMMANDS, build_parser, job_from_args

    monkeypatch.chdir(tmp_path)  # the train command checks its default --out (runs/default) under the cwd

    def job(*argv: str) -> JobConfig:
        return job_from_args(build_parser().parse_args(["train", *argv]), COMMANDS[0])

    moe = job("--experts", "8", "--top-k", "1", "--order", "einsum", "--capacity-factor", "none").moe
    assert (moe.num_experts, moe.top_k, moe.order, moe.capacity_factor) == (8, 1, "einsum", None)
    assert job("--moe-every", "1").model.num_moe_layers == 4
    assert job("--capacity-factor", "2").moe.capacity_factor == 2.0
    assert job().moe.capacity_factor == JobConfig().moe.capacity_factor
    assert job("--gate", "switch").moe.top_k == 1
    assert job("--model", "small").model.d_model == 768
    assert job("--model", "small", "--d-model", "384").model.d_model == 384
