"""Gradient-AllReduce by plan: dense gradient ranges launched inside the backward (paper §5, Fig. 3d).

The dense gradients of all parameters (each marked with its replica group, see ``grad_sync``) form one
*stream*, ordered by when backward completes them. Backward passes *slots* in a fixed order; for a
GPT model with blocks n-1 … 0 that is, per block i from the last: ``moe:i`` (inside MoE layer i's
backward, on the inter channel right after its first AlltoAll chunks) and ``dense:i`` (when block i's
MLP/MoE branch is done, so the all-reduce overlaps block i's attention backward), then ``tail`` (after
backward). A parameter is *ready* at the first slot that fires after autograd has finished its gradient.

A :class:`GradientPlan` carves the stream into consecutive ranges, each launched at one slot; whatever
it leaves goes to ``tail``. A range is never launched before every gradient in it is ready — plans that
would are refused with the offending slot and parameter. All ranges complete in :meth:`finish`, which
divides by the world size, so the result equals the plain all-reduce of :class:`GradSync`.

This module owns the stream, the plans and their runner; :func:`fsmoe.parallel.parallelize.attach_gradient_plan`
wires the slots into a model (``moe:i`` becomes pipeline i's ``gar`` task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.parallel.dims import ProcessGroups
from fsmoe.parallel.grad_sync import REPLICA_ATTR, replica_group

TAIL = "tail"
NO_PLAN = "after"  # the gradient plan text for "all of it after the backward"


@dataclass(frozen=True)
class GradientPlan:
    """``ranges``: (slot, bytes) in slot firing order; consecutive pieces of the gradient stream."""

    ranges: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for slot, nbytes in self.ranges:
            if nbytes < 0:
                raise ValueError(f"gradient plan: range at slot {slot!r} has negative size {nbytes}")


@dataclass(kw_only=True, frozen=True)
class StreamLayout:
    """The gradient stream: parameters in completion order with the slot each becomes ready at."""

    slots: tuple[str, ...]  # firing order, ending with TAIL
    params: tuple[nn.Parameter, ...]
    names: tuple[str, ...]
    ready: tuple[int, ...]  # index into ``slots`` per parameter

    def ready_bytes(self) -> dict[str, int]:
        """Bytes of the stream that are ready when each slot fires."""
        out, total = {}, 0
        sizes = [p.numel() * p.element_size() for p in self.params]
        for s_idx, slot in enumerate(self.slots):
            total = sum(n for n, r in zip(sizes, self.ready, strict=True) if r <= s_idx)
            out[slot] = total
        return out

    @property
    def total_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def greedy_plan(layout: StreamLayout, slots: Callable[[str], bool], chunk_bytes: int | None = None) -> GradientPlan:
    """Launch everything as early as it is ready, at the slots that ``slots`` accepts (e.g. only dense
    slots for tutel_improved); ``chunk_bytes`` cuts ranges into fixed-size pieces (Lina)."""
    ranges: list[tuple[str, int]] = []
    done = 0
    for slot, ready in layout.ready_bytes().items():
        if slot == TAIL or not slots(slot) or ready <= done:
            continue
        size = ready - done
        step = chunk_bytes or size
        while size > 0:
            ranges.append((slot, min(step, size)))
            size -= step
        done = ready
    return GradientPlan(tuple(ranges))


@dataclass
class _Piece:
    param: nn.Parameter
    start: int  # element offsets inside the flattened parameter
    stop: int


@dataclass
class _Launched:
    pieces: list[_Piece]
    buf: Tensor
    work: object | None


@dataclass
class PlannedGradSync:
    """Runs a :class:`GradientPlan`: ``fire(slot)`` from the hooks in backward, ``finish()`` after it."""

    layout: StreamLayout
    plan: GradientPlan
    groups: ProcessGroups | None
    _by_slot: dict[str, list[list[_Piece]]] = field(default_factory=dict, init=False)
    _launched: list[_Launched] = field(default_factory=list, init=False)
    _fired: set[str] = field(default_factory=set, init=False)
    history: list[tuple[str, int]] = field(default_factory=list, init=False)  # (slot, bytes) per launch, in order

    def __post_init__(self) -> None:
        self.world = 1 if self.groups is None else self.groups.dims.world_size
        order = {s: i for i, s in enumerate(self.layout.slots)}
        ranges = list(self.plan.ranges)
        last = -1
        for slot, _ in ranges:
            if slot not in order:
                raise ValueError(f"gradient plan names slot {slot!r}; this model has {', '.join(self.layout.slots)}")
            if order[slot] < last:
                raise ValueError(f"gradient plan: slot {slot!r} comes after a later slot; list ranges in firing order")
            last = order[slot]
        left = self.layout.total_bytes - sum(n for _, n in ranges)
        if left < 0:
            raise ValueError(f"gradient plan covers {sum(n for _, n in ranges)} bytes, the stream has "
                             f"{self.layout.total_bytes}")
        ranges.append((TAIL, left))
        # Carve the stream.
        p_idx, offset = 0, 0  # current parameter, element offset inside it
        params = self.layout.params
        for slot, nbytes in ranges:
            pieces: list[_Piece] = []
            while nbytes > 0 and p_idx < len(params):
                p = params[p_idx]
                if self.layout.ready[p_idx] > order[slot]:
                    raise ValueError(
                        f"gradient plan launches {self.layout.names[p_idx]} at slot {slot!r}, before backward "
                        f"produces it (ready at {self.layout.slots[self.layout.ready[p_idx]]!r})"
                    )
                take = min(p.numel() - offset, -(-nbytes // p.element_size()))
                pieces.append(_Piece(p, offset, offset + take))
                nbytes -= take * p.element_size()
                offset += take
                if offset == p.numel():
                    p_idx, offset = p_idx + 1, 0
            if pieces:
                self._by_slot.setdefault(slot, []).append(pieces)

    def slots_used(self) -> list[str]:
        return [s for s in self._by_slot if s != TAIL]

    @torch.no_grad()
    def fire(self, slot: str, wait: bool = False) -> None:
        """Launch the ranges of ``slot`` (each replica kind on its own group); ``wait`` blocks until
        they are done (a slot on a FIFO channel occupies it)."""
        if slot in self._fired:
            raise RuntimeError(f"gradient slot {slot!r} fired twice in one backward")
        self._fired.add(slot)
        for pieces in self._by_slot.get(slot, []):
            by_kind: dict[str, list[_Piece]] = {}
            for piece in pieces:
                by_kind.setdefault(getattr(piece.param, REPLICA_ATTR, "world"), []).append(piece)
            for kind, kp in by_kind.items():
                buf = torch.cat([
                    (pc.param.grad if pc.param.grad is not None else torch.zeros_like(pc.param)).reshape(-1)[
                        pc.start : pc.stop]
                    for pc in kp
                ])
                group, size = replica_group(self.groups, kind)
                self.history.append((slot, buf.numel() * buf.element_size()))
                work = dist.all_reduce(buf, group=group, async_op=True) if size > 1 else None
                if wait and work is not None:
                    work.wait()
                    work = None
                self._launched.append(_Launched(kp, buf, work))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the tail, wait for every range, write the world-mean gradients back."""
        self.fire(TAIL)
        for launched in self._launched:
            if launched.work is not None:
                launched.work.wait()
            launched.buf.div_(self.world)
            offset = 0
            for pc in launched.pieces:
                n = pc.stop - pc.start
                if pc.param.grad is None:
                    pc.param.grad = torch.zeros_like(pc.param)
                pc.param.grad.view(-1)[pc.start : pc.stop].copy_(launched.buf[offset : offset + n])
                offset += n
        self._launched.clear()
        self._fired.clear()

    def sync(self) -> None:
        """Same interface as :class:`GradSync`: everything not launched in backward goes now."""
        self.finish()


def parse_plan(text: str, layout: StreamLayout) -> GradientPlan:
    """``"moe:3=2MB,dense:3=ready,dense:1=512KB"``: bytes per slot in firing order; ``ready`` takes
    everything ready at that slot that earlier ranges left. ``"after"``: nothing inside the backward, the
    whole stream all-reduced after it (the plan the planner writes when overlapping does not pay)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    if text.strip().lower() == NO_PLAN:
        return GradientPlan()
    ready = layout.ready_bytes()
    ranges: list[tuple[str, int]] = []
    done = 0
    for item in filter(None, (t.strip() for t in text.split(","))):
        slot, _, size = item.partition("=")
        slot = slot.strip()
        if slot not in ready:
            raise ValueError(f"gradient plan names slot {slot!r}; this model has {', '.join(layout.slots)}")
        size = size.strip().upper()
        if size == "READY":
            n = max(ready[slot] - done, 0)
        else:
            unit = next((u for u in units if size.endswith(u)), "B")
            number = size[: len(size) - len(unit)] if size.endswith(unit) else size
            try:
                n = int(float(number) * units[unit])
            except ValueError:
                raise ValueError(
                    f"gradient plan: cannot read size {size!r} in {item!r} (e.g. 2MB, 512KB, ready)"
                ) from None
        ranges.append((slot, n))
        done += n
    return GradientPlan(tuple(ranges))


def order_stream(named: Sequence[tuple[str, nn.Parameter, int]], slots: Sequence[str]) -> StreamLayout:
    """A layout from (name, parameter, ready-slot index) triples, ordered by readiness (stable)."""
    items = sorted(named, key=lambda t: t[2])
    return StreamLayout(
        slots=tuple(slots), params=tuple(p for _, p, _ in items), names=tuple(n for n, _, _ in items),
        ready=tuple(r for _, _, r in items),
    )
