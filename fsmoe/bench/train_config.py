"""What ``fsmoe bench train`` measures: training steps of one GPT-MoE, ours beside DeepSpeed-MoE's layer.

Legend: B global batch (sequences), L sequence length, D model dim, H expert hidden, E experts, K top-k.

Pure: nothing here starts a process or talks to ``torch.distributed``. :class:`TrainBenchConfig`
validates the model against every layout it will run (through the trainer's own
:class:`~fsmoe.train.trainer.TrainConfig` checks) and lists the implementations (:meth:`TrainBenchConfig.impls`),
each with the :class:`~fsmoe.train.distributed.ParallelConfig` it trains under.

DeepSpeed-MoE has no expert sharding (ESP). With ``esp > 1`` our rows run the requested EP × ESP
layout, and the DeepSpeed row runs the EP-only layout over the same ranks (EP = ep·esp, whole experts);
an extra row of each of our schedules on that EP-only layout is its like-for-like partner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fsmoe.bench.config import DEEPSPEED, LAUNCHERS, ImplSpec, chart_path
from fsmoe.cluster.spec import EmulatedClusterSpec
from fsmoe.models.gpt_moe import GPTMoEConfig, model_preset
from fsmoe.schedule.schedules import get_schedule
from fsmoe.train.data import DataConfig
from fsmoe.train.distributed import DISPATCHER_NAMES, ParallelConfig
from fsmoe.train.trainer import TrainConfig

DS_GATES = ("gshard", "switch")  # DeepSpeed-MoE's top-k softmax gating
DS_TOP_K = (1, 2)  # top1gating / top2gating; its top-k>2 gate scales the aux loss by 1/k


@dataclass(frozen=True)
class TrainImpl:
    """One row of the table: a schedule of ours (or DeepSpeed-MoE) trained under ``parallel``."""

    spec: ImplSpec
    parallel: ParallelConfig
    ep_only: bool = False  # the EP-only partner of an EP x ESP row (see the module doc)

    @property
    def name(self) -> str:
        return f"{self.spec.name} (EP={self.parallel.ep} only)" if self.ep_only else self.spec.name

    @property
    def is_ours(self) -> bool:
        return self.spec.is_ours

    @property
    def layout(self) -> str:
        p = self.parallel
        mp = f" MP={p.mp}" if p.mp > 1 else ""
        return f"EP={p.ep} ESP={p.esp}{mp}"


@dataclass(kw_only=True, frozen=True)
class TrainBenchConfig:
    """One model, one cluster, several implementations; every field has the CLI flag of the same name.

    Model: the ``model`` preset (:data:`~fsmoe.models.gpt_moe.MODEL_PRESETS`), with ``seq_len`` L if
    given. Its MoE layers renormalise the kept top-k weights (DeepSpeed's top-2 rule), so both
    implementations compute the same function from the same weights. Data: the embedded corpus (first
    ``data_bytes`` bytes), ``batch_size`` B sequences per step over all ranks, the same batches for
    every implementation. Layout: ``nodes`` × ``procs_per_node`` ranks, degrees ``ep``, ``esp``, ``mp``
    (dense data parallelism over world/mp), ``link`` the nodes' link rate (or ``"unshaped"``).
    Ours: every schedule in ``schedules`` (pipelined ones at ``r_fwd``/``r_bwd``), each trained
    exactly as ``fsmoe train`` trains (build_model, its gradient sync, ``train_step``).
    Timing: ``warmup_steps`` untimed steps, then ``steps`` timed steps; each step is one round in which
    every implementation takes one optimizer step, in a rotated order.
    """

    model: str = "tiny"
    seq_len: int | None = None  # None: the preset's
    batch_size: int = 16
    data_bytes: int = 2_000_000
    lr: float = 3e-3
    nodes: int = 2
    procs_per_node: int = 2
    ep: int = 4
    esp: int = 1
    mp: int = 1
    link: str = "1gbit"
    burst_bytes: int | None = None
    dispatcher: str = "a2a"
    schedules: tuple[str, ...] = ("sequential", "fsmoe")
    r_fwd: int = 2
    r_bwd: int = 2
    include_deepspeed: bool = True
    steps: int = 10
    warmup_steps: int = 2
    threads: int = 1
    seed: int = 0
    launcher: str = "auto"
    timeout_s: float = 900.0
    out: str | None = "bench_results/train.json"
    chart: str | None = None  # default: ``out`` with .png

    def __post_init__(self) -> None:
        for name in ("batch_size", "data_bytes", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainBenchConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainBenchConfig: warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"TrainBenchConfig: seq_len must be >= 1, got {self.seq_len}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(
                f"TrainBenchConfig: unknown launcher {self.launcher!r}; choose one of {', '.join(LAUNCHERS)}"
            )
        if self.dispatcher not in DISPATCHER_NAMES:
            raise ValueError(f"TrainBenchConfig: unknown dispatcher {self.dispatcher!r}; choose one of "
                             f"{', '.join(DISPATCHER_NAMES)}")
        if not self.schedules:
            raise ValueError("TrainBenchConfig: give at least one schedule")
        for s in self.schedules:
            get_schedule(s)  # ValueError listing the choices
        self.cluster_spec()  # link rate and tbf bucket checks
        for impl in self.impls():  # every layout against the model and the batch, with the numbers
            self.train_config(impl)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def model_config(self) -> GPTMoEConfig:
        base = model_preset(self.model)  # ValueError listing the presets
        moe = dataclasses.replace(base.moe, renormalize=base.moe.top_k >= 2)
        seq_len = base.seq_len if self.seq_len is None else self.seq_len
        return dataclasses.replace(base, moe=moe, seq_len=seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model_config().seq_len

    def cluster_spec(self) -> EmulatedClusterSpec:
        return EmulatedClusterSpec(nodes=self.nodes, procs_per_node=self.procs_per_node, link=self.link,
                                   burst_bytes=self.burst_bytes)

    def parallel(self, schedule: str, *, ep_only: bool = False) -> ParallelConfig:
        """The layout of one row; ``ep_only``: EP over the ep·esp ranks, no ESP (DeepSpeed's layout)."""
        pipelined = get_schedule(schedule).pipelined
        r_fwd, r_bwd = (self.r_fwd, self.r_bwd) if pipelined else (1, 1)
        ep, esp = (self.ep * self.esp, 1) if ep_only else (self.ep, self.esp)
        return ParallelConfig(nproc=self.world_size, procs_per_node=self.procs_per_node, mp=self.mp, ep=ep, esp=esp,
                              dispatcher=self.dispatcher, schedule=schedule, r_fwd=r_fwd, r_bwd=r_bwd,
                              timeout_s=self.timeout_s)

    def impls(self) -> list[TrainImpl]:
        """Every row, in table order: our schedules, their EP-only partners (esp > 1 with DeepSpeed),
        DeepSpeed last (dropped later, with a reason, where it cannot run)."""
        out = []
        for s in self.schedules:
            spec = get_schedule(s)
            out.append(TrainImpl(ImplSpec(s, *((self.r_fwd, self.r_bwd) if spec.pipelined else (1, 1))),
                                 self.parallel(s)))
        if self.include_deepspeed:
            ep_only = self.esp > 1 and self.deepspeed_unable() is None  # else its row only says why not
            if ep_only:
                out += [TrainImpl(i.spec, self.parallel(i.spec.family, ep_only=True), ep_only=True) for i in list(out)]
            out.append(TrainImpl(ImplSpec(DEEPSPEED), self.parallel("sequential", ep_only=ep_only)))
        return out

    def deepspeed_unable(self) -> str | None:
        """Why DeepSpeed-MoE cannot train this model/layout (pure checks), or None."""
        moe = self.model_config().moe
        if self.mp > 1:
            return f"the DeepSpeed twin runs without tensor parallelism (mp=1), got mp={self.mp}"
        if moe.gate not in DS_GATES or moe.noisy:
            return f"DeepSpeed-MoE has only (noise-free) top-k softmax gating, not {moe.gate!r}"
        if moe.top_k not in DS_TOP_K:
            return (f"the DeepSpeed twin supports top-1 and top-2 (its top-k gate scales the aux loss), "
                    f"got k={moe.top_k}")
        if moe.capacity_factor is None:
            return "the DeepSpeed twin runs with a fixed capacity factor (drop_tokens=True), not 'none'"
        if moe.z_loss_coef:
            return "DeepSpeed-MoE's gate has no router z-loss"
        ep = self.ep * self.esp
        if self.esp > 1 and moe.num_experts % ep:
            return (f"no ESP in DeepSpeed-MoE, and E={moe.num_experts} experts do not split over the EP-only "
                    f"layout's EP={ep} ranks")
        return None

    def train_config(self, impl: TrainImpl) -> TrainConfig:
        """The trainer's config of one row (validates the model against its layout and the batch)."""
        return TrainConfig(model=self.model_config(), data=DataConfig(max_bytes=self.data_bytes),
                           steps=self.warmup_steps + self.steps, batch_size=self.batch_size, lr=self.lr, warmup=0,
                           seed=self.seed, threads=self.threads, parallel=impl.parallel, out_dir="unused")

    def chart_path(self) -> str | None:
        return chart_path(self.out, self.chart)

    def replace(self, **changes: object) -> TrainBenchConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def quick_train_config(**overrides: object) -> TrainBenchConfig:
    """Short sequences, small batch, a few steps: checks that everything runs, not performance."""
    base: dict[str, object] = dict(seq_len=64, batch_size=8, data_bytes=200_000, steps=3, warmup_steps=1,
                                   timeout_s=300.0)
    base.update(overrides)
    return TrainBenchConfig(**base)  # type: ignore[arg-type]
