"""The router stays fp32 under ``--dtype bf16``: every gate's routing under CPU bf16 autocast, for a bf16
input and in a layer converted to bf16 equals the fp32 routing of the same values, and the aux loss is
fp32; the layer under autocast stays within bf16 tolerances of fp32; the index order's top-1 gather
path equals the scatter path bit for bit. Tiny sizes: bf16 on the CPU is slow."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from fsmoe.config import GATE_NAMES
from fsmoe.moe import MoEConfig, MoELayer
from fsmoe.moe.gates import Routing, build_gate
from fsmoe.moe.order import IndexOrder, scatter_rows
from fsmoe.train.precision import autocast, compute_dtype

T, D, H, E = 48, 16, 32, 8
BF16 = torch.bfloat16


def config(gate: str, **kw) -> MoEConfig:
    with warnings.catch_warnings():  # settings a gate ignores warn; irrelevant here
        warnings.simplefilter("ignore")
        return MoEConfig(num_experts=E, d_hidden=H, gate=gate, top_k=1 if gate == "switch" else 2, **kw)


def same_routing(a: Routing, b: Routing) -> None:
    assert torch.equal(a.token_EC, b.token_EC)
    assert torch.equal(a.weight_EC, b.weight_EC)
    assert torch.equal(a.logits_TE, b.logits_TE)
    assert torch.equal(a.aux_loss, b.aux_loss)
    assert a.capacity == b.capacity and int(a.num_dropped) == int(b.num_dropped)


def fp32_parts(r: Routing) -> None:
    assert r.logits_TE.dtype == r.weight_EC.dtype == r.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("gate_name", GATE_NAMES)
def test_routing_under_bf16_autocast_equals_fp32_routing(gate_name: str) -> None:
    torch.manual_seed(0)
    gate = build_gate(config(gate_name, noisy=False), D)
    x = torch.randn(T, D)
    want = gate(x)
    with torch.autocast("cpu", dtype=BF16):
        assert torch.nn.functional.linear(x, torch.randn(E, D)).dtype == BF16  # autocast is really on
        got = gate(x)
    fp32_parts(got)
    same_routing(got, want)


@pytest.mark.parametrize("gate_name", GATE_NAMES)
def test_a_bf16_input_and_a_bf16_layer_route_in_fp32(gate_name: str) -> None:
    torch.manual_seed(1)
    gate = build_gate(config(gate_name, noisy=False), D)
    x_bf16 = torch.randn(T, D).to(BF16)
    got = gate(x_bf16)  # a bf16 input: promoted, the values are the bf16 ones
    fp32_parts(got)
    same_routing(got, gate(x_bf16.float()))
    gate_bf16 = build_gate(config(gate_name, noisy=False), D)
    gate_bf16.load_state_dict(gate.state_dict())
    gate_bf16.to(BF16)  # a layer converted to bf16: its weights are promoted for routing
    got = gate_bf16(x_bf16)
    fp32_parts(got)
    gate.load_state_dict({k: v.to(BF16).float() for k, v in gate_bf16.state_dict().items()})
    same_routing(got, gate(x_bf16.float()))


def test_float64_routing_stays_float64() -> None:
    gate = build_gate(config("gshard"), D).double()
    r = gate(torch.randn(T, D, dtype=torch.float64))
    assert r.logits_TE.dtype == r.weight_EC.dtype == torch.float64
    # computed in float64, not through fp32: equal to a float64 softmax to float64 precision
    torch.testing.assert_close(gate.scores(r.logits_TE), torch.softmax(r.logits_TE, -1), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("order", ["index", "einsum"])
def test_the_layer_under_bf16_autocast_keeps_fp32_routing_and_is_close_to_fp32(order: str) -> None:
    torch.manual_seed(2)
    moe = MoELayer.from_config(config("gshard", order=order), D)
    x = torch.randn(T, D, requires_grad=True)
    y32 = moe(x)
    routing32 = moe.last_routing
    with autocast("bf16", "cpu"):
        y16 = moe(x)
    assert y16.dtype == BF16  # the experts computed in bf16 ...
    assert all(p.dtype == torch.float32 for p in moe.parameters())  # ... from fp32 master weights
    same_routing(moe.last_routing, routing32)
    assert moe.last_stats.aux_loss.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)  # bf16: 8 bits of mantissa
    (y16.float().sum() + moe.last_stats.aux_loss).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in moe.parameters())


def test_autocast_contexts() -> None:
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    assert compute_dtype("bf16") == BF16 and compute_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp16'; choose one of fp32, bf16"):
        autocast("fp16", "cpu")


@pytest.mark.parametrize("drop", [False, True])
def test_the_top1_gather_path_equals_the_scatter_path_bit_for_bit(drop: bool) -> None:
    torch.manual_seed(3)
    gate = build_gate(config("switch", capacity_factor=0.5 if drop else 2.0), D)
    x = torch.randn(T, D)
    routing = gate(x)
    assert routing.slots_per_token == 1 and (int(routing.num_dropped) > 0) == drop
    y = torch.randn(E, routing.capacity, D, requires_grad=True)
    w = routing.weight_EC.detach().clone().requires_grad_()
    got = IndexOrder().iorder(y, dataclasses.replace(routing, weight_EC=w))
    y_ref = y.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    want = scatter_rows(y_ref * w_ref.unsqueeze(-1), routing.token_EC, T)
    assert torch.equal(got, want)
    g = torch.randn(T, D)
    got.backward(g)
    want.backward(g)
    assert torch.equal(y.grad, y_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)  # a D-sum either way; order may differ
