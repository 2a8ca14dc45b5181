"""Checkpoints that do not depend on the layout: save under any (MP, EP, ESP), resume under any other.

Legend: N elements of one tensor (flattened), K parameters of the full model.

**What is stored.** Every parameter of the full, unsharded model once, as its global tensor under the
name the single-device model gives it (``blocks.1.mlp.experts.w1_eDH`` is all E experts' full hidden
dim; attention is the fused ``qkv`` of every head), and AdamW's state the same way (``exp_avg`` and
``exp_avg_sq`` as global tensors, its ``step`` counter per parameter); plus torch's CPU RNG state of
every rank (dropout and noisy gates draw from it, and it differs between ranks; on a GPU the device's
too), the training data sampler's generator state, the step, and the job (``job.toml``, the plan in
``plan.json`` if any). A resume into the world size that saved gives each rank its own RNG state back,
so it continues bit for bit; into another world size every rank takes rank 0's.

**How shards map to global tensors** (:class:`ShardMap`). Rather than a second copy of the sharding
rules (fused ``qkv`` rows of one MP rank are three separate row blocks, ESP slices hidden columns, and
other models shard differently), each rank *probes* them: it builds the full model in float64 whose
every element holds its own global position (exact below 2**53), shards it with the very
:func:`~fsmoe.parallel.parallelize.parallelize_gpt` the trainer uses, and reads where each local
element came from. Saving reduces every global tensor onto rank 0 (each element sent by one owner,
the lowest rank holding it; bit patterns summed as integers with zeros, so the values arrive bit for
bit), and rank 0 writes them with :mod:`torch.distributed.checkpoint` (DCP) as one single-process
checkpoint. Loading reads the global tensors on every rank and picks its elements by the same map.

*Why not DCP's sharded save* (each rank writing its own slices as DTensor shards): a DTensor shard
is a contiguous block per mesh coordinate, which MP's fused ``qkv`` rows are not, and ESP/EP slices
would need one mesh per parameter kind; gathering onto rank 0 holds the full weights and both AdamW
moments there at once (3× the model's parameter bytes, plus one parameter's integer buffer at a time) —
fine for models one host holds, not beyond.

**On disk.** ``<out>/checkpoints/step_000010/`` (DCP's ``.metadata`` and data file, ``job.toml``,
``plan.json``, and ``meta.json`` with the step, the layout and every file's size and SHA-256) and
``<out>/checkpoints/latest``, a text file naming the newest checkpoint. A save is written into a
temporary directory beside it (``.tmp-step_000010``), synced, renamed into place, and only then is
``latest`` replaced (a synced temporary file renamed over it): a save killed at any point leaves the
last good checkpoint and ``latest`` as they were, and the next save removes the leftovers. The newest
``keep`` checkpoints are kept, and any of a later step than the one just saved (an abandoned future,
left by resuming from an older checkpoint into the same run directory) are removed.

**Checks** (:func:`read_checkpoint`, :func:`check_resume`; pure file reads, so every rank and the
launching process raise the same ``ValueError`` before any collective): a missing directory, a
partial save, a file whose size or SHA-256 differs from ``meta.json``, a model config that differs from
the job (naming each field), a checkpoint already at or past ``--steps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from fsmoe.config import JobConfig, load_toml
from fsmoe.models import build_lm
from fsmoe.parallel.parallelize import parallelize_gpt
from fsmoe.train.data import BatchSampler
from fsmoe.train.distributed import DistContext, keep_alive

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
JOB_FILE = "job.toml"
PLAN_FILE = "plan.json"
FORMAT = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; its "step" is one number per parameter
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# --- where each local element lives in the full model ------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One local parameter: its elements (flattened) are elements ``index_N`` of global parameter ``full``
    (flattened); ``owned_N`` marks those this rank sends when saving (it is their lowest-ranked holder)."""

    full: str
    index_N: Tensor
    owned_N: Tensor


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ShardMap:
    """Where this rank's parameters sit in the full model's global tensors (see the module doc).

    ``shapes`` is every global parameter's shape, in the full model's order (a tied parameter once);
    ``slots`` maps each local parameter name to its :class:`Slot` (CPU tensors); ``device`` is where the
    model lives, so where the collectives' buffers go (gloo: the CPU, NCCL: the GPU). Built by
    :meth:`probe`."""

    def __init__(self, shapes: dict[str, torch.Size], slots: dict[str, Slot], ctx: DistContext | None,
                 device: torch.device) -> None:
        self.shapes = shapes
        self.slots = slots
        self.ctx = ctx
        self.device = device

    def reduce_to_main(self, t: Tensor) -> Tensor:
        """Sum of ``t`` (a CPU tensor) over ranks, on rank 0 (a collective when distributed; the others
        get their own partial back)."""
        if self.ctx is None:
            return t
        on_device = t.to(self.device)
        dist.reduce(on_device, dst=0)
        return on_device.cpu()

    @classmethod
    def probe(cls, job: JobConfig, model: nn.Module, ctx: DistContext | None) -> ShardMap:
        """The map of ``model`` (this rank's model of ``job``, as :func:`fsmoe.train.trainer.build_model`
        made it). Collective when ``ctx`` is set (one all-reduce that picks each element's owner). Draws
        nothing from the global RNG."""
        with torch.random.fork_rng(devices=[]), _default_dtype(torch.float64), torch.no_grad():
            probe = build_lm(job.model)
            full = dict(probe.named_parameters())
            shapes = {name: p.shape for name, p in full.items()}
            starts, start = [], 0
            for p in full.values():
                starts.append(start)
                p.copy_(torch.arange(start + 1, start + 1 + p.numel(), dtype=torch.float64).view_as(p))
                start += p.numel()
            total = start
            if ctx is not None:
                parallelize_gpt(probe, ctx.groups, job.parallel.dispatcher)
            probed = dict(probe.named_parameters())
        names = list(full)
        starts_K = torch.tensor(starts)
        positions: dict[str, tuple[str, Tensor]] = {}
        for name, p in model.named_parameters():
            if name not in probed or probed[name].shape != p.shape:
                got = "missing" if name not in probed else f"shape {tuple(probed[name].shape)}"
                raise ValueError(f"cannot map parameter {name!r} {tuple(p.shape)} to the full model: its probe is "
                                 f"{got}")
            values_N = probed[name].detach().reshape(-1)
            if probed[name].dtype != torch.float64 or not bool(
                    ((values_N == values_N.round()) & (values_N >= 1) & (values_N <= total)).all()):
                raise ValueError(f"parameter {name!r} is not a copy of elements of the full model (its sharding "
                                 "computes or casts its values), so it cannot be checkpointed by position")
            global_N = values_N.long() - 1
            k_N = torch.searchsorted(starts_K, global_N, right=True) - 1
            ks = k_N.unique()
            if ks.numel() != 1 or global_N.unique().numel() != global_N.numel():
                raise ValueError(f"parameter {name!r} mixes elements of several full parameters or repeats some")
            positions[name] = (names[int(ks)], global_N)
        device = next(model.parameters()).device
        owner_N = torch.full((total,), ctx.world if ctx is not None else 1, dtype=torch.int32)
        rank = 0 if ctx is None else ctx.rank
        for _, global_N in positions.values():
            owner_N[global_N] = rank
        if ctx is not None:
            owner_N = owner_N.to(device)
            dist.all_reduce(owner_N, op=dist.ReduceOp.MIN)  # the lowest rank holding an element sends it
            owner_N = owner_N.cpu()
        missing = (owner_N == (ctx.world if ctx is not None else 1)).nonzero().reshape(-1)
        if missing.numel():
            first = int(missing[0])
            k = int(torch.searchsorted(starts_K, torch.tensor(first), right=True)) - 1
            raise ValueError(f"no rank holds element {first - starts[k]} of parameter {names[k]!r}")
        start_of = dict(zip(names, starts, strict=True))
        slots = {
            name: Slot(full=full_name, index_N=global_N - start_of[full_name], owned_N=owner_N[global_N] == rank)
            for name, (full_name, global_N) in positions.items()
        }
        return cls(shapes, slots, ctx, device)

    def gather(self, tensors: Mapping[str, Tensor | None], dtype: torch.dtype) -> dict[str, Tensor] | None:
        """The global tensors of a set of local ones (local parameter name → a tensor of its shape, or None
        for zeros), as a full name → tensor dict of ``dtype`` on rank 0 (None on the other ranks).
        Collective when distributed: one reduce per global parameter, of bit patterns (exact)."""
        by_full: dict[str, list[tuple[Slot, Tensor]]] = {name: [] for name in self.shapes}
        for name, t in tensors.items():
            if t is not None:
                by_full[self.slots[name].full].append((self.slots[name], t))
        size = torch.tensor([], dtype=dtype).element_size()
        wide = torch.int64 if size == 8 else torch.int32  # a sum of one value and zeros: exact at any width
        out: dict[str, Tensor] = {}
        for name, shape in self.shapes.items():
            bits_N = torch.zeros(shape.numel(), dtype=wide)
            for slot, t in by_full[name]:
                if t.dtype != dtype:
                    raise ValueError(f"a tensor of {name!r} is {t.dtype}, expected {dtype}")
                local_N = t.detach().reshape(-1).cpu()[slot.owned_N]
                bits_N[slot.index_N[slot.owned_N]] = local_N.view(_INT_OF_SIZE[size]).to(wide)
            bits_N = self.reduce_to_main(bits_N)  # each element comes from one rank, the others add zeros
            if self.ctx is None or self.ctx.is_main:
                out[name] = bits_N.to(_INT_OF_SIZE[size]).view(dtype).view(shape)
        return out if self.ctx is None or self.ctx.is_main else None

    def gather_firsts(self, values: Mapping[str, float]) -> Tensor | None:
        """One number per global parameter (local parameter name → its value, e.g. AdamW's step), as a
        float64 tensor in ``shapes`` order on rank 0 (None elsewhere); sent by the owner of element 0."""
        names = list(self.shapes)
        bits_K = torch.zeros(len(names), dtype=torch.int64)
        for name, value in values.items():
            slot = self.slots[name]
            if bool((slot.owned_N & (slot.index_N == 0)).any()):
                bits_K[names.index(slot.full)] = torch.tensor([value], dtype=torch.float64).view(torch.int64)[0]
        bits_K = self.reduce_to_main(bits_K)
        return bits_K.view(torch.float64) if self.ctx is None or self.ctx.is_main else None

    def local(self, name: str, full: Tensor) -> Tensor:
        """Local parameter ``name``'s part of its global tensor ``full`` (flattened)."""
        return full.reshape(-1)[self.slots[name].index_N]


# --- reading and checking a checkpoint -----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk: its directory, step, the world that wrote it, its job and meta.json."""

    path: Path
    step: int
    world: int
    job: JobConfig
    meta: dict[str, Any]

    @property
    def run_dir(self) -> Path | None:
        """The run directory whose ``checkpoints/`` holds it, if it lies in one."""
        return self.path.parent.parent if self.path.parent.name == CHECKPOINTS_DIR else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself when it holds ``meta.json``, else the one that
    ``latest`` names in ``path/checkpoints/`` (a run directory) or in ``path`` (a checkpoints directory)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--resume {str(p)!r}: no such directory")
    if (p / META_FILE).is_file():
        return p
    for root in (p / CHECKPOINTS_DIR, p):
        latest = root / LATEST_FILE
        if latest.is_file():
            name = latest.read_text().strip()
            target = root / name
            if not _STEP_DIR.fullmatch(name) or not target.is_dir():
                raise ValueError(f"--resume {str(p)!r}: {str(latest)!r} names {name!r}, which is not a checkpoint "
                                 f"directory in {str(root)!r}")
            return target
    if p.name.startswith(_TMP_PREFIX):
        raise ValueError(f"--resume {str(p)!r} is a partial checkpoint (a save that did not finish)")
    if (p / ".metadata").exists() or _STEP_DIR.fullmatch(p.name):
        return p  # read_checkpoint says what it lacks
    raise ValueError(f"--resume {str(p)!r} is neither a checkpoint directory (with {META_FILE}) nor a run directory "
                     f"with {CHECKPOINTS_DIR}/{LATEST_FILE}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """The checkpoint ``path`` names (:func:`resolve_checkpoint`), checked complete and intact: its
    ``meta.json`` parses and every file it lists has the recorded size and (``verify``) SHA-256;
    ``ValueError`` naming the file otherwise. With ``verify`` it reads every file once."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / META_FILE).is_file():
        raise ValueError(f"checkpoint {str(ckpt)!r} is incomplete: it has no {META_FILE}")
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        step, world, files = int(meta["step"]), int(meta["world"]), dict(meta["files"])
        if meta["format"] != FORMAT:
            raise ValueError(f"format {meta['format']}, this fsmoe reads format {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} is corrupt: its {META_FILE} does not read ({e})") from None
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            raise ValueError(f"checkpoint {str(ckpt)!r} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"checkpoint {str(ckpt)!r} is corrupt: {name} has {size} bytes, {META_FILE} says "
                             f"{want['bytes']}")
        if verify and _sha256(f) != want["sha256"]:
            raise ValueError(f"checkpoint {str(ckpt)!r} is corrupt: the SHA-256 of {name} differs from {META_FILE}")
    if JOB_FILE not in files or ".metadata" not in files:
        raise ValueError(f"checkpoint {str(ckpt)!r} is incomplete: {META_FILE} lists no {JOB_FILE} or .metadata")
    return Checkpoint(path=ckpt, step=step, world=world, job=load_toml(ckpt / JOB_FILE), meta=meta)


def config_differences(a: object, b: object, prefix: str) -> list[str]:
    """``"prefix.field (a, b)"`` for every field where two config dataclasses differ (nested ones too)."""
    diffs = []
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            diffs += config_differences(x, y, f"{prefix}.{f.name}")
        elif x != y:
            diffs.append(f"{prefix}.{f.name} ({x!r}, {y!r})")
    return diffs


def check_resume(job: JobConfig, *, verify: bool = True) -> Checkpoint | None:
    """The checkpoint ``job.train.resume`` names, checked (:func:`read_checkpoint`; ``verify``: its files'
    hashes too) and fit for ``job``: the same model config, and fewer steps done than ``train.steps``. None
    when not resuming. Pure file reads: the same ``ValueError`` on every rank and in the launching process."""
    if job.train.resume is None:
        return None
    ckpt = read_checkpoint(job.train.resume, verify=verify)
    diffs = config_differences(ckpt.job.model, job.model, "model")
    if diffs:
        raise ValueError(f"--resume {job.train.resume!r}: the checkpoint's model differs from this job's in "
                         f"{'; '.join(diffs)} (checkpoint, job); pass the same model flags, or "
                         f"--config {str(ckpt.path / JOB_FILE)!r}")
    if ckpt.step >= job.train.steps:
        raise ValueError(f"--resume {job.train.resume!r}: the checkpoint is at step {ckpt.step}, and --steps "
                         f"{job.train.steps} leaves nothing to do; pass --steps above {ckpt.step}")
    return ckpt


# --- saving ----------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(root: Path) -> None:
    """Temporaries of saves that did not finish (killed), and directories a save replaced."""
    for p in root.iterdir():
        if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            p.unlink(missing_ok=True)


def _write_files(tmp: Path, state: dict[str, Tensor], texts: dict[str, str], meta: dict[str, Any]) -> None:
    """Everything of one checkpoint into ``tmp``, ``meta.json`` (with every file's size and hash) last,
    each file and the directory synced."""
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the design here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=True)
    for name, text in texts.items():
        (tmp / name).write_text(text)
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` (moving an existing ``final`` aside first)."""
    if final.exists():
        final.rename(final.with_name(_OLD_PREFIX + final.name))
    tmp.rename(final)
    _fsync(final.parent)


def _point_latest(root: Path, name: str) -> None:
    """Replace ``root/latest`` atomically with ``name``."""
    tmp = root / f"{_TMP_PREFIX}{LATEST_FILE}"
    with tmp.open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync(root)


def rewind_latest(ckpt: Checkpoint) -> None:
    """Point ``latest`` of the run that holds ``ckpt`` back at it: a run resumed in place from an earlier
    checkpoint and stopped before its next save resumes from there again, not from the checkpoints of the
    abandoned continuation (those are removed at the next save, :func:`_prune`)."""
    _point_latest(ckpt.path.parent, ckpt.path.name)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; remove older ones and any after ``step``."""
    steps = sorted(int(m[1]) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)))
    kept = [s for s in steps if s <= step][-keep:]
    for s in steps:
        if s not in kept:
            shutil.rmtree(root / step_dir_name(s), ignore_errors=True)
    _remove_leftovers(root)


def _save_checkpoint(
    out: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, shards: ShardMap, *,
    samplers: Mapping[str, BatchSampler], job_toml: str, plan_json: str | None, keep: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save the training state after ``step`` as ``<out>/checkpoints/step_NNNNNN`` and point ``latest``
    at it (see the module doc); returns that path. ``samplers``: the data samplers by name (every rank's
    are alike; rank 0's are stored); ``extra``: JSON values for ``meta.json`` (the trainer's clock and
    first loss). Collective when distributed: call it on every rank at the same step. A failure to
    write on rank 0 is raised on every rank."""
    ctx = shards.ctx
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    weights = shards.gather(params, dtype)
    moments = {key: shards.gather({n: opt.state.get(p, {}).get(key) for n, p in params.items()}, dtype)
               for key in MOMENTS}
    steps = shards.gather_firsts({n: float(opt.state[p]["step"]) if p in opt.state else 0.0
                                  for n, p in params.items()})
    rngs = {"rng.cpu": torch.get_rng_state()}
    if shards.device.type == "cuda":  # dropout on the GPU draws from the device's generator
        rngs["rng.cuda"] = torch.cuda.get_rng_state(shards.device)
    for key, rng in rngs.items():
        if ctx is not None:
            everyone = [torch.empty_like(rng, device=shards.device) for _ in range(ctx.world)]
            dist.all_gather(everyone, rng.to(shards.device))
            rngs[key] = torch.stack(everyone).cpu()
        else:
            rngs[key] = rng[None]
    root = Path(out) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    error: Exception | None = None
    if ctx is None or ctx.is_main:
        assert weights is not None and steps is not None
        state: dict[str, Tensor] = {f"model.{n}": t for n, t in weights.items()}
        for key, values in moments.items():
            assert values is not None
            state.update({f"optim.{key}.{n}": t for n, t in values.items()})
        state["optim.step"] = steps
        state.update(rngs)
        for name, sampler in samplers.items():
            state.update({f"data.{name}.{k}": v for k, v in sampler.state_dict().items()})
        texts = {JOB_FILE: job_toml} | ({PLAN_FILE: plan_json} if plan_json is not None else {})
        meta = {"format": FORMAT, "step": step, "world": 1 if ctx is None else ctx.world,
                "params": list(shards.shapes), **(extra or {})}
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp = root / (_TMP_PREFIX + final.name)
            _write_files(tmp, state, texts, meta)
            _publish(tmp, final)
            _point_latest(root, final.name)
            _prune(root, step, keep)
        except Exception as e:  # noqa: BLE001 - told to every rank below, then raised here
            error = e
    if ctx is not None:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=shards.device)
        dist.broadcast(failed, src=0)
        if failed.item() and not ctx.is_main:
            raise RuntimeError(f"rank 0 could not write the checkpoint {str(final)!r} (its error is in its log)")
    if error is not None:
        raise error
    return final


def save_checkpoint(out: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, shards: ShardMap,
                    **kw: Any) -> Path:
    """:func:`_save_checkpoint` (same arguments), beating this rank's heartbeat while it gathers and writes."""
    with keep_alive(shards.ctx.heartbeat) if shards.ctx is not None else contextlib.nullcontext():
        return _save_checkpoint(out, step, model, opt, shards, **kw)


# --- loading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What the trainer continues from: the step done, and the ``extra`` it saved in ``meta.json``."""

    step: int
    extra: dict[str, Any]


def read_tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    """Every tensor of a checkpoint by its key: ``model.<name>``, ``optim.<exp_avg|exp_avg_sq>.<name>``
    (global tensors), ``optim.step`` (per parameter, in ``meta["params"]`` order), ``rng.cpu`` (one row
    per rank; ``rng.cuda`` likewise from a GPU run), ``data.train.generator``."""
    reader = dcp.FileSystemReader(ckpt.path)
    metadata = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()}  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _load_checkpoint(
    ckpt: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, shards: ShardMap, *,
    samplers: Mapping[str, BatchSampler],
) -> Restored:
    """Load ``ckpt`` into this rank's ``model`` (its shards of the global tensors), ``opt`` (AdamW state
    of those shards) and ``samplers``; then set torch's CPU RNG to this rank's saved state (the saved
    rank's of the same index when the world size is the one that saved, else rank 0's), so call it last
    before the first step. No collective: every rank reads the files itself."""
    state = read_tensors(ckpt)
    names = list(shards.shapes)
    if ckpt.meta["params"] != names:
        raise ValueError(f"checkpoint {str(ckpt.path)!r} holds parameters {ckpt.meta['params']}, this model has "
                         f"{names}")
    steps = dict(zip(names, state["optim.step"].tolist(), strict=True))
    index_of = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    opt_state: dict[int, dict[str, Tensor]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = shards.slots[name].full
            p.copy_(shards.local(name, state[f"model.{full}"]).view_as(p))
            if steps[full] > 0:  # a parameter never stepped has no AdamW state yet
                opt_state[index_of[id(p)]] = {"step": torch.tensor(steps[full])} | {
                    key: shards.local(name, state[f"optim.{key}.{full}"]).view_as(p).clone() for key in MOMENTS
                }
    opt_sd = opt.state_dict()
    opt.load_state_dict({"state": opt_state, "param_groups": opt_sd["param_groups"]})
    for sampler_name, sampler in samplers.items():
        prefix = f"data.{sampler_name}."
        sampler.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    rank, world = (0, 1) if shards.ctx is None else (shards.ctx.rank, shards.ctx.world)
    row = rank if world == ckpt.world else 0
    # copies, not row views: set_rng_state crashes on a view with a storage offset
    torch.set_rng_state(state["rng.cpu"][row].clone())
    if shards.device.type == "cuda" and "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"][row].clone(), shards.device)
    extra = {k: v for k, v in ckpt.meta.items() if k not in ("format", "step", "world", "params", "files")}
    return Restored(step=ckpt.step, extra=extra)



def load_checkpoint(ckpt: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, shards: ShardMap,
                    **kw: Any) -> Restored:
    """:func:`_load_checkpoint` (same arguments), beating this rank's heartbeat while it reads."""
    with keep_alive(shards.ctx.heartbeat) if shards.ctx is not None else contextlib.nullcontext():
        return _load_checkpoint(ckpt, model, opt, shards, **kw)


__all__ = [
    "CHECKPOINTS_DIR", "Checkpoint", "LATEST_FILE", "Restored", "ShardMap", "Slot", "check_resume", "rewind_latest",
    "config_differences", "load_checkpoint", "read_checkpoint", "read_tensors", "resolve_checkpoint",
    "save_checkpoint", "step_dir_name",
]
