"""Dispatch / Combine: move the expert layout to the ranks that own the experts, and back.

Legend: E experts in total, e = E / N_EP local experts, C capacity slots, D model dim.

``dispatch(x_ECD) -> x_eC'D`` hands each local expert every slot addressed to it (C' = C times the
number of source ranks); ``combine(y_eC'D) -> y_ECD`` is its inverse.

This module owns the interface and the local (single-device) dispatcher, which moves nothing and is
the numerical reference. The distributed dispatchers (``a2a``, ``2dh``, ``1dh``) implement the same
interface in :mod:`fsmoe.parallel.dispatch`; nothing here communicates.
"""

from __future__ import annotations

from torch import Tensor


class Dispatcher:
    """Base and local (single-device) dispatcher: identity both ways, all E experts are local and
    unsharded. Distributed dispatchers override the steps; the scheduler may call the steps one by one
    (``exchange`` is the EP AlltoAll, ``gather_shards``/``reduce_shards`` the ESP AllGather and
    ReduceScatter), ``dispatch``/``combine`` compose them."""

    name = "local"
    ep_size = 1
    esp_size = 1
    esp_rank = 0

    def num_local_experts(self, num_experts: int) -> int:
        if num_experts % self.ep_size:
            raise ValueError(
                f"number of experts E={num_experts} is not divisible by the EP degree {self.ep_size}"
            )
        return num_experts // self.ep_size

    def local_hidden(self, d_hidden: int) -> int:
        """The slice of the expert hidden dim H kept on this rank (H / N_ESP)."""
        if d_hidden % self.esp_size:
            raise ValueError(f"expert hidden dim H={d_hidden} is not divisible by the ESP degree {self.esp_size}")
        return d_hidden // self.esp_size

    @property
    def owns_output_bias(self) -> bool:
        """Partial expert outputs are summed over the ESP group, so one shard adds the output bias."""
        return self.esp_rank == 0

    def agree_capacity(self, capacity: int, *, num_tokens: int | None = None, static: bool = False) -> int:
        """The capacity every rank that exchanges slots with this one uses (here: its own).

        ``num_tokens`` is this rank's routing-group size T and ``static`` says that the gate computed
        ``capacity`` from T and its config alone (a fixed capacity factor, not the busiest expert's load):
        a distributed dispatcher that was promised equal T on every rank may then skip the exchange
        (see the capacity agreement in :mod:`fsmoe.parallel.dispatch`)."""
        return capacity

    def exchange(self, buf_WX: Tensor) -> Tensor:
        """Piece w of ``buf_WX`` (W = N_EP pieces) goes to EP rank w; returns the pieces received, by
        source rank. Its own adjoint, so dispatch and combine both use it."""
        return buf_WX

    def gather_shards(self, x_eCD: Tensor) -> Tensor:
        """ESP AllGather: (e, C, D) slots of this rank → (e, S·C, D) slots of the whole shard group."""
        return x_eCD

    def reduce_shards(self, y_eCD: Tensor) -> Tensor:
        """ESP ReduceScatter, the adjoint of :meth:`gather_shards`: (e, S·C, D) partial outputs →
        (e, C, D) summed over the shard group."""
        return y_eCD

    def dispatch(self, x_ECD: Tensor) -> Tensor:
        """(E, C, D) slots of this rank → (e, N_ESP·N_EP·C, D) slots of this rank's experts."""
        W = self.ep_size
        if W == 1 and self.esp_size == 1:
            return x_ECD
        E, C, D = x_ECD.shape
        e = E // W
        recv_WeCD = self.exchange(x_ECD.reshape(W, e, C, D))
        return self.gather_shards(recv_WeCD.transpose(0, 1).reshape(e, W * C, D))

    def combine(self, y_eCD: Tensor) -> Tensor:
        """Inverse of :meth:`dispatch`: (e, N_ESP·N_EP·C, D) → (E, C, D) back on the source rank."""
        W = self.ep_size
        if W == 1 and self.esp_size == 1:
            return y_eCD
        y_eCD = self.reduce_shards(y_eCD)
        e, WC, D = y_eCD.shape
        send_WeCD = y_eCD.view(e, W, WC // W, D).transpose(0, 1).contiguous()
        return self.exchange(send_WeCD).reshape(W * e, WC // W, D)


LocalDispatcher = Dispatcher
"""The single-device dispatcher (the base class itself: all experts local, nothing moves)."""
