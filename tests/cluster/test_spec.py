"""Pure parts of fsmoe.cluster: rates, the spec, names and addresses, rank environments, the worker's
target resolution, and the unshaped fallback's decision. None of this needs root."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

from fsmoe.cluster import (
    ClusterUnavailable,
    EmulatedCluster,
    EmulatedClusterSpec,
    LocalCluster,
    format_rate,
    open_cluster,
    parse_rate,
)
from fsmoe.cluster import launcher as launcher_mod
from fsmoe.cluster.netns import plan_topology
from fsmoe.cluster.ranks import exit_status, resolve, target_of


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("1gbit", 10**9),
        ("200mbit", 200 * 10**6),
        ("1.5gbit", 1_500_000_000),
        ("500kbit", 500_000),
        ("64000", 64_000),
        (" 10 Mbit ", 10**7),
        ("2tbit", 2 * 10**12),
    ],
)
def test_parse_rate_reads_tc_bit_units(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["unshaped", "none", "OFF"])
def test_parse_rate_unshaped_words(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("text", ["fast", "1gb", "", "-5mbit", "1e9"])
def test_parse_rate_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="gbit"):
        parse_rate(text)


def test_parse_rate_refuses_tc_bytes_units_with_a_hint() -> None:
    with pytest.raises(ValueError, match="bytes/s"):
        parse_rate("100mbps")


def test_parse_rate_refuses_absurdly_slow_links() -> None:
    with pytest.raises(ValueError, match="below"):
        parse_rate("1kbit")


@pytest.mark.parametrize("text", ["1gbit", "200mbit", "1.5gbit", "500kbit", "unshaped"])
def test_format_rate_round_trips(text: str) -> None:
    assert format_rate(parse_rate(text)) == text


def test_spec_derives_world_nodes_and_tbf() -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=3, link="1gbit")
    assert spec.world_size == 6 and spec.shaped
    assert [spec.node_of(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    tbf = spec.tbf()
    assert tbf is not None and tbf.rate_bits == 10**9 and tbf.latency_ms == 50.0
    assert tbf.burst_bytes == 125_000  # 1 ms of 1 Gbit/s
    assert tbf.tc_args() == ["tbf", "rate", "1000000000bit", "burst", "125000", "latency", "50ms"]


def test_spec_burst_floor_and_override() -> None:
    slow = EmulatedClusterSpec(nodes=2, procs_per_node=1, link="100mbit").tbf()
    assert slow is not None and slow.burst_bytes == 64 * 1024
    fixed = EmulatedClusterSpec(nodes=2, procs_per_node=1, link="100mbit", burst_bytes=9000).tbf()
    assert fixed is not None and fixed.burst_bytes == 9000
    assert EmulatedClusterSpec(nodes=2, procs_per_node=1, link="unshaped").tbf() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, "nodes=0"),
        ({"nodes": 251}, "nodes=251"),
        ({"procs_per_node": 0}, "procs_per_node=0"),
        ({"latency_ms": 0}, "latency_ms=0"),
        ({"burst_bytes": 100}, "burst_bytes=100"),
        ({"link": "x"}, "link rate"),
    ],
)
def test_spec_validation_names_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmulatedClusterSpec(**{"nodes": 2, "procs_per_node": 2, **kwargs})


def test_spec_node_of_rejects_out_of_range_ranks() -> None:
    with pytest.raises(ValueError, match="rank 4"):
        EmulatedClusterSpec(nodes=2, procs_per_node=2).node_of(4)


def test_plan_topology_names_are_unique_per_cluster_and_carry_the_pid() -> None:
    a, b = plan_topology(3, pid=1234, seq=7), plan_topology(3, pid=1234, seq=8)
    assert a.tag == "fsmoe-1234-7" and a.hub == "fsmoe-1234-7-hub"
    assert a.nodes == ("fsmoe-1234-7-n0", "fsmoe-1234-7-n1", "fsmoe-1234-7-n2")
    assert a.addresses == ("10.77.7.1", "10.77.7.2", "10.77.7.3")
    assert a.namespaces[0] == a.hub and set(a.namespaces).isdisjoint(b.namespaces)
    assert plan_topology(1, pid=1, seq=300).addresses == ("10.77.44.1",)


def test_local_cluster_env_is_torchrun_compatible() -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    with LocalCluster(spec, master_port=12345) as cluster:
        env = cluster.rank_env(3)
        assert cluster.rank_command(3, ["python", "x.py"]) == ["python", "x.py"]
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "4"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "1" and env["GROUP_WORLD_SIZE"] == "2"
    assert env["ROLE_RANK"] == "3" and env["ROLE_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "12345"
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and "NOT shaped" in env["FSMOE_CLUSTER"]


def test_emulated_cluster_refuses_use_outside_with() -> None:
    cluster = EmulatedCluster(EmulatedClusterSpec(nodes=2, procs_per_node=1))
    with pytest.raises(RuntimeError, match="not running"):
        cluster.rank_env(0)


def test_exit_status_maps_signals_like_a_shell() -> None:
    assert exit_status(0) == 0 and exit_status(3) == 3 and exit_status(-9) == 137


def _module_level(rank: int, world_size: int) -> int:
    return rank


def test_worker_targets_resolve_to_the_function() -> None:
    target = target_of(_module_level)
    assert target == f"{__name__}:_module_level"
    assert resolve(target) is _module_level
    with pytest.raises(TypeError, match="importable"):
        target_of(lambda r, w: r)
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        resolve("no_colon")


def test_worker_loads_a_script_without_running_its_main_block(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("def f(rank, world_size):\n    return 7\nif __name__ == '__main__':\n    raise SystemExit(9)\n")
    saved = sys.modules.get("__main__")
    try:
        assert resolve(f"{script}:f")(0, 1) == 7
    finally:
        sys.modules["__main__"] = saved  # type: ignore[assignment]


def test_open_cluster_refuses_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_mod, "check_privileges", lambda: "cannot create network namespaces (not root)")
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="1gbit")
    with pytest.raises(ClusterUnavailable, match=r"not root.*unshaped"):
        open_cluster(spec)
    with pytest.warns(RuntimeWarning, match="UNSHAPED"):
        cluster = open_cluster(spec, allow_unshaped=True)
    assert isinstance(cluster, LocalCluster) and not cluster.shaped


def test_open_cluster_builds_an_emulated_cluster_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_mod, "check_privileges", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cluster = open_cluster(EmulatedClusterSpec(nodes=2, procs_per_node=2), allow_unshaped=True)
    assert isinstance(cluster, EmulatedCluster) and cluster.shaped


def test_local_cluster_launch_runs_every_rank_and_reports_the_failure(tmp_path: Path) -> None:
    spec = EmulatedClusterSpec(nodes=2, procs_per_node=2, link="unshaped")
    code = "import os, sys; open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(os.environ['LOCAL_RANK'])"
    with LocalCluster(spec) as cluster:
        assert cluster.launch([sys.executable, "-c", code, str(tmp_path)], timeout=30) == 0
        failing = "import os, sys, time; sys.exit(5) if os.environ['RANK'] == '2' else time.sleep(30)"
        assert cluster.launch([sys.executable, "-c", failing], env={"X": "1"}, timeout=30) == 5
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2", "3"]
    assert [(tmp_path / r).read_text() for r in "0123"] == ["0", "1", "0", "1"]
