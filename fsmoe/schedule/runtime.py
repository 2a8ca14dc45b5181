"""Runs a task list: compute on the calling thread, each communication channel on its own FIFO lane.

A lane is the CPU counterpart of a CUDA stream: one worker thread that runs its tasks strictly in
issue order, each after its dependencies have finished. Tasks on different lanes run concurrently —
the collectives of separate channels use separate process groups, and gloo and matmuls release the
GIL — so inter-node AlltoAlls, intra-node AllGathers/ReduceScatters and expert compute overlap as the
schedule allows. A schedule with one communication channel simply maps intra and inter onto one lane.

Tracing (off by default) records each task's start and end per rank and channel; :func:`chrome_trace`
turns the records into Chrome-trace JSON that opens in Perfetto.

This module owns the lanes, the runtime that issues a task list on them, and the trace records.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fsmoe.config import ScheduleSpec
from fsmoe.schedule.ir import Task, check_tasks
from fsmoe.schedule.schedules import lanes_for


@dataclass(kw_only=True, frozen=True)
class TraceEvent:
    name: str
    channel: str
    start_s: float
    end_s: float
    rank: int = 0


class _Done:
    """Completion of one task: an event plus the error, if the task raised."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.event.wait()
        if self.error is not None:
            raise RuntimeError("a task on another channel failed") from self.error


class Lane:
    """A FIFO worker thread (daemon; it idles on its queue between runs)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue[tuple[Callable[[], None], list[_Done], _Done]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"fsmoe-lane-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, deps, done = self._queue.get()
            try:
                for d in deps:
                    d.wait()
                fn()
            except BaseException as err:  # surfaced to the issuing thread by _Done.wait
                done.error = err
            finally:
                done.event.set()

    def submit(self, fn: Callable[[], None], deps: list[_Done]) -> _Done:
        done = _Done()
        self._queue.put((fn, deps, done))
        return done


@dataclass
class Runtime:
    """Executes task lists; ``lanes`` maps a communication channel to a lane name (several channels may
    share one lane). Lanes are created once and reused across runs. :meth:`for_schedule` is the usual
    way to build one."""

    lanes: Mapping[str, str]
    rank: int = 0
    trace: bool = False
    events: list[TraceEvent] = field(default_factory=list, init=False)
    _workers: dict[str, Lane] = field(default_factory=dict, init=False)

    @classmethod
    def for_schedule(cls, spec: ScheduleSpec, *, rank: int = 0, trace: bool = False) -> Runtime:
        """The runtime of ``spec``: its lanes from :func:`~fsmoe.schedule.schedules.lanes_for`; ``rank``
        and ``trace`` label and switch on the recorded events."""
        return cls(lanes_for(spec), rank=rank, trace=trace)

    def _lane(self, channel: str) -> Lane:
        name = self.lanes[channel]
        if name not in self._workers:
            self._workers[name] = Lane(name)
        return self._workers[name]

    def _timed(self, task: Task, fn: Callable[[int], None]) -> Callable[[], None]:
        if not self.trace:
            return lambda: fn(task.chunk)

        def run() -> None:
            start = time.perf_counter()
            fn(task.chunk)
            self.events.append(TraceEvent(name=f"{task.kind}[{task.chunk}]", channel=task.channel, start_s=start,
                                          end_s=time.perf_counter(), rank=self.rank))

        return run

    def run(self, tasks: list[Task], impls: Mapping[str, Callable[[int], None]]) -> None:
        """Issue ``tasks`` in order; ``impls[kind](chunk)`` does the work. Returns when all are done.

        Like kernels on a GPU stream, communication tasks are enqueued on their lanes up front, in list
        order: compute runs synchronously on this thread, so a collective listed after an expert chunk
        would otherwise wait for that chunk to finish before even being queued, though it only depends
        on an earlier chunk. Each lane still runs its tasks in list order, and every task waits for its
        dependencies, which precede it in the list, so the issue order stays the schedule's."""
        check_tasks(tasks)
        done: dict[tuple[str, int], _Done] = {t.key: _Done() for t in tasks if t.channel == "compute"}
        for task in tasks:
            if task.channel != "compute":
                deps = [done[d] for d in task.deps]
                done[task.key] = self._lane(task.channel).submit(self._timed(task, impls[task.kind]), deps)
        compute = [t for t in tasks if t.channel == "compute"]
        for n, task in enumerate(compute):
            d_self = done[task.key]
            try:
                for d in task.deps:
                    done[d].wait()
                self._timed(task, impls[task.kind])()
            except BaseException as err:  # release lane tasks that wait on this or later compute, re-raise
                for later in compute[n:]:
                    done[later.key].error = err
                    done[later.key].event.set()
                raise
            d_self.event.set()
        for d in done.values():
            d.wait()


def chrome_trace(events: list[TraceEvent], path: str | None = None) -> dict:
    """Chrome-trace JSON (``pid`` = rank, ``tid`` = channel, times in µs); written to ``path`` if given."""
    t0 = min((e.start_s for e in events), default=0.0)
    trace = {
        "traceEvents": [
            {"name": e.name, "cat": e.channel, "ph": "X", "pid": e.rank, "tid": e.channel,
             "ts": (e.start_s - t0) * 1e6, "dur": (e.end_s - e.start_s) * 1e6}
            for e in events
        ]
    }
    if path is not None:
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace
