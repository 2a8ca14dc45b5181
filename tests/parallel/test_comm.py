"""Collectives on 2 and 4 gloo ranks: forward against a hand computation, backward (via autograd)
against the adjoint computed by hand, for a loss summed over ranks: L = Σ_r <w_r, y_r>.

Every rank can rebuild every other rank's input and weight (seeded per rank), so each rank computes
the expected values by hand without communicating. One spawn per world size runs all cases.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.testing import assert_close

from fsmoe.parallel.comm import (
    _reduce_scatter_by_all_to_all,
    all_gather,
    all_gather_into,
    all_reduce_,
    all_to_all,
    all_to_all_into,
    copy_to_mp,
    exchange_split_sizes,
    gather_from_sp,
    reduce_from_mp,
    reduce_scatter,
    reduce_scatter_into,
    scatter_to_sp,
)
from fsmoe.parallel.dims import GROUP_KINDS, ParallelDims, build_groups, config_hash_check
from tests.dist_utils import RankFailed, RanksTimedOut, report_progress, run_cases, run_distributed


def rand(seed: int, rank: int, *shape: int) -> Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def leaf(seed: int, rank: int, *shape: int) -> Tensor:
    return rand(seed, rank, *shape).requires_grad_()


def backward_with(y: Tensor, w: Tensor) -> None:
    (w * y).sum().backward()


# ---- cases: each runs on every rank -------------------------------------------------------------------


def case_rank_order(rank: int, world: int) -> tuple[int, int]:
    return rank, world


def case_all_to_all_equal(rank: int, world: int) -> None:
    x = leaf(1, rank, 2 * world, 3)
    y = all_to_all(x)
    assert_close(y, torch.cat([rand(1, j, 2 * world, 3)[2 * rank : 2 * rank + 2] for j in range(world)]))
    backward_with(y, rand(2, rank, 2 * world, 3))
    # rows [2q, 2q+2) of x_r landed on rank q at rows [2r, 2r+2)
    expected = torch.cat([rand(2, q, 2 * world, 3)[2 * rank : 2 * rank + 2] for q in range(world)])
    assert_close(x.grad, expected)


def _unequal_splits(world: int, rank_sending_nothing: bool) -> list[list[int]]:
    """M[j][q] = rows rank j sends to rank q (zeros included)."""
    if rank_sending_nothing:
        return [[0] * world] + [[q + 1 for q in range(world)] for _ in range(1, world)]
    return [[(j + 2 * q + 1) % 3 for q in range(world)] for j in range(world)]


def _check_unequal_all_to_all(rank: int, world: int, M: list[list[int]]) -> None:
    in_splits, out_splits = M[rank], [M[j][rank] for j in range(world)]
    assert exchange_split_sizes(in_splits) == out_splits
    x = leaf(3, rank, sum(in_splits), 2)
    y = all_to_all(x, None, out_splits, in_splits)

    def sent(j: int, q: int) -> Tensor:  # the rows rank j sends to rank q
        return rand(3, j, sum(M[j]), 2)[sum(M[j][:q]) : sum(M[j][: q + 1])]

    assert_close(y, torch.cat([sent(j, rank) for j in range(world)]))
    backward_with(y, rand(4, rank, sum(out_splits), 2))

    def grad_from(q: int) -> Tensor:  # rank q's weight on the rows it received from this rank
        start = sum(M[j][q] for j in range(rank))
        return rand(4, q, sum(M[j][q] for j in range(world)), 2)[start : start + M[rank][q]]

    assert_close(x.grad, torch.cat([grad_from(q) for q in range(world)]))


def case_all_to_all_unequal(rank: int, world: int) -> None:
    for rank_sending_nothing in (False, True):
        _check_unequal_all_to_all(rank, world, _unequal_splits(world, rank_sending_nothing))


def case_all_gather(rank: int, world: int) -> None:
    for dim in (0, 1):
        x = leaf(5, rank, 2, 3)
        y = all_gather(x, dim=dim)
        assert_close(y, torch.cat([rand(5, j, 2, 3) for j in range(world)], dim=dim))
        backward_with(y, rand(6, rank, *y.shape))
        s = x.shape[dim]
        assert_close(x.grad, sum(rand(6, q, *y.shape).narrow(dim, rank * s, s) for q in range(world)))


def case_reduce_scatter(rank: int, world: int) -> None:
    for dim, shape in ((0, (2 * world, 3)), (1, (3, 2 * world))):
        x = leaf(7, rank, *shape)
        y = reduce_scatter(x, dim=dim)
        total = sum(rand(7, j, *shape) for j in range(world))
        assert_close(y, total.narrow(dim, 2 * rank, 2))
        backward_with(y, rand(8, rank, *y.shape))
        assert_close(x.grad, torch.cat([rand(8, q, *y.shape) for q in range(world)], dim=dim))


def case_copy_to_mp_and_reduce_from_mp(rank: int, world: int) -> None:
    x = leaf(9, rank, 4, 3)
    y = copy_to_mp(x)
    assert_close(y, x.detach())
    backward_with(y, rand(10, rank, 4, 3))
    assert_close(x.grad, sum(rand(10, q, 4, 3) for q in range(world)))

    x = leaf(11, rank, 4, 3)
    y = reduce_from_mp(x)
    assert_close(y, sum(rand(11, j, 4, 3) for j in range(world)))
    backward_with(y, rand(12, rank, 4, 3))
    assert_close(x.grad, rand(12, rank, 4, 3))


def case_sequence_parallel(rank: int, world: int) -> None:
    assert gather_from_sp is all_gather
    x = leaf(13, 99, 3, 2 * world)  # replicated: the same on every rank
    y = scatter_to_sp(x, dim=1)
    assert_close(y, rand(13, 99, 3, 2 * world)[:, 2 * rank : 2 * rank + 2])
    assert_close(gather_from_sp(y.detach(), dim=1), x.detach())
    backward_with(y, rand(14, rank, 3, 2))
    assert_close(x.grad, torch.cat([rand(14, q, 3, 2) for q in range(world)], dim=1))


def case_group_of_one_does_not_communicate(rank: int, world: int) -> None:
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
    g = singles[rank]
    x = leaf(15, rank, 4, 2)
    assert all_to_all(x, g) is x
    assert all_to_all(x, g, [4], [4]) is x
    for wrapper in (all_gather, reduce_scatter, scatter_to_sp):
        assert wrapper(x, g, dim=1) is x
    assert copy_to_mp(x, g) is x and reduce_from_mp(x, g) is x
    with pytest.raises(ValueError, match="sum to 4 rows"):
        all_to_all(x, g, [3], [3])


def case_argument_errors(rank: int, world: int) -> None:
    x = torch.zeros(2 * world + 1, 2)
    with pytest.raises(ValueError, match="not divisible by group size"):
        all_to_all(x)
    with pytest.raises(ValueError, match="not divisible by group size"):
        reduce_scatter(x)
    with pytest.raises(ValueError, match="both output_split_sizes and input_split_sizes"):
        all_to_all(x, None, None, [1] * world)
    with pytest.raises(ValueError, match="one split per rank"):
        all_to_all(x, None, [1], [x.shape[0]])


def _dims_for(world: int) -> ParallelDims:
    if world == 4:  # the paper's Fig. 2
        return ParallelDims(world_size=4, procs_per_node=2, dp=2, mp=2, ep=2, esp=2)
    return ParallelDims(world_size=world, procs_per_node=1, dp=world, ep=world)


def case_build_groups(rank: int, world: int) -> None:
    dims = _dims_for(world)
    pgs = build_groups(dims, channels=2)
    for kind in GROUP_KINDS:
        ranks = dims.group_of(kind, rank)
        assert pgs.ranks[kind] == ranks and pgs.size(kind) == len(ranks)
        assert pgs.is_intra(kind) == dims.is_intra(kind, rank)
        for channel in (0, 1):
            assert tuple(dist.get_process_group_ranks(pgs.group(kind, channel))) == ranks
        assert pgs.group(kind, 0) is not pgs.group(kind, 1)
    # collectives on the real subgroups, both channels
    x = leaf(16, rank, 2, 2)
    y = all_gather(x, pgs.group("esp"))
    assert_close(y, torch.cat([rand(16, j, 2, 2) for j in pgs.ranks["esp"]]))
    z = all_to_all(y, pgs.group("ep", channel=1))
    ep = pgs.ranks["ep"]
    me = ep.index(rank)
    rows = y.shape[0] // len(ep)
    gathered = {j: torch.cat([rand(16, k, 2, 2) for k in dims.group_of("esp", j)]) for j in ep}
    assert_close(z, torch.cat([gathered[j][me * rows : (me + 1) * rows] for j in ep]))
    total = reduce_from_mp(x, pgs.group("dense_dp", channel=1))
    assert_close(total, sum(rand(16, j, 2, 2) for j in pgs.ranks["dense_dp"]))
    with pytest.raises(ValueError, match="channel 2 out of range"):
        pgs.group("ep", channel=2)


def case_raw_async(rank: int, world: int) -> None:
    x = rand(17, rank, 2, 3)
    xs = rand(18, rank, 2 * world, 3)
    gathered = torch.empty(2 * world, 3, dtype=torch.float64)
    scattered = torch.empty(2, 3, dtype=torch.float64)
    exchanged = torch.empty(2 * world, 3, dtype=torch.float64)
    summed = x.clone()
    works = [  # all in flight at once, waited on afterwards
        all_gather_into(gathered, x, async_op=True),
        reduce_scatter_into(scattered, xs, async_op=True),
        all_to_all_into(exchanged, xs, async_op=True),
        all_reduce_(summed, async_op=True),
    ]
    for work in works:
        assert work is not None
        work.wait()
    assert_close(gathered, torch.cat([rand(17, j, 2, 3) for j in range(world)]))
    assert_close(scattered, sum(rand(18, j, 2 * world, 3) for j in range(world))[2 * rank : 2 * rank + 2])
    assert_close(exchanged, torch.cat([rand(18, j, 2 * world, 3)[2 * rank : 2 * rank + 2] for j in range(world)]))
    assert_close(summed, sum(rand(17, j, 2, 3) for j in range(world)))


def case_reduce_scatter_fallback(rank: int, world: int) -> None:
    xs = rand(19, rank, 2 * world, 3)
    out = torch.empty(2, 3, dtype=torch.float64)
    _reduce_scatter_by_all_to_all(out, xs, None)
    assert_close(out, sum(rand(19, j, 2 * world, 3) for j in range(world))[2 * rank : 2 * rank + 2])


def case_config_hash(rank: int, world: int) -> tuple[int, str]:
    same = config_hash_check(_dims_for(world))
    odd = {"lr": 0.1 if rank != world - 1 else 0.2}
    with pytest.raises(ValueError) as info:
        config_hash_check(odd)
    return same, str(info.value)


CASES = [
    case_rank_order,
    case_all_to_all_equal,
    case_all_to_all_unequal,
    case_all_gather,
    case_reduce_scatter,
    case_copy_to_mp_and_reduce_from_mp,
    case_sequence_parallel,
    case_group_of_one_does_not_communicate,
    case_argument_errors,
    case_build_groups,
    case_raw_async,
    case_reduce_scatter_fallback,
    case_config_hash,
]


# ---- pytest side: one spawn per world size -----------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def outcomes(request):
    return request.param, run_cases(CASES, request.param, timeout=120)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_case(outcomes, case):
    outcomes[1][case].result()


def test_values_come_back_in_rank_order(outcomes):
    world, results = outcomes
    assert results["case_rank_order"].result() == tuple((r, world) for r in range(world))


def test_config_hash_mismatch_same_error_on_every_rank(outcomes):
    world, results = outcomes
    values = results["case_config_hash"].result()
    assert len({same for same, _ in values}) == 1
    messages = {message for _, message in values}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert f"ranks {list(range(world - 1))} have" in message
    assert f"ranks [{world - 1}] have" in message


# ---- the harness itself ------------------------------------------------------------------------------


def fail_on(rank: int, world: int, *, bad_rank: int) -> None:
    if rank == bad_rank:
        raise ZeroDivisionError(f"planted failure on rank {rank}")
    dist.barrier()  # the other ranks wait for the failed one: the harness must not wait for them


def hang_on(rank: int, world: int, *, stuck_rank: int) -> int:
    if rank == stuck_rank:
        report_progress("sleeping on purpose")
        time.sleep(600)
    return rank


def test_harness_reports_failing_rank_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_distributed(fail_on, 2, timeout=60, bad_rank=1)
    assert info.value.rank == 1
    assert "ZeroDivisionError: planted failure on rank 1" in str(info.value)
    assert "in fail_on" in info.value.remote_traceback
    assert time.monotonic() - start < 30


def test_harness_kills_hung_ranks():
    start = time.monotonic()
    with pytest.raises(RanksTimedOut) as info:
        run_distributed(hang_on, 2, timeout=4, stuck_rank=0)
    message = str(info.value)
    assert "did not finish within 4 s" in message and "[0" in message
    assert time.monotonic() - start < 15


def suite_ok(rank: int, world: int) -> int:
    return 10 * rank


def suite_fails_on_rank_1(rank: int, world: int) -> None:
    assert rank != 1, "planted case failure"


def suite_after_failure(rank: int, world: int) -> None:
    raise AssertionError("must not run after a failed case")


def test_run_cases_stops_after_a_failed_case():
    outcomes = run_cases([suite_ok, suite_fails_on_rank_1, suite_after_failure], 2, timeout=60)
    assert outcomes["suite_ok"].result() == (0, 10)
    with pytest.raises(AssertionError, match="planted case failure") as info:
        outcomes["suite_fails_on_rank_1"].result()
    assert "--- rank 1 ---" in str(info.value) and "--- rank 0 ---" not in str(info.value)
    with pytest.raises(AssertionError, match="not run: an earlier case, suite_fails_on_rank_1, failed"):
        outcomes["suite_after_failure"].result()


def test_harness_rejects_unimportable_functions():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world: None, 2)
