"""Pure builders of each schedule's task lists (paper §3.3–3.4, §7; digest §7.2–7.4).

A schedule decides (1) how many chunks each pass uses, (2) which channel each collective runs on —
with one communication channel, intra- and inter-node collectives serialise, as on one stream — and
(3) the CPU issue order. The fsmoe order issues, per pass, every chunk's first AlltoAll and
AllGather, then every expert and ReduceScatter, then every second AlltoAll: a waiting AlltoAll can then
never block the issue of later chunks' expert work (head-of-line blocking, digest §7.2). With one
communication channel (every schedule but ``fsmoe``) each chunk's ReduceScatter and second AlltoAll are
issued right behind its expert instead — Tutel's order: batched, every second AlltoAll would queue on
the one FIFO lane behind the last chunk's ReduceScatter, i.e. behind the last expert, and the combines
would not overlap the experts at all. In backward
the layer's Gradient-AllReduce slice (``gar``) is issued on the inter channel right after the last
first-AlltoAll chunk, so it fills the inter-node link while experts compute (paper Fig. 3d).

Schedules (``SCHEDULES``):
  sequential    r = 1, one comm channel, GAR after backward (DeepSpeed-MoE)
  tutel         pipelined, one comm channel, r_fwd = r_bwd, GAR after backward
  tutel_improved  tutel + GAR overlapped with the dense backward (not inside the MoE block)
  lina          tutel + GAR in fixed 30 MB chunks launched as soon as ready, inside the MoE backward and
                the dense parts, without occupying the inter channel (AlltoAll keeps its FIFO place)
  fsmoe_no_iio  one comm channel, r_fwd ≠ r_bwd allowed, planned GAR slot inside the MoE backward
  fsmoe         separate intra/inter channels, r_fwd ≠ r_bwd, planned GAR slot inside the MoE backward

The schedules' data (:class:`ScheduleSpec`, ``SCHEDULES``, ``get_schedule``, ``check_degrees``) lives in
:mod:`fsmoe.config`, shared with the job config and the simulator, and is re-exported here; this
module owns the task-list builders and the channel → lane mapping (:func:`lanes_for`).
"""

from __future__ import annotations

from fsmoe.config import SCHEDULES, ScheduleSpec, check_degrees, get_schedule
from fsmoe.schedule.ir import BACKWARD_KINDS, FORWARD_KINDS, KIND_CHANNEL, Task, check_tasks


def channel_of(spec: ScheduleSpec, kind: str) -> str:
    """With one communication channel, intra collectives go on the inter channel (one FIFO)."""
    ch = KIND_CHANNEL[kind]
    return "inter" if ch == "intra" and not spec.separate_channels else ch


def lanes_for(spec: ScheduleSpec) -> dict[str, str]:
    """Communication channel → lane name for running ``spec``: the lane of a channel is where
    :func:`channel_of` puts its tasks, so a schedule with one communication channel runs intra and inter
    collectives on one FIFO lane. The one place this mapping is made (see ``Runtime.for_schedule``)."""
    return {ch: channel_of(spec, kind) for kind, ch in KIND_CHANNEL.items() if ch != "compute"}


def _pass(spec: ScheduleSpec, kinds: tuple[str, ...], r: int, gar: bool) -> list[Task]:
    first, gather, expert, reduce, second = kinds
    tasks: list[Task] = []

    def add(kind: str, i: int, *deps: tuple[str, int]) -> None:
        tasks.append(Task(kind=kind, chunk=i, channel=channel_of(spec, kind), deps=deps))

    for i in range(r):
        add(first, i)
        add(gather, i, (first, i))
    if gar:
        add("gar", 0)
    for i in range(r):
        add(expert, i, (gather, i))
        add(reduce, i, (expert, i))
        if not spec.separate_channels:  # one FIFO lane: chunk i's combine must not queue behind chunk r-1
            add(second, i, (reduce, i))
    if spec.separate_channels:
        for i in range(r):
            add(second, i, (reduce, i))
    check_tasks(tasks)
    return tasks


def forward_tasks(spec: ScheduleSpec, r: int) -> list[Task]:
    """Forward of the dispatch → AllGather → expert → ReduceScatter → combine block, R chunks."""
    return _pass(spec, FORWARD_KINDS, r, gar=False)


def backward_tasks(spec: ScheduleSpec, r: int, with_gar: bool = False) -> list[Task]:
    """Backward mirror (gradient AlltoAll, AllGather, expert backward, ReduceScatter, AlltoAll), R chunks;
    ``with_gar`` adds the layer's Gradient-AllReduce slice (only schedules with ``gar_in_moe``)."""
    if with_gar and not spec.gar_in_moe:
        raise ValueError(f"schedule {spec.name!r} does not run a Gradient-AllReduce slice inside the MoE backward")
    return _pass(spec, BACKWARD_KINDS, r, gar=with_gar)


__all__ = [
    "SCHEDULES", "ScheduleSpec", "backward_tasks", "channel_of", "check_degrees", "forward_tasks", "get_schedule",
    "lanes_for",
]
