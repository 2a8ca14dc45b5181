"""Memory of the pipelined block, counted deterministically: bytes of the tensor storages that ops create
and that are still alive, op by op (a dispatch mode with weak references; no RSS, no timing). Tasks run
inline in issue order, so the mode sees every allocation, communication tasks' included.

Legend: T tokens, D model dim, H expert hidden, E experts, C capacity slots, R pipeline degree.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fsmoe.config import get_schedule
from fsmoe.moe import MoEConfig, MoELayer
from fsmoe.moe.block import ExpertBlock
from fsmoe.moe.dispatch import Dispatcher
from fsmoe.moe.experts import build_experts
from fsmoe.parallel.parallelize import apply_pipeline, remove_pipeline
from fsmoe.schedule.ir import Task
from fsmoe.schedule.pipelined import Pipeline
from fsmoe.schedule.runtime import Runtime

T, D, H, E = 512, 32, 128, 2
DEGREES = [(1, 1), (2, 2), (4, 4), (2, 4), (4, 2), (1, 4), (4, 1)]


class InlineRuntime(Runtime):
    """Every task on the calling thread, in issue order (the dispatch mode is thread-local)."""

    def run(self, tasks: list[Task], impls: Mapping[str, Callable[[int], None]]) -> None:
        for task in tasks:
            impls[task.kind](task.chunk)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops while the mode is on and still alive (``now``), and the most
    at any op (``peak``). Storages of ``ignore`` (weights, inputs: there before) are not counted."""

    def __init__(self, ignore: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0
        self._refs: list[weakref.ref] = []

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if st.nbytes() == 0 or key in self.live or key in self.ignore:
                continue
            self.live[key] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            self._refs.append(weakref.ref(st, lambda _, k=key: self._freed(k)))
        return out


FSMOE = get_schedule("fsmoe")


def _pipe(r_fwd: int, r_bwd: int) -> Pipeline:
    """The pipelined block, a no-op GAR slice attached so that r = 1 runs it too (without a slice it runs
    as the plain block: :func:`test_degree_one_without_a_slice_is_the_plain_block`)."""
    return Pipeline(spec=FSMOE, r_fwd=r_fwd, r_bwd=r_bwd, runtime=InlineRuntime.for_schedule(FSMOE), gar=lambda: None)


def test_degree_one_without_a_slice_is_the_plain_block() -> None:
    """r = 1/1 and no GAR slice: nothing to overlap, the plain block's autograd graph (no stash) and its
    numbers, bit for bit; with a slice, or at r > 1, the pipelined block."""
    torch.manual_seed(0)
    experts = build_experts("ffn", E, D, H)
    x_ECD = torch.randn(E, 8, D, requires_grad=True)
    plain = Pipeline(spec=FSMOE, r_fwd=1, r_bwd=1, runtime=InlineRuntime.for_schedule(FSMOE))
    y_ECD = plain(x_ECD, Dispatcher(), experts)
    assert not hasattr(y_ECD.grad_fn, "stash")
    ref = ExpertBlock()(x_ECD, Dispatcher(), experts)
    assert torch.equal(y_ECD, ref)
    assert hasattr(_pipe(1, 1)(x_ECD, Dispatcher(), experts).grad_fn, "stash")
    assert hasattr(Pipeline(spec=FSMOE, r_fwd=1, r_bwd=2, runtime=InlineRuntime.for_schedule(FSMOE))(
        x_ECD, Dispatcher(), experts).grad_fn, "stash")


@pytest.mark.parametrize(("r_fwd", "r_bwd"), DEGREES)
def test_forward_keeps_exactly_the_per_slot_stash(r_fwd: int, r_bwd: int) -> None:
    """After forward the block holds what the experts saved for every slot (FFN: input and pre-activation,
    (D + H) floats a slot), in no more bytes, and nothing else it made but its output."""
    torch.manual_seed(0)
    C = 64
    experts = build_experts("ffn", E, D, H)
    x_ECD = torch.randn(E, C, D, requires_grad=True)
    with LiveBytes(ignore=[x_ECD, *experts.parameters()]) as mem:
        y_ECD = _pipe(r_fwd, r_bwd)(x_ECD, Dispatcher(), experts)
    stash = y_ECD.grad_fn.stash
    saved = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for piece in stash.pieces for t in piece}
    assert sum(saved.values()) == E * C * (D + H) * 4
    kept = set(mem.live) - {y_ECD.untyped_storage().data_ptr()}
    assert kept <= set(saved), f"{len(kept - set(saved))} intermediates outlive the forward"
    y_ECD.backward(torch.randn_like(y_ECD))
    assert stash.pieces == [()] * r_fwd, "backward left some forward chunk's stash alive"


def _peak(layer: MoELayer, degrees: tuple[int, int] | None) -> int:
    torch.manual_seed(1)
    x, dy = torch.randn(T, D, requires_grad=True), torch.randn(T, D)
    if degrees is None:
        remove_pipeline(layer)
    else:
        apply_pipeline(layer, FSMOE, degrees, InlineRuntime.for_schedule(FSMOE))
    layer.zero_grad(set_to_none=True)
    with LiveBytes(ignore=[x, dy, *layer.parameters(), *layer.buffers()]) as mem:
        y = layer(x)
        torch.autograd.backward([y, layer.last_stats.aux_loss], [dy, torch.ones(())])
    return mem.peak


@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
def test_peak_within_1_1x_of_the_unpipelined_layer(expert: str) -> None:
    """Forward + backward peak of the pipelined layer at every degree pair, over the plain autograd
    layer's (``sequential``), with activations large against the weights as in the benchmark."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=2, d_hidden=H, expert=expert, capacity_factor=1.0)
    layer = MoELayer.from_config(cfg, D)
    base = _peak(layer, None)
    ratios = {f"{rf}/{rb}": _peak(layer, (rf, rb)) / base for rf, rb in DEGREES}
    assert max(ratios.values()) <= 1.1, ratios


def test_second_backward_is_refused() -> None:
    """Backward frees the stash chunk by chunk, so a retained graph cannot be run through again."""
    experts = build_experts("ffn", E, D, H)
    x_ECD = torch.randn(E, 8, D, requires_grad=True)
    y_ECD = _pipe(2, 2)(x_ECD, Dispatcher(), experts)
    y_ECD.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y_ECD.sum().backward()


def test_in_place_change_of_a_saved_input_is_caught() -> None:
    """With one chunk and no communication the stash holds a view of the input, as autograd would."""
    experts = build_experts("ffn", E, D, H)
    x_ECD = torch.randn(E, 8, D)
    y_ECD = _pipe(1, 1)(x_ECD, Dispatcher(), experts)
    x_ECD.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y_ECD.sum().backward()
