"""Hand-worked routing cases: explicit logits into ``gate.route(logits_TE)``, expected slots by hand.

Legend: T tokens, D model dim, E experts, K top-k, C capacity. In the slot form an empty slot holds
token index T with weight 0. Probabilities quoted in comments are softmax values of the logits row.
"""

from __future__ import annotations

import math

import pytest
import torch

from fsmoe.moe import EinsumOrder, IndexOrder, MoEConfig, Routing, build_gate, fit_capacity

D = 8


def gate_for(**kw):
    cfg = MoEConfig(d_hidden=16, **kw)
    return build_gate(cfg, D)


def route(logits, **kw) -> Routing:
    logits_TE = torch.tensor(logits, dtype=torch.float32)
    return gate_for(num_experts=logits_TE.shape[1], **kw).route(logits_TE)


def slots(r: Routing) -> list[list[int]]:
    T = r.num_tokens
    return [[int(t) for t in row if int(t) != T] for row in r.token_EC]


def weight_of(r: Routing, t: int, e: int) -> float:
    """Combine weight of token t at expert e (0 if not kept there)."""
    hits = (r.token_EC[e] == t).nonzero().flatten()
    assert len(hits) <= 1, "a token occupies at most one slot of an expert"
    return float(r.weight_EC[e, hits[0]]) if len(hits) else 0.0


def softmax(row: list[float]) -> list[float]:
    ex = [math.exp(v) for v in row]
    return [v / sum(ex) for v in ex]


def assert_empty_slots_are_empty(r: Routing) -> None:
    empty = r.token_EC == r.num_tokens
    assert torch.all(r.weight_EC[empty] == 0)


# --------------------------------------------------------------------------------------------------
# Ties


def test_equal_logits_go_to_lower_experts():
    # All logits equal: every token picks experts 0 and 1; experts 2 and 3 get nothing.
    r = route([[0.0] * 4] * 3, top_k=2, capacity_factor=None)
    assert r.capacity == 3
    assert slots(r) == [[0, 1, 2], [0, 1, 2], [], []]
    assert r.token_EC[2].tolist() == [3, 3, 3] and r.token_EC[3].tolist() == [3, 3, 3]
    assert r.weight_EC[2:].abs().sum() == 0
    torch.testing.assert_close(r.weight_EC[:2], torch.full((2, 3), 0.25))
    assert int(r.num_dropped) == 0 and r.num_assignments == 6


def test_partial_ties_break_to_lower_index_and_first_choices_fill_first():
    logits = [
        [1.0, 2.0, 2.0, 0.0],  # t0: 1 and 2 tie for first → first 1, second 2
        [2.0, 1.0, 1.0, 0.0],  # t1: first 0; 1 and 2 tie for second → 1
        [0.0, 0.0, 0.0, 1.0],  # t2: first 3; 0, 1, 2 tie for second → 0
    ]
    r = route(logits, top_k=2, capacity_factor=None)
    # Slots are filled first choices first (token order), then second choices.
    assert slots(r) == [[1, 2], [0, 1], [0], [2]]
    assert r.capacity == 2
    assert_empty_slots_are_empty(r)
    p0 = softmax(logits[0])
    assert weight_of(r, 0, 1) == pytest.approx(p0[1]) and weight_of(r, 0, 2) == pytest.approx(p0[2])


# --------------------------------------------------------------------------------------------------
# Every token to one expert, over capacity


# logits [a_t, 0] with a = 1, 3, 2, 5, 4, 0.5: every token prefers expert 0, whose weight grows with a_t.
ALL_TO_ZERO = [[a, 0.0] for a in (1.0, 3.0, 2.0, 5.0, 4.0, 0.5)]


@pytest.mark.parametrize(
    "policy,kept",
    [
        ("position", [0, 1]),  # the first two tokens in token order
        ("probability", [3, 4]),  # the two largest a_t (5 then 4), highest weight in the first slot
    ],
)
def test_all_tokens_to_one_expert_drop_policies(policy, kept):
    # k=1, E=2, T=6, f=0.5: C = ceil(1·0.5·6/2) = 2.
    r = route(ALL_TO_ZERO, top_k=1, capacity_factor=0.5, drop_policy=policy)
    assert r.capacity == 2
    assert slots(r) == [kept, []]
    assert r.token_EC[1].tolist() == [6, 6]  # expert 1 has zero tokens: empty slots, weight 0
    assert r.weight_EC[1].tolist() == [0.0, 0.0]
    assert int(r.num_dropped) == 4 and r.num_assignments == 6
    for t in kept:
        assert weight_of(r, t, 0) == pytest.approx(softmax(ALL_TO_ZERO[t])[0])


def test_all_tokens_to_one_expert_renormalized_weights_are_one():
    r = route(ALL_TO_ZERO, top_k=1, capacity_factor=0.5, renormalize=True)
    assert slots(r) == [[0, 1], []]
    assert r.weight_EC[0].tolist() == pytest.approx([1.0, 1.0])


# E=3, k=2, T=3, f=0.5: C = ceil(2·0.5·3/3) = 1.
CONTENDED = [
    [0.0, 3.0, 3.1],  # t0: p = .023 .464 .513 → first 2, second 1
    [0.0, 0.1, 0.05],  # t1: p = .317 .350 .333 → first 1, second 2
    [5.0, 0.0, 1.0],  # t2: p = .976 .007 .018 → first 0, second 2
]


@pytest.mark.parametrize(
    "policy,kept",
    [
        # expert 1 holds t1 (first choice, .350) and t0 (second choice, .464);
        # expert 2 holds t0 (first, .513), t1 (second, .333), t2 (second, .018).
        ("position", [[2], [1], [0]]),  # first choices win: e1 keeps t1
        ("probability", [[2], [0], [0]]),  # the heavier second choice of t0 wins e1; t1 loses both
    ],
)
def test_first_vs_second_choice_priority(policy, kept):
    r = route(CONTENDED, top_k=2, capacity_factor=0.5, drop_policy=policy)
    assert r.capacity == 1
    assert slots(r) == kept
    assert int(r.num_dropped) == 3 and r.num_assignments == 6


def test_probability_policy_breaks_weight_ties_by_position_order():
    # E=3, k=2, T=2, f=0.5: C = ceil(2·0.5·2/3) = 1. Expert 1 gets t0's second choice and t1's first
    # choice, both with weight exactly 0.5; the position order (first choices first) decides: t1.
    logits = [[0.0, 0.0, -1e9], [-1e9, 0.0, 0.0]]
    r = route(logits, top_k=2, capacity_factor=0.5, drop_policy="probability")
    assert r.capacity == 1
    assert slots(r) == [[0], [1], [1]]
    # Equal weights on one expert, all first choices: token order decides.
    r = route([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [1.0, 0.0]], top_k=1, capacity_factor=0.5,
              drop_policy="probability")
    assert slots(r) == [[1], []]


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_renormalize_after_dropping(policy):
    r = route(CONTENDED, top_k=2, capacity_factor=0.5, drop_policy=policy, renormalize=True)
    p = [softmax(row) for row in CONTENDED]
    if policy == "position":
        # Each token kept exactly one choice → weight 1.
        assert weight_of(r, 0, 2) == pytest.approx(1.0)
        assert weight_of(r, 1, 1) == pytest.approx(1.0)
        assert weight_of(r, 2, 0) == pytest.approx(1.0)
    else:
        # t0 kept both choices → p/(p1+p2); t1 kept nothing; t2 kept its first → 1.
        s = p[0][1] + p[0][2]
        assert weight_of(r, 0, 2) == pytest.approx(p[0][2] / s)
        assert weight_of(r, 0, 1) == pytest.approx(p[0][1] / s)
        assert weight_of(r, 2, 0) == pytest.approx(1.0)
        assert all(weight_of(r, 1, e) == 0.0 for e in range(3))
    assert torch.isfinite(r.weight_EC).all()


# --------------------------------------------------------------------------------------------------
# k = E


@pytest.mark.parametrize("capacity_factor", [1.0, None])
@pytest.mark.parametrize("renormalize", [False, True])
def test_k_equals_e_sends_every_token_everywhere(capacity_factor, renormalize):
    logits = [[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]]
    r = route(logits, top_k=3, capacity_factor=capacity_factor, renormalize=renormalize)
    # f=1: C = ceil(3·1·2/3) = 2; None: C = max load = 2.
    assert r.capacity == 2
    assert int(r.num_dropped) == 0
    for e in range(3):
        assert sorted(slots(r)[e]) == [0, 1]
    for t in range(2):
        p = softmax(logits[t])
        for e in range(3):  # all softmax mass kept, so renormalising changes nothing
            assert weight_of(r, t, e) == pytest.approx(p[e], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Expert choice

EC_LOGITS = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
# token scores (softmax over experts): expert 0: .5 .5 .731 .269; expert 1: .5 .5 .269 .731


@pytest.mark.parametrize(
    "capacity_factor,picks,unpicked",
    [
        (1.0, [[2, 0], [3, 0]], 1),  # C = ceil(1·1·4/2) = 2; t0 beats t1 on the tie; t1 left out
        (0.5, [[2], [3]], 2),  # C = 1
    ],
)
def test_expert_choice_picks(capacity_factor, picks, unpicked):
    r = route(EC_LOGITS, gate="expert_choice", top_k=1, capacity_factor=capacity_factor)
    assert slots(r) == picks
    assert int(r.num_dropped) == unpicked and r.num_assignments == 4
    sig1 = 1 / (1 + math.exp(-1))
    assert weight_of(r, 2, 0) == pytest.approx(sig1)
    assert weight_of(r, 3, 1) == pytest.approx(sig1)
    if capacity_factor == 1.0:
        assert weight_of(r, 0, 0) == pytest.approx(0.5) and weight_of(r, 0, 1) == pytest.approx(0.5)


def test_expert_choice_capacity_multiple_beyond_t_leaves_empty_slots():
    # T=3, E=2, f=1: C = ceil(1.5) = 2, rounded up to 4 > T: each expert takes all 3, 1 slot empty.
    r = route([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]], gate="expert_choice", top_k=1, capacity_factor=1.0,
              capacity_multiple=4)
    assert r.capacity == 4
    assert slots(r) == [[2, 0, 1], [1, 0, 2]]
    assert r.token_EC[:, 3].tolist() == [3, 3]
    assert_empty_slots_are_empty(r)
    assert int(r.num_dropped) == 0


# --------------------------------------------------------------------------------------------------
# Capacity arithmetic

ONE_HOT_6 = [[2.0, 0.0, 0.0, 0.0]] * 6  # six tokens, all to expert 0


@pytest.mark.parametrize(
    "kw,capacity,kept",
    [
        (dict(capacity_factor=1.0), 2, 2),  # ceil(1·1·6/4) = 2
        (dict(capacity_factor=1.0, capacity_multiple=4), 4, 4),  # 2 → 4
        (dict(capacity_factor=1.0, capacity_multiple=3), 3, 3),  # 2 → 3
        (dict(capacity_factor=0.25, min_capacity=3), 3, 3),  # ceil(.375) = 1, raised to 3
        (dict(capacity_factor=0.25), 1, 1),  # at least 1
        (dict(capacity_factor=None), 6, 6),  # the busiest expert's load
        (dict(capacity_factor=None, capacity_multiple=4), 8, 6),  # 6 → 8, two slots stay empty
        (dict(capacity_factor=8.0), 6, 6),  # ceil(12) clipped to T = 6
        (dict(capacity_factor=8.0, capacity_multiple=4), 8, 6),  # clipped to 6, then rounded to 8
    ],
)
def test_capacity_rounding_and_clipping(kw, capacity, kept):
    r = route(ONE_HOT_6, top_k=1, **kw)
    assert r.capacity == capacity
    assert r.token_EC.shape == (4, capacity)
    assert slots(r)[0] == list(range(kept))  # position policy: token order
    assert slots(r)[1:] == [[], [], []]
    assert int(r.num_dropped) == 6 - kept
    assert_empty_slots_are_empty(r)


@pytest.mark.parametrize(
    "capacity,kw,fitted",
    [
        (5, dict(), 5),
        (0, dict(), 1),  # never below one slot
        (1, dict(minimum=3), 3),
        (9, dict(maximum=6), 6),
        (9, dict(maximum=0), 1),  # an empty group still gets one slot
        (6, dict(maximum=6, multiple=4), 8),  # clamped, then rounded past the maximum
        (7, dict(multiple=7), 7),
        (5, dict(multiple=2), 6),  # what a pipeline of lcm(r_fwd, r_bwd) = 2 asks of the layer
    ],
)
def test_fit_capacity_clamps_then_rounds(capacity, kw, fitted):
    assert fit_capacity(capacity, **kw) == fitted


# --------------------------------------------------------------------------------------------------
# Orders on these routings: einsum == index == the hand definition

CASES = [
    (ALL_TO_ZERO, dict(top_k=1, capacity_factor=0.5)),
    (ALL_TO_ZERO, dict(top_k=1, capacity_factor=0.5, drop_policy="probability")),
    (CONTENDED, dict(top_k=2, capacity_factor=0.5)),
    (CONTENDED, dict(top_k=2, capacity_factor=0.5, drop_policy="probability", renormalize=True)),
    ([[0.0] * 4] * 3, dict(top_k=2, capacity_factor=None)),
    (ONE_HOT_6, dict(top_k=1, capacity_factor=None, capacity_multiple=4)),
    (EC_LOGITS, dict(gate="expert_choice", top_k=1, capacity_factor=1.0)),
    (EC_LOGITS[:3], dict(gate="expert_choice", top_k=1, capacity_factor=1.0, capacity_multiple=4)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_einsum_and_index_orders_agree_with_hand_definition(case):
    logits, kw = CASES[case]
    r = route(logits, **kw)
    T = r.num_tokens
    E, C = r.token_EC.shape
    g = torch.Generator().manual_seed(case)
    x_TD = torch.randn(T, D, generator=g)
    y_ECD = torch.randn(E, C, D, generator=g)

    want_x = torch.zeros(E, C, D)
    want_y = torch.zeros(T, D)
    for e in range(E):
        for c in range(C):
            t = int(r.token_EC[e, c])
            if t < T:
                want_x[e, c] = x_TD[t]
                want_y[t] += float(r.weight_EC[e, c]) * y_ECD[e, c]

    for order in (EinsumOrder(), IndexOrder()):
        torch.testing.assert_close(order.order(x_TD, r), want_x, rtol=0, atol=0, msg=order.name)
        torch.testing.assert_close(order.iorder(y_ECD, r), want_y, rtol=1e-6, atol=1e-6, msg=order.name)


@pytest.mark.parametrize("f,T,E,capacity", [(1.1, 100, 2, 55), (1.1, 200, 2, 110), (0.7, 10, 7, 1)])
def test_capacity_of_decimal_factors_is_exact(f, T, E, capacity):
    # k·f·T/E is an integer here (1.1·100/2 = 55), so C = ceil(...) must be exactly that integer,
    # not one more because 1.1·100 is 110.00000000000001 in binary floating point.
    r = route([[0.0] * E] * T, top_k=1, capacity_factor=f)
    assert r.capacity == capacity
