"""Online profiling: time every operation of one job on its real process groups, fit α-β lines, cache them.

Paper §3.2 and §6.2 (digest §1.4): before training, FSMoE times each sub-module over a range of sizes and
fits t = α + β·n per operation (:func:`fsmoe.perf.fit.fit_linear`), once per cluster; the models and the
planner then need no knowledge of the implementation. Here every rank of the job's gloo world calls
:func:`profile_job` (collective: same job on every rank) and gets the same :class:`~fsmoe.perf.costs.Costs`.

What is timed, and what n means (per rank; C the gate's capacity for this rank's T tokens, c = C/r a
pipeline chunk, E experts, W = N_EP, S = N_ESP, D model dim, H expert hidden, G the expert's GEMMs):

========== ==================================================== ===============================================
op         the call (what the pipelined block runs)             n, sizes swept
========== ==================================================== ===============================================
a2a        ``dispatcher.exchange`` of a (W, e, c, D) chunk on   bytes this rank sends, E·c·D·4; c = C/8 … C
           the job's dispatcher, EP group of channel 0
ag / rs    ``gather_shards`` / ``reduce_shards`` (ESP group,    the gathered bytes, S·E·c·D·4; c = C/8 … C
           channel 0)
gar        all-reduce of a flat buffer on the dense-DP group    bytes; 1/8 … 1 of the dense gradient of a step
           of channel 1 (the second set of communicators)
expert_fwd ``experts.forward_saving`` on (e, S·W·c, D)           MACs of the chunk, E·c·D·H·G; c = C/8 … C
expert_bwd ``experts.backward_saved`` on what a fresh forward    the same n (its GEMMs are twice the forward's)
           saved (untimed, before each call: as in training)
gate_fwd   gate → Order → I-Order on T' tokens, autograd on     T'·D·E (E·slots for SoftMoE); T' = T/8 … T
gate_bwd   backward through that path (and the aux loss)        the same n
dense_fwd  LayerNorm → attention (+ residual) → LayerNorm, the  this rank's tokens·D², tokens = b·L/N_MP for
           MP attention on the MP group when N_MP > 1           b sequences, b = B/8 … B (B per rank)
dense_bwd  backward through that                                the same n
========== ==================================================== ===============================================

Each point's time is the slowest rank's (a collective ends when its last rank does; compute on the
ranks runs side by side, as in training), the median over rounds (:func:`fsmoe.perf.fit.measure`).
Collectives are measured twice: idle, and while a thread on every rank runs expert GEMMs (the forward
of the matching chunk; a whole layer's beside the Gradient-AllReduce), as the pipelined runtime overlaps
them (compute on the calling thread, collectives on lane threads). The GEMMs may end before the
collective does (a chunk's GEMMs beside a long AlltoAll; any beside a large all-reduce), so the busy time
is that of a partly overlapped collective: with the idle line and the compute's own time per sample,
:func:`fsmoe.perf.fit.contended_line` turns it into ``Costs.busy`` — the collective *fully* overlapped,
κ × the idle line, which is what :func:`fsmoe.perf.model.play_contended` scales by each task's overlap.
On this machine an overlapped AlltoAll is 1.4–2.5× its idle time: softirq and TCP work compete with the
GEMMs for the same cores. The GEMMs beside it slow too: with their own time per sample and the
``expert_fwd`` line, :func:`fsmoe.perf.fit.compute_slowdown` gives ``Costs.beside`` — σ per collective,
how much longer compute runs while that collective runs beside it (1.0–2.3× on the 14 planner-accuracy
profiles of this machine; not measured on a GPU).

Bounded: ``budget_s`` (default 30 s) is split evenly over the measurements still to run, and each one
fits itself into its share (fewer repetitions, then fewer sizes, then smaller sizes, noted in
``meta["scaled"]``; see :mod:`fsmoe.perf.fit`). Rank 0 prints a progress line per measurement.

Cached (:func:`load_or_profile`) as JSON keyed by the topology and the sizes that matter
(:func:`profile_key`); :func:`run_profile` starts the job's ranks for the CLI; :func:`format_costs` prints
the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.cluster import EmulatedCluster, EmulatedClusterSpec, LocalCluster, open_cluster, report_progress
from fsmoe.config import JobConfig, MoEConfig, parse_rate
from fsmoe.models import build_lm
from fsmoe.models.gpt_moe import CausalSelfAttention
from fsmoe.models.mixtral import GroupedQueryAttention
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import Experts, build_experts
from fsmoe.moe.gates import build_gate
from fsmoe.moe.order import build_order
from fsmoe.parallel.comm import all_reduce_
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups
from fsmoe.parallel.dispatch import build_dispatcher
from fsmoe.parallel.parallelize import tensor_parallel_attention
from fsmoe.perf.costs import COLLECTIVES, COMPUTE, ZERO, Costs, Linear
from fsmoe.perf.fit import (
    ComputeBeside,
    Measured,
    Point,
    barrier,
    barrier_seconds,
    compute_slowdown,
    contended_line,
    max_all,
    measure,
    slowdown,
    sweep_sizes,
    world_size,
)

__all__ = [
    "BUDGET_S", "JobSizes", "default_cache_dir", "format_costs", "job_sizes", "load_or_profile", "profile_job",
    "profile_key", "run_profile",
]

BUDGET_S = 30.0
PROFILE_FORMAT = 3  # bump when what is measured or how it is fitted changes: older cache entries stop matching
GAR_CHANNEL = 1  # the second set of communicators (build_groups(channels=2)); channel 0 carries the MoE block
BYTES = 4  # float32


# --- the sizes a job's sweep is built around (pure) -----------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class JobSizes:
    """Per rank: ``tokens`` T routed per MoE layer, ``capacity`` C the gate gives them, ``sequences`` and
    ``seq_tokens`` (L / N_MP) of the dense part, ``dense_grad_bytes`` the dense Gradient-AllReduce volume of
    one step; the model's D, H, E, k; the layout; ``gemms`` G, the expert type's GEMMs over D × H;
    ``gate_width`` the gate's logits per token (E, or E·slots for SoftMoE)."""

    tokens: int
    capacity: int
    sequences: int
    seq_tokens: int
    dense_grad_bytes: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    mp: int
    ep: int
    esp: int
    dense_dp: int
    gemms: int
    gate_width: int

    def a2a_bytes(self, c: int) -> int:
        """What one rank sends in the AlltoAll of a chunk of c slots per expert: E·c·D floats (its own
        piece included, as in the pipelined block's buffer)."""
        return self.num_experts * c * self.d_model * BYTES

    def gathered_bytes(self, c: int) -> int:
        """The ESP AllGather's output (and the ReduceScatter's input) for a chunk: S·E·c·D floats."""
        return self.esp * self.a2a_bytes(c)

    def expert_macs(self, c: int) -> int:
        """MACs of one chunk on one rank: e·(S·W·c)·D·(H/S)·G = E·c·D·H·G."""
        return self.num_experts * c * self.d_model * self.d_hidden * self.gemms


def _expert_gemms(expert: str) -> int:
    """The expert type's D × H GEMMs, read from its weights' axis suffixes (``w1_eDH``: one)."""
    with torch.random.fork_rng(devices=[]):
        module = build_experts(expert, 1, 8, 8)
    return sum(1 for name, _ in module.named_parameters() if {"D", "H"} <= set(name.rsplit("_", 1)[-1]))


def _dense_grad_bytes(job: JobConfig) -> int:
    """Bytes of the dense gradient all-reduced per step: every parameter but the experts', attention
    weights divided over the MP shards. Counted on the model built on the meta device (no memory, so a
    paper-sized preset costs nothing)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_lm(job.model)
    mp = job.parallel.mp
    numel = sum(p.numel() // (mp if ".attn." in name else 1) for name, p in model.named_parameters()
                if ".experts." not in name)
    return numel * BYTES


def _gate_capacity(cfg: MoEConfig, d_model: int, tokens: int) -> int:
    """The capacity the job's gate gives ``tokens`` tokens (seeded input: the same on every rank)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        gate = build_gate(cfg, d_model)
        return gate(torch.randn(tokens, d_model)).capacity


def job_sizes(job: JobConfig, tokens: int | None = None) -> JobSizes:
    """The sizes of ``job`` per rank. T = batch_size / N_DP × seq_len / N_MP (training), or ``tokens`` (the
    layer benchmark's T per rank; the dense part then gets tokens / (L / N_MP) sequences, and the
    Gradient-AllReduce that benchmark's ``bench.dense_grad_mb`` MiB per layer when it is > 0)."""
    m, par = job.model, job.parallel
    seq_tokens = m.seq_len // par.mp
    if tokens is None:
        sequences = max(1, job.train.batch_size // par.dense_dp)
        tokens = sequences * seq_tokens
        grad_bytes = _dense_grad_bytes(job)
    else:
        if tokens < 1:
            raise ValueError(f"job_sizes: tokens must be >= 1, got {tokens}")
        sequences = max(1, tokens // seq_tokens)
        grad_bytes = int(job.bench.dense_grad_mb * 2**20) or _dense_grad_bytes(job)
    return JobSizes(
        tokens=tokens, capacity=_gate_capacity(m.moe, m.d_model, tokens), sequences=sequences, seq_tokens=seq_tokens,
        dense_grad_bytes=grad_bytes, d_model=m.d_model, d_hidden=m.moe.d_hidden,
        num_experts=m.moe.num_experts, top_k=m.moe.top_k, mp=par.mp, ep=par.ep, esp=par.esp, dense_dp=par.dense_dp,
        gemms=_expert_gemms(m.moe.expert),
        gate_width=m.moe.num_experts * (m.moe.softmoe_slots if m.moe.gate == "softmoe" else 1),
    )


# --- what one measurement runs ---------------------------------------------------------------------------
class _Workloads:
    """Builds the points of every operation of one job on this rank (weights and inputs seeded)."""

    def __init__(self, job: JobConfig, groups: ProcessGroups | None, sizes: JobSizes) -> None:
        m, par, s = job.model, job.parallel, sizes
        self.sizes, self.groups = s, groups
        self.disp = (build_dispatcher(par.dispatcher, groups, channel=0) if groups is not None and par.ep * par.esp > 1
                     else Dispatcher())
        self.e, self.h = s.num_experts // s.ep, s.d_hidden // s.esp
        self.experts: Experts = build_experts(m.moe.expert, self.e, s.d_model, self.h, fan_in_hidden=s.d_hidden,
                                              owns_output_bias=self.disp.owns_output_bias)
        self.gate, self.order = build_gate(m.moe, s.d_model), build_order(m.moe.order)
        self.gate.train()
        if groups is not None and par.mp > 1:
            attn = tensor_parallel_attention(m, groups.group("mp"))
        elif m.arch == "mixtral":
            attn = GroupedQueryAttention(s.d_model, m.n_heads, m.kv_heads, m.rope_theta, 0.0, 0.02)
        else:
            attn = CausalSelfAttention(s.d_model, m.n_heads, 0.0, 0.02)
        norm = nn.RMSNorm if m.arch == "mixtral" else nn.LayerNorm
        self.dense = nn.ModuleDict({"ln1": norm(s.d_model), "attn": attn, "ln2": norm(s.d_model)})
        self._inputs: dict[int, Tensor] = {}

    def _expert_input(self, c: int) -> Tensor:
        """(e, S·W·c, D): the slots this rank's experts receive for a chunk of c."""
        if c not in self._inputs:
            self._inputs[c] = torch.randn(self.e, self.sizes.esp * self.sizes.ep * c, self.sizes.d_model)
        return self._inputs[c]

    def _busy(self, c: int) -> dict[str, Any]:
        """A busy point's compute (a chunk of c's expert GEMMs) and its workload."""
        return {"busy": self._compute(c), "busy_n": self.sizes.expert_macs(c)}

    def _compute(self, c: int) -> Callable[[], object]:
        """The expert GEMMs of a chunk of c: what runs beside a busy collective."""
        x = self._expert_input(c)
        return lambda: self.experts.forward_saving(x)

    def chunks(self, fractions: Sequence[float], scale: float) -> list[int]:
        return sweep_sizes(self.sizes.capacity, fractions, scale)

    def a2a(self, fractions: Sequence[float], scale: float) -> list[Point]:
        s, disp = self.sizes, self.disp
        pts = []
        for c in self.chunks(fractions, scale):
            buf = torch.randn(s.ep, self.e, c, s.d_model)
            pts.append(Point(n=s.a2a_bytes(c), run=_no_grad(lambda b=buf: disp.exchange(b)), **self._busy(c)))
        return pts

    def ag(self, fractions: Sequence[float], scale: float) -> list[Point]:
        s, disp = self.sizes, self.disp
        pts = []
        for c in self.chunks(fractions, scale):
            x = torch.randn(self.e, s.ep * c, s.d_model)
            pts.append(Point(n=s.gathered_bytes(c), run=_no_grad(lambda x=x: disp.gather_shards(x)),
                              **self._busy(c)))
        return pts

    def rs(self, fractions: Sequence[float], scale: float) -> list[Point]:
        s, disp = self.sizes, self.disp
        pts = []
        for c in self.chunks(fractions, scale):
            y = torch.randn(self.e, s.esp * s.ep * c, s.d_model)
            pts.append(Point(n=s.gathered_bytes(c), run=_no_grad(lambda y=y: disp.reduce_shards(y)),
                              **self._busy(c)))
        return pts

    def gar(self, fractions: Sequence[float], scale: float) -> list[Point]:
        assert self.groups is not None  # skipped without groups: one process has dense DP = 1
        group = self.groups.group("dense_dp", _gar_channel(self.groups))
        busy = self._busy(self.sizes.capacity)  # a whole layer's expert GEMMs beside each all-reduce
        pts = []
        for numel in sweep_sizes(self.sizes.dense_grad_bytes // BYTES, fractions, scale):
            buf = torch.randn(numel)
            pts.append(Point(n=numel * BYTES, run=lambda b=buf: all_reduce_(b, group), **busy))
        return pts

    def expert_fwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        return [Point(n=self.sizes.expert_macs(c), run=self._compute(c)) for c in self.chunks(fractions, scale)]

    def expert_bwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        """The backward on what a fresh forward saved (``prepare``), as the block runs it: not the same
        saved activations, warm in cache, call after call."""
        pts = []
        for c in self.chunks(fractions, scale):
            x = self._expert_input(c)
            dy = torch.randn(x.shape[0], x.shape[1], self.sizes.d_model)
            held: list[tuple[Tensor, ...]] = []

            def prepare(x: Tensor = x, held: list[tuple[Tensor, ...]] = held) -> None:
                held.append(self.experts.forward_saving(x)[1])

            def run(dy: Tensor = dy, held: list[tuple[Tensor, ...]] = held) -> object:
                return self.experts.backward_saved(dy, held.pop())

            pts.append(Point(n=self.sizes.expert_macs(c), run=run, prepare=prepare))
        return pts

    def _gate_path(self, x_TD: Tensor) -> list[Tensor]:
        """Gate → Order → I-Order with the ordered slots standing in for the experts' output; the tensors
        backward starts from (the output and, where it has a gradient, the aux loss)."""
        routing = self.gate(x_TD)
        y_TD = self.order.iorder(self.order.order(x_TD, routing), routing)
        return [t for t in (y_TD, routing.aux_loss) if t.requires_grad]

    def _gate_inputs(self, fractions: Sequence[float], scale: float) -> list[tuple[float, Tensor]]:
        s = self.sizes
        return [(t * s.d_model * s.gate_width, torch.randn(t, s.d_model, requires_grad=True))
                for t in sweep_sizes(s.tokens, fractions, scale)]

    def gate_fwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        return [Point(n=n, run=lambda x=x: self._gate_path(x)) for n, x in self._gate_inputs(fractions, scale)]

    def gate_bwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        return [_backward_point(n, lambda x=x: self._gate_path(x), self.gate, x)
                for n, x in self._gate_inputs(fractions, scale)]

    def _dense_path(self, x_BlD: Tensor) -> list[Tensor]:
        d = self.dense
        return [d["ln2"](x_BlD + d["attn"](d["ln1"](x_BlD)))]

    def _dense_inputs(self, fractions: Sequence[float], scale: float) -> list[tuple[float, Tensor]]:
        s = self.sizes
        return [(b * s.seq_tokens * s.d_model**2, torch.randn(b, s.seq_tokens, s.d_model, requires_grad=True))
                for b in sweep_sizes(s.sequences, fractions, scale)]

    def dense_fwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        return [Point(n=n, run=lambda x=x: self._dense_path(x)) for n, x in self._dense_inputs(fractions, scale)]

    def dense_bwd(self, fractions: Sequence[float], scale: float) -> list[Point]:
        return [_backward_point(n, lambda x=x: self._dense_path(x), self.dense, x)
                for n, x in self._dense_inputs(fractions, scale)]


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def _backward_point(n: float, forward: Callable[[], list[Tensor]], module: nn.Module, x: Tensor) -> Point:
    """A point that times backward from fresh gradients (``prepare`` runs the forward, as training does)."""
    held: list[list[Tensor]] = []

    def prepare() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        held.append(forward())

    def run() -> None:
        outs = held.pop()
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    return Point(n=n, run=run, prepare=prepare)


# --- the profile -----------------------------------------------------------------------------------------
def _skipped(sizes: JobSizes, ops: Collection[str] | None) -> dict[str, str]:
    """Operations the layout does not have, or that were not asked for, and why."""
    if ops is not None and set(ops) - set(COLLECTIVES + COMPUTE):
        raise ValueError(f"unknown operations {sorted(set(ops) - set(COLLECTIVES + COMPUTE))}; "
                         f"choose from {', '.join(COLLECTIVES + COMPUTE)}")
    out = {op: "not measured (not in ops)" for op in COLLECTIVES + COMPUTE if ops is not None and op not in ops}
    if sizes.ep == 1:
        out["a2a"] = "EP = 1: no AlltoAll"
    if sizes.esp == 1:
        out["ag"] = out["rs"] = "ESP = 1: no AllGather / ReduceScatter"
    if sizes.dense_dp == 1:
        out["gar"] = "dense DP = 1: no Gradient-AllReduce"
    return dict(sorted(out.items(), key=lambda kv: (COLLECTIVES + COMPUTE).index(kv[0])))


def _gar_channel(groups: ProcessGroups | None) -> int:
    return 0 if groups is None else min(GAR_CHANNEL, len(groups.channels) - 1)


def profile_job(job: JobConfig, groups: ProcessGroups | None, rank: int, *, tokens: int | None = None,
                budget_s: float = BUDGET_S, ops: Collection[str] | None = None,
                echo: Callable[[str], None] = print) -> Costs:
    """Time every operation of ``job`` on this rank's ``groups`` and fit its α-β lines (module doc).

    Collective: every rank of the initialised world calls it with the same job and gets the same
    :class:`Costs` (``groups`` None: one process without a process group, compute only). ``tokens``: T
    per rank for a single-layer job (the layer benchmark), else T comes from the batch. ``ops``: measure
    only these (the others are zero lines, listed in ``meta["skipped"]``), e.g. no dense part for a
    single-layer benchmark. ``echo`` gets one progress line per operation on rank 0. Torch's global RNG
    is left as it was (weights and inputs here come from a forked one).

    ``meta``: ``sizes`` (:class:`JobSizes`), ``n_job`` (each operation's n for the whole layer, r = 1:
    the n the models divide by r), ``points`` (per measurement, ``*_busy`` included: sizes, median
    seconds, rounds; busy ones also the compute's median seconds and MACs beside it, each size's slowdown κ
    and the compute's σ),
    ``skipped`` (operation → why its line is zero), ``scaled`` (measurements whose sizes were shrunk to
    fit the budget), ``groups`` (which groups and channels were timed),
    ``profiled_at``, ``host``, ``wall_s``, ``budget_s``, ``threads``, ``format``."""
    if not budget_s > 0:
        raise ValueError(f"profile_job: budget_s must be > 0, got {budget_s}")
    if world_size() != job.parallel.nproc or (groups is None and job.parallel.nproc > 1):
        raise ValueError(f"profile_job: a job of {job.parallel.nproc} rank(s) runs on an initialised world of that "
                         f"size with its process groups (world size {world_size()}, groups "
                         f"{'none' if groups is None else 'given'})")
    t0 = time.perf_counter()
    say = echo if rank == 0 else (lambda _: None)
    sizes = job_sizes(job, tokens)
    skipped = _skipped(sizes, ops)
    plan = [(op, busy) for op in COLLECTIVES if op not in skipped for busy in (False, True)]
    plan += [(op, False) for op in COMPUTE if op not in skipped]
    by_reason: dict[str, list[str]] = {}
    for op, why in skipped.items():
        by_reason.setdefault(why, []).append(op)
    say(f"[profile] T={sizes.tokens} C={sizes.capacity} per rank; {len(plan)} measurements within {budget_s:g} s"
        + "".join(f"; {why}: {' '.join(ops_)}" for why, ops_ in by_reason.items()))
    lines: dict[str, Linear] = {op: ZERO for op in skipped}
    busy_lines: dict[str, Linear] = {}
    points: dict[str, dict[str, Any]] = {}
    scaled: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        work = _Workloads(job, groups, sizes)
        barrier_s = barrier_seconds()
        spent = max_all([time.perf_counter() - t0])[0]
        for k, (op, busy) in enumerate(plan):
            name = f"{op}_busy" if busy else op
            report_progress(f"profiling {name}")
            share = max(budget_s - spent, 0.0) / (len(plan) - k)
            if busy:
                with ComputeBeside() as beside:
                    m = measure(getattr(work, op), share, barrier_s, beside)
                assert m.beside_s is not None
                busy_lines[op] = contended_line(lines[op], m.n, m.median_s, m.beside_s)
            else:
                m = measure(getattr(work, op), share, barrier_s)
                lines[op] = m.line
            spent += m.seconds
            points[name] = {"n": list(m.n), "median_s": list(m.median_s), "reps": m.reps}
            if m.beside_s is not None:
                points[name]["beside_s"] = list(m.beside_s)
                points[name]["beside_n"] = list(m.busy_n or ())
                points[name]["slowdown"] = [slowdown(b, c, lines[op](x)) for x, b, c in
                                            zip(m.n, m.median_s, m.beside_s, strict=True)]
            if m.scale < 1:
                scaled[name] = m.scale
            say(_progress_line(name, busy_lines[op] if busy else m.line, m, spent, budget_s,
                               lines.get(op) if busy else None))
    beside = {}  # the compute's slowdown beside each collective, now that the expert_fwd line is known
    for op in busy_lines:
        p = points[f"{op}_busy"]
        p["compute_slowdown"] = [slowdown(c, b, lines["expert_fwd"](x))
                                 for x, c, b in zip(p["beside_n"], p["beside_s"], p["median_s"], strict=True)]
        beside[op] = compute_slowdown(lines["expert_fwd"], p["beside_n"], p["beside_s"], p["median_s"])
    if beside:
        say("[profile] compute beside " + ", ".join(f"{op} {s:.2f}x" for op, s in beside.items()))
    wall, stamp = max_all([time.perf_counter() - t0, time.time()])  # the same on every rank
    say(f"[profile] done in {wall:.1f} s")
    return Costs(ops={op: lines[op] for op in COLLECTIVES + COMPUTE}, busy=busy_lines, beside=beside, meta={
        "format": PROFILE_FORMAT,
        "profiled_at": datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "wall_s": wall,
        "budget_s": budget_s,
        "threads": torch.get_num_threads(),
        "sizes": dataclasses.asdict(sizes),
        "n_job": {"a2a": sizes.a2a_bytes(sizes.capacity), "ag": sizes.gathered_bytes(sizes.capacity),
                  "rs": sizes.gathered_bytes(sizes.capacity), "gar": sizes.dense_grad_bytes,
                  "expert": sizes.expert_macs(sizes.capacity), "gate": sizes.tokens * sizes.d_model * sizes.gate_width,
                  "dense": sizes.tokens * sizes.d_model**2},
        "points": points,
        "skipped": skipped,
        "scaled": scaled,
        "groups": {"a2a": f"EP group, channel 0, dispatcher {job.parallel.dispatcher}",
                   "ag/rs": "ESP group, channel 0",
                   "gar": f"dense-DP group, channel {_gar_channel(groups)}",
                   "dense": f"MP attention on the MP group (MP = {sizes.mp})" if sizes.mp > 1 else "attention, MP = 1"},
    })


def _fmt_n(op: str, n: float) -> str:
    if op.split("_")[0] in COLLECTIVES:
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if n >= size:
                return f"{n / size:.3g} {unit}"
        return f"{n:.0f} B"
    return f"{n / 1e6:.3g} M"


def _fmt_beta(op: str, beta_s: float) -> str:
    return f"{beta_s * 1e9:.3g} ns/B" if op in COLLECTIVES else f"{beta_s * 1e12:.3g} ps"


def _progress_line(name: str, ln: Linear, m: Measured, spent: float, budget: float, idle: Linear | None) -> str:
    op = name.removesuffix("_busy")
    text = (f"[profile] {name:<10} {len(m.n)} sizes {_fmt_n(op, m.n[0])}..{_fmt_n(op, m.n[-1])} x{m.reps}: "
            f"α {ln.alpha_s * 1e6:.0f} µs, β {_fmt_beta(op, ln.beta_s)}, R² {ln.r2:.3f}")
    if idle is not None and idle(m.n[-1]) > 0:
        text += f", busy/idle {ln(m.n[-1]) / idle(m.n[-1]):.2f}x"
    if m.scale < 1:
        text += f" (sizes scaled by {m.scale:.2g} to fit the budget)"
    return text + f" [{m.seconds:.1f} s; {spent:.1f}/{budget:g} s]"


# --- cache -----------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``~/.cache/fsmoe/profiles`` (read when called, never at import)."""
    return Path.home() / ".cache" / "fsmoe" / "profiles"


def _shaped(job: JobConfig) -> bool:
    """Whether the ranks' inter-node links are shaped: the launchers describe the cluster in
    ``FSMOE_CLUSTER`` ("[NOT shaped: loopback]" when they fell back); without it, what the job asks."""
    described = os.environ.get("FSMOE_CLUSTER")
    if described is not None:
        return "NOT shaped" not in described and parse_rate(job.cluster.link) is not None
    return job.cluster.launcher != "local" and parse_rate(job.cluster.link) is not None


def profile_key(job: JobConfig, *, tokens: int | None = None, shaped: bool | None = None,
                ops: Collection[str] | None = None) -> dict[str, Any]:
    """What a profile depends on: the topology (world, nodes, ranks per node, link rate and burst — or
    ``unshaped`` —, host, cores), the sizes (:class:`JobSizes`: T, C, D, H, E, k, the layout …), the
    layer's parts (expert, gate, order, capacity factor, dispatcher, heads, L) and the runtime (torch
    threads and version, dtype), and which operations were measured. ``shaped`` None: see :func:`_shaped`."""
    par, cl, m = job.parallel, job.cluster, job.model
    shaped = _shaped(job) if shaped is None else shaped
    return {
        "format": PROFILE_FORMAT,
        "topology": {"world_size": par.nproc, "nodes": par.num_nodes, "procs_per_node": par.ppn,
                     "link": cl.link if shaped else "unshaped", "burst_bytes": cl.burst_bytes if shaped else None,
                     "host": socket.gethostname(), "cpus": os.cpu_count()},
        "sizes": dataclasses.asdict(job_sizes(job, tokens)),
        "layer": {"expert": m.moe.expert, "gate": m.moe.gate, "order": m.moe.order,
                  "capacity_factor": m.moe.capacity_factor, "dispatcher": par.dispatcher, "n_heads": m.n_heads,
                  "seq_len": m.seq_len},
        "runtime": {"threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32"},
        "ops": None if ops is None else sorted(ops),
    }


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"profile-{digest}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> Costs | None:
    try:
        data = json.loads(path.read_text())
        return Costs.from_dict(data["costs"]) if data.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable or from another format: profile again


def _write_cache(path: Path, key: dict[str, Any], costs: Costs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "costs": costs.to_dict()}, f, indent=1)
    os.replace(tmp, path)


def _with_cache_meta(costs: Costs, path: Path, hit: bool) -> Costs:
    return dataclasses.replace(costs, meta={**costs.meta, "cache": {"path": str(path), "hit": hit}})


def load_or_profile(job: JobConfig, groups: ProcessGroups | None, rank: int, *, cache_dir: str | Path,
                    reprofile: bool = False, tokens: int | None = None, budget_s: float = BUDGET_S,
                    ops: Collection[str] | None = None, shaped: bool | None = None,
                    echo: Callable[[str], None] = print) -> Costs:
    """The job's costs from ``cache_dir`` when a profile with the same :func:`profile_key` is there (and
    not ``reprofile``), else :func:`profile_job` and store it. Collective: rank 0 decides and broadcasts,
    so that no rank enters the profile's collectives alone; every rank returns the same costs, with
    ``meta["cache"] = {"path", "hit"}``."""
    path, found, key = None, None, {}
    if rank == 0:
        key = profile_key(job, tokens=tokens, shaped=shaped, ops=ops)
        path = cache_path(cache_dir, key)
        found = None if reprofile else _read_cache(path, key)
    box: list[Any] = [(str(path), found.to_dict() if found is not None else None)]
    if world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    where, cached = Path(box[0][0]), box[0][1]
    if cached is not None:
        if rank == 0:
            echo(f"[profile] cached: {where}")
        return _with_cache_meta(Costs.from_dict(cached), where, hit=True)
    costs = profile_job(job, groups, rank, tokens=tokens, budget_s=budget_s, ops=ops, echo=echo)
    if rank == 0:
        try:
            _write_cache(where, key, costs)
            echo(f"[profile] saved: {where}")
        except OSError as e:  # a cache that cannot be written costs a profile next time, nothing more
            echo(f"[profile] warning: could not save the profile to {where}: {e}")
    barrier()  # the file exists before any rank returns
    return _with_cache_meta(costs, where, hit=False)


# --- the CLI's entry point -------------------------------------------------------------------------------
def _open(job: JobConfig) -> EmulatedCluster | LocalCluster:
    """The cluster ``cluster.launcher`` asks for (as the benchmarks open theirs)."""
    spec, launcher = EmulatedClusterSpec.from_job(job), job.cluster.launcher
    if launcher == "emulated":
        return EmulatedCluster(spec)
    if launcher == "local":
        return LocalCluster(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller is told below: the description says NOT shaped
        return open_cluster(spec, allow_unshaped=True)


def _profile_rank(rank: int, world: int, job: JobConfig, cache_dir: str, reprofile: bool, tokens: int | None,
                  budget_s: float, ops: list[str] | None, shaped: bool, progress: str) -> dict[str, Any]:
    """One rank of :func:`run_profile`: the job's groups, then :func:`load_or_profile`; rank 0 writes its
    progress lines to ``progress`` for the launcher to show."""
    torch.set_num_threads(job.run.threads or 1)
    groups = build_groups(ParallelDims.from_config(job.parallel), channels=2)

    def echo(line: str) -> None:
        with open(progress, "a") as f:
            f.write(line + "\n")

    costs = load_or_profile(job, groups, rank, cache_dir=cache_dir, reprofile=reprofile, tokens=tokens,
                            budget_s=budget_s, ops=ops, shaped=shaped, echo=echo)
    return costs.to_dict()


@contextlib.contextmanager
def _follow(path: Path, echo: Callable[[str], None]) -> Iterator[None]:
    """Echo the complete lines appended to ``path`` while the body runs (the ranks' progress)."""
    stop = threading.Event()

    def pump() -> None:
        pos, rest = 0, ""
        while True:
            done = stop.is_set()
            with contextlib.suppress(FileNotFoundError), open(path) as f:
                f.seek(pos)
                rest += f.read()
                pos = f.tell()
            *lines, rest = rest.split("\n")
            for line in lines:
                echo(line)
            if done:
                return
            stop.wait(0.2)

    thread = threading.Thread(target=pump, name="fsmoe-profile-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def run_profile(job: JobConfig, *, cache_dir: str | Path, reprofile: bool = False, tokens: int | None = None,
                budget_s: float = BUDGET_S, ops: Collection[str] | None = None,
                echo: Callable[[str], None] = print, timeout_s: float | None = None) -> Costs:
    """``fsmoe profile``: start ``job.parallel.nproc`` ranks on the cluster ``job.cluster`` asks for, build
    the job's groups (two channels) and :func:`load_or_profile` on each; rank 0's costs. Progress lines
    reach ``echo`` as rank 0 writes them. ``timeout_s`` (default 3 × budget + 120 s) stops the ranks."""
    with _open(job) as cluster, tempfile.TemporaryDirectory(prefix="fsmoe-profile-") as tmp:
        shaped = isinstance(cluster, EmulatedCluster) and cluster.spec.shaped
        echo(f"[profile] {cluster.describe()}; cache {Path(cache_dir).expanduser()}")
        progress = Path(tmp) / "progress.txt"
        with _follow(progress, echo):
            results = cluster.run_function(_profile_rank, job, str(cache_dir), reprofile, tokens, budget_s,
                                           None if ops is None else list(ops), shaped, str(progress),
                                           timeout=timeout_s or 3 * budget_s + 120)
    return Costs.from_dict(results[0])


# --- the table ------------------------------------------------------------------------------------------
def format_costs(costs: Costs) -> str:
    """One row per operation: α (µs), β (ns per byte for collectives, ps per unit of n for compute), the
    rate 1/β, R², and for collectives the busy/idle time ratio at the largest size measured and how much
    slower compute runs beside them (σ, ``Costs.beside``)."""
    skipped = costs.meta.get("skipped", {})
    points = costs.meta.get("points", {})
    rows = [f"{'op':<11}{'n':>5}{'α µs':>10}{'β':>14}{'rate':>14}{'R²':>8}{'busy/idle':>11}{'compute':>9}"]
    for op in COLLECTIVES + COMPUTE:
        ln = costs.ops[op]
        coll = op in COLLECTIVES
        if op in skipped:
            rows.append(f"{op:<11}{'B' if coll else '':>5}  — skipped: {skipped[op]}")
            continue
        beta = _fmt_beta(op, ln.beta_s)
        rate = (f"{1 / ln.beta_s / 1e6:.4g} MB/s" if coll else f"{1 / ln.beta_s / 1e9:.3g} G/s") if ln.beta_s else "—"
        r2 = f"{ln.r2:.4f}" if ln.r2 is not None else "—"
        ratio = ""
        if coll and op in costs.busy:
            n = (points.get(op) or {}).get("n", [1e6])[-1]
            ratio = f"{costs.busy[op](n) / ln(n):.2f}x" if ln(n) > 0 else "—"
        sigma = f"{costs.beside[op]:.2f}x" if op in costs.beside else ""
        unit = "B" if coll else ("MAC" if op.startswith("expert") else "")
        rows.append(f"{op:<11}{unit:>5}{ln.alpha_s * 1e6:>10.1f}{beta:>14}{rate:>14}{r2:>8}{ratio:>11}{sigma:>9}")
    rows.append("n: collectives bytes; expert MACs; gate tokens·D·E; dense tokens·D² (fsmoe.perf.profile); compute: "
                "how much slower compute runs beside the collective")
    return "\n".join(rows)
