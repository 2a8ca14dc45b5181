"""Peak memory of one call, per process: the CPU high-water mark, or CUDA's allocator peak.

CPU: the kernel keeps the resident-set high-water mark ``VmHWM`` in ``/proc/self/status``; writing
``5`` to ``/proc/self/clear_refs`` resets it to the current RSS. Freed heap memory that glibc keeps
for reuse is still resident and would hide new allocations, so before each measurement
:func:`release_free_memory` asks glibc to return it (``malloc_trim(0)``), and
:func:`track_allocations_in_rss` makes large blocks come from ``mmap`` (returned on free) instead of
the heap. Both are process-wide and only used in the memory pass, after the timed runs.

The numbers are what the process really held, allocator slack included; ``extra_bytes`` (peak minus
the resident size just before the call) is what the call added on top of the weights and buffers
every implementation shares.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter; setting it also turns off the dynamic threshold
_MMAP_THRESHOLD_BYTES = 64 * 1024


@dataclass(frozen=True)
class PeakMemory:
    """Bytes: the peak during the call, the resident size before it, and how peaks were read."""

    peak_bytes: int
    before_bytes: int
    method: str

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak_bytes - self.before_bytes)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def track_allocations_in_rss() -> bool:
    """Serve blocks of 64 KiB and more with ``mmap`` so that freeing them lowers the RSS (glibc only)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Return free heap memory to the kernel (glibc ``malloc_trim``), so the next peak counts it anew."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(m.group(1))


def cpu_peak_supported() -> bool:
    try:
        _status_kib("VmHWM")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except (OSError, RuntimeError):
        return False
    return True


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> PeakMemory:
    """Run ``fn()`` once and report its peak memory (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device), before, "torch.cuda.max_memory_allocated")
    release_free_memory()
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS") * 1024
    fn()
    return PeakMemory(_status_kib("VmHWM") * 1024, before, "VmHWM (/proc/self/status, reset via clear_refs)")
