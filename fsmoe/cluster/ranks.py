"""The one rank harness: run ``fn(rank, world_size, *args, **kwargs)`` on every rank of a job and bring
back each rank's value, or the error of the rank that failed first, within a timeout, leaving no
process behind. :mod:`fsmoe.cluster.launcher` builds its clusters on it; tests and benchmarks reach it
through :func:`fsmoe.cluster.run_distributed`.

Two start methods share everything here; only how a rank's process comes to life differs:

* **subprocess** (:func:`start_subprocess`): ``python -m fsmoe.cluster.worker``, optionally behind a
  prefix such as ``ip netns exec NODE`` (the emulated cluster). Each rank imports torch (~2-3 s).
* **forkserver** (:func:`start_forked`): forked from a fork server that imported torch once (the first
  call pays ~2 s, later ranks ~0.2 s). Loopback only; what tests and benchmarks use. The fork server
  lives until this (parent) process exits.

The hand-off is one folder (:class:`RankDir`), the same for both, so a rank's body (:func:`rank_main`)
does not know how it was started::

    call.pkl        what to run: "module:qualname", pickled (args, kwargs), the caller's sys.path, timeout
    result-R.pkl    rank R's outcome: (ok, pickled value | traceback text, time.time() when written)
    progress-R.txt  rank R's last report_progress(text)
    rankR.log       rank R's stdout and stderr

A rank finds the folder in ``FSMOE_RANK_DIR``, joins ``init_process_group("gloo")`` from the torchrun
variables the launcher set, calls the function, writes its result and leaves with ``os._exit`` (0 or
1): a failing rank must not tear down a group its peers may be blocked in, and some libraries
(DeepSpeed) abort in their C++ teardown at exit.

Supervision (:func:`run_processes`) starts every rank and polls exit statuses: the first non-zero
status (after half a second in which further deaths may show), the deadline, or a :class:`Watchdog`
that sees a rank make no progress stops them all (SIGTERM and SIGCONT to each rank's own process
group, so a stopped rank acts on it too, then SIGKILL, then reaping); so does an exception in the
parent (Ctrl-C). A rank dies with its parent too (``PR_SET_PDEATHSIG``, set before ``exec`` and kept
through ``ip netns exec``, which execs the rank in place; a forked rank's parent is the fork server,
which exits with us).

:meth:`RankDir.collect` then turns the folder into the values in rank order, or raises
:class:`RanksTimedOut` naming the ranks without a result, every rank's last progress and the missing
ranks' last output, or :class:`RankFailed` for the rank that failed first:

* the rank whose error was *written* first: once a rank dies its peers fail too, with connection
  resets, and one of them may be reaped before it;
* but a rank that died without writing one (a signal: the OOM killer, a C++ abort) is blamed, with its
  exit status and last output, unless an error predates its death (written before it was last seen
  running, and not gloo's report of a lost peer, which can show before the death does).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

RANK_DIR_ENV = "FSMOE_RANK_DIR"
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_STOP_GRACE_S = 3.0
_POLL_S = 0.02
_FAILURE_GRACE_S = 0.5  # after a rank fails, how long other deaths may take to show
_WATCHDOG_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_CHARS = 3000
_MAIN_ALIAS = "__fsmoe_rank_main__"
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")  # gloo, as a peer dies
_FORKSERVER_PRELOAD = ["__main__", "torch", "torch.distributed", "fsmoe.cluster.ranks"]


# --- errors ---------------------------------------------------------------------------------------


class RankFailed(RuntimeError):
    """A rank raised or died. ``remote_traceback`` is its traceback, or, when it died without one
    (a signal, ``os._exit``), its exit status and last output."""

    def __init__(self, rank: int, remote_traceback: str) -> None:
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


class RanksTimedOut(TimeoutError):
    """``ranks`` did not finish within ``timeout`` seconds; every rank was killed. ``progress`` holds
    each rank's last :func:`report_progress` (None where it reported nothing)."""

    def __init__(self, ranks: Sequence[int], timeout: float, progress: Sequence[str | None], message: str) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
        self.timeout = timeout
        self.progress = list(progress)


# --- inside a rank --------------------------------------------------------------------------------


def report_progress(text: str) -> None:
    """Inside a rank: record what this rank is doing; a :class:`RanksTimedOut` shows each rank's last
    report. A no-op outside this harness (e.g. under torchrun)."""
    folder = os.environ.get(RANK_DIR_ENV)
    if folder is not None:
        RankDir(folder).write_progress(int(os.environ["RANK"]), text)


def rank_main() -> NoReturn:
    """The body of every rank, however started: read the call, join the gloo group, run, write the
    result, leave at once (see the module doc)."""
    folder = RankDir(os.environ[RANK_DIR_ENV])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        call = pickle.loads(folder.call_path.read_bytes())
        sys.path[:] = call["sys_path"]  # before unpickling: fn and its arguments may live in test modules
        fn = resolve(call["target"])
        args, kwargs = pickle.loads(call["args"])

        from datetime import timedelta

        import torch
        import torch.distributed as dist

        # A forked rank inherits the fork server's torch, which read OMP_NUM_THREADS long ago.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=call["timeout"]))
        value = pickle.dumps(fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        folder.write_result(rank, False, traceback.format_exc())
        _leave(1)
    folder.write_result(rank, True, value)
    _leave(0)


def _leave(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- naming a function across processes ------------------------------------------------------------


def target_of(fn: Callable[..., Any]) -> str:
    """``module:qualname``, or ``/path/script.py:qualname`` for a function of the running script."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise TypeError(f"ranks can only run an importable module-level function, got {fn!r}")
    if module in ("__main__", "__mp_main__"):
        path = getattr(sys.modules[module], "__file__", None)
        if path is None:
            raise TypeError(f"{fn!r} lives in an interactive __main__; move it into a module")
        return f"{os.path.abspath(path)}:{qualname}"
    return f"{module}:{qualname}"


def resolve(target: str) -> Callable[..., Any]:
    """``pkg.mod:func`` or ``/path/script.py:Class.func`` -> the function."""
    module_name, sep, qualname = target.rpartition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"expected MODULE:FUNCTION or /path/script.py:FUNCTION, got {target!r}")
    module: Any = _load_script(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_script(path: str) -> Any:
    """The caller's script as a module, loaded as multiprocessing's spawn does: under another name (its
    ``if __name__ == "__main__":`` block does not run) and aliased as ``__main__`` for unpickling. A
    fork server may have preloaded it already (as ``__mp_main__``)."""
    for name in ("__mp_main__", _MAIN_ALIAS):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None) == path:
            break
    else:
        spec = importlib.util.spec_from_file_location(_MAIN_ALIAS, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MAIN_ALIAS] = module
        spec.loader.exec_module(module)
    sys.modules["__main__"] = module
    return module


# --- the hand-off folder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankResult:
    """What one rank wrote: ``ok`` and its pickled value, or not ``ok`` and its traceback text;
    ``written_at`` is ``time.time()`` in the rank (ranks share this machine's clock)."""

    ok: bool
    payload: Any
    written_at: float

    def value(self) -> Any:
        return pickle.loads(self.payload)


class RankDir:
    """The folder through which a parent hands a call to its ranks and gets their results back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    @contextlib.contextmanager
    def for_call(
        cls, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], timeout: float
    ) -> Iterator[RankDir]:
        """A temporary folder holding the call ``fn(rank, world_size, *args, **kwargs)``; removed on exit.
        Raises ``TypeError`` for a function the ranks could not import."""
        call = {
            "sys_path": list(sys.path),
            "target": target_of(fn),
            "args": pickle.dumps((tuple(args), dict(kwargs))),
            "timeout": float(timeout),
        }
        with tempfile.TemporaryDirectory(prefix="fsmoe-ranks-") as tmp:
            folder = cls(tmp)
            folder.call_path.write_bytes(pickle.dumps(call))
            yield folder

    @property
    def call_path(self) -> Path:
        return self.path / "call.pkl"

    def result_path(self, rank: int) -> Path:
        return self.path / f"result-{rank}.pkl"

    def progress_path(self, rank: int) -> Path:
        return self.path / f"progress-{rank}.txt"

    def log_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.log"

    def write_result(self, rank: int, ok: bool, payload: Any, written_at: float | None = None) -> None:
        at = time.time() if written_at is None else written_at
        _write_atomically(self.result_path(rank), pickle.dumps((ok, payload, at)))

    def read_result(self, rank: int) -> RankResult | None:
        """What rank ``rank`` wrote, or None when it wrote nothing."""
        try:
            ok, payload, at = pickle.loads(self.result_path(rank).read_bytes())
        except FileNotFoundError:
            return None
        return RankResult(ok=bool(ok), payload=payload, written_at=float(at))

    def write_progress(self, rank: int, text: str) -> None:
        _write_atomically(self.progress_path(rank), text.encode())

    def read_progress(self, rank: int) -> str | None:
        try:
            return self.progress_path(rank).read_text(errors="replace")
        except FileNotFoundError:
            return None

    def log_tail(self, rank: int) -> str:
        try:
            text = self.log_path(rank).read_text(errors="replace")
        except OSError:
            return "(no output)"
        return text[-_LOG_TAIL_CHARS:] or "(no output)"

    def collect(self, outcome: LaunchOutcome, world_size: int, timeout: float) -> list[Any]:
        """The ranks' values in rank order; or raise :class:`RanksTimedOut` when ``outcome`` timed out,
        else :class:`RankFailed` for the rank whose error came first (see the module doc)."""
        results = [self.read_result(rank) for rank in range(world_size)]
        if outcome.code == 0 and all(r is not None and r.ok for r in results):
            return [r.value() for r in results]  # type: ignore[union-attr]
        if outcome.timed_out:
            raise self._timed_out(results, timeout)
        # The root cause is the rank whose error came first: once it dies, its peers fail too (connection
        # reset), and one of them may even be reaped before it. A rank that died without a result (a signal)
        # came first unless an error predates its death: written before it was last seen running, and
        # not a lost connection (a peer can see the death before its exit shows).
        raised = sorted((r.written_at, rank) for rank, r in enumerate(results) if r is not None and not r.ok)
        if outcome.failed_rank is not None and results[outcome.failed_rank] is None:
            raised = [
                (at, rank)
                for at, rank in raised
                if at < outcome.healthy_at and not _lost_a_peer(results[rank].payload)  # type: ignore[union-attr]
            ]
        if raised:
            rank = raised[0][1]
            raise RankFailed(rank, results[rank].payload)  # type: ignore[union-attr]
        rank = outcome.failed_rank
        if rank is None or results[rank] is not None:  # e.g. every process exited 0, yet a result is missing
            rank = next((r for r, res in enumerate(results) if res is None), rank or 0)
        raise RankFailed(
            rank,
            f"exited with status {outcome.code}{_status_hint(outcome.code)} without a traceback; its last "
            f"output:\n{self.log_tail(rank)}",
        )

    def _timed_out(self, results: Sequence[RankResult | None], timeout: float) -> RanksTimedOut:
        missing = [rank for rank, r in enumerate(results) if r is None]
        progress = [self.read_progress(rank) for rank in range(len(results))]
        lines = [
            f"  rank {rank}: {'finished' if results[rank] is not None else (text or '(nothing reported)')}"
            for rank, text in enumerate(progress)
        ]
        tails = "\n".join(f"--- rank {rank} ---\n{self.log_tail(rank)}" for rank in missing)
        message = (
            f"ranks {missing} of {len(results)} did not finish within {timeout:g} s; all ranks were killed. "
            f"Last progress:\n" + "\n".join(lines) + f"\nTheir last output:\n{tails}"
        )
        return RanksTimedOut(missing, timeout, progress, message)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # the parent never reads half a file


def _lost_a_peer(remote_traceback: str) -> bool:
    """Whether a rank's error is gloo's report that a peer went away (a consequence, not a cause)."""
    return any(m in remote_traceback for m in _PEER_LOST)


def _status_hint(code: int) -> str:
    """What an exit status usually means when a rank died without a Python traceback."""
    return {
        134: " (SIGABRT: a C++ abort)",
        137: " (SIGKILL: often the kernel's out-of-memory killer)",
        139: " (SIGSEGV)",
    }.get(code, "")


# --- rank processes -------------------------------------------------------------------------------


def exit_status(returncode: int) -> int:
    """A shell's exit status: 128 + N for a process killed by signal N (``returncode`` -N)."""
    return 128 - returncode if returncode < 0 else returncode


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class RankProcess(Protocol):
    """One started rank, whichever way it was started."""

    def exit_status(self) -> int | None:
        """None while it runs, else its :func:`exit_status`."""

    def send_signal(self, sig: int) -> None:
        """Signal the rank's whole process group (the rank and anything it started)."""

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for it to end (and reap it)."""


class _PopenRank:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def exit_status(self) -> int | None:
        code = self.proc.poll()
        return None if code is None else exit_status(code)

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # its own session, so its own group

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


class _ForkedRank:
    def __init__(self, proc: multiprocessing.process.BaseProcess) -> None:
        self.proc = proc

    def exit_status(self) -> int | None:
        code = self.proc.exitcode
        return None if code is None else exit_status(code)

    def send_signal(self, sig: int) -> None:
        pid = self.proc.pid
        if pid is None or self.proc.exitcode is not None:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:  # not yet its own group leader (setsid still to come)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float) -> None:
        self.proc.join(timeout)


@functools.cache
def _prctl() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).prctl  # loaded in the parent: no dlopen after fork


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    prctl = _prctl()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def start_subprocess(
    argv: Sequence[str], env: Mapping[str, str], *, cwd: str | Path | None = None, log: Path | None = None
) -> RankProcess:
    """Start ``argv`` as one rank: its own session (Ctrl-C reaches only the parent, and the rank's
    whole group is stopped as a unit), dying with this process, with stdout and stderr in ``log``
    (else this process's)."""
    out = open(log, "wb") if log is not None else None  # noqa: SIM115 - the child keeps its own copy
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    finally:
        if out is not None:
            out.close()
    return _PopenRank(proc)


def start_forked(env: Mapping[str, str], *, cwd: str | Path, log: Path) -> RankProcess:
    """Start one rank of the call in ``env[RANK_DIR_ENV]`` forked from the fork server (see the module
    doc): with exactly ``env`` as its environment, in ``cwd``, its output in ``log``."""
    ctx = multiprocessing.get_context("forkserver")
    # Only takes effect when the fork server starts (the first call); '__main__' lets a script's own
    # functions be run, as with spawn.
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    proc = ctx.Process(target=_forked_rank, args=(dict(env), str(cwd), str(log)), daemon=True, name="rank")
    proc.start()
    return _ForkedRank(proc)


def _forked_rank(env: dict[str, str], cwd: str, log: str) -> NoReturn:
    """In the forked child: become what :func:`start_subprocess` makes of a rank, then run it."""
    os.setsid()
    _prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the fork server...
    _release_fork_server()  # ...which then exits with our parent
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    rank_main()


def _release_fork_server() -> None:
    """Close this rank's copy of the fork server's "alive" pipe. The fork server exits when every copy is
    closed; multiprocessing hands one to each child (for nested use), so without this a parent killed by
    SIGKILL or SIGTERM would leave the fork server, and its ranks, running. (A private attribute of
    ``multiprocessing.forkserver``, the same from Python 3.8 to 3.13; where it is missing, nothing changes.)"""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


# --- supervision ----------------------------------------------------------------------------------


class Watchdog(Protocol):
    """Watches the ranks of one launch for progress while they run (one watchdog per launch), e.g.
    :class:`fsmoe.train.distributed.HangWatch`, which reads the ranks' heartbeats."""

    def start(self) -> Mapping[str, str]:
        """Called once, before any rank starts: the variables every rank's environment needs."""

    def check(self) -> str | None:
        """Polled twice a second while the ranks run: None, or why the job must stop now."""

    def close(self) -> None:
        """Called once, after the ranks are stopped."""


@dataclass(frozen=True)
class LaunchOutcome:
    """How a run of rank processes ended: ``code`` 0 when every rank exited 0, else the failing rank's
    exit status (128 + N for signal N) or ``TIMEOUT_EXIT_CODE`` (the deadline passed, or the watchdog
    stopped the job: ``stalled`` is then its message). ``healthy_at``: ``time.time()`` when the failing
    rank was last seen running, so an error another rank wrote before it predates its death."""

    code: int
    failed_rank: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    healthy_at: float = 0.0
    stalled: str | None = None


def run_processes(
    start_rank: Callable[[int], RankProcess],
    world_size: int,
    timeout: float | None,
    watchdog: Watchdog | None = None,
) -> LaunchOutcome:
    """Start ranks ``0..world_size-1`` with ``start_rank`` and wait until all exit 0, one fails,
    ``timeout`` seconds pass, or ``watchdog`` says stop; whatever happens (an exception, Ctrl-C
    included), stop every rank still running before returning. The caller puts ``watchdog.start()``'s
    variables in the ranks' environment; this only polls it."""
    start = time.monotonic()
    procs: list[RankProcess] = []
    try:
        for rank in range(world_size):
            procs.append(start_rank(rank))
        return _watch(procs, start, timeout, watchdog)
    finally:
        stop(procs)


def _watch(
    procs: Sequence[RankProcess], start: float, timeout: float | None, watchdog: Watchdog | None = None
) -> LaunchOutcome:
    deadline = None if timeout is None else start + timeout
    alive_at = [time.time()] * len(procs)  # when each rank was last seen running
    dead_at: dict[int, float] = {}  # when each failed rank was first seen dead
    next_check = time.monotonic() + _WATCHDOG_POLL_S
    while True:
        polled_at = time.time()  # before the poll: a rank seen running below was running at this time
        codes = [p.exit_status() for p in procs]
        for rank, code in enumerate(codes):
            if code is None:
                alive_at[rank] = polled_at
            elif code != 0:
                dead_at.setdefault(rank, time.monotonic())
        if dead_at:
            # Wait a moment for the other deaths to show (a fork server reports exits late) before naming
            # the failing rank: a signal's victim before a rank that raised (likely because the victim's
            # connections closed), then the first seen dead.
            if all(code is not None for code in codes) or time.monotonic() > min(dead_at.values()) + _FAILURE_GRACE_S:
                rank = min(dead_at, key=lambda r: (codes[r] <= 128, dead_at[r], r))  # type: ignore[operator]
                code = codes[rank]
                assert code is not None
                return LaunchOutcome(code, rank, seconds=time.monotonic() - start, healthy_at=alive_at[rank])
        elif all(code == 0 for code in codes):
            return LaunchOutcome(code=0, seconds=time.monotonic() - start)
        elif deadline is not None and time.monotonic() > deadline:
            return LaunchOutcome(code=TIMEOUT_EXIT_CODE, timed_out=True, seconds=time.monotonic() - start)
        elif watchdog is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + _WATCHDOG_POLL_S
            stalled = watchdog.check()
            if stalled is not None:
                return LaunchOutcome(code=TIMEOUT_EXIT_CODE, seconds=time.monotonic() - start, stalled=stalled)
        time.sleep(_POLL_S)


def stop(procs: Sequence[RankProcess]) -> None:
    """SIGTERM (and SIGCONT: a stopped process acts on nothing else) the process group of each rank
    still running, then SIGKILL what is left; reap all."""
    live = [p for p in procs if p.exit_status() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in live:
            p.send_signal(sig)
            if sig == signal.SIGTERM:
                p.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + _STOP_GRACE_S
        for p in live:
            p.wait(max(0.0, deadline - time.monotonic()))
        live = [p for p in live if p.exit_status() is None]
        if not live:
            return
