"""The test side of fsmoe's one rank harness (:mod:`fsmoe.cluster.ranks`).

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args, **kwargs)`` on
``world_size`` forked gloo ranks and returns their values in rank order; a failing rank raises
:class:`RankFailed` with its traceback, a hang :class:`RanksTimedOut` with each rank's last
:func:`report_progress`. They are re-exported from :mod:`fsmoe.cluster`.

Starting ranks costs time, so a test module runs many cases in one start: ``run_cases([case_a,
case_b], world_size)`` runs each ``case(rank, world_size)`` on every rank, keeps going while cases
pass, and returns one :class:`CaseOutcome` per case for pytest to check one by one.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fsmoe.cluster import RankFailed, RanksTimedOut, report_progress, run_distributed

__all__ = ["CaseOutcome", "RankFailed", "RanksTimedOut", "report_progress", "run_cases", "run_distributed"]


@dataclass(frozen=True)
class CaseOutcome:
    """One case of :func:`run_cases`: per-rank values, per-rank tracebacks, or why it did not run."""

    name: str
    values: tuple[Any, ...]
    errors: tuple[str | None, ...]
    not_run: str | None = None

    def result(self) -> tuple[Any, ...]:
        """The per-rank values; raises ``AssertionError`` with every failing rank's traceback."""
        if self.not_run is not None:
            raise AssertionError(f"case {self.name} was not run: {self.not_run}")
        failed = [f"--- rank {r} ---\n{tb}" for r, tb in enumerate(self.errors) if tb is not None]
        if failed:
            raise AssertionError(f"case {self.name} failed:\n" + "\n".join(failed))
        return self.values


def _case_suite(rank: int, world_size: int, cases: Sequence[Callable[[int, int], Any]]) -> list[tuple[Any, ...]]:
    import torch
    import torch.distributed as dist

    out: list[tuple[Any, ...]] = []
    failed_case: str | None = None
    for case in cases:
        name = case.__name__
        if failed_case is not None:
            out.append((None, None, f"an earlier case, {failed_case}, failed on some rank"))
            continue
        report_progress(f"running case {name}")
        try:
            out.append((case(rank, world_size), None, None))
        except Exception:
            out.append((None, traceback.format_exc(), None))
        # Stop everywhere after a failure: the ranks may no longer agree on what collective comes next.
        failed = torch.tensor([0 if out[-1][1] is None else 1])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            failed_case = name
    report_progress("all cases done")
    return out


def run_cases(
    cases: Sequence[Callable[[int, int], Any]], world_size: int, *, timeout: float = 120.0
) -> dict[str, CaseOutcome]:
    """Run every ``case(rank, world_size)`` in order in one start of ``world_size`` ranks.

    A case fails when it raises on any rank; the later cases are then not run. A case that fails on
    some ranks in the middle of a collective can leave the others waiting: the timeout catches that."""
    names = [case.__name__ for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    per_rank = run_distributed(_case_suite, world_size, list(cases), timeout=timeout)
    return {
        name: CaseOutcome(
            name=name,
            values=tuple(per_rank[r][i][0] for r in range(world_size)),
            errors=tuple(per_rank[r][i][1] for r in range(world_size)),
            not_run=per_rank[0][i][2],
        )
        for i, name in enumerate(names)
    }


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.02) -> float:
    """Wait until ``cond()`` holds; return when (``time.monotonic()``). ``AssertionError`` naming ``what``
    after ``timeout`` seconds, so a test that waits on another process never hangs."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic()
