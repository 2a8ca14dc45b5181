"""The stream lanes' ordering logic, on CPU: a fake :class:`~fsmoe.schedule.lanes.Streams` logs every
event record, stream wait, tensor record and task issue, and runs each task at once on the host.

Checked: every cross-stream dependency becomes a wait on the producer's event, recorded after the producer
was issued; same-stream dependencies need none; each lane issues in list order from the calling thread
(no threads); a tensor that crosses streams is recorded on its consumer's stream; the lanes wait for the
caller's earlier work and the caller's stream for the lanes; and the pipelined block gives the same
output and gradients as with thread lanes.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from fsmoe.config import get_schedule
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import build_experts
from fsmoe.schedule.ir import Task
from fsmoe.schedule.lanes import CudaStreams, StreamLane, ThreadDone
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime
from fsmoe.schedule.schedules import backward_tasks, forward_tasks, lanes_for


class FakeStream:
    def __init__(self, name: str, log: list[tuple]) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event.id))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    def __init__(self, id_: int, log: list[tuple], clock: Iterator[int]) -> None:
        self.id, self.log, self.clock = id_, log, clock
        self.stream: str | None = None
        self.at: int | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream, self.at = stream.name, next(self.clock)
        self.log.append(("record", stream.name, self.id))

    def synchronize(self) -> None:
        assert self.at is not None, "synchronize on an event that was never recorded"

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return float(end.at - self.at)  # "ms": one tick per record


class FakeStreams:
    """Streams that run everything at once and log what a real device would be told."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self._ids = itertools.count()
        self._clock = itertools.count()
        self.current = FakeStream("current", self.log)
        self.active = self.current
        self.events: dict[int, FakeEvent] = {}

    def current_stream(self) -> FakeStream:
        return self.current

    def new_stream(self) -> FakeStream:
        return FakeStream(f"s{next(self._ids)}", self.log)

    def new_event(self, *, timing: bool = False) -> FakeEvent:
        ev = FakeEvent(next(self._ids), self.log, self._clock)
        self.events[ev.id] = ev
        return ev

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before

    def record_tensor(self, tensor: Tensor, stream: FakeStream) -> None:
        self.log.append(("record_tensor", stream.name, id(tensor)))


def logging_impls(fs: FakeStreams, kinds: set[str], made: dict[tuple[str, int], Tensor]) -> dict[str, Any]:
    """Each task logs which stream is current while it runs, on which thread, and returns a new tensor."""

    def impl(kind: str):  # noqa: ANN202
        def run(chunk: int) -> Tensor:
            fs.log.append(("run", fs.active.name, (kind, chunk), threading.get_ident()))
            made[(kind, chunk)] = torch.full((2,), float(chunk))
            return made[(kind, chunk)]

        return run

    return {k: impl(k) for k in kinds}


CASES = [
    ("fsmoe", False, 3), ("fsmoe", True, 2), ("tutel", False, 3), ("fsmoe_no_iio", True, 4), ("sequential", False, 1),
]


def run_fake(name: str, backward: bool, r: int) -> tuple[FakeStreams, Runtime, list[Task], dict]:
    spec = get_schedule(name)
    tasks = backward_tasks(spec, r, with_gar=spec.gar_in_moe) if backward else forward_tasks(spec, r)
    fs = FakeStreams()
    rt = Runtime(lanes_for(spec), streams=fs)
    made: dict[tuple[str, int], Tensor] = {}
    rt.run(tasks, logging_impls(fs, {t.kind for t in tasks}, made))
    return fs, rt, tasks, made


def stream_of(rt: Runtime, fs: FakeStreams, task: Task) -> str:
    if task.channel == "compute":
        return fs.current.name
    lane = rt._workers[rt.lanes[task.channel]]
    assert isinstance(lane, StreamLane)
    return lane.stream.name


@pytest.mark.parametrize(("name", "backward", "r"), CASES)
def test_tasks_are_issued_in_list_order_from_the_calling_thread_each_on_its_lane(name, backward, r) -> None:
    threads_before = threading.active_count()
    fs, rt, tasks, _ = run_fake(name, backward, r)
    runs = [e for e in fs.log if e[0] == "run"]
    assert [e[2] for e in runs] == [t.key for t in tasks]  # list order, so every lane keeps it too
    assert {e[3] for e in runs} == {threading.get_ident()}
    assert threading.active_count() == threads_before  # stream lanes start no threads
    for e, task in zip(runs, tasks, strict=True):
        assert e[1] == stream_of(rt, fs, task), task
    if get_schedule(name).separate_channels:
        assert len({stream_of(rt, fs, t) for t in tasks}) == 3  # compute, intra, inter
    else:
        assert len({stream_of(rt, fs, t) for t in tasks}) == 2  # compute, one comm stream


def run_index(fs: FakeStreams, key: tuple[str, int]) -> int:
    return next(i for i, e in enumerate(fs.log) if e[0] == "run" and e[2] == key)


def event_after(fs: FakeStreams, key: tuple[str, int]) -> int:
    """The id of the event recorded right behind task ``key``."""
    i = run_index(fs, key)
    return next(e[2] for e in fs.log[i:] if e[0] == "record")


@pytest.mark.parametrize(("name", "backward", "r"), CASES)
def test_cross_stream_dependencies_become_waits_on_the_producers_events(name, backward, r) -> None:
    fs, rt, tasks, _ = run_fake(name, backward, r)
    by_key = {t.key: t for t in tasks}
    waits = 0
    for task in tasks:
        mine = stream_of(rt, fs, task)
        start = run_index(fs, task.key)
        prev_run = max((i for i, e in enumerate(fs.log[:start]) if e[0] == "run"), default=0)
        waited = {e[2] for e in fs.log[prev_run:start] if e[0] == "wait" and e[1] == mine}
        for dep in task.deps:
            ev = event_after(fs, dep)
            assert fs.events[ev].stream == stream_of(rt, fs, by_key[dep])  # recorded on the producer's stream
            if stream_of(rt, fs, by_key[dep]) == mine:
                assert ev not in waited, (task, dep)  # a stream runs its own work in order: no wait
            else:
                assert ev in waited, f"{task} does not wait for {dep}"
                waits += 1
    assert waits > 0


@pytest.mark.parametrize(("name", "backward", "r"), CASES)
def test_tensors_crossing_streams_are_recorded_on_the_consumers_stream(name, backward, r) -> None:
    fs, rt, tasks, made = run_fake(name, backward, r)
    by_key = {t.key: t for t in tasks}
    recorded = {(e[1], e[2]) for e in fs.log if e[0] == "record_tensor"}
    expected = set()
    for task in tasks:
        for dep in task.deps:
            if stream_of(rt, fs, by_key[dep]) != stream_of(rt, fs, task):
                expected.add((stream_of(rt, fs, task), id(made[dep])))
    consumed = {d for t in tasks for d in t.deps}
    for task in tasks:  # outputs nothing consumes go back to the caller, on the current stream
        if task.key not in consumed and stream_of(rt, fs, task) != "current":
            expected.add(("current", id(made[task.key])))
    assert recorded == expected


@pytest.mark.parametrize(("name", "backward", "r"), CASES)
def test_lanes_follow_the_callers_earlier_work_and_the_caller_waits_for_every_lane(name, backward, r) -> None:
    fs, rt, tasks, _ = run_fake(name, backward, r)
    first = fs.log[0]
    assert first[0] == "record" and first[1] == "current"  # the start event, before anything else
    comm = {stream_of(rt, fs, t) for t in tasks} - {"current"}
    for s in comm:
        first_run = next(i for i, e in enumerate(fs.log) if e[0] == "run" and e[1] == s)
        assert ("wait", s, first[2]) in fs.log[:first_run]
        assert fs.log.count(("wait", s, first[2])) == 1  # once per stream, also when two channels share it
        last_task = [t for t in tasks if stream_of(rt, fs, t) == s][-1]
        assert fs.log[run_index(fs, tasks[-1].key):].count(("wait", "current", event_after(fs, last_task.key))) == 1


def test_a_failing_task_raises_and_the_current_stream_still_waits_for_what_was_issued() -> None:
    spec = get_schedule("fsmoe")
    fs = FakeStreams()
    rt = Runtime(lanes_for(spec), streams=fs)
    tasks = forward_tasks(spec, 2)
    made: dict[tuple[str, int], Tensor] = {}
    impls = logging_impls(fs, {t.kind for t in tasks}, made)

    def bad_expert(chunk: int) -> Tensor:
        raise ValueError(f"bad chunk {chunk}")

    impls["expert"] = bad_expert
    with pytest.raises(ValueError, match="bad chunk 0"):
        rt.run(tasks, impls)
    waits = {e[2] for e in fs.log if e[0] == "wait" and e[1] == "current"}
    # expert[0] waited for gather[0] before it raised; then the current stream waits for each lane's last task
    assert waits == {event_after(fs, ("gather", 0)), event_after(fs, ("gather", 1)), event_after(fs, ("dispatch", 1))}
    fs.log.clear()
    rt.run(tasks, logging_impls(fs, {t.kind for t in tasks}, made))  # the lanes serve the next run
    assert [e[2] for e in fs.log if e[0] == "run"] == [t.key for t in tasks]


def test_tracing_reads_the_timing_events_after_the_run() -> None:
    spec = get_schedule("fsmoe")
    rt = Runtime(lanes_for(spec), rank=1, trace=True, streams=FakeStreams())
    tasks = forward_tasks(spec, 2)
    rt.run(tasks, {k: (lambda c: None) for k in {t.kind for t in tasks}})
    assert [(e.name, e.channel, e.rank) for e in rt.events] == [(f"{t.kind}[{t.chunk}]", t.channel, 1) for t in tasks]
    assert all(e.end_s > e.start_s for e in rt.events)
    assert all(a.start_s < b.start_s for a, b in itertools.pairwise(rt.events))  # the fake clock ticks per record


def test_the_device_picks_the_lanes() -> None:
    spec = get_schedule("fsmoe")
    assert Runtime.for_schedule(spec).streams is None
    assert Runtime.for_schedule(spec, device="cpu").streams is None
    cuda = Runtime.for_schedule(spec, device="cuda:1").streams  # builds no stream until a run needs one
    assert isinstance(cuda, CudaStreams) and cuda.device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="needs a cuda device, got cpu"):
        CudaStreams(torch.device("cpu"))
    lane = StreamLane("inter", FakeStreams())
    with pytest.raises(TypeError, match="stream completions only, got ThreadDone"):
        lane.submit(lambda: None, [ThreadDone()])


T, D, H, E = 64, 8, 16, 4


@pytest.mark.parametrize(("name", "r_fwd", "r_bwd", "gar"), [
    ("fsmoe", 2, 4, True), ("fsmoe", 3, 3, False), ("tutel", 2, 2, False), ("fsmoe_no_iio", 4, 1, True),
])
def test_the_pipelined_block_on_stream_lanes_equals_thread_lanes(name, r_fwd, r_bwd, gar) -> None:
    spec = get_schedule(name)
    torch.manual_seed(0)
    x_ECD = torch.randn(E, 12, D)
    dy_ECD = torch.randn(E, 12, D)
    results = []
    for runtime in (Runtime.for_schedule(spec), Runtime(lanes_for(spec), streams=FakeStreams())):
        torch.manual_seed(1)
        experts = build_experts("ffn", E, D, H)
        gar_calls: list[int] = []
        pipe = Pipeline(spec=spec, r_fwd=r_fwd, r_bwd=r_bwd, runtime=runtime,
                        gar=(lambda calls=gar_calls: calls.append(1)) if gar else None)
        x = x_ECD.clone().requires_grad_()
        y = pipe(x, Dispatcher(), experts)
        y.backward(dy_ECD)
        results.append((y.detach(), x.grad, [p.grad for p in experts.parameters()], gar_calls))
    (y0, dx0, g0, gar0), (y1, dx1, g1, gar1) = results
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert gar0 == gar1 == ([1] if gar else [])
