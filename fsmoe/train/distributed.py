"""Distributed training glue: joining the ranks, gradient-norm clipping, the launcher and its watchdog.

The layout (:class:`~fsmoe.config.ParallelConfig`) is validated with the rest of the job before any rank
starts, and again, identically, on every rank when it builds the job, so a bad layout raises the same
clear ``ValueError`` everywhere before any collective. :func:`setup` then joins the process group,
builds the groups, and compares a hash of the whole job across ranks (one 8-byte exchange).

:func:`launch` starts ``nproc`` local ranks through torch's own elastic launcher API (what ``torchrun``
uses), re-running this command line in each; when one rank fails, the launcher stops the others.

Faults the launcher handles (fsmoe's own launchers: :func:`launch` and :mod:`fsmoe.cluster`'s):

* **A hung rank.** Every rank beats a :class:`Heartbeat` (``ctx.heartbeat(step)`` after each step); the
  launcher's :class:`HangWatch` sees a rank whose heartbeat stood still for ``hang_timeout_s``, prints
  ``fsmoe: rank R made no progress for N s (last step S); stopping the job`` and kills every rank (a
  SIGSTOPped one included), exit status non-zero. A heartbeat is three integers in a shared memory map
  (``pid, step, beats``): one ~µs store per step, no system call and no collective. Collective timeouts
  (``--collective-timeout``) fire too, but only on groups created with that timeout; the watchdog does
  not rely on them.
* **A killed launcher.** A rank started by :func:`launch` sets ``PR_SET_PDEATHSIG`` in :func:`setup`
  (:func:`die_with_launcher`), and exits at once if its launcher is already gone; the cluster
  launchers set it before ``exec``.

Under ``torchrun`` neither variable is set: the heartbeat is a no-op and the ranks die as torchrun
decides; what fires there is the collective timeout (the peers of a hung rank raise after
``--collective-timeout``, then torchrun stops the rest: SIGTERM, SIGKILL after 30 s).

Device and backend (``--device auto|cpu|cuda``): :func:`resolve_device` is the one pure decision — each
rank on ``cuda:LOCAL_RANK`` with NCCL where CUDA is there, else the CPU with gloo — and :func:`setup`
follows it, so the CPU and CUDA paths are the same code with only the device and backend differing.
The CUDA/NCCL path is unverified until ``make gpu-check`` passes on a GPU machine (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fsmoe.config import ParallelConfig
from fsmoe.config.values import DEVICE_NAMES
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups, config_hash_check
from fsmoe.parallel.grad_sync import REPLICA_ATTR

HEARTBEAT_DIR_ENV = "FSMOE_HEARTBEAT_DIR"  # set by the launcher: where each rank's heartbeat file lives
LAUNCHER_PID_ENV = "FSMOE_LAUNCHER_PID"  # set by launch(): the rank's parent, which it must die with
_BEAT = struct.Struct("<qqq")  # pid, last finished step, beats so far
_PROGRESS = struct.Struct("<qq")  # the last two, rewritten by every beat (the pid is written once)
_PR_SET_PDEATHSIG = 1
_WATCH_POLL_S = 0.5
_FOLDER_PREFIX = "fsmoe-heartbeat-"  # + the launcher's pid: a folder whose launcher is gone is removed


# --- the rank side ---------------------------------------------------------------------------------


class Heartbeat:
    """What one rank tells its launcher's :class:`HangWatch`: ``beat(step)`` after each finished step
    (``step`` 0 before the first). Beating again with the same step also counts as progress, for long
    phases without steps. Costs one store into a shared memory map (no system call); a no-op when the
    launcher set no :data:`HEARTBEAT_DIR_ENV` (one process, torchrun)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._beats = 0
        self._step = 0
        self._map: mmap.mmap | None = None
        if self.path is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, _BEAT.size)
                self._map = mmap.mmap(fd, _BEAT.size)
            finally:
                os.close(fd)  # the map keeps the file
            _BEAT.pack_into(self._map, 0, os.getpid(), 0, 0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Heartbeat:
        """This rank's heartbeat (``RANK`` names its file) under a launcher that watches, else a no-op."""
        folder = environ.get(HEARTBEAT_DIR_ENV)
        if folder is None:
            return cls(None)
        return cls(heartbeat_path(folder, int(environ["RANK"])))

    @property
    def enabled(self) -> bool:
        return self._map is not None

    def __call__(self, step: int) -> None:
        self._step = step
        if self._map is not None:
            self._beats += 1
            _PROGRESS.pack_into(self._map, 8, step, self._beats)

    def alive(self) -> None:
        """Beat the last step again: progress in a phase without steps (evaluation, checkpointing)."""
        self(self._step)


@contextlib.contextmanager
def keep_alive(heartbeat: Heartbeat, every_s: float = 1.0) -> Iterator[None]:
    """Beat ``heartbeat`` from a thread every ``every_s`` while a long phase without steps runs (a checkpoint
    being gathered, written or read), so the launcher's watchdog does not take it for a hang. A rank stuck
    in a collective there is still stopped by the collective timeout (``--collective-timeout``)."""
    if not heartbeat.enabled:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            heartbeat.alive()

    thread = threading.Thread(target=beat, name="fsmoe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def heartbeat_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.beat"


def die_with_launcher(environ: Mapping[str, str] = os.environ) -> None:
    """Under :func:`launch`: SIGKILL this process when its launcher dies (``PR_SET_PDEATHSIG``); exit at
    once if the launcher is already gone. A no-op elsewhere (torchrun, one process, not Linux)."""
    launcher = environ.get(LAUNCHER_PID_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before prctl took effect: nobody is left to stop us
        raise SystemExit(f"fsmoe: the launcher (pid {launcher}) is gone; rank {environ.get('RANK', '?')} exits")


# --- the launcher side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankBeat:
    """What the launcher last read of one rank's heartbeat; ``pid`` None before the rank wrote one."""

    rank: int
    pid: int | None
    step: int | None
    silent_s: float  # seconds since its beats last changed (since the watch started, if it never beat)
    state: str | None = None  # its process state (``/proc/PID/stat``): "T" stopped, None gone or unknown

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP, Ctrl-Z) or a debugger."""
        return self.state in ("T", "t")

    @property
    def exited(self) -> bool:
        """It wrote a heartbeat and its process is gone (or a zombie): the launcher sees its exit."""
        return self.pid is not None and self.state in (None, "Z", "X")


@dataclass(frozen=True)
class Stall:
    """A rank whose heartbeat stood still for ``hang_timeout_s``; ``ranks`` is every rank's state then."""

    rank: int
    silent_s: float
    last_step: int | None
    ranks: tuple[RankBeat, ...] = field(default=())

    def message(self) -> str:
        step = "no heartbeat yet" if self.last_step is None else f"last step {self.last_step}"
        return f"rank {self.rank} made no progress for {self.silent_s:.0f} s ({step}); stopping the job"

    def details(self) -> str:
        """One line per rank: its last step, how long it has been silent, whether it is stopped."""
        return "\n".join(
            f"  rank {b.rank}: "
            + ("no heartbeat yet" if b.step is None else f"step {b.step}")
            + f", silent {b.silent_s:.1f} s"
            + (", process stopped (SIGSTOP?)" if b.stopped else ", exited" if b.exited else "")
            for b in self.ranks
        )


class HangWatch:
    """The launcher side of the heartbeats of ``world_size`` ranks (see the module doc).

    :meth:`start` makes the folder and returns the variables every rank needs; :meth:`check` (polled by
    the launcher, twice a second) returns why the job must stop, or None; :meth:`close` removes the
    folder. This is the ``Watchdog`` of :func:`fsmoe.cluster.ranks.run_processes`.

    Start-up is slower than a step and has timeouts of its own (rendezvous, ``init_process_group``):
    until a rank has finished its first step it may be silent for ``max(hang_timeout_s, startup_s)``
    (imports, joining, building the model, planning, the first step). Which rank is blamed when several
    are silent (a hung rank's peers wait for it in a collective, so they go silent too): a stopped
    process first, then the lowest last step, then the longest silence."""

    def __init__(self, world_size: int, hang_timeout_s: float, *, startup_s: float = 120.0) -> None:
        if not hang_timeout_s > 0:
            raise ValueError(f"hang_timeout_s must be > 0, got {hang_timeout_s}")
        self.world_size = world_size
        self.hang_timeout_s = float(hang_timeout_s)
        self.startup_s = float(startup_s)
        self.folder: Path | None = None
        self._seen: list[tuple[int, int, int] | None] = [None] * world_size
        self._changed_at: list[float] = [0.0] * world_size

    def start(self) -> dict[str, str]:
        if self.folder is not None:
            raise RuntimeError("this HangWatch is already watching a launch; use one per launch")
        _remove_stale_folders()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-"))
        self._seen = [None] * self.world_size
        self._changed_at = [time.monotonic()] * self.world_size
        return {HEARTBEAT_DIR_ENV: str(self.folder)}

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> HangWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, now: float | None = None) -> list[RankBeat]:
        """Every rank's heartbeat as of ``now`` (``time.monotonic()``)."""
        if self.folder is None:
            raise RuntimeError("HangWatch.read before start()")
        now = time.monotonic() if now is None else now
        beats = []
        for rank in range(self.world_size):
            seen = _read_beat(heartbeat_path(self.folder, rank))
            if seen is not None and seen != self._seen[rank]:
                self._seen[rank] = seen
                self._changed_at[rank] = now
            seen = self._seen[rank]
            pid, step = (None, None) if seen is None else (seen[0], seen[1])
            state = None if pid is None else _proc_state(pid)
            beats.append(RankBeat(rank, pid, step, now - self._changed_at[rank], state))
        return beats

    def allowed_s(self, beat: RankBeat) -> float:
        """How long this rank may be silent: ``hang_timeout_s``, or more before its first step is done."""
        started = beat.step is not None and beat.step >= 1
        return self.hang_timeout_s if started else max(self.hang_timeout_s, self.startup_s)

    def stalled(self, now: float | None = None) -> Stall | None:
        """The rank to blame when some rank has been silent for longer than allowed, else None."""
        beats = self.read(now)
        running = [b for b in beats if not b.exited]
        if not any(b.silent_s >= self.allowed_s(b) for b in running):
            return None
        silent = [b for b in running if b.silent_s >= self.allowed_s(b) or b.stopped]
        worst = min(silent, key=lambda b: (not b.stopped, -1 if b.step is None else b.step, -b.silent_s))
        return Stall(worst.rank, worst.silent_s, worst.step, tuple(beats))

    def check(self) -> str | None:
        stall = self.stalled()
        return None if stall is None else f"{stall.message()}\n{stall.details()}"

    def rank_pids(self) -> list[int]:
        """The pids the ranks wrote in their heartbeats (ranks that have not written one are missing)."""
        return [b.pid for b in self.read() if b.pid is not None]


def _remove_stale_folders() -> None:
    """Remove the heartbeat folders of launchers that are gone (killed with SIGKILL: nobody else will)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _read_beat(path: Path) -> tuple[int, int, int] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_BEAT.size)
    except FileNotFoundError:
        return None
    if len(data) < _BEAT.size:
        return None
    pid, step, beats = _BEAT.unpack(data)
    return (pid, step, beats) if pid > 0 else None


def _proc_state(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[0]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (state, ppid, pgrp, ...), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


# --- the ranks: joining, clipping -------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one rank computes and how it talks: ``device`` (``cpu`` or ``cuda:LOCAL_RANK``) and the
    process-group ``backend`` that goes with it (gloo for the CPU, NCCL for CUDA)."""

    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(device: str, *, local_rank: int, local_world_size: int, num_gpus: int) -> Placement:
    """The placement of rank ``local_rank`` of the ``local_world_size`` ranks on this node, for ``--device
    device`` (auto, cpu or cuda) on a machine with ``num_gpus`` visible CUDA devices (0: no CUDA).

    auto: CUDA with NCCL when a GPU is visible, else the CPU with gloo; cpu: always the CPU; cuda: one GPU per
    local rank, ``ValueError`` naming the numbers when there is no GPU or fewer GPUs than local ranks. Pure,
    so every rank raises the same error before any collective."""
    if device not in DEVICE_NAMES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_NAMES)}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local rank {local_rank} is outside 0..{local_world_size - 1} (LOCAL_WORLD_SIZE)")
    if device == "cpu" or (device == "auto" and num_gpus == 0):
        return Placement(torch.device("cpu"), "gloo")
    if num_gpus == 0:
        raise ValueError(
            "--device cuda, but CUDA is not available in this process (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu or auto"
        )
    if local_world_size > num_gpus:
        raise ValueError(
            f"--device {device}: {local_world_size} ranks on this node but only {num_gpus} GPU(s) visible; "
            f"each rank needs its own GPU (start at most {num_gpus} ranks per node, or use --device cpu)"
        )
    return Placement(torch.device("cuda", local_rank), "nccl")


def rank_placement(device: str, environ: Mapping[str, str] = os.environ) -> Placement:
    """:func:`resolve_device` for this process: its local rank and node size from the launcher's
    ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (0 and 1 for one process) and the GPUs torch sees."""
    return resolve_device(
        device,
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", "1")),
        num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
    )


def use_device(placement: Placement) -> None:
    """Make ``placement.device`` this process's current CUDA device (a no-op on the CPU), so that
    NCCL's communicators, ``torch.cuda.current_stream()`` and the runtime's streams are on it."""
    if placement.is_cuda:
        torch.cuda.set_device(placement.device)


@dataclass(frozen=True)
class DistContext:
    """One joined rank: its global ``rank`` of ``world``, its process groups, its heartbeat and the
    ``device`` its model, batches and the runtime's streams live on."""

    rank: int
    world: int
    groups: ProcessGroups
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat(None), compare=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size a launcher (torchrun, :func:`launch`) gave this process, 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(par: ParallelConfig, config_for_hash: Any, *, device: str = "cpu") -> DistContext | None:
    """Join the process group of a launched rank and build the groups; ``None`` for one process.

    ``device`` is ``run.device``: the rank's placement (:func:`rank_placement`) decides the device, made
    current here, and the backend of every group; the rest is the same for gloo and NCCL. A bad device
    raises before anything else. Under fsmoe's launchers: die with the launcher
    (:func:`die_with_launcher`) and beat step 0, so the watchdog knows this rank is up
    (``ctx.heartbeat(step)`` after each step from then on)."""
    if not par.distributed:
        return None
    world = env_world_size()
    if world != par.nproc:
        raise ValueError(
            f"--nproc {par.nproc} does not match the launcher's WORLD_SIZE={world}; "
            "start with `fsmoe train --nproc N` or `torchrun --nproc-per-node N -m fsmoe train ...`"
        )
    placement = rank_placement(device)
    die_with_launcher()
    heartbeat = Heartbeat.from_env()
    heartbeat(0)
    use_device(placement)
    timeout = timedelta(seconds=par.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(placement.backend, timeout=timeout,
                                device_id=placement.device if placement.is_cuda else None)
    elif dist.get_backend() != placement.backend:
        raise ValueError(f"the process group is already joined with {dist.get_backend()}, but --device {device} "
                         f"needs {placement.backend} here")
    groups = build_groups(ParallelDims.from_config(par), channels=2, timeout=timeout)
    config_hash_check(config_for_hash)
    return DistContext(dist.get_rank(), dist.get_world_size(), groups, heartbeat, placement.device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def global_grad_norm(model: nn.Module, world: int, groups: ProcessGroups | None) -> torch.Tensor:
    """The L2 norm of the full model's gradient, after gradient sync. A parameter replicated on k ranks
    is counted 1/k times on each, so one all-reduce over the world sums every element exactly once. The sum
    lives on the parameters' device (NCCL all-reduces CUDA tensors only)."""
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is None:
            continue
        kind = getattr(p, REPLICA_ATTR, "world")
        copies = world if kind == "world" or groups is None else groups.size(kind)
        sq += p.grad.double().square().sum() / copies
    if groups is not None and world > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


def clip_grads_(model: nn.Module, max_norm: float, world: int, groups: ProcessGroups | None,
                norm: torch.Tensor | None = None) -> float:
    """Scale the gradients so that their global norm is at most ``max_norm``; returns the norm before.
    ``norm``: the :func:`global_grad_norm` already computed this step (saves its pass and all-reduce)."""
    if norm is None:
        norm = global_grad_norm(model, world, groups)
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return float(norm)


# --- the local launcher -------------------------------------------------------------------------------


def launch(argv: Sequence[str], nproc: int, module: str = "fsmoe", *, hang_timeout_s: float | None = None) -> int:
    """Run ``python -m <module> <argv>`` on ``nproc`` local ranks with torch's elastic launcher; returns
    0 when every rank succeeded, 1 otherwise (the launcher has then stopped the remaining ranks).

    The ranks die with this process (:func:`die_with_launcher`, in :func:`setup`). ``hang_timeout_s``:
    stop the job when a rank's heartbeat stands still that long (see the module doc); None: no watchdog."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fsmoe-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    watch = None if hang_timeout_s is None else HangWatch(nproc, hang_timeout_s)
    watch_env = {} if watch is None else watch.start()
    stalled = threading.Event()
    done = threading.Event()
    watcher = None
    if watch is not None:
        watcher = threading.Thread(target=_watch_children, args=(watch, stalled, done), daemon=True)
        watcher.start()
    try:
        with _environ(
            {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), LAUNCHER_PID_ENV: str(os.getpid()), **watch_env}
        ):
            elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
    except ChildFailedError as err:
        if not stalled.is_set():
            print(f"fsmoe: a rank failed, all ranks were stopped:\n{err.format_msg()}", file=sys.stderr, flush=True)
        return 1
    except SignalException as err:  # Ctrl-C or SIGTERM: torch's agent has stopped the ranks; say so in one line
        print(f"fsmoe: interrupted (signal {err.sigval}); all ranks were stopped", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
        if watch is not None:
            watch.close()
    return 1 if stalled.is_set() else 0


def _watch_children(watch: HangWatch, stalled: threading.Event, done: threading.Event) -> None:
    """The watchdog thread of :func:`launch`: on a stall, say so and SIGKILL every rank (and its group);
    the elastic agent then sees them fail and returns. Kills only our own children (pid reuse)."""
    while not done.wait(_WATCH_POLL_S):
        stall = watch.stalled()
        if stall is None:
            continue
        print(f"fsmoe: {stall.message()}\n{stall.details()}", file=sys.stderr, flush=True)
        stalled.set()
        while not done.is_set():  # again until the agent returns: a rank that had not beaten yet may show up
            for pid in watch.rank_pids():
                _kill_child(pid)
            done.wait(_WATCH_POLL_S)
        return


def _kill_child(pid: int) -> None:
    stat = _proc_stat(pid)
    if stat is None or int(stat[1]) != os.getpid():
        return  # gone, or no longer ours
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if int(stat[2]) == pid:  # a group leader (the elastic agent starts each rank in its own session)
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment (the elastic agent copies it into every rank)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
