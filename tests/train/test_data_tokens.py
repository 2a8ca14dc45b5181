"""Token-file data (nanoGPT-style ``.bin`` + ``meta.json``): round trips, memory mapping, splits, every bad
file's error, batches against a naive slice of the file, data-parallel sharding, and a short CLI run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fsmoe.cli import main
from fsmoe.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from fsmoe.parallel.dims import ParallelDims
from fsmoe.train.data import (
    TOKEN_CHECK,
    BatchSampler,
    DataError,
    TokenMeta,
    check_data,
    load_corpus,
    read_token_meta,
    write_token_file,
)
from fsmoe.train.trainer import RankBatches


def random_tokens(n: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, n)


@pytest.mark.parametrize(("vocab_size", "dtype"), [(300, "uint16"), (65_536, "uint16"), (70_000, "uint32")])
def test_single_file_round_trip_and_split(tmp_path: Path, vocab_size: int, dtype: str) -> None:
    tokens = random_tokens(1000, vocab_size)
    tokens[:2] = [0, vocab_size - 1]  # both ends of the id range
    path = write_token_file(tmp_path / "corpus.bin", tokens, vocab_size)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"vocab_size": vocab_size, "dtype": dtype}
    assert path.stat().st_size == 1000 * np.dtype(dtype).itemsize
    assert np.array_equal(np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")), tokens)

    corpus = load_corpus(DataConfig(path=str(path)), seq_len=16, vocab_size=vocab_size)
    assert corpus.train_N.dtype == getattr(torch, dtype)
    assert corpus.val_N.numel() == math.ceil(1000 * 0.05)  # the last val_fraction, as for bytes
    assert torch.cat([corpus.train_N.long(), corpus.val_N.long()]).tolist() == tokens.tolist()
    assert "token file" in corpus.source and f"vocab {vocab_size}" in corpus.source


def test_directory_uses_val_bin_as_the_validation_split(tmp_path: Path) -> None:
    train, val = random_tokens(500, 1000, seed=1), random_tokens(40, 1000, seed=2)
    write_token_file(tmp_path / "train.bin", train, 1000)
    write_token_file(tmp_path / "val.bin", val, 1000)
    corpus = load_corpus(DataConfig(path=str(tmp_path), val_fraction=0.5), seq_len=8, vocab_size=1000)
    assert corpus.train_N.long().tolist() == train.tolist()
    assert corpus.val_N.long().tolist() == val.tolist()  # val_fraction plays no part
    assert "token directory" in corpus.source


def test_splits_are_views_of_the_file_not_copies(tmp_path: Path) -> None:
    path = write_token_file(tmp_path / "d.bin", np.arange(200_000) % 5000, 5000)
    corpus = load_corpus(DataConfig(path=str(path)), seq_len=8)
    n_train = corpus.train_N.numel()
    with path.open("r+b") as f:  # change the file under the mapping: the splits see it
        for position, value in ((7, 4321), (n_train + 3, 1234)):
            f.seek(2 * position)
            f.write(np.array([value], dtype="<u2").tobytes())
    assert int(corpus.train_N[7]) == 4321 and int(corpus.val_N[3]) == 1234


def test_writer_refuses_bad_tokens_and_a_conflicting_meta(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\), got ids from 0 to 10"):
        write_token_file(tmp_path / "a.bin", [0, 10], 10)
    with pytest.raises(ValueError, match="1-D array of integers"):
        write_token_file(tmp_path / "a.bin", [0.5, 1.0], 10)
    with pytest.raises(ValueError, match="ends in .bin"):
        write_token_file(tmp_path / "a.txt", [0, 1], 10)
    write_token_file(tmp_path / "a.bin", [0, 1], 10)
    with pytest.raises(ValueError, match=r"already says \{'vocab_size': 10, 'dtype': 'uint16'\}"):
        write_token_file(tmp_path / "b.bin", [0, 1], 70_000)
    (tmp_path / "meta.json").write_text('{"vocab_size": 10, "dtype": "uint16", "tokenizer": "mine"}')
    write_token_file(tmp_path / "b.bin", [2, 3], 10)  # the same vocabulary: the metadata is kept as it is
    assert read_token_meta(tmp_path) == TokenMeta(vocab_size=10, dtype="uint16")
    assert json.loads((tmp_path / "meta.json").read_text())["tokenizer"] == "mine"


# --- every bad case: a DataError naming the file and what is wrong, from check_data (before any rank) ----------
SEQ = 16


def _good_dir(d: Path) -> Path:
    write_token_file(d / "train.bin", random_tokens(400, 500), 500)
    write_token_file(d / "val.bin", random_tokens(100, 500), 500)
    return d


def _missing_file(d: Path) -> Path:
    return d / "nope.bin"


def _missing_meta(d: Path) -> Path:
    np.arange(100, dtype="<u2").tofile(d / "x.bin")
    return d / "x.bin"


def _no_val_bin(d: Path) -> Path:
    write_token_file(d / "train.bin", random_tokens(400, 500), 500)
    return d


def _empty(d: Path) -> Path:
    write_token_file(d / "x.bin", [], 500)
    return d / "x.bin"


def _truncated(d: Path) -> Path:
    path = write_token_file(d / "x.bin", random_tokens(400, 500), 500)
    with path.open("ab") as f:
        f.write(b"\x01")
    return path


def _bad_dtype(d: Path) -> Path:
    write_token_file(d / "x.bin", random_tokens(400, 500), 500)
    (d / "meta.json").write_text('{"vocab_size": 500, "dtype": "int32"}')
    return d / "x.bin"


def _not_json(d: Path) -> Path:
    write_token_file(d / "x.bin", random_tokens(400, 500), 500)
    (d / "meta.json").write_text("vocab_size = 500")
    return d / "x.bin"


def _id_too_large_at_the_tail(d: Path) -> Path:
    tokens = random_tokens(TOKEN_CHECK + 5000, 400)
    tokens[-10] = 450  # past the first TOKEN_CHECK ids: found by the check of the file's tail
    path = write_token_file(d / "x.bin", tokens, 500)
    (d / "meta.json").write_text('{"vocab_size": 400, "dtype": "uint16"}')
    return path


def _vocab_differs_from_the_model(d: Path) -> Path:
    return write_token_file(d / "x.bin", random_tokens(400, 50), 50)


def _short_for_seq_len(d: Path) -> Path:
    return write_token_file(d / "x.bin", random_tokens(2 * SEQ + 1, 500), 500)  # needs 2 * (SEQ + 1)


def _short_val_bin(d: Path) -> Path:
    write_token_file(d / "train.bin", random_tokens(400, 500), 500)
    write_token_file(d / "val.bin", random_tokens(SEQ, 500), 500)
    return d


BAD = [
    (_missing_file, r"token file '.*nope.bin' does not exist"),
    (_missing_meta, r"token metadata '.*meta.json' does not exist: .*\"dtype\": \"uint16\""),
    (_no_val_bin, r"data directory '.*' has no val.bin"),
    (_empty, r"token file '.*x.bin' is empty; need at least 34 tokens for seq_len=16"),
    (_truncated, r"'.*x.bin' has 801 bytes, not a multiple of 2 \(uint16 ids"),
    (_bad_dtype, r"'.*meta.json': dtype 'int32' is not one of uint16, uint32"),
    (_not_json, r"'.*meta.json' cannot be read as JSON"),
    (_id_too_large_at_the_tail, rf"'.*x.bin': token id 450 at position {TOKEN_CHECK + 4990:,} is not below "
                                r"vocab_size 400"),
    (_vocab_differs_from_the_model, r"has vocab_size 50 \(meta.json\) but the model has 500: pass --vocab-size 50"),
    (_short_for_seq_len, r"'.*x.bin' has 33 tokens, too short for seq_len=16: need at least 34"),
    (_short_val_bin, r"'.*val.bin' has 16 tokens, too short for seq_len=16: need at least 17"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m.__name__.strip("_") for m, _ in BAD])
def test_bad_token_data_is_refused_before_any_rank_starts(tmp_path: Path, make: Callable[[Path], Path],
                                                          message: str) -> None:
    cfg = DataConfig(path=str(make(tmp_path)))
    with pytest.raises(DataError, match=message):
        check_data(cfg, seq_len=SEQ, vocab_size=500)
    with pytest.raises(DataError, match=message):  # and on every rank alike
        load_corpus(cfg, seq_len=SEQ, vocab_size=500)


def test_good_directory_passes_the_checks(tmp_path: Path) -> None:
    check_data(DataConfig(path=str(_good_dir(tmp_path))), seq_len=SEQ, vocab_size=500)


# --- batches ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", [1000, 100_000])
def test_batches_are_int64_windows_of_the_file(tmp_path: Path, vocab_size: int) -> None:
    path = write_token_file(tmp_path / "d.bin", random_tokens(5000, vocab_size), vocab_size)
    corpus = load_corpus(DataConfig(path=str(path)), seq_len=SEQ, vocab_size=vocab_size)
    on_disk = np.memmap(path, dtype=read_token_meta(tmp_path).dtype, mode="r")  # the reference: numpy's own map
    sampler = BatchSampler(corpus.train_N, batch_size=4, seq_len=SEQ, seed=5)
    starts = torch.Generator().manual_seed(5)  # the sampler's draws, replayed
    for _ in range(3):
        x_BL, y_BL = sampler.sample()
        assert x_BL.dtype == y_BL.dtype == torch.int64 and x_BL.shape == (4, SEQ)
        start_B = torch.randint(corpus.train_N.numel() - SEQ, (4,), generator=starts).tolist()
        for b, s in enumerate(start_B):
            assert x_BL[b].tolist() == on_disk[s : s + SEQ].astype(np.int64).tolist()
            assert y_BL[b].tolist() == on_disk[s + 1 : s + SEQ + 1].astype(np.int64).tolist()


def test_token_and_byte_splits_give_the_same_windows(tmp_path: Path) -> None:
    # The same ids as bytes (uint8) and as uint16 tokens: the same seed draws the same batches.
    ids = random_tokens(3000, 256)
    bytes_N = torch.tensor(ids, dtype=torch.uint8)
    path = write_token_file(tmp_path / "d.bin", ids, 256)
    tokens_N = load_corpus(DataConfig(path=str(path)), seq_len=SEQ).train_N
    a = BatchSampler(bytes_N[: tokens_N.numel()], batch_size=3, seq_len=SEQ, seed=2).sample()
    b = BatchSampler(tokens_N, batch_size=3, seq_len=SEQ, seed=2).sample()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_data_parallel_ranks_split_the_global_batch(tmp_path: Path) -> None:
    # 4 ranks, MP=2, so 2 dense-DP replicas: ranks of one replica get the same rows, the replicas' rows in
    # order are the single-process batch.
    path = write_token_file(tmp_path / "d.bin", random_tokens(4000, 1000), 1000)
    train_N = load_corpus(DataConfig(path=str(path)), seq_len=SEQ).train_N
    job = JobConfig(model=ModelConfig(seq_len=SEQ, vocab_size=1000), train=TrainConfig(batch_size=6))
    dims = ParallelDims(world_size=4, procs_per_node=4, dp=2, mp=2)

    def ctx(rank: int) -> SimpleNamespace:  # what RankBatches reads of a joined rank
        return SimpleNamespace(rank=rank, world=4, groups=SimpleNamespace(dims=dims), device=torch.device("cpu"))

    single = RankBatches(train_N, job, seed=3, ctx=None)
    ranks = [RankBatches(train_N, job, seed=3, ctx=ctx(r)) for r in range(4)]  # type: ignore[arg-type]
    for _ in range(3):
        x_BL, y_BL = single.sample()
        per_rank = [r.sample() for r in ranks]
        for r in range(4):
            rows = slice(3 * (r // 2), 3 * (r // 2) + 3)
            assert torch.equal(per_rank[r][0], x_BL[rows]) and torch.equal(per_rank[r][1], y_BL[rows])


# --- the command line -------------------------------------------------------------------------------------------
def test_cli_trains_on_a_token_directory(tmp_path: Path) -> None:
    vocab = 300  # above 256: ids a byte could not hold
    pattern = np.arange(3000) % 37 + 250  # periodic, so a few steps lower the loss
    write_token_file(tmp_path / "tok" / "train.bin", pattern, vocab)
    write_token_file(tmp_path / "tok" / "val.bin", pattern[:200], vocab)
    out = tmp_path / "run"
    model = ["--seq-len", "32", "--d-model", "48", "--n-layers", "2", "--n-heads", "2", "--d-ff", "96",
             "--experts", "2", "--hidden", "48"]
    rc = main(["train", "--data", str(tmp_path / "tok"), "--vocab-size", str(vocab), "--out", str(out), *model,
               "--steps", "6", "--batch-size", "4", "--log-every", "2", "--eval-iters", "1", "--lr", "1e-2"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("kind", "train") == "train"]  # not the validation records
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert records[0]["loss"] == pytest.approx(math.log(vocab), abs=0.5)  # untrained: ~uniform over the vocab
    assert records[-1]["loss"] < records[0]["loss"]


def test_sampler_names_tokens_for_a_short_token_split() -> None:
    with pytest.raises(ValueError, match=r"a split of 8 tokens is too short for seq_len=8 \(needs seq_len \+ 1 = 9\)"):
        BatchSampler(torch.zeros(8, dtype=torch.uint16), batch_size=1, seq_len=8, seed=0)
