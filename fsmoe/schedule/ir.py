"""The schedule IR: a pipelined MoE block as a list of tasks on channels.

Legend: R pipeline degree (chunks of the capacity axis), E experts, C capacity.

A :class:`Task` is one step of one chunk — an EP AlltoAll, an ESP AllGather or ReduceScatter, the
expert compute, or a slice of the dense Gradient-AllReduce — placed on a channel: ``compute``, ``intra``
(ESP/MP collectives) or ``inter`` (EP AlltoAll, DP Gradient-AllReduce). A task list is in CPU issue
order; the runtime keeps it, tasks of one channel run in that order, and a task starts when its
dependencies are done. The same lists feed the runtime, the simulator and the text timeline.

This module owns the task record, the channel vocabulary and each task kind's channel.
"""

from __future__ import annotations

from dataclasses import dataclass

CHANNELS = ("compute", "intra", "inter")

# Forward kinds, in the order one chunk passes through them, and their backward mirrors.
FORWARD_KINDS = ("dispatch", "gather", "expert", "reduce", "combine")
BACKWARD_KINDS = ("combine_bwd", "reduce_bwd", "expert_bwd", "gather_bwd", "dispatch_bwd")
KIND_CHANNEL = {
    "dispatch": "inter", "gather": "intra", "expert": "compute", "reduce": "intra", "combine": "inter",
    "combine_bwd": "inter", "reduce_bwd": "intra", "expert_bwd": "compute", "gather_bwd": "intra",
    "dispatch_bwd": "inter", "gar": "inter",
}


@dataclass(kw_only=True, frozen=True)
class Task:
    """``kind`` of ``chunk`` on ``channel``; ``deps`` are (kind, chunk) keys of earlier tasks."""

    kind: str
    chunk: int
    channel: str
    deps: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> tuple[str, int]:
        return (self.kind, self.chunk)

    def __str__(self) -> str:
        return f"{self.kind}[{self.chunk}]@{self.channel}"


def check_tasks(tasks: list[Task]) -> None:
    """Every dependency names an earlier task, keys are unique, channels are known."""
    seen: set[tuple[str, int]] = set()
    for t in tasks:
        if t.channel not in CHANNELS:
            raise ValueError(f"task {t} is on unknown channel {t.channel!r}; choose one of {', '.join(CHANNELS)}")
        for d in t.deps:
            if d not in seen:
                raise ValueError(f"task {t} depends on {d}, which is not issued before it")
        if t.key in seen:
            raise ValueError(f"task {t.key} is issued twice")
        seen.add(t.key)


def format_tasks(tasks: list[Task]) -> str:
    """A text timeline: one column per channel, one row per task in issue order."""
    width = 16
    lines = ["".join(c.ljust(width) for c in CHANNELS)]
    for t in tasks:
        cells = [f"{t.kind}[{t.chunk}]" if c == t.channel else "" for c in CHANNELS]
        lines.append("".join(x.ljust(width) for x in cells).rstrip())
    return "\n".join(lines)
