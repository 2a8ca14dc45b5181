"""Pure builders of each schedule's task lists (paper §3.3–3.4, §7; digest §7.2–7.4).

A schedule decides (1) how many chunks each pass uses, (2) which channel each collective runs on —
with one communication channel, intra- and inter-node collectives serialise, as on one stream — and
(3) the CPU issue order. The fsmoe order issues, per pass, every chunk's first AlltoAll and
AllGather, then every expert and ReduceScatter, then every second AlltoAll: a waiting AlltoAll can then
never block the issue of later chunks' expert work (head-of-line blocking, digest §7.2). In backward
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
"""

from __future__ import annotations

from dataclasses import dataclass

from fsmoe.schedule.ir import BACKWARD_KINDS, FORWARD_KINDS, KIND_CHANNEL, Task, check_tasks


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    separate_channels: bool  # intra and inter collectives on separate channels
    pipelined: bool  # r > 1 allowed
    independent_degrees: bool  # r_fwd ≠ r_bwd allowed
    gar_in_moe: bool  # the layer's GAR slice runs inside the MoE backward
    gar_overlap_dense: bool  # the remaining GAR overlaps the dense backward
    gar_chunk_bytes: int | None = None  # fixed-size GAR chunks (Lina); None: planned ranges
    gar_blocking: bool = True  # a GAR slice inside the MoE block occupies the inter channel until done


SCHEDULES: dict[str, ScheduleSpec] = {
    "sequential": ScheduleSpec("sequential", False, False, False, False, False),
    "tutel": ScheduleSpec("tutel", False, True, False, False, False),
    "tutel_improved": ScheduleSpec("tutel_improved", False, True, False, False, True),
    "lina": ScheduleSpec("lina", False, True, False, True, True, gar_chunk_bytes=30 * 2**20, gar_blocking=False),
    "fsmoe_no_iio": ScheduleSpec("fsmoe_no_iio", False, True, True, True, True),
    "fsmoe": ScheduleSpec("fsmoe", True, True, True, True, True),
}


def get_schedule(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def check_degrees(spec: ScheduleSpec, r_fwd: int, r_bwd: int) -> None:
    for what, r in (("r_fwd", r_fwd), ("r_bwd", r_bwd)):
        if r < 1:
            raise ValueError(f"{what} must be >= 1, got {r}")
    if not spec.pipelined and (r_fwd, r_bwd) != (1, 1):
        raise ValueError(f"schedule {spec.name!r} does not pipeline; got r_fwd={r_fwd}, r_bwd={r_bwd} (need 1, 1)")
    if not spec.independent_degrees and r_fwd != r_bwd:
        raise ValueError(f"schedule {spec.name!r} uses one degree for both passes; got r_fwd={r_fwd} != r_bwd={r_bwd}")


def channel_of(spec: ScheduleSpec, kind: str) -> str:
    """With one communication channel, intra collectives go on the inter channel (one FIFO)."""
    ch = KIND_CHANNEL[kind]
    return "inter" if ch == "intra" and not spec.separate_channels else ch


def _pass(spec: ScheduleSpec, kinds: tuple[str, ...], r: int, gar: bool) -> list[Task]:
    first, gather, expert, reduce, second = kinds
    tasks: list[Task] = []

    def add(kind: str, i: int, *deps: tuple[str, int]) -> None:
        tasks.append(Task(kind, i, channel_of(spec, kind), deps))

    for i in range(r):
        add(first, i)
        add(gather, i, (first, i))
    if gar:
        add("gar", 0)
    for i in range(r):
        add(expert, i, (gather, i))
        add(reduce, i, (expert, i))
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
