"""The lane runtime: channel FIFO order, dependencies across lanes, error propagation, tracing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fsmoe.config import SCHEDULES, get_schedule
from fsmoe.schedule.ir import Task
from fsmoe.schedule.runtime import Runtime, chrome_trace
from fsmoe.schedule.schedules import forward_tasks, lanes_for


def test_lanes_follow_the_channels_the_schedule_puts_its_tasks_on() -> None:
    for name, spec in SCHEDULES.items():
        lanes = lanes_for(spec)
        assert lanes == {"inter": "inter", "intra": "intra" if spec.separate_channels else "inter"}, name
        for task in forward_tasks(spec, 2):  # every communication task's channel is a lane of its own name
            assert task.channel == "compute" or lanes[task.channel] == task.channel, (name, task)
        rt = Runtime.for_schedule(spec, rank=2, trace=True)
        assert (rt.lanes, rt.rank, rt.trace) == (lanes, 2, True)


def test_tasks_respect_dependencies_and_channel_order() -> None:
    log: list[str] = []
    lock = threading.Lock()

    def work(name: str, delay: float = 0.0):  # noqa: ANN202
        def run(chunk: int) -> None:
            time.sleep(delay)
            with lock:
                log.append(f"{name}{chunk}")
        return run

    rt = Runtime.for_schedule(get_schedule("fsmoe"))
    tasks = forward_tasks(get_schedule("fsmoe"), 3)
    # A slow first AlltoAll: everything of chunk 0 must still wait for it, and inter stays FIFO.
    impls = {k: work(k) for k in ("gather", "expert", "reduce", "combine")}
    impls["dispatch"] = lambda c: (time.sleep(0.05 if c == 0 else 0.0), log.append(f"dispatch{c}"))[1]
    rt.run(tasks, impls)
    pos = {name: i for i, name in enumerate(log)}
    for c in range(3):
        assert pos[f"dispatch{c}"] < pos[f"gather{c}"] < pos[f"expert{c}"] < pos[f"reduce{c}"] < pos[f"combine{c}"]
    assert pos["dispatch0"] < pos["dispatch1"] < pos["dispatch2"]  # one FIFO lane
    assert pos["combine0"] < pos["combine1"] < pos["combine2"]


def test_one_lane_serialises_intra_and_inter() -> None:
    active, peak = [0], [0]
    lock = threading.Lock()

    def comm(_: int) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    tasks = forward_tasks(get_schedule("tutel"), 4)
    Runtime({"inter": "comm", "intra": "comm"}).run(
        tasks, {"dispatch": comm, "gather": comm, "expert": lambda c: None, "reduce": comm, "combine": comm}
    )
    assert peak[0] == 1


def test_a_failing_task_raises_in_the_caller_and_the_lanes_survive() -> None:
    rt = Runtime.for_schedule(get_schedule("fsmoe"))
    tasks = [
        Task(kind="dispatch", chunk=0, channel="inter"),
        Task(kind="expert", chunk=0, channel="compute", deps=(("dispatch", 0),)),
    ]

    def boom(_: int) -> None:
        raise KeyError("lost chunk")

    with pytest.raises(RuntimeError, match="another channel failed"):
        rt.run(tasks, {"dispatch": boom, "expert": lambda c: None})
    ran = []
    rt.run(tasks, {"dispatch": lambda c: ran.append(c), "expert": lambda c: ran.append(c)})
    assert ran == [0, 0]


def test_trace_records_every_task_on_its_channel(tmp_path: Path) -> None:
    rt = Runtime.for_schedule(get_schedule("fsmoe"), rank=3, trace=True)
    tasks = forward_tasks(get_schedule("fsmoe"), 2)
    rt.run(tasks, {k: (lambda c: None) for k in ("dispatch", "gather", "expert", "reduce", "combine")})
    assert sorted((e.name, e.channel) for e in rt.events) == sorted((f"{t.kind}[{t.chunk}]", t.channel) for t in tasks)
    trace = chrome_trace(rt.events, str(tmp_path / "t.json"))
    on_disk = json.loads((tmp_path / "t.json").read_text())
    assert on_disk == trace
    assert {e["pid"] for e in trace["traceEvents"]} == {3}
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in trace["traceEvents"])


def test_a_collective_listed_after_compute_is_enqueued_before_that_compute_runs() -> None:
    # The fsmoe order lists every expert chunk before the first combine; combine[0] depends only on
    # expert[0], so it must be able to run while expert[1] computes (as on a GPU stream). expert[1]
    # here waits for combine[0] to have started: with combine queued only after expert[1] this blocks.
    rt = Runtime.for_schedule(get_schedule("fsmoe"))
    combine_started = threading.Event()
    tasks = [
        Task(kind="expert", chunk=0, channel="compute"),
        Task(kind="expert", chunk=1, channel="compute"),
        Task(kind="combine", chunk=0, channel="inter", deps=(("expert", 0),)),
    ]

    def expert(c: int) -> None:
        if c == 1 and not combine_started.wait(timeout=10):
            raise TimeoutError("combine[0] was not running while expert[1] computed")

    rt.run(tasks, {"expert": expert, "combine": lambda c: combine_started.set()})
    assert combine_started.is_set()


def test_a_failing_compute_task_releases_the_lanes_waiting_on_later_compute() -> None:
    rt = Runtime.for_schedule(get_schedule("fsmoe"))
    tasks = [
        Task(kind="expert", chunk=0, channel="compute"),
        Task(kind="expert", chunk=1, channel="compute"),
        Task(kind="combine", chunk=1, channel="inter", deps=(("expert", 1),)),
    ]
    ran: list[str] = []

    def expert(c: int) -> None:
        if c == 0:
            raise ValueError("bad chunk")
        ran.append(f"expert{c}")

    with pytest.raises(ValueError, match="bad chunk"):
        rt.run(tasks, {"expert": expert, "combine": lambda c: ran.append(f"combine{c}")})
    # combine[1] was released with the error (it did not run) and the lane still serves new runs
    rt.run([Task(kind="combine", chunk=2, channel="inter")], {"combine": lambda c: ran.append(f"combine{c}")})
    assert ran == ["combine2"]


def test_a_task_kind_without_implementation_is_refused_before_anything_runs() -> None:
    """Refused up front (naming the kinds), and the runtime still works after: nothing was left queued."""
    spec = get_schedule("fsmoe")
    runtime = Runtime.for_schedule(spec)
    tasks = forward_tasks(spec, 2)
    ran: list[str] = []
    impls = {kind: (lambda c, k=kind: ran.append(f"{k}{c}")) for kind in {t.kind for t in tasks}}
    missing = next(iter(impls))
    with pytest.raises(ValueError, match=f"no implementation for task kinds {missing}"):
        runtime.run(tasks, {k: v for k, v in impls.items() if k != missing})
    assert ran == []
    runtime.run(tasks, impls)
    assert len(ran) == len(tasks)
