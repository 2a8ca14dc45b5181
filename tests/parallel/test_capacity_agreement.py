"""Capacity agreement of the distributed dispatchers (4 gloo ranks: EP=2 × ESP=2, so both groups take
part): by default every forward exchanges C; with ``equal_tokens=True`` and a static gate only the first
forward after each change of (T, C) does, and a broken promise raises the same ``ValueError`` on every rank.

Collectives are counted by wrapping ``torch.distributed.all_reduce`` (what the agreement uses) for the
length of one block of forwards; nothing else in these forwards all-reduces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from fsmoe.config import ModelConfig, MoEConfig
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.moe.layer import MoELayer
from fsmoe.parallel.dims import ParallelDims, ProcessGroups, build_groups
from fsmoe.parallel.dispatch import build_dispatcher
from fsmoe.parallel.parallelize import parallelize_gpt
from tests.dist_utils import run_cases

WORLD, PPN, EP, ESP = 4, 2, 2, 2
D, H, E = 8, 16, 4

_groups: list[ProcessGroups] = []


def groups() -> ProcessGroups:
    """This rank's groups, built once per spawn (``new_group`` is collective: every case in the same order)."""
    if not _groups:
        _groups.append(build_groups(ParallelDims(world_size=WORLD, procs_per_node=PPN, dp=WORLD, ep=EP, esp=ESP)))
    return _groups[0]


def _layer(equal_tokens: bool, capacity_factor: float | None = 1.25, gate: str = "gshard") -> MoELayer:
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, gate=gate, capacity_factor=capacity_factor)
    torch.manual_seed(7)  # the same gate and local expert weights for both variants
    return MoELayer.from_config(cfg, D, dispatcher=build_dispatcher("a2a", groups(), equal_tokens=equal_tokens))


@contextlib.contextmanager
def counted_all_reduces() -> Iterator[list[int]]:
    """Count ``dist.all_reduce`` calls inside the block (the count is ``box[0]``)."""
    box, real = [0], dist.all_reduce

    def counting(*args, **kwargs):
        box[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield box
    finally:
        dist.all_reduce = real


def _step(layer: MoELayer, rank: int, T: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(T, D, generator=gen).requires_grad_()
    y = layer(x)
    ((y * torch.randn(T, D, generator=gen)).sum() + layer.last_stats.aux_loss).backward()
    grads = tuple(p.grad.clone() for p in layer.parameters())
    layer.zero_grad(set_to_none=True)
    return (y.detach(), x.grad, *grads)


def _counts_per_forward(layer: MoELayer, rank: int, Ts: list[int]) -> tuple[list[int], list[tuple[torch.Tensor, ...]]]:
    counts, outs = [], []
    for i, T in enumerate(Ts):
        with counted_all_reduces() as n:
            outs.append(_step(layer, rank, T, seed=i))
        counts.append(n[0])
    return counts, outs


def case_static_capacity_agrees_when_the_shape_changes(rank: int, world: int) -> None:
    Ts = [12, 12, 12, 8, 8, 12, 12]
    counts, outs = _counts_per_forward(_layer(equal_tokens=True), rank, Ts)
    # One exchange over EP and one over ESP whenever T changes (12, 8, 12 again: only the last verified
    # shape is remembered); none while it stays.
    assert counts == [2, 0, 0, 2, 0, 2, 0], counts
    ref_counts, ref_outs = _counts_per_forward(_layer(equal_tokens=False), rank, Ts)
    assert ref_counts == [2] * len(Ts), ref_counts  # the default agrees in every forward
    for got, ref in zip(outs, ref_outs, strict=True):  # same numbers, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def case_verified_shape_needs_no_collective(rank: int, world: int) -> None:
    disp = build_dispatcher("a2a", groups(), equal_tokens=True)
    assert disp.agree_capacity(10, num_tokens=16, static=True) == 10  # verifies (16, 10)
    real = dist.all_reduce
    dist.all_reduce = None  # any collective now fails
    try:
        assert disp.agree_capacity(10, num_tokens=16, static=True) == 10
    finally:
        dist.all_reduce = real


def case_data_dependent_capacity_always_agrees(rank: int, world: int) -> None:
    # capacity_factor=None: C is the busiest expert's load, different per rank; the promise does not help.
    Ts = [12, 12, 12]
    counts, outs = _counts_per_forward(_layer(equal_tokens=True, capacity_factor=None), rank, Ts)
    assert counts == [2, 2, 2], counts
    _, ref_outs = _counts_per_forward(_layer(equal_tokens=False, capacity_factor=None), rank, Ts)
    for got, ref in zip(outs, ref_outs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def case_unequal_tokens_raise_on_every_rank(rank: int, world: int) -> str:
    layer = _layer(equal_tokens=True)
    _step(layer, rank, 12, seed=0)  # (12, C) verified on every rank
    # Every rank moves to a new T, but not the same one: the check at the new shape sees it everywhere.
    with pytest.raises(ValueError, match=r"equal_tokens.*T = 8\.\.10") as info:
        _step(layer, rank, 8 if rank % 2 == 0 else 10, seed=1)
    # The ranks are still in step (every one raised after the same exchange): the default still works,
    # and pads the unequal groups to the largest C.
    _step(_layer(equal_tokens=False), rank, 8 if rank % 2 == 0 else 10, seed=1)
    return str(info.value)


def case_parallelize_gpt_promises_equal_tokens(rank: int, world: int) -> None:
    cfg = ModelConfig(seq_len=8, d_model=D, n_layers=2, n_heads=2, d_ff=16,
                      moe=MoEConfig(num_experts=E, top_k=2, d_hidden=H))
    for flag in (True, False):
        torch.manual_seed(0)
        model = parallelize_gpt(GPTMoE(cfg), groups(), "a2a", equal_tokens=flag)
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        assert layers and all(m.dispatcher.equal_tokens is flag for m in layers)
    torch.manual_seed(0)
    model = parallelize_gpt(GPTMoE(cfg), groups())  # the trainer's call: the promise is on
    assert all(m.dispatcher.equal_tokens for m in model.modules() if isinstance(m, MoELayer))


CASES = [
    case_static_capacity_agrees_when_the_shape_changes,
    case_verified_shape_needs_no_collective,
    case_data_dependent_capacity_always_agrees,
    case_unequal_tokens_raise_on_every_rank,
    case_parallelize_gpt_promises_equal_tokens,
]


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(CASES, WORLD, timeout=180)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_case(outcomes, case: str) -> None:
    outcomes[case].result()


def test_mismatch_message_names_the_numbers(outcomes) -> None:
    messages = outcomes["case_unequal_tokens_raise_on_every_rank"].result()
    assert len(messages) == WORLD  # every rank raised, each naming the block's range and its own T
    for rank, m in enumerate(messages):
        assert "T = 8..10" in m and f"this rank: T={8 if rank % 2 == 0 else 10}," in m and "equal_tokens=False" in m
