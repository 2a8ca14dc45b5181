"""Order / I-Order: token layout (T, D) ↔ expert layout (E, C, D).

Legend: T tokens, D model dim, E experts, C capacity slots per expert, S SoftMoE slots.

Both orders read the gate's slot form (``Routing.token_EC``, ``weight_EC``; token index T marks an
empty slot) and give identical results:

* ``einsum`` — GShard: a one-hot dispatch mask (T, E, C) and einsums; memory O(T·E·C). The combine
  weights scale the expert outputs before the einsum, so backward never builds a (T, E, C) gradient.
* ``index`` — Tutel-style: an index gather for Order and a weighted scatter-add for I-Order; O(E·C·D).
  When each token holds at most one slot (top-1 gates: ``Routing.slots_per_token == 1``) I-Order is a
  gather instead: each token reads its one slot's output (T rows read, not all E·C slots scattered; the
  backward still produces the (E, C, D) gradient). Same values bit for bit: a scatter-add onto zeros of
  one term is that term.

SoftMoE's routing is dense, so for it both orders are the same pair of matmuls (in the input's dtype:
the router's weights are fp32 under autocast and in a layer converted to bf16).

A token with a NaN or inf feature spoils only its own slots and its own output row in both orders
(forward, and the input gradients of the other tokens); in SoftMoE every slot mixes every token, so
there it spoils everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fsmoe.config import ORDER_NAMES
from fsmoe.moe.gates import Routing


class Order:
    """Builds the expert layout from tokens (``order``) and inverts it with the combine weights
    (``iorder``): y_t = Σ over the slots (e, c) holding t of weight_ec · y_ecD."""

    name = "base"

    def order(self, x_TD: Tensor, routing: Routing) -> Tensor:
        if routing.soft is not None:
            return torch.einsum("tes,td->esd", routing.soft.dispatch_TES.to(x_TD.dtype), x_TD)
        return self._order(x_TD, routing)

    def iorder(self, y_ECD: Tensor, routing: Routing) -> Tensor:
        if routing.soft is not None:
            return torch.einsum("tes,esd->td", routing.soft.combine_TES.to(y_ECD.dtype), y_ECD)
        return self._iorder(y_ECD, routing)

    def _order(self, x_TD: Tensor, routing: Routing) -> Tensor:
        raise NotImplementedError

    def _iorder(self, y_ECD: Tensor, routing: Routing) -> Tensor:
        raise NotImplementedError


def gather_rows(x_TD: Tensor, token_EC: Tensor) -> Tensor:
    """x_ECD[e, c] = x_TD[token_EC[e, c]]; an empty slot (index T) reads a zero row."""
    E, C = token_EC.shape
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    return x_pad.index_select(0, token_EC.reshape(-1)).view(E, C, -1)


def scatter_rows(y_ECD: Tensor, token_EC: Tensor, num_tokens: int) -> Tensor:
    """y_TD[t] = Σ over the slots (e, c) holding t of y_ECD[e, c]; empty slots add nothing."""
    D = y_ECD.shape[-1]
    return y_ECD.new_zeros(num_tokens + 1, D).index_add(0, token_EC.reshape(-1), y_ECD.reshape(-1, D))[:num_tokens]


def token_slots(token_EC: Tensor, num_tokens: int) -> Tensor:
    """slot_T[t]: the flat slot e·C + c that holds token t, or E·C when none does, for a routing in which a
    token holds at most one slot (the inverse of ``token_EC``). The empty slots all write row T, which is
    cut off, so which of them lands there does not matter."""
    EC = token_EC.numel()
    slot_T1 = torch.full((num_tokens + 1,), EC, dtype=torch.long, device=token_EC.device)
    slot_T1.index_put_((token_EC.reshape(-1),), torch.arange(EC, device=token_EC.device))
    return slot_T1[:num_tokens]


def gather_slots(y_ECD: Tensor, weight_EC: Tensor, slot_T: Tensor) -> Tensor:
    """y_TD[t] = weight_EC · y_ECD at slot ``slot_T[t]``, zero where slot_T[t] = E·C (a dropped token)."""
    D, EC = y_ECD.shape[-1], weight_EC.numel()
    if EC == 0:
        return y_ECD.new_zeros(slot_T.numel(), D)
    idx_T = slot_T.clamp(max=EC - 1)  # a dropped token reads some slot, then is zeroed (not multiplied: NaN-safe)
    y_TD = y_ECD.reshape(-1, D).index_select(0, idx_T) * weight_EC.reshape(-1).to(y_ECD.dtype)[idx_T].unsqueeze(-1)
    return torch.where((slot_T < EC).unsqueeze(-1), y_TD, y_TD.new_zeros(()))


def non_finite_rows(x_ND: Tensor) -> Tensor:
    """(..., 1) bool: whether a row holds a NaN or an inf."""
    return ~torch.isfinite(x_ND).all(dim=-1, keepdim=True)


class EinsumOrder(Order):
    """GShard ordering: dispatch_TEC one-hot, combine_TEC = dispatch · weight; two einsums.

    A mask einsum multiplies every row by every mask entry, and 0 · NaN = NaN, so one non-finite row
    would turn every slot (Order) or every output row (I-Order) NaN. Both einsums therefore read their
    input with the non-finite rows zeroed, and those rows go where the index order puts them (a gather
    for Order, a scatter-add for I-Order), so a bad row reaches only its own slots and its own output
    row, as in the index order. On finite input every ``where`` picks the einsum, so results are
    unchanged bit for bit; the price is O(T·D + E·C·D) extra work beside the einsums' O(T·E·C·D), and
    no sync."""

    name = "einsum"

    @staticmethod
    def _mask(routing: Routing, dtype: torch.dtype) -> Tensor:
        """0/1 dispatch mask (T, E, C), no gradient. Empty slots point at token 0 with value 0: each
        (e, c) occurs once, so nothing collides and no extra row is needed."""
        E, C = routing.token_EC.shape
        T = routing.num_tokens
        device = routing.token_EC.device
        filled_EC = routing.token_EC < T
        e_EC = torch.arange(E, device=device).unsqueeze(1).expand(E, C)
        c_EC = torch.arange(C, device=device).unsqueeze(0).expand(E, C)
        mask_TEC = torch.zeros(T, E, C, dtype=dtype, device=device)
        mask_TEC[routing.token_EC.where(filled_EC, 0), e_EC, c_EC] = filled_EC.to(dtype)
        return mask_TEC

    def _order(self, x_TD: Tensor, routing: Routing) -> Tensor:
        bad_T1 = non_finite_rows(x_TD)
        x_ECD = torch.einsum("tec,td->ecd", self._mask(routing, x_TD.dtype), x_TD.masked_fill(bad_T1, 0))
        bad_EC1 = F.pad(bad_T1, (0, 0, 0, 1))[routing.token_EC]  # row T (empty slots) is never bad
        return torch.where(bad_EC1, gather_rows(x_TD, routing.token_EC), x_ECD)

    def _iorder(self, y_ECD: Tensor, routing: Routing) -> Tensor:
        weighted_ECD = y_ECD * routing.weight_EC.unsqueeze(-1).to(y_ECD.dtype)
        bad_EC1 = non_finite_rows(weighted_ECD)
        y_TD = torch.einsum("tec,ecd->td", self._mask(routing, y_ECD.dtype), weighted_ECD.masked_fill(bad_EC1, 0))
        # The non-finite slots' sums reach only their own tokens; a non-finite sum never turns finite.
        bad_only_TD = scatter_rows(weighted_ECD.masked_fill(~bad_EC1, 0), routing.token_EC, routing.num_tokens)
        return torch.where(non_finite_rows(bad_only_TD), y_TD + bad_only_TD, y_TD)


class IndexOrder(Order):
    """Tutel-style ordering: gather rows by ``token_EC`` (empty slots read a zero row), and
    scatter-add ``weight_EC``-scaled expert outputs back into token order — or, when a token holds at
    most one slot, gather each token's slot (see the module doc)."""

    name = "index"

    def _order(self, x_TD: Tensor, routing: Routing) -> Tensor:
        return gather_rows(x_TD, routing.token_EC)

    def _iorder(self, y_ECD: Tensor, routing: Routing) -> Tensor:
        if routing.slots_per_token == 1:
            return gather_slots(y_ECD, routing.weight_EC, token_slots(routing.token_EC, routing.num_tokens))
        weighted_ECD = y_ECD * routing.weight_EC.unsqueeze(-1).to(y_ECD.dtype)
        return scatter_rows(weighted_ECD, routing.token_EC, routing.num_tokens)


ORDERS: dict[str, type[Order]] = {"einsum": EinsumOrder, "index": IndexOrder}
assert tuple(ORDERS) == ORDER_NAMES


def build_order(name: str) -> Order:
    if name not in ORDERS:
        raise ValueError(f"unknown order {name!r}; choose one of {', '.join(ORDERS)}")
    return ORDERS[name]()
