"""Gates: token → expert routing, each returning one frozen :class:`Routing`.

Legend: T tokens (one routing group), D model dim (the paper's M), E experts, K top-k,
C capacity slots per expert, S SoftMoE slots per expert.

Every gate describes its assignments in the *slot form* ``token_EC`` / ``weight_EC``: for each expert
e and capacity slot c, the token that sits there (``T`` marks an empty slot) and its combine weight
(0 for an empty slot). The slot form serves top-k gates (token-choice) and expert-choice alike, and it
is exactly the (E, C, D) layout that Order builds and Dispatch ships. SoftMoE is the one exception:
its slots are dense mixes of all tokens, carried in :class:`SoftAssignment`.

Gates are pure tensor → tensor except where a data-dependent size is unavoidable
(``capacity_factor=None``), which lives in the named method :meth:`TopKGate.max_load`.

The router always computes in fp32 (or float64 for a float64 layer): :meth:`Gate.forward` turns autocast
off and promotes the input and the router weights, so logits, softmax, top-k, the combine weights and the
aux loss are fp32 under ``--dtype bf16`` (autocast) and in a layer converted to bf16 alike; a bf16
router would flip near-tied top-k choices and lose the balance loss's small gradients.

This module owns the gates, the :class:`Routing` record and the capacity arithmetic: every C is clamped
and rounded by :func:`fit_capacity` (the gates' C here, the layer's agreed and padded C in ``layer``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import GATE_NAMES, MoEConfig, round_up


@dataclass(frozen=True)
class SoftAssignment:
    """SoftMoE's dense routing: slot (e, s) = Σ_t dispatch_TES[t, e, s] · x_t (softmax over t);
    token t's output = Σ_{e,s} combine_TES[t, e, s] · y_es (softmax over (e, s))."""

    dispatch_TES: Tensor
    combine_TES: Tensor


@dataclass(kw_only=True, frozen=True)
class Routing:
    """What a gate decided for one routing group of ``num_tokens`` tokens.

    ``aux_loss`` is already weighted by the config's coefficients and is differentiable;
    ``num_dropped`` counts requested assignments that found no capacity slot (for expert-choice:
    tokens that no expert picked) out of ``num_assignments``. ``slots_per_token`` is the most slots one
    token can hold, known from the gate alone (K for top-k gates; None when unbounded: expert-choice,
    SoftMoE); orders use it to pick a cheaper path (a top-1 token holds at most one slot).
    """

    logits_TE: Tensor
    token_EC: Tensor
    weight_EC: Tensor
    capacity: int
    num_tokens: int
    aux_loss: Tensor
    num_dropped: Tensor
    num_assignments: int
    slots_per_token: int | None = None
    soft: SoftAssignment | None = None

    @property
    def num_experts(self) -> int:
        return self.token_EC.shape[0]


def fit_capacity(capacity: int, *, minimum: int = 0, maximum: int | None = None, multiple: int = 1) -> int:
    """The one place C is clamped and rounded: ``capacity`` raised to ``minimum`` (and to 1), lowered to
    ``maximum`` if given, then rounded up to a multiple of ``multiple``. The rounding may pass
    ``maximum``; the extra slots stay empty (no token, weight 0), so no output changes."""
    c = max(capacity, minimum, 1)
    if maximum is not None:
        c = min(c, max(maximum, 1))
    return round_up(c, multiple)


def capacity_for(num_tokens: int, num_experts: int, top_k: int, cfg: MoEConfig) -> int:
    """C = ceil(k·f·T/E) (paper §2.1), at least ``min_capacity``, at most T (a top-k token picks an
    expert at most once), rounded up to a multiple of ``capacity_multiple``."""
    assert cfg.capacity_factor is not None
    return _capacity(num_tokens, num_experts, top_k, cfg.capacity_factor, cfg.min_capacity, cfg.capacity_multiple)


@functools.lru_cache(maxsize=256)
def _capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, minimum: int, multiple: int) -> int:
    """:func:`capacity_for` of plain numbers, cached: every forward of a layer asks for the same few sizes,
    and the exact arithmetic costs more than the small gates' tensor work."""
    # Exact decimal arithmetic: in floats 1.1 * 100 / 2 rounds up to 56 instead of 55.
    c = math.ceil(top_k * Fraction(str(factor)) * num_tokens / num_experts)
    return fit_capacity(c, minimum=minimum, maximum=num_tokens, multiple=multiple)


def expert_counts(expert_N: Tensor, num_experts: int) -> Tensor:
    """How many of the N entries of ``expert_N`` name each expert, (E,) int64. A scatter-add of ones, not
    ``bincount``, which on CUDA syncs to size its output."""
    return torch.zeros(num_experts, dtype=torch.long, device=expert_N.device).scatter_add_(
        0, expert_N, torch.ones_like(expert_N)
    )


def assign_slots(
    expert_TK: Tensor, weight_TK: Tensor, num_experts: int, capacity: int, policy: str, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Place the T·K (token, choice) assignments into each expert's C slots.

    Priority decides who gets a slot when an expert is over capacity:
    ``position`` (GShard): all first choices before all second choices, each in token order;
    ``probability``: each expert keeps its highest-weight assignments (ties: the position order).
    Slots are filled in priority order. Returns ``token_EC`` (T = empty), ``weight_EC`` and the number
    of dropped assignments. With ``renormalize`` each token's kept weights are divided by their sum
    (after dropping), as DeepSpeed's top-2 gate does.
    """
    T, K = expert_TK.shape
    E, C = num_experts, capacity
    device = expert_TK.device
    flat_e = expert_TK.t().reshape(-1)  # choice-major (i = k·T + t): the position priority
    if policy == "position":
        e_sorted, order = torch.sort(flat_e, stable=True)  # group by expert, keep priority
    elif policy == "probability":
        prio = torch.sort(weight_TK.detach().t().reshape(-1), descending=True, stable=True).indices
        e_sorted, by_expert = torch.sort(flat_e[prio], stable=True)
        order = prio[by_expert]
    else:
        raise ValueError(f"unknown drop policy {policy!r}; choose one of position, probability")
    starts_E = torch.searchsorted(e_sorted, torch.arange(E, device=device))  # where each expert's group starts
    slot = torch.arange(T * K, device=device) - starts_E[e_sorted]
    drop = slot >= C

    flat_w = weight_TK.t().reshape(-1)
    if renormalize:
        keep_flat = torch.zeros(T * K, dtype=torch.bool, device=device)
        keep_flat[order] = ~drop
        kept_w_TK = (flat_w * keep_flat).view(K, T).t()
        denom_T = kept_w_TK.sum(-1).clamp(min=torch.finfo(flat_w.dtype).eps)
        flat_w = flat_w / denom_T.repeat(K)

    # Dropped assignments write one scratch slot (E·C), cut off below: no boolean indexing, so no sync.
    pos = torch.where(drop, E * C, e_sorted * C + slot)
    token = order if K == 1 else order % T  # assignment i = k·T + t is token t
    token_EC = torch.full((E * C + 1,), T, dtype=torch.long, device=device).index_put_((pos,), token)
    weight_EC = flat_w.new_zeros(E * C + 1).index_put((pos,), flat_w[order])
    return token_EC[: E * C].view(E, C), weight_EC[: E * C].view(E, C), drop.sum()


def top_k_lowest_index(scores_TE: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row, ties to the lower index (deterministic, unlike
    ``topk``). k passes of ``argmax`` (which returns the first maximum): at small k this is several
    times faster than a full stable sort over E."""
    if k == scores_TE.shape[1]:
        return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices
    if k == 1:  # one pass needs no working copy
        return scores_TE.argmax(dim=-1, keepdim=True)
    work = scores_TE.clone()
    picks = []
    for _ in range(k):
        idx_T1 = work.argmax(dim=-1, keepdim=True)
        picks.append(idx_T1)
        work.scatter_(1, idx_T1, float("-inf"))
    return torch.cat(picks, dim=1)


def balance_loss(probs_TE: Tensor, first_T: Tensor) -> Tensor:
    """GShard/Switch load-balancing loss E · Σ_e mean_t(p_te) · frac_e, where frac_e is the share of
    tokens whose first choice ``first_T`` is e (Lepikhin et al. 2020; Fedus et al. 2021). Equals 1 when
    balanced."""
    T, E = probs_TE.shape
    frac_E = expert_counts(first_T, E).to(probs_TE.dtype) / T
    return E * (probs_TE.mean(0) * frac_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(logits)²) (Zoph et al. 2022, ST-MoE), in the logits' dtype (fp32 or
    float64: :meth:`Gate.forward` promotes them)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def zero_loss(logits_TE: Tensor) -> Tensor:
    """The value of a loss term whose coefficient is 0: the term is skipped, since 0 · loss is NaN when
    one token's logits are not finite. The zero stays on the autograd graph (a sum over an empty slice,
    which reads no value) because callers backpropagate ``aux_loss`` whatever the coefficients."""
    return logits_TE[:0].sum()


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the router computes in for an input of ``dtype``: at least fp32 (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def project(x_TD: Tensor, weight_OD: Tensor) -> Tensor:
    """x_TD · weight_ODᵀ in x_TD's dtype (the router's): the weight is promoted when the layer holds it in a
    narrower dtype; a no-op cast for the usual fp32 master weights."""
    return F.linear(x_TD, weight_OD.to(x_TD.dtype))


class Gate(nn.Module):
    """Base of all gates: ``forward(x_TD) = route(logits(x_TD))`` in the router dtype (see the module doc);
    subclasses override one method."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.wg = nn.Linear(d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)

    def forward(self, x_TD: Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):  # the router stays fp32 under --dtype bf16
            return self.route(self.logits(x_TD.to(router_dtype(x_TD.dtype))))

    def logits(self, x_TD: Tensor) -> Tensor:
        return project(x_TD, self.wg.weight)

    @property
    def static_capacity(self) -> bool:
        """Whether C is a function of the group's size T and the config alone, never of the routing data;
        then ranks with equal T have equal C without exchanging it. False unless a gate says so."""
        return False

    def route(self, logits_TE: Tensor) -> Routing:
        raise NotImplementedError

    def _zloss(self, logits_TE: Tensor) -> Tensor:
        if self.cfg.z_loss_coef == 0:
            return zero_loss(logits_TE)
        return self.cfg.z_loss_coef * z_loss(logits_TE)


class TopKGate(Gate):
    """GShard top-k softmax gate (any k ≥ 1), optionally noisy:
    H(x) = x·W_g + N(0,1)·softplus(x·W_noise) in training; weights = softmax over all E experts,
    taken at the top-k (optionally renormalised over the kept choices); GShard balance loss."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        self.w_noise = nn.Linear(d_model, cfg.num_experts, bias=False) if cfg.noisy else None
        if self.w_noise is not None:
            nn.init.zeros_(self.w_noise.weight)

    def logits(self, x_TD: Tensor) -> Tensor:
        logits_TE = project(x_TD, self.wg.weight)
        if self.w_noise is not None and self.training:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(project(x_TD, self.w_noise.weight))
        return logits_TE

    def scores(self, logits_TE: Tensor) -> Tensor:
        """Per-token expert scores whose top-k are the combine weights."""
        return torch.softmax(logits_TE, dim=-1)

    def aux(self, logits_TE: Tensor, scores_TE: Tensor, expert_TK: Tensor) -> Tensor:
        """The balance loss over the softmax probabilities: here the scores themselves (computed once)."""
        return balance_loss(scores_TE, expert_TK[:, 0])

    @property
    def static_capacity(self) -> bool:
        """C = ceil(k·f·T/E) with a capacity factor; with none, C is the busiest expert's load."""
        return self.cfg.capacity_factor is not None

    def max_load(self, expert_TK: Tensor) -> int:
        # Syncs (a .item()): with no capacity limit C is the busiest expert's load, a data-dependent size.
        return int(torch.bincount(expert_TK.reshape(-1), minlength=self.num_experts).max().item())

    def route(self, logits_TE: Tensor) -> Routing:
        T, E, K = logits_TE.shape[0], self.num_experts, self.top_k
        scores_TE = self.scores(logits_TE)
        expert_TK = top_k_lowest_index(scores_TE.detach(), K)
        weight_TK = scores_TE.gather(1, expert_TK)
        if self.cfg.capacity_factor is None:
            capacity = fit_capacity(
                self.max_load(expert_TK), minimum=self.cfg.min_capacity, multiple=self.cfg.capacity_multiple
            )
        else:
            capacity = capacity_for(T, E, K, self.cfg)
        token_EC, weight_EC, dropped = assign_slots(
            expert_TK, weight_TK, E, capacity, self.cfg.drop_policy, self.cfg.renormalize
        )
        coef = self.cfg.aux_loss_coef
        balance = zero_loss(logits_TE) if coef == 0 else coef * self.aux(logits_TE, scores_TE, expert_TK)
        aux = balance if self.cfg.z_loss_coef == 0 else balance + self._zloss(logits_TE)
        return Routing(
            logits_TE=logits_TE, token_EC=token_EC, weight_EC=weight_EC, capacity=capacity, num_tokens=T,
            aux_loss=aux, num_dropped=dropped, num_assignments=T * K, slots_per_token=K,
        )


class SwitchGate(TopKGate):
    """Switch Transformer top-1 gate (Fedus et al.): the balance loss with the top-1 assignment."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        if cfg.top_k != 1:
            raise ValueError(f"the switch gate is top-1, got top_k={cfg.top_k}")
        super().__init__(cfg, d_model)


class SigmoidGate(TopKGate):
    """BASE/StableMoE-style gate: scores σ(x·W_g), top-k by score, outputs scaled by σ."""

    def scores(self, logits_TE: Tensor) -> Tensor:
        return torch.sigmoid(logits_TE)

    def aux(self, logits_TE: Tensor, scores_TE: Tensor, expert_TK: Tensor) -> Tensor:
        """The balance loss over the softmax probabilities (the scores are sigmoids, not a distribution)."""
        return balance_loss(torch.softmax(logits_TE, dim=-1), expert_TK[:, 0])


class XMoEGate(TopKGate):
    """X-MoE gate (Chi et al. 2022): cosine similarity between the L2-normalised low-rank projection of
    the token and L2-normalised expert embeddings, divided by a learnable temperature; then top-k."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        del self.wg
        self.proj = nn.Linear(d_model, cfg.xmoe_dim, bias=False)
        self.expert_emb = nn.Parameter(torch.empty(cfg.num_experts, cfg.xmoe_dim))
        nn.init.orthogonal_(self.expert_emb, gain=0.32)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))

    def logits(self, x_TD: Tensor) -> Tensor:
        q_TR = F.normalize(project(x_TD, self.proj.weight), dim=-1)
        k_ER = F.normalize(self.expert_emb.to(x_TD.dtype), dim=-1)
        return q_TR @ k_ER.t() / self.log_temperature.to(x_TD.dtype).exp()


class ExpertChoiceGate(Gate):
    """Expert-choice routing (Zhou et al. 2022): token scores softmax over experts; each expert then
    picks its top-C tokens, C = ceil(k·f·T/E), so a token gets 0..E experts. Nothing is dropped by
    capacity; ``num_dropped`` counts tokens that no expert picked (out of T)."""

    @property
    def static_capacity(self) -> bool:
        return True  # C = ceil(k·f·T/E): a capacity factor is required

    def route(self, logits_TE: Tensor) -> Routing:
        T, E = logits_TE.shape
        scores_TE = torch.softmax(logits_TE, dim=-1)
        capacity = capacity_for(T, E, self.top_k, self.cfg)
        take = min(capacity, T)
        top = torch.sort(scores_TE.t(), dim=-1, descending=True, stable=True)
        token_EC = torch.full((E, capacity), T, dtype=torch.long, device=logits_TE.device)
        token_EC[:, :take] = top.indices[:, :take]
        weight_EC = F.pad(top.values[:, :take], (0, capacity - take))
        picked_T = torch.zeros(T + 1, dtype=torch.bool, device=logits_TE.device)
        picked_T[token_EC.reshape(-1)] = True
        unpicked = (~picked_T[:T]).sum()
        return Routing(
            logits_TE=logits_TE, token_EC=token_EC, weight_EC=weight_EC, capacity=capacity, num_tokens=T,
            aux_loss=self._zloss(logits_TE), num_dropped=unpicked, num_assignments=T,
        )


class SoftMoEGate(Gate):
    """SoftMoE (Puigcerver et al. 2023): E·S slots, each a softmax-over-tokens mix of all tokens; each
    token's output a softmax-over-slots mix of the slot outputs. Nothing is dropped, no balance loss."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        self.slots = cfg.softmoe_slots
        del self.wg
        self.phi = nn.Linear(d_model, cfg.num_experts * cfg.softmoe_slots, bias=False)
        nn.init.normal_(self.phi.weight, std=d_model**-0.5)

    @property
    def static_capacity(self) -> bool:
        return True  # S slots per expert, whatever T

    def logits(self, x_TD: Tensor) -> Tensor:
        return project(x_TD, self.phi.weight)

    def route(self, logits_TN: Tensor) -> Routing:
        T, E, S = logits_TN.shape[0], self.num_experts, self.slots
        dispatch_TES = torch.softmax(logits_TN, dim=0).view(T, E, S)
        combine_TES = torch.softmax(logits_TN, dim=1).view(T, E, S)
        token_EC = torch.full((E, S), T, dtype=torch.long, device=logits_TN.device)
        no_drops = torch.zeros((), dtype=torch.long, device=logits_TN.device)
        return Routing(
            logits_TE=logits_TN, token_EC=token_EC, weight_EC=logits_TN.new_zeros(E, S), capacity=S, num_tokens=T,
            aux_loss=self._zloss(logits_TN), num_dropped=no_drops, num_assignments=T,
            soft=SoftAssignment(dispatch_TES, combine_TES),
        )


GATES: dict[str, type[Gate]] = {
    "gshard": TopKGate,
    "switch": SwitchGate,
    "sigmoid": SigmoidGate,
    "xmoe": XMoEGate,
    "expert_choice": ExpertChoiceGate,
    "softmoe": SoftMoEGate,
}
assert tuple(GATES) == GATE_NAMES


def build_gate(cfg: MoEConfig, d_model: int) -> Gate:
    if cfg.gate not in GATES:
        raise ValueError(f"unknown gate {cfg.gate!r}; choose one of {', '.join(GATES)}")
    return GATES[cfg.gate](cfg, d_model)
