"""Performance models and the planner (paper §4–5): α-β costs per operation, the MoE block's workloads,
closed forms and an exact evaluator of the schedule IR, Algorithm 1, adaptive gradient partitioning and
the job plan. Profiling (:mod:`fsmoe.perf.profile`) measures the :class:`Costs` these consume.

Imports :mod:`fsmoe.config`, :mod:`fsmoe.moe`, :mod:`fsmoe.schedule`, :mod:`fsmoe.parallel` and
:mod:`fsmoe.models`; never ``train``, ``bench`` or ``cli``.
"""

from fsmoe.perf.costs import Costs, Linear
from fsmoe.perf.model import (
    LayerWork,
    PassModel,
    Timeline,
    closed_form,
    gar_response,
    layer_work,
    play,
    play_pass,
    tokens_per_rank,
)
from fsmoe.perf.partition import StepModel, StepPrediction, partition, plan_text, rank_stream
from fsmoe.perf.planner import (
    JobPlan,
    LayerPlan,
    LayerPrediction,
    algorithm1,
    plan_job,
    plan_layer,
    predict_layer,
    predict_schedule,
)

__all__ = [
    "Costs", "JobPlan", "LayerPlan", "LayerPrediction", "LayerWork", "Linear", "PassModel", "StepModel",
    "StepPrediction", "Timeline", "algorithm1", "closed_form", "gar_response", "layer_work", "partition",
    "plan_job", "plan_layer", "plan_text", "play", "play_pass", "predict_layer", "predict_schedule", "rank_stream",
    "tokens_per_rank",
]
