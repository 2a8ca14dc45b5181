"""benchmarks/cluster_links.py runs end to end on one tiny cluster and writes the documented JSON."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from fsmoe.cluster import check_privileges, list_namespaces

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_REASON = check_privileges()


@pytest.mark.skipif(_REASON is not None, reason=f"no emulated cluster here: {_REASON}")
def test_quick_run_writes_links_and_overlap(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.cluster_links")
    out = tmp_path / "links.json"
    argv = ["--links", "1gbit", "--layouts", "2x1", "--sizes", "64k", "--overlap-bytes", "64k"]
    bench.main([*argv, "--reps", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "cluster_links" and data["config"]["sizes"] == [65536]
    (res,) = data["results"]
    assert res["rate_bits_per_s"] == 10**9 and res["tbf"]["latency_ms"] == 50.0
    assert (res["nodes"], res["procs_per_node"]) == (2, 1)
    (link,) = res["links"]
    assert link["nbytes"] == 65536 and link["inter_s"] > 0 and link["uplink_bits_per_s"] > 0
    assert set(res["overlap"]) >= {"matmul_s", "a2a_s", "both_s", "overlap_ratio", "matmul_n"}
    assert not [ns for ns in list_namespaces() if ns.startswith(f"fsmoe-{os.getpid()}-")]
