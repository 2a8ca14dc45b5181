"""Single-process pipelined block: equals the unpipelined layer for every (r_fwd, r_bwd), and the
experts' manual backward equals autograd."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fsmoe.moe import MoEConfig, MoEHook, MoELayer
from fsmoe.moe.experts import build_experts
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.schedules import get_schedule


@pytest.mark.parametrize("kind", ["ffn", "swiglu"])
def test_manual_expert_backward_equals_autograd(kind: str) -> None:
    torch.manual_seed(0)
    experts = build_experts(kind, 3, 8, 12)
    x = torch.randn(3, 10, 8, requires_grad=True)
    dy = torch.randn(3, 10, 8)
    y, saved = experts.forward_saving(x.detach())
    torch.testing.assert_close(y, experts(x).detach())
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
    pip.pipeline = Pipeline(get_schedule(schedule), r_fwd=r_fwd, r_bwd=r_bwd)
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


def test_inner_hooks_are_refused_with_a_pipeline() -> None:
    class Inner(MoEHook):
        def after_dispatch(self, layer, x_ECD):  # noqa: ANN001, ANN202
            return x_ECD

    layer = MoELayer.from_config(MoEConfig(num_experts=2, top_k=1, d_hidden=8), 4, hooks=[Inner()])
    layer.pipeline = Pipeline(get_schedule("fsmoe"), 2, 2)
    with pytest.raises(ValueError, match="Inner"):
        layer(torch.randn(5, 4))
