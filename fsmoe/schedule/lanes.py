"""Lanes: where one or more communication channels' tasks run, in issue order, each after its dependencies.

One interface, :class:`Lane` (``submit(fn, deps) -> Completion``), two implementations:

* :class:`ThreadLane` (CPU, gloo): one FIFO worker thread; ``submit`` queues the task and returns at
  once, the thread runs it after its dependencies' completions are set. Compute runs on the runtime's
  calling thread; gloo and matmuls release the GIL, so lanes and compute overlap.
* :class:`StreamLane` (CUDA, NCCL): one stream; ``submit`` *issues* the task at once, from the calling
  thread (no host threads): the stream first waits on the events of dependencies that ran on other
  streams, then ``fn`` runs under the stream (so its kernels and NCCL collectives are enqueued there),
  then an event is recorded behind it. Compute is a :class:`StreamLane` on the current stream. A tensor a
  task returns and a task on another stream consumes is recorded on the consumer's stream
  (``Tensor.record_stream``), so the caching allocator does not hand its memory out again while the
  consumer may still read it.

The stream lane talks to CUDA only through :class:`Streams` (streams, events, ``record_stream``), which
:class:`CudaStreams` implements with ``torch.cuda``; tests drive the same lane with a fake implementation
that logs every wait, record and issue, so its ordering logic is checked without a GPU.

This module owns the lane interface, both lanes, their completions and the stream protocol.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor

TaskOutput = Tensor | Sequence[Tensor] | None  # what a task's work returns: the tensors it produced


def output_tensors(out: TaskOutput) -> tuple[Tensor, ...]:
    """A task's returned tensors as a tuple (none for ``None``)."""
    if out is None:
        return ()
    if isinstance(out, Tensor):
        return (out,)
    return tuple(out)


class Completion(ABC):
    """The completion of one submitted task."""

    @abstractmethod
    def wait(self) -> None:
        """Block the calling thread until the task has finished; raise if it failed."""


class Lane(ABC):
    """A FIFO of tasks: each runs after the tasks submitted before it on this lane and after ``deps``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def submit(self, fn: Callable[[], TaskOutput], deps: Sequence[Completion]) -> Completion:
        """Schedule ``fn`` behind this lane's earlier tasks and after ``deps``; returns at once."""


# --- CPU: a worker thread per lane ---------------------------------------------------------------------


class ThreadDone(Completion):
    """Completion of one task on a thread: an event plus the error, if the task raised. The runtime sets
    the ones of its compute tasks itself (compute runs on its own thread)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.event.wait()
        if self.error is not None:
            raise RuntimeError("a task on another channel failed") from self.error


class ThreadLane(Lane):
    """A FIFO worker thread (daemon; it idles on its queue between runs)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._queue: queue.Queue[tuple[Callable[[], TaskOutput], Sequence[Completion], ThreadDone]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"fsmoe-lane-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, deps, done = self._queue.get()
            try:
                for d in deps:
                    d.wait()
                fn()
            except BaseException as err:  # surfaced to the issuing thread by ThreadDone.wait
                done.error = err
            finally:
                done.event.set()

    def submit(self, fn: Callable[[], TaskOutput], deps: Sequence[Completion]) -> ThreadDone:
        done = ThreadDone()
        self._queue.put((fn, deps, done))
        return done


# --- CUDA: a stream per lane ---------------------------------------------------------------------------


class Stream(Protocol):
    """What a lane needs of a stream (``torch.cuda.Stream``)."""

    def wait_event(self, event: Any) -> None: ...


class Event(Protocol):
    """What a lane needs of an event (``torch.cuda.Event``)."""

    def record(self, stream: Any) -> None: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end_event: Any) -> float: ...


class Streams(Protocol):
    """The stream, event and allocator operations of one device, as the stream lanes use them."""

    def current_stream(self) -> Stream:
        """The stream the caller's work is on (where compute runs)."""
        ...

    def new_stream(self) -> Stream: ...

    def new_event(self, *, timing: bool = False) -> Event:
        """An event; ``timing`` lets :meth:`Event.elapsed_time` read it (costs a little per record)."""
        ...

    def use(self, stream: Stream) -> AbstractContextManager[Any]:
        """Make ``stream`` current inside the block: kernels and collectives issued there go on it."""
        ...

    def record_tensor(self, tensor: Tensor, stream: Stream) -> None:
        """Tell the allocator that ``stream`` uses ``tensor`` (``Tensor.record_stream``)."""
        ...


class CudaStreams:
    """:class:`Streams` on one CUDA device, with ``torch.cuda``."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaStreams needs a cuda device, got {device}")
        self.device = device

    def current_stream(self) -> Stream:
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> Stream:
        return torch.cuda.Stream(device=self.device)

    def new_event(self, *, timing: bool = False) -> Event:
        return torch.cuda.Event(enable_timing=timing)

    def use(self, stream: Stream) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)  # type: ignore[arg-type]

    def record_tensor(self, tensor: Tensor, stream: Stream) -> None:
        tensor.record_stream(stream)  # type: ignore[arg-type]


class StreamDone(Completion):
    """Completion of one task issued on ``stream``: the event recorded behind it and the tensors it
    returned (kept for recording on the streams that consume them)."""

    def __init__(self, event: Event, stream: Stream, outputs: tuple[Tensor, ...]) -> None:
        self.event = event
        self.stream = stream
        self.outputs = outputs

    def wait(self) -> None:
        self.event.synchronize()


class StreamLane(Lane):
    """A stream: tasks are issued in submit order from the calling thread (see the module doc)."""

    def __init__(self, name: str, streams: Streams, stream: Stream | None = None) -> None:
        super().__init__(name)
        self.streams = streams
        self.stream = streams.new_stream() if stream is None else stream
        self.last: StreamDone | None = None  # the latest task issued here: what the caller waits on at the end

    def follow(self, event: Event) -> None:
        """Order everything issued here from now on after ``event`` (work the caller issued before a run)."""
        self.stream.wait_event(event)

    def consume(self, done: StreamDone) -> None:
        """Make this stream wait for ``done`` and record its tensors as used here; a no-op for a task that
        ran on this stream (a stream runs its work in order)."""
        if done.stream == self.stream:
            return
        self.stream.wait_event(done.event)
        for t in done.outputs:
            self.streams.record_tensor(t, self.stream)

    def submit(self, fn: Callable[[], TaskOutput], deps: Sequence[Completion]) -> StreamDone:
        for d in deps:
            if not isinstance(d, StreamDone):
                raise TypeError(f"a stream lane waits on stream completions only, got {type(d).__name__}")
            self.consume(d)
        with self.streams.use(self.stream):
            outputs = output_tensors(fn())
        event = self.streams.new_event()
        event.record(self.stream)
        self.last = StreamDone(event, self.stream, outputs)
        return self.last
