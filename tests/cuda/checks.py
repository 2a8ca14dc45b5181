"""The GPU checks, as functions that return what they measured: the CUDA tests (``pytest -m cuda``) assert
on them, and ``scripts/gpu_check.py`` prints them as its report. Each needs a CUDA device.

Legend: T tokens, D model dim, H expert hidden, E experts, C capacity slots per expert.

* :func:`layer_diffs` — every gate × order × expert, fp32, forward + backward on CUDA against the same
  weights and input on the CPU (the CPU layer is itself checked against a naive reference in tests/moe).
* :func:`bf16_diffs` — the same layer under bf16 autocast on CUDA against fp32 on CUDA.
* :func:`pipelined_diff` — the pipelined block on the stream runtime (CUDA) against thread lanes (CPU).
* :func:`measure_overlap` — a long communication-like kernel on a lane's stream beside expert matmuls on
  the current stream, timed with CUDA events.
* :func:`train_tiny` — a tiny GPT-MoE, pipelined on the stream runtime, trained for a few steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.config import EXPERT_NAMES, GATE_NAMES, ORDER_NAMES, ModelConfig, MoEConfig, get_schedule
from fsmoe.models import build_lm
from fsmoe.moe import MoELayer
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import build_experts
from fsmoe.parallel.parallelize import apply_pipeline
from fsmoe.schedule.ir import Task
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime
from fsmoe.train.precision import autocast

T, D, H, E = 96, 32, 64, 8
FP32_TOL = 1e-5  # relative L2 error of fp32 on the GPU against the CPU (TF32 off)
BF16_TOL = 3e-2  # relative L2 error of bf16 against fp32 (8 mantissa bits, a few roundings in a row)
OVERLAP_LIMIT = 1.15  # overlapped time ≤ this × the longer part


def strict_fp32() -> None:
    """No TF32 anywhere: fp32 matmuls on the GPU then match the CPU's to rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _config(gate: str, order: str, expert: str) -> MoEConfig:
    with warnings.catch_warnings():  # settings a gate ignores warn; irrelevant here
        warnings.simplefilter("ignore")
        return MoEConfig(num_experts=E, d_hidden=H, gate=gate, order=order, expert=expert,
                         top_k=1 if gate == "switch" else 2, noisy=False)


def _layer(gate: str, order: str, expert: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer.from_config(_config(gate, order, expert), D)
    with torch.no_grad():  # spread the logits: no near-tie for rounding differences to flip
        for p in layer.gate.parameters():
            p.mul_(8.0)
    return layer


def _run(layer: MoELayer, x_TD: Tensor) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x_TD.clone().requires_grad_()
    y = layer(x)
    (y.float().square().sum() + layer.last_stats.aux_loss).backward()
    return y.detach().float(), x.grad.float(), [p.grad for p in layer.parameters()], layer.last_routing.token_EC


def _rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (on the CPU, in fp32)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@dataclass(frozen=True)
class LayerDiff:
    """One gate × order × expert on the GPU against the CPU (or bf16 against fp32): whether the routing is
    the same, and the relative L2 errors of the output, the input gradient and the worst weight gradient."""

    gate: str
    order: str
    expert: str
    same_routing: bool
    y_rel: float
    dx_rel: float
    grad_rel: float

    def ok(self, tol: float) -> bool:
        return self.same_routing and max(self.y_rel, self.dx_rel, self.grad_rel) <= tol


def layer_diffs(device: torch.device) -> list[LayerDiff]:
    strict_fp32()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    rows = []
    for gate in GATE_NAMES:
        for order in ORDER_NAMES:
            for expert in EXPERT_NAMES:
                cpu = _layer(gate, order, expert)
                want = _run(cpu, x)
                got = _run(_layer(gate, order, expert).to(device), x.to(device))
                grad_rel = max(_rel(g, w) for g, w in zip(got[2], want[2], strict=True) if w is not None)
                same = torch.equal(got[3].cpu(), want[3])
                y_rel, dx_rel = _rel(got[0], want[0]), _rel(got[1], want[1])
                rows.append(LayerDiff(gate, order, expert, same, y_rel, dx_rel, grad_rel))
    return rows


def bf16_diffs(device: torch.device) -> list[LayerDiff]:
    """bf16 autocast against fp32, both on ``device``, every gate × order with FFN experts."""
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(device)
    rows = []
    for gate in GATE_NAMES:
        for order in ORDER_NAMES:
            layer = _layer(gate, order, "ffn").to(device)
            want = _run(layer, x)
            with autocast("bf16", device):
                layer.zero_grad(set_to_none=True)
                xb = x.clone().requires_grad_()
                y = layer(xb)
                loss = y.float().square().sum() + layer.last_stats.aux_loss
            loss.backward()
            rows.append(LayerDiff(
                gate, order, "ffn", torch.equal(layer.last_routing.token_EC, want[3]), _rel(y, want[0]),
                _rel(xb.grad, want[1]),
                max(_rel(p.grad, w) for p, w in zip(layer.parameters(), want[2], strict=True) if w is not None),
            ))
    return rows


def pipelined_diff(device: torch.device) -> float:
    """Largest relative error of y, dx and the expert gradients: the fsmoe schedule at (r_fwd, r_bwd) = (2, 4)
    on CUDA streams against the same block on CPU thread lanes."""
    strict_fp32()
    spec = get_schedule("fsmoe")
    x_ECD = torch.randn(E, 16, D, generator=torch.Generator().manual_seed(3))
    dy_ECD = torch.randn(E, 16, D, generator=torch.Generator().manual_seed(4))
    out = []
    for dev in (torch.device("cpu"), device):
        torch.manual_seed(5)
        experts = build_experts("ffn", E, D, H).to(dev)
        pipe = Pipeline(spec=spec, r_fwd=2, r_bwd=4, runtime=Runtime.for_schedule(spec, device=dev))
        x = x_ECD.to(dev).requires_grad_()
        y = pipe(x, Dispatcher(), experts)
        y.backward(dy_ECD.to(dev))
        out.append([y.detach(), x.grad, *[p.grad for p in experts.parameters()]])
    return max(_rel(g, w) for g, w in zip(out[1], out[0], strict=True))


@dataclass(frozen=True)
class Overlap:
    """CUDA-event times (ms) of the communication-like task alone, the compute alone, and both issued by
    the stream runtime (the task on the inter lane's stream, the compute on the current stream)."""

    comm_ms: float
    compute_ms: float
    both_ms: float

    @property
    def ratio(self) -> float:
        """Overlapped time over the longer part: 1 is perfect overlap, 2 none (for equal parts)."""
        return self.both_ms / max(self.comm_ms, self.compute_ms)


def _timed(device: torch.device, fn: object) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def measure_overlap(device: torch.device, target_ms: float = 40.0) -> Overlap:
    """The communication-like task is ``torch.cuda._sleep`` (one spinning block, as a collective's kernel
    holds few SMs and waits on the wire), sized to last as long as the compute (fp32 expert matmuls)."""
    strict_fp32()
    w_eDH = torch.randn(E, 1024, 4096, device=device)
    x_eCD = torch.randn(E, 1024, 1024, device=device)

    def compute() -> Tensor:
        return torch.bmm(x_eCD, w_eDH)

    per_call = min(_timed(device, compute) for _ in range(3))
    calls = max(1, round(target_ms / per_call))

    def expert(_: int) -> Tensor:
        out = compute()
        for _ in range(calls - 1):
            out = compute()
        return out

    probe = 1_000_000
    cycles_per_ms = probe / min(_timed(device, lambda: torch.cuda._sleep(probe)) for _ in range(3))
    compute_ms = min(_timed(device, lambda: expert(0)) for _ in range(2))
    cycles = int(cycles_per_ms * compute_ms)
    comm_ms = min(_timed(device, lambda: torch.cuda._sleep(cycles)) for _ in range(2))
    runtime = Runtime.for_schedule(get_schedule("fsmoe"), device=device)
    tasks = [Task(kind="dispatch", chunk=0, channel="inter"), Task(kind="expert", chunk=0, channel="compute")]
    impls = {"dispatch": lambda _: torch.cuda._sleep(cycles), "expert": expert}
    runtime.run(tasks, impls)  # warm: creates the lane's stream
    both_ms = min(_timed(device, lambda: runtime.run(tasks, impls)) for _ in range(3))
    return Overlap(comm_ms, compute_ms, both_ms)


def train_tiny(device: torch.device, steps: int = 40, dtype: str = "fp32") -> list[float]:
    """Losses of a tiny GPT-MoE (2 MoE layers, fsmoe schedule at (2, 2) on the stream runtime) learning a
    repeated sentence on ``device``: the loss must fall."""
    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, moe_every=1,
                      moe=MoEConfig(num_experts=4, d_hidden=128, top_k=2))
    model = build_lm(cfg).to(device)
    apply_pipeline(model, "fsmoe", (2, 2), Runtime.for_schedule(get_schedule("fsmoe"), device=device))
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 40), dtype=torch.long, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, text.numel() - cfg.seq_len - 1, (8,), generator=torch.Generator().manual_seed(step))
        idx = torch.stack([text[s : s + cfg.seq_len + 1] for s in starts.tolist()])
        with autocast(dtype, device):
            out = model(idx[:, :-1], idx[:, 1:])
            loss = out.loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(out.loss))
    return losses
