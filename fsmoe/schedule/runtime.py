"""Runs a task list: compute on the caller's thread (or current stream), each communication channel on its
own FIFO lane.

A lane (:mod:`fsmoe.schedule.lanes`) is where a channel's tasks run strictly in issue order, each after
its dependencies have finished; tasks on different lanes run concurrently, so inter-node AlltoAlls,
intra-node AllGathers/ReduceScatters and expert compute overlap as the schedule allows. A schedule with
one communication channel simply maps intra and inter onto one lane. Two kinds, picked by the device
(:meth:`Runtime.for_schedule`):

* CPU (gloo): each lane a worker thread — the collectives of separate channels use separate process
  groups, and gloo and matmuls release the GIL. Compute runs on the calling thread.
* CUDA (NCCL): each lane a CUDA stream, compute on the current stream, every task issued from the
  calling thread in list order, dependencies as CUDA events. Unverified until ``make gpu-check`` passes
  on a GPU (docs/gpu.md); the ordering logic is tested on CPU with a fake stream implementation.

A task's work is ``impls[kind](chunk)``; it returns the tensors it produced (or None), which the stream
lanes record on the streams of the tasks that consume them.

Tracing (off by default) records each task's start and end per rank and channel (on CUDA from timing
events, read after the run); :func:`chrome_trace` turns the records into Chrome-trace JSON that opens in
Perfetto.

This module owns the runtime that issues a task list on lanes, and the trace records.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fsmoe.config import ScheduleSpec
from fsmoe.schedule.ir import Task, check_tasks
from fsmoe.schedule.lanes import (
    CudaStreams,
    Event,
    Lane,
    StreamDone,
    StreamLane,
    Streams,
    TaskOutput,
    ThreadDone,
    ThreadLane,
)
from fsmoe.schedule.schedules import lanes_for

TaskImpl = Callable[[int], TaskOutput]  # impls[kind](chunk): one task's work; returns the tensors it produced


@dataclass(kw_only=True, frozen=True)
class TraceEvent:
    name: str
    channel: str
    start_s: float
    end_s: float
    rank: int = 0


@dataclass
class Runtime:
    """Executes task lists; ``lanes`` maps a communication channel to a lane name (several channels may
    share one lane). Lanes are created once and reused across runs: worker threads when ``streams`` is
    None (CPU), else streams of that device (CUDA). :meth:`for_schedule` is the usual way to build one."""

    lanes: Mapping[str, str]
    rank: int = 0
    trace: bool = False
    streams: Streams | None = None
    events: list[TraceEvent] = field(default_factory=list, init=False)
    _workers: dict[str, Lane] = field(default_factory=dict, init=False)

    @classmethod
    def for_schedule(cls, spec: ScheduleSpec, *, rank: int = 0, trace: bool = False,
                     device: torch.device | str = "cpu") -> Runtime:
        """The runtime of ``spec``: its lanes from :func:`~fsmoe.schedule.schedules.lanes_for`, threads for a
        CPU ``device`` and streams for a CUDA one; ``rank`` and ``trace`` label and switch on the recorded
        events."""
        device = torch.device(device)
        streams = CudaStreams(device) if device.type == "cuda" else None
        return cls(lanes_for(spec), rank=rank, trace=trace, streams=streams)

    def _lane(self, channel: str) -> Lane:
        name = self.lanes[channel]
        if name not in self._workers:
            self._workers[name] = ThreadLane(name) if self.streams is None else StreamLane(name, self.streams)
        return self._workers[name]

    def run(self, tasks: list[Task], impls: Mapping[str, TaskImpl]) -> None:
        """Issue ``tasks`` in order; ``impls[kind](chunk)`` does the work. Returns when all are done (CPU),
        or when all are issued and the current stream waits for them (CUDA)."""
        check_tasks(tasks)
        missing = sorted({t.kind for t in tasks} - impls.keys())
        if missing:  # before anything is queued: a lane left waiting on a task never run would hang the runtime
            raise ValueError(f"Runtime.run: no implementation for task kinds {', '.join(missing)}")
        if self.streams is None:
            self._run_threads(tasks, impls)
        else:
            self._run_streams(tasks, impls, self.streams)

    # --- CPU ----------------------------------------------------------------------------------------------

    def _timed(self, task: Task, fn: TaskImpl) -> Callable[[], TaskOutput]:
        if not self.trace:
            return lambda: fn(task.chunk)

        def run() -> TaskOutput:
            start = time.perf_counter()
            out = fn(task.chunk)
            self.events.append(TraceEvent(name=f"{task.kind}[{task.chunk}]", channel=task.channel, start_s=start,
                                          end_s=time.perf_counter(), rank=self.rank))
            return out

        return run

    def _run_threads(self, tasks: list[Task], impls: Mapping[str, TaskImpl]) -> None:
        """Like kernels on a GPU stream, communication tasks are enqueued on their lanes up front, in list
        order: compute runs synchronously on this thread, so a collective listed after an expert chunk
        would otherwise wait for that chunk to finish before even being queued, though it only depends
        on an earlier chunk. Each lane still runs its tasks in list order, and every task waits for its
        dependencies, which precede it in the list, so the issue order stays the schedule's."""
        done: dict[tuple[str, int], ThreadDone] = {t.key: ThreadDone() for t in tasks if t.channel == "compute"}
        for task in tasks:
            if task.channel != "compute":
                deps = [done[d] for d in task.deps]
                lane = self._lane(task.channel)
                assert isinstance(lane, ThreadLane)
                done[task.key] = lane.submit(self._timed(task, impls[task.kind]), deps)
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

    # --- CUDA ---------------------------------------------------------------------------------------------

    def _run_streams(self, tasks: list[Task], impls: Mapping[str, TaskImpl], streams: Streams) -> None:
        """Every task in list order from this thread, on its lane's stream (compute: the current stream).
        The lanes first wait for what the caller issued before (an event on the current stream); a task
        whose output no later task consumes hands it to the caller, so it is recorded on the current
        stream; at the end (also after an error) the current stream waits for every lane's last task,
        so whatever the caller does next is ordered after the whole list."""
        compute = StreamLane("compute", streams, streams.current_stream())
        lane_of: dict[str, StreamLane] = {"compute": compute}
        for channel in {t.channel for t in tasks} - {"compute"}:
            lane = self._lane(channel)
            assert isinstance(lane, StreamLane)
            lane_of[channel] = lane
        comm = list({id(lane): lane for ch, lane in lane_of.items() if ch != "compute"}.values())
        start = streams.new_event(timing=self.trace)
        start.record(compute.stream)
        host_start = time.perf_counter()
        for lane in comm:
            lane.follow(start)
            lane.last = None
        consumed = {d for t in tasks for d in t.deps}
        uses = Counter(d for t in tasks for d in t.deps)
        marks: list[tuple[Task, Event, Event]] = []
        done: dict[tuple[str, int], StreamDone] = {}
        finals: list[StreamDone] = []
        try:
            for task in tasks:
                lane = lane_of[task.channel]
                fn = self._stream_timed(task, impls[task.kind], lane, marks)
                done[task.key] = lane.submit(fn, [done[d] for d in task.deps])
                for d in task.deps:  # recorded on this task's stream by submit: the last consumer frees it
                    uses[d] -= 1
                    if uses[d] == 0:
                        done[d].outputs = ()
            finals = [d for key, d in done.items() if key not in consumed]
            for d in finals:
                compute.consume(d)
                d.outputs = ()
        finally:
            for lane in comm:
                if lane.last is not None and all(lane.last is not d for d in finals):  # else waited on above
                    compute.stream.wait_event(lane.last.event)
        if marks:
            self._read_marks(start, host_start, marks)

    def _stream_timed(self, task: Task, fn: TaskImpl, lane: StreamLane,
                      marks: list[tuple[Task, Event, Event]]) -> Callable[[], TaskOutput]:
        if not self.trace:
            return lambda: fn(task.chunk)

        def run() -> TaskOutput:
            begin = lane.streams.new_event(timing=True)
            begin.record(lane.stream)
            out = fn(task.chunk)
            end = lane.streams.new_event(timing=True)
            end.record(lane.stream)
            marks.append((task, begin, end))
            return out

        return run

    def _read_marks(self, start: Event, host_start: float, marks: list[tuple[Task, Event, Event]]) -> None:
        """Trace events from the timing events of a traced stream run (waits for the run to finish)."""
        for task, begin, end in marks:
            end.synchronize()
            self.events.append(TraceEvent(
                name=f"{task.kind}[{task.chunk}]", channel=task.channel, rank=self.rank,
                start_s=host_start + start.elapsed_time(begin) / 1e3, end_s=host_start + start.elapsed_time(end) / 1e3,
            ))


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
