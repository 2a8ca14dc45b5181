"""Bad configuration or input gets a ValueError that names the offending values (or lists choices)."""

from __future__ import annotations

import re

import pytest
import torch

from fsmoe.moe import MoEConfig, MoELayer, build_experts, build_order
from fsmoe.moe.gates import assign_slots

D = 8


def layer(**kw) -> MoELayer:
    return MoELayer.from_config(MoEConfig(num_experts=4, d_hidden=16, **kw), D)


# --------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("gate", ["gshard", "sigmoid", "xmoe"])
def test_k_greater_than_e(gate):
    with pytest.raises(ValueError, match=r"k=5.*E=4"):
        MoEConfig(num_experts=4, top_k=5, gate=gate)


@pytest.mark.parametrize("gate", ["gshard", "switch", "sigmoid", "xmoe", "expert_choice"])
@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one(gate, k):
    # expert_choice reads k as well: C = ceil(k·f·T/E), so k < 1 is as meaningless there.
    with pytest.raises(ValueError, match=rf"k={k} "):
        MoEConfig(num_experts=4, top_k=k, gate=gate)


def test_k_equal_e_is_fine():
    MoEConfig(num_experts=4, top_k=4)


@pytest.mark.parametrize("f", [0.0, -0.5, float("-inf"), float("nan")])
def test_capacity_factor_not_positive(f):
    with pytest.raises(ValueError, match=rf"capacity_factor.*{re.escape(str(f))}"):
        MoEConfig(capacity_factor=f)


def test_switch_with_k2():
    with pytest.raises(ValueError, match=r"switch.*top_k=2"):
        MoEConfig(gate="switch", top_k=2)


def test_expert_choice_needs_capacity_factor():
    with pytest.raises(ValueError, match="expert_choice.*capacity_factor"):
        MoEConfig(gate="expert_choice", capacity_factor=None)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(num_experts=0), r"num_experts.*0"),
        (dict(d_hidden=0), r"d_hidden.*0"),
        (dict(capacity_multiple=0), r"capacity_multiple.*0"),
        (dict(min_capacity=-1), r"min_capacity.*-1"),
        (dict(xmoe_dim=0), r"xmoe_dim.*0"),
        (dict(softmoe_slots=0), r"softmoe_slots.*0"),
    ],
)
def test_other_sizes(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**kw)


@pytest.mark.parametrize(
    "field,choices",
    [
        ("gate", "gshard, switch, sigmoid, xmoe, expert_choice, softmoe"),
        ("order", "einsum, index"),
        ("expert", "ffn, swiglu"),
        ("drop_policy", "position, probability"),
    ],
)
def test_unknown_names_list_the_choices(field, choices):
    with pytest.raises(ValueError, match=rf"unknown .*'bogus'.*{re.escape(choices)}"):
        MoEConfig(**{field: "bogus"})


def test_registries_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown order 'bogus'.*einsum, index"):
        build_order("bogus")
    with pytest.raises(ValueError, match=r"unknown expert 'bogus'.*ffn, swiglu"):
        build_experts("bogus", 2, D, 16)
    expert_TK = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"unknown drop policy 'bogus'.*position, probability"):
        assign_slots(expert_TK, torch.ones(3, 1), 2, 2, "bogus", False)


def test_d_model_not_positive():
    with pytest.raises(ValueError, match=r"d_model.*0"):
        MoELayer.from_config(MoEConfig(), 0)


# --------------------------------------------------------------------------------------------------
# Input


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9), (8, 3)])
def test_wrong_trailing_dim(shape):
    with pytest.raises(ValueError, match=rf"D=8.*{re.escape(str(shape))}"):
        layer()(torch.randn(*shape))


def test_scalar_input():
    with pytest.raises(ValueError, match=r"D=8.*\(\)"):
        layer()(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(dtype):
    with pytest.raises(ValueError, match=rf"floating point.*{re.escape(str(dtype))}"):
        layer()(torch.ones(3, D, dtype=dtype))


@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
def test_empty_batch(shape):
    with pytest.raises(ValueError, match=rf"empty.*{re.escape(str(shape))}"):
        layer()(torch.zeros(*shape))
