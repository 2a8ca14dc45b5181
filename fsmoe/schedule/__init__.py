"""Schedules as data: the task IR, the six schedules' task lists, the runtime with its lanes (worker threads
on the CPU, CUDA streams on a GPU) and the pipelined expert block.

The schedules themselves (``ScheduleSpec``, ``SCHEDULES``, ``get_schedule``, ``check_degrees``) are
data in :mod:`fsmoe.config`. Imports :mod:`fsmoe.moe` and :mod:`fsmoe.config`, never
:mod:`fsmoe.parallel` (which builds on this package: it applies pipelines to models,
:func:`fsmoe.parallel.parallelize.apply_pipeline`).
"""

from fsmoe.schedule.ir import CHANNELS, Task, check_tasks, format_tasks
from fsmoe.schedule.lanes import CudaStreams, Lane, StreamLane, ThreadLane
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime, TraceEvent, chrome_trace
from fsmoe.schedule.schedules import backward_tasks, channel_of, forward_tasks, lanes_for

__all__ = [
    "CHANNELS", "CudaStreams", "Lane", "Pipeline", "Runtime", "StreamLane", "Task", "ThreadLane", "TraceEvent",
    "backward_tasks", "channel_of", "check_tasks", "chrome_trace", "format_tasks", "forward_tasks", "lanes_for",
]
