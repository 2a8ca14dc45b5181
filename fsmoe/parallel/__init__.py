"""Distribution, applied to the single-device MoE model from outside.

``dims`` (parallel degrees → process groups), ``comm`` (collectives: raw async calls and autograd
wrappers, imported from :mod:`fsmoe.parallel.comm`), ``dispatch`` (the a2a / 2dh / 1dh dispatchers
and ESP), ``tensor_parallel`` (MP attention), ``grad_sync`` / ``grad_plan`` (dense Gradient-AllReduce
after or inside backward), ``parallelize`` (applies shards, dispatchers, pipelines and gradient plans
to a model). May import :mod:`fsmoe.moe` and :mod:`fsmoe.schedule`; neither imports this package.
"""

from fsmoe.parallel import comm
from fsmoe.parallel.dims import (
    GROUP_KINDS,
    GroupKind,
    ParallelDims,
    ProcessGroups,
    RankCoords,
    build_groups,
    config_hash_check,
)
from fsmoe.parallel.dispatch import DISPATCHERS, AllToAllDispatcher, OneDHDispatcher, TwoDHDispatcher, build_dispatcher
from fsmoe.parallel.grad_plan import GradientPlan, PlannedGradSync, greedy_plan, parse_plan
from fsmoe.parallel.grad_sync import GradSync, mark_replicas
from fsmoe.parallel.parallelize import (
    RoutingGrid,
    apply_pipeline,
    attach_gradient_plan,
    gpt_gradient_stream,
    moe_layers,
    parallelize_gpt,
    pipeline_of,
    reference_grid,
    remove_pipeline,
    shard_moe_layer,
    tensor_parallel_attention,
)
from fsmoe.parallel.tensor_parallel import TensorParallelAttention, TensorParallelGQA

__all__ = [
    "DISPATCHERS", "GROUP_KINDS", "AllToAllDispatcher", "GradSync", "GradientPlan", "GroupKind", "OneDHDispatcher",
    "ParallelDims", "PlannedGradSync", "ProcessGroups", "RankCoords", "RoutingGrid", "TensorParallelAttention",
    "TensorParallelGQA",
    "TwoDHDispatcher", "apply_pipeline", "attach_gradient_plan", "build_dispatcher", "build_groups", "comm",
    "config_hash_check", "gpt_gradient_stream", "greedy_plan", "mark_replicas", "moe_layers", "parallelize_gpt",
    "parse_plan", "pipeline_of", "reference_grid", "remove_pipeline", "shard_moe_layer", "tensor_parallel_attention",
]
