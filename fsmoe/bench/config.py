"""What ``fsmoe bench layer`` measures: one MoE layer configuration, one cluster, several implementations.

Legend: T tokens per rank, D model dim, H expert hidden, E experts, K top-k, R pipeline degree.

Pure: nothing here starts a process or talks to ``torch.distributed``. :class:`LayerBenchConfig`
validates everything a rank would otherwise trip over (the layout through
:class:`~fsmoe.parallel.dims.ParallelDims`, the layer through :class:`~fsmoe.moe.config.MoEConfig`,
the schedules' degree rules) and lists the implementations to run (:meth:`LayerBenchConfig.impls`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fsmoe.cluster.spec import EmulatedClusterSpec
from fsmoe.moe.config import MoEConfig
from fsmoe.moe.dispatch import DISPATCHERS
from fsmoe.parallel.dims import ParallelDims
from fsmoe.schedule.schedules import check_degrees, get_schedule

DEEPSPEED = "deepspeed"
LAUNCHERS = ("auto", "emulated", "local")
DEFAULT_SCHEDULES = ("sequential", "tutel", "fsmoe_no_iio", "fsmoe")


def config_from_args(args: Any, base: Any) -> Any:
    """``base`` (a bench config dataclass: the defaults or ``--quick``'s) with every flag the user gave
    applied on top; list-valued flags become tuples, as the configs store them."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name, None) is not None}
    return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def chart_path(out: str | None, chart: str | None) -> str | None:
    """The PNG to write: ``chart`` if given, else ``out`` with ``.png`` for ``.json``; None without either."""
    if chart is not None:
        return chart
    if out is None:
        return None
    return out[:-5] + ".png" if out.endswith(".json") else out + ".png"


@dataclass(frozen=True)
class ImplSpec:
    """One implementation in the table: a schedule of our layer at degrees (r_fwd, r_bwd), or DeepSpeed-MoE.

    ``sequential`` is our layer without a pipeline (dispatch → experts → combine under plain autograd);
    every other schedule runs through :class:`~fsmoe.schedule.pipelined.Pipeline`."""

    family: str  # a schedule name, or "deepspeed"
    r_fwd: int = 1
    r_bwd: int = 1

    @property
    def name(self) -> str:
        if self.family in (DEEPSPEED, "sequential"):
            return self.family
        r = f"{self.r_fwd}" if self.r_fwd == self.r_bwd else f"{self.r_fwd}/{self.r_bwd}"
        return f"{self.family} r={r}"

    @property
    def is_ours(self) -> bool:
        return self.family != DEEPSPEED

    @property
    def pipelined(self) -> bool:
        return self.family not in (DEEPSPEED, "sequential")

    @property
    def gar_in_moe(self) -> bool:
        """Whether the dense Gradient-AllReduce runs inside the MoE backward (else after the backward)."""
        return self.is_ours and get_schedule(self.family).gar_in_moe


@dataclass(kw_only=True, frozen=True)
class LayerBenchConfig:
    """One layer configuration on one emulated cluster; every field has the CLI flag of the same name.

    Layer: ``tokens`` T per rank (one routing group), ``d_model`` D, ``d_hidden`` H, ``experts`` E,
    ``top_k`` K, ``capacity_factor`` f (C = ceil(K·f·T/E)), ``gate``, ``expert``, ``order``, fp32.
    Layout: ``nodes`` × ``procs_per_node`` ranks, EP degree ``ep``, ESP degree ``esp`` (data-parallel
    over the world); ``link`` each node's uplink/downlink rate, or ``"unshaped"``; ``burst_bytes`` the
    tbf bucket (None: :class:`~fsmoe.cluster.spec.EmulatedClusterSpec`'s default).
    Implementations: every schedule in ``schedules`` at every degree in ``degrees`` (``sequential``
    once, unpipelined), plus the (r_fwd, r_bwd) pairs in ``mixed_degrees`` for schedules that allow
    r_fwd ≠ r_bwd; DeepSpeed-MoE when ``include_deepspeed`` and it is installed.
    ``dense_grad_mb``: the dense part's Gradient-AllReduce per layer (MiB, fp32, over the world).
    Timing: ``warmup`` untimed rounds, then ``reps`` rounds; each round runs every implementation
    once, in a rotated order. ``launcher``: ``emulated`` (namespaces; fail if impossible), ``local``
    (plain loopback, unshaped), ``auto`` (emulated where possible, else local with a warning).
    """

    tokens: int = 1024
    d_model: int = 512
    d_hidden: int = 2048
    experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.2
    gate: str = "gshard"
    expert: str = "ffn"
    order: str = "index"
    nodes: int = 2
    procs_per_node: int = 2
    ep: int = 4
    esp: int = 1
    link: str = "1gbit"
    burst_bytes: int | None = None  # tbf bucket of every link; None: the cluster's default
    dispatcher: str = "a2a"
    schedules: tuple[str, ...] = DEFAULT_SCHEDULES
    degrees: tuple[int, ...] = (1, 2, 4, 8)
    mixed_degrees: tuple[tuple[int, int], ...] = ((2, 4), (4, 2), (4, 8), (8, 4))
    dense_grad_mb: float = 4.0
    reps: int = 5
    warmup: int = 1
    include_deepspeed: bool = True
    memory: bool = True
    threads: int = 1
    seed: int = 0
    launcher: str = "auto"
    timeout_s: float = 1800.0
    out: str | None = "bench_results/layer.json"
    chart: str | None = None  # default: ``out`` with .png
    trace: str | None = None
    trace_all: bool = False  # trace every implementation (one file each) instead of the fastest fsmoe

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model", "d_hidden", "reps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"LayerBenchConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"LayerBenchConfig: warmup must be >= 0, got {self.warmup}")
        if self.dense_grad_mb < 0:
            raise ValueError(f"LayerBenchConfig: dense_grad_mb must be >= 0, got {self.dense_grad_mb}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(
                f"LayerBenchConfig: unknown launcher {self.launcher!r}; choose one of {', '.join(LAUNCHERS)}"
            )
        if self.dispatcher not in DISPATCHERS or self.dispatcher == "local":
            choices = ", ".join(d for d in DISPATCHERS if d != "local")
            raise ValueError(f"LayerBenchConfig: unknown dispatcher {self.dispatcher!r}; choose one of {choices}")
        if not self.schedules:
            raise ValueError("LayerBenchConfig: give at least one schedule")
        for s in self.schedules:
            get_schedule(s)  # ValueError listing the choices
        self.cluster_spec()  # link rate and tbf bucket checks
        self.moe_config()  # gate/expert/order/k/f checks, with the numbers
        dims = self.dims()  # layout checks, with the numbers
        if self.experts % self.ep:
            raise ValueError(f"LayerBenchConfig: experts E={self.experts} is not divisible by ep={self.ep}")
        if self.d_hidden % self.esp:
            raise ValueError(f"LayerBenchConfig: d_hidden H={self.d_hidden} is not divisible by esp={self.esp}")
        if self.ep * self.esp != dims.world_size:
            # Our rows would then need an expert-gradient AllReduce over expert-DP groups, which the
            # benchmark does not model; keep the paper's layout (every rank holds distinct shards).
            raise ValueError(
                f"LayerBenchConfig: ep*esp must equal the world size (nodes*procs_per_node), got "
                f"ep={self.ep} * esp={self.esp} = {self.ep * self.esp} != {dims.world_size}"
            )
        for r_fwd, r_bwd in self._pairs():
            if r_fwd < 1 or r_bwd < 1:
                raise ValueError(f"LayerBenchConfig: degrees must be >= 1, got r_fwd={r_fwd}, r_bwd={r_bwd}")
        self.impls()  # the degree rules of every schedule

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def dims(self) -> ParallelDims:
        return ParallelDims(world_size=self.world_size, procs_per_node=self.procs_per_node, dp=self.world_size,
                            ep=self.ep, esp=self.esp)

    def cluster_spec(self) -> EmulatedClusterSpec:
        return EmulatedClusterSpec(nodes=self.nodes, procs_per_node=self.procs_per_node, link=self.link,
                                   burst_bytes=self.burst_bytes)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(num_experts=self.experts, top_k=self.top_k, d_hidden=self.d_hidden, gate=self.gate,
                         order=self.order, expert=self.expert, capacity_factor=self.capacity_factor)

    def _pairs(self) -> list[tuple[int, int]]:
        return [(r, r) for r in self.degrees] + list(self.mixed_degrees)

    def impls(self) -> list[ImplSpec]:
        """Every implementation to run, in table order (DeepSpeed last; dropped later if not installed)."""
        out: list[ImplSpec] = []
        for name in self.schedules:
            spec = get_schedule(name)
            if not spec.pipelined:
                out.append(ImplSpec(name))
                continue
            pairs = [(r, r) for r in self.degrees]
            if spec.independent_degrees and name == "fsmoe":
                pairs += [p for p in self.mixed_degrees if p[0] != p[1]]
            for r_fwd, r_bwd in dict.fromkeys(pairs):
                check_degrees(spec, r_fwd, r_bwd)
                out.append(ImplSpec(name, r_fwd, r_bwd))
        if self.include_deepspeed:
            out.append(ImplSpec(DEEPSPEED))
        return out

    def chart_path(self) -> str | None:
        return chart_path(self.out, self.chart)

    def replace(self, **changes: object) -> LayerBenchConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def quick_layer_config(**overrides: object) -> LayerBenchConfig:
    """Small sizes that finish in about half a minute: checks that everything runs, not performance."""
    base: dict[str, object] = dict(tokens=256, d_model=128, d_hidden=256, degrees=(1, 2), mixed_degrees=((1, 2),),
                                   dense_grad_mb=0.25, reps=2, warmup=1)
    base.update(overrides)
    return LayerBenchConfig(**base)  # type: ignore[arg-type]
