"""Oracle tests: the batched MoE layer against the naive per-token reference in ``reference.py``.

Legend: T tokens, D model dim, H expert hidden, E experts, K top-k, C capacity.

Outputs and gradients (input and every parameter) are compared at fp32 within 1e-5; the reference
runs in float64 and routes with plain loops. Drop cases assert that the reference really drops.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fsmoe.moe import MoEConfig, MoELayer
from tests.moe.reference import layer_params, reference_moe, slots_of

T, D, H, E = 16, 8, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def build(cfg: MoEConfig, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer.from_config(cfg, D)
    # The default gate init (std 0.02) gives near-uniform scores; spread them so routing is decisive
    # and float32 vs float64 scores cannot straddle a tie.
    gate = layer.gate
    with torch.no_grad():
        for name in ("wg", "phi", "proj"):
            if hasattr(gate, name):
                nn.init.normal_(getattr(gate, name).weight, std=0.7)
    return layer


def run_both(cfg: MoEConfig, seed: int = 0, *, aux: bool = False):
    """Forward + backward of layer and reference on the same data; returns both and their grads."""
    layer = build(cfg, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(T, D, generator=g)
    probe = torch.randn(T, D, generator=g)  # a random cotangent, so no gradient cancels by symmetry

    x_l = x.clone().requires_grad_(True)
    y_l = layer(x_l)
    loss_l = (y_l * probe).sum()
    if aux:
        loss_l = loss_l + layer.last_stats.aux_loss
    loss_l.backward()

    params = layer_params(layer)
    x_r = x.double().requires_grad_(True)
    ref = reference_moe(cfg, params, x_r)
    (ref.y_TD * probe.double()).sum().backward()
    return layer, x_l, y_l, params, x_r, ref


def assert_matches(layer, x_l, y_l, params, x_r, ref) -> None:
    torch.testing.assert_close(y_l, ref.y_TD.float(), **TOL)
    torch.testing.assert_close(x_l.grad, x_r.grad.float(), **TOL)
    names = [n for n, _ in layer.named_parameters()]
    assert set(names) == set(params)
    for name, p in layer.named_parameters():
        ref_grad = params[name].grad
        if ref_grad is None:  # the reference never touched it (e.g. an expert nobody reached)
            ref_grad = torch.zeros_like(params[name])
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, ref_grad.float(), **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def assert_same_routing(layer, ref) -> None:
    routing = layer.last_routing
    assert routing.capacity == ref.routing.capacity
    assert slots_of(routing.token_EC, T) == ref.routing.slots
    assert int(routing.num_dropped) == ref.routing.num_dropped


TOPK_GATES = [("gshard", 2), ("switch", 1), ("sigmoid", 2), ("xmoe", 2)]


@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize("capacity_factor", [0.5, None], ids=["drop", "nodrop"])
@pytest.mark.parametrize("gate,k", TOPK_GATES, ids=[g for g, _ in TOPK_GATES])
def test_topk_gates_match_reference(gate, k, capacity_factor, order, expert):
    cfg = MoEConfig(
        num_experts=E, top_k=k, d_hidden=H, gate=gate, order=order, expert=expert,
        capacity_factor=capacity_factor,
    )
    layer, x_l, y_l, params, x_r, ref = run_both(cfg)
    if capacity_factor is None:
        assert ref.routing.num_dropped == 0
        assert ref.routing.capacity == max(len(s) for s in ref.routing.slots)
    else:
        assert ref.routing.capacity == math.ceil(k * capacity_factor * T / E)
        assert ref.routing.num_dropped > 0, "the drop case must actually drop"
    assert_same_routing(layer, ref)
    assert_matches(layer, x_l, y_l, params, x_r, ref)


@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_gshard_drop_policies_match_reference(policy, renormalize, order):
    cfg = MoEConfig(
        num_experts=E, top_k=2, d_hidden=H, gate="gshard", order=order, expert="ffn",
        capacity_factor=0.75, drop_policy=policy, renormalize=renormalize,
    )
    layer, x_l, y_l, params, x_r, ref = run_both(cfg, seed=3)
    assert ref.routing.num_dropped > 0
    assert_same_routing(layer, ref)
    assert_matches(layer, x_l, y_l, params, x_r, ref)


def test_drop_policies_really_differ():
    """Guard on the test data above: the two policies keep different assignments there, so the
    policy tests would notice a layer that ignored ``drop_policy``."""
    outs = {}
    for policy in ("position", "probability"):
        cfg = MoEConfig(
            num_experts=E, top_k=2, d_hidden=H, capacity_factor=0.75, drop_policy=policy, expert="ffn"
        )
        *_, ref = run_both(cfg, seed=3)
        outs[policy] = [sorted(s) for s in ref.routing.slots]
    assert outs["position"] != outs["probability"]


@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_expert_choice_matches_reference(capacity_factor, order, expert):
    cfg = MoEConfig(
        num_experts=E, top_k=1, d_hidden=H, gate="expert_choice", order=order, expert=expert,
        capacity_factor=capacity_factor,
    )
    layer, x_l, y_l, params, x_r, ref = run_both(cfg, seed=1)
    if capacity_factor == 0.5:
        assert ref.routing.num_dropped > 0, "some token must be picked by no expert"
    assert_same_routing(layer, ref)
    assert_matches(layer, x_l, y_l, params, x_r, ref)


@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize("slots", [1, 2])
def test_softmoe_matches_reference(slots, order, expert):
    cfg = MoEConfig(
        num_experts=E, d_hidden=H, gate="softmoe", order=order, expert=expert, softmoe_slots=slots
    )
    layer, x_l, y_l, params, x_r, ref = run_both(cfg, seed=2)
    assert_matches(layer, x_l, y_l, params, x_r, ref)


def test_noisy_gate_in_eval_mode_is_the_plain_gate():
    """Noisy gating adds noise only in training: in eval the layer matches the noise-free reference."""
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, capacity_factor=0.5, noisy=True)
    layer = build(cfg)
    layer.eval()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(8))
    y = layer(x)
    ref = reference_moe(cfg, layer_params(layer), x.double())
    torch.testing.assert_close(y, ref.y_TD.float(), **TOL)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), y, atol=1e-4), "training mode must add noise"


def test_stats_dropped_fraction():
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, capacity_factor=0.5)
    layer, *_, ref = run_both(cfg, seed=6)
    stats = layer.last_stats
    assert stats.num_assignments == 2 * T
    assert stats.dropped_fraction == pytest.approx(ref.routing.num_dropped / (2 * T))
    assert stats.dropped_fraction >= 0.5  # C = ceil(2·0.5·16/4) = 4 slots × 4 experts for 32 assignments


def test_batched_input_shape_is_kept():
    """(B, S, D) input routes as one group of B·S tokens and comes back as (B, S, D)."""
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, capacity_factor=0.5)
    layer = build(cfg)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    y_flat = layer(x)
    y_3d = layer(x.view(2, T // 2, D))
    assert y_3d.shape == (2, T // 2, D)
    torch.testing.assert_close(y_3d.reshape(T, D), y_flat, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Aux loss against the hand formula


def hand_aux(cfg: MoEConfig, logits_T: list[torch.Tensor]) -> torch.Tensor:
    """aux_coef · E · Σ_e mean_t(softmax p_te) · frac_e(first choice) + z_coef · mean_t(lse_t²)."""
    n = len(logits_T)
    E_ = logits_T[0].shape[0]
    probs = [torch.softmax(lg, dim=0) for lg in logits_T]
    total = logits_T[0].new_zeros(())
    if cfg.gate not in ("expert_choice", "softmoe"):
        first = []
        for p in probs:  # first choice, ties to the lower index
            best = 0
            for e in range(1, E_):
                if float(p[e].detach()) > float(p[best].detach()):
                    best = e
            first.append(best)
        balance = logits_T[0].new_zeros(())
        for e in range(E_):
            mean_p = sum(p[e] for p in probs) / n
            frac = sum(1 for f in first if f == e) / n
            balance = balance + mean_p * frac
        total = total + cfg.aux_loss_coef * E_ * balance
    lse_sq = sum(torch.log(torch.exp(lg).sum()) ** 2 for lg in logits_T) / n
    return total + cfg.z_loss_coef * lse_sq


@pytest.mark.parametrize(
    "gate,k", [("gshard", 2), ("switch", 1), ("xmoe", 2), ("expert_choice", 1), ("softmoe", 2)]
)
@pytest.mark.parametrize("coefs", [(0.01, 0.0), (0.3, 0.0), (0.0, 0.05), (0.2, 0.01)])
def test_aux_loss_matches_hand_formula(gate, k, coefs):
    aux_coef, z_coef = coefs
    cfg = MoEConfig(
        num_experts=E, top_k=k, d_hidden=H, gate=gate, capacity_factor=1.0, aux_loss_coef=aux_coef,
        z_loss_coef=z_coef,
    )
    layer = build(cfg, seed=4)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    layer(x)
    got = layer.last_stats.aux_loss
    params = layer_params(layer)
    ref = reference_moe(cfg, params, x.double())
    want = hand_aux(cfg, ref.logits_T)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-7)
    if gate in ("expert_choice", "softmoe") and z_coef == 0:
        assert float(got.detach()) == 0.0  # these gates have no balance loss
        return
    assert float(want.detach()) > 0

    # The aux loss is differentiable w.r.t. the gate parameters, with the hand formula's gradient.
    layer.zero_grad()
    layer(x)
    layer.last_stats.aux_loss.backward()
    want.backward()
    for name, p in layer.gate.named_parameters():
        ref_grad = params["gate." + name].grad
        if ref_grad is None:
            ref_grad = torch.zeros_like(params["gate." + name])
        got_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got_grad, ref_grad.float(), rtol=1e-5, atol=1e-6)


def test_balance_loss_is_one_when_perfectly_balanced():
    """Zero logits (uniform p) with a balanced first choice: E · Σ_e (1/E)(1/E) = 1 exactly."""
    cfg = MoEConfig(num_experts=E, top_k=1, d_hidden=H, aux_loss_coef=1.0, capacity_factor=None)
    layer = build(cfg)
    # Each token's first choice cycles over the experts; the margin is tiny so p stays ~uniform.
    logits = torch.zeros(T, E)
    logits[torch.arange(T), torch.arange(T) % E] = 1e-4
    routing = layer.gate.route(logits)
    torch.testing.assert_close(routing.aux_loss, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    # All tokens to expert 0 and p ≈ one-hot on 0: the loss approaches its maximum E.
    logits = torch.zeros(T, E)
    logits[:, 0] = 30.0
    routing = layer.gate.route(logits)
    torch.testing.assert_close(routing.aux_loss, torch.tensor(float(E)), rtol=1e-4, atol=1e-4)
