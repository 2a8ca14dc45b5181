"""The job's sections (the model's in :mod:`fsmoe.config.model`), :class:`JobConfig` with its cross-section
rules and overrides, the flag vocabulary (:func:`flag_specs`, :func:`coerce`) and the commands' recipes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fsmoe.config.model import (
    GATE_IGNORES,
    MAX_CPU_PARAMS,
    ModelConfig,
    MoEConfig,
    gpt2_moe_tiny,
    mixtral_8x7b,
    model_preset,
)
from fsmoe.config.values import (
    DEVICE_NAMES,
    DISPATCHER_NAMES,
    DTYPE_NAMES,
    LAUNCHERS,
    PROGRESS_NAMES,
    SCHEDULES,
    check_at_least,
    check_choice,
    check_degrees,
    choice_parser,
    get_schedule,
    opt,
    optional_parser,
    parse_bool,
    parse_degree_pair,
    parse_rate,
)


# --- sections -----------------------------------------------------------------------------------------------
def check_layout(*, world_size: int, procs_per_node: int, mp: int, ep: int, esp: int) -> None:
    """The rank-layout rules (see :mod:`fsmoe.parallel.dims`): MP and ESP groups are contiguous ranks
    inside one node, EP × ESP blocks tile the world. ``ValueError`` naming the numbers otherwise."""
    P, ppn = world_size, procs_per_node
    if P % ppn:
        raise ValueError(f"procs_per_node={ppn} must divide world_size={P}")
    if P % mp:
        raise ValueError(f"MP degree {mp} does not divide the {P} ranks")
    for name, size in (("mp", mp), ("esp", esp)):
        if ppn % size:
            first = next((list(range(s, s + size)) for s in range(0, P, size) if s // ppn != (s + size - 1) // ppn),
                         list(range(size)))
            raise ValueError(
                f"{name} groups are contiguous ranks inside one node, so {name}={size} must divide "
                f"procs_per_node={ppn}; group {first} would cross a node boundary"
            )
    if P % (ep * esp):
        raise ValueError(f"ep*esp must divide world_size, got ep={ep} * esp={esp} = {ep * esp} and world_size={P}")


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """``nproc`` ranks in nodes of ``procs_per_node`` (None: all on one node); degrees ``mp`` (tensor
    parallel attention with sequence parallelism), ``ep`` (experts), ``esp`` (expert hidden dim); the
    dense data-parallel degree is nproc / mp. ``dispatcher``: the AlltoAll route of the MoE layers."""

    nproc: int = opt(1, "number of ranks (under torchrun: its WORLD_SIZE, leave it out there)", parse=int)
    procs_per_node: int | None = opt(None, "ranks per node (decides which groups are intra-node); none: one node",
                                     parse=optional_parser(int))
    mp: int = opt(1, "tensor-parallel degree of attention (+ sequence parallelism)", parse=int)
    ep: int = opt(1, "expert-parallel degree", parse=int)
    esp: int = opt(1, "expert-sharding degree (each expert's H split across ranks)", parse=int)
    dispatcher: str = opt("a2a", "AlltoAll algorithm", parse=choice_parser("dispatcher", DISPATCHER_NAMES))
    timeout_s: float = opt(300.0, "seconds a collective may wait before the process group gives up",
                           flag="--collective-timeout", parse=float)
    hang_timeout_s: float | None = opt(120.0, "seconds a rank may go without finishing a step before fsmoe's "
                                       "launcher stops the job (start-up gets at least 120 s); 'none': no watchdog",
                                       flag="--hang-timeout", parse=optional_parser(float))

    def __post_init__(self) -> None:
        check_choice("dispatcher", self.dispatcher, DISPATCHER_NAMES)
        check_at_least(self, 1, "nproc", "mp", "ep", "esp")
        if self.procs_per_node is not None:
            check_at_least(self, 1, "procs_per_node")
        if not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig: timeout_s must be > 0, got {self.timeout_s}")
        if self.hang_timeout_s is not None and not self.hang_timeout_s > 0:
            raise ValueError(f"ParallelConfig: hang_timeout_s must be > 0 (or none), got {self.hang_timeout_s}")
        check_layout(world_size=self.nproc, procs_per_node=self.ppn, mp=self.mp, ep=self.ep, esp=self.esp)

    @property
    def distributed(self) -> bool:
        return self.nproc > 1

    @property
    def ppn(self) -> int:
        """Ranks per node, resolved (all ranks on one node when ``procs_per_node`` is None)."""
        return self.procs_per_node or self.nproc

    @property
    def num_nodes(self) -> int:
        return self.nproc // self.ppn

    @property
    def dense_dp(self) -> int:
        return self.nproc // self.mp


PLANNED_SCHEDULES = ("fsmoe_no_iio", "fsmoe")  # FSMoE's own: the planner picks their degrees and GAR plan


@dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """How the MoE blocks are scheduled: one of the six schedules (see :mod:`fsmoe.schedule.schedules`)
    with its forward and backward pipeline degrees, and the dense Gradient-AllReduce plan.

    Degrees left out (None) are 1, except for FSMoE's own schedules (``fsmoe``, ``fsmoe_no_iio``) given
    neither degree: those are *planned* — profiled, modelled and chosen per layer by
    :mod:`fsmoe.perf.planner`, together with the gradient plan unless ``gar_plan`` is given. A single
    degree given means that degree for both passes."""

    name: str = opt("sequential", "MoE block schedule", flag="--schedule",
                    parse=choice_parser("schedule", tuple(SCHEDULES)))
    r_fwd: int | None = opt(None, "forward pipeline degree (none: 1, or planned for fsmoe and fsmoe_no_iio)",
                            parse=optional_parser(int))
    r_bwd: int | None = opt(None, "backward pipeline degree (none: r_fwd, or planned for fsmoe and fsmoe_no_iio)",
                            parse=optional_parser(int))
    layer_degrees: tuple[tuple[int, int], ...] | None = opt(
        None, "R_FWD/R_BWD per MoE layer, first to last (what the planner picked; overrides --r-fwd/--r-bwd)",
        parse=parse_degree_pair, nargs="+")
    gar_plan: str | None = opt(None, "gradient all-reduce plan, e.g. 'moe:3=2MB,dense:3=ready', or 'after' for all "
                                     "after the backward (unset: planned for fsmoe/fsmoe_no_iio, else the schedule's "
                                     "default)", parse=optional_parser(str))

    def __post_init__(self) -> None:
        spec = get_schedule(self.name)
        check_degrees(spec, *self.degrees)
        for pair in self.layer_degrees or ():
            check_degrees(spec, *pair)

    @property
    def planned(self) -> bool:
        """Whether the planner picks the degrees (FSMoE's schedules, no degree given)."""
        return (self.name in PLANNED_SCHEDULES and self.r_fwd is None and self.r_bwd is None
                and self.layer_degrees is None)

    @property
    def degrees(self) -> tuple[int, int]:
        """The given (r_fwd, r_bwd), with the defaults above; (1, 1) for a planned schedule until planned."""
        r_fwd = 1 if self.r_fwd is None else self.r_fwd
        return r_fwd, r_fwd if self.r_bwd is None else self.r_bwd


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """The optimisation: AdamW with linear warm-up over ``lr_warmup`` steps, then cosine decay to
    ``min_lr_ratio · lr``; ``grad_clip`` None disables clipping; ``max_seconds`` stops early."""

    steps: int = opt(1000, "optimizer steps", parse=int)
    batch_size: int = opt(16, "sequences per step over all ranks", parse=int)
    lr: float = opt(3e-3, "peak learning rate (AdamW)", parse=float)
    min_lr_ratio: float = opt(0.1, "final learning rate as a share of lr", parse=float)
    weight_decay: float = opt(0.1, "AdamW decay on matrices", parse=float)
    lr_warmup: int = opt(50, "linear learning-rate warm-up steps", parse=int)
    grad_clip: float | None = opt(1.0, "global gradient-norm clip, or 'none'", parse=optional_parser(float))
    log_every: int = opt(50, "steps between progress lines", parse=int)
    eval_iters: int = opt(20, "validation batches per evaluation", parse=int)
    eval_every: int | None = opt(None, "steps between validation evaluations (none: only at the end)",
                                 parse=optional_parser(int))
    max_seconds: float | None = opt(None, "training time budget in seconds, or 'none'", parse=optional_parser(float))
    save_every: int | None = opt(None, "steps between checkpoints in <out>/checkpoints (none: none; the last "
                                 "step is saved too when set)", parse=optional_parser(int))
    keep_checkpoints: int = opt(3, "checkpoints kept (the oldest are removed)", flag="--keep", parse=int)
    resume: str | None = opt(None, "resume from a checkpoint directory, or a run directory (its latest checkpoint)",
                             parse=optional_parser(str))

    def __post_init__(self) -> None:
        check_at_least(self, 1, "steps", "batch_size", "log_every", "eval_iters", "keep_checkpoints")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None:
                check_at_least(self, 1, name)
        check_at_least(self, 0, "lr_warmup")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 (or None for no limit), got {self.max_seconds}")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where the tokens come from. ``path=None`` means the embedded standard-library corpus (bytes), cut at
    ``max_bytes``; a text file is read whole (bytes); a ``.bin`` token file, or a directory of ``train.bin``
    + ``val.bin`` with their ``meta.json``, is memory-mapped (:mod:`fsmoe.train.data`). The last
    ``val_fraction`` is the validation split (a token directory uses its ``val.bin``)."""

    path: str | None = opt(None, "a text file, a .bin token file, or a directory of train.bin + val.bin + meta.json "
                           "(none: the embedded Python stdlib corpus)",
                           flag="--data", parse=optional_parser(str))
    max_bytes: int = opt(8_000_000, "bytes of the embedded corpus to load", flag="--data-bytes", parse=int)
    val_fraction: float = opt(0.05, "share of the data held out for validation (a token directory uses its val.bin)",
                              parse=float)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_bytes")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Where results go and how the processes run: ``out`` is a directory (the resolved job is written
    there as ``job.toml`` beside the results); ``threads`` None leaves torch's intra-op threads alone
    (one per rank when distributed); ``trace`` writes a Chrome trace (Perfetto) of the MoE tasks."""

    out: str = opt("runs/default", "output directory (results, metrics, the resolved job.toml)")
    seed: int = opt(0, "seeds the weights, the inputs and the batches", parse=int)
    threads: int | None = opt(None, "torch intra-op threads per rank (none: torch's; 1 when distributed)",
                              parse=optional_parser(int))
    trace: str | None = opt(None, "write a Chrome-trace JSON of the MoE blocks' tasks to FILE",
                            parse=optional_parser(str))
    overwrite: bool = opt(False, "replace a previous run in --out (else a run directory is never overwritten)",
                          parse=parse_bool)
    device: str = opt("auto", "where each rank computes: cuda:LOCAL_RANK with NCCL when CUDA is there (auto), "
                      "else the CPU with gloo", parse=choice_parser("device", DEVICE_NAMES))
    dtype: str = opt("fp32", "compute dtype of experts and attention (bf16: autocast, fp32 master weights and "
                     "router)", parse=choice_parser("dtype", DTYPE_NAMES))
    progress: str = opt("auto", "progress display: a bar on a terminal (main rank), plain lines in logs (auto)",
                        parse=choice_parser("progress", PROGRESS_NAMES))

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("RunConfig: out must name a directory")
        check_choice("device", self.device, DEVICE_NAMES)
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        check_choice("progress", self.progress, PROGRESS_NAMES)
        if self.threads is not None:
            check_at_least(self, 1, "threads")


@dataclass(kw_only=True, frozen=True)
class ClusterConfig:
    """Where the ranks run. ``launcher``: ``local`` (plain processes on this machine, unshaped loopback),
    ``emulated`` (one network namespace per node of ``procs_per_node`` ranks, each node's link shaped to
    ``link``; needs root), ``auto`` (emulated where possible, else local with a warning)."""

    launcher: str = opt("local", "local, emulated or auto", parse=choice_parser("launcher", LAUNCHERS))
    link: str = opt("1gbit", "each emulated node's uplink/downlink rate, e.g. 1gbit, 200mbit, or 'unshaped'",
                    flag="--link")
    burst_bytes: int | None = opt(None, "tbf bucket bytes of every link (none: max(64 KiB, 1 ms of line rate))",
                                  flag="--burst", parse=optional_parser(int))

    def __post_init__(self) -> None:
        check_choice("launcher", self.launcher, LAUNCHERS)
        parse_rate(self.link)
        if self.burst_bytes is not None and self.burst_bytes < 2048:
            raise ValueError(f"ClusterConfig: burst_bytes={self.burst_bytes} must be >= 2048 (one packet)")


@dataclass(kw_only=True, frozen=True)
class PlanConfig:
    """FSMoE's adaptive core (:mod:`fsmoe.perf`): online profiling within ``profile_budget_s``, cached in
    ``profile_cache`` (a rerun on the same topology and sizes reuses it; ``reprofile`` forces a new one),
    then pipeline degrees among the powers of two up to ``max_degree``; a plan that the model predicts
    less than ``min_gain`` faster than the plain one (r = 1, the Gradient-AllReduce after the backward)
    gives way to the plain one, since the model's error between two plans is of that order. Then the
    measured check (:mod:`fsmoe.perf.tune`): ``tune`` candidates the model ranks first — a training job's
    plan and the other plans weighed for it, a benchmarked layer's degree pairs — are timed on the ranks
    for ``tune_rounds`` rounds each, and the fastest runs; 1: the model's choice as it is."""

    max_degree: int = opt(8, "largest pipeline degree the planner considers (a power of two)", parse=int)
    min_gain: float = opt(0.03, "smallest predicted gain over the plain plan (r = 1, GAR after the backward) "
                          "for which the planner pipelines or overlaps the GAR (a fraction)", parse=float)
    profile_budget_s: float = opt(30.0, "seconds online profiling may take", flag="--profile-budget", parse=float)
    profile_cache: str = opt("~/.cache/fsmoe/profiles", "directory of cached profiles")
    reprofile: bool = opt(False, "profile again even when a cached profile matches", parse=parse_bool)
    tune: int = opt(3, "plans (a layer's degree pairs in the layer benchmark), the model's first, timed on the "
                    "ranks before one is run (1: the model's choice as it is)", parse=int)
    tune_rounds: int = opt(8, "timed rounds per candidate of that measured check", parse=int)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_degree", "tune", "tune_rounds")
        if self.max_degree & (self.max_degree - 1):
            raise ValueError(f"PlanConfig: max_degree must be a power of two, got {self.max_degree}")
        if not self.profile_budget_s > 0:
            raise ValueError(f"PlanConfig: profile_budget_s must be > 0, got {self.profile_budget_s}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"PlanConfig: min_gain must be in [0, 1), got {self.min_gain}")


DEFAULT_BENCH_SCHEDULES = ("sequential", "tutel", "fsmoe_no_iio", "fsmoe")


@dataclass(kw_only=True, frozen=True)
class BenchConfig:
    """Side-by-side benchmarks: ``warmup`` untimed then ``reps`` timed rounds (steps, for ``bench
    train``), each running every implementation once in a rotated order. The layer benchmark runs
    every schedule in ``schedules`` at every degree in ``degrees`` (plus ``mixed_degrees`` pairs for
    fsmoe) on ``tokens`` tokens per rank with a dense Gradient-AllReduce of ``dense_grad_mb`` MiB."""

    schedules: tuple[str, ...] = opt(DEFAULT_BENCH_SCHEDULES, "schedules to run", nargs="+",
                                     parse=choice_parser("schedule", tuple(SCHEDULES)))
    degrees: tuple[int, ...] = opt((1, 2, 4, 8), "pipeline degrees (r_fwd = r_bwd) of every pipelined schedule",
                                   flag="--r", parse=int, nargs="+")
    mixed_degrees: tuple[tuple[int, int], ...] = opt(((2, 4), (4, 2), (4, 8), (8, 4)), "extra R_FWD/R_BWD pairs "
                                                     "for fsmoe", flag="--mixed", parse=parse_degree_pair, nargs="*")
    tokens: int = opt(1024, "tokens per rank T (layer benchmark)", parse=int)
    dense_grad_mb: float = opt(4.0, "dense Gradient-AllReduce per layer, MiB (layer benchmark)", parse=float)
    reps: int = opt(5, "timed rounds", parse=int)
    warmup: int = opt(1, "untimed rounds first", parse=int)
    deepspeed: bool = opt(True, "run DeepSpeed-MoE beside ours (skipped with a note when not installed)",
                          parse=parse_bool)
    memory: bool = opt(True, "measure peak memory (layer benchmark)", parse=parse_bool)
    trace_all: bool = opt(False, "with --trace: one trace file per implementation", parse=parse_bool)
    timeout_s: float = opt(1800.0, "seconds before the benchmark's ranks are stopped", flag="--timeout",
                           parse=float)

    def __post_init__(self) -> None:
        if not self.schedules:
            raise ValueError("BenchConfig: give at least one schedule")
        for s in self.schedules:
            get_schedule(s)
        check_at_least(self, 1, "tokens", "reps")
        check_at_least(self, 0, "warmup")
        for r_fwd, r_bwd in [(r, r) for r in self.degrees] + list(self.mixed_degrees):
            if r_fwd < 1 or r_bwd < 1:
                raise ValueError(f"BenchConfig: degrees must be >= 1, got r_fwd={r_fwd}, r_bwd={r_bwd}")
        if not self.dense_grad_mb >= 0:
            raise ValueError(f"BenchConfig: dense_grad_mb must be >= 0, got {self.dense_grad_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"BenchConfig: timeout_s must be > 0, got {self.timeout_s}")


SIM_CLUSTERS = ("testbed-a", "testbed-b", "dgx-h100")  # fsmoe.sim.presets.CLUSTERS; or a profile JSON path


@dataclass(kw_only=True, frozen=True)
class SimConfig:
    """The simulator (:mod:`fsmoe.sim`): the described ``cluster`` — a preset (:data:`SIM_CLUSTERS`) or
    the path of an ``fsmoe profile`` cache file — with ``nodes`` × ``gpus_per_node`` GPUs (none: the
    preset's), the ``schedules`` to play, and whether a paper model preset takes the paper's settings for
    that cluster (``paper_settings``: layer count, sequence length, batch; digest §6.5)."""

    cluster: str = opt("testbed-a", "cluster preset (testbed-a, testbed-b, dgx-h100) or an fsmoe profile JSON file",
                       flag="--cluster")
    nodes: int | None = opt(None, "nodes of the simulated cluster (none: the preset's)", parse=optional_parser(int))
    gpus_per_node: int | None = opt(None, "GPUs per node (none: the preset's)", parse=optional_parser(int))
    schedules: tuple[str, ...] = opt(tuple(SCHEDULES), "schedules to simulate", flag="--sim-schedules", nargs="+",
                                     parse=choice_parser("schedule", tuple(SCHEDULES)))
    paper_settings: bool = opt(True, "a paper model preset runs with the paper's settings on this cluster",
                               parse=parse_bool)

    def __post_init__(self) -> None:
        if not self.cluster:
            raise ValueError("SimConfig: cluster must name a preset or a profile file")
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) is not None:
                check_at_least(self, 1, name)
        if not self.schedules:
            raise ValueError("SimConfig: give at least one schedule")
        for sched in self.schedules:
            get_schedule(sched)


SECTIONS = ("model", "moe", "parallel", "schedule", "plan", "train", "data", "run", "cluster", "bench", "sim")


@dataclass(kw_only=True, frozen=True)
class JobConfig:
    """One job: every section, validated together. ``moe`` is ``model.moe`` (its own section in flags
    and files)."""

    model: ModelConfig = field(default_factory=gpt2_moe_tiny)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def __post_init__(self) -> None:
        par, m = self.parallel, self.model
        problems = []
        if m.moe.num_experts % par.ep:
            problems.append(f"number of experts E={m.moe.num_experts} is not divisible by EP={par.ep}")
        if m.moe.d_hidden % par.esp:
            problems.append(f"expert hidden dim H={m.moe.d_hidden} is not divisible by ESP={par.esp}")
        if m.n_heads % par.mp:
            problems.append(f"attention heads {m.n_heads} are not divisible by MP={par.mp}")
        if m.kv_heads % par.mp:
            problems.append(f"key/value heads {m.kv_heads} are not divisible by MP={par.mp}")
        if m.seq_len % par.mp:
            problems.append(f"sequence length {m.seq_len} is not divisible by MP={par.mp} (sequence parallelism)")
        layer_degrees = self.schedule.layer_degrees
        if layer_degrees is not None and len(layer_degrees) != m.num_moe_layers:
            problems.append(f"layer_degrees gives {len(layer_degrees)} pairs for {m.num_moe_layers} MoE layers")
        if problems:
            raise ValueError("; ".join(problems))

    def check_training(self) -> None:
        """The rules of a job that trains (``fsmoe train``, ``fsmoe bench train``), beyond those every job
        obeys: the global batch splits evenly over the dense data-parallel ranks."""
        params = self.model.estimated_params()
        if params > MAX_CPU_PARAMS and self.run.device != "cuda":
            raise ValueError(f"model {self.model.name!r} has about {params / 1e9:.1f}B parameters, more than the "
                             f"{MAX_CPU_PARAMS / 1e9:.0f}B fsmoe builds without --device cuda; it is a preset for "
                             "`fsmoe simulate` (which shows the planner's degrees per layer too)")
        if self.train.batch_size % self.parallel.dense_dp:
            raise ValueError(f"global batch {self.train.batch_size} is not divisible by the dense data-parallel "
                             f"degree {self.parallel.dense_dp}")

    @property
    def moe(self) -> MoEConfig:
        return self.model.moe

    def section(self, name: str) -> Any:
        check_choice("config section", name, SECTIONS)
        return self.model.moe if name == "moe" else getattr(self, name)

    def replace(self, **sections: Any) -> JobConfig:
        return dataclasses.replace(self, **sections)

    def with_overrides(self, values: Mapping[str, Any]) -> JobConfig:
        """This job with ``values`` (``"section.field" -> value``) applied, validated once at the end.

        ``model.name`` first resets the model (and its ``moe``) to that preset; choosing the switch
        gate without a ``moe.top_k`` picks k = 1 (the gate is top-1 by definition); choosing a gate
        resets the settings it ignores (:data:`GATE_IGNORES`) that are not given with it."""
        specs = {s.key: s for s in flag_specs()}
        for key in values:
            if key not in specs:
                raise ValueError(f"unknown config key {key!r}; the keys are: {', '.join(specs)}")
        values = {key: coerce(specs[key], value) for key, value in values.items()}
        model = self.model
        if "model.name" in values:
            model = model_preset(values.pop("model.name"))
        gate = values.get("moe.gate")
        if gate == "switch" and "moe.top_k" not in values:
            values["moe.top_k"] = 1
        for name in GATE_IGNORES.get(gate, ()):  # what the chosen gate ignores goes back to its default
            values.setdefault(f"moe.{name}", getattr(MoEConfig(), name))
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            section, _, name = key.partition(".")
            by_section.setdefault(section, {})[name] = value
        moe = dataclasses.replace(model.moe, **by_section.pop("moe", {}))
        model = dataclasses.replace(model, moe=moe, **by_section.pop("model", {}))
        parts = {s: dataclasses.replace(getattr(self, s), **v) for s, v in by_section.items()}
        return dataclasses.replace(self, model=model, **parts)


# --- the flag vocabulary and files --------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagSpec:
    """One config field as a command-line flag: ``key`` is ``section.field``."""

    key: str
    flag: str
    help: str
    parse: Callable[[str], Any] | None
    nargs: str | None
    is_bool: bool

    @property
    def choices(self) -> tuple[str, ...] | None:
        return getattr(self.parse, "choices", None)


def _fields(section: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section) if f.metadata]


def flag_specs(sections: tuple[str, ...] = SECTIONS) -> Iterator[FlagSpec]:
    """Every field of ``sections`` as a :class:`FlagSpec`, in declaration order."""
    job = JobConfig()
    for s in sections:
        for f in _fields(job.section(s)):
            meta = f.metadata
            yield FlagSpec(key=f"{s}.{f.name}", flag=meta["flag"] or "--" + f.name.replace("_", "-"), help=meta["help"],
                           parse=meta["parse"], nargs=meta["nargs"], is_bool=meta["parse"] is parse_bool)


def all_keys() -> list[str]:
    return [spec.key for spec in flag_specs()]


def get_value(job: JobConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(job.section(section), name)


def coerce(spec: FlagSpec, value: Any) -> Any:
    """A value read from a file (TOML types) or a flag (strings) as the field's type; ValueError naming
    the key otherwise. Strings always go through the field's parser, so 'none' works in both."""
    default = get_value(JobConfig(), spec.key)

    def one(v: Any, kind: Any) -> Any:
        if isinstance(v, str) and spec.parse is not None:
            return spec.parse(v)
        if v is None:
            if getattr(spec.parse, "optional", False):
                return None
            raise ValueError(f"{spec.key}: expected {type(kind).__name__}, got None")
        if kind is None and isinstance(v, list | tuple):  # an item of an optional list field, e.g. a pair
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"{spec.key}: expected whole numbers, got {v!r}")
            return tuple(v)
        if kind is None and spec.parse is not None:  # an optional field whose default is None
            return spec.parse(str(v))
        if isinstance(kind, tuple) and isinstance(v, list | tuple):
            return tuple(one(x, kind[0] if kind else 0) for x in v)
        if isinstance(kind, bool) != isinstance(v, bool):
            raise ValueError(f"{spec.key}: expected {type(kind).__name__}, got {v!r}")
        if isinstance(kind, float) and isinstance(v, int):
            return float(v)
        if kind is not None and not isinstance(v, type(kind)):
            raise ValueError(f"{spec.key}: expected {type(kind).__name__}, got {v!r}")
        return v

    try:
        if spec.nargs is not None:
            if default is None and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
                return None
            if not isinstance(value, list | tuple):
                raise ValueError(f"{spec.key}: expected a list, got {value!r}")
            sample = default[0] if default else None
            return tuple(one(v, sample) for v in value)
        return one(value, default)
    except ValueError as e:
        raise ValueError(e if str(e).startswith(spec.key) else f"{spec.key}: {e}") from None


# --- recipes: the job each command starts from --------------------------------------------------------------
def train_recipe() -> JobConfig:
    """``fsmoe train``: the tiny GPT-MoE, one process, sequential schedule (every default as declared)."""
    return JobConfig()


def _bench_cluster(job: JobConfig, out: str) -> JobConfig:
    """Both benchmarks: 2 emulated nodes × 2 ranks (EP over all 4 ranks), one thread per rank."""
    return job.replace(parallel=ParallelConfig(nproc=4, procs_per_node=2, ep=4),
                       cluster=ClusterConfig(launcher="auto"), run=RunConfig(out=out, threads=1))


def layer_bench_recipe() -> JobConfig:
    """``fsmoe bench layer``: one MoE layer of D=512, H=2048, E=4, top-2, f=1.2 on 1024 tokens per rank."""
    moe = MoEConfig(num_experts=4, top_k=2, d_hidden=2048, capacity_factor=1.2)
    job = JobConfig(model=dataclasses.replace(gpt2_moe_tiny(), d_model=512, moe=moe))
    return _bench_cluster(job, "bench_results/layer")


def train_bench_recipe() -> JobConfig:
    """``fsmoe bench train``: the tiny GPT-MoE, sequential and fsmoe beside DeepSpeed, 2 + 10 steps on the
    first 2 MB of the corpus; the ``schedule`` section gives the pipelined rows' degrees (r = 2 both ways)."""
    job = _bench_cluster(JobConfig(), "bench_results/train")
    return job.replace(schedule=ScheduleConfig(name="fsmoe", r_fwd=2, r_bwd=2), data=DataConfig(max_bytes=2_000_000),
                       bench=BenchConfig(schedules=("sequential", "fsmoe"), reps=10, warmup=2, timeout_s=900.0))


def simulate_recipe() -> JobConfig:
    """``fsmoe simulate``: Mixtral-8x7B on Testbed-A with the paper's settings, every schedule."""
    return JobConfig(model=mixtral_8x7b(), run=RunConfig(out="sim_results"))


def reproduce_recipe() -> JobConfig:
    """``fsmoe reproduce``: the paper's experiments (their models and clusters are fixed); the report goes
    to ``reproduce/``."""
    return JobConfig(run=RunConfig(out="reproduce"))


RECIPES: dict[str, Callable[[], JobConfig]] = {
    "train": train_recipe,
    "profile": train_recipe,
    "plan": train_recipe,
    "cluster cleanup": train_recipe,
    "bench layer": layer_bench_recipe,
    "bench train": train_bench_recipe,
    "simulate": simulate_recipe,
    "reproduce": reproduce_recipe,
    "report": train_recipe,
}
