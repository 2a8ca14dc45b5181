"""``fsmoe simulate`` and ``fsmoe reproduce``: the CLI's handlers (called by :mod:`fsmoe.cli` with the resolved
job) over :func:`~fsmoe.sim.simulator.simulate` and :func:`~fsmoe.sim.reproduce.reproduce`.

A bad job (a cluster or model that cannot hold the layout, an unreadable profile) is reported as one line
on stderr, ``fsmoe <command>: error: ...``, with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fsmoe.config import JobConfig, dump_toml
from fsmoe.schedule.runtime import chrome_trace
from fsmoe.sim.build import sim_layout
from fsmoe.sim.presets import Layout
from fsmoe.sim.reproduce import reproduce
from fsmoe.sim.simulator import Simulation, simulate
from fsmoe.sim.timeline import iteration_events

RESULTS = "simulation.json"


def layout_dict(layout: Layout) -> dict[str, Any]:
    """The layout as JSON: cluster, model sizes and degrees."""
    c, m = layout.cluster, layout.model
    return {"cluster": {"name": c.name, "nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "world": c.world,
                        "source": c.source},
            "model": {k: getattr(m, k) for k in ("name", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_hidden",
                                                 "gemms", "top_k", "capacity_factor", "seq_len", "batch")},
            "experts": layout.experts, "ep": layout.ep, "esp": layout.esp, "mp": layout.mp, "tokens": layout.tokens}


def simulation_dict(sim: Simulation) -> dict[str, Any]:
    return {"layout": layout_dict(sim.layout),
            "runs": [{"schedule": r.schedule, "iteration_s": r.iteration_s, "fwd_s": r.fwd_s, "bwd_s": r.bwd_s,
                      "speedup_vs_tutel": r.speedup_vs_tutel, "breakdown_s": r.breakdown_s,
                      "degrees": [list(d) for d in r.degrees]} for r in sim.runs]}


def trace_paths(trace: str, schedules: tuple[str, ...]) -> dict[str, Path]:
    """``--trace FILE``: FILE for one schedule; ``<stem>.<schedule><suffix>`` for each of several."""
    p = Path(trace)
    if len(schedules) == 1:
        return {schedules[0]: p}
    return {s: p.with_name(f"{p.stem}.{s}{p.suffix or '.json'}") for s in schedules}


def _error(command: str, e: ValueError) -> int:
    print(f"fsmoe {command}: error: {e}", file=sys.stderr, flush=True)
    return 2


def _check_out(job: JobConfig, marker: str) -> None:
    """``run.out`` must not hold a previous result (``marker``) unless ``run.overwrite``."""
    out = Path(job.run.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if (out / marker).exists() and not job.run.overwrite:
        raise ValueError(f"--out {str(out)!r} holds a previous result ({marker}); pass --overwrite to replace it, "
                         "or choose another --out")


def _check_writable(path: Path, overwrite: bool) -> None:
    """``path`` can be created (its directory made) and is not a previous file unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise ValueError(f"--trace {str(path)!r} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write --trace {str(path)!r}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write --trace {str(path)!r}: its directory is not writable")


def handle_simulate(job: JobConfig, args: argparse.Namespace) -> int:
    """Simulate ``job``'s model on its described cluster under every requested schedule: print the table,
    write ``simulation.json`` and ``job.toml`` to ``run.out`` and, with ``run.trace``, the timelines."""
    traces = trace_paths(job.run.trace, job.sim.schedules) if job.run.trace else {}
    try:
        _check_out(job, RESULTS)
        for path in traces.values():  # before anything is written: a trace that cannot be written stops here
            _check_writable(path, job.run.overwrite)
        layout = sim_layout(job)
    except ValueError as e:
        return _error("simulate", e)
    sim = simulate(layout, job.sim.schedules)
    print(sim.table())
    out = Path(job.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(simulation_dict(sim), indent=1))
    (out / "job.toml").write_text(dump_toml(job))
    written = [out / RESULTS, out / "job.toml"]
    for schedule, path in traces.items():
        chrome_trace(iteration_events(layout, schedule), str(path))
        written.append(path)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def handle_reproduce(job: JobConfig, args: argparse.Namespace) -> int:
    """The paper's experiments, simulated (:func:`~fsmoe.sim.reproduce.reproduce`), into ``run.out``. They
    fix their own models and clusters (the paper's); of the job only ``run.out`` is used."""
    out = Path(job.run.out)
    try:
        _check_out(job, "report.md")
        result = reproduce(out, echo=print)
    except ValueError as e:
        return _error("reproduce", e)
    (out / "job.toml").write_text(dump_toml(job))
    print(result.summary())
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(result.plots)} plots")
    return 0


__all__ = ["RESULTS", "handle_reproduce", "handle_simulate", "layout_dict", "simulation_dict", "trace_paths"]
