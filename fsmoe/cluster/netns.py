"""Network namespaces, a bridge and tbf shapers for an emulated cluster (Linux, iproute2, root).

Topology of one cluster (every name and address lives inside namespaces this module creates; the
root namespace and its interfaces are never touched)::

    namespace <tag>-hub:   bridge br0 ── port n0 ── n1 ── ... (one port per node)
                                          │ veth    │ veth
    namespace <tag>-n0:    fsmoe0 10.77.X.1/24      │          lo (ranks of node 0 talk here)
    namespace <tag>-n1:                    fsmoe0 10.77.X.2/24 lo

``<tag>`` is ``fsmoe-<pid>-<seq>``: the creating process id (for :func:`cleanup_stale`) and a
per-process counter, so parallel runs never clash; X is ``seq % 256``. Each cluster has its own hub,
so two clusters' address ranges never meet. A rank binds its node's ``fsmoe0`` address
(``GLOO_SOCKET_IFNAME=fsmoe0``): a connection to a rank of the same node goes to a local address and
the kernel delivers it over that namespace's loopback (fast, unshaped); a connection to another node
leaves through ``fsmoe0``, whose egress is shaped (the uplink), crosses the bridge and leaves through
the receiver's hub port, whose egress is shaped too (the downlink).

IPv6 address generation is off on every interface we create (``addrgenmode none``), so there are no
link-local addresses for gloo to pick by mistake and no background IPv6 chatter on shaped links.

Removal: a namespace disappears only once no process is left inside it, so :func:`destroy_namespaces`
first kills the processes that ``ip netns pids`` finds *inside* each of our namespaces (which can
only be ranks we started there), then deletes the names; deleting the hub and the node namespaces
also destroys the veths and the bridge.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fsmoe.cluster.ranks import pid_alive
from fsmoe.cluster.spec import TbfParams

PREFIX = "fsmoe-"
NODE_IFNAME = "fsmoe0"
BRIDGE = "br0"
_NAME_RE = re.compile(r"^fsmoe-(?P<pid>\d+)-(?P<seq>\d+)-(?P<role>hub|probe|n\d+)$")
_SEQ = itertools.count()
_CMD_TIMEOUT_S = 20.0
_KILL_WAIT_S = 5.0


class ClusterSetupError(RuntimeError):
    """An ``ip`` or ``tc`` command failed; the message holds the command and its error output."""


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one emulated cluster (see the module doc)."""

    tag: str
    hub: str
    nodes: tuple[str, ...]  # the namespace of node n
    addresses: tuple[str, ...]  # the IPv4 address of node n (on NODE_IFNAME)
    prefix_len: int = 24
    ifname: str = NODE_IFNAME

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of this cluster, the hub first."""
        return (self.hub, *self.nodes)

    def hub_port(self, node: int) -> str:
        """The bridge-side end of node ``node``'s veth, inside the hub namespace."""
        return f"n{node}"


def plan_topology(nodes: int, *, pid: int | None = None, seq: int | None = None) -> Topology:
    """The names and addresses of a cluster of ``nodes`` nodes; pure (creates nothing)."""
    pid = os.getpid() if pid is None else pid
    seq = next(_SEQ) if seq is None else seq
    tag = f"{PREFIX}{pid}-{seq}"
    return Topology(
        tag=tag,
        hub=f"{tag}-hub",
        nodes=tuple(f"{tag}-n{n}" for n in range(nodes)),
        addresses=tuple(f"10.77.{seq % 256}.{n + 1}" for n in range(nodes)),
    )


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ClusterSetupError(f"`{' '.join(cmd)}` could not run: {err}") from err
    if check and proc.returncode != 0:
        raise ClusterSetupError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(ns: str | None, *args: str) -> None:
    _run(["ip", *(["-n", ns] if ns else []), *args])


def _tc(ns: str, *args: str) -> None:
    _run(["tc", "-n", ns, *args])


def create_topology(topo: Topology, tbf: TbfParams | None) -> None:
    """Create ``topo``'s namespaces, bridge, veths and (unless ``tbf`` is None) shapers.

    Raises :class:`ClusterSetupError` at the first failing command; whatever was created by then is
    left for :func:`destroy_namespaces` (the caller always calls it)."""
    for ns in topo.namespaces:
        _ip(None, "netns", "add", ns)
    hub = topo.hub
    _ip(hub, "link", "add", "name", BRIDGE, "type", "bridge")
    _ip(hub, "link", "set", "dev", BRIDGE, "addrgenmode", "none")
    _ip(hub, "link", "set", "dev", BRIDGE, "up")
    for node, (ns, addr) in enumerate(zip(topo.nodes, topo.addresses, strict=True)):
        port = topo.hub_port(node)
        _ip(hub, "link", "add", "name", port, "type", "veth", "peer", "name", topo.ifname, "netns", ns)
        _ip(hub, "link", "set", "dev", port, "addrgenmode", "none")
        _ip(hub, "link", "set", "dev", port, "master", BRIDGE, "up")
        _ip(ns, "link", "set", "dev", "lo", "up")
        _ip(ns, "link", "set", "dev", topo.ifname, "addrgenmode", "none")
        _ip(ns, "addr", "add", f"{addr}/{topo.prefix_len}", "dev", topo.ifname)
        _ip(ns, "link", "set", "dev", topo.ifname, "up")
        if tbf is not None:
            _tc(ns, "qdisc", "add", "dev", topo.ifname, "root", *tbf.tc_args())  # uplink
            _tc(hub, "qdisc", "add", "dev", port, "root", *tbf.tc_args())  # downlink


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces that start with ``prefix`` (``ip netns list``)."""
    proc = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(ns: str) -> list[int]:
    """Processes inside namespace ``ns`` (``ip netns pids``); empty when it does not exist."""
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def kill_namespace_processes(ns: str) -> list[int]:
    """SIGKILL every process inside our namespace ``ns`` and wait (bounded) until they are gone."""
    if _NAME_RE.match(ns) is None:
        raise ValueError(f"refusing to kill processes in {ns!r}: not a namespace fsmoe.cluster created")
    pids = [p for p in namespace_pids(ns) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _KILL_WAIT_S
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


def destroy_namespaces(names: Iterable[str]) -> list[str]:
    """Kill what runs inside each namespace and delete it; returns error messages (empty: all gone)."""
    errors: list[str] = []
    for ns in names:
        try:
            kill_namespace_processes(ns)
        except ClusterSetupError as err:
            errors.append(str(err))
        proc = _run(["ip", "netns", "del", ns], check=False)
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            errors.append(f"`ip netns del {ns}` failed: {proc.stderr.strip()}")
    return errors


def owner_pid(ns: str) -> int | None:
    """The pid of the process that created our namespace ``ns``; None for a name we did not make."""
    m = _NAME_RE.match(ns)
    return None if m is None else int(m.group("pid"))


def stale_namespaces(names: Iterable[str] | None = None) -> list[str]:
    """Those of ``names`` (default: every ``fsmoe-`` namespace) that fsmoe.cluster made for a run whose
    process is gone: no process ``pid`` runs, or the one that does started after the namespace was
    made (the pid was reused). A live run's namespaces are never stale."""
    names = list_namespaces() if names is None else names
    return [ns for ns in names if (pid := owner_pid(ns)) is not None and not _owner_running(ns, pid)]


def _owner_running(ns: str, pid: int) -> bool:
    if not pid_alive(pid):
        return False
    started, created = _process_started_at(pid), _namespace_created_at(ns)
    if started is None or created is None:
        return True  # cannot tell: leave it alone
    return started <= created + 1.0  # /proc/stat's boot time has whole seconds


def _process_started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _namespace_created_at(ns: str) -> float | None:
    """When namespace ``ns`` was made: the time of its ``/run/netns`` entry (the namespace's own inode)."""
    try:
        return os.stat(f"/run/netns/{ns}").st_mtime
    except OSError:
        return None


def cleanup_stale() -> list[str]:
    """Remove the namespaces of fsmoe.cluster runs whose process is gone (killed with SIGKILL, say;
    see :func:`stale_namespaces`), killing anything still running inside them. Returns the names it
    tried to remove; :func:`cleanup_command` also reports what could not be removed."""
    stale = stale_namespaces()
    destroy_namespaces(stale)
    return stale


def cleanup_command(echo: Callable[[str], None] = print) -> int:
    """``fsmoe cluster cleanup``: remove what emulated clusters of dead runs left behind (namespaces,
    their bridge and veths, processes still inside), leave running jobs' clusters alone, and say what
    was done in a few lines. Returns the exit status: 0, or 1 when something could not be removed."""
    if shutil.which("ip") is None:
        echo("fsmoe cluster cleanup: 'ip' (iproute2) is not installed, so no emulated cluster can exist here")
        return 0
    names = list_namespaces()
    stale = stale_namespaces(names)
    errors = destroy_namespaces(stale)
    left = sorted(set(stale) & set(list_namespaces()))
    removed = [ns for ns in stale if ns not in left]
    if removed:
        echo(
            f"fsmoe cluster cleanup: removed {len(removed)} namespace(s) of "
            f"{_describe_clusters(removed)} left by runs that are gone"
        )
    else:
        echo("fsmoe cluster cleanup: no emulated cluster of a finished run was left behind")
    live = [ns for ns in names if ns not in stale and owner_pid(ns) is not None]
    if live:
        echo(f"  left alone: {len(live)} namespace(s) of {_describe_clusters(live)} of running processes")
    for error in errors:
        echo(f"  error: {error}")
    if left:
        echo(f"  still there: {', '.join(left)} (run as root?)")
    return 1 if errors or left else 0


def _describe_clusters(names: Sequence[str]) -> str:
    tags = sorted({ns.rsplit("-", 1)[0] for ns in names})
    owners = sorted({pid for ns in names if (pid := owner_pid(ns)) is not None})
    return f"{len(tags)} cluster(s) ({', '.join(tags)}; pid {', '.join(map(str, owners))})"


def check_privileges() -> str | None:
    """Why an emulated cluster cannot be built here, or None when it can.

    Probes exactly what :func:`create_topology` uses, in a throw-away namespace: ``ip netns add``, a
    bridge, a veth pair and a tbf qdisc."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    who = "" if os.geteuid() == 0 else f" (running as uid {os.geteuid()}, not root)"
    probe = f"{plan_topology(1).tag}-probe"
    try:
        _ip(None, "netns", "add", probe)
    except ClusterSetupError as err:
        return f"cannot create network namespaces{who}: {err}"
    try:
        _ip(probe, "link", "add", "name", BRIDGE, "type", "bridge")
        _ip(probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name", "probe1")
        _tc(probe, "qdisc", "add", "dev", "probe0", "root", *TbfParams(10**9, 65536, 50.0).tc_args())
    except ClusterSetupError as err:
        return f"cannot build a bridge, veths and a tbf shaper{who}: {err}"
    finally:
        destroy_namespaces([probe])
    return None
