"""Training data: the embedded byte corpus, a user's text file, or token files; and a seeded batch sampler.

Legend: N bytes or tokens in a split, B batch, L sequence length.

``DataConfig.path`` (``--data``) picks the source:

* none: the Python standard library's own source on this machine: every ``.py`` file under
  ``sysconfig.get_paths()["stdlib"]`` (test suites and installed packages skipped), in sorted path order,
  concatenated and cut at ``max_bytes``. It is deterministic for a given Python installation, is real text
  with structure a small model can learn in minutes, and is on every machine that runs fsmoe.
* a file not ending in ``.bin``: its bytes, used as they are (a vocabulary of 256).
* ``X.bin``: token ids, one after another (nanoGPT's format), split like the bytes.
* a directory holding ``train.bin`` and ``val.bin``: token ids; ``val.bin`` is the validation split.

Bytes and a single token file are split alike: the last ``val_fraction`` (at least one sequence's worth)
is the validation split, the rest the training split.

Token files. A ``.bin`` file is a flat array of little-endian unsigned integers, no header; a file named
``meta.json`` in the same directory says how to read every ``.bin`` beside it::

    {"vocab_size": 50257, "dtype": "uint16"}

``dtype`` is ``uint16`` (vocabularies up to 65,536) or ``uint32``; every id must be below ``vocab_size``,
which must equal the model's ``--vocab-size``; other keys (a tokenizer's name, say) are ignored.
:func:`write_token_file` writes a ``.bin`` file and its ``meta.json``. Token files are memory-mapped, never
read whole: the splits are views of the mapping (so a corpus larger than memory trains). So only the ids at
the two ends of each file (:data:`TOKEN_CHECK` each) are checked before training; a bad id elsewhere
surfaces when a batch draws it, as the embedding's index error.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fsmoe.config import DataConfig

# Directories whose .py files are not "the standard library's own source": installed third-party
# packages, the (large and repetitive) test suites and their data, and bytecode caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TOKEN_DTYPES: dict[str, torch.dtype] = {"uint16": torch.uint16, "uint32": torch.uint32}
TOKEN_CHECK = 65_536  # ids checked at each end of a token file


class DataError(ValueError):
    """The data cannot be used: a missing, empty, short or malformed file (the message names it and the numbers)."""


@dataclass(frozen=True)
class Corpus:
    """The two splits as 1-D integer tensors (uint8 bytes, or uint16/uint32 token ids memory-mapped from
    their files), and a human-readable note of where they came from."""

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


def validation_size(n: int, val_fraction: float, seq_len: int, source: str, unit: str = "bytes") -> int:
    """How many of the ``n`` items (bytes or tokens) of ``source`` the validation split (the tail) takes:
    ``val_fraction`` of them, at least ``seq_len + 1`` (one sequence plus its shifted targets), leaving at
    least as many for training; :class:`DataError` naming the numbers when ``n`` is too small."""
    if n == 0:
        raise DataError(f"{source} is empty; need at least {2 * (seq_len + 1)} {unit} for seq_len={seq_len}")
    n_val = max(math.ceil(n * val_fraction), seq_len + 1)
    if n - n_val < seq_len + 1:
        raise DataError(
            f"{source} has {n} {unit}, too short for seq_len={seq_len}: the train and validation splits "
            f"each need at least seq_len + 1 = {seq_len + 1} {unit}, so at least {2 * (seq_len + 1)} "
            f"{unit} in all (more with val_fraction={val_fraction})"
        )
    return n_val


def split_bytes(data: bytes, val_fraction: float, seq_len: int, source: str) -> Corpus:
    """Cut ``data`` into train (head) and validation (tail) splits; each must hold one sequence of
    ``seq_len`` inputs plus its shifted targets, i.e. ``seq_len + 1`` bytes."""
    n = len(data)
    n_val = validation_size(n, val_fraction, seq_len, source)
    data_N = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Corpus(train_N=data_N[: n - n_val].clone(), val_N=data_N[n - n_val :].clone(), source=source)


# --- token files ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenMeta:
    """What ``meta.json`` says of the ``.bin`` files beside it: ids are ``dtype`` (a key of
    :data:`TOKEN_DTYPES`) and below ``vocab_size``."""

    vocab_size: int
    dtype: str

    @staticmethod
    def for_vocab(vocab_size: int) -> TokenMeta:
        """The narrowest dtype that holds every id below ``vocab_size``."""
        if not 1 <= vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        return TokenMeta(vocab_size=vocab_size, dtype="uint16" if vocab_size <= 2**16 else "uint32")


def is_token_data(path: str | Path) -> bool:
    """Whether ``--data path`` names token files (a ``.bin`` file or a directory) rather than bytes."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".bin"


def read_token_meta(directory: Path) -> TokenMeta:
    """``directory/meta.json``, checked: :class:`DataError` naming the file and what is wrong."""
    path = directory / META_FILE
    where = f"token metadata {str(path)!r}"
    example = '{"vocab_size": 50257, "dtype": "uint16"}'
    if not path.is_file():
        raise DataError(f"{where} does not exist: token files need it beside them, e.g. {example}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where} cannot be read as JSON: {e}") from None
    if not isinstance(raw, dict) or not {"vocab_size", "dtype"} <= set(raw):
        raise DataError(f"{where} must be an object with the keys vocab_size and dtype, e.g. {example}; got {raw!r}")
    vocab_size, dtype = raw["vocab_size"], raw["dtype"]
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{where}: dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    limit = 2 ** (8 * TOKEN_DTYPES[dtype].itemsize)
    if type(vocab_size) is not int or not 1 <= vocab_size <= limit:
        raise DataError(f"{where}: vocab_size must be an integer in [1, {limit}] for dtype {dtype}, got {vocab_size!r}")
    return TokenMeta(vocab_size=vocab_size, dtype=dtype)


def write_token_file(path: str | Path, tokens: npt.ArrayLike, vocab_size: int) -> Path:
    """Write the 1-D integer ``tokens`` (ids in ``[0, vocab_size)``) to the ``.bin`` file ``path`` in the
    narrowest dtype for ``vocab_size``, and ``meta.json`` beside it (see the module docstring); a
    ``meta.json`` already there must say the same (the files of one directory share it) and is left as it
    is. Returns ``path``."""
    path = Path(path)
    if path.suffix != ".bin":
        raise ValueError(f"a token file's name ends in .bin, got {str(path)!r}")
    meta = TokenMeta.for_vocab(vocab_size)
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"tokens must be a 1-D array of integers, got shape {ids.shape} of {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got ids from {int(ids.min())} to {int(ids.max())}")
    meta_path = path.parent / META_FILE
    has_meta = meta_path.exists()
    if has_meta and (old := read_token_meta(path.parent)) != meta:
        raise ValueError(f"{str(meta_path)!r} already says {asdict(old)}; these tokens need {asdict(meta)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ids.astype(np.dtype(meta.dtype).newbyteorder("<")).tofile(path)
    if not has_meta:
        meta_path.write_text(json.dumps(asdict(meta)) + "\n")
    return path


def map_token_file(path: Path, meta: TokenMeta, min_tokens: int, seq_len: int) -> Tensor:
    """The token file ``path`` as a read-only memory-mapped 1-D tensor of ``meta.dtype``, after checking
    that it holds whole ids, at least ``min_tokens`` of them, and (at its two ends) ids below
    ``meta.vocab_size``: :class:`DataError` naming the file and the numbers."""
    where = f"token file {str(path)!r}"
    if not path.is_file():
        raise DataError(f"{where} does not exist or is not a file")
    dtype = TOKEN_DTYPES[meta.dtype]
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{where} is empty; need at least {min_tokens} tokens for seq_len={seq_len}")
    if size % dtype.itemsize:
        raise DataError(f"{where} has {size} bytes, not a multiple of {dtype.itemsize} ({meta.dtype} ids, as "
                        f"{META_FILE} says): truncated, or not {meta.dtype}")
    n = size // dtype.itemsize
    if n < min_tokens:
        raise DataError(f"{where} has {n} tokens, too short for seq_len={seq_len}: need at least {min_tokens}")
    # shared=False: a private mapping, so nothing ever writes to the file; pages are read as batches touch them.
    tokens_N = torch.from_file(str(path), shared=False, size=n, dtype=dtype)
    for start in sorted({0, max(n - TOKEN_CHECK, 0)}):
        ids = tokens_N[start : start + TOKEN_CHECK].long()  # uint16/uint32 tensors support few ops
        bad = (ids >= meta.vocab_size).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise DataError(f"{where}: token id {int(ids[i])} at position {start + i:,} is not below vocab_size "
                            f"{meta.vocab_size} ({META_FILE}); wrong dtype or vocabulary?")
    return tokens_N


def load_tokens(path: Path, val_fraction: float, seq_len: int, vocab_size: int | None) -> Corpus:
    """The token data at ``path`` (a ``.bin`` file or a directory of ``train.bin`` and ``val.bin``; see the
    module docstring), memory-mapped and checked; ``vocab_size`` (the model's) must equal the metadata's."""
    if path.is_dir():
        missing = [f for f in (TRAIN_FILE, VAL_FILE) if not (path / f).is_file()]
        if missing:
            raise DataError(f"data directory {str(path)!r} has no {' or '.join(missing)}: a token directory holds "
                            f"{TRAIN_FILE}, {VAL_FILE} and {META_FILE}")
    elif not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist or is not a file")
    meta = read_token_meta(path if path.is_dir() else path.parent)
    if path.is_dir():
        train_N = map_token_file(path / TRAIN_FILE, meta, seq_len + 1, seq_len)
        val_N = map_token_file(path / VAL_FILE, meta, seq_len + 1, seq_len)
        source = f"token directory {str(path)!r} ({meta.dtype}, vocab {meta.vocab_size})"
    else:
        tokens_N = map_token_file(path, meta, 2 * (seq_len + 1), seq_len)
        source = f"token file {str(path)!r} ({meta.dtype}, vocab {meta.vocab_size})"
        n = tokens_N.numel()
        n_val = validation_size(n, val_fraction, seq_len, source, unit="tokens")
        train_N, val_N = tokens_N[: n - n_val], tokens_N[n - n_val :]
    if vocab_size is not None and meta.vocab_size != vocab_size:  # the files are sound; do they fit the model?
        raise DataError(f"token data {str(path)!r} has vocab_size {meta.vocab_size} ({META_FILE}) but the model has "
                        f"{vocab_size}: pass --vocab-size {meta.vocab_size}")
    return Corpus(train_N=train_N, val_N=val_N, source=source)


# --- choosing and checking the source -------------------------------------------------------------------------
TEXT_SNIFF_BYTES = 65536
_TEXT_BYTES = frozenset(range(32, 127)) | {9, 10, 12, 13}


def check_data(cfg: DataConfig, seq_len: int, vocab_size: int | None = None) -> None:
    """The checks that can be made before any rank starts, once (:class:`DataError` naming the file and the
    numbers). Token data: every check of :func:`load_tokens`, against the model's ``vocab_size`` when
    given. Bytes (the embedded corpus' budget or a file): long enough for both splits at ``val_fraction``, exactly
as :func:`load_corpus` will split them; a file also readable, and a warning when its first 64 KiB do
    not look like text (any bytes are trained on as they are, so a binary file would train silently on
    noise)."""
    if cfg.path is None:  # the embedded corpus: its budget must hold both splits
        validation_size(cfg.max_bytes, cfg.val_fraction, seq_len, f"the embedded corpus (--data-bytes {cfg.max_bytes})")
        return
    path = Path(cfg.path)
    if is_token_data(path):
        load_tokens(path, cfg.val_fraction, seq_len, vocab_size)
        return
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    validation_size(path.stat().st_size, cfg.val_fraction, seq_len, f"data file {str(path)!r}")  # as load_corpus
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


def load_corpus(cfg: DataConfig, seq_len: int, vocab_size: int | None = None) -> Corpus:
    """Read (bytes) or map (tokens) the configured data and split it (see the module docstring); token data
    is checked against the model's ``vocab_size`` when given."""
    if cfg.path is None:
        data = stdlib_corpus(cfg.max_bytes)
        source = f"Python stdlib sources ({sysconfig.get_paths()['stdlib']}, first {len(data):,} bytes)"
    else:
        path = Path(cfg.path)
        if is_token_data(path):
            return load_tokens(path, cfg.val_fraction, seq_len, vocab_size)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist or is not a file")
        data = path.read_bytes()
        source = f"data file {str(path)!r}"
    return split_bytes(data, cfg.val_fraction, seq_len, source)


class BatchSampler:
    """Random windows of a split: ``sample() -> (x_BL, y_BL)`` int64 tensors, y shifted by one.

    ``data_N`` is any 1-D integer tensor: uint8 bytes or memory-mapped uint16/uint32 token ids (a batch
    reads only its own windows). The sampler owns its ``torch.Generator``, so the batch sequence depends
    only on ``seed`` (not on the global RNG that dropout or noisy gates also draw from).
    """

    def __init__(self, data_N: Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if data_N.numel() < seq_len + 1:
            unit = "bytes" if data_N.dtype == torch.uint8 else "tokens"
            raise ValueError(
                f"a split of {data_N.numel()} {unit} is too short for seq_len={seq_len} "
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
        num_starts = self.data_N.numel() - self.seq_len  # windows of L + 1 items
        start_B = torch.randint(num_starts, (self.batch_size,), generator=self.generator)
        window_BL1 = self.data_N[start_B[:, None] + self._offsets_L1].long()
        return window_BL1[:, :-1], window_BL1[:, 1:]
