"""Run a function on N gloo ranks of this machine, for tests and benchmarks.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh processes, joins them into one
gloo process group, calls ``fn(rank, world_size, *args, **kwargs)`` on each and returns the ranks'
return values in rank order. ``fn`` must be importable (a module-level function); its return value
must pickle. A failing rank fails the call at once with that rank's traceback (``RankFailed``); ranks
that do not finish within ``timeout`` seconds are killed (``RanksTimedOut``, listing each rank's last
:func:`report_progress`). Every process is reaped before the call returns or raises.

Starting a rank costs a few seconds (importing torch), so a test module runs many cases in one spawn:
``run_cases([case_a, case_b], world_size)`` runs each ``case(rank, world_size)`` on every rank, keeps
going while cases pass, and returns one :class:`CaseOutcome` per case for pytest to check one by one.

Start-up: where the platform has it, ranks are forked from a ``forkserver`` that imported torch once
(the first call pays ~2 s, later calls ~0.2 s instead of ~3 s a rank with ``spawn``). The fork server
is a helper process that lives until this (parent) process exits. Each rank gets the parent's current
``sys.path`` and environment before it unpickles ``fn`` and its arguments; variables that torch reads
at import time come from the first call. Elsewhere ranks are ``spawn``-ed.

Rendezvous: the parent owns a ``TCPStore`` on a free port (no port race); the ranks join it as clients
and also find it in ``MASTER_ADDR``/``MASTER_PORT``. Each rank runs with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import functools
import os
import pickle
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"
_PROGRESS_KEY = "dist_utils/progress/{rank}"
_EXIT_GRACE_S = 10.0  # how long finished ranks get to leave on their own before they are killed
_DEAD_GRACE_S = 2.0  # how long a dead rank's last message may still be in flight


class RankFailed(RuntimeError):
    """A rank raised; the message holds its traceback."""

    def __init__(self, rank: int, remote_traceback: str) -> None:
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


class RanksTimedOut(RuntimeError):
    """Some ranks did not finish in time; all processes were killed."""


def report_progress(text: str) -> None:
    """Inside a rank: record what this rank is doing; a timeout message shows each rank's last report."""
    store = _progress_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    store.set(_PROGRESS_KEY.format(rank=os.environ["RANK"]), text)


@functools.cache
def _progress_store(host: str, port: int) -> dist.TCPStore:
    # One connection per rank process: opening a new client can stall for seconds once groups exist.
    return dist.TCPStore(host, port, is_master=False)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    parent_sys_path: list[str],
    parent_env: dict[str, str],
    call: bytes,
    timeout: float,
    results: Any,
) -> None:
    sys.path[:] = parent_sys_path  # before unpickling: fn and its arguments may live in test modules
    os.environ.clear()
    os.environ.update(parent_env)
    os.environ.update(
        MASTER_ADDR=_HOST, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are local: stay on loopback
    torch.set_num_threads(1)
    try:
        fn, args, kwargs = pickle.loads(call)
        store = dist.TCPStore(_HOST, port, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        payload = pickle.dumps(fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
        return  # leave the group as is: other ranks may be blocked in it; the parent kills them
    results.put((rank, True, payload))
    dist.destroy_process_group()


def _context() -> Any:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Only takes effect when the fork server starts (the first call); '__main__' lets a script's own
        # functions be run, as with spawn.
        ctx.set_forkserver_preload(["__main__", "torch", "torch.distributed"])
        return ctx
    return mp.get_context("spawn")


def _progress(store: dist.TCPStore, world_size: int) -> str:
    lines = []
    for rank in range(world_size):
        key = _PROGRESS_KEY.format(rank=rank)
        last = store.get(key).decode() if store.check([key]) else "(nothing reported)"
        lines.append(f"  rank {rank}: {last}")
    return "\n".join(lines)


def _reap(procs: Sequence[Any], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return the ranks'
    values in rank order. Raises ``RankFailed`` (first failing rank's traceback) or ``RanksTimedOut``."""
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise TypeError(f"run_distributed needs an importable module-level function, got {fn!r}") from err
    call = pickle.dumps((fn, args, kwargs))
    ctx = _context()
    results = ctx.Queue()
    store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, store.port, list(sys.path), dict(os.environ), call, timeout, results),
            daemon=True,
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    values: dict[int, Any] = {}
    ok = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        dead_since: dict[int, float] = {}
        while len(values) < world_size:
            now = time.monotonic()
            if now > deadline:
                missing = [r for r in range(world_size) if r not in values]
                raise RanksTimedOut(
                    f"ranks {missing} of {world_size} did not finish within {timeout:g} s; all ranks were "
                    f"killed. Last progress:\n{_progress(store, world_size)}"
                )
            try:
                rank, success, payload = results.get(timeout=min(0.2, deadline - now + 0.01))
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if rank in values or p.exitcode is None:
                        continue
                    since = dead_since.setdefault(rank, now)
                    if now - since > _DEAD_GRACE_S:
                        raise RankFailed(rank, f"exited with code {p.exitcode} without reporting a result") from None
                continue
            if not success:
                raise RankFailed(rank, payload)
            values[rank] = pickle.loads(payload)
        ok = True
    finally:
        _reap(procs, _EXIT_GRACE_S if ok else 0.0)
        results.close()
        results.join_thread()
    return [values[rank] for rank in range(world_size)]


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
    """Run every ``case(rank, world_size)`` in order in one spawn of ``world_size`` ranks.

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
