"""Training: embedded byte-level data, a seeded batch sampler, the trainer, layout-free checkpoints and the
distributed glue.

The job it runs is a :class:`fsmoe.config.JobConfig`."""

from fsmoe.train.checkpoint import Checkpoint, check_resume, load_checkpoint, read_checkpoint, save_checkpoint
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
    "BatchSampler", "Checkpoint", "Corpus", "DataError", "TrainResult", "build_optimizer", "check_resume", "evaluate",
    "load_checkpoint", "load_corpus", "lr_at", "read_checkpoint", "run_train", "save_checkpoint", "split_bytes",
    "stdlib_corpus", "stdlib_source_files",
]
