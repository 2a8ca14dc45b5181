"""The measured check: time the few plans the model ranks first on the ranks, keep the fastest.

The α-β model ranks a layer's options (:func:`fsmoe.perf.planner.layer_options`) well enough to put the
fastest among its first few, but not always first: on the emulated cluster of this machine its median
error is 6-8%, and in one configuration of 14 (T = 1024) it kept r = 1 where r = 2 measured 1.14×
faster in three runs. Between options a few percent apart, the model's error decides. So the planner's
pick is checked: the degree pairs the model ranks first are run a few interleaved rounds each on the
job's real groups, and the fastest median wins (ties: the model's order).

Pure here: which options to time (:func:`tune_candidates`) and which one won (:func:`pick_fastest`).
The layer benchmark times them (:func:`fsmoe.bench.layer.tune_auto`); ``plan.tune`` sets how many
degree pairs, ``plan.tune_rounds`` how many rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from fsmoe.perf.planner import LayerOption


def tune_candidates(chosen: LayerOption, options: Sequence[LayerOption], pairs: int) -> list[LayerOption]:
    """What to time, in this order: the plan's own ``chosen`` option; its degrees with the GAR in the
    other place (when ``options``, fastest modelled first, offer both); then the fastest option of
    each next degree pair, until ``pairs`` distinct pairs. ``pairs`` = 1 with no GAR choice: the plan
    alone (nothing to time)."""
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
        if o.pair not in seen:
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
