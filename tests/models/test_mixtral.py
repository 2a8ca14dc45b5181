"""Mixtral: shapes, causality, the parameter count, RoPE/GQA attention against a naive loop, and that it
trains (single process, through the trainer's step)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fsmoe.config import GATE_NAMES, JobConfig, ModelConfig, MoEConfig, TrainConfig, gpt2_moe_tiny, mixtral_tiny
from fsmoe.models import Mixtral, ModelOutput, build_lm
from fsmoe.models.mixtral import GroupedQueryAttention, SwiGLU
from fsmoe.moe.layer import MoELayer
from fsmoe.nn.attention import apply_rope, rope_tables
from fsmoe.train.trainer import build_grad_sync, build_optimizer, train_step


def small_cfg(**overrides: object) -> ModelConfig:
    base = ModelConfig(
        name="mixtral-tiny", arch="mixtral", seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
        moe_every=1, tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32, expert="swiglu", capacity_factor=2.0),
    )
    return dataclasses.replace(base, **overrides)


def model_for(cfg: ModelConfig, seed: int = 0) -> Mixtral:
    torch.manual_seed(seed)
    return Mixtral(cfg)


def test_output_shapes_and_block_contract() -> None:
    model = model_for(small_cfg(moe_every=2))
    idx_BL = torch.randint(0, 256, (3, 16))
    out = model(idx_BL, idx_BL)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 16, 256)
    assert out.loss is not None and out.loss.shape == ()
    assert out.aux_loss.shape == () and out.aux_loss.requires_grad
    assert len(out.moe_stats) == 1 and out.moe_stats[0].num_assignments == 3 * 16 * 2
    assert [b.is_moe for b in model.blocks] == [False, True]
    assert isinstance(model.blocks[0].mlp, SwiGLU) and isinstance(model.blocks[1].mlp, MoELayer)
    assert all(isinstance(b.attn, GroupedQueryAttention) and b.grad_slot is None for b in model.blocks)
    assert model.moe_layers == [model.blocks[1].mlp]
    assert model.seq_shard == (0, 1)
    assert model(idx_BL[:, :5]).loss is None


def test_no_biases_no_position_embedding() -> None:
    model = model_for(small_cfg(moe_every=2))
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n or "b1_" in n or "b2_" in n]
    assert "wpe.weight" not in names
    assert model.head.weight is not model.wte.weight


def test_build_lm_picks_the_arch_and_mixtral_rejects_a_gpt_config() -> None:
    torch.manual_seed(0)
    assert isinstance(build_lm(small_cfg()), Mixtral)
    with pytest.raises(ValueError, match="arch='mixtral', got arch='gpt'"):
        Mixtral(gpt2_moe_tiny())
    with pytest.raises(ValueError, match="exceeds the model's seq_len=16"):
        model_for(small_cfg())(torch.zeros(1, 17, dtype=torch.long))


def test_causal_masking() -> None:
    model = model_for(small_cfg()).eval()
    idx_BL = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    changed = idx_BL.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx_BL).logits, model(changed).logits
    # capacity 2.0·K covers every token here, so routing is per token and nothing leaks through drops
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True},
    {"n_kv_heads": None},
    {"n_kv_heads": 1, "n_layers": 3},
    {"moe_every": 2},
])
def test_estimated_params_equal_num_params(overrides: dict[str, object]) -> None:
    cfg = small_cfg(**overrides)
    assert cfg.estimated_params() == model_for(cfg).num_params()


@pytest.mark.parametrize("arch", ["gpt", "mixtral"])
@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
@pytest.mark.parametrize("moe_every", [1, 2])
@pytest.mark.parametrize("gate", GATE_NAMES)
def test_estimated_params_every_arch_expert_and_gate(arch: str, expert: str, moe_every: int, gate: str) -> None:
    base = gpt2_moe_tiny() if arch == "gpt" else mixtral_tiny()
    moe = dataclasses.replace(base.moe, expert=expert, gate=gate, softmoe_slots=2 if gate == "softmoe" else 1,
                              **({"top_k": 1} if gate == "switch" else {}))
    cfg = dataclasses.replace(base, n_layers=2, moe_every=moe_every, moe=moe)
    torch.manual_seed(0)
    assert cfg.estimated_params() == build_lm(cfg).num_params()


def test_mixtral_tiny_parameter_count() -> None:
    cfg = mixtral_tiny()
    D, V, L, H, E, G, Dh = 128, 256, 4, 192, 4, 2, 32
    per_block = D * D + 2 * D * G * Dh + D * D + 2 * D + E * 3 * D * H + D * E
    assert model_for(cfg).num_params() == cfg.estimated_params() == V * D + L * per_block + D + V * D


def naive_attention(attn: GroupedQueryAttention, x_BLD: torch.Tensor) -> torch.Tensor:
    """Grouped-query causal attention with RoPE, one query head and one position at a time in float64; the
    rotation as complex multiplication of (x[p] + i·x[p + P]) by exp(i·t·θ^(-2p/Dh))."""
    B, L, D = x_BLD.shape
    N, G, Dh, theta = attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.rope_theta
    W = attn.qkv.weight.double()
    Wq, Wk, Wv = W[: N * Dh], W[N * Dh : (N + G) * Dh], W[(N + G) * Dh :]
    x = x_BLD.double()

    def rotate(vec: torch.Tensor, t: int) -> torch.Tensor:
        P = Dh // 2
        z = torch.complex(vec[:P], vec[P:]) * torch.exp(1j * t * theta ** (-2 * torch.arange(P).double() / Dh))
        return torch.cat([z.real, z.imag])

    out = torch.zeros(B, L, N * Dh, dtype=torch.float64)
    for b in range(B):
        for j in range(N):
            g = j // (N // G)
            q = [rotate(Wq[j * Dh : (j + 1) * Dh] @ x[b, t], t) for t in range(L)]
            k = [rotate(Wk[g * Dh : (g + 1) * Dh] @ x[b, t], t) for t in range(L)]
            v = [Wv[g * Dh : (g + 1) * Dh] @ x[b, t] for t in range(L)]
            for t in range(L):
                scores = torch.stack([q[t] @ k[s] / math.sqrt(Dh) for s in range(t + 1)])
                weights = torch.softmax(scores, dim=0)
                out[b, t, j * Dh : (j + 1) * Dh] = sum(w * v[s] for s, w in enumerate(weights))
    return out @ attn.proj.weight.double().T


@pytest.mark.parametrize("n_heads,n_kv_heads,theta", [(4, 2, 10000.0), (4, 4, 500.0), (6, 1, 1e6)])
def test_attention_matches_a_naive_loop(n_heads: int, n_kv_heads: int, theta: float) -> None:
    torch.manual_seed(0)
    attn = GroupedQueryAttention(24 if n_heads == 6 else 16, n_heads, n_kv_heads, theta, 0.0, 0.1)
    x_BLD = torch.randn(2, 7, attn.qkv.in_features)
    torch.testing.assert_close(attn(x_BLD).double(), naive_attention(attn, x_BLD), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rope_tables(20, 8, 100.0, torch.device("cpu"))
    rot_q, rot_k = apply_rope(q.expand(20, 8), cos, sin), apply_rope(k.expand(20, 8), cos, sin)
    for shift in (1, 5, 12):
        torch.testing.assert_close(rot_q[7] @ rot_k[3], rot_q[7 + shift] @ rot_k[3 + shift])
    assert abs(float(rot_q[7] @ rot_k[3] - rot_q[7] @ rot_k[5])) > 1e-3
    torch.testing.assert_close(rot_q.norm(dim=-1), q.norm().expand(20))  # a rotation


def test_loss_falls_with_the_trainer_step() -> None:
    cfg = small_cfg(seq_len=32)
    job = JobConfig(model=cfg, train=TrainConfig(batch_size=8, lr=1e-2, lr_warmup=0, steps=30))
    model = model_for(cfg)
    opt = build_optimizer(model, job.train)
    sync = build_grad_sync(model, job, None)
    gen = torch.Generator().manual_seed(0)
    # sequences with structure to learn: each is a run of consecutive byte values from a random start
    start_B1 = torch.randint(0, 200, (8, 1), generator=gen)
    seq_BL = start_B1 + torch.arange(33)
    batch = (seq_BL[:, :-1], seq_BL[:, 1:])
    losses = [float(train_step(model, opt, sync, batch, step, job.train, None).loss.detach()) for step in range(1, 31)]
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
