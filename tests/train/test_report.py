"""``fsmoe report``: a synthetic finished run (every number checked), a run still going, an old run without
the new keys, bad run directories, and a real tiny ``fsmoe train`` run reported through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from fsmoe.cli import main
from fsmoe.config import JobConfig, ModelConfig, MoEConfig, TrainConfig, dump_toml
from fsmoe.train.report import write_report

JOB = JobConfig(model=ModelConfig(seq_len=32, d_model=48, n_layers=4, n_heads=2, d_ff=96,
                                  moe=MoEConfig(num_experts=4, top_k=2, d_hidden=48)),
                train=TrainConfig(steps=30, batch_size=8))

# Per logged step: counts per expert for MoE layers 0 and 1. Over the run, layer 0's expert 2 gets the largest
# mean share and expert 3 the smallest; in layer 1 expert 0 the largest and expert 1 the smallest.
LOADS = {
    1: [[10, 10, 60, 20], [50, 10, 20, 20]],
    10: [[20, 20, 50, 10], [40, 5, 30, 25]],
    20: [[25, 25, 40, 10], [30, 10, 30, 30]],
    30: [[25, 25, 30, 20], [28, 12, 30, 30]],
}
LOSSES = {1: 5.5432, 10: 4.1, 20: 3.2, 30: 2.8765}


def train_record(step: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "train", "step": step, "loss": LOSSES[step], "loss_steps": 1 if step == 1 else 10, "aux_loss": 0.02,
            "dropped_fraction": 0.01 * step, "lr": 1e-3, "tokens_per_s": 1000.0 * step, "elapsed_s": 0.1 * step,
            **extra}


def write_run(run: Path, *, finished: bool = True, partial_tail: str = "", new_keys: bool = True) -> None:
    """A run directory as ``fsmoe train`` writes it (metrics with expert loads, validation records)."""
    run.mkdir(parents=True)
    records = []
    for step in LOADS:
        if new_keys:
            records.append(train_record(step, expert_load=LOADS[step], dropped_per_layer=[0.125, 0.25]))
        else:
            records.append({k: v for k, v in train_record(step).items() if k != "kind"})
        if new_keys and step in (10, 20, 30):
            val_loss = {10: 4.0, 20: 3.1, 30: 3.3}[step]  # best at step 20, then worse
            records.append({"kind": "val", "step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + partial_tail)
    (run / "job.toml").write_text(dump_toml(JOB))
    if finished:
        (run / "summary.json").write_text(json.dumps({"first_loss": 5.5432, "last_loss": 2.8765, "val_loss": 3.3,
                                                      "steps": 30, "tokens_per_s": 12345.6, "metrics_path": "x"}))
    (run / "status.json").write_text(json.dumps({"state": "finished" if finished else "running"}))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas


def table(md: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.strip("|").split("|", 1) for line in md.splitlines()
                                              if line.startswith("| ") and line.count("|") == 3)}


def test_report_of_a_finished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run)
    md_path = write_report(run)
    assert md_path == run / "report" / "report.md"
    assert_png(run / "report" / "loss.png")
    assert_png(run / "report" / "expert_load.png")
    md = md_path.read_text()
    rows = table(md)
    assert rows["state"] == "finished"
    assert rows["model"].startswith("tiny (gpt): 4 layers, 2 MoE (4 experts, top-2, gate")
    assert rows["layout"] == "1 process, schedule sequential"
    assert rows["steps"] == "30 of 30 (8 x 32 tokens each)"
    assert rows["train loss"] == "first 5.5432 (step 1), last 2.8765 (step 30, mean of its 10 steps)"
    assert rows["validation loss"] == (f"best 3.1000 (step 20, perplexity {math.exp(3.1):.2f}), "
                                       f"last 3.3000 (step 30, perplexity {math.exp(3.3):.2f})")
    assert rows["tokens/s"] == "12,346 (training steps of the whole run)"
    mean_dropped = (0.01 + 0.1 + 0.2 + 0.3) / 4
    assert rows["dropped fraction"] == f"last 0.3000, mean {mean_dropped:.4f} over 4 logged steps"
    # Most and least loaded experts: mean shares computed by hand from LOADS (every step routes 100 tokens).
    share0 = [sum(LOADS[s][0][e] for s in LOADS) / 400 for e in range(4)]
    share1 = [sum(LOADS[s][1][e] for s in LOADS) / 400 for e in range(4)]
    assert f"| 0 | 2 ({share0[2]:.3f}) | 3 ({share0[3]:.3f}) | 0.1250 |" in md
    assert f"| 1 | 0 ({share1[0]:.3f}) | 1 ({share1[1]:.3f}) | 0.2500 |" in md
    assert "![loss curves](loss.png)" in md and "![expert load per MoE layer](expert_load.png)" in md


def test_report_of_a_run_still_going(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, finished=False, partial_tail='{"kind": "train", "step": 40, "lo')
    rows = table(write_report(run).read_text())
    assert rows["state"] == "running (the last line of metrics.jsonl was partial, skipped)"
    assert rows["steps"].startswith("30 of 30")
    assert rows["tokens/s"] == "15,000 (median of the logged intervals)"  # of 1k, 10k, 20k, 30k: no summary.json yet
    assert_png(run / "report" / "loss.png")


def test_report_of_an_old_run_without_the_new_keys(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, new_keys=False)
    (run / "report").mkdir()
    (run / "report" / "expert_load.png").write_bytes(b"stale")
    md = write_report(run).read_text()
    rows = table(md)
    assert rows["validation loss"].startswith("best 3.3000 (step 30")  # summary.json's final validation loss
    assert "No `expert_load` in metrics.jsonl" in md
    assert not (run / "report" / "expert_load.png").exists()  # not this run's picture
    assert_png(run / "report" / "loss.png")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda run: None, r"run directory '.*missing' does not exist"),
        (lambda run: run.mkdir(), r"'.*missing' has no metrics.jsonl: not a run directory"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("")), "holds no training record yet"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 2}\n')),
         r"metrics.jsonl', line 2: "),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text(
            '{"step": 1, "expert_load": [[1, 2]]}\n{"step": 2, "expert_load": [[1, 2, 3]]}\n')),
         r"expert_load must be \[\[count per expert\] per MoE layer\], of one shape in every record"),
    ],
    ids=["no-dir", "no-metrics", "empty-metrics", "broken-middle-line", "ragged-expert-load"],
)
def test_bad_run_directory_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any,
                                                message: str) -> None:
    run = tmp_path / "missing"
    setup(run)
    with pytest.raises(ValueError, match=message):
        write_report(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsmoe report: error: ") and err.count("\n") == 1


def test_report_of_a_real_training_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out, runs/default, lands in the temporary directory
    assert main(["train", "--steps", "10", "--log-every", "2", "--batch-size", "4", "--seq-len", "32",
                 "--d-model", "48", "--n-layers", "2", "--n-heads", "2", "--d-ff", "96", "--hidden", "48",
                 "--experts", "4", "--eval-iters", "1", "--data-bytes", "50000"]) == 0
    capsys.readouterr()
    assert main(["report", "runs/default"]) == 0
    assert "report: runs/default/report/report.md" in capsys.readouterr().out
    run = tmp_path / "runs" / "default"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind", "train") == "train"]
    summary = json.loads((run / "summary.json").read_text())
    rows = table((run / "report" / "report.md").read_text())
    assert rows["state"] == "finished"
    assert rows["steps"] == "10 of 10 (4 x 32 tokens each)"
    assert rows["train loss"] == (f"first {train[0]['loss']:.4f} (step 1), last {train[-1]['loss']:.4f} (step 10, "
                                  "mean of its 2 steps)")
    assert f"last {summary['val_loss']:.4f}" in rows["validation loss"]
    assert rows["tokens/s"] == f"{summary['tokens_per_s']:,.0f} (training steps of the whole run)"
    assert_png(run / "report" / "loss.png")
    assert all(len(r["expert_load"]) == 1 for r in train)  # the trainer logs the one MoE layer's loads (2 blocks)
    assert_png(run / "report" / "expert_load.png")
