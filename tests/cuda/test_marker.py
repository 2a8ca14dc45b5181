"""``pytest -m cuda`` (what ``make gpu-check`` runs) must select the CUDA tests: fails if the ``cuda`` marker
selects fewer than :data:`MIN_CUDA_TESTS` of them (a dropped marker, a renamed file). Runs on any machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MIN_CUDA_TESTS = 8
ROOT = Path(__file__).resolve().parents[2]


def test_the_cuda_marker_selects_the_cuda_tests() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/cuda"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    selected = [line for line in out.stdout.splitlines() if line.startswith("tests/cuda/")]
    assert len(selected) >= MIN_CUDA_TESTS, out.stdout
    assert not any("test_marker.py" in line for line in selected)
