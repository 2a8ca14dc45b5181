"""The measured check: time the few plans the model ranks first on the ranks, keep the fastest.

The α-β model ranks a layer's options (:func:`fsmoe.perf.planner.layer_options`) from its profile, and
its errors there are not random: on the emulated cluster of this machine it over-predicted every
pipelined row of some configurations by 15-30% (the AlltoAll's slowdown beside compute, one factor per
profile), so in one configuration of 14 (T = 1024) it kept r = 1 where r = 2 measured 1.14× faster in
three runs, with r = 2 ranked eighth. Such an error moves all the pairs of one degree together, so the
model's next-best options (mostly the same degree in other mixes) do not escape it; other degrees do.
So the planner's pick is checked against the other degrees: its own option, its degrees with the GAR in
the other place, and the model's best option at each of the next symmetric degrees (r, r), each run a few
interleaved rounds on the job's real groups; the fastest median wins (ties: the model's order). Replayed
over the saved rows of a 40-round planner-accuracy run (the check on 8 rounds, the pick timed on the
other 32), this put the planner within 5% of the best row in 14 of 14 configurations, against 12 of 14
(held-out) for the model alone in that run.

Pure here: which options to time (:func:`tune_candidates`) and which one won (:func:`pick_fastest`).
The layer benchmark times a layer's options (:func:`fsmoe.bench.layer.tune_auto`); training times whole
steps, the job plan against the other plans the planner weighed for it (``JobPlan.alternatives``: its
partition, the plain plan, the trainer's default plan at each common degree; other degrees first;
:func:`fsmoe.train.trainer.check_plan`).
``plan.tune`` sets how many candidates (degree pairs for a layer, plans for a job), ``plan.tune_rounds``
how many rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from fsmoe.perf.planner import LayerOption


def tune_candidates(chosen: LayerOption, options: Sequence[LayerOption], pairs: int) -> list[LayerOption]:
    """What to time, in this order: the plan's own ``chosen`` option; its degrees with the GAR in the
    other place (when ``options``, fastest modelled first, offer both); then, fastest modelled first,
    the best option of each symmetric pair (r, r) other than the chosen one, until ``pairs`` distinct
    pairs (module doc: the model's errors move a degree's pairs together). ``pairs`` = 1 with no GAR
    choice: the plan alone (nothing to time)."""
    if pairs < 1:
        raise ValueError(f"tune_candidates: pairs must be >= 1, got {pairs}")
    out = [chosen]
    other = next((o for o in options if o.pair == chosen.pair and o.gar_after != chosen.gar_after), None)
    if other is not None:
        out.append(other)
    seen = {chosen.pair}
    for o in options:
        if len(seen) >= pairs:
            break
        if o.r_fwd == o.r_bwd and o.pair not in seen:
            seen.add(o.pair)
            out.append(o)
    return out


def pick_fastest(samples_s: Mapping[str, Sequence[float]], order: Sequence[str]) -> str:
    """The name in ``order`` whose ``samples_s`` have the smallest median; ties go to the earlier one
    (the model's order)."""
    missing = [n for n in order if not samples_s.get(n)]
    if not order or missing:
        raise ValueError(f"pick_fastest: no samples for {', '.join(missing) or 'any candidate'}")
    return min(order, key=lambda n: (statistics.median(samples_s[n]), order.index(n)))


__all__ = ["pick_fastest", "tune_candidates"]
