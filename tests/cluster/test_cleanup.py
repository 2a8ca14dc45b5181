"""Stale emulated clusters: a namespace is stale when the run that made it is gone (its pid is dead, or
now names a newer process), and ``fsmoe cluster cleanup`` (:func:`cleanup_command`) removes exactly
those, saying what it removed and what it left alone. The namespace tests need root (skipped, with the
reason, elsewhere)."""

from __future__ import annotations

import itertools
import os
import subprocess
import time

import pytest

from fsmoe.cluster import check_privileges, cleanup_command, list_namespaces, netns
from fsmoe.cluster.netns import destroy_namespaces, stale_namespaces

_REASON = check_privileges()
needs_root = pytest.mark.skipif(_REASON is not None, reason=f"no network namespaces here: {_REASON}")
_SEQ = itertools.count(900)  # above what this process's clusters use


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _add(*names: str) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=20)


def test_cleanup_command_without_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    lines: list[str] = []
    assert cleanup_command(lines.append) == 0
    assert lines == ["fsmoe cluster cleanup: 'ip' (iproute2) is not installed, so no emulated cluster can exist here"]


@needs_root
def test_stale_means_the_owner_is_dead_or_its_pid_was_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    dead, seq = _dead_pid(), next(_SEQ)
    gone, live = f"fsmoe-{dead}-{seq}-n0", f"fsmoe-{os.getpid()}-{seq}-hub"
    _add(gone, live)
    try:
        assert stale_namespaces([gone, live, "other-ns", "fsmoe-notours"]) == [gone]
        # our pid, but as if this process had started after the namespace was made: the pid was reused
        real = netns._process_started_at
        monkeypatch.setattr(
            netns, "_process_started_at", lambda pid: time.time() + 5 if pid == os.getpid() else real(pid)
        )
        assert stale_namespaces([gone, live]) == [gone, live]
    finally:
        destroy_namespaces([gone, live])
    assert not set(list_namespaces()) & {gone, live}


@needs_root
def test_cleanup_command_removes_dead_runs_clusters_and_leaves_running_ones() -> None:
    dead, seq = _dead_pid(), next(_SEQ)
    tag, mine = f"fsmoe-{dead}-{seq}", f"fsmoe-{os.getpid()}-{seq}"
    stale, live = [f"{tag}-hub", f"{tag}-n0", f"{tag}-n1"], [f"{mine}-hub", f"{mine}-n0"]
    _add(*stale, *live)
    lines: list[str] = []
    try:
        assert cleanup_command(lines.append) == 0
        left = set(list_namespaces())
        assert not left & set(stale) and set(live) <= left
    finally:
        destroy_namespaces(stale + live)
    text = "\n".join(lines)
    assert lines[0].startswith("fsmoe cluster cleanup: removed ") and f"{tag}" in lines[0] and f"pid {dead}" in lines[0]
    assert "left alone:" in text and mine in text.split("left alone:")[1]
    # nothing stale left: says so
    lines.clear()
    assert cleanup_command(lines.append) == 0
    assert lines[0] == "fsmoe cluster cleanup: no emulated cluster of a finished run was left behind"
