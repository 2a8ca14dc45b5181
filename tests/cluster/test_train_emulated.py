"""``fsmoe train --emulate-nodes N --link RATE``: the CLI starts the ranks on an emulated cluster with
the node size forwarded to every rank, refuses layouts that do not fit the nodes before anything
starts, and leaves no namespace behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fsmoe.cli import _rank_argv, main
from fsmoe.cluster import check_privileges, list_namespaces

_REASON = check_privileges()


def test_rank_argv_drops_the_emulation_flags_and_sets_the_node_size() -> None:
    argv = ["train", "--emulate-nodes", "2", "--link=200mbit", "--allow-unshaped", "--nproc", "4",
            "--procs-per-node", "2", "--ep", "4"]
    assert _rank_argv(argv, 2) == ["train", "--nproc", "4", "--ep", "4", "--procs-per-node", "2"]
    assert _rank_argv(["train", "--link", "1gbit", "--procs-per-node=2"], 1) == ["train", "--procs-per-node", "1"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nproc", "4", "--emulate-nodes", "3"], "cannot be split evenly over --emulate-nodes 3"),
        (["--nproc", "4", "--emulate-nodes", "2", "--procs-per-node", "4"], "contradicts --nproc 4"),
        (["--nproc", "2", "--emulate-nodes", "2", "--esp", "2"], "esp=2 must divide procs_per_node=1"),
        (["--nproc", "2", "--emulate-nodes", "2", "--link", "1gbps"], "bytes/s"),
    ],
)
def test_layouts_that_do_not_fit_the_nodes_are_refused_before_any_rank_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "1", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(_REASON is not None, reason=f"no emulated cluster here: {_REASON}")
def test_train_runs_on_two_emulated_nodes_and_cleans_up(tmp_path: Path) -> None:
    before = set(list_namespaces("fsmoe-"))
    out = tmp_path / "run"
    rc = main(["train", "--emulate-nodes", "2", "--link", "200mbit", "--nproc", "2", "--ep", "2", "--steps", "2",
               "--batch-size", "4", "--eval-iters", "1", "--data-bytes", "200000", "--schedule", "fsmoe",
               "--r-fwd", "2", "--r-bwd", "2", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_loss"] > 0
    # every rank saw one rank per node: the EP group spans both namespaces (inter-node)
    assert json.loads((out / "config.json").read_text())["parallel"]["procs_per_node"] == 1
    assert set(list_namespaces("fsmoe-")) == before
    assert not list_namespaces(f"fsmoe-{os.getpid()}-")


def test_without_the_rights_it_refuses_then_runs_unshaped_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fsmoe.cluster.launcher as launcher

    monkeypatch.setattr(launcher, "check_privileges", lambda: "not root (test)")
    flags = ["train", "--emulate-nodes", "2", "--nproc", "2", "--ep", "2", "--steps", "1", "--batch-size", "4",
             "--eval-iters", "1", "--data-bytes", "200000", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not root (test)" in err and "--allow-unshaped" in err
    assert not (tmp_path / "run").exists()  # refused before any rank started
    with pytest.warns(RuntimeWarning, match="UNSHAPED"):
        assert main([*flags, "--allow-unshaped"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
