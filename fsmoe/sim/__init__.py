"""The cluster simulator: described clusters and models (:mod:`~fsmoe.sim.presets`), the schedule IR played
for many layers at once (:mod:`~fsmoe.sim.engine`), whole-model iterations per schedule
(:mod:`~fsmoe.sim.simulator`), its timeline as a trace (:mod:`~fsmoe.sim.timeline`), jobs mapped onto it
(:mod:`~fsmoe.sim.build`), the paper's 1,458-layer grid with Table 5 (:mod:`~fsmoe.sim.grid`), the paper's
experiments reproduced (:mod:`~fsmoe.sim.reproduce`), the scale study (:mod:`~fsmoe.sim.scale`) and the
replay of measured layer benchmarks (:mod:`~fsmoe.sim.accuracy`). The CLI's handlers are in
:mod:`~fsmoe.sim.commands`."""

from fsmoe.sim.build import sim_cluster, sim_layout, sim_model
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
from fsmoe.sim.reproduce import Reproduction, reproduce
from fsmoe.sim.scale import ScaleStudy, at_nodes, scale_study
from fsmoe.sim.simulator import ScheduleRun, Simulation, simulate
from fsmoe.sim.timeline import iteration_events

__all__ = ["CLUSTERS", "MODELS", "Cluster", "GridReport", "Layout", "Reproduction", "ScaleStudy", "ScheduleRun",
           "SimModel", "Simulation", "TestbedGrid", "at_nodes", "cluster_preset", "dgx_h100", "grid_configs",
           "iteration_events", "load_profile_costs", "model_preset", "paper_layout", "profiled", "reproduce",
           "run_grid", "run_testbed", "scale_study", "sim_cluster", "sim_layout", "sim_model", "simulate", "testbed_a",
           "testbed_b"]
