"""What a run refuses or stops on, with one clear line and a non-zero exit, before any rank starts where
it can: a diverging run (non-finite loss or gradient), an output path that is not a writable directory
or holds a previous run, a gradient plan that does not parse, data that does not look like text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fsmoe.cli import main
from fsmoe.config import DataConfig
from fsmoe.train.data import check_data

TINY = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--data-bytes", "50000", "--eval-iters", "1",
        "--log-every", "1"]


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_at_the_first_non_finite_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e30", "--lr-warmup", "0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fsmoe train: step 2: the gradient norm is nan" in err and "Traceback" not in err
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert not (out / "summary.json").exists()
    records = _strict_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]  # the last good step was logged, the bad one was not


def test_a_diverging_distributed_run_stops_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e30", "--lr-warmup", "0", "--nproc", "2", "--ep", "2",
                 "--out", str(out)]) == 1
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_a_finished_run_is_marked_and_its_json_is_strict(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    status = json.loads((out / "status.json").read_text())
    assert status == {"state": "finished", "steps": 6}
    _strict_json_lines(out / "metrics.jsonl")
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("nproc", ["1", "4"])
def test_output_path_problems_are_refused_before_any_rank_starts(
    tmp_path: Path, nproc: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "metrics.jsonl").write_text("{}\n")
    cases = [(str(a_file), "exists and is not a directory"),
             ("/proc/fsmoe-test/run", "cannot write the run directory"),
             (str(previous), "holds a previous run (metrics.jsonl); pass --overwrite")]
    for out, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", *TINY, "--nproc", nproc, "--ep", nproc, "--batch-size", "4", "--out", out])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert (previous / "metrics.jsonl").read_text() == "{}\n"  # nothing started, nothing overwritten
    assert not (tmp_path / "new").exists()
    main(["train", *TINY, "--out", str(previous), "--overwrite"])
    assert json.loads((previous / "status.json").read_text())["state"] == "finished"


def test_a_bad_gradient_plan_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--nproc", "2", "--ep", "2", "--schedule", "fsmoe", "--r-fwd", "2", "--r-bwd", "2",
              "--gar-plan", "moe:9=2MB", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "moe:9" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_binary_data_is_warned_about_and_short_data_refused(tmp_path: Path) -> None:
    binary = tmp_path / "data.dat"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.warns(UserWarning, match="does not look like text"):
        check_data(DataConfig(path=str(binary)), seq_len=32)
    text = tmp_path / "data.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data(DataConfig(path=str(text)), seq_len=32)  # text: no warning
    with pytest.raises(ValueError, match="has 10 bytes, too short for seq_len=32"):
        short = tmp_path / "short.txt"
        short.write_text("0123456789")
        check_data(DataConfig(path=str(short)), seq_len=32)


def test_ctrl_c_stops_every_rank_in_one_line(tmp_path: Path) -> None:
    """SIGINT to the job's process group (what Ctrl-C sends) while 2 ranks train: exit 130, one fsmoe line,
    no traceback, no rank left, the run marked interrupted."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fsmoe", "train", "--nproc", "2", "--ep", "2", "--steps", "100000", "--batch-size",
            "4", "--data-bytes", "200000", "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in text and text.count("fsmoe: interrupted") == 1
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    assert subprocess.run(["pgrep", "-f", f"--out {out}"], capture_output=True).stdout == b""
