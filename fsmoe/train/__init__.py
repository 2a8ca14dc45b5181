"""Training: embedded byte-level data and token files, a seeded batch sampler, the trainer, layout-free
checkpoints, mixed precision, device placement, run reports and the distributed glue.

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
    write_token_file,
)
from fsmoe.train.distributed import Placement, rank_placement, resolve_device
from fsmoe.train.precision import autocast
from fsmoe.train.trainer import TrainResult, build_optimizer, evaluate, lr_at, run_train

__all__ = [
    "BatchSampler", "Checkpoint", "Corpus", "DataError", "Placement", "TrainResult", "autocast", "build_optimizer",
    "check_resume", "evaluate", "load_checkpoint", "load_corpus", "lr_at", "rank_placement", "read_checkpoint",
    "resolve_device", "run_train", "save_checkpoint", "split_bytes", "stdlib_corpus", "stdlib_source_files",
    "write_token_file",
]
