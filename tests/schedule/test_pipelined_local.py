"""Single-process pipelined block: equals the unpipelined layer for every (r_fwd, r_bwd), per-layer
degrees, swapping it on and off; the experts' saving forward is their forward bit for bit and their
manual backward equals autograd."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fsmoe.config import get_schedule
from fsmoe.moe import ExpertBlock, MoEConfig, MoEHook, MoELayer
from fsmoe.moe.experts import build_experts
from fsmoe.moe.hooks import BLOCK_POINTS, HOOK_POINTS
from fsmoe.parallel.parallelize import apply_pipeline, pipeline_of, remove_pipeline
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime


@pytest.mark.parametrize("kind", ["ffn", "swiglu"])
def test_manual_expert_backward_equals_autograd(kind: str) -> None:
    torch.manual_seed(0)
    experts = build_experts(kind, 3, 8, 12)
    x = torch.randn(3, 10, 8, requires_grad=True)
    dy = torch.randn(3, 10, 8)
    y, saved = experts.forward_saving(x.detach())
    assert torch.equal(y, experts(x).detach())  # one math, so bit for bit
    dx, grads = experts.backward_saved(dy, saved)
    ref = torch.autograd.grad(experts(x), [x, *experts.parameters()], dy)
    torch.testing.assert_close(dx, ref[0], atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref[1:], strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_generic_expert_backward_recomputes_exactly() -> None:
    torch.manual_seed(0)
    experts = build_experts("ffn", 2, 8, 12)
    x = torch.randn(2, 6, 8)
    dy = torch.randn(2, 6, 8)
    base = type(experts).__mro__[1]  # the generic recompute path of the base class
    dx, grads = base.backward_saved(experts, dy, (x,))
    dx_ref, grads_ref = experts.backward_saved(dy, experts.forward_saving(x)[1])
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


CASES = list(itertools.product(["fsmoe", "fsmoe_no_iio"], [1, 2, 4], [1, 2, 4], ["ffn", "swiglu"]))


@pytest.mark.parametrize(("schedule", "r_fwd", "r_bwd", "expert"), CASES)
def test_pipelined_equals_unpipelined(schedule: str, r_fwd: int, r_bwd: int, expert: str) -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, d_hidden=16, expert=expert, capacity_factor=1.0)
    torch.manual_seed(0)
    ref = MoELayer.from_config(cfg, 8)
    torch.manual_seed(0)
    pip = MoELayer.from_config(cfg, 8)
    (pipe,) = apply_pipeline(pip, schedule, (r_fwd, r_bwd))
    assert pipeline_of(pip) is pipe and pipe.capacity_multiple == math.lcm(r_fwd, r_bwd)
    x = torch.randn(2, 9, 8)
    g = torch.randn(2, 9, 8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = []
    for layer, xi in zip((ref, pip), xs, strict=True):
        y = layer(xi)
        ((y * g).sum() + layer.last_stats.aux_loss).backward()
        ys.append(y.detach())
    torch.testing.assert_close(ys[1], ys[0], atol=1e-5, rtol=1e-5)
    # The pipelined layer pads C to a multiple of lcm(r_fwd, r_bwd); the outputs must not change.
    assert pip.last_routing.capacity % math.lcm(r_fwd, r_bwd) == 0
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(pip.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("point", HOOK_POINTS)
def test_only_hooks_inside_the_block_are_refused_with_a_pipeline(point: str) -> None:
    probe = type("Probe", (MoEHook,), {point: lambda self, layer, t: t})()
    layer = MoELayer.from_config(MoEConfig(num_experts=2, top_k=1, d_hidden=8), 4, hooks=[probe])
    apply_pipeline(layer, "fsmoe", (2, 2))
    if point in BLOCK_POINTS:
        with pytest.raises(ValueError, match="Probe"):
            layer(torch.randn(5, 4))
        remove_pipeline(layer)
    layer(torch.randn(5, 4))  # outside the block, or with the default block: the hook runs


def _model(n_layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_hidden=16, capacity_factor=1.0)
    return torch.nn.Sequential(*(MoELayer.from_config(cfg, 8) for _ in range(n_layers)))


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    (y.square().sum() + sum(m.last_stats.aux_loss for m in model)).backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


def test_per_layer_degrees_share_one_runtime_and_equal_the_unpipelined_model() -> None:
    model = _model(3)
    x = torch.randn(10, 8)
    want = _run(model, x)
    runtime = Runtime.for_schedule(get_schedule("fsmoe"))
    pipes = apply_pipeline(model, "fsmoe", [(1, 2), (4, 2), (2, 2)], runtime)
    assert [(p.r_fwd, p.r_bwd) for p in pipes] == [(1, 2), (4, 2), (2, 2)]
    assert [pipeline_of(m) for m in model] == pipes and all(p.runtime is runtime for p in pipes)
    got = _run(model, x)
    assert [m.last_routing.capacity % p.capacity_multiple for m, p in zip(model, pipes, strict=True)] == [0] * 3
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    remove_pipeline(model)
    assert all(type(m.expert_block) is ExpertBlock for m in model) and pipeline_of(model[0]) is None
    back = _run(model, x)
    assert torch.equal(back[0], want[0]) and torch.equal(back[1], want[1])


@pytest.mark.parametrize(
    ("degrees", "message"),
    [([(2, 2)], r"one pair per MoE layer.*for 2 layers"), ((2, 3), "uses one degree for both passes"),
     ((0, 0), "r_fwd must be"), ([(2, 2), (2, 2, 2)], "one pair per MoE layer")],
)
def test_bad_degrees_are_refused_and_change_nothing(degrees: object, message: str) -> None:
    model = _model(2)
    with pytest.raises(ValueError, match=message):
        apply_pipeline(model, "tutel", degrees)  # type: ignore[arg-type]
    assert all(type(m.expert_block) is ExpertBlock for m in model)


def test_a_pipeline_is_an_expert_block_that_asks_for_its_capacity_multiple() -> None:
    pipe = Pipeline(spec=get_schedule("fsmoe"), r_fwd=4, r_bwd=6, runtime=Runtime.for_schedule(get_schedule("fsmoe")))
    assert isinstance(pipe, ExpertBlock) and pipe.capacity_multiple == 12 and ExpertBlock().capacity_multiple == 1
