"""Oracle: a 1-expert, top-1 MoE that drops nothing is exactly the dense FFN with the same weights.

Legend: T tokens, D model dim, H expert hidden.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsmoe.moe import MoEConfig, MoELayer

T, D, H = 12, 8, 16


def dense(kind: str, w: dict[str, torch.Tensor], x_TD: torch.Tensor) -> torch.Tensor:
    """The plain dense FFN on (T, D), built from torch.nn.functional on expert 0's weights."""
    if kind == "ffn":
        h = F.gelu(F.linear(x_TD, w["w1_eDH"][0].t(), w["b1_eH"][0]))
        return F.linear(h, w["w2_eHD"][0].t(), w["b2_eD"][0])
    h = F.silu(x_TD @ w["w1_eDH"][0]) * (x_TD @ w["w3_eDH"][0])
    return h @ w["w2_eHD"][0]


@pytest.mark.parametrize("gate", ["gshard", "switch"])
@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["f1", "nodrop"])
@pytest.mark.parametrize("order", ["einsum", "index"])
@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
def test_one_expert_moe_equals_dense_ffn(expert, order, capacity_factor, gate):
    cfg = MoEConfig(
        num_experts=1, top_k=1, d_hidden=H, gate=gate, order=order, expert=expert,
        capacity_factor=capacity_factor,
    )
    torch.manual_seed(0)
    layer = MoELayer.from_config(cfg, D)
    torch.nn.init.normal_(layer.gate.wg.weight, std=1.0)  # the gate must not matter with one expert
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T // 2, D, generator=g)
    probe = torch.randn(2, T // 2, D, generator=g)

    x_moe = x.clone().requires_grad_(True)
    y_moe = layer(x_moe)
    (y_moe * probe).sum().backward()
    assert int(layer.last_stats.num_dropped) == 0
    assert layer.last_routing.capacity == T

    w = {n: p.detach().clone().requires_grad_(True) for n, p in layer.experts.named_parameters()}
    x_dense = x.clone().requires_grad_(True)
    y_dense = dense(expert, w, x_dense.view(T, D)).view_as(x)
    (y_dense * probe).sum().backward()

    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_moe.grad, x_dense.grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.experts.named_parameters():
        torch.testing.assert_close(p.grad, w[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    # softmax over one expert is the constant 1: the gate gets no gradient from the output.
    gate_grad = layer.gate.wg.weight.grad
    assert gate_grad is None or torch.count_nonzero(gate_grad) == 0
