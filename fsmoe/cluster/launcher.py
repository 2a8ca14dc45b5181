"""Start a job's ranks on an emulated cluster (one shaped network namespace per node) or, as a
fallback, unshaped on loopback; wait for them; stop them all when one fails.

Both launchers give every rank the environment ``torchrun`` gives it, so a script that calls
``init_process_group()`` with the default ``env://`` runs the same under either:
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK`` (the node), ``GROUP_WORLD_SIZE``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``, plus
``GLOO_SOCKET_IFNAME`` (gloo must be told the namespace's interface) and ``OMP_NUM_THREADS=1``
unless the caller's ``env`` sets it. ``FSMOE_CLUSTER`` describes the cluster (for logs only).

Rendezvous: on the emulated cluster rank 0 hosts the ``TCPStore`` in node 0's namespace, on a port free
by construction (nothing else runs there). On loopback this process hosts it on a port the kernel
picks, for the duration of one launch, and the ranks join it as clients
(``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun), so concurrent jobs never race for a port.

Typical use (what ``fsmoe train --emulate-nodes 2 --link 1gbit`` does)::

    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    with open_cluster(spec, allow_unshaped=False) as cluster:   # ClusterUnavailable: say why
        code = cluster.launch([sys.executable, "-m", "fsmoe", "train", ...])

or in one call, ``launch_on_cluster(spec, argv, allow_unshaped=...)``,

and for tests and benchmarks, ``cluster.run_function(fn, *args)`` runs ``fn(rank, world_size, *args)``
on every rank and returns the per-rank values; ``run_distributed(fn, world_size, *args)`` does the same
on ``world_size`` ranks forked on loopback (fast). Both are the one rank harness of
:mod:`fsmoe.cluster.ranks` (errors, results, timeouts, progress, reaping).

Nothing leaks: ranks run in their own process groups and die with the launcher (``PR_SET_PDEATHSIG``);
``close()`` (run by ``__exit__``, by ``atexit``, and on SIGTERM/SIGHUP, which raise ``SystemExit``
inside the ``with``) kills whatever still runs in our namespaces and deletes them. Ctrl-C reaches only
the launcher (ranks are in their own sessions), which stops the ranks and cleans up. A launcher killed
with SIGKILL takes its ranks along but leaves its (empty) namespaces behind; the next cluster's
``__enter__`` removes them (:func:`cleanup_stale`), and so does ``fsmoe cluster cleanup``
(:func:`~fsmoe.cluster.netns.cleanup_command`).

A hung rank: ``launch(..., watchdog=...)`` polls a :class:`~fsmoe.cluster.ranks.Watchdog` (for training,
:class:`fsmoe.train.distributed.HangWatch`, which reads the ranks' heartbeats) and stops every rank when
it says so; ``launch`` then prints ``fsmoe: <its message>`` and returns 124.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from fsmoe.cluster.ranks import (
    RANK_DIR_ENV,
    LaunchOutcome,
    RankDir,
    RankProcess,
    Watchdog,
    run_processes,
    start_forked,
    start_subprocess,
)
from fsmoe.cluster.spec import EmulatedClusterSpec

DEFAULT_MASTER_PORT = 29500  # free by construction inside our namespaces
START_METHODS = ("subprocess", "forkserver")

# Starts rank ``rank`` with environment ``env``.
_Starter = Callable[[int, dict[str, str]], RankProcess]


class ClusterUnavailable(RuntimeError):
    """This machine (or user) cannot build an emulated cluster; the message says why and what to do."""


class _Launcher:
    """What both launchers share: rank environments, and running commands or a function as every rank."""

    spec: EmulatedClusterSpec
    shaped: bool
    start_method: str = "subprocess"  # how run_function starts its ranks (launch always runs commands)

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

    @contextlib.contextmanager
    def _rendezvous(self) -> Iterator[tuple[int, dict[str, str]]]:
        """For one launch: the master port and what the ranks' environment needs besides it."""
        yield self.master_port(), {}

    # --- shared ------------------------------------------------------------------------------------
    def rank_env(self, rank: int, master_port: int | None = None) -> dict[str, str]:
        """The torchrun-compatible variables of rank ``rank`` (see the module doc)."""
        spec = self.spec
        node = spec.node_of(rank)
        return {
            "MASTER_ADDR": self.master_addr(),
            "MASTER_PORT": str(self.master_port() if master_port is None else master_port),
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
        watchdog: Watchdog | None = None,
    ) -> int:
        """Run ``argv`` as every rank; return 0 when all exit 0, else the first failure's exit status.

        ``env`` is added to this process's environment (the rank variables win). ``log_dir``: write
        rank r's stdout and stderr to ``log_dir/rank{r}.log`` instead of this process's. When a rank
        exits non-zero, ``timeout`` seconds pass (status 124), or ``watchdog`` (one per launch, e.g. a
        :class:`fsmoe.train.distributed.HangWatch`) sees a rank make no progress (status 124), the
        others are stopped (SIGTERM and SIGCONT, then SIGKILL) and stderr says which rank failed."""
        if not argv:
            raise ValueError("launch needs a command")
        logs = None if log_dir is None else RankDir(log_dir)

        def start(rank: int, rank_env: dict[str, str]) -> RankProcess:
            log = None if logs is None else logs.log_path(rank)
            return start_subprocess(self.rank_command(rank, argv), rank_env, cwd=cwd, log=log)

        outcome = self._run(start, env, timeout, watchdog)
        if outcome.stalled is not None:
            print(f"fsmoe: {outcome.stalled}", file=sys.stderr, flush=True)
        elif outcome.code != 0:
            print(f"[fsmoe.cluster] {self._explain(outcome)}", file=sys.stderr, flush=True)
        return outcome.code

    def run_function(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank inside a gloo process group
        (``init_process_group("gloo")`` from the rank environment); return the values in rank order.

        ``fn`` must be importable (module-level, or in the running ``__main__`` script); arguments and
        values must pickle. Raises :class:`~fsmoe.cluster.ranks.RankFailed` with the first failing
        rank's traceback (or its last output when it died without one) and
        :class:`~fsmoe.cluster.ranks.RanksTimedOut` after ``timeout`` seconds."""
        cwd = os.getcwd()
        with RankDir.for_call(fn, args, kwargs, timeout) as folder:
            env = {
                RANK_DIR_ENV: str(folder.path),
                "PYTHONPATH": os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p),
            }
            outcome = self._run(self._function_starter(folder, cwd), env, timeout)
            return folder.collect(outcome, self.spec.world_size, timeout)

    def _function_starter(self, folder: RankDir, cwd: str) -> _Starter:
        """How :meth:`run_function` starts a rank of the call in ``folder``: forked from the fork server,
        or as ``python -m fsmoe.cluster.worker`` behind :meth:`rank_command`."""
        if self.start_method == "forkserver":
            return lambda rank, env: start_forked(env, cwd=cwd, log=folder.log_path(rank))
        argv = [sys.executable, "-m", "fsmoe.cluster.worker"]
        return lambda rank, env: start_subprocess(
            self.rank_command(rank, argv), env, cwd=cwd, log=folder.log_path(rank)
        )

    def _run(
        self, start: _Starter, env: Mapping[str, str] | None, timeout: float | None, watchdog: Watchdog | None = None
    ) -> LaunchOutcome:
        base = {**os.environ, **(env or {})}
        base.setdefault("OMP_NUM_THREADS", "1")
        with self._rendezvous() as (port, rendezvous_env), _watching(watchdog) as watch_env:
            return run_processes(
                lambda rank: start(rank, {**base, **watch_env, **rendezvous_env, **self.rank_env(rank, port)}),
                self.spec.world_size,
                timeout,
                watchdog,
            )

    def _explain(self, outcome: LaunchOutcome) -> str:
        if outcome.timed_out:
            return f"ranks did not finish within {outcome.seconds:.1f} s; all ranks were stopped"
        rank = outcome.failed_rank
        assert rank is not None
        return (
            f"rank {rank} (node {self.spec.node_of(rank)}) exited with status {outcome.code} after "
            f"{outcome.seconds:.1f} s; the other ranks were stopped"
        )


@contextlib.contextmanager
def _watching(watchdog: Watchdog | None) -> Iterator[Mapping[str, str]]:
    """The watchdog's variables for the ranks, for one launch; closed once the ranks are stopped."""
    if watchdog is None:
        yield {}
        return
    try:
        yield watchdog.start()
    finally:
        watchdog.close()


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


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
        removed = cleanup_stale()
        if removed:
            print(
                f"[fsmoe.cluster] removed {len(removed)} namespace(s) left by runs that are gone: {', '.join(removed)}",
                file=sys.stderr,
                flush=True,
            )
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
    mean little; :func:`open_cluster` warns when it returns one. ``master_port``: None lets this
    process host the rendezvous on a free port per launch (see the module doc); a number makes rank 0
    host it there. ``start_method``: how :meth:`run_function` starts ranks, ``subprocess`` (as on the
    emulated cluster) or ``forkserver`` (fast; see :mod:`fsmoe.cluster.ranks`)."""

    shaped = False

    def __init__(
        self, spec: EmulatedClusterSpec, *, master_port: int | None = None, start_method: str = "subprocess"
    ) -> None:
        super().__init__(spec)
        if start_method not in START_METHODS:
            raise ValueError(f"unknown start_method {start_method!r}; choose one of {', '.join(START_METHODS)}")
        self._port = master_port
        self.start_method = start_method

    def master_addr(self) -> str:
        return "127.0.0.1"

    def master_port(self) -> int:
        if self._port is None:
            raise RuntimeError("this LocalCluster picks its master port per launch (master_port=None)")
        return self._port

    def ifname(self) -> str:
        return "lo"

    def rank_command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return list(argv)

    @contextlib.contextmanager
    def _rendezvous(self) -> Iterator[tuple[int, dict[str, str]]]:
        if self._port is not None:
            yield self._port, {}
            return
        import torch.distributed as dist

        store = dist.TCPStore(self.master_addr(), 0, is_master=True, wait_for_workers=False)
        yield store.port, {"TORCHELASTIC_USE_AGENT_STORE": "True"}

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks forked on loopback (one
    node); return the values in rank order. What tests and benchmarks use: the first call starts the
    fork server (~2 s), later calls start ranks in ~0.2 s. Raises as :meth:`LocalCluster.run_function`."""
    spec = EmulatedClusterSpec(nodes=1, procs_per_node=world_size, link="unshaped")
    return LocalCluster(spec, start_method="forkserver").run_function(fn, *args, timeout=timeout, **kwargs)


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
    watchdog: Watchdog | None = None,
) -> int:
    """:func:`open_cluster` + :meth:`~_Launcher.launch` + removal: what ``fsmoe train --launcher emulated``
    needs. Prints one line naming the cluster on stderr; returns the launch's exit status; raises
    :class:`ClusterUnavailable` (unless ``allow_unshaped``) with a message to show the user."""
    with open_cluster(spec, allow_unshaped=allow_unshaped) as cluster:
        print(f"[fsmoe.cluster] {cluster.describe()}", file=sys.stderr, flush=True)
        return cluster.launch(argv, env, timeout=timeout, log_dir=log_dir, watchdog=watchdog)


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
