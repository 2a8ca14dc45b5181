"""The gates benchmark script runs end to end on tiny sizes and writes the documented JSON; DeepSpeed
is optional (its comparison is checked only when it is importable). Also the single-process timing,
table and JSON helpers it shares with the other scripts."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fsmoe.bench import gates
from fsmoe.bench.harness import TimingPolicy, not_run, time_fn
from fsmoe.bench.report import Table, write_json

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

script = importlib.import_module("benchmarks.gates")

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
TINY = ["--quick", "--tokens", "64", "--experts", "4", "--top-k", "1", "2", "--d-model", "16"]
TINY += ["--reps", "2", "--budget-s", "0.01"]


def _run(tmp_path: Path, *extra: str) -> dict:
    script.main([*TINY, "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / "gates.json").read_text())


def test_quick_run_writes_every_gate_and_order(tmp_path: Path) -> None:
    data = _run(tmp_path)
    assert data["benchmark"] == "gates"
    assert data["env"]["threads"] == 1 and data["config"]["d_model"] == 16
    assert data["config"]["top_k"] == [1, 2] and data["config"]["reps"] == 2  # flags over --quick
    rows = data["results"]
    cases = {(r["gate"], r["order"], r["k"]) for r in rows}
    expected = {(g, o, k) for g in gates.GATE_NAMES for o in ("einsum", "index") for k in (1, 2)}
    assert cases == expected - {("switch", "einsum", 2), ("switch", "index", 2)}
    for r in rows:
        assert (r["T"], r["E"]) == (64, 4) and r["C"] >= 1
        assert r["skipped"] is None and r["reps"] >= 1 and r["median_ms"] > 0
        assert len(r["samples_ms"]) == r["reps"]

    ds = data["deepspeed"]
    assert ds["available"] is HAS_DEEPSPEED
    if not HAS_DEEPSPEED:
        assert "deepspeed" in ds["note"] and ds["results"] == [] and data["targets"] is None
        return
    assert [(r["k"], r["C"]) for r in ds["results"]] == [(1, 20), (2, 40)]
    for r in ds["results"]:
        assert r["check_passed"], r["check_detail"]
        for key in ("ours_gate", "ds_gate", "ours_index", "ours_einsum", "ds_einsum", "ds_sparse"):
            assert r[key]["median_ms"] > 0
        for name in gates.RATIOS:
            assert r[name] > 0
    assert set(data["targets"]) >= {"target_met", "never_slower_met", "like_for_like_slower"}


def test_runs_without_deepspeed(tmp_path: Path) -> None:
    data = _run(tmp_path, "--no-deepspeed", "--gates", "gshard", "--orders", "index")
    assert data["deepspeed"]["available"] is False and data["deepspeed"]["results"] == []
    assert [(r["gate"], r["order"], r["k"]) for r in data["results"]] == [
        ("gshard", "index", 1),
        ("gshard", "index", 2),
    ]


def test_flags_are_the_config_fields(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = script.config_from_argv(["--top-k", "2", "--experts", "8", "16", "--capacity-factor", "1.5"])
    assert cfg == gates.GateBenchConfig(top_k=(2,), experts=(8, 16), capacity_factor=1.5)
    assert script.config_from_argv(["--quick"]) == gates.quick_gates_config()
    with pytest.raises(SystemExit):
        script.config_from_argv(["--gates", "gshard", "nope"])
    assert "unknown gate 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min_reps"):
        gates.GateBenchConfig(reps=1, min_reps=2)


def test_time_fn_reps_budget_and_skip() -> None:
    calls = []
    t = time_fn(lambda: calls.append(1), TimingPolicy(warmup=2, reps=4))
    assert t.ok and len(t.samples_ms) == 4 and len(calls) == 6 and t.median_ms >= 0
    slow = time_fn(lambda: None, TimingPolicy(warmup=0, reps=3, skip_above_s=-1.0))
    assert not slow.ok and "took" in slow.skipped and math.isnan(slow.median_ms)
    assert slow.to_dict()["median_ms"] is None


def test_table_and_json_helpers(tmp_path: Path) -> None:
    table = Table(["name", "ms"])
    table.add(["a", 1.5])
    table.add(["bb", not_run("too big")])
    lines = str(table).splitlines()
    assert lines[0].split() == ["name", "ms"] and lines[2].endswith("1.5") and lines[3].endswith("skipped")
    with pytest.raises(ValueError, match="header has 2"):
        table.add(["only one"])
    path = write_json(tmp_path / "sub" / "x.json", {"t": not_run("x"), "r": math.nan})
    assert json.loads(path.read_text()) == {"t": {**not_run("x").to_dict()}, "r": None}
