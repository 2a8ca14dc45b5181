"""``fsmoe train --launcher emulated --procs-per-node Q --link RATE``: the CLI starts the ranks on an
emulated cluster of nproc/Q nodes, refuses layouts that do not fit the nodes before anything starts, and
leaves no namespace behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fsmoe.cli import main
from fsmoe.cluster import check_privileges, list_namespaces
from fsmoe.config import load_toml

_REASON = check_privileges()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nproc", "4", "--procs-per-node", "3"], "procs_per_node=3 must divide world_size=4"),
        (["--nproc", "2", "--procs-per-node", "1", "--esp", "2"], "esp=2 must divide procs_per_node=1"),
        (["--nproc", "2", "--procs-per-node", "1", "--link", "1gbps"], "bytes/s"),
    ],
)
def test_layouts_that_do_not_fit_the_nodes_are_refused_before_any_rank_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "1", "--launcher", "emulated", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(_REASON is not None, reason=f"no emulated cluster here: {_REASON}")
def test_train_runs_on_two_emulated_nodes_and_cleans_up(tmp_path: Path) -> None:
    before = set(list_namespaces("fsmoe-"))
    out = tmp_path / "run"
    rc = main(["train", "--launcher", "emulated", "--procs-per-node", "1", "--link", "200mbit", "--nproc", "2",
               "--ep", "2", "--steps", "2",
               "--batch-size", "4", "--eval-iters", "1", "--data-bytes", "200000", "--schedule", "fsmoe",
               "--r-fwd", "2", "--r-bwd", "2", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_loss"] > 0
    # every rank saw one rank per node: the EP group spans both namespaces (inter-node)
    assert load_toml(out / "job.toml").parallel.num_nodes == 2
    assert set(list_namespaces("fsmoe-")) == before
    assert not list_namespaces(f"fsmoe-{os.getpid()}-")


def test_without_the_rights_it_refuses_then_runs_unshaped_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fsmoe.cluster.launcher as launcher

    monkeypatch.setattr(launcher, "check_privileges", lambda: "not root (test)")
    flags = ["train", "--procs-per-node", "1", "--nproc", "2", "--ep", "2", "--steps", "1", "--batch-size", "4",
             "--eval-iters", "1", "--data-bytes", "200000", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--launcher", "emulated"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not root (test)" in err and "--launcher auto" in err
    assert not (tmp_path / "run").exists()  # refused before any rank started
    with pytest.warns(RuntimeWarning, match="UNSHAPED"):
        assert main([*flags, "--launcher", "auto"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
