"""Distributed layer: parallel degrees and process groups (``dims``), autograd collectives (``comm``)."""

from fsmoe.parallel.comm import (
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
from fsmoe.parallel.dims import (
    GROUP_KINDS,
    GroupKind,
    ParallelDims,
    ProcessGroups,
    RankCoords,
    build_groups,
    config_hash_check,
)

__all__ = [
    "GROUP_KINDS",
    "GroupKind",
    "ParallelDims",
    "ProcessGroups",
    "RankCoords",
    "all_gather",
    "all_gather_into",
    "all_reduce_",
    "all_to_all",
    "all_to_all_into",
    "build_groups",
    "config_hash_check",
    "copy_to_mp",
    "exchange_split_sizes",
    "gather_from_sp",
    "reduce_from_mp",
    "reduce_scatter",
    "reduce_scatter_into",
    "scatter_to_sp",
]
