"""Faults of a launched job, with real processes: a hung rank ends the job within the hang timeout,
naming the rank and its last step, with a non-zero exit, under the elastic launcher (`fsmoe train
--nproc N`) and the cluster launchers; a launcher killed with SIGKILL takes its ranks along. The
heartbeat's own logic is tested first, on files written in this process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec, LocalCluster, check_privileges
from fsmoe.cluster.ranks import pid_alive
from fsmoe.train.distributed import (
    HEARTBEAT_DIR_ENV,
    LAUNCHER_PID_ENV,
    HangWatch,
    Heartbeat,
    die_with_launcher,
    heartbeat_path,
    launch,
)
from tests.dist_utils import wait_for

REPO = Path(__file__).resolve().parents[2]
HANG_S = 3.0
SLACK_S = 5.0  # the watchdog polls twice a second; killing and reaping take well under a second
HELPER = "tests.train.hanging_rank"


def _pids(folder: Path, world: int) -> list[int] | None:
    try:
        return [int((folder / f"rank{r}.pid").read_text()) for r in range(world)]
    except (FileNotFoundError, ValueError):
        return None


# --- the heartbeat, in this process ------------------------------------------------------------------


def test_heartbeat_is_a_no_op_without_a_launcher() -> None:
    beat = Heartbeat.from_env({"RANK": "0"})
    assert not beat.enabled
    beat(3)  # nothing to write to


def test_silence_is_measured_from_the_last_change_and_start_up_gets_longer() -> None:
    with HangWatch(2, 10.0, startup_s=60.0) as watch:
        assert watch.folder is not None
        env = {HEARTBEAT_DIR_ENV: str(watch.folder)}
        beat0, beat1 = Heartbeat.from_env({**env, "RANK": "0"}), Heartbeat.from_env({**env, "RANK": "1"})
        assert beat0.enabled and heartbeat_path(watch.folder, 1).exists()
        t0 = time.monotonic()
        assert [b.step for b in watch.read(t0)] == [0, 0]  # up, no step finished
        assert watch.stalled(t0 + 59) is None  # start-up may take 60 s
        stall = watch.stalled(t0 + 61)
        assert (
            stall is not None and stall.message() == "rank 0 made no progress for 61 s (last step 0); stopping the job"
        )
        beat0(1)
        beat1(1)
        assert watch.stalled(t0 + 62) is None  # seen to change at t0 + 62
        beat0(2)
        stall = watch.stalled(t0 + 72.4)  # rank 0 moved on; rank 1 has been silent for 10.4 s after step 1
        assert stall is not None and (stall.rank, stall.last_step) == (1, 1)
        assert stall.message() == "rank 1 made no progress for 10 s (last step 1); stopping the job"
        assert "rank 0: step 2, silent 0.0 s" in stall.details()
        beat1.alive()  # beating the same step again is progress too (a long phase without steps)
        assert watch.stalled(t0 + 73) is None
        assert [b.step for b in watch.read(t0 + 73)] == [2, 1]
        folder = watch.folder
    assert watch.folder is None and not folder.exists()


def test_a_rank_that_exited_is_not_a_hang() -> None:
    with HangWatch(1, 1.0) as watch:
        assert watch.folder is not None
        pid = os.fork()
        if pid == 0:  # the child beats once and leaves
            Heartbeat.from_env({HEARTBEAT_DIR_ENV: str(watch.folder), "RANK": "0"})(7)
            os._exit(0)
        os.waitpid(pid, 0)
        [beat] = watch.read(time.monotonic() + 100)
        assert beat.pid == pid and beat.step == 7 and beat.exited
        assert watch.stalled(time.monotonic() + 100) is None


def test_a_rank_whose_launcher_is_gone_exits_at_once() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a "rank" whose launcher is pid 1, which is not its parent: the launcher died before it armed
        os.close(read)
        try:
            die_with_launcher({LAUNCHER_PID_ENV: "1", "RANK": "3"})
            os.write(write, b"still here")
            os._exit(0)
        except SystemExit as exc:
            os.write(write, str(exc.code).encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert said == "fsmoe: the launcher (pid 1) is gone; rank 3 exits"
    die_with_launcher({})  # no launcher of ours (torchrun, one process): nothing happens


# --- hung ranks, with real launchers ----------------------------------------------------------------


def _launch_timing_armed(
    run: Callable[[], int], pid_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, float, list[int]]:
    """Run ``run()`` (a launch of the helper in ``pid_dir``); return its status, the seconds from the
    moment every rank was armed (its pid written, ~0.25 s before the hang) to the end, and the pids."""
    monkeypatch.setenv("FSMOE_TEST_PID_DIR", str(pid_dir))
    armed: list[float] = []
    stop = threading.Event()

    def watch_pids() -> None:
        while not stop.is_set():
            if _pids(pid_dir, 2) is not None:
                armed.append(time.monotonic())
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch_pids, daemon=True)
    thread.start()
    try:
        code = run()
    finally:
        stop.set()
        thread.join()
    end = time.monotonic()
    pids = _pids(pid_dir, 2)
    assert armed and pids is not None, "the ranks never started"
    return code, end - armed[0], pids


@pytest.mark.parametrize(
    ("mode", "detail"),
    [("stop", "rank 1: step 4, silent .* process stopped"), ("sleep", "rank 0: step 5")],
    ids=["SIGSTOP", "sleeps"],
)
def test_a_hung_rank_ends_a_local_job_naming_the_rank_and_step(
    mode: str, detail: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # so `-m tests.train.hanging_rank` imports
    code, seconds, pids = _launch_timing_armed(
        lambda: launch([mode], 2, module=HELPER, hang_timeout_s=HANG_S), tmp_path, monkeypatch
    )
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"fsmoe: rank 1 made no progress for 3 s \(last step 4\); stopping the job", err), err
    assert re.search(detail, err), err
    assert "a rank failed" not in err  # one message, not torch's failure report as well
    assert seconds < HANG_S + SLACK_S, f"{seconds:.1f} s from the hang to the end"
    assert not any(pid_alive(p) for p in pids)


_EMULATED = check_privileges()


@pytest.mark.parametrize("where", ["loopback", "emulated"])
def test_a_hung_rank_ends_a_cluster_launch(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "emulated" and _EMULATED is not None:
        pytest.skip(f"no emulated cluster here: {_EMULATED}")
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=1, link="unshaped" if where == "loopback" else "1gbit")
    cluster = LocalCluster(spec) if where == "loopback" else EmulatedCluster(spec)
    argv = [sys.executable, "-m", HELPER, "stop"]
    with cluster:
        code, seconds, pids = _launch_timing_armed(
            lambda: cluster.launch(argv, cwd=REPO, timeout=120, watchdog=HangWatch(2, HANG_S)), tmp_path, monkeypatch
        )
    err = capsys.readouterr().err
    assert code == 124
    assert "fsmoe: rank 1 made no progress for 3 s (last step 4); stopping the job" in err, err
    assert seconds < HANG_S + SLACK_S, f"{seconds:.1f} s from the hang to the end"
    assert not any(pid_alive(p) for p in pids)


# --- a launcher killed with SIGKILL ---------------------------------------------------------------


_LAUNCHER = textwrap.dedent(
    """
    import os, sys
    os.chdir({repo!r}); sys.path.insert(0, {repo!r})
    from fsmoe.train.distributed import launch
    launch(["run"], 2, module={helper!r}, hang_timeout_s=600)
    """
)


def test_ranks_die_with_their_killed_launcher(tmp_path: Path) -> None:
    env = {**os.environ, "FSMOE_TEST_PID_DIR": str(tmp_path)}
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER.format(repo=str(REPO), helper=HELPER)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _pids(tmp_path, 2) is not None, 60, "both ranks to start")
        pids = _pids(tmp_path, 2)
        assert pids is not None and all(pid_alive(p) for p in pids)
        t0 = time.monotonic()
        launcher.kill()
        launcher.wait(timeout=10)
        gone = wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the ranks to die with their launcher")
        assert gone - t0 < 2.0
        # its heartbeat folder is left behind; the next watch removes it
        left = list(Path(tempfile.gettempdir()).glob(f"fsmoe-heartbeat-{launcher.pid}-*"))
        assert len(left) == 1
        with HangWatch(1, 1.0):
            assert not left[0].exists()
    finally:
        launcher.kill()
        for p in _pids(tmp_path, 2) or []:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)


def test_keep_alive_beats_while_a_long_phase_runs_and_stops_after(tmp_path) -> None:
    """A checkpoint save or load beats the heartbeat from a thread (the watchdog sees progress), and stops
    beating when the phase ends; without a watched heartbeat it starts no thread."""
    from fsmoe.train.distributed import _read_beat, keep_alive

    path = tmp_path / "rank0.beat"
    beat = Heartbeat(path)
    beat(7)
    before = _read_beat(path)
    with keep_alive(beat, every_s=0.05):
        time.sleep(0.4)
    during = _read_beat(path)
    assert during[1] == 7 and during[2] >= before[2] + 3  # same step, several beats
    time.sleep(0.2)
    assert _read_beat(path) == during  # the thread has stopped
    threads = threading.active_count()
    with keep_alive(Heartbeat(None), every_s=0.05):
        assert threading.active_count() == threads
