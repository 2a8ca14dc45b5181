"""The measured check's pure parts: the model's ranking of a layer's options, which of them are timed,
and which one wins."""

from __future__ import annotations

import pytest

from fsmoe.perf.planner import LayerOption, layer_options, plan_layer
from fsmoe.perf.tune import pick_fastest, tune_candidates
from tests.perf.test_planner import COSTS, WORK, L, make_costs


def opt(r_fwd: int, r_bwd: int, gar_after: bool, s: float) -> LayerOption:
    return LayerOption(r_fwd=r_fwd, r_bwd=r_bwd, gar_after=gar_after, predicted_s=s)


@pytest.mark.parametrize("name", list(COSTS))
@pytest.mark.parametrize("after", [None, 1e-4, 5e-3])
def test_layer_options_rank_what_plan_layer_weighs(name: str, after: float | None) -> None:
    """Every pair once with the GAR inside (and once after, when offered), sorted by the modelled time;
    the first is plan_layer's choice without min_gain, at the same predicted time."""
    costs = COSTS[name]
    kw = {"t_gar": 2e-3, "t_gar_after": after, "t_gar_idle": after, "max_degree": 8}
    options = layer_options("fsmoe", WORK, costs, **kw)
    plan = plan_layer("fsmoe", WORK, costs, **kw)
    inside = [o.pair for o in options if not o.gar_after]
    assert len(inside) == len(set(inside)) == 16  # (1..8)² powers of two
    assert sorted(o.pair for o in options if o.gar_after) == (sorted(inside) if after is not None else [])
    assert [o.predicted_s for o in options] == sorted(o.predicted_s for o in options)
    first = options[0]
    assert (first.r_fwd, first.r_bwd, first.gar_after) == (plan.r_fwd, plan.r_bwd, plan.gar_after_s > 0)
    assert first.predicted_s == pytest.approx(plan.total_s, rel=1e-12)
    # a schedule without a GAR slot offers no GAR-after options
    assert not any(o.gar_after for o in layer_options("tutel", WORK, costs, **kw))


def test_layer_options_keep_each_options_own_time() -> None:
    """An option's predicted time is plan_layer's for that option: forcing the pair through min_gain
    (the plain option) gives the plain option's time."""
    balanced = make_costs(a2a=L(1e-5, 1e-8), ag=L(1e-5, 1e-9), exp=L(1e-5, 2e-10))
    options = layer_options("fsmoe", WORK, balanced, t_gar=1e-4, t_gar_after=1e-4)
    plain = plan_layer("fsmoe", WORK, balanced, t_gar=1e-4, t_gar_after=1e-4, min_gain=0.99)
    want = next(o for o in options if o.pair == (1, 1) and o.gar_after)
    assert want.predicted_s == pytest.approx(plain.total_s, rel=1e-12)


def test_tune_candidates_order() -> None:
    options = [opt(2, 4, False, 0.99), opt(2, 2, False, 1.0), opt(2, 2, True, 1.01), opt(1, 1, False, 1.02),
               opt(4, 2, True, 1.03), opt(1, 1, True, 1.04), opt(4, 4, True, 1.05), opt(4, 4, False, 1.06),
               opt(8, 8, False, 1.2)]
    plain = opt(1, 1, True, 1.04)  # the plan gave way to the plain option (min_gain)
    got = tune_candidates(plain, options, 3)
    # the plan first, its pair with the GAR inside, then the best option of the next two symmetric pairs
    # (2/4 and 4/2 are ranked higher, but a model that is wrong about r = 2 is wrong about them too)
    assert got == [plain, opt(1, 1, False, 1.02), opt(2, 2, False, 1.0), opt(4, 4, True, 1.05)]
    assert tune_candidates(options[0], options, 2) == [options[0], opt(2, 2, False, 1.0)]  # 2/4: no GAR choice
    assert tune_candidates(options[1], options, 1) == [options[1], options[2]]
    assert tune_candidates(options[-1], options, 1) == [options[-1]]  # no GAR choice offered for 8/8
    assert len({o.pair for o in tune_candidates(options[0], options, 10)}) == 5  # 2/4 and the four (r, r)
    with pytest.raises(ValueError, match="pairs must be >= 1, got 0"):
        tune_candidates(options[0], options, 0)


def test_pick_fastest_takes_the_smallest_median_and_the_models_order_on_ties() -> None:
    samples = {"a": [3.0, 1.0, 3.0], "b": [2.0, 2.0, 9.0], "c": [2.5, 2.5, 2.5]}
    assert pick_fastest(samples, ["a", "b", "c"]) == "b"  # medians 3, 2, 2.5: one fast sample does not win
    assert pick_fastest({"x": [1.0], "y": [1.0]}, ["y", "x"]) == "y"
    with pytest.raises(ValueError, match="no samples for z"):
        pick_fastest(samples, ["a", "z"])
