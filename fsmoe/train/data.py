"""Byte-level training data that needs no download, and a seeded random batch sampler.

Legend: N bytes in a split, B batch, L sequence length.

The default corpus is the Python standard library's own source on this machine: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]`` (test suites and installed packages skipped), in sorted path order,
concatenated and cut at ``max_bytes``. It is deterministic for a given Python installation, is real text
with structure a small model can learn in minutes, and is on every machine that runs fsmoe. A user file
(``DataConfig.path``) replaces it; its bytes are used as they are. The last ``val_fraction`` of the bytes
(at least one sequence's worth) is the validation split, the rest is the training split.
"""

from __future__ import annotations

import math
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fsmoe.config import DataConfig

# Directories whose .py files are not "the standard library's own source": installed third-party
# packages, the (large and repetitive) test suites and their data, and bytecode caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """The data cannot be used: a missing, empty or too-short file (the message names the numbers)."""


@dataclass(frozen=True)
class Corpus:
    """The two splits as uint8 tensors, and a human-readable note of where they came from."""

    train_N: Tensor
    val_N: Tensor
    source: str


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """All ``.py`` files under the standard library ``root`` (default: this interpreter's), outside
    :data:`SKIP_DIRS`, sorted by their path relative to ``root`` so the order is the same on every run."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int, root: str | Path | None = None) -> bytes:
    """The first ``max_bytes`` of the sorted standard-library sources, files joined by a newline.
    Files are read only until the budget is filled, so a small budget is fast."""
    parts: list[bytes] = []
    size = 0
    for path in stdlib_source_files(root):
        if size >= max_bytes:
            break
        chunk = path.read_bytes() + b"\n"
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:max_bytes]


def split_bytes(data: bytes, val_fraction: float, seq_len: int, source: str) -> Corpus:
    """Cut ``data`` into train (head) and validation (tail) splits; each must hold one sequence of
    ``seq_len`` inputs plus its shifted targets, i.e. ``seq_len + 1`` bytes."""
    n = len(data)
    if n == 0:
        raise DataError(f"{source} is empty; need at least {2 * (seq_len + 1)} bytes for seq_len={seq_len}")
    n_val = max(math.ceil(n * val_fraction), seq_len + 1)
    if n - n_val < seq_len + 1:
        raise DataError(
            f"{source} has {n} bytes, too short for seq_len={seq_len}: the train and validation splits "
            f"each need at least seq_len + 1 = {seq_len + 1} bytes, so at least {2 * (seq_len + 1)} "
            f"bytes in all (more with val_fraction={val_fraction})"
        )
    data_N = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Corpus(train_N=data_N[: n - n_val].clone(), val_N=data_N[n - n_val :].clone(), source=source)


TEXT_SNIFF_BYTES = 65536
_TEXT_BYTES = frozenset(range(32, 127)) | {9, 10, 12, 13}


def check_data(cfg: DataConfig, seq_len: int) -> None:
    """The checks that can be made before any rank starts, once: a ``path`` that is a readable file long
    enough for two sequences (:class:`DataError` naming the file and the numbers), and a warning when its
    first 64 KiB do not look like text (any bytes are trained on as they are, so a binary file would
    train silently on noise)."""
    if cfg.path is None:
        return
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size < 2 * (seq_len + 1):
        raise DataError(f"data file {str(path)!r} has {size} bytes, too short for seq_len={seq_len}: the train and "
                        f"validation splits need at least {2 * (seq_len + 1)} bytes in all")
    try:
        with path.open("rb") as f:
            head = f.read(TEXT_SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        head.decode("utf-8")
        odd = sum(b not in _TEXT_BYTES and b < 128 for b in head)
    except UnicodeDecodeError as e:
        odd = len(head) if e.start < len(head) - 4 else 0  # a cut multi-byte character at the end is fine
    if head and odd / len(head) > 0.05:
        warnings.warn(f"data file {str(path)!r} does not look like text ({odd / len(head):.0%} of its first "
                      f"{len(head):,} bytes are control bytes or not UTF-8); fsmoe trains on its bytes as they are",
                      UserWarning, stacklevel=2)


def load_corpus(cfg: DataConfig, seq_len: int) -> Corpus:
    """Read the configured bytes and split them (see the module docstring)."""
    if cfg.path is None:
        data = stdlib_corpus(cfg.max_bytes)
        source = f"Python stdlib sources ({sysconfig.get_paths()['stdlib']}, first {len(data):,} bytes)"
    else:
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist or is not a file")
        data = path.read_bytes()
        source = f"data file {str(path)!r}"
    return split_bytes(data, cfg.val_fraction, seq_len, source)


class BatchSampler:
    """Random windows of a byte split: ``sample() -> (x_BL, y_BL)`` long tensors, y shifted by one.

    The sampler owns its ``torch.Generator``, so the batch sequence depends only on ``seed`` (not on
    the global RNG that dropout or noisy gates also draw from).
    """

    def __init__(self, data_N: Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if data_N.numel() < seq_len + 1:
            raise ValueError(
                f"a split of {data_N.numel()} bytes is too short for seq_len={seq_len} "
                f"(needs seq_len + 1 = {seq_len + 1})"
            )
        self.data_N = data_N
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets_L1 = torch.arange(seq_len + 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Where the batch sequence stands (the generator's state): a checkpoint resumes it exactly."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def sample(self) -> tuple[Tensor, Tensor]:
        num_starts = self.data_N.numel() - self.seq_len  # windows of L + 1 bytes
        start_B = torch.randint(num_starts, (self.batch_size,), generator=self.generator)
        window_BL1 = self.data_N[start_B[:, None] + self._offsets_L1].long()
        return window_BL1[:, :-1], window_BL1[:, 1:]
