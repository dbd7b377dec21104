"""Forward weights of masked tensors and their gradients (docs/design.md §1.4 and §2).

No autograd graph survives between steps: the Sparsifier's ``step()`` stores detached per-entry tensors
(soft mask ``m``, slope ``s = m(1 − m)``, hard mask ``H``), and each layer's forward weight is one custom op
on its own Parameter. For ``spartan`` the gradient through the soft mask splits into a local part, computed
in the layer's backward, and one global scalar per allocation group, applied by :class:`GradientCorrection`
once the whole backward (and any DDP averaging) is done.

Shapes: ``m``, ``s`` and ``H`` are entry-shaped (see :class:`spartan.layers.MaskedTensor`); ``cost`` is the
cost of one entry in cost units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from spartan.layers import MaskedTensor


@dataclass(eq=False)
class GradientCorrection:
    """Spartan's global gradient term for one allocation group.

    Differentiating the budget constraint couples all entries of a group through one scalar: with
    ``gm = Σ_block g·w`` per entry, each layer's backward returns its ``Σ gm·s`` as the gradient of ``probe``
    (a 0-dim float64 leaf), so autograd sums it into ``probe.grad`` (``C``) over layers and micro-batches without
    any state mutated in the backward (which keeps the backward traceable by ``torch.compile``), and
    :meth:`apply` subtracts ``sign(w) · expand(β s C / S)`` from every member's gradient, ``S = Σ c·s``. It is
    linear in the incoming gradient, so ``C`` is averaged over data-parallel ranks like the gradients.
    ``beta`` (1/unit-value units) and ``slope_total`` (``S``, cost units) are 0-dim float64 device tensors.
    """

    probe: Tensor
    beta: Tensor
    slope_total: Tensor

    @classmethod
    def on(cls, device: torch.device) -> GradientCorrection:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(probe=zero.clone().requires_grad_(), beta=zero.clone(), slope_total=zero.clone())

    @property
    def pending(self) -> bool:
        """A backward has run through the group's layers since the last :meth:`apply`."""
        return self.probe.grad is not None

    def set(self, beta: float, slope_total: float) -> None:
        """This step's β and ``S`` (a fill, not a host-to-device copy)."""
        self.beta.fill_(beta)
        self.slope_total.fill_(slope_total)

    def accumulated(self) -> Tensor:
        """``C`` so far (0 when no backward ran through the group)."""
        return self.probe.grad if self.probe.grad is not None else torch.zeros_like(self.slope_total)

    def apply(self, members: Sequence[tuple[MaskedTensor, Tensor]], accumulated: Tensor) -> None:
        """Correct the ``.grad`` of each ``(tensor, slope)`` member by ``C = accumulated``, then reset."""
        ratio = self.beta / self.slope_total
        shift = torch.where(self.slope_total > 0, accumulated * ratio, 0.0)  # S = 0: a saturated mask
        for tensor, slope in members:
            weight = tensor.weight
            if weight.grad is not None:
                step = tensor.expand((slope * shift).to(weight.grad.dtype))
                weight.grad.sub_(weight.detach().sign() * step)
        self.probe.grad = None


class _SpartanWeight(torch.autograd.Function):
    """``w_eff = ST(m ⊙ w, H)``: forward ``H·m·w``; backward the local part of the exact gradient, and the
    group's ``Σ gm·s`` as the gradient of the correction's probe."""

    @staticmethod
    def forward(
        ctx,
        weight: Tensor,
        keep: Tensor,
        soft: Tensor,
        slope: Tensor,
        probe: Tensor,
        beta: Tensor,
        tensor: MaskedTensor,
        cost: float,
    ) -> Tensor:
        ctx.save_for_backward(weight, soft, slope, beta)
        ctx.tensor, ctx.cost = tensor, cost
        return weight * tensor.expand(keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, soft, slope, beta = ctx.saved_tensors
        tensor = ctx.tensor
        grad_mask = tensor.block_sum(grad * weight)  # ∂L/∂m per entry
        probe_grad = (grad_mask.double() * slope).sum()
        through_mask = tensor.expand(slope * grad_mask * (beta / ctx.cost))
        grad_weight = (grad * tensor.expand(soft) + weight.sign() * through_mask).to(weight.dtype)
        if grad_weight.stride() != weight.stride():  # DDP's buckets expect the weight's layout
            grad_weight = torch.empty_like(weight).copy_(grad_weight)
        return grad_weight, None, None, None, probe_grad, None, None, None


class _StraightThrough(torch.autograd.Function):
    """``w_eff = ST(w, H)``: forward ``H·w``, backward identity (dual averaging)."""

    @staticmethod
    def forward(ctx, weight: Tensor, keep: Tensor, tensor: MaskedTensor) -> Tensor:
        return weight * tensor.expand(keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def spartan_weight(
    weight: Tensor,
    tensor: MaskedTensor,
    keep: Tensor,
    soft: Tensor,
    slope: Tensor,
    cost: float,
    correction: GradientCorrection,
) -> Tensor:
    """Spartan's forward weight; ``keep = H·m`` is precomputed by the caller (it is what the forward uses)."""
    return _SpartanWeight.apply(weight, keep, soft, slope, correction.probe, correction.beta, tensor, cost)


def straight_through_weight(weight: Tensor, tensor: MaskedTensor, keep: Tensor) -> Tensor:
    """Top-KAST / dual averaging: masked forward, dense gradient."""
    return _StraightThrough.apply(weight, keep, tensor)


def like_weight(entries: Tensor, weight: Tensor) -> Tensor:
    """Per-entry ``entries`` in ``weight``'s memory layout when they have its shape (unstructured masks of
    channels_last convolutions), so that masking ops and the gradients they return do not mix layouts."""
    if entries.shape == weight.shape and entries.stride() != weight.stride():
        return torch.empty_like(weight, dtype=entries.dtype).copy_(entries)
    return entries


def masked_weight(weight: Tensor, tensor: MaskedTensor, keep: Tensor) -> Tensor:
    """Plain masking (magnitude pruning, and every method once frozen): dropped weights get no gradient."""
    return weight * tensor.expand(keep)
