"""The layer's bad inputs (issue 14): wrong types and values in a config built in Python, settings a gate
ignores, wrong input tensors, and non-finite tokens. Each item has a test that names the decision:
refused (a ValueError naming the value), warned (a UserWarning naming it) or documented."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from fsmoe.moe import EinsumOrder, MoEConfig, MoELayer, build_order

T, D, E, H = 12, 8, 4, 16


def layer(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer.from_config(MoEConfig(**{"num_experts": E, "d_hidden": H, **kw}), D)


def quiet_config(**kw) -> MoEConfig:
    """A config that must build without any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return MoEConfig(**kw)


# --------------------------------------------------------------------------------------------------
# Refused: wrong types in a config built in Python (flags and job files are coerced before this)


@pytest.mark.parametrize("f", [float("inf"), float("nan"), "1.0", True, [1.0]])
def test_capacity_factor_not_a_finite_number_is_refused(f):
    with pytest.raises(ValueError, match=rf"capacity_factor must be a finite number > 0.*got {re.escape(repr(f))}"):
        MoEConfig(capacity_factor=f)


def test_capacity_factor_int_and_none_are_fine():
    assert MoEConfig(capacity_factor=2).capacity_factor == 2
    assert MoEConfig(capacity_factor=None).capacity_factor is None


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(top_k=1.5), r"top_k must be an int, got 1\.5"),
        (dict(top_k=True), r"top_k must be an int, got True"),
        (dict(num_experts=4.0), r"num_experts must be an int >= 1, got 4\.0"),
        (dict(num_experts=True), r"num_experts must be an int >= 1, got True"),
        (dict(d_hidden=31.5), r"d_hidden must be an int >= 1, got 31\.5"),
        (dict(d_hidden="32"), r"d_hidden must be an int >= 1, got '32'"),
        (dict(min_capacity=1.0), r"min_capacity must be an int >= 0, got 1\.0"),
        (dict(capacity_multiple=2.0), r"capacity_multiple must be an int >= 1, got 2\.0"),
        (dict(xmoe_dim=None), r"xmoe_dim must be an int >= 1, got None"),
        (dict(softmoe_slots=1.0), r"softmoe_slots must be an int >= 1, got 1\.0"),
    ],
)
def test_non_integer_sizes_are_refused(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**kw)


@pytest.mark.parametrize("name", ["renormalize", "noisy"])
@pytest.mark.parametrize("value", ["kept", "false", 1, None])
def test_flags_must_be_bools(name, value):
    # renormalize='kept' used to be accepted and treated as True (a non-empty string is truthy).
    with pytest.raises(ValueError, match=rf"{name} must be True or False, got {re.escape(repr(value))}"):
        MoEConfig(**{name: value})


@pytest.mark.parametrize("name", ["aux_loss_coef", "z_loss_coef"])
@pytest.mark.parametrize("value", [-0.01, -1, float("inf"), float("nan"), "0.01", True])
def test_loss_coefficients_must_be_finite_and_not_negative(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {re.escape(repr(value))}"):
        MoEConfig(**{name: value})


def test_loss_coefficient_zero_is_fine():
    quiet_config(aux_loss_coef=0, z_loss_coef=0.0)


# --------------------------------------------------------------------------------------------------
# Refused: a value that is simply wrong


@pytest.mark.parametrize("k", [5, 9])
def test_expert_choice_with_k_above_e_is_refused(k):
    with pytest.raises(ValueError, match=rf"expert_choice needs 1 <= k <= E, got k={k} with E=4"):
        MoEConfig(gate="expert_choice", num_experts=4, top_k=k)


def test_expert_choice_with_k_equal_e_is_fine():
    quiet_config(gate="expert_choice", num_experts=4, top_k=4)


# --------------------------------------------------------------------------------------------------
# Warned: settings the chosen gate ignores (refusing would break job files that switch gates)


@pytest.mark.parametrize(
    "kw,named",
    [
        (dict(top_k=1), "top_k=1"),
        (dict(top_k=4), "top_k=4"),
        (dict(capacity_factor=2.0), "capacity_factor=2.0"),
        (dict(capacity_factor=None), "capacity_factor=None"),
        (dict(min_capacity=4), "min_capacity=4"),
        (dict(drop_policy="probability"), "drop_policy='probability'"),
        (dict(renormalize=True), "renormalize=True"),
    ],
)
def test_softmoe_warns_about_settings_it_ignores(kw, named):
    with pytest.warns(UserWarning, match=rf"the softmoe gate ignores {re.escape(named)}") as record:
        MoEConfig(gate="softmoe", **kw)
    assert record[0].filename == __file__  # stacklevel points at the caller's MoEConfig(...)


def test_softmoe_names_every_ignored_setting_at_once():
    with pytest.warns(UserWarning, match=r"ignores top_k=1, capacity_factor=2\.0$"):
        MoEConfig(gate="softmoe", top_k=1, capacity_factor=2.0)


def test_softmoe_with_defaults_does_not_warn():
    # top_k=2 and capacity_factor=1.25 are every gate's defaults, so they are not the user's choice.
    quiet_config(gate="softmoe", softmoe_slots=2)


@pytest.mark.parametrize(
    "kw,named",
    [(dict(drop_policy="probability"), "drop_policy='probability'"), (dict(renormalize=True), "renormalize=True")],
)
def test_expert_choice_warns_about_settings_it_ignores(kw, named):
    with pytest.warns(UserWarning, match=rf"the expert_choice gate ignores {re.escape(named)}"):
        MoEConfig(gate="expert_choice", top_k=1, **kw)


def test_expert_choice_with_defaults_does_not_warn():
    quiet_config(gate="expert_choice", top_k=1, capacity_factor=2.0)


@pytest.mark.parametrize("gate", ["gshard", "switch", "sigmoid", "xmoe"])
def test_renormalize_with_k1_warns(gate):
    with pytest.warns(UserWarning, match=rf"renormalize=True with top_k=1.*{gate} gate gets no gradient from the task"):
        MoEConfig(gate=gate, top_k=1, renormalize=True)


def test_renormalize_with_k2_does_not_warn():
    quiet_config(top_k=2, renormalize=True)


def test_renormalize_with_k1_really_starves_the_gate():
    """What the warning says: every kept weight is w / w = 1, so the task loss gives the gate no gradient
    (only rounding noise, next to a real gradient without renormalising)."""
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    grads = {}
    for renormalize in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moe = layer(top_k=1, renormalize=renormalize, aux_loss_coef=0.0, capacity_factor=None)
        y = moe(x)
        if renormalize:
            assert torch.equal(moe.last_routing.weight_EC[moe.last_routing.token_EC < T], torch.ones(T))
        y.square().sum().backward()
        grads[renormalize] = moe.gate.wg.weight.grad.abs().max().item()
    assert grads[True] < 1e-5 * grads[False]


# --------------------------------------------------------------------------------------------------
# The input tensor: refused (the layer does not cast), except under autocast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_other_than_the_layers_is_refused(dtype):
    with pytest.raises(ValueError, match=rf"input dtype {re.escape(str(dtype))} does not match.*torch\.float32"):
        layer()(torch.randn(3, D).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_input_dtype_matching_a_converted_layer_is_fine(dtype):
    moe = layer().to(dtype)
    y = moe(torch.randn(3, D, dtype=dtype))
    assert y.dtype == dtype


def test_input_dtype_under_autocast_is_fine():
    moe = layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.shape == (3, D)


@pytest.mark.parametrize("x", [[[0.0] * D] * 3, 1.0, (0.0,) * D], ids=["list", "float", "tuple"])
def test_input_that_is_not_a_tensor_is_refused(x):
    with pytest.raises(ValueError, match=rf"must be a torch\.Tensor.*got {type(x).__name__}$"):
        layer()(x)


# --------------------------------------------------------------------------------------------------
# Non-finite tokens: isolated in both orders where the math allows; what remains is documented


BAD = 5  # the index of the non-finite token


def x_with_bad_token(value: float, whole_row: bool) -> torch.Tensor:
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    if whole_row:
        x[BAD] = value
    else:
        x[BAD, 3] = value
    return x


def outputs_and_input_grads(moe: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y, and dL/dx for a loss over every row but the bad one."""
    x = x.clone().requires_grad_()
    y = moe(x)
    keep = torch.ones(T, dtype=torch.bool)
    keep[BAD] = False
    (y[keep] * torch.linspace(-1, 1, D)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize(
    "gate,k,f", [("gshard", 2, None), ("gshard", 2, 4.0), ("sigmoid", 1, None), ("expert_choice", 1, 4.0)]
)
@pytest.mark.parametrize("bad", [(float("nan"), True), (float("nan"), False), (float("inf"), False)],
                         ids=["nan-row", "one-nan", "one-inf"])
def test_a_non_finite_token_spoils_only_its_own_row(order, gate, k, f, bad):
    """With room for every token (no drops), the other tokens' outputs and input gradients equal those of
    the same batch with the bad token made finite: nothing leaks from it."""
    x_bad = x_with_bad_token(*bad)
    x_ok = x_bad.clone()
    x_ok[BAD] = 0.0
    moe = layer(gate=gate, top_k=k, capacity_factor=f, order=order)
    y_bad, g_bad = outputs_and_input_grads(moe, x_bad)
    y_ok, g_ok = outputs_and_input_grads(moe, x_ok)
    others = torch.arange(T) != BAD
    assert torch.isfinite(y_bad[others]).all() and torch.isfinite(g_bad[others]).all()
    assert not torch.isfinite(y_bad[BAD]).all()  # the bad token's own row stays non-finite
    torch.testing.assert_close(y_bad[others], y_ok[others], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_bad[others], g_ok[others], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate,k", [("gshard", 2), ("expert_choice", 1)])
@pytest.mark.parametrize("bad", [(float("nan"), True), (float("-inf"), False)], ids=["nan-row", "one-inf"])
def test_einsum_order_equals_index_order_with_a_non_finite_token(gate, k, bad):
    """Capacity tight enough to drop tokens: the einsum order gives the index order's outputs, including
    which rows are non-finite, and the same input gradients for the other tokens."""
    x = x_with_bad_token(*bad)
    moe = layer(gate=gate, top_k=k, capacity_factor=0.75)
    y_index, g_index = outputs_and_input_grads(moe, x)
    moe.order = build_order("einsum")
    y_einsum, g_einsum = outputs_and_input_grads(moe, x)
    torch.testing.assert_close(y_einsum, y_index, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(torch.isfinite(y_einsum), torch.isfinite(y_index))
    others = torch.arange(T) != BAD
    torch.testing.assert_close(g_einsum[others], g_index[others], rtol=1e-6, atol=1e-6)


def test_einsum_order_on_finite_input_is_the_plain_einsum_bit_for_bit():
    """The isolation only takes effect on non-finite rows: on finite input the outputs and the input
    gradients are the two plain einsums' own, bit for bit."""
    moe = layer(order="einsum", capacity_factor=0.75)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routing = moe.gate(x)
    order = EinsumOrder()
    mask_TEC = order._mask(routing, x.dtype)
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(4))

    def run(order_fn, iorder_fn):
        x_TD = x.clone().requires_grad_()
        y_TD = iorder_fn(order_fn(x_TD).tanh())
        (y_TD * g_TD).sum().backward()
        return y_TD.detach(), x_TD.grad

    isolated = run(lambda x_TD: order.order(x_TD, routing), lambda y_ECD: order.iorder(y_ECD, routing))
    plain = run(
        lambda x_TD: torch.einsum("tec,td->ecd", mask_TEC, x_TD),
        lambda y_ECD: torch.einsum("tec,ecd->td", mask_TEC, y_ECD * routing.weight_EC.unsqueeze(-1)),
    )
    assert torch.equal(isolated[0], plain[0]) and torch.equal(isolated[1], plain[1])


@pytest.mark.parametrize("gate,k", [("gshard", 2), ("switch", 1), ("xmoe", 2), ("expert_choice", 1), ("softmoe", 2)])
def test_aux_loss_with_zero_coefficients_is_zero_with_a_nan_token(gate, k):
    moe = layer(gate=gate, top_k=k, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = x_with_bad_token(float("nan"), whole_row=True).requires_grad_()
    y = moe(x)
    aux = moe.last_stats.aux_loss
    assert aux.detach().item() == 0.0 and aux.dtype == torch.float32
    # Callers backpropagate the aux loss whatever the coefficients, so the zero stays on the graph.
    torch.autograd.backward([y[:BAD], aux], [torch.ones(BAD, D), torch.ones(())])


@pytest.mark.parametrize("coefs", [(0.01, 0.0), (0.0, 0.01)], ids=["balance", "z-loss"])
def test_aux_loss_with_a_nonzero_coefficient_is_nan_with_a_nan_token(coefs):
    """Documented, not fixed: the aux losses average over every token, so a NaN token makes them NaN."""
    moe = layer(aux_loss_coef=coefs[0], z_loss_coef=coefs[1])
    moe(x_with_bad_token(float("nan"), whole_row=True))
    assert torch.isnan(moe.last_stats.aux_loss)


def test_a_nan_token_is_still_routed_to_the_lowest_index_experts():
    """Documented, not fixed: a NaN token's scores are NaN, so top-k takes experts 0..k-1 for it and it
    occupies their slots like any other token."""
    moe = layer(top_k=2, capacity_factor=None)
    moe(x_with_bad_token(float("nan"), whole_row=True))
    token_EC = moe.last_routing.token_EC
    assert sorted((token_EC == BAD).nonzero()[:, 0].tolist()) == [0, 1]


@pytest.mark.parametrize("order", ["einsum", "index"])
def test_softmoe_one_nan_token_spoils_every_row(order):
    """Documented, not fixable: every SoftMoE slot is a softmax-weighted mix of all tokens."""
    moe = layer(gate="softmoe", order=order)
    y = moe(x_with_bad_token(float("nan"), whole_row=True))
    assert torch.isnan(y).all(dim=-1).all()
