"""Every gate × order, forward + backward, with DeepSpeed's top-1/top-2 gating side by side (one process).

Legend: T tokens, D model dim, E experts, K top-k, C capacity slots per expert.

One measured step (``ours``): fresh grads; ``routing = gate.route(logits_TE)``;
``y_TD = order.iorder(expert(order.order(x_TD, routing)), routing)`` with a dummy expert
(``0.5 · x_ECD``, one elementwise op); ``(y_TD.sum() + routing.aux_loss).backward()``. The gate's
projection (x·W_g) is not timed: every gate starts from ready logits, so only routing is compared.
SoftMoE has no k; it runs with ``softmoe_slots = k`` (E·k dense slots). ``switch`` is top-1 only.

DeepSpeed side (optional, ``pip install -e .[bench]``): ``top1gating`` / ``top2gating`` on the same
logits, same C, ``drop_tokens=True``, no random token selection / second-expert sampling, against our
``gshard`` gate with the position drop policy (k=2 renormalised over the kept choices, as DeepSpeed
does). Timed three ways: the gate alone (backward of aux + Σ weights); gate + the GShard einsum
dispatch/combine on its dense (T, E, C) tensors (``sec,sm->ecm`` / ``sec,ecm->sm``); and gate +
the sparse-route encode/decode that ``deepspeed.moe.sharded_moe.MOELayer`` itself runs in 0.19.x.

:func:`run_gates_bench` runs a :class:`GateBenchConfig` and returns the payload; :func:`format_gates_report`
prints it; ``benchmarks/gates.py`` is the command line (its flags are this config's fields, named as
in the job config: ``--tokens``, ``--experts``, ``--top-k``, ``--d-model``, ``--capacity-factor`` ...).
Timing: :func:`fsmoe.bench.harness.time_fn` (median of as many calls as fit ``budget_s``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from fsmoe.bench.harness import Timing, TimingPolicy, not_run, set_threads, time_fn
from fsmoe.bench.report import Table, env_info, write_json
from fsmoe.config import GATE_IGNORES, GATE_NAMES, ORDER_NAMES, MoEConfig
from fsmoe.config.values import check_choice, opt
from fsmoe.moe.gates import Gate, Routing, build_gate
from fsmoe.moe.order import Order, build_order

SLOW_S = 1.0  # a dense-path call above this is dominated by its O(T·E·C) work, not first-call costs
TARGET_SPEEDUP = 10.0
TARGET_SIZE = (8192, 64, 2)  # (T, E, k) of the issue's ≥10× target
OUT_FILE = "gates.json"


@dataclass(kw_only=True, frozen=True)
class GateBenchConfig:
    """The sizes (every T × E × k), the gates and orders, and how hard to time; each field is the
    flag of the same name (``--top-k`` for ``top_k``)."""

    tokens: tuple[int, ...] = opt((2048, 8192), "T values", parse=int, nargs="+")
    experts: tuple[int, ...] = opt((8, 64), "E values", parse=int, nargs="+")
    top_k: tuple[int, ...] = opt((1, 2), "k values", parse=int, nargs="+")
    gates: tuple[str, ...] = opt(GATE_NAMES, "gates to run", nargs="+")
    orders: tuple[str, ...] = opt(ORDER_NAMES, "orders to run", nargs="+")
    d_model: int = opt(256, "model dim D", parse=int)
    capacity_factor: float = opt(1.25, "capacity factor f in C = ceil(k f T / E)", parse=float)
    min_capacity: int = opt(4, "lower bound on C, the same on both sides", parse=int)
    warmup: int = opt(1, "untimed calls first", parse=int)
    reps: int = opt(5, "most timed calls per case", parse=int)
    min_reps: int = opt(1, "fewest timed calls per case", parse=int)
    budget_s: float = opt(2.0, "time per case that sizes the number of calls", parse=float)
    skip_above_s: float = opt(20.0, "skip a case whose one call is slower", parse=float)
    max_dense_gib: float = opt(4.0, "skip a dense (T, E, C) path whose one float tensor exceeds this", parse=float)
    deepspeed: bool = opt(True, "compare with DeepSpeed's gating where it is installed")
    threads: int = opt(1, "torch intra-op threads", parse=int)
    device: str = opt("cpu", "cpu or cuda")
    seed: int = opt(0, "seeds the logits and inputs", parse=int)
    out: str = opt("bench_results/gates", f"output directory ({OUT_FILE})")

    def __post_init__(self) -> None:
        for what, values, names in (("gate", self.gates, GATE_NAMES), ("order", self.orders, ORDER_NAMES)):
            for v in values:
                check_choice(what, v, names)
        sizes = {"tokens": self.tokens, "experts": self.experts, "top_k": self.top_k}
        for name, values in sizes.items():
            if not values or min(values) < 1:
                raise ValueError(f"GateBenchConfig: {name} must be one or more ints >= 1, got {values!r}")
        if self.d_model < 1:
            raise ValueError(f"GateBenchConfig: d_model must be >= 1, got {self.d_model}")
        self.timing()  # validates warmup, reps and min_reps, naming them

    def timing(self) -> TimingPolicy:
        return TimingPolicy(warmup=self.warmup, reps=self.reps, min_reps=self.min_reps, budget_s=self.budget_s,
                            skip_above_s=self.skip_above_s)


# ``--quick``: T in {256, 1024}, fewer and cheaper calls. Flags given on top win.
QUICK_GATES: dict[str, Any] = {"tokens": (256, 1024), "reps": 3, "min_reps": 2, "budget_s": 0.3}


def quick_gates_config(**overrides: Any) -> GateBenchConfig:
    return GateBenchConfig(**{**QUICK_GATES, **overrides})


# --- our side ---------------------------------------------------------------------------------------------
def moe_config(gate: str, num_experts: int, k: int, cfg: GateBenchConfig) -> MoEConfig:
    """The MoEConfig of one case: position drop policy; gshard renormalised for k ≥ 2 (DeepSpeed's
    top-2 normalisation); SoftMoE with k slots per expert."""
    settings = dict(top_k=k, capacity_factor=cfg.capacity_factor, min_capacity=cfg.min_capacity,
                    drop_policy="position", renormalize=gate == "gshard" and k > 1)
    for name in GATE_IGNORES.get(gate, ()):  # what the gate does not use stays at its default (no warning)
        settings.pop(name, None)
    return MoEConfig(num_experts=num_experts, gate=gate, softmoe_slots=k, **settings)  # type: ignore[arg-type]


def dummy_expert(x_ECD: Tensor) -> Tensor:
    """Stands in for the experts: one E·C·D elementwise op on both sides of every comparison."""
    return x_ECD * 0.5


def ours_step(gate: Gate, order: Order, logits: Tensor, x_TD: Tensor) -> Callable[[], None]:
    def step() -> None:
        logits.grad, x_TD.grad = None, None
        routing = gate.route(logits)
        y_TD = order.iorder(dummy_expert(order.order(x_TD, routing)), routing)
        (y_TD.sum() + routing.aux_loss).backward()

    return step


def ours_gate_step(gate: Gate, logits: Tensor) -> Callable[[], None]:
    def step() -> None:
        logits.grad = None
        routing = gate.route(logits)
        (routing.aux_loss + routing.weight_EC.sum()).backward()

    return step


def dense_gib(T: int, E: int, C: int) -> float:
    return T * E * C * 4 / 2**30


# --- DeepSpeed's side -------------------------------------------------------------------------------------
def load_deepspeed() -> tuple[ModuleType | None, str | None]:
    """Import ``deepspeed.moe.sharded_moe`` if installed. Its gating functions need no process group
    when ``drop_tokens=True`` (only the no-drop branch all-reduces), so no dist init is done here."""
    from fsmoe.bench.deepspeed_peer import default_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    try:
        from deepspeed.moe import sharded_moe
    except Exception as exc:  # ImportError, or a broken install failing at import time
        return None, f"deepspeed not importable ({type(exc).__name__}: {exc}); install the 'bench' extra"
    return sharded_moe, None


def ds_gating(sm: ModuleType, logits: Tensor, k: int, cfg: GateBenchConfig, sparse: bool) -> tuple:
    """DeepSpeed's top-k gating with our drop policy: position priority, no RTS, no sampling."""
    f, mc = cfg.capacity_factor, cfg.min_capacity
    if k == 1:
        return sm.top1gating(logits, f, mc, drop_tokens=True, use_rts=False, sparse_routes=sparse)
    return sm.top2gating(logits, f, mc, drop_tokens=True, top2_2nd_expert_sampling=False, sparse_routes=sparse)


def ds_gate_step(sm: ModuleType, logits: Tensor, k: int, cfg: GateBenchConfig) -> Callable[[], None]:
    def step() -> None:
        logits.grad = None
        l_aux, combine_TEC, _, _ = ds_gating(sm, logits, k, cfg, sparse=False)
        (l_aux + combine_TEC.sum()).backward()

    return step


def ds_dense_step(sm: ModuleType, logits: Tensor, x_TD: Tensor, k: int, cfg: GateBenchConfig) -> Callable:
    """DeepSpeed's gate + GShard einsum dispatch / combine on its dense (T, E, C) tensors."""

    def step() -> None:
        logits.grad, x_TD.grad = None, None
        l_aux, combine_TEC, dispatch_TEC, _ = ds_gating(sm, logits, k, cfg, sparse=False)
        x_ECD = sm.einsum("sec,sm->ecm", dispatch_TEC.type_as(x_TD), x_TD)
        y_TD = sm.einsum("sec,ecm->sm", combine_TEC.type_as(x_TD), dummy_expert(x_ECD))
        (y_TD.sum() + l_aux).backward()

    return step


def ds_sparse_step(sm: ModuleType, logits: Tensor, x_TD: Tensor, k: int, cfg: GateBenchConfig) -> Callable:
    """DeepSpeed's gate with ``sparse_routes=True`` + the slot encode/decode of its ``MOELayer``."""
    T, D = x_TD.shape
    E = logits.shape[1]

    def step() -> None:
        logits.grad, x_TD.grad = None, None
        l_aux, cap, _, idx_KT, loc_KT, gates_KT, _ = ds_gating(sm, logits, k, cfg, sparse=True)
        C = int(cap)
        slots_KT = sm._route_slots(idx_KT, loc_KT, E, C)
        x_ECD = sm._sparse_encode(x_TD, slots_KT, E, C)
        y_TD = sm._sparse_decode(dummy_expert(x_ECD).view(E * C, D), slots_KT, gates_KT, T)
        (y_TD.sum() + l_aux).backward()

    return step


@dataclass(frozen=True)
class RoutingCheck:
    verdict: str  # "PASS", "PASS (ties)", "FAIL" or "SKIPPED"
    detail: str

    @property
    def passed(self) -> bool:
        return self.verdict.startswith("PASS")


def dense_combine(routing: Routing) -> Tensor:
    """Our slot form as GShard's dense (T, E, C) combine tensor (row T collects empty slots)."""
    E, C = routing.token_EC.shape
    e_EC = torch.arange(E, device=routing.token_EC.device).unsqueeze(1).expand(E, C)
    c_EC = torch.arange(C, device=routing.token_EC.device).unsqueeze(0).expand(E, C)
    out = routing.weight_EC.new_zeros(routing.num_tokens + 1, E, C)
    return out.index_put((routing.token_EC, e_EC, c_EC), routing.weight_EC)[: routing.num_tokens]


def check_routing(sm: ModuleType, gate: Gate, logits: Tensor, k: int, cfg: GateBenchConfig) -> RoutingCheck:
    """Same tokens → same experts → same slots with the same weights, position-wise on the dense
    (T, E, C) combine tensors. One legitimate difference is accepted, as "PASS (ties)": DeepSpeed's
    top-1 without RTS picks which over-capacity tokens to keep with ``torch.topk`` over a 0/1 mask,
    whose tie order is unspecified, where we keep the first C in token order. Then on the overflowing
    experts each side must keep exactly C of the tokens that asked for that expert, with equal weights
    on the tokens both keep; every other expert must still match position-wise."""
    with torch.no_grad():
        routing = gate.route(logits)
        ds_TEC = ds_gating(sm, logits.clone(), k, cfg, sparse=False)[1]
        if ds_TEC.shape[2] != routing.capacity:
            return RoutingCheck("FAIL", f"capacity: ours {routing.capacity}, DeepSpeed {ds_TEC.shape[2]}")
        ours_TEC = dense_combine(routing).to(ds_TEC.dtype)
        if torch.allclose(ours_TEC, ds_TEC, rtol=1e-5, atol=1e-6):
            return RoutingCheck("PASS", "dense combine tensors equal position-wise")
        T, E, C = ds_TEC.shape
        asked_TE = torch.zeros(T, E, dtype=torch.bool, device=logits.device).scatter_(
            1, logits.topk(k, dim=1).indices, True
        )
        over_E = asked_TE.sum(0) > C
        same_E = torch.isclose(ours_TEC, ds_TEC, rtol=1e-5, atol=1e-6).all(2).all(0)
        if not bool(same_E[~over_E].all()):
            bad = (~same_E & ~over_E).nonzero().flatten().tolist()
            return RoutingCheck("FAIL", f"experts within capacity differ: {bad[:8]}")
        kept_ours, kept_ds = ours_TEC.ne(0).any(2), ds_TEC.ne(0).any(2)
        both = kept_ours & kept_ds
        ok = (
            bool((kept_ds <= asked_TE).all())
            and bool((kept_ours <= asked_TE).all())
            and torch.equal(kept_ours.sum(0)[over_E], kept_ds.sum(0)[over_E])
            and torch.allclose(ours_TEC.sum(2)[both], ds_TEC.sum(2)[both], rtol=1e-5, atol=1e-6)
        )
        n_diff = int((kept_ours != kept_ds).any(0).sum())
        detail = (f"{int(over_E.sum())} experts over capacity, {n_diff} keep a different (tie-broken) subset; "
                  "counts, experts and weights match")
        return RoutingCheck("PASS (ties)", detail) if ok else RoutingCheck("FAIL", "kept sets or weights differ")


# --- the run ----------------------------------------------------------------------------------------------
@dataclass
class Runner:
    cfg: GateBenchConfig
    device: torch.device
    echo: Callable[[str], None]
    slow_shapes: set[tuple[int, int, int]] = field(default_factory=set)

    def measure(self, fn: Callable[[], None], shape: tuple[int, int, int] | None = None) -> Timing:
        """``shape`` = (T, E, C) marks a dense-path case: once one such call over a second long has run
        at that shape, later ones skip their warm-up (it would only repeat the same O(T·E·C) work)."""
        if shape is not None and dense_gib(*shape) > self.cfg.max_dense_gib:
            return not_run(f"dense (T,E,C) tensor {dense_gib(*shape):.1f} GiB > {self.cfg.max_dense_gib:g}")
        warm = 0 if shape is not None and shape in self.slow_shapes else None
        t = time_fn(fn, self.cfg.timing(), device=self.device, warmup=warm)
        if shape is not None and t.ok and t.median_ms > SLOW_S * 1e3:
            self.slow_shapes.add(shape)
        return t

    def inputs(self, T: int, n_logits: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed + 7919 * T + n_logits)
        logits = torch.randn(T, n_logits, generator=g).to(self.device).requires_grad_()
        x_TD = torch.randn(T, self.cfg.d_model, generator=g).to(self.device).requires_grad_()
        return logits, x_TD


def run_size(r: Runner, sm: ModuleType | None, T: int, E: int, k: int) -> tuple[list, dict | None]:
    cfg, rows = r.cfg, []
    gshard: dict[str, Any] = {}
    for gate_name in cfg.gates:
        if (gate_name == "switch" and k != 1) or k > E:
            continue
        gate = build_gate(moe_config(gate_name, E, k, cfg), cfg.d_model).to(r.device)
        with torch.no_grad():
            n_logits = gate.logits(torch.zeros(1, cfg.d_model, device=r.device)).shape[-1]
            logits, x_TD = r.inputs(T, n_logits)
            C = gate.route(logits).capacity
        for order_name in cfg.orders:
            dense = order_name == "einsum" and gate_name != "softmoe"
            t = r.measure(ours_step(gate, build_order(order_name), logits, x_TD), (T, E, C) if dense else None)
            rows.append({"gate": gate_name, "order": order_name, "T": T, "E": E, "k": k, "C": C, **t.to_dict()})
            r.echo(f"  {gate_name:13s} {order_name:6s} T={T} E={E} k={k} C={C}: {_show(t)}")
            if gate_name == "gshard":
                gshard[order_name] = t
        if gate_name == "gshard":
            gshard.update(gate=gate, logits=logits, x_TD=x_TD, C=C)
    if sm is None or k > 2 or "gshard" not in cfg.gates:
        return rows, None
    return rows, compare_deepspeed(r, sm, T, E, k, gshard)


# speedup name → (DeepSpeed timing, our timing); > 1 means ours is faster
RATIOS = {
    "einsum_path_vs_our_index": ("ds_einsum", "ours_index"),
    "einsum_path_vs_our_einsum": ("ds_einsum", "ours_einsum"),
    "gate_vs_gate": ("ds_gate", "ours_gate"),
    "sparse_path_vs_our_index": ("ds_sparse", "ours_index"),
}
RATIO_HEADERS = ("DSein/idx", "DSein/ein", "gate/gate", "DSsp/idx")  # short names of RATIOS, same order
DS_COLUMNS = (("T", "T"), ("E", "E"), ("k", "k"), ("C", "C"), ("routing", "check"), ("ours gate", "ours_gate"),
              ("DS gate", "ds_gate"), ("ours+index", "ours_index"), ("ours+einsum", "ours_einsum"),
              ("DS+einsum", "ds_einsum"), ("DS sparse", "ds_sparse"))  # header → key of one comparison row


def compare_deepspeed(r: Runner, sm: ModuleType, T: int, E: int, k: int, ours: dict) -> dict:
    cfg, C = r.cfg, ours["C"]
    gate, logits, x_TD = ours["gate"], ours["logits"], ours["x_TD"]
    if dense_gib(T, E, C) > cfg.max_dense_gib:
        check = RoutingCheck("SKIPPED", "dense tensors over --max-dense-gib")
    else:
        check = check_routing(sm, gate, logits.detach(), k, cfg)
    res: dict[str, Any] = {
        "T": T, "E": E, "k": k, "C": C, "check": check.verdict, "check_passed": check.passed,
        "check_detail": check.detail,
        "ours_gate": r.measure(ours_gate_step(gate, logits)),
        "ds_gate": r.measure(ds_gate_step(sm, logits, k, cfg), (T, E, C)),
        "ours_index": ours.get("index", not_run("order not selected")),
        "ours_einsum": ours.get("einsum", not_run("order not selected")),
        "ds_einsum": r.measure(ds_dense_step(sm, logits, x_TD, k, cfg), (T, E, C)),
    }
    if hasattr(sm, "_sparse_encode"):
        res["ds_sparse"] = r.measure(ds_sparse_step(sm, logits, x_TD, k, cfg))
    else:
        res["ds_sparse"] = not_run("this deepspeed has no sparse-route MOELayer path")
    for name, (ds_key, our_key) in RATIOS.items():
        res[name] = _ratio(res[ds_key], res[our_key])
    r.echo(f"  deepspeed T={T} E={E} k={k}: check {check.verdict}; "
           + ", ".join(f"{n} {_fmt_x(res[n])}" for n in RATIOS))
    return res


def _ratio(ds: Timing, ours: Timing) -> float:
    return round(ds.median_ms / ours.median_ms, 4) if ds.ok and ours.ok else math.nan


def _fmt_x(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}x"


def _show(t: Timing) -> str:
    if not t.ok:
        return f"SKIPPED ({t.skipped})"
    return f"{t.median_ms:.2f} ms (median of {len(t.samples_ms)})"


def evaluate_targets(ds_rows: Sequence[dict]) -> dict[str, Any]:
    """The targets: gshard + order ≥ 10× faster than DeepSpeed's gate + einsum path at T=8192, E=64,
    k=2 (issue 5), and never slower than DeepSpeed's best path — the faster of gate + einsum and the
    sparse route — at any size (issue 13). 'Ours' is the faster of our orders; every like-for-like
    pair below 1× is listed too."""
    vs_einsum, vs_best = {}, {}
    for row in ds_rows:
        size = (row["T"], row["E"], row["k"])
        ours = [t.median_ms for t in (row["ours_index"], row["ours_einsum"]) if t.ok]
        ds = [t.median_ms for t in (row["ds_einsum"], row["ds_sparse"]) if t.ok]
        vs_einsum[size] = row["ds_einsum"].median_ms / min(ours) if ours and row["ds_einsum"].ok else math.nan
        vs_best[size] = min(ds) / min(ours) if ours and ds else math.nan
    top = vs_einsum.get(TARGET_SIZE, math.nan)
    slower = [{"T": row["T"], "E": row["E"], "k": row["k"], "pair": name, "speedup": round(row[name], 3)}
              for row in ds_rows for name in RATIOS if row[name] < 1]
    return {
        "speedup_at_target_size": None if math.isnan(top) else round(top, 2),
        "target_met": None if math.isnan(top) else top >= TARGET_SPEEDUP,
        "never_slower_met": all(not (v < 1) for v in vs_best.values()),
        "best_order_speedups": {f"T={t},E={e},k={k}": round(v, 2) for (t, e, k), v in vs_einsum.items()},
        "best_ds_path_speedups": {f"T={t},E={e},k={k}": round(v, 2) for (t, e, k), v in vs_best.items()},
        "like_for_like_slower": slower,
    }


def run_gates_bench(cfg: GateBenchConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every T × E × k of ``cfg`` (progress lines through ``echo``); writes ``<cfg.out>/gates.json`` and
    returns the payload (the DeepSpeed rows' timings as :class:`~fsmoe.bench.harness.Timing`, which the
    JSON holds as dicts)."""
    sm, ds_note = load_deepspeed() if cfg.deepspeed else (None, "disabled with --no-deepspeed")
    if ds_note:
        echo(f"note: DeepSpeed comparison skipped: {ds_note}")
    set_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    r = Runner(cfg, device, echo)
    rows, ds_rows = [], []
    for T in cfg.tokens:
        for E in cfg.experts:
            for k in cfg.top_k:
                size_rows, ds_row = run_size(r, sm, T, E, k)
                rows += size_rows
                if ds_row is not None:
                    ds_rows.append(ds_row)
    ds_version = getattr(sys.modules.get("deepspeed"), "__version__", None)
    payload = {
        "benchmark": "gates",
        "what": "median wall ms of route(logits) + order + dummy expert + iorder, forward + backward",
        "config": dataclasses.asdict(cfg),
        "env": env_info(device),
        "results": rows,
        "deepspeed": {"available": sm is not None, "version": ds_version,
                      "note": ds_note, "results": ds_rows},
        "targets": evaluate_targets(ds_rows) if ds_rows else None,
    }
    write_json(Path(cfg.out) / OUT_FILE, payload)
    return payload


def format_gates_report(payload: dict[str, Any]) -> str:
    """The tables: our gate × order times per size; DeepSpeed's side and the targets (where it ran)."""
    rows = payload["results"]
    sizes = sorted({(r["T"], r["E"]) for r in rows})
    table = Table(["gate", "k", "order"] + [f"T={T} E={E}" for T, E in sizes])
    cell = {(r["gate"], r["k"], r["order"], r["T"], r["E"]): r for r in rows}
    for g, k, o in dict.fromkeys((r["gate"], r["k"], r["order"]) for r in rows):
        table.add([g, k, o] + [_cell_ms(cell.get((g, k, o, T, E))) for T, E in sizes])
    env = payload["env"]
    lines = [f"\nforward+backward, median ms (D={payload['config']['d_model']}, {env['threads']} thread(s), "
             f"{env['device']}):", str(table)]
    ds = payload["deepspeed"]
    if not ds["available"]:
        return "\n".join([*lines, f"\nDeepSpeed comparison: not run ({ds['note']})"])
    t2 = Table([h for h, _ in DS_COLUMNS] + list(RATIO_HEADERS))
    for r in ds["results"]:
        t2.add([r[key] for _, key in DS_COLUMNS] + [_fmt_x(r[n]) for n in RATIOS])
    lines += [f"\nDeepSpeed {ds['version']} vs our gshard (fwd+bwd median ms; ratio = DeepSpeed / ours):", str(t2)]
    lines += [f"  routing T={r['T']} E={r['E']} k={r['k']}: {r['check']}: {r['check_detail']}"
              for r in ds["results"] if r["check"] != "PASS"]
    tg = payload["targets"]
    if tg is not None:
        top = tg["speedup_at_target_size"]
        lines.append(f"target >= {TARGET_SPEEDUP:g}x at T,E,k={TARGET_SIZE} (DS gate+einsum / our best order): "
                     f"{'not measured' if top is None else f'{top}x ' + ('MET' if tg['target_met'] else 'NOT MET')}")
        best = ", ".join(f"{size} {x}x" for size, x in tg["best_ds_path_speedups"].items())
        lines.append("target never slower (DS best of gate+einsum and sparse / our best order): "
                     f"{'MET' if tg['never_slower_met'] else 'NOT MET'} ({best})")
        lines += [f"  slower like-for-like: T={s['T']} E={s['E']} k={s['k']} {s['pair']}: {s['speedup']}x"
                  for s in tg["like_for_like_slower"]]
    return "\n".join(lines)


def _cell_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    return "skipped" if row["median_ms"] is None else f"{row['median_ms']:.2f}"
