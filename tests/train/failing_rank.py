"""A launched program whose rank 1 raises while rank 0 waits in a collective (for the launcher test)."""

import sys
from datetime import timedelta

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 would wait here for the whole timeout if nobody stopped it
    sys.exit(0)
