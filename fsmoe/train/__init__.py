"""Training: embedded byte-level data, a seeded batch sampler, the trainer and the distributed glue.

The job it runs is a :class:`fsmoe.config.JobConfig`."""

from fsmoe.train.data import (
    BatchSampler,
    Corpus,
    DataError,
    load_corpus,
    split_bytes,
    stdlib_corpus,
    stdlib_source_files,
)
from fsmoe.train.trainer import TrainResult, build_optimizer, evaluate, lr_at, run_train

__all__ = [
    "BatchSampler", "Corpus", "DataError", "TrainResult", "build_optimizer", "evaluate", "load_corpus", "lr_at",
    "run_train", "split_bytes", "stdlib_corpus", "stdlib_source_files",
]
