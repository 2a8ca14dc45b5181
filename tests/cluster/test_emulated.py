"""The emulated cluster end to end (needs root: network namespaces, veths, a bridge, tc tbf).

2 nodes x 2 ranks on 200 Mbit/s links: an AlltoAll and a barrier work across namespaces; the
inter-node AlltoAll is much slower than the intra-node one and no faster than the link; a failing
rank stops the others at once; and no namespace or interface is left behind after a normal exit,
a rank failure, a timeout, SIGTERM, Ctrl-C, or SIGKILL of the launcher (its ranks die with it; its
namespaces go with cleanup_stale, `fsmoe cluster cleanup` or the next cluster's start).
Skipped, with the reason, where this machine cannot build namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fsmoe.cluster import (
    EmulatedCluster,
    EmulatedClusterSpec,
    RankFailed,
    check_privileges,
    cleanup_command,
    cleanup_stale,
    launch_on_cluster,
    list_namespaces,
)
from fsmoe.cluster.linkcheck import LinkTiming, measure_links
from fsmoe.cluster.netns import namespace_pids
from fsmoe.cluster.ranks import pid_alive
from tests.dist_utils import wait_for

REPO = Path(__file__).resolve().parents[2]
_REASON = check_privileges()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no emulated cluster here: {_REASON}")

SLOW = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="200mbit")
NBYTES = 1 << 20  # per rank: 1 MiB crosses each uplink per inter-node AlltoAll, ~42 ms at 200 Mbit/s


def _our_namespaces() -> list[str]:
    return list_namespaces(f"fsmoe-{os.getpid()}-")


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _alltoall_then_links(rank: int, world_size: int, procs_per_node: int) -> dict:
    x = torch.arange(2 * world_size, dtype=torch.float32) + 100 * rank
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    dist.barrier()
    env = {
        k: os.environ[k]
        for k in (
            "MASTER_ADDR",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "GLOO_SOCKET_IFNAME",
            "OMP_NUM_THREADS",
        )
    }
    timing = measure_links(rank, world_size, procs_per_node=procs_per_node, nbytes=NBYTES, reps=5)
    return {"out": out.tolist(), "netns": os.readlink("/proc/self/ns/net"), "env": env, "timing": timing}


def _fail_on_rank_2(rank: int, world_size: int) -> None:
    if rank == 2:
        raise ValueError("rank 2 gives up")
    dist.barrier()  # the others wait here until the launcher stops them


def test_alltoall_barrier_and_inter_node_is_slower() -> None:
    links_before = _root_links()
    with EmulatedCluster(SLOW) as cluster:
        topo = cluster.topology
        assert set(topo.namespaces) <= set(list_namespaces())
        results = cluster.run_function(_alltoall_then_links, SLOW.procs_per_node, timeout=90)
    # no namespace, bridge or veth is left, and nothing of ours appeared in the root namespace
    assert not [ns for ns in list_namespaces() if ns.startswith(topo.tag + "-")]
    assert not {"br0", "fsmoe0", "n0", "n1"} & (_root_links() - links_before)

    world = SLOW.world_size
    for rank, res in enumerate(results):
        expected = [100 * j + 2 * rank + i for j in range(world) for i in range(2)]
        assert res["out"] == expected
        assert res["env"]["MASTER_ADDR"] == topo.addresses[0] and res["env"]["GLOO_SOCKET_IFNAME"] == "fsmoe0"
        assert res["env"]["LOCAL_RANK"] == str(rank % 2) and res["env"]["GROUP_RANK"] == str(rank // 2)
        assert res["env"]["OMP_NUM_THREADS"] == "1"
    netns = [r["netns"] for r in results]
    assert netns[0] == netns[1] != netns[2] == netns[3]
    assert os.readlink("/proc/self/ns/net") not in netns

    timing: LinkTiming = results[0]["timing"]
    assert all(r["timing"] == timing for r in results)  # MAX-reduced: every rank agrees
    assert timing.ratio > 3, f"inter-node AlltoAll only {timing.ratio:.1f}x slower than intra-node: {timing}"
    rate = SLOW.rate_bits
    assert rate is not None and timing.uplink_bits_per_s < 1.3 * rate, f"the link is not shaped: {timing}"


def test_failing_rank_surfaces_its_traceback_and_stops_the_others() -> None:
    with EmulatedCluster(SLOW) as cluster:
        topo = cluster.topology
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match="rank 2 gives up") as err:
            cluster.run_function(_fail_on_rank_2, timeout=60)
        assert err.value.rank == 2 and time.monotonic() - t0 < 30
        assert not any(namespace_pids(ns) for ns in topo.nodes)
    assert not [ns for ns in list_namespaces() if ns.startswith(topo.tag + "-")]


def test_launch_returns_the_failing_status_quickly_and_cleans_up() -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    crash = "import os, sys, time; time.sleep(0.3); sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    with EmulatedCluster(spec) as cluster:
        topo = cluster.topology
        t0 = time.monotonic()
        assert cluster.launch([sys.executable, "-c", crash], timeout=50) == 3
        assert time.monotonic() - t0 < 10
        assert not any(namespace_pids(ns) for ns in topo.nodes)
        t0 = time.monotonic()
        assert cluster.launch([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1.0) == 124
        assert time.monotonic() - t0 < 10
    assert not [ns for ns in list_namespaces() if ns.startswith(topo.tag + "-")]


_CHILD = textwrap.dedent(
    """
    import signal, sys
    sys.path.insert(0, {repo!r})
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec
    with EmulatedCluster(EmulatedClusterSpec(nodes=2, procs_per_node=1, link="100mbit")) as cluster:
        print(cluster.topology.tag, flush=True)
        cluster.launch([sys.executable, "-c", "import time; time.sleep(60)"], timeout=50)
    """
)


def _start_child() -> tuple[subprocess.Popen[str], str, list[int]]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO))], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    tag = child.stdout.readline().strip()
    assert tag.startswith("fsmoe-"), f"child did not start a cluster (printed {tag!r})"
    nodes = [f"{tag}-n0", f"{tag}-n1"]
    wait_for(lambda: all(namespace_pids(ns) for ns in nodes), 10, "the ranks to start")
    return child, tag, [p for ns in nodes for p in namespace_pids(ns)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_launcher_removes_everything(sig: signal.Signals) -> None:
    child, tag, ranks = _start_child()
    child.send_signal(sig)
    child.wait(timeout=20)
    assert child.returncode != 0
    assert not list_namespaces(tag + "-")
    assert not any(pid_alive(p) for p in ranks)


@pytest.mark.parametrize("remover", ["cleanup_stale", "cleanup_command", "next_start"])
def test_sigkilled_launcher_kills_its_ranks_and_its_leftovers_are_removed(
    remover: str, capsys: pytest.CaptureFixture[str]
) -> None:
    child, tag, ranks = _start_child()
    t0 = time.monotonic()
    child.kill()
    child.wait(timeout=10)
    wait_for(lambda: not any(pid_alive(p) for p in ranks), 10, "the ranks to die with their launcher")
    assert time.monotonic() - t0 < 2.0
    leftovers = {f"{tag}-hub", f"{tag}-n0", f"{tag}-n1"}
    assert set(list_namespaces(tag + "-")) == leftovers  # nobody was left to delete them
    if remover == "cleanup_stale":
        assert leftovers <= set(cleanup_stale())
    elif remover == "cleanup_command":  # `fsmoe cluster cleanup`
        lines: list[str] = []
        assert cleanup_command(lines.append) == 0
        assert tag in lines[0] and f"pid {child.pid}" in lines[0]
    else:  # the next cluster started on this machine
        with EmulatedCluster(EmulatedClusterSpec(nodes=1, procs_per_node=1, link="unshaped")):
            pass
        assert f"{tag}-hub" in capsys.readouterr().err
    assert not list_namespaces(tag + "-")


def test_launch_on_cluster_runs_each_node_in_its_namespace(tmp_path: Path) -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    record = (
        "import os, sys; r = os.environ['RANK']; "
        "open(os.path.join(sys.argv[1], r), 'w').write(os.readlink('/proc/self/ns/net') + ' ' + "
        "os.environ['GLOO_SOCKET_IFNAME'] + ' ' + os.environ['FSMOE_CLUSTER'] + ' ' + os.environ['EXTRA'])"
    )
    code = launch_on_cluster(spec, [sys.executable, "-c", record, str(tmp_path)], env={"EXTRA": "x"}, timeout=30)
    assert code == 0
    lines = [(tmp_path / str(r)).read_text().split(" ", 2) for r in range(4)]
    assert lines[0][0] == lines[1][0] != lines[2][0] == lines[3][0] != os.readlink("/proc/self/ns/net")
    assert all(ifname == "fsmoe0" and rest.endswith("x") and "1gbit" in rest for _, ifname, rest in lines)
    assert _our_namespaces() == []


def test_nothing_of_this_test_process_is_left() -> None:
    assert _our_namespaces() == []
