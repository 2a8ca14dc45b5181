"""Mixed precision (``--dtype fp32|bf16``): where the forward computes, and in what.

bf16 is ``torch.autocast(device, bfloat16)`` around the model's forward: matmuls of attention and the
experts (``Linear``, ``bmm``) run in bf16, while the parameters stay fp32 (the master weights the
optimizer updates, so no loss scaling is needed for bf16), and autocast's fp32 ops (softmax, the loss'
log-softmax, layer norms) stay fp32. The router is fp32 whatever autocast says: the gates switch it off
for themselves (:meth:`fsmoe.moe.gates.Gate.forward`), so logits, softmax, top-k and the aux loss match
an fp32 run token for token. Backward runs outside the block, as autocast wants; its ops follow the
forward's dtypes.

On the CPU bf16 is allowed but not the default: it is correct, and much slower than fp32 there.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from fsmoe.config import JobConfig
from fsmoe.config.values import DTYPE_NAMES

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype → what autocast computes in
assert tuple(COMPUTE_DTYPES) == DTYPE_NAMES


def compute_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``--dtype`` ``dtype``; ``ValueError`` listing the choices."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[dtype]


def autocast(job_or_dtype: JobConfig | str, device: torch.device | str) -> AbstractContextManager[Any]:
    """The context to run a forward in on ``device`` for ``run.dtype`` (a job) or a ``--dtype`` name:
    nothing for fp32, bf16 autocast for bf16. Wrap the forward and the loss only, not backward."""
    dtype = job_or_dtype.run.dtype if isinstance(job_or_dtype, JobConfig) else job_or_dtype
    if compute_dtype(dtype) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
