"""Training: embedded byte-level data, a seeded batch sampler and the single-process trainer."""

from fsmoe.train.data import (
    BatchSampler,
    Corpus,
    DataConfig,
    DataError,
    load_corpus,
    split_bytes,
    stdlib_corpus,
    stdlib_source_files,
)
from fsmoe.train.trainer import TrainConfig, TrainResult, build_optimizer, evaluate, lr_at, run_train

__all__ = [
    "BatchSampler", "Corpus", "DataConfig", "DataError", "TrainConfig", "TrainResult", "build_optimizer",
    "evaluate", "load_corpus", "lr_at", "run_train", "split_bytes", "stdlib_corpus", "stdlib_source_files",
]
