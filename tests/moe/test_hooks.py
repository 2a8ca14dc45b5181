"""The six hook points: called once each, in pipeline order, and what they return is what continues.

Legend: T tokens, D model dim, E experts, C capacity slots.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fsmoe.moe import MoEConfig, MoEHook, MoELayer
from fsmoe.moe.hooks import BLOCK_POINTS, HOOK_POINTS, NO_HOOKS, HookChain, overrides

T, D, H, E = 12, 8, 16, 4


def build(hooks=(), **kw) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, capacity_factor=0.75, **kw)
    layer = MoELayer.from_config(cfg, D, hooks=hooks)
    torch.nn.init.normal_(layer.gate.wg.weight, std=0.7)
    return layer


def data(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


class Recorder(MoEHook):
    """Logs (tag, point, shape) at every hook point and passes the tensor through untouched (each point
    an instance attribute, which the layer calls like a method)."""

    def __init__(self, tag: str, log: list) -> None:
        self.tag, self.log = tag, log
        for point in HOOK_POINTS:
            setattr(self, point, partial(self._rec, point))

    def _rec(self, point: str, layer: MoELayer, t: torch.Tensor) -> torch.Tensor:
        assert isinstance(layer, MoELayer)
        self.log.append((self.tag, point, tuple(t.shape)))
        return t


class Scale(MoEHook):
    """Multiplies the tensor by ``factor`` at one named point (an instance attribute shadows that
    point's identity method)."""

    def __init__(self, point: str, factor: float) -> None:
        assert point in HOOK_POINTS
        setattr(self, point, lambda layer, t: t * factor)


def test_each_point_called_once_in_order_with_shapes():
    log: list = []
    layer = build([Recorder("a", log)])
    x = data()
    layer(x)
    assert [p for _, p, _ in log] == list(HOOK_POINTS)
    C = layer.last_routing.capacity  # ceil(2·0.75·12/4) = 5
    assert C == 5
    shapes = [s for _, _, s in log]
    assert shapes == [(T, D), (E, C, D), (E, C, D), (E, C, D), (E, C, D), (T, D)]


def test_two_hooks_run_in_registration_order_at_each_point():
    log: list = []
    layer = build([Recorder("a", log)])
    layer.add_hook(Recorder("b", log))
    layer(data().view(3, 4, D))  # the hooks see the flattened (T, D) tokens
    assert [(tag, p) for tag, p, _ in log] == [(tag, p) for p in HOOK_POINTS for tag in ("a", "b")]
    assert log[0][2] == (T, D)


def test_recording_hooks_leave_output_unchanged():
    x = data()
    want = build()(x)
    got = build([Recorder("a", []), Recorder("b", [])])(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scale_at,unscale_at",
    [("before_dispatch", "after_dispatch"), ("before_combine", "after_combine")],
)
def test_scale_and_unscale_around_the_wire_is_invisible(scale_at, unscale_at):
    """The compress/decompress pattern: what one hook does, its partner undoes → same output, grads."""
    x = data()
    base = build()
    xb = x.clone().requires_grad_(True)
    base(xb).square().sum().backward()

    hooked = build([Scale(scale_at, 4.0), Scale(unscale_at, 0.25)])
    xh = x.clone().requires_grad_(True)
    y = hooked(xh)
    y.square().sum().backward()
    torch.testing.assert_close(y, base(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xh.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(hooked.named_parameters(), base.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_scale_without_unscale_changes_the_output():
    x = data()
    want = build()(x)
    got = build([Scale("before_dispatch", 4.0)])(x)
    assert not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("point", ["after_combine", "before_moe_end"])
def test_linear_points_scale_the_output(point):
    """I-Order is linear in y_ECD, so scaling after combine (or at the end) scales the output."""
    x = data()
    want = 3.0 * build()(x)
    got = build([Scale(point, 3.0)])(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_before_moe_start_feeds_the_gate_and_experts():
    """Scaling the tokens at the start is the same as calling the layer on scaled tokens."""
    x = data()
    want = build()(2.0 * x)
    got = build([Scale("before_moe_start", 2.0)])(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, build()(x), atol=1e-3)


def test_after_dispatch_changes_reach_the_experts():
    """Zeroing the expert input makes each expert output its bias path only:
    ffn(0) = gelu(b1)·W2 + b2 — so y_t = Σ_kept w · ffn_e(0)."""
    class Zero(MoEHook):
        def after_dispatch(self, layer, x_ECD):
            return torch.zeros_like(x_ECD)

    layer = build([Zero()])
    y = layer(data())
    r = layer.last_routing
    ex = layer.experts
    with torch.no_grad():
        f0_ED = torch.stack(
            [torch.nn.functional.gelu(ex.b1_eH[e]) @ ex.w2_eHD[e] + ex.b2_eD[e] for e in range(E)]
        )
        want = torch.zeros(T, D)
        for e in range(E):
            for c in range(r.capacity):
                t = int(r.token_EC[e, c])
                if t < T:
                    want[t] += r.weight_EC[e, c] * f0_ED[e]
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_chain_runs_its_hooks_in_order_and_knows_which_act_inside_the_block():
    class Inner(MoEHook):
        def before_combine(self, layer, y_ECD):
            return y_ECD + 1

    layer = build()
    chain = HookChain(layer=layer, hooks=(Scale("before_combine", 2.0), Inner(), Recorder("r", [])))
    t = torch.ones(2)
    torch.testing.assert_close(chain("before_combine", t), torch.full((2,), 3.0))  # (1·2) + 1
    torch.testing.assert_close(chain("after_combine", t), t)
    assert [overrides(Inner(), p) for p in HOOK_POINTS] == [p == "before_combine" for p in HOOK_POINTS]
    assert not any(overrides(MoEHook(), p) for p in HOOK_POINTS)
    assert chain.overriding(BLOCK_POINTS) == list(chain.hooks)  # instance attributes count too
    assert HookChain(layer=layer, hooks=(Scale("before_dispatch", 2.0),)).overriding(BLOCK_POINTS) == []
    assert NO_HOOKS("before_moe_end", t) is t
