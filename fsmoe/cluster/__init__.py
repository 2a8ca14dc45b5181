"""Ranks on one Linux machine: the one rank harness, and an emulated multi-node cluster to run them on
(one network namespace per node, a bridge between them, and each node's uplink and downlink shaped by
``tc tbf``, so inter-node traffic is really slower than intra-node (loopback) traffic and overlap can
be measured).

* :func:`run_distributed`, :func:`report_progress`, :class:`RankFailed`, :class:`RanksTimedOut` — run a
  function on N forked loopback ranks and get their values, or the first failing rank's traceback;
  timeouts, progress and reaping for every start method (:mod:`~fsmoe.cluster.ranks`).
* :class:`EmulatedClusterSpec`, :func:`parse_rate` — what to build (pure; :mod:`~fsmoe.cluster.spec`).
* :class:`EmulatedCluster` — context manager: builds the namespaces, ``launch(argv)`` runs a command as
  every rank with torchrun's variables, ``run_function(fn, *args)`` runs a function on every rank;
  removes everything on exit, Ctrl-C, SIGTERM and rank failure (:mod:`~fsmoe.cluster.launcher`).
* :func:`launch_on_cluster` — ``open_cluster`` + ``launch`` in one call (what the CLI needs).
* :func:`open_cluster` — the same, or an unshaped :class:`LocalCluster` with a warning where this machine
  cannot build namespaces; :func:`check_privileges` says why not; :func:`cleanup_stale` removes what
  dead runs left, :func:`cleanup_command` does it for ``fsmoe cluster cleanup`` (:mod:`~fsmoe.cluster.netns`).
* :class:`Watchdog` — what a launch polls to stop hung ranks (:mod:`~fsmoe.cluster.ranks`).
"""

from fsmoe.cluster.launcher import (
    ClusterUnavailable,
    EmulatedCluster,
    LocalCluster,
    launch_on_cluster,
    open_cluster,
    run_distributed,
)
from fsmoe.cluster.netns import (
    ClusterSetupError,
    Topology,
    check_privileges,
    cleanup_command,
    cleanup_stale,
    list_namespaces,
)
from fsmoe.cluster.ranks import LaunchOutcome, RankFailed, RanksTimedOut, Watchdog, report_progress
from fsmoe.cluster.spec import EmulatedClusterSpec, TbfParams, format_rate, parse_rate

__all__ = [
    "ClusterSetupError",
    "ClusterUnavailable",
    "EmulatedCluster",
    "EmulatedClusterSpec",
    "LaunchOutcome",
    "LocalCluster",
    "RankFailed",
    "RanksTimedOut",
    "TbfParams",
    "Topology",
    "Watchdog",
    "check_privileges",
    "cleanup_command",
    "cleanup_stale",
    "format_rate",
    "launch_on_cluster",
    "list_namespaces",
    "open_cluster",
    "parse_rate",
    "report_progress",
    "run_distributed",
]
