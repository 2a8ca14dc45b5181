"""The one rank harness end to end, with both start methods: values come back in rank order, the
failing rank's traceback (or signal) is reported, a hang is cut at the timeout with each rank's last
progress, and no rank process outlives the call."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from fsmoe.cluster import (
    EmulatedClusterSpec,
    LocalCluster,
    RankFailed,
    RanksTimedOut,
    report_progress,
    run_distributed,
)
from fsmoe.cluster.ranks import pid_alive


def sum_and_env(rank: int, world_size: int, offset: int, *, scale: int = 1) -> dict:
    x = torch.tensor([float(rank + offset)])
    dist.all_reduce(x)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "TORCHELASTIC_USE_AGENT_STORE")
    return {"sum": scale * x.item(), "env": {k: os.environ.get(k) for k in keys}, "threads": torch.get_num_threads()}


def killed_on(rank: int, world_size: int, *, victim: int) -> None:
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def hang_with_pid(rank: int, world_size: int) -> None:
    report_progress(f"pid {os.getpid()}")
    if rank == 1:
        time.sleep(600)
    dist.barrier()


def test_forked_ranks_return_values_in_rank_order_with_torchrun_env() -> None:
    results = run_distributed(sum_and_env, 3, 10, scale=2, timeout=60)
    assert [r["sum"] for r in results] == [2 * (10 + 11 + 12)] * 3
    assert [r["env"]["RANK"] for r in results] == ["0", "1", "2"]
    assert all(r["env"]["GLOO_SOCKET_IFNAME"] == "lo" and r["env"]["OMP_NUM_THREADS"] == "1" for r in results)
    assert all(r["env"]["TORCHELASTIC_USE_AGENT_STORE"] == "True" and r["threads"] == 1 for r in results)


def test_subprocess_ranks_share_the_harness() -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=1, link="unshaped")
    with LocalCluster(spec) as cluster:
        results = cluster.run_function(sum_and_env, 1, timeout=90)
        assert [r["sum"] for r in results] == [3.0, 3.0]
        assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "0"]
        with pytest.raises(RankFailed, match=r"status 137 \(SIGKILL") as err:
            cluster.run_function(killed_on, victim=0, timeout=90)
    assert err.value.rank == 0


def test_a_rank_killed_by_a_signal_is_blamed_with_its_status() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"status 137 \(SIGKILL") as err:
        run_distributed(killed_on, 2, victim=1, timeout=60)
    assert err.value.rank == 1 and time.monotonic() - start < 30


def test_a_hang_is_cut_at_the_timeout_and_no_rank_survives() -> None:
    with pytest.raises(RanksTimedOut, match=r"ranks \[0, 1\] of 2 did not finish within 3 s") as err:
        run_distributed(hang_with_pid, 2, timeout=3)
    pids = [int(text.split()[1]) for text in err.value.progress if text is not None]
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids)


def test_report_progress_is_a_no_op_outside_the_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSMOE_RANK_DIR", raising=False)
    report_progress("nothing to report to")


def test_local_cluster_refuses_unknown_start_methods() -> None:
    with pytest.raises(ValueError, match="subprocess, forkserver"):
        LocalCluster(EmulatedClusterSpec(nodes=1, procs_per_node=2), start_method="spawn")
