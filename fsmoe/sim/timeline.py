"""The simulated timeline of one training iteration, as trace events in the runtime's format.

:func:`iteration_events` lays out what :func:`fsmoe.sim.simulator.simulate` composes, task by task, on the
runtime's channels (``compute``, ``intra``, ``inter``; :class:`~fsmoe.schedule.runtime.TraceEvent`), so
:func:`~fsmoe.schedule.runtime.chrome_trace` writes a file that opens in Perfetto beside a measured trace
of ``fsmoe train --trace``. MoE tasks carry the runtime's names (``dispatch[0]``, ``expert_bwd[1]``, ...)
with the block index in front (``b3 dispatch[0]``); the dense part is drawn as the simulator sums it:

* forward, per block: attention (compute), the MP ReduceScatter (intra), gate + Order (compute), the MoE
  block's forward tasks, the MP AllGather (intra) — digest §3.3;
* backward, from the last block: the MoE block's backward tasks (with the schedule's GAR slice of the
  gradient of the block above, ``gar`` on the inter channel, where the schedule has one), gate + I-Order
  backward, the MP collectives' backward and the attention backward; the rest of that gradient on the
  inter channel from the start of the dense backward (``tutel_improved``, ``fsmoe``), or after it
  (``sequential``, ``tutel``); the next block's backward starts when both are done;
* after the first block's backward, its own gradient's all-reduce (exposed under every schedule).

Durations are the simulator's (contended where the costs have busy lines). On clusters with idle lines
only (the paper's presets) the last event ends exactly at the simulated iteration time (tested); with busy
lines the iteration prices a GAR slice by its two-ended response (``max(A, B + t)``) while the timeline
plays it, so they can differ slightly (0.5% seen on Testbed-A with busy lines 1.6× the idle ones).
"""

from __future__ import annotations

import math

import numpy as np

from fsmoe.config import ScheduleSpec, get_schedule
from fsmoe.perf.costs import Costs
from fsmoe.perf.model import pass_tasks
from fsmoe.schedule.runtime import TraceEvent
from fsmoe.schedule.schedules import lanes_for
from fsmoe.sim.engine import (
    LayerBatch,
    chunk_durations,
    contended_durations,
    dense_times,
    gar_time,
    layer_tables,
    play_spans,
    schedule_layer,
)
from fsmoe.sim.presets import Layout


class _Track:
    """Events on a running clock of one rank."""

    def __init__(self, rank: int) -> None:
        self.events: list[TraceEvent] = []
        self.rank = rank

    def add(self, name: str, channel: str, start: float, length: float) -> float:
        if length > 0:
            self.events.append(TraceEvent(name=name, channel=channel, start_s=start, end_s=start + length,
                                          rank=self.rank))
        return start + length


def _block(track: _Track, block: int, layer: LayerBatch, costs: Costs, spec: ScheduleSpec, r: int, pad: int, *,
           backward: bool, start: float, t_gar: float = 0.0) -> float:
    """Draw one pass of block ``block`` (the one-row ``layer``) from ``start``; returns its end."""
    tasks = pass_tasks(spec, r, backward=backward, with_gar=backward and spec.gar_in_moe and t_gar > 0)
    lanes = lanes_for(spec)
    op_s = chunk_durations(layer, costs, r, pad)
    busy_s = chunk_durations(layer, costs, r, pad, busy=True) if costs.busy else None
    spans = play_spans(tasks, lanes, contended_durations(tasks, lanes, op_s, np.array([t_gar]), busy_s))
    end = start
    for t in tasks:
        s, e = (float(np.max(x)) for x in spans[t.key])  # one row (a 0-d start for the first task)
        track.add(f"b{block} {t.kind}[{t.chunk}]", t.channel, start + s, e - s)
        end = max(end, start + e)
    return end


def iteration_events(layout: Layout, schedule: str, *, rank: int = 0) -> list[TraceEvent]:
    """The simulated iteration of ``layout`` under ``schedule`` as trace events (module docstring)."""
    spec = get_schedule(schedule)
    costs = layout.cluster.costs
    one = LayerBatch.of_layout(layout)
    n = float(one.grad_bytes[0])
    batch = one.with_grad(np.array([n, 0.0]))  # row 0: hides the gradient above; row 1: the last block
    dense = dense_times(batch, costs)
    tables = layer_tables(spec, batch, costs)
    res = schedule_layer(spec, tables, dense, batch.grad_bytes, costs)
    S, D = float(batch.seq_tokens[0]), float(batch.d_model[0])
    n_mp = S * D * 4 if batch.mp > 1 else 0.0
    mp_ag = costs.op("ag")(n_mp) if n_mp else 0.0
    mp_rs = costs.op("rs")(n_mp) if n_mp else 0.0
    L = layout.model.n_layers
    rows = [LayerBatch(**{k: (v[j:j + 1] if isinstance(v, np.ndarray) else v) for k, v in batch.__dict__.items()})
            for j in range(2)]
    track = _Track(rank)
    t = 0.0
    for i in range(L):  # forward
        row = 0 if i < L - 1 else 1
        rf, rb = res.pairs[int(res.pair[row])]
        t = track.add(f"b{i} attention", "compute", t, float(dense.attn_fwd[row]))
        t = track.add(f"b{i} mp reduce_scatter", "intra", t, mp_rs)
        t = track.add(f"b{i} gate+order", "compute", t, float(dense.gate_fwd[row]))
        t = _block(track, i, rows[row], costs, spec, rf, math.lcm(rf, rb), backward=False, start=t)
        t = track.add(f"b{i} mp all_gather", "intra", t, mp_ag)
    for i in reversed(range(L)):  # backward, the last block first
        row = 0 if i < L - 1 else 1
        rf, rb = res.pairs[int(res.pair[row])]
        t_in = float(res.gar_moe_s[row])
        t = _block(track, i, rows[row], costs, spec, rb, math.lcm(rf, rb), backward=True, start=t,
                   t_gar=t_in)
        dense_start = t
        t = track.add(f"b{i} gate+i-order bwd", "compute", t, float(dense.gate_bwd[row]))
        t = track.add(f"b{i} mp all_gather bwd", "intra", t, mp_ag)
        t = track.add(f"b{i} attention bwd", "compute", t, float(dense.attn_bwd[row]))
        t = track.add(f"b{i} mp reduce_scatter bwd", "intra", t, mp_rs)
        beside = float(res.gar_dense_s[row])
        if beside > 0:
            t = max(t, track.add(f"gar b{i + 1}", "inter", dense_start, beside))
        elif res.gar_exposed_s[row] > 0:
            t = track.add(f"gar b{i + 1}", "inter", t, float(res.gar_exposed_s[row]))
    track.add("gar b0", "inter", t, float(gar_time(costs.op("gar"), np.array([n]))[0]))
    return track.events


__all__ = ["iteration_events"]
