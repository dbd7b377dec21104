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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spartan.layers import MaskedTensor


@dataclass(eq=False)
class GradientCorrection:
    """Spartan's global gradient term for one allocation group.

    Differentiating the budget constraint couples all entries of a group through one scalar: with
    ``gm = Σ_block g·w`` per entry, each layer's backward adds its ``Σ gm·s`` into ``accumulated`` (``C``),
    and :meth:`apply` subtracts ``sign(w) · expand(β s C / S)`` from every member's gradient, ``S = Σ c·s``.
    Everything is linear in the incoming gradient, so ``C`` may accumulate over micro-batches and be averaged
    over data-parallel ranks exactly like the gradients themselves.
    """

    beta: float
    slope_total: float
    accumulated: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    pending: bool = False

    def apply(self, members: Sequence[tuple[MaskedTensor, Tensor]]) -> None:
        """Correct the ``.grad`` of each ``(tensor, slope)`` member, then reset for the next backward."""
        if self.slope_total > 0:
            shift = self.accumulated * (self.beta / self.slope_total)
            for tensor, slope in members:
                weight = tensor.weight
                if weight.grad is not None:
                    step = tensor.expand((slope * shift).to(weight.grad.dtype))
                    weight.grad.sub_(weight.detach().sign() * step)
        self.accumulated.zero_()
        self.pending = False


class _SpartanWeight(torch.autograd.Function):
    """``w_eff = ST(m ⊙ w, H)``: forward ``H·m·w``; backward the local part of the exact gradient."""

    @staticmethod
    def forward(
        ctx,
        weight: Tensor,
        keep: Tensor,
        soft: Tensor,
        slope: Tensor,
        tensor: MaskedTensor,
        cost: float,
        correction: GradientCorrection,
    ) -> Tensor:
        ctx.save_for_backward(weight, soft, slope)
        ctx.tensor, ctx.cost, ctx.correction = tensor, cost, correction
        return weight * tensor.expand(keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, soft, slope = ctx.saved_tensors
        tensor, correction = ctx.tensor, ctx.correction
        grad_mask = tensor.block_sum(grad * weight)  # ∂L/∂m per entry
        correction.accumulated += (grad_mask.double() * slope).sum().to(correction.accumulated.device)
        correction.pending = True
        through_mask = tensor.expand(slope * grad_mask * (correction.beta / ctx.cost))
        grad_weight = grad * tensor.expand(soft) + weight.sign() * through_mask
        return grad_weight.to(weight.dtype), None, None, None, None, None, None


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
    return _SpartanWeight.apply(weight, keep, soft, slope, tensor, cost, correction)


def straight_through_weight(weight: Tensor, tensor: MaskedTensor, keep: Tensor) -> Tensor:
    """Top-KAST / dual averaging: masked forward, dense gradient."""
    return _StraightThrough.apply(weight, keep, tensor)


def masked_weight(weight: Tensor, tensor: MaskedTensor, keep: Tensor) -> Tensor:
    """Plain masking (magnitude pruning, and every method once frozen): dropped weights get no gradient."""
    return weight * tensor.expand(keep)
