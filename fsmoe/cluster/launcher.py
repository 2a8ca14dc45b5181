"""Start a job's ranks on an emulated cluster (one shaped network namespace per node) or, as a
fallback, unshaped on loopback; wait for them; stop them all when one fails.

Both launchers give every rank the environment ``torchrun`` gives it, so a script that calls
``init_process_group()`` with the default ``env://`` runs the same under either:
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK`` (the node), ``GROUP_WORLD_SIZE``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``, plus
``GLOO_SOCKET_IFNAME`` (gloo must be told the namespace's interface) and ``OMP_NUM_THREADS=1``
unless the caller's ``env`` sets it. ``FSMOE_CLUSTER`` describes the cluster (for logs only).

Typical use (what ``fsmoe train --emulate-nodes 2 --link 1gbit`` does)::

    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    with open_cluster(spec, allow_unshaped=False) as cluster:   # ClusterUnavailable: say why
        code = cluster.launch([sys.executable, "-m", "fsmoe", "train", ...])

or in one call, ``launch_on_cluster(spec, argv, allow_unshaped=...)``,

and for tests and benchmarks, ``cluster.run_function(fn, *args)`` runs ``fn(rank, world_size, *args)``
on every rank (an importable function; see :mod:`fsmoe.cluster.worker`) and returns the per-rank
values.

Nothing leaks: ranks run in their own process groups and die with the launcher (``PR_SET_PDEATHSIG``);
``close()`` (run by ``__exit__``, by ``atexit``, and on SIGTERM/SIGHUP, which raise ``SystemExit``
inside the ``with``) kills whatever still runs in our namespaces and deletes them. Ctrl-C reaches only
the launcher (ranks are in their own sessions), which stops the ranks and cleans up. A launcher killed
with SIGKILL leaves namespaces behind; the next cluster's ``__enter__`` removes them (:func:`cleanup_stale`).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fsmoe.cluster.netns import (
    ClusterSetupError,
    Topology,
    check_privileges,
    cleanup_stale,
    create_topology,
    destroy_namespaces,
    list_namespaces,
    plan_topology,
)
from fsmoe.cluster.spec import EmulatedClusterSpec

DEFAULT_MASTER_PORT = 29500  # free by construction inside our namespaces
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_STOP_GRACE_S = 3.0
_POLL_S = 0.02
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_CHARS = 3000


class ClusterUnavailable(RuntimeError):
    """This machine (or user) cannot build an emulated cluster; the message says why and what to do."""


class RankFailed(RuntimeError):
    """A rank of :meth:`run_function` raised or died; the message holds its traceback or last output."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class RanksTimedOut(TimeoutError):
    """Ranks did not finish within the timeout; all of them were killed."""


@dataclass(frozen=True)
class LaunchOutcome:
    """How a launch ended: ``code`` 0 when every rank exited 0, else the first failing rank's exit
    status (128 + N for signal N) or ``TIMEOUT_EXIT_CODE``."""

    code: int
    failed_rank: int | None = None
    timed_out: bool = False
    seconds: float = 0.0


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@functools.cache
def _prctl() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).prctl  # loaded in the parent: no dlopen after fork


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    prctl = _prctl()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


class _Launcher:
    """What both launchers share: rank environments, starting, watching and stopping ranks."""

    spec: EmulatedClusterSpec
    shaped: bool

    def __init__(self, spec: EmulatedClusterSpec) -> None:
        self.spec = spec

    # --- overridden per launcher ------------------------------------------------------------------
    def master_addr(self) -> str:
        raise NotImplementedError

    def master_port(self) -> int:
        raise NotImplementedError

    def ifname(self) -> str:
        raise NotImplementedError

    def rank_command(self, rank: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` as rank ``rank``."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------
    def rank_env(self, rank: int) -> dict[str, str]:
        """The torchrun-compatible variables of rank ``rank`` (see the module doc)."""
        spec = self.spec
        node = spec.node_of(rank)
        return {
            "MASTER_ADDR": self.master_addr(),
            "MASTER_PORT": str(self.master_port()),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank % spec.procs_per_node),
            "WORLD_SIZE": str(spec.world_size),
            "LOCAL_WORLD_SIZE": str(spec.procs_per_node),
            "GROUP_RANK": str(node),
            "GROUP_WORLD_SIZE": str(spec.nodes),
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(spec.world_size),
            "GLOO_SOCKET_IFNAME": self.ifname(),
            "FSMOE_CLUSTER": self.describe(),
        }

    def describe(self) -> str:
        return self.spec.describe() if self.shaped else f"{self.spec.describe()} [NOT shaped: loopback]"

    def launch(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
        log_dir: str | Path | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Run ``argv`` as every rank; return 0 when all exit 0, else the first failure's exit status.

        ``env`` is added to this process's environment (the rank variables win). ``log_dir``: write
        rank r's stdout and stderr to ``log_dir/rank{r}.log`` instead of this process's. When a rank
        exits non-zero, or ``timeout`` seconds pass (status 124), the others are stopped (SIGTERM,
        then SIGKILL) and a line on stderr says which rank failed."""
        return self._launch(argv, env, timeout=timeout, log_dir=log_dir, cwd=cwd).code

    def _launch(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        *,
        timeout: float | None,
        log_dir: str | Path | None,
        cwd: str | Path | None,
        quiet: bool = False,
    ) -> LaunchOutcome:
        if not argv:
            raise ValueError("launch needs a command")
        base = {**os.environ, **(env or {})}
        base.setdefault("OMP_NUM_THREADS", "1")
        start = time.monotonic()
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            for rank in range(self.spec.world_size):
                out: Any = None
                if log_dir is not None:
                    out = open(Path(log_dir) / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
                    logs.append(out)
                procs.append(
                    subprocess.Popen(
                        self.rank_command(rank, argv),
                        env={**base, **self.rank_env(rank)},
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT if out is not None else None,
                        start_new_session=True,  # own process group: killed as a unit; no terminal Ctrl-C
                        preexec_fn=_die_with_parent(os.getpid()),
                    )
                )
            outcome = self._watch(procs, start, timeout)
        finally:
            _stop(procs)
            for f in logs:
                f.close()
        if outcome.code != 0 and not quiet:
            print(f"[fsmoe.cluster] {self._explain(outcome)}", file=sys.stderr, flush=True)
        return outcome

    def _watch(self, procs: Sequence[subprocess.Popen[bytes]], start: float, timeout: float | None) -> LaunchOutcome:
        deadline = None if timeout is None else start + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank = failed[0]
                code = _exit_status(codes[rank])  # type: ignore[arg-type]
                return LaunchOutcome(code=code, failed_rank=rank, seconds=time.monotonic() - start)
            if all(c == 0 for c in codes):
                return LaunchOutcome(code=0, seconds=time.monotonic() - start)
            if deadline is not None and time.monotonic() > deadline:
                return LaunchOutcome(code=TIMEOUT_EXIT_CODE, timed_out=True, seconds=time.monotonic() - start)
            time.sleep(_POLL_S)

    def _explain(self, outcome: LaunchOutcome) -> str:
        if outcome.timed_out:
            return f"ranks did not finish within {outcome.seconds:.1f} s; all ranks were stopped"
        rank = outcome.failed_rank
        assert rank is not None
        return (
            f"rank {rank} (node {self.spec.node_of(rank)}) exited with status {outcome.code} after "
            f"{outcome.seconds:.1f} s; the other ranks were stopped"
        )

    def run_function(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank inside a gloo process group
        (``init_process_group("gloo")`` from the rank environment); return the values in rank order.

        ``fn`` must be importable (module-level, or in the running ``__main__`` script); arguments and
        values must pickle. Raises :class:`RankFailed` with the first failing rank's traceback (or its
        last output when it died without one) and :class:`RanksTimedOut` after ``timeout`` seconds."""
        target = _target_of(fn)
        call = {
            "sys_path": list(sys.path),
            "target": target,
            "args": pickle.dumps((args, kwargs)),
            "timeout": float(timeout),
        }
        with tempfile.TemporaryDirectory(prefix="fsmoe-cluster-") as tmp:
            call_path = Path(tmp) / "call.pkl"
            call_path.write_bytes(pickle.dumps(call))
            env = {
                "FSMOE_CLUSTER_CALL": str(call_path),
                "FSMOE_CLUSTER_RESULTS": tmp,
                "PYTHONPATH": os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p),
            }
            argv = [sys.executable, "-m", "fsmoe.cluster.worker", target]
            outcome = self._launch(argv, env, timeout=timeout, log_dir=tmp, cwd=os.getcwd(), quiet=True)
            return self._collect(Path(tmp), outcome)

    def _collect(self, tmp: Path, outcome: LaunchOutcome) -> list[Any]:
        from fsmoe.cluster.worker import read_result

        results = [read_result(tmp, rank) for rank in range(self.spec.world_size)]
        if outcome.code == 0 and all(r is not None and r[0] for r in results):
            return [pickle.loads(r[1]) for r in results]  # type: ignore[index]
        if outcome.timed_out:
            missing = [rank for rank, r in enumerate(results) if r is None]
            tails = "\n".join(f"--- rank {r} ---\n{_log_tail(tmp, r)}" for r in missing)
            raise RanksTimedOut(
                f"ranks {missing} did not finish within {outcome.seconds:.1f} s; all ranks "
                f"were killed. Their last output:\n{tails}"
            )
        # The root cause is the rank whose error came first: once it dies, its peers fail too (connection
        # reset), and one of them may even be reaped before it.
        raised = sorted((res[2], r) for r, res in enumerate(results) if res is not None and not res[0])
        if raised:
            rank = raised[0][1]
            raise RankFailed(rank, results[rank][1])  # type: ignore[index]
        first = outcome.failed_rank
        rank = first if first is not None else 0
        raise RankFailed(
            rank, f"exited with status {outcome.code}{_status_hint(outcome.code)} without a traceback; its last "
            f"output:\n{_log_tail(tmp, rank)}"
        )


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the process group of each rank still running, then SIGKILL what is left; reap all."""
    live = [p for p in procs if p.poll() is None]
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, _STOP_GRACE_S)):
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        live = [p for p in live if p.poll() is None]
        if not live:
            return


def _target_of(fn: Callable[..., Any]) -> str:
    """``module:qualname``, or ``/path/script.py:qualname`` for a function of the running script."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise TypeError(f"run_function needs an importable module-level function, got {fn!r}")
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if path is None:
            raise TypeError(f"{fn!r} lives in an interactive __main__; move it into a module")
        return f"{os.path.abspath(path)}:{qualname}"
    return f"{module}:{qualname}"


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


def _log_tail(tmp: Path, rank: int) -> str:
    try:
        text = (tmp / f"rank{rank}.log").read_text(errors="replace")
    except OSError:
        return "(no output)"
    return text[-_LOG_TAIL_CHARS:] or "(no output)"


class EmulatedCluster(_Launcher):
    """A context manager that builds the namespaces of ``spec`` on enter and removes them on exit.

    ``__enter__`` first removes leftovers of dead runs (:func:`cleanup_stale`), then builds the
    cluster; if a command fails it removes everything created so far and raises
    :class:`ClusterUnavailable` when this machine cannot build namespaces at all (the reason from
    :func:`check_privileges`; use :func:`open_cluster` for the unshaped fallback), else the
    :class:`ClusterSetupError`. ``master_port`` is free by construction: nothing
    else runs in our namespaces."""

    shaped = True

    def __init__(self, spec: EmulatedClusterSpec, *, master_port: int = DEFAULT_MASTER_PORT) -> None:
        super().__init__(spec)
        self.shaped = spec.shaped
        self._port = master_port
        self._topology: Topology | None = None
        self._closing = False
        self._old_handlers: dict[int, Any] = {}

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise RuntimeError("the cluster is not running: use it inside `with EmulatedCluster(spec) as c:`")
        return self._topology

    def node_namespace(self, node: int) -> str:
        return self.topology.nodes[node]

    def address(self, node: int) -> str:
        return self.topology.addresses[node]

    def master_addr(self) -> str:
        return self.address(0)

    def master_port(self) -> int:
        return self._port

    def ifname(self) -> str:
        return self.topology.ifname

    def rank_command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node_namespace(self.spec.node_of(rank)), *argv]

    def __enter__(self) -> EmulatedCluster:
        if self._topology is not None:
            raise RuntimeError("this EmulatedCluster is already running")
        cleanup_stale()
        self._closing = False
        self._topology = plan_topology(self.spec.nodes)
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            create_topology(self._topology, self.spec.tbf())
        except ClusterSetupError as err:
            self.close()
            reason = check_privileges()  # only now: the probe costs a namespace of its own
            if reason is not None:
                raise ClusterUnavailable(_unavailable_message(self.spec, reason)) from err
            raise
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process left in our namespaces and delete them; idempotent."""
        if self._topology is None or self._closing:
            return
        self._closing = True
        topo = self._topology
        # A second Ctrl-C must not cut the removal short (it takes well under a second).
        old_sigint = self._ignore_sigint()
        try:
            errors = destroy_namespaces(topo.namespaces)
            left = [ns for ns in list_namespaces(topo.tag + "-")]
            if left:
                errors += destroy_namespaces(left)
            if errors:
                raise ClusterSetupError("could not remove the emulated cluster:\n" + "\n".join(errors))
        finally:
            self._topology = None
            atexit.unregister(self.close)
            self._restore_signal_handlers()
            if old_sigint is not None:
                signal.signal(signal.SIGINT, old_sigint)

    @staticmethod
    def _ignore_sigint() -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals are delivered to the main thread; atexit still cleans up there

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if not self._closing:  # unwind the `with` block, so __exit__ removes the namespaces
                raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()


class LocalCluster(_Launcher):
    """The unshaped fallback: the same ranks and environment, all on this namespace's loopback.

    Intra- and inter-node traffic then run at the same (loopback) speed, so measurements of overlap
    mean little; :func:`open_cluster` warns when it returns one."""

    shaped = False

    def __init__(self, spec: EmulatedClusterSpec, *, master_port: int | None = None) -> None:
        super().__init__(spec)
        self._port = master_port

    def master_addr(self) -> str:
        return "127.0.0.1"

    def master_port(self) -> int:
        if self._port is None:
            self._port = _free_port()
        return self._port

    def ifname(self) -> str:
        return "lo"

    def rank_command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_hint(code: int) -> str:
    """What an exit status usually means when a rank died without a Python traceback."""
    return {134: " (SIGABRT: a C++ abort)", 137: " (SIGKILL: often the kernel's out-of-memory killer)",
            139: " (SIGSEGV)"}.get(code, "")


def _unavailable_message(spec: EmulatedClusterSpec, reason: str) -> str:
    return (
        f"cannot emulate {spec.describe()}: {reason}. Run as root (network namespaces need "
        f"CAP_SYS_ADMIN and CAP_NET_ADMIN), or run unshaped on loopback, where inter-node traffic is as "
        f"fast as intra-node traffic and FSMoE's overlap has nothing to hide"
    )


def launch_on_cluster(
    spec: EmulatedClusterSpec,
    argv: Sequence[str],
    *,
    allow_unshaped: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    log_dir: str | Path | None = None,
) -> int:
    """:func:`open_cluster` + :meth:`~_Launcher.launch` + removal: what ``fsmoe train --emulate-nodes``
    needs. Prints one line naming the cluster on stderr; returns the launch's exit status; raises
    :class:`ClusterUnavailable` (unless ``allow_unshaped``) with a message to show the user."""
    with open_cluster(spec, allow_unshaped=allow_unshaped) as cluster:
        print(f"[fsmoe.cluster] {cluster.describe()}", file=sys.stderr, flush=True)
        return cluster.launch(argv, env, timeout=timeout, log_dir=log_dir)


def open_cluster(spec: EmulatedClusterSpec, *, allow_unshaped: bool = False) -> EmulatedCluster | LocalCluster:
    """An :class:`EmulatedCluster` for ``spec`` (not yet entered), or where this machine cannot build
    one: raise :class:`ClusterUnavailable` saying why, or with ``allow_unshaped`` warn and return a
    :class:`LocalCluster`. Use the result as a context manager."""
    reason = check_privileges()
    if reason is None:
        return EmulatedCluster(spec)
    message = _unavailable_message(spec, reason)
    if not allow_unshaped:
        raise ClusterUnavailable(message)
    warnings.warn(f"{message}; running UNSHAPED on loopback as asked", RuntimeWarning, stacklevel=2)
    return LocalCluster(spec)
