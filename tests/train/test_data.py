"""Embedded corpus, splits, user files and the seeded batch sampler."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from fsmoe.train.data import (
    SKIP_DIRS,
    BatchSampler,
    DataConfig,
    DataError,
    load_corpus,
    split_bytes,
    stdlib_corpus,
    stdlib_source_files,
)

SMALL = 100_000


def test_stdlib_files_are_sorted_python_sources_outside_skipped_dirs() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert not any(part in SKIP_DIRS for r in rel for part in r.split("/")[:-1])
    assert "argparse.py" in rel


def test_stdlib_files_under_a_given_root(tmp_path: Path) -> None:
    for name in ("b.py", "a.py", "pkg/c.py", "tests/t.py", "site-packages/x/y.py", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    rel = [f.relative_to(tmp_path).as_posix() for f in stdlib_source_files(tmp_path)]
    assert rel == ["a.py", "b.py", "pkg/c.py"]
    assert stdlib_corpus(100, tmp_path) == b"a.py\nb.py\npkg/c.py\n"
    assert stdlib_corpus(6, tmp_path) == b"a.py\nb"


def test_stdlib_corpus_is_deterministic_and_budgeted() -> None:
    a = stdlib_corpus(SMALL)
    assert len(a) == SMALL
    assert a == stdlib_corpus(SMALL)
    assert stdlib_corpus(SMALL // 4) == a[: SMALL // 4]


def test_default_corpus_split() -> None:
    cfg = DataConfig(max_bytes=SMALL)
    c1, c2 = load_corpus(cfg, seq_len=64), load_corpus(cfg, seq_len=64)
    assert c1.train_N.dtype == torch.uint8
    assert c1.val_N.numel() == math.ceil(SMALL * 0.05)
    assert c1.train_N.numel() + c1.val_N.numel() == SMALL
    assert torch.equal(c1.train_N, c2.train_N) and torch.equal(c1.val_N, c2.val_N)
    assert bytes(torch.cat([c1.train_N, c1.val_N]).tolist()) == stdlib_corpus(SMALL)
    assert "stdlib" in c1.source


def test_user_file(tmp_path: Path) -> None:
    text = b"hello, bytes! " * 100
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    c = load_corpus(DataConfig(path=str(path)), seq_len=8)
    assert bytes(torch.cat([c.train_N, c.val_N]).tolist()) == text
    assert c.val_N.numel() == 70  # ceil(1400 * 0.05)


def test_validation_split_holds_at_least_one_sequence() -> None:
    c = split_bytes(bytes(range(100)), val_fraction=0.05, seq_len=20, source="x")
    assert c.val_N.numel() == 21 and c.train_N.numel() == 79


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.*seq_len=32"):
        load_corpus(DataConfig(path=str(path)), seq_len=32)


def test_short_file_names_length_and_seq_len(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 50)
    with pytest.raises(ValueError, match=r"has 50 bytes, too short for seq_len=32.*at least 66 bytes"):
        load_corpus(DataConfig(path=str(path)), seq_len=32)
    # Exactly two sequences' worth is enough.
    path.write_bytes(b"x" * 66)
    c = load_corpus(DataConfig(path=str(path)), seq_len=32)
    assert c.train_N.numel() == c.val_N.numel() == 33


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataConfig(path=str(tmp_path / "nope.txt")), seq_len=8)


def test_data_config_validation() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="max_bytes"):
        DataConfig(max_bytes=0)


def test_sampler_batches() -> None:
    data_N = torch.arange(200, dtype=torch.uint8)
    x_BL, y_BL = BatchSampler(data_N, batch_size=5, seq_len=16, seed=3).sample()
    assert x_BL.shape == y_BL.shape == (5, 16)
    assert x_BL.dtype == y_BL.dtype == torch.long
    # Contiguous windows of the data, targets shifted by one.
    torch.testing.assert_close(x_BL[:, 1:] - x_BL[:, :-1], torch.ones(5, 15, dtype=torch.long))
    torch.testing.assert_close(y_BL, x_BL + 1)
    assert int(y_BL.max()) <= 199


def test_sampler_is_seeded() -> None:
    data_N = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def batches(seed: int) -> list[torch.Tensor]:
        s = BatchSampler(data_N, batch_size=4, seq_len=8, seed=seed)
        return [s.sample()[0] for _ in range(3)]

    torch.manual_seed(123)  # the global RNG plays no part
    a = batches(7)
    torch.manual_seed(456)
    assert all(torch.equal(p, q) for p, q in zip(a, batches(7), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, batches(8), strict=True))


def test_sampler_covers_the_last_window() -> None:
    # seq_len + 1 bytes: exactly one window, which must be the whole split.
    data_N = torch.arange(9, dtype=torch.uint8)
    x_BL, y_BL = BatchSampler(data_N, batch_size=2, seq_len=8, seed=0).sample()
    assert x_BL.tolist() == [list(range(8))] * 2 and y_BL.tolist() == [list(range(1, 9))] * 2


def test_sampler_rejects_short_split() -> None:
    with pytest.raises(ValueError, match="8 bytes is too short for seq_len=8"):
        BatchSampler(torch.zeros(8, dtype=torch.uint8), batch_size=1, seq_len=8, seed=0)


def test_check_data_refuses_what_load_corpus_would_refuse(tmp_path: Path) -> None:
    """The check before any rank starts splits as the ranks will: val_fraction counts, and the embedded
    corpus' budget is checked too."""
    from fsmoe.train.data import check_data

    small = tmp_path / "small.txt"
    small.write_text("x" * 100)
    cfg = DataConfig(path=str(small), val_fraction=0.9)
    with pytest.raises(DataError, match="has 100 bytes, too short for seq_len=16") as early:
        check_data(cfg, 16)
    with pytest.raises(DataError) as late:
        load_corpus(cfg, 16)
    assert str(early.value) == str(late.value)
    with pytest.raises(DataError, match=r"the embedded corpus \(--data-bytes 30\) has 30 bytes, too short"):
        check_data(DataConfig(max_bytes=30), 16)
    check_data(DataConfig(path=str(small), val_fraction=0.1), 16)  # fits: no error
