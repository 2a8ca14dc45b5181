"""A launched program whose rank 1 stops making progress at step 5 (for the watchdog tests).

``python -m tests.train.hanging_rank MODE`` on 2+ ranks: every rank joins through
:func:`fsmoe.train.distributed.setup` (which arms the heartbeat and the parent-death signal), then runs
steps of one all-reduce each, beating after every step. At step 5 rank 1 hangs, as MODE says:

* ``stop``: SIGSTOPs itself before the step's all-reduce (the fault of the issue; its peer then waits in
  that all-reduce, at the same last step: only the stopped process tells them apart);
* ``sleep``: sleeps for an hour after the step's all-reduce, before its beat (a rank stuck in its own
  code, one step behind its peer);
* ``run``: no rank hangs; the job runs until it is killed (for the killed-launcher tests).

With ``FSMOE_TEST_PID_DIR`` set, each rank writes its pid to ``rank{R}.pid`` there once it is armed.
The collective timeout is 600 s, so only the launcher's watchdog can end a hung job quickly.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fsmoe.config import ParallelConfig
from fsmoe.train.distributed import setup

if __name__ == "__main__":
    mode = sys.argv[1]
    ctx = setup(ParallelConfig(nproc=int(os.environ["WORLD_SIZE"]), timeout_s=600.0), "hanging_rank")
    assert ctx is not None
    if "FSMOE_TEST_PID_DIR" in os.environ:
        (Path(os.environ["FSMOE_TEST_PID_DIR"]) / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    x = torch.ones(4)
    for step in range(1, 100_000):
        if ctx.rank == 1 and step == 5 and mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        dist.all_reduce(x)
        if ctx.rank == 1 and step == 5 and mode == "sleep":
            time.sleep(3600)
        ctx.heartbeat(step)
        time.sleep(0.05)
