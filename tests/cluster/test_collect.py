"""Which rank a failed run blames: the one whose error came first, not the one reaped first."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fsmoe.cluster import EmulatedClusterSpec, LaunchOutcome, LocalCluster, RankFailed
from fsmoe.cluster.worker import result_path


def _write(folder: Path, rank: int, ok: bool, payload: object, at: float) -> None:
    result_path(folder, rank).write_bytes(pickle.dumps((ok, payload, at)))


def test_the_earliest_error_is_blamed_even_when_a_peer_was_reaped_first(tmp_path: Path) -> None:
    cluster = LocalCluster(EmulatedClusterSpec(nodes=1, procs_per_node=3))
    _write(tmp_path, 0, False, "RuntimeError: Connection reset by peer", at=101.0)
    _write(tmp_path, 1, True, pickle.dumps(None), at=99.0)
    _write(tmp_path, 2, False, "ValueError: rank 2 gives up", at=100.0)
    with pytest.raises(RankFailed, match="rank 2 gives up") as err:
        cluster._collect(tmp_path, LaunchOutcome(code=1, failed_rank=0))
    assert err.value.rank == 2


def test_a_rank_that_died_without_a_result_is_named_with_its_signal(tmp_path: Path) -> None:
    cluster = LocalCluster(EmulatedClusterSpec(nodes=1, procs_per_node=2))
    _write(tmp_path, 0, True, pickle.dumps(None), at=1.0)
    with pytest.raises(RankFailed, match="status 137 .SIGKILL") as err:
        cluster._collect(tmp_path, LaunchOutcome(code=137, failed_rank=1))
    assert err.value.rank == 1
