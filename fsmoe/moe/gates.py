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

This module owns the gates, the :class:`Routing` record and the capacity arithmetic: every C is clamped
and rounded by :func:`fit_capacity` (the gates' C here, the layer's agreed and padded C in ``layer``).
"""

from __future__ import annotations

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
    tokens that no expert picked) out of ``num_assignments``.
    """

    logits_TE: Tensor
    token_EC: Tensor
    weight_EC: Tensor
    capacity: int
    num_tokens: int
    aux_loss: Tensor
    num_dropped: Tensor
    num_assignments: int
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
    # Exact decimal arithmetic: in floats 1.1 * 100 / 2 rounds up to 56 instead of 55.
    c = math.ceil(top_k * Fraction(str(cfg.capacity_factor)) * num_tokens / num_experts)
    return fit_capacity(c, minimum=cfg.min_capacity, maximum=num_tokens, multiple=cfg.capacity_multiple)


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
    flat_e = expert_TK.t().reshape(-1)  # choice-major: the position priority
    flat_t = torch.arange(T, device=device).repeat(K)
    order = torch.arange(T * K, device=device)
    if policy == "probability":
        order = torch.sort(weight_TK.detach().t().reshape(-1), descending=True, stable=True).indices
    elif policy != "position":
        raise ValueError(f"unknown drop policy {policy!r}; choose one of position, probability")
    order = order[torch.sort(flat_e[order], stable=True).indices]  # group by expert, keep priority
    e_sorted = flat_e[order]
    counts_E = torch.bincount(flat_e, minlength=E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot = torch.arange(T * K, device=device) - starts_E[e_sorted]
    keep = slot < C

    flat_w = weight_TK.t().reshape(-1)
    if renormalize:
        keep_flat = torch.zeros(T * K, dtype=torch.bool, device=device)
        keep_flat[order] = keep
        kept_w_TK = (flat_w * keep_flat).view(K, T).t()
        denom_T = kept_w_TK.sum(-1).clamp(min=torch.finfo(flat_w.dtype).eps)
        flat_w = flat_w / denom_T.repeat(K)

    kept = order[keep]
    pos = e_sorted[keep] * C + slot[keep]
    token_EC = torch.full((E * C,), T, dtype=torch.long, device=device)
    token_EC[pos] = flat_t[kept]
    weight_EC = flat_w.new_zeros(E * C).index_put((pos,), flat_w[kept])
    return token_EC.view(E, C), weight_EC.view(E, C), (~keep).sum()


def top_k_lowest_index(scores_TE: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row, ties to the lower index (deterministic, unlike
    ``topk``). k passes of ``argmax`` (which returns the first maximum): at small k this is several
    times faster than a full stable sort over E."""
    if k == scores_TE.shape[1]:
        return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices
    work = scores_TE.clone()
    picks = []
    for _ in range(k):
        idx_T1 = work.argmax(dim=-1, keepdim=True)
        picks.append(idx_T1)
        work.scatter_(1, idx_T1, float("-inf"))
    return torch.cat(picks, dim=1)


def balance_loss(probs_TE: Tensor, first_TE: Tensor) -> Tensor:
    """GShard/Switch load-balancing loss E · Σ_e mean_t(p_te) · frac_e, where frac_e is the share of
    tokens whose first choice is e (Lepikhin et al. 2020; Fedus et al. 2021). Equals 1 when balanced."""
    E = probs_TE.shape[1]
    return E * (probs_TE.mean(0) * first_TE.float().mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(logits)²) (Zoph et al. 2022, ST-MoE)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def zero_loss(logits_TE: Tensor) -> Tensor:
    """The value of a loss term whose coefficient is 0: the term is skipped, since 0 · loss is NaN when
    one token's logits are not finite. The zero stays on the autograd graph (a sum over an empty slice,
    which reads no value) because callers backpropagate ``aux_loss`` whatever the coefficients."""
    return logits_TE[:0].float().sum()


class Gate(nn.Module):
    """Base of all gates: ``forward(x_TD) = route(logits(x_TD))``; subclasses override one method."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.wg = nn.Linear(d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)

    def forward(self, x_TD: Tensor) -> Routing:
        return self.route(self.logits(x_TD))

    def logits(self, x_TD: Tensor) -> Tensor:
        return self.wg(x_TD)

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
        logits_TE = self.wg(x_TD)
        if self.w_noise is not None and self.training:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(self.w_noise(x_TD))
        return logits_TE

    def scores(self, logits_TE: Tensor) -> Tensor:
        """Per-token expert scores whose top-k are the combine weights."""
        return torch.softmax(logits_TE.float(), dim=-1).to(logits_TE.dtype)

    def aux(self, logits_TE: Tensor, scores_TE: Tensor, expert_TK: Tensor) -> Tensor:
        first_TE = F.one_hot(expert_TK[:, 0], self.num_experts)
        return balance_loss(torch.softmax(logits_TE.float(), dim=-1), first_TE)

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
        aux = balance + self._zloss(logits_TE)
        return Routing(
            logits_TE=logits_TE, token_EC=token_EC, weight_EC=weight_EC, capacity=capacity, num_tokens=T,
            aux_loss=aux, num_dropped=dropped, num_assignments=T * K,
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
        q_TR = F.normalize(self.proj(x_TD), dim=-1)
        k_ER = F.normalize(self.expert_emb, dim=-1)
        return q_TR @ k_ER.t() / self.log_temperature.exp()


class ExpertChoiceGate(Gate):
    """Expert-choice routing (Zhou et al. 2022): token scores softmax over experts; each expert then
    picks its top-C tokens, C = ceil(k·f·T/E), so a token gets 0..E experts. Nothing is dropped by
    capacity; ``num_dropped`` counts tokens that no expert picked (out of T)."""

    def route(self, logits_TE: Tensor) -> Routing:
        T, E = logits_TE.shape
        scores_TE = torch.softmax(logits_TE.float(), dim=-1).to(logits_TE.dtype)
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

    def logits(self, x_TD: Tensor) -> Tensor:
        return self.phi(x_TD)

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
