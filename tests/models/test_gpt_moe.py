"""GPTMoE: shapes, layer placement, causality, the aux loss path, presets and config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fsmoe.config import GATE_NAMES, ModelConfig, MoEConfig, gpt2_moe_small, gpt2_moe_tiny, model_preset
from fsmoe.models import GPTMoE, ModelOutput
from fsmoe.moe.layer import MoELayer


def small_cfg(**overrides: object) -> ModelConfig:
    base = ModelConfig(
        seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32),
    )
    return dataclasses.replace(base, **overrides)


def model_for(cfg: ModelConfig, seed: int = 0) -> GPTMoE:
    torch.manual_seed(seed)
    return GPTMoE(cfg)


def test_output_shapes_and_types() -> None:
    model = model_for(small_cfg())
    idx_BL = torch.randint(0, 256, (3, 16))
    out = model(idx_BL, idx_BL)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 16, 256)
    assert out.loss is not None and out.loss.shape == ()
    assert out.aux_loss.shape == () and out.aux_loss.requires_grad
    assert len(out.moe_stats) == 1
    assert out.moe_stats[0].num_assignments == 3 * 16 * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = None  # type: ignore[misc]


def test_no_targets_no_loss_and_shorter_sequences() -> None:
    model = model_for(small_cfg())
    out = model(torch.randint(0, 256, (2, 5)))
    assert out.loss is None
    assert out.logits.shape == (2, 5, 256)


def test_sequence_longer_than_seq_len_is_rejected() -> None:
    model = model_for(small_cfg())
    with pytest.raises(ValueError, match="exceeds the model's seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_initial_loss_is_near_uniform() -> None:
    model = model_for(small_cfg())
    idx_BL = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    tgt_BL = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    out = model(idx_BL, tgt_BL)
    assert out.loss is not None
    assert abs(out.loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize(
    ("n_layers", "moe_every", "expected"),
    [(4, 2, [False, True, False, True]), (3, 1, [True, True, True]), (4, 3, [False, False, True, False]),
     (2, 3, [False, False])],
)
def test_moe_layer_placement(n_layers: int, moe_every: int, expected: list[bool]) -> None:
    cfg = small_cfg(n_layers=n_layers, moe_every=moe_every)
    model = model_for(cfg)
    assert [b.is_moe for b in model.blocks] == expected
    assert [cfg.is_moe_layer(i) for i in range(n_layers)] == expected
    assert cfg.num_moe_layers == sum(expected) == len(model.moe_layers)


def test_dense_model_has_zero_aux_and_no_stats() -> None:
    model = model_for(small_cfg(moe_every=5))
    out = model(torch.randint(0, 256, (2, 8)))
    assert out.moe_stats == []
    assert out.aux_loss.item() == 0.0


def test_causal_masking() -> None:
    # No capacity limit: with a finite capacity a later token can take an earlier token's expert slot,
    # which (legitimately) couples positions through routing.
    cfg = small_cfg(n_layers=3, moe_every=1, moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32,
                                                            capacity_factor=None))
    model = model_for(cfg).eval()
    idx_BL = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed_BL = idx_BL.clone()
    changed_BL[:, 10] = (changed_BL[:, 10] + 1) % 256
    with torch.no_grad():
        a_BLV = model(idx_BL).logits
        b_BLV = model(changed_BL).logits
    torch.testing.assert_close(a_BLV[:, :10], b_BLV[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a_BLV[:, 10:], b_BLV[:, 10:])


def test_aux_loss_alone_reaches_the_gate() -> None:
    model = model_for(small_cfg())
    out = model(torch.randint(0, 256, (2, 16)))
    out.aux_loss.backward()
    (layer,) = model.moe_layers
    assert isinstance(layer, MoELayer)
    gate_grads = [p.grad for p in layer.gate.parameters()]
    assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    # The balance loss depends on router probabilities only, so the experts get no gradient from it.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.experts.parameters())


def test_lm_loss_trains_every_parameter() -> None:
    model = model_for(small_cfg())
    idx_BL = torch.randint(0, 256, (2, 16))
    out = model(idx_BL, idx_BL)
    assert out.loss is not None
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_tied_and_untied_embeddings() -> None:
    tied = model_for(small_cfg())
    assert tied.head.weight is tied.wte.weight
    untied = model_for(small_cfg(tie_embeddings=False))
    assert untied.head.weight is not untied.wte.weight
    assert untied.num_params() == tied.num_params() + 256 * 32


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_every_gate_runs_in_the_model(gate: str) -> None:
    moe = MoEConfig(num_experts=4, top_k=1 if gate == "switch" else 2, d_hidden=32, gate=gate)
    model = model_for(small_cfg(moe=moe))
    idx_BL = torch.randint(0, 256, (2, 16))
    out = model(idx_BL, idx_BL)
    assert out.loss is not None and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()


def test_presets() -> None:
    tiny, small = gpt2_moe_tiny(), gpt2_moe_small()
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.seq_len) == (128, 4, 4, 128)
    assert (tiny.moe.num_experts, tiny.moe.top_k) == (4, 2)
    assert (small.d_model, small.n_layers, small.n_heads) == (768, 12, 12)
    assert tiny.num_moe_layers == 2 and small.num_moe_layers == 6
    assert model_preset("tiny") == tiny
    with pytest.raises(ValueError, match="choose one of tiny, small"):
        model_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"d_model": 30, "n_heads": 4}, "divisible by n_heads"), ({"moe_every": 0}, "moe_every must be an int >= 1"),
     ({"dropout": 1.0}, "dropout"), ({"n_layers": 0}, "n_layers must be an int >= 1")],
)
def test_config_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_cfg(**overrides)
