"""A naive per-token reference MoE, written independently of ``fsmoe.moe``'s tensor code.

Legend: T tokens, D model dim, H expert hidden, E experts, K top-k, C capacity, S SoftMoE slots.

Routing decisions are made with plain Python loops over Python floats (detached scores); the combine
weights stay torch scalars in the autograd graph, and every expert is applied to one token vector at a
time with plain vector ops, so outputs *and* gradients can be compared against the batched layer.
Only the configuration dataclass and the layer's parameter *values* are taken from the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.moe import MoEConfig, MoELayer

# --------------------------------------------------------------------------------------------------
# Parameters


def layer_params(layer: MoELayer, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Fresh leaf copies (``requires_grad``) of every parameter of ``layer``, keyed by the same dotted
    names as ``layer.named_parameters()``, so reference gradients line up with the layer's."""
    return {
        name: p.detach().to(dtype).clone().requires_grad_(True) for name, p in layer.named_parameters()
    }


# --------------------------------------------------------------------------------------------------
# Experts, one token vector at a time


def expert_apply(kind: str, params: dict[str, Tensor], e: int, x_D: Tensor) -> Tensor:
    """Expert e applied to one token: ffn gelu(x@W1+b1)@W2+b2; swiglu (silu(x@W1)*(x@W3))@W2."""
    w1 = params["experts.w1_eDH"][e]
    w2 = params["experts.w2_eHD"][e]
    if kind == "ffn":
        h_H = x_D @ w1 + params["experts.b1_eH"][e]
        h_H = 0.5 * h_H * (1.0 + torch.erf(h_H / math.sqrt(2.0)))  # exact GELU, written out
        return h_H @ w2 + params["experts.b2_eD"][e]
    if kind == "swiglu":
        a_H = x_D @ w1
        silu_H = a_H * torch.sigmoid(a_H)
        return (silu_H * (x_D @ params["experts.w3_eDH"][e])) @ w2
    raise AssertionError(f"reference has no expert kind {kind!r}")


# --------------------------------------------------------------------------------------------------
# Gates, one token at a time


def token_logits(gate: str, params: dict[str, Tensor], x_D: Tensor, num_experts: int) -> Tensor:
    """The gate's logits for one token (length E, or E·S for SoftMoE)."""
    if gate == "xmoe":
        q_R = x_D @ params["gate.proj.weight"].t()
        q_R = q_R / torch.sqrt((q_R * q_R).sum())
        temp = torch.exp(params["gate.log_temperature"])
        rows = []
        for e in range(num_experts):
            k_R = params["gate.expert_emb"][e]
            rows.append((q_R * k_R).sum() / torch.sqrt((k_R * k_R).sum()) / temp)
        return torch.stack(rows)
    w = params["gate.phi.weight"] if gate == "softmoe" else params["gate.wg.weight"]
    return torch.stack([(x_D * w[n]).sum() for n in range(w.shape[0])])


def token_scores(gate: str, logits_E: Tensor) -> Tensor:
    if gate == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits_E))
    m = logits_E.max()
    ex = torch.exp(logits_E - m)
    return ex / ex.sum()


# --------------------------------------------------------------------------------------------------
# Capacity and top-k routing with drops


def ref_capacity(cfg: MoEConfig, num_tokens: int, loads: list[int]) -> int:
    """C = ceil(k·f·T/E) clipped to [max(min_capacity, 1), T], or the busiest expert's load when f is
    None (at least max(min_capacity, 1)); then rounded up to a multiple of ``capacity_multiple``."""
    if cfg.capacity_factor is None:
        c = max(max(loads) if loads else 0, cfg.min_capacity, 1)
    else:
        c = math.ceil(cfg.top_k * cfg.capacity_factor * num_tokens / cfg.num_experts)
        c = max(c, cfg.min_capacity, 1)
        c = min(c, num_tokens)
    m = cfg.capacity_multiple
    while c % m:
        c += 1
    return c


def top_k_choices(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, largest first, ties to the lower index (plain loops)."""
    remaining = list(range(len(scores)))
    chosen = []
    for _ in range(k):
        best = remaining[0]
        for e in remaining[1:]:
            if scores[e] > scores[best]:
                best = e
        chosen.append(best)
        remaining.remove(best)
    return chosen


@dataclass
class RefRouting:
    """kept[t] = list of (expert, weight) of token t after dropping; slots[e] = tokens in slot order."""

    kept: list[list[tuple[int, Tensor]]]
    slots: list[list[int]]
    capacity: int
    num_dropped: int


def route_top_k(cfg: MoEConfig, scores_T: list[Tensor]) -> RefRouting:
    """Top-k routing of T tokens given each token's score vector (differentiable torch scalars)."""
    T, E, K = len(scores_T), cfg.num_experts, cfg.top_k
    floats = [[float(v) for v in s.detach()] for s in scores_T]
    choice = [top_k_choices(floats[t], K) for t in range(T)]
    loads = [sum(choice[t].count(e) for t in range(T)) for e in range(E)]
    C = ref_capacity(cfg, T, loads)

    # Every assignment (t, j): token t's j-th choice. The position order: j-major, then t.
    position = [(t, j) for j in range(K) for t in range(T)]
    slots: list[list[int]] = []
    kept_pairs: set[tuple[int, int]] = set()
    for e in range(E):
        mine = [(t, j) for (t, j) in position if choice[t][j] == e]
        if cfg.drop_policy == "probability":
            # Highest weight first; equal weights keep the position order (insertion sort, stable).
            ranked: list[tuple[int, int]] = []
            for a in mine:
                i = 0
                while i < len(ranked) and floats[ranked[i][0]][e] >= floats[a[0]][e]:
                    i += 1
                ranked.insert(i, a)
            mine = ranked
        else:
            assert cfg.drop_policy == "position", cfg.drop_policy
        winners = mine[:C]
        slots.append([t for (t, _) in winners])
        kept_pairs.update(winners)

    kept: list[list[tuple[int, Tensor]]] = []
    for t in range(T):
        mine = [(choice[t][j], scores_T[t][choice[t][j]]) for j in range(K) if (t, j) in kept_pairs]
        if cfg.renormalize and mine:
            total = sum(w for _, w in mine)
            mine = [(e, w / total) for e, w in mine]
        kept.append(mine)
    return RefRouting(kept, slots, C, T * K - len(kept_pairs))


def route_expert_choice(cfg: MoEConfig, scores_T: list[Tensor]) -> RefRouting:
    """Each expert picks its C highest-scoring tokens (ties to the lower token index)."""
    T, E = len(scores_T), cfg.num_experts
    floats = [[float(v) for v in s.detach()] for s in scores_T]
    C = ref_capacity(cfg, T, [])
    kept: list[list[tuple[int, Tensor]]] = [[] for _ in range(T)]
    slots = []
    for e in range(E):
        picked = top_k_choices([floats[t][e] for t in range(T)], min(C, T))
        slots.append(picked)
        for t in picked:
            kept[t].append((e, scores_T[t][e]))
    unpicked = sum(1 for t in range(T) if not kept[t])
    return RefRouting(kept, slots, C, unpicked)


# --------------------------------------------------------------------------------------------------
# The whole layer


@dataclass
class RefOutput:
    y_TD: Tensor
    routing: RefRouting | None  # None for SoftMoE
    logits_T: list[Tensor]


def reference_moe(cfg: MoEConfig, params: dict[str, Tensor], x_TD: Tensor) -> RefOutput:
    """y_t = Σ over token t's kept (expert, weight) of weight · expert_e(x_t); SoftMoE mixes densely."""
    T, E = x_TD.shape[0], cfg.num_experts
    logits = [token_logits(cfg.gate, params, x_TD[t], E) for t in range(T)]

    if cfg.gate == "softmoe":
        S = cfg.softmoe_slots
        N = E * S
        # Slot n (expert n // S) takes a softmax-over-tokens mix; token t a softmax-over-slots mix.
        col = [torch.stack([logits[t][n] for t in range(T)]) for n in range(N)]
        slot_out = []
        for n in range(N):
            d_T = token_scores("softmax", col[n])
            x_n = sum(d_T[t] * x_TD[t] for t in range(T))
            slot_out.append(expert_apply(cfg.expert, params, n // S, x_n))
        rows = []
        for t in range(T):
            c_N = token_scores("softmax", logits[t])
            rows.append(sum(c_N[n] * slot_out[n] for n in range(N)))
        return RefOutput(torch.stack(rows), None, logits)

    scores = [token_scores(cfg.gate, lg) for lg in logits]
    if cfg.gate == "expert_choice":
        routing = route_expert_choice(cfg, scores)
    else:
        routing = route_top_k(cfg, scores)
    rows = []
    for t in range(T):
        y_D = torch.zeros_like(x_TD[t])
        for e, w in routing.kept[t]:
            y_D = y_D + w * expert_apply(cfg.expert, params, e, x_TD[t])
        rows.append(y_D)
    return RefOutput(torch.stack(rows), routing, logits)


def slots_of(token_EC: Tensor, num_tokens: int) -> list[list[int]]:
    """The layer's slot form as lists of occupied token indices per expert (slot order kept)."""
    return [[int(t) for t in row if int(t) != num_tokens] for row in token_EC]


__all__ = [
    "RefOutput", "RefRouting", "expert_apply", "layer_params", "ref_capacity", "reference_moe",
    "route_expert_choice", "route_top_k", "slots_of", "token_logits", "token_scores", "top_k_choices",
]

