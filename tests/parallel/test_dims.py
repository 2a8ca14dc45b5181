"""Pure layout tests for ParallelDims: hand-worked groups and coordinates, and the validation errors."""

from __future__ import annotations

import itertools

import pytest

from fsmoe.parallel.dims import GROUP_KINDS, ParallelDims, RankCoords


def paper_fig2() -> ParallelDims:
    """Fig. 2 of the paper: N_DP = N_MP = N_EP = N_ESP = 2 on 4 GPUs, 2 per node."""
    return ParallelDims(world_size=4, procs_per_node=2, dp=2, mp=2, ep=2, esp=2)


def test_fig2_groups():
    dims = paper_fig2()
    assert dims.group_ranks("esp") == ((0, 1), (2, 3))
    assert dims.group_ranks("mp") == ((0, 1), (2, 3))
    assert dims.group_ranks("ep") == ((0, 2), (1, 3))
    assert dims.group_ranks("dense_dp") == ((0, 2), (1, 3))
    assert dims.group_ranks("expert_dp") == ((0,), (1,), (2,), (3,))
    assert (dims.num_nodes, dims.dense_dp, dims.expert_dp) == (2, 2, 1)


def test_fig2_intra_inter():
    dims = paper_fig2()
    for rank in range(4):
        assert dims.is_intra("esp", rank) and dims.is_intra("mp", rank)
        assert not dims.is_intra("ep", rank) and not dims.is_intra("dense_dp", rank)
        assert dims.is_intra("expert_dp", rank)  # a group of one


def test_fig2_rank_layout():
    dims = paper_fig2()
    assert dims.rank_layout(3) == RankCoords(rank=3, node=1, local_rank=1, dp=1, mp=1, ep=1, esp=1, expert_dp=0)
    assert dims.rank_layout(2) == RankCoords(rank=2, node=1, local_rank=0, dp=1, mp=0, ep=1, esp=0, expert_dp=0)
    assert dims.rank_layout(1) == RankCoords(rank=1, node=0, local_rank=1, dp=0, mp=1, ep=0, esp=1, expert_dp=0)


def test_expert_replicas_and_small_esp():
    # 8 ranks on 2 nodes of 4; ESP pairs, EP of 2 inside blocks of 4 ranks, so each shard has 2 replicas.
    dims = ParallelDims(world_size=8, procs_per_node=4, dp=4, mp=2, ep=2, esp=2)
    assert dims.group_ranks("esp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert dims.group_ranks("ep") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert dims.group_ranks("expert_dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert dims.group_ranks("dense_dp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert dims.expert_dp == 2 and dims.dense_dp == 4
    assert dims.is_intra("ep", 5)  # the EP block of 4 fits inside a node
    assert not dims.is_intra("expert_dp", 5)
    assert dims.rank_layout(6) == RankCoords(rank=6, node=1, local_rank=2, dp=3, mp=0, ep=1, esp=0, expert_dp=1)


def test_paper_testbed_b_layout():
    # Testbed-B: 8 nodes x 4 GPUs, MP = ESP = node, EP = number of nodes.
    dims = ParallelDims(world_size=32, procs_per_node=4, dp=8, mp=4, ep=8, esp=4)
    assert dims.group_of("ep", 5) == (1, 5, 9, 13, 17, 21, 25, 29)  # same local rank on every node
    assert dims.group_of("esp", 5) == (4, 5, 6, 7)
    assert dims.group_of("dense_dp", 5) == dims.group_of("ep", 5)  # as in [C]: dense GAR on the EP group
    assert dims.expert_dp == 1
    assert not dims.is_intra("ep", 5) and dims.is_intra("esp", 5)


def test_ep_block_straddling_nodes_is_per_rank():
    # Blocks of 3 ranks on nodes of 4: block (0,1,2) is on node 0, block (3,4,5) crosses into node 1.
    dims = ParallelDims(world_size=12, procs_per_node=4, dp=12, ep=3)
    assert dims.group_of("ep", 0) == (0, 1, 2) and dims.is_intra("ep", 0)
    assert dims.group_of("ep", 4) == (3, 4, 5) and not dims.is_intra("ep", 4)


def test_single_rank():
    dims = ParallelDims(world_size=1, procs_per_node=1, dp=1)
    for kind in GROUP_KINDS:
        assert dims.group_ranks(kind) == ((0,),)
        assert dims.is_intra(kind, 0)
    assert dims.rank_layout(0) == RankCoords(rank=0, node=0, local_rank=0, dp=0, mp=0, ep=0, esp=0, expert_dp=0)


LAYOUTS = [
    dict(world_size=4, procs_per_node=2, dp=2, mp=2, ep=2, esp=2),
    dict(world_size=8, procs_per_node=4, dp=4, mp=2, ep=2, esp=2),
    dict(world_size=8, procs_per_node=4, dp=8, mp=1, ep=4, esp=1),
    dict(world_size=16, procs_per_node=4, dp=4, mp=4, ep=2, esp=4),
    dict(world_size=12, procs_per_node=6, dp=4, mp=3, ep=3, esp=2),
]


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_groups_partition_world_and_match_coords(kw):
    dims = ParallelDims(**kw)
    sizes = dict(mp=dims.mp, dense_dp=dims.dense_dp, esp=dims.esp, ep=dims.ep, expert_dp=dims.expert_dp)
    for kind in GROUP_KINDS:
        groups = dims.group_ranks(kind)
        assert sorted(itertools.chain(*groups)) == list(range(dims.world_size)), kind
        assert all(len(g) == sizes[kind] for g in groups), kind
    for rank in range(dims.world_size):
        c = dims.rank_layout(rank)
        assert c.node * dims.procs_per_node + c.local_rank == rank
        index = dict(mp=c.mp, dense_dp=c.dp, esp=c.esp, ep=c.ep, expert_dp=c.expert_dp)
        for kind in GROUP_KINDS:
            assert dims.group_of(kind, rank)[index[kind]] == rank, (kind, rank)
        assert dims.is_intra("mp", rank) and dims.is_intra("esp", rank)
        # An EP group and an ESP group meet in exactly one rank: (ep index, esp index) names a shard.
        assert set(dims.group_of("ep", rank)) & set(dims.group_of("esp", rank)) == {rank}


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(world_size=4, procs_per_node=2, dp=0), ["dp", "0"]),
        (dict(world_size=4, procs_per_node=2, dp=4, ep=-1), ["ep", "-1"]),
        (dict(world_size=4, procs_per_node=2, dp=2.0), ["dp", "2.0"]),
        (dict(world_size=6, procs_per_node=4, dp=6), ["procs_per_node=4", "world_size=6"]),
        (dict(world_size=4, procs_per_node=2, dp=4, mp=2), ["dp=4", "mp=2", "8", "world_size=4"]),
        (dict(world_size=8, procs_per_node=4, dp=8, esp=3), ["esp=3", "procs_per_node=4"]),
        (dict(world_size=8, procs_per_node=2, dp=2, mp=4), ["mp=4", "procs_per_node=2", "[0, 1, 2, 3]"]),
        (dict(world_size=8, procs_per_node=4, dp=8, ep=3, esp=2), ["ep=3", "esp=2", "6", "world_size=8"]),
    ],
)
def test_invalid_dims_name_the_numbers(kw, words):
    with pytest.raises(ValueError) as info:
        ParallelDims(**kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_esp_crossing_names_the_group():
    with pytest.raises(ValueError, match=r"group \[3, 4, 5\] would cross a node boundary"):
        ParallelDims(world_size=8, procs_per_node=4, dp=8, esp=3)


def test_bad_rank_and_kind():
    dims = paper_fig2()
    with pytest.raises(ValueError, match="rank 4 is outside world_size=4"):
        dims.rank_layout(4)
    with pytest.raises(ValueError, match="unknown group kind 'tp'"):
        dims.group_ranks("tp")  # type: ignore[arg-type]
