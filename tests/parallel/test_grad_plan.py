"""Pure tests of the gradient stream, plans and their validation (single process, no communication)."""

from __future__ import annotations

import pytest
import torch

from fsmoe.config import ModelConfig, MoEConfig
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.parallel.grad_plan import TAIL, GradientPlan, PlannedGradSync, greedy_plan, parse_plan
from fsmoe.parallel.parallelize import attach_gradient_plan, gpt_gradient_stream


def _model(tie: bool = True) -> GPTMoE:
    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=8, d_model=8, n_layers=4, n_heads=2, d_ff=16, tie_embeddings=tie,
                       moe=MoEConfig(num_experts=2, top_k=1, d_hidden=8))
    return GPTMoE(cfg)


def test_slots_run_from_the_last_block_and_readiness_follows_backward() -> None:
    layout = gpt_gradient_stream(_model(tie=False))
    assert layout.slots == ("moe:3", "dense:3", "dense:2", "moe:1", "dense:1", "dense:0", TAIL)
    ready = {n: layout.slots[r] for n, r in zip(layout.names, layout.ready, strict=True)}
    assert ready["head.weight"] == "moe:3" and ready["ln_f.weight"] == "moe:3"
    assert ready["blocks.3.mlp.gate.wg.weight"] == "dense:3"
    assert ready["blocks.3.attn.qkv.weight"] == "dense:2"  # block 3's attention ends before block 2 starts
    assert ready["blocks.1.attn.qkv.weight"] == "dense:0"
    assert ready["blocks.0.attn.qkv.weight"] == TAIL and ready["wte.weight"] == TAIL
    assert list(layout.ready) == sorted(layout.ready)  # the stream is in completion order


def test_tied_head_is_only_ready_at_the_tail() -> None:
    layout = gpt_gradient_stream(_model(tie=True))
    assert "head.weight" not in layout.names  # the same tensor as wte
    assert layout.slots[layout.ready[layout.names.index("wte.weight")]] == TAIL


def test_greedy_plans_launch_each_byte_once_at_its_first_allowed_slot() -> None:
    layout = gpt_gradient_stream(_model())
    ready = layout.ready_bytes()
    every = greedy_plan(layout, lambda s: True)
    assert [s for s, _ in every.ranges] == [s for s in layout.slots if s != TAIL and ready[s] > 0][: len(every.ranges)]
    assert sum(n for _, n in every.ranges) == ready["dense:0"]
    dense = greedy_plan(layout, lambda s: s.startswith("dense:"))
    assert all(s.startswith("dense:") for s, _ in dense.ranges)
    chunked = greedy_plan(layout, lambda s: True, chunk_bytes=256)
    assert max(n for _, n in chunked.ranges) <= 256
    assert sum(n for _, n in chunked.ranges) == sum(n for _, n in every.ranges)


def test_plan_that_launches_before_backward_is_refused_naming_parameter_and_slot() -> None:
    layout = gpt_gradient_stream(_model())
    too_much = layout.ready_bytes()["moe:3"] + 4
    with pytest.raises(ValueError, match=r"launches blocks\.3\.\S+ at slot 'moe:3', before backward produces it"):
        PlannedGradSync(layout, GradientPlan((("moe:3", too_much),)), None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("moe:7=1KB", "names slot 'moe:7'; this model has moe:3, dense:3"),
        ("dense:3=lots", "cannot read size 'LOTS'"),
        ("dense:0=1KB,dense:3=1KB", "comes after a later slot"),
        ("dense:0=1GB", "covers 1073741824 bytes, the stream has"),
    ],
)
def test_bad_plans_get_clear_errors(text: str, message: str) -> None:
    layout = gpt_gradient_stream(_model())
    with pytest.raises(ValueError, match=message):
        PlannedGradSync(layout, parse_plan(text, layout), None)


def test_moe_slot_needs_a_schedule_with_a_gradient_slot() -> None:
    model = _model()
    layout = gpt_gradient_stream(model)
    sync = PlannedGradSync(layout, parse_plan("moe:3=ready", layout), None)
    with pytest.raises(ValueError, match="MoE layer 3 runs no pipelined schedule"):
        attach_gradient_plan(model, sync)


def test_single_process_planned_sync_fires_in_backward_and_keeps_gradients() -> None:
    model = _model()
    layout = gpt_gradient_stream(model)
    sync = PlannedGradSync(layout, parse_plan("dense:3=ready,dense:1=ready", layout), None)
    attach_gradient_plan(model, sync)
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    assert [s for s, _ in sync.history] == ["dense:3", "dense:1"]  # fired by backward, in order
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    sync.finish()
    assert [s for s, _ in sync.history][-1] == TAIL
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[n], msg=n)  # world of one: the mean is the gradient


def test_after_plans_nothing_inside_the_backward() -> None:
    """``after`` (what the planner writes when overlapping does not pay) launches the whole stream at the
    tail; the planner's text for an empty plan reads back as it."""
    from fsmoe.perf.partition import plan_text

    model = _model()
    layout = gpt_gradient_stream(model)
    assert parse_plan("after", layout) == parse_plan(" AFTER ", layout) == GradientPlan()
    assert plan_text(GradientPlan()) == "after"
    assert parse_plan(plan_text(parse_plan("dense:3=ready", layout)), layout) == parse_plan("dense:3=ready", layout)
    sync = PlannedGradSync(layout, parse_plan("after", layout), None)
    attach_gradient_plan(model, sync)
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    assert sync.history == []  # nothing fired during backward
    sync.finish()
    assert sync.history == [(TAIL, layout.total_bytes)]
