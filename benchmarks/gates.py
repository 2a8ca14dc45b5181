"""Benchmark every gate × order, forward + backward, with DeepSpeed's top-1/top-2 gating side by side.

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

Run ``python benchmarks/gates.py --help``. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    Table,
    Timing,
    TimingPolicy,
    env_info,
    not_run,
    set_threads,
    time_fn,
    write_json,
)
from fsmoe.moe.config import GATE_NAMES, ORDER_NAMES, MoEConfig  # noqa: E402
from fsmoe.moe.gates import Gate, Routing, build_gate  # noqa: E402
from fsmoe.moe.order import Order, build_order  # noqa: E402

SLOW_S = 1.0  # a dense-path call above this is dominated by its O(T·E·C) work, not first-call costs
TARGET_SPEEDUP = 10.0
TARGET_SIZE = (8192, 64, 2)  # (T, E, k) of the issue's ≥10× target


@dataclass(frozen=True, kw_only=True)
class GateBenchConfig:
    tokens: tuple[int, ...] = (2048, 8192)
    experts: tuple[int, ...] = (8, 64)
    top_ks: tuple[int, ...] = (1, 2)
    gates: tuple[str, ...] = GATE_NAMES
    orders: tuple[str, ...] = ORDER_NAMES
    d_model: int = 256
    capacity_factor: float = 1.25
    min_capacity: int = 4
    threads: int = 1
    device: str = "cpu"
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    max_dense_gib: float = 4.0  # skip a dense (T, E, C) path whose one float tensor exceeds this
    deepspeed: bool = True
    seed: int = 0
    out: str = "bench_results/gates.json"

    def __post_init__(self) -> None:
        for g in self.gates:
            if g not in GATE_NAMES:
                raise ValueError(f"unknown gate {g!r}; choose from {', '.join(GATE_NAMES)}")
        for o in self.orders:
            if o not in ORDER_NAMES:
                raise ValueError(f"unknown order {o!r}; choose from {', '.join(ORDER_NAMES)}")
        if min(self.tokens) < 1 or min(self.experts) < 1 or min(self.top_ks) < 1 or self.d_model < 1:
            raise ValueError("tokens, experts, top-k and d_model must all be >= 1")


# ---------------------------------------------------------------- our side


def moe_config(gate: str, num_experts: int, k: int, cfg: GateBenchConfig) -> MoEConfig:
    """The MoEConfig of one case: position drop policy; gshard renormalised for k ≥ 2 (DeepSpeed's
    top-2 normalisation); SoftMoE with k slots per expert."""
    return MoEConfig(
        num_experts=num_experts,
        top_k=k,
        gate=gate,
        capacity_factor=cfg.capacity_factor,
        min_capacity=cfg.min_capacity,
        drop_policy="position",
        renormalize=gate == "gshard" and k > 1,
        softmoe_slots=k,
    )


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


# ---------------------------------------------------------------- DeepSpeed side


def load_deepspeed() -> tuple[ModuleType | None, str | None]:
    """Import ``deepspeed.moe.sharded_moe`` if installed. Its gating functions need no process group
    when ``drop_tokens=True`` (only the no-drop branch all-reduces), so no dist init is done here."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
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
    verdict: str  # "PASS", "PASS (ties)" or "FAIL"
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
        detail = (
            f"{int(over_E.sum())} experts over capacity, {n_diff} keep a different (tie-broken) subset; "
            "counts, experts and weights match"
        )
        return RoutingCheck("PASS (ties)", detail) if ok else RoutingCheck("FAIL", "kept sets or weights differ")


# ---------------------------------------------------------------- the run


@dataclass
class Runner:
    cfg: GateBenchConfig
    device: torch.device
    slow_shapes: set[tuple[int, int, int]] = field(default_factory=set)

    def measure(self, fn: Callable[[], None], shape: tuple[int, int, int] | None = None) -> Timing:
        """``shape`` = (T, E, C) marks a dense-path case: once one such call over a second long has run
        at that shape, later ones skip their warm-up (it would only repeat the same O(T·E·C) work)."""
        if shape is not None and dense_gib(*shape) > self.cfg.max_dense_gib:
            return not_run(f"dense (T,E,C) tensor {dense_gib(*shape):.1f} GiB > {self.cfg.max_dense_gib:g}")
        warm = 0 if shape is not None and shape in self.slow_shapes else None
        t = time_fn(fn, self.cfg.timing, device=self.device, warmup=warm)
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
            print(f"  {gate_name:13s} {order_name:6s} T={T} E={E} k={k} C={C}: {_show(t)}", flush=True)
            if gate_name == "gshard":
                gshard[order_name] = t
        if gate_name == "gshard":
            gshard.update(gate=gate, logits=logits, x_TD=x_TD, C=C)
    if sm is None or k > 2 or "gshard" not in cfg.gates:
        return rows, None
    return rows, compare_deepspeed(r, sm, T, E, k, gshard)


def compare_deepspeed(r: Runner, sm: ModuleType, T: int, E: int, k: int, ours: dict) -> dict:
    cfg, C = r.cfg, ours["C"]
    gate, logits, x_TD = ours["gate"], ours["logits"], ours["x_TD"]
    if dense_gib(T, E, C) > cfg.max_dense_gib:
        check = RoutingCheck("SKIPPED", "dense tensors over --max-dense-gib")
    else:
        check = check_routing(sm, gate, logits.detach(), k, cfg)
    res: dict[str, Any] = {
        "T": T,
        "E": E,
        "k": k,
        "C": C,
        "check": check.verdict,
        "check_passed": check.passed,
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
    print(
        f"  deepspeed T={T} E={E} k={k}: check {check.verdict}; " + ", ".join(f"{n} {_fmt_x(res[n])}" for n in RATIOS),
        flush=True,
    )
    return res


# speedup name → (DeepSpeed timing, our timing); > 1 means ours is faster
RATIOS = {
    "einsum_path_vs_our_index": ("ds_einsum", "ours_index"),
    "einsum_path_vs_our_einsum": ("ds_einsum", "ours_einsum"),
    "gate_vs_gate": ("ds_gate", "ours_gate"),
    "sparse_path_vs_our_index": ("ds_sparse", "ours_index"),
}


RATIO_HEADERS = ("DSein/idx", "DSein/ein", "gate/gate", "DSsp/idx")  # short names of RATIOS, same order
DS_COLUMNS = (  # header → key of one DeepSpeed comparison row
    ("T", "T"),
    ("E", "E"),
    ("k", "k"),
    ("C", "C"),
    ("routing", "check"),
    ("ours gate", "ours_gate"),
    ("DS gate", "ds_gate"),
    ("ours+index", "ours_index"),
    ("ours+einsum", "ours_einsum"),
    ("DS+einsum", "ds_einsum"),
    ("DS sparse", "ds_sparse"),
)


def _ratio(ds: Timing, ours: Timing) -> float:
    return round(ds.median_ms / ours.median_ms, 4) if ds.ok and ours.ok else math.nan


def _fmt_x(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}x"


def _show(t: Timing) -> str:
    if not t.ok:
        return f"SKIPPED ({t.skipped})"
    return f"{t.median_ms:.2f} ms (median of {len(t.samples_ms)})"


def evaluate_targets(ds_rows: Sequence[dict]) -> dict[str, Any]:
    """The issue's targets: gshard + order ≥ 10× faster than DeepSpeed's gate + einsum path at
    T=8192, E=64, k=2, and never slower. 'Ours' is the faster of our orders; every like-for-like
    pair below 1× is listed too."""
    best = {}
    for row in ds_rows:
        ours = [t for t in (row["ours_index"], row["ours_einsum"]) if t.ok]
        best[(row["T"], row["E"], row["k"])] = (
            row["ds_einsum"].median_ms / min(t.median_ms for t in ours) if ours and row["ds_einsum"].ok else math.nan
        )
    top = best.get(TARGET_SIZE, math.nan)
    slower = [
        {"T": row["T"], "E": row["E"], "k": row["k"], "pair": name, "speedup": round(row[name], 3)}
        for row in ds_rows
        for name in RATIOS
        if row[name] < 1
    ]
    return {
        "speedup_at_target_size": None if math.isnan(top) else round(top, 2),
        "target_met": None if math.isnan(top) else top >= TARGET_SPEEDUP,
        "never_slower_met": all(not (v < 1) for v in best.values()),
        "best_order_speedups": {f"T={t},E={e},k={k}": round(v, 2) for (t, e, k), v in best.items()},
        "like_for_like_slower": slower,
    }


def run(cfg: GateBenchConfig) -> dict[str, Any]:
    sm, ds_note = load_deepspeed() if cfg.deepspeed else (None, "disabled with --no-deepspeed")
    if ds_note:
        print(f"note: DeepSpeed comparison skipped: {ds_note}")
    set_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    r = Runner(cfg, device)
    rows, ds_rows = [], []
    for T in cfg.tokens:
        for E in cfg.experts:
            for k in cfg.top_ks:
                size_rows, ds_row = run_size(r, sm, T, E, k)
                rows += size_rows
                if ds_row is not None:
                    ds_rows.append(ds_row)
    ds_version = getattr(sys.modules.get("deepspeed"), "__version__", None)
    return {
        "benchmark": "gates",
        "what": "median wall ms of route(logits) + order + dummy expert + iorder, forward + backward",
        "config": asdict(cfg),
        "env": env_info(device),
        "results": rows,
        "deepspeed": {"available": sm is not None, "version": ds_version, "note": ds_note, "results": ds_rows},
        "targets": evaluate_targets(ds_rows) if ds_rows else None,
    }


# ---------------------------------------------------------------- printing and CLI


def print_report(payload: dict[str, Any]) -> None:
    rows = payload["results"]
    sizes = sorted({(r["T"], r["E"]) for r in rows})
    table = Table(["gate", "k", "order"] + [f"T={T} E={E}" for T, E in sizes])
    keys = list(dict.fromkeys((r["gate"], r["k"], r["order"]) for r in rows))
    cell = {(r["gate"], r["k"], r["order"], r["T"], r["E"]): r for r in rows}
    for g, k, o in keys:
        table.add([g, k, o] + [_cell_ms(cell.get((g, k, o, T, E))) for T, E in sizes])
    print(
        f"\nforward+backward, median ms (D={payload['config']['d_model']}, "
        f"{payload['env']['threads']} thread(s), {payload['env']['device']}):"
    )
    print(table)
    ds = payload["deepspeed"]
    if not ds["available"]:
        print(f"\nDeepSpeed comparison: not run ({ds['note']})")
        return
    t2 = Table([h for h, _ in DS_COLUMNS] + list(RATIO_HEADERS))
    for r in ds["results"]:
        t2.add([r[key] for _, key in DS_COLUMNS] + [_fmt_x(r[n]) for n in RATIOS])
    print(f"\nDeepSpeed {ds['version']} vs our gshard (fwd+bwd median ms; ratio = DeepSpeed / ours):")
    print(t2)
    for r in ds["results"]:
        if r["check"] != "PASS":
            print(f"  routing T={r['T']} E={r['E']} k={r['k']}: {r['check']}: {r['check_detail']}")
    tg = payload["targets"]
    if tg is not None:
        top = tg["speedup_at_target_size"]
        print(
            f"target >= {TARGET_SPEEDUP:g}x at T,E,k={TARGET_SIZE} (DS gate+einsum / our best order): "
            f"{'not measured' if top is None else f'{top}x ' + ('MET' if tg['target_met'] else 'NOT MET')}"
        )
        print(
            f"target never slower (DS gate+einsum / our best order): {'MET' if tg['never_slower_met'] else 'NOT MET'}"
        )
        for s in tg["like_for_like_slower"]:
            print(f"  slower like-for-like: T={s['T']} E={s['E']} k={s['k']} {s['pair']}: {s['speedup']}x")


def _cell_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    return "skipped" if row["median_ms"] is None else f"{row['median_ms']:.2f}"


def parse_args(argv: Sequence[str] | None) -> GateBenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_results/gates.json", help="JSON output path (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="small fast run: T in {256, 1024}, fewer reps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--tokens", type=int, nargs="+", help="T values (default 2048 8192; quick 256 1024)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="E values (default %(default)s)")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2], help="k values (default %(default)s)")
    p.add_argument("--gates", nargs="+", default=list(GATE_NAMES), choices=GATE_NAMES, metavar="GATE")
    p.add_argument("--orders", nargs="+", default=list(ORDER_NAMES), choices=ORDER_NAMES, metavar="ORDER")
    p.add_argument("--d-model", type=int, default=256, help="D (default %(default)s)")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="f in C = ceil(k f T / E)")
    p.add_argument("--min-capacity", type=int, default=4, help="same on both sides (default %(default)s)")
    p.add_argument("--reps", type=int, help="max timed reps per case (default 5; quick 3)")
    p.add_argument("--budget-s", type=float, help="time per case that sizes the reps (default 2; quick 0.3)")
    p.add_argument("--skip-above-s", type=float, default=20.0, help="skip a case whose one call is slower")
    p.add_argument("--max-dense-gib", type=float, default=4.0, help="skip dense (T,E,C) paths above this")
    p.add_argument("--no-deepspeed", action="store_true", help="leave out the DeepSpeed comparison")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    reps = a.reps if a.reps is not None else 3 if a.quick else 5
    timing = TimingPolicy(
        warmup=1,
        reps=reps,
        min_reps=min(reps, 2 if a.quick else 1),
        budget_s=a.budget_s if a.budget_s is not None else 0.3 if a.quick else 2.0,
        skip_above_s=a.skip_above_s,
    )
    return GateBenchConfig(
        tokens=tuple(a.tokens or ((256, 1024) if a.quick else (2048, 8192))),
        experts=tuple(a.experts),
        top_ks=tuple(a.topk),
        gates=tuple(a.gates),
        orders=tuple(a.orders),
        d_model=a.d_model,
        capacity_factor=a.capacity_factor,
        min_capacity=a.min_capacity,
        threads=a.threads,
        device=a.device,
        timing=timing,
        max_dense_gib=a.max_dense_gib,
        deepspeed=not a.no_deepspeed,
        seed=a.seed,
        out=a.out,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    payload = run(cfg)
    print_report(payload)
    path = write_json(cfg.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
