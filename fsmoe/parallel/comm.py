"""Collectives: raw calls that can run asynchronously, and autograd wrappers over them.

Legend: N the group size, r this rank's index in the group, s a tensor's size along ``dim``,
S rows (dim 0) of an all-to-all input. ``group=None`` means the default (world) group.

Autograd collectives: one ``torch.autograd.Function`` plus one lowercase wrapper each. ``ctx`` keeps
only the group, the splits and the dim. For a group of size 1 every wrapper returns its input without
communicating. Backward is the adjoint of forward, for a loss summed over all ranks:

==========================================  ======================================  ========================
wrapper                                     forward                                 backward (adjoint)
==========================================  ======================================  ========================
``all_to_all(x, g, out_splits, in_splits)``  rows ``in_splits[j]`` of x go to rank j;  all_to_all of the grad
                                            received blocks concatenated in rank     with the splits swapped
                                            order: ``sum(out_splits)`` rows
``all_gather(x, g, dim)``                   ``cat_j x_j`` along dim (s -> N·s)       reduce_scatter (sum)
``reduce_scatter(x, g, dim)``               chunk r of ``Σ_j x_j`` (s -> s/N)        all_gather
``copy_to_mp(x, g)``   (Megatron f)         identity                                all_reduce (sum)
``reduce_from_mp(x, g)`` (Megatron g)       all_reduce (sum)                        identity
``gather_from_sp`` = ``all_gather``         sequence-parallel gather                reduce_scatter
``scatter_to_sp(x, g, dim)``                chunk r of a replicated x (s -> s/N)    all_gather
==========================================  ======================================  ========================

``scatter_to_sp`` and ``copy_to_mp`` take an input that is *replicated* over the group; the gradient
they return is that of the replicated value, i.e. summed over the ranks that use it.

Raw calls (no autograd; the output is preallocated; ``async_op=True`` returns a work handle whose
``wait()`` completes the call): ``all_to_all_into``, ``all_gather_into``, ``reduce_scatter_into``,
``all_reduce_``. A scheduler issues these on its channels' groups and waits on the handles.
``exchange_split_sizes`` is the one synchronising count exchange that unequal all-to-alls need.

This module owns every collective of the package; version and backend differences of torch.distributed
live here only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Group = dist.ProcessGroup | None


class _CompletedWork:
    """Stands in for a ``dist.Work`` when the call already finished synchronously."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


Work = dist.Work | _CompletedWork


# --- compatibility shim: torch >= 2.13 renamed the tensor-form gather/scatter; gloo before ~2.6 had no
# --- reduce_scatter_tensor. All version and backend differences live in these functions.


def _torch_collective(new: str, old: str) -> Callable[..., Any]:
    return getattr(dist, new, None) or getattr(dist, old)


def all_gather_into(out: Tensor, x: Tensor, group: Group = None, *, async_op: bool = False) -> Work | None:
    """``out`` (N·s0, ...) = concatenation over the group's ranks of ``x`` (s0, ...) along dim 0."""
    op = _torch_collective("all_gather_single", "all_gather_into_tensor")
    return op(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: Tensor, x: Tensor, group: Group = None, *, async_op: bool = False) -> Work | None:
    """``out`` (s0/N, ...) = chunk r along dim 0 of the sum over the group of ``x`` (s0, ...)."""
    op = _torch_collective("reduce_scatter_single", "reduce_scatter_tensor")
    try:
        return op(out, x, group=group, async_op=async_op)
    except RuntimeError as err:
        # A backend without the op refuses it before communicating, on every rank alike.
        if "does not support" not in str(err):
            raise
    _reduce_scatter_by_all_to_all(out, x, group)
    return _CompletedWork() if async_op else None


def _reduce_scatter_by_all_to_all(out: Tensor, x: Tensor, group: Group) -> None:
    """Fallback reduce-scatter: all-to-all the N chunks, then sum the N received chunk-r copies."""
    n = dist.get_world_size(group)
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x.contiguous(), group=group)
    out.copy_(received.view(n, *out.shape).sum(0))


def all_to_all_into(
    out: Tensor,
    x: Tensor,
    group: Group = None,
    *,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    async_op: bool = False,
) -> Work | None:
    """Rows ``input_split_sizes[j]`` of ``x`` go to rank j; ``out`` receives ``output_split_sizes[j]``
    rows from rank j, in rank order. ``None`` splits mean equal splits. Uses ``all_to_all_single``,
    the form gloo supports with unequal splits."""
    return dist.all_to_all_single(
        out,
        x,
        output_split_sizes=None if output_split_sizes is None else list(output_split_sizes),
        input_split_sizes=None if input_split_sizes is None else list(input_split_sizes),
        group=group,
        async_op=async_op,
    )


def all_reduce_(x: Tensor, group: Group = None, *, async_op: bool = False) -> Work | None:
    """In place: ``x`` = sum of ``x`` over the group."""
    return dist.all_reduce(x, group=group, async_op=async_op)


def collective_device(group: Group = None) -> torch.device:
    """Where the collectives of ``group`` take their tensors: the current CUDA device under NCCL, the CPU
    under gloo. Small bookkeeping exchanges (capacities, split sizes, hashes) are built there."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_split_sizes(input_split_sizes: Sequence[int], group: Group = None) -> list[int]:
    """How many rows each rank will send to this one, given how many this rank sends to each.

    Synchronises (a small all-to-all plus ``.tolist()``): it must run before an unequal
    :func:`all_to_all` whose receive counts this rank cannot know on its own."""
    n = dist.get_world_size(group)
    if len(input_split_sizes) != n:
        raise ValueError(f"need one split per rank: got {len(input_split_sizes)} splits for group size {n}")
    send = torch.tensor(list(input_split_sizes), dtype=torch.int64, device=collective_device(group))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


# --- tensor helpers (no autograd) used by forward and backward alike ----------------------------------


def _gather(x: Tensor, group: Group, dim: int) -> Tensor:
    n = dist.get_world_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0], *x0.shape[1:]))
    all_gather_into(out, x0, group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, group: Group, dim: int) -> Tensor:
    n = dist.get_world_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // n, *x0.shape[1:]))
    reduce_scatter_into(out, x0, group)
    return out.movedim(0, dim).contiguous()


def _split(x: Tensor, group: Group, dim: int) -> Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    s = x.shape[dim] // n
    return x.narrow(dim, r * s, s).clone(memory_format=torch.contiguous_format)


def _all_reduce(x: Tensor, group: Group) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    all_reduce_(out, group)
    return out


def _all_to_all(
    x: Tensor, group: Group, out_splits: tuple[int, ...] | None, in_splits: tuple[int, ...] | None
) -> Tensor:
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    all_to_all_into(out, x.contiguous(), group, output_split_sizes=out_splits, input_split_sizes=in_splits)
    return out


def _check_divisible(x: Tensor, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise ValueError(
            f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not divisible by group size {n}"
        )


# --- autograd functions --------------------------------------------------------------------------------
# Every collective's Function has the same form: forward y = op(x, group, *args), backward
# dx = adjoint(dy, group, *args), ``ctx`` keeping only (group, *args). ``_collective`` writes that form
# once; each collective is one named Function made from its op and its adjoint.


def _collective(name: str, op: Callable[..., Tensor], adjoint: Callable[..., Tensor]) -> type[torch.autograd.Function]:
    def forward(ctx: Any, x: Tensor, group: Group, *args: Any) -> Tensor:
        ctx.group, ctx.args = group, args
        return op(x, group, *args)

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (adjoint(grad, ctx.group, *ctx.args), None, *(None for _ in ctx.args))

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    fn.__doc__ = f"forward: {op.__name__}; backward (adjoint): {adjoint.__name__}"
    return fn


def _all_to_all_adjoint(
    grad: Tensor, group: Group, out_splits: tuple[int, ...] | None, in_splits: tuple[int, ...] | None
) -> Tensor:
    return _all_to_all(grad, group, in_splits, out_splits)  # the same exchange with the splits swapped


def _identity(x: Tensor, group: Group) -> Tensor:
    return x.view_as(x)  # a new autograd node on the same data


_AllToAll = _collective("_AllToAll", _all_to_all, _all_to_all_adjoint)
_AllGather = _collective("_AllGather", _gather, _reduce_scatter)
_ReduceScatter = _collective("_ReduceScatter", _reduce_scatter, _gather)
_CopyToMP = _collective("_CopyToMP", _identity, _all_reduce)
_ReduceFromMP = _collective("_ReduceFromMP", _all_reduce, _identity)
_ScatterToSP = _collective("_ScatterToSP", _split, _gather)


def _apply(fn: type[torch.autograd.Function], x: Tensor, group: Group, *args: Any) -> Tensor:
    """``fn`` over ``group``; a group of one rank has nothing to exchange, so ``x`` itself."""
    return x if dist.get_world_size(group) == 1 else fn.apply(x, group, *args)


# --- wrappers --------------------------------------------------------------------------------------------


def all_to_all(
    x: Tensor,
    group: Group = None,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
) -> Tensor:
    """All-to-all over dim 0: x (S, ...) -> y (sum(output_split_sizes), ...).

    Give both splits (unequal; see :func:`exchange_split_sizes`) or neither (equal: S divisible by N,
    y has S rows). Adjoint: the same all-to-all of the gradient with the splits swapped."""
    n = dist.get_world_size(group)
    if (output_split_sizes is None) != (input_split_sizes is None):
        raise ValueError("all_to_all: give both output_split_sizes and input_split_sizes, or neither")
    if input_split_sizes is None:
        _check_divisible(x, 0, n, "all_to_all with equal splits")
        out_splits = in_splits = None
    else:
        assert output_split_sizes is not None
        out_splits, in_splits = tuple(output_split_sizes), tuple(input_split_sizes)
        if len(in_splits) != n or len(out_splits) != n:
            raise ValueError(
                f"all_to_all: need one split per rank, got {len(in_splits)} input and "
                f"{len(out_splits)} output splits for group size {n}"
            )
        if sum(in_splits) != x.shape[0] or min(in_splits) < 0 or min(out_splits) < 0:
            raise ValueError(
                f"all_to_all: input_split_sizes {list(in_splits)} must be >= 0 and sum to {x.shape[0]} rows"
            )
    return _apply(_AllToAll, x, group, out_splits, in_splits)


def all_gather(x: Tensor, group: Group = None, dim: int = 0) -> Tensor:
    """All-gather along ``dim``: x (.., s, ..) -> y (.., N·s, ..) = cat over ranks in rank order.
    Adjoint: reduce_scatter (sum) of the gradient along ``dim``."""
    return _apply(_AllGather, x, group, dim)


def reduce_scatter(x: Tensor, group: Group = None, dim: int = 0) -> Tensor:
    """Reduce-scatter along ``dim``: x (.., s, ..) -> y (.., s/N, ..) = chunk r of the sum over ranks.
    Adjoint: all_gather of the gradient along ``dim``."""
    _check_divisible(x, dim, dist.get_world_size(group), "reduce_scatter")
    return _apply(_ReduceScatter, x, group, dim)


def copy_to_mp(x: Tensor, group: Group = None) -> Tensor:
    """Megatron's f: identity forward on a replicated x; backward all-reduces (sums) the gradient."""
    return _apply(_CopyToMP, x, group)


def reduce_from_mp(x: Tensor, group: Group = None) -> Tensor:
    """Megatron's g: forward all-reduces (sums) partial results; backward is the identity."""
    return _apply(_ReduceFromMP, x, group)


def scatter_to_sp(x: Tensor, group: Group = None, dim: int = 0) -> Tensor:
    """Keep this rank's chunk of a replicated x: (.., s, ..) -> (.., s/N, ..), chunk r.
    Adjoint (for the replicated x): all_gather of the gradient along ``dim``."""
    _check_divisible(x, dim, dist.get_world_size(group), "scatter_to_sp")
    return _apply(_ScatterToSP, x, group, dim)


gather_from_sp = all_gather
"""Sequence-parallel gather: :func:`all_gather` (backward reduce_scatter, for a consumer whose
gradient differs per rank, e.g. a column-parallel linear)."""

__all__ = [
    "Group", "Work", "all_gather", "all_gather_into", "all_reduce_", "all_to_all", "all_to_all_into", "copy_to_mp",
    "exchange_split_sizes", "gather_from_sp", "reduce_from_mp", "reduce_scatter", "reduce_scatter_into",
    "scatter_to_sp",
]
