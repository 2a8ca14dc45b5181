"""Pure tests of the schedule IR and builders: dependencies, channels, issue order, degree rules."""

from __future__ import annotations

import pytest

from fsmoe.config import SCHEDULES, check_degrees, get_schedule
from fsmoe.schedule.ir import Task, check_tasks, format_tasks
from fsmoe.schedule.schedules import backward_tasks, forward_tasks


def test_fsmoe_forward_issue_order_batches_dispatch_then_experts_then_combines() -> None:
    tasks = forward_tasks(get_schedule("fsmoe"), 3)
    names = [f"{t.kind}{t.chunk}" for t in tasks]
    assert names == [
        "dispatch0", "gather0", "dispatch1", "gather1", "dispatch2", "gather2",
        "expert0", "reduce0", "expert1", "reduce1", "expert2", "reduce2",
        "combine0", "combine1", "combine2",
    ]


def test_fsmoe_interleaves_intra_of_one_chunk_with_inter_of_another() -> None:
    # On separate channels, chunk 0's AllGather (intra) is issued while chunk 1's AlltoAll (inter) is in
    # flight: the intra task's dependencies do not include any inter task of another chunk.
    tasks = forward_tasks(get_schedule("fsmoe"), 2)
    gather0 = next(t for t in tasks if t.key == ("gather", 0))
    dispatch1 = next(t for t in tasks if t.key == ("dispatch", 1))
    assert gather0.channel == "intra" and dispatch1.channel == "inter"
    assert ("dispatch", 1) not in gather0.deps and ("gather", 0) not in dispatch1.deps
    assert tasks.index(gather0) < tasks.index(dispatch1)  # issued first, so both are in flight together


def test_one_channel_schedules_put_intra_collectives_on_the_inter_channel() -> None:
    for name in ("sequential", "tutel", "tutel_improved", "lina", "fsmoe_no_iio"):
        spec = get_schedule(name)
        channels = {t.channel for t in forward_tasks(spec, 1) + backward_tasks(spec, 1)}
        assert channels == {"inter", "compute"}, name
    channels = {t.channel for t in forward_tasks(get_schedule("fsmoe"), 2)}
    assert channels == {"inter", "intra", "compute"}


def test_backward_mirrors_forward_and_places_gar_after_the_first_alltoalls() -> None:
    tasks = backward_tasks(get_schedule("fsmoe"), 2, with_gar=True)
    kinds = [t.kind for t in tasks]
    assert kinds.index("gar") == 4  # after combine_bwd/reduce_bwd of both chunks
    assert kinds[:4] == ["combine_bwd", "reduce_bwd", "combine_bwd", "reduce_bwd"]
    assert kinds[-2:] == ["dispatch_bwd", "dispatch_bwd"]
    gar = tasks[4]
    assert gar.channel == "inter" and gar.deps == ()


def test_gar_refused_where_the_schedule_has_no_slot() -> None:
    with pytest.raises(ValueError, match="tutel"):
        backward_tasks(get_schedule("tutel"), 2, with_gar=True)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_chunk_passes_every_stage_in_dependency_order(name: str, r: int) -> None:
    spec = get_schedule(name)
    for tasks in (forward_tasks(spec, r), backward_tasks(spec, r)):
        check_tasks(tasks)
        assert len(tasks) == 5 * r
        assert sorted({t.chunk for t in tasks}) == list(range(r))


def test_degree_rules() -> None:
    check_degrees(get_schedule("fsmoe"), 2, 4)
    with pytest.raises(ValueError, match="r_fwd=2 != r_bwd=4"):
        check_degrees(get_schedule("tutel"), 2, 4)
    with pytest.raises(ValueError, match="does not pipeline"):
        check_degrees(get_schedule("sequential"), 2, 2)
    with pytest.raises(ValueError, match="r_bwd must be an int >= 1, got 0"):
        check_degrees(get_schedule("fsmoe"), 1, 0)
    with pytest.raises(ValueError, match="unknown schedule 'nope'; choose one of sequential"):
        get_schedule("nope")


def test_check_tasks_rejects_bad_lists() -> None:
    with pytest.raises(ValueError, match="not issued before"):
        check_tasks([Task(kind="expert", chunk=0, channel="compute", deps=(("gather", 0),))])
    with pytest.raises(ValueError, match="unknown channel"):
        check_tasks([Task(kind="expert", chunk=0, channel="gpu")])
    with pytest.raises(ValueError, match="issued twice"):
        check_tasks([Task(kind="expert", chunk=0, channel="compute")] * 2)


def test_text_timeline_has_one_row_per_task_in_its_channel_column() -> None:
    tasks = forward_tasks(get_schedule("fsmoe"), 2)
    lines = format_tasks(tasks).splitlines()
    assert len(lines) == 1 + len(tasks)
    header = lines[0]
    col = {c: header.index(c) for c in ("compute", "intra", "inter")}
    for t, line in zip(tasks, lines[1:], strict=True):
        assert line.index(f"{t.kind}[{t.chunk}]") == col[t.channel]
