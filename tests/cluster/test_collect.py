"""Which rank a failed run blames: the one whose error came first, not the one reaped first; what a
rank that died without a traceback, or a run that timed out, is reported with."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fsmoe.cluster import LaunchOutcome, RankFailed, RanksTimedOut
from fsmoe.cluster.ranks import TIMEOUT_EXIT_CODE, RankDir


def test_the_earliest_error_is_blamed_even_when_a_peer_was_reaped_first(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    folder.write_result(0, False, "RuntimeError: Connection reset by peer", written_at=101.0)
    folder.write_result(1, True, pickle.dumps(None), written_at=99.0)
    folder.write_result(2, False, "ValueError: rank 2 gives up", written_at=100.0)
    with pytest.raises(RankFailed, match="rank 2 gives up") as err:
        folder.collect(LaunchOutcome(code=1, failed_rank=0), 3, timeout=60)
    assert err.value.rank == 2 and err.value.remote_traceback == "ValueError: rank 2 gives up"


def test_a_rank_that_died_without_a_result_is_named_with_its_signal_and_last_output(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    folder.write_result(0, True, pickle.dumps(None))
    folder.log_path(1).write_text("loading shards...\n")
    with pytest.raises(RankFailed, match=r"status 137 .SIGKILL(.|\n)*loading shards") as err:
        folder.collect(LaunchOutcome(code=137, failed_rank=1), 2, timeout=60)
    assert err.value.rank == 1


def test_a_timeout_names_the_missing_ranks_with_their_progress_and_output(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    folder.write_result(0, True, pickle.dumps(0))
    folder.write_progress(1, "step 3: all_to_all")
    folder.log_path(1).write_text("warming up\n")
    outcome = LaunchOutcome(code=TIMEOUT_EXIT_CODE, timed_out=True, seconds=5.01)
    with pytest.raises(RanksTimedOut) as err:
        folder.collect(outcome, 3, timeout=5)
    message = str(err.value)
    assert "ranks [1, 2] of 3 did not finish within 5 s" in message
    assert "rank 0: finished" in message and "rank 1: step 3: all_to_all" in message
    assert "rank 2: (nothing reported)" in message and "warming up" in message
    assert err.value.ranks == [1, 2] and err.value.progress == [None, "step 3: all_to_all", None]


def test_all_results_in_rank_order(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    for rank in (1, 0):
        folder.write_result(rank, True, pickle.dumps({"rank": rank}))
    assert folder.collect(LaunchOutcome(code=0), 2, timeout=1) == [{"rank": 0}, {"rank": 1}]


def test_a_silent_death_is_blamed_over_the_errors_it_caused(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    folder.write_result(1, False, "RuntimeError: Connection closed by peer", written_at=99.5)
    folder.write_result(2, False, "ValueError: too late", written_at=100.5)
    # rank 0 was last seen running at 100.0; a lost connection may show before its death does
    with pytest.raises(RankFailed, match="SIGKILL") as err:
        folder.collect(LaunchOutcome(code=137, failed_rank=0, healthy_at=100.0), 3, timeout=60)
    assert err.value.rank == 0


def test_an_error_before_a_silent_death_is_blamed(tmp_path: Path) -> None:
    folder = RankDir(tmp_path)
    folder.write_result(1, False, "ValueError: bad shard", written_at=99.0)
    with pytest.raises(RankFailed, match="bad shard") as err:
        folder.collect(LaunchOutcome(code=137, failed_rank=0, healthy_at=100.0), 2, timeout=60)
    assert err.value.rank == 1
