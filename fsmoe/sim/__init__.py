"""The cluster simulator: described clusters and models (:mod:`~fsmoe.sim.presets`), the schedule IR played
for many layers at once (:mod:`~fsmoe.sim.engine`), whole-model iterations per schedule
(:mod:`~fsmoe.sim.simulator`) and the paper's 1,458-layer grid with Table 5 (:mod:`~fsmoe.sim.grid`)."""

from fsmoe.sim.grid import GridReport, TestbedGrid, grid_configs, run_grid, run_testbed
from fsmoe.sim.presets import (
    CLUSTERS,
    MODELS,
    Cluster,
    Layout,
    SimModel,
    cluster_preset,
    dgx_h100,
    load_profile_costs,
    model_preset,
    paper_layout,
    profiled,
    testbed_a,
    testbed_b,
)
from fsmoe.sim.simulator import ScheduleRun, Simulation, simulate

__all__ = ["CLUSTERS", "MODELS", "Cluster", "GridReport", "Layout", "ScheduleRun", "SimModel", "Simulation",
           "TestbedGrid", "cluster_preset", "dgx_h100", "grid_configs", "load_profile_costs", "model_preset",
           "paper_layout", "profiled", "run_grid", "run_testbed", "simulate", "testbed_a", "testbed_b"]
