"""The parts of ``scripts/gpu_check.py`` that need no GPU: flags, the dry run, running steps within a
budget (a failing or raising step fails, a spent budget fails the rest) and the report's verdict."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_prints_the_plan_and_an_empty_report(gpu_check: ModuleType, capsys) -> None:
    assert gpu_check.main(["--dry-run", "--only", "layer", "overlap"]) == 0
    out = capsys.readouterr().out
    assert "plan (expected seconds on one GPU): layer 30, overlap 15; total 45 of a 480 s budget" in out
    assert "[INFO] layer: not run (dry run)" in out and "[INFO] overlap: not run (dry run)" in out
    assert "multi-rank NCCL cannot run on one GPU" in out and "result: NOT RUN" in out
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "nope"])
    with pytest.raises(SystemExit, match="--budget-s must be > 0, got 0.0"):
        gpu_check.main(["--budget-s", "0"])


def test_steps_run_within_the_budget_and_decide_the_verdict(gpu_check: ModuleType) -> None:
    Result, Step = gpu_check.Result, gpu_check.Step

    def boom(device: torch.device, left: float) -> object:
        raise RuntimeError("CUDA error: out of memory\nmore")

    steps = [Step("a", 1, lambda d, left: Result("a", True, "fine")), Step("b", 1, boom),
             Step("c", 1, lambda d, left: Result("c", None, "info"))]
    results = gpu_check.run_steps(steps, torch.device("cpu"), 60, lambda s: None)
    assert [(r.name, r.ok) for r in results] == [("a", True), ("b", False), ("c", None)]
    assert results[1].detail == "RuntimeError: CUDA error: out of memory"
    report = gpu_check.format_report("a GPU", results, 12.3)
    assert report.splitlines()[1:4] == ["[PASS] a: fine", "[FAIL] b: RuntimeError: CUDA error: out of memory",
                                        "[INFO] c: info"]
    assert report.splitlines()[-1] == "result: FAIL (1 passed, 1 failed, 1 info/not run) in 12 s"
    late = gpu_check.run_steps(steps[:1], torch.device("cpu"), 4, lambda s: None)
    assert late[0].ok is False and "budget is spent" in late[0].detail
