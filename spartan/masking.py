"""Forward weights of masked tensors and their gradients (docs/design.md §1.4 and §2).

No autograd graph survives between steps: the Sparsifier's ``step()`` stores detached per-entry tensors
(soft mask ``m``, hard mask ``H``), and each layer's forward weight is one custom op on its own Parameter; the
slope ``s = m(1 − m)`` is recomputed where the backward needs it (in one fused pass per layer).
For ``spartan`` the gradient through the soft mask splits into a local part, computed in the layer's backward,
and one global scalar per allocation group, applied by :class:`GradientCorrection` once the whole backward (and
any DDP averaging) is done.

Shapes: ``m``, ``s`` and ``H`` are entry-shaped (see :class:`spartan.layers.MaskedTensor`); ``cost`` is the
cost of one entry in cost units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from spartan import kernels
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
        """Correct the ``.grad`` of each ``(tensor, soft mask)`` member by ``C = accumulated``, then reset."""
        ratio = self.beta / self.slope_total
        shift = torch.where(self.slope_total > 0, accumulated * ratio, 0.0)  # S = 0: a saturated mask
        for tensor, soft in members:
            grad, weight = tensor.weight.grad, tensor.weight.detach()
            if grad is None:
                continue
            views = _block_views(tensor, grad, weight, soft)
            if views is not None:
                kernels.fuse(_correction_pass, *views, shift)
            else:
                step = tensor.expand((soft * (1 - soft) * shift).to(grad.dtype))
                grad.sub_(weight.sign() * step)
        self.probe.grad = None


def _correction_pass(grad: Tensor, weight: Tensor, soft: Tensor, shift: Tensor) -> None:
    """``grad −= sign(w)·s·shift`` in place, ``s = m(1 − m)`` broadcast over each block (views of
    :func:`_block_views`)."""
    grad.sub_(weight.sign() * (soft * (1 - soft) * shift).to(grad.dtype)[:, None, :, None])


def _local_gradient_pass(grad: Tensor, weight: Tensor, soft: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Spartan's local gradient ``grad·m + sign(w)·s·gm·scale`` (``scale = β / cost``, ``gm = Σ_block grad·w``,
    ``s = m(1 − m)``, per-entry terms broadcast over each block) and ``Σ s·gm`` (float64, 0-dim), on the views
    of :func:`_block_views`; the gradient comes back shaped like them."""
    slope = soft * (1 - soft)
    grad_mask = (grad * weight).sum(dim=(1, 3))  # ∂L/∂m per entry
    probe_grad = (grad_mask.double() * slope).sum()
    through_mask = (slope * grad_mask * scale)[:, None, :, None]
    grad_weight = grad * soft[:, None, :, None] + weight.sign() * through_mask
    return grad_weight.to(weight.dtype), probe_grad


def _block_views(tensor: MaskedTensor, grad: Tensor, weight: Tensor, soft: Tensor) -> tuple[Tensor, ...] | None:
    """``grad`` and ``weight`` as ``(R, bh, C, bw, K)`` views and ``soft`` as ``(R, C, K)``, so that the fused
    passes see every layer alike (one compiled variant serves most shapes): an unstructured layer flat in memory
    order (``R`` = its size; any dense layout, channels_last included, shared by all three), a blocked one
    contiguous. None for other layouts, and inside a region ``torch.compile`` traces (it fuses the plain ops
    itself, and its functionalization replays ``as_strided`` on a view's base: at the wrong offset for masks that
    are views into the shared buffers)."""
    if torch.compiler.is_compiling() or grad.stride() != weight.stride():
        return None
    if tensor.block == (1, 1):
        dense = weight.is_contiguous() or (
            weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
        )
        if not dense or soft.stride() != weight.stride():
            return None
        n = weight.numel()
        return tuple(t.as_strided((n, 1, 1, 1, 1), (1, 1, 1, 1, 1)) for t in (grad, weight)) + (
            soft.as_strided((n, 1, 1), (1, 1, 1)),
        )
    blocks = tensor.blocked(weight)
    if blocks is None or not soft.is_contiguous():
        return None
    rows, _, cols, _, k = blocks.shape
    return tensor.blocked(grad), blocks, soft.view(rows, cols, k)


class _SpartanWeight(torch.autograd.Function):
    """``w_eff = ST(m ⊙ w, H)``: forward ``H·m·w``; backward the local part of the exact gradient, and the
    group's ``Σ gm·s`` as the gradient of the correction's probe."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, keep: Tensor, soft: Tensor, probe: Tensor, beta: Tensor, tensor: MaskedTensor, cost: float
    ) -> Tensor:
        ctx.save_for_backward(weight, soft, beta)
        ctx.tensor, ctx.cost = tensor, cost
        return tensor.multiply(weight, keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, soft, beta = ctx.saved_tensors
        tensor, scale = ctx.tensor, beta / ctx.cost
        if grad.stride() != weight.stride():  # DDP's buckets expect the weight's layout, and so does the fused pass
            grad = torch.empty_like(weight, dtype=grad.dtype).copy_(grad)
        views = _block_views(tensor, grad, weight, soft)
        if views is not None:
            grad_weight, probe_grad = kernels.fuse(_local_gradient_pass, *views, scale)
            grad_weight = grad_weight.as_strided(weight.shape, weight.stride())
        else:  # the same formula op by op (traced by torch.compile, or a layout the views do not cover)
            slope = soft * (1 - soft)
            grad_mask = tensor.block_sum(grad * weight)
            probe_grad = (grad_mask.double() * slope).sum()
            through_mask = tensor.expand(slope * grad_mask * scale)
            grad_weight = (grad * tensor.expand(soft) + weight.sign() * through_mask).to(weight.dtype)
            if grad_weight.stride() != weight.stride():
                grad_weight = torch.empty_like(weight).copy_(grad_weight)
        return grad_weight, None, None, probe_grad, None, None, None


class _StraightThrough(torch.autograd.Function):
    """``w_eff = ST(w, H)``: forward ``H·w``, backward identity (dual averaging)."""

    @staticmethod
    def forward(ctx, weight: Tensor, keep: Tensor, tensor: MaskedTensor) -> Tensor:
        return tensor.multiply(weight, keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def spartan_weight(
    weight: Tensor, tensor: MaskedTensor, keep: Tensor, soft: Tensor, cost: float, correction: GradientCorrection
) -> Tensor:
    """Spartan's forward weight; ``keep = H·m`` is precomputed by the caller (it is what the forward uses)."""
    return _SpartanWeight.apply(weight, keep, soft, correction.probe, correction.beta, tensor, cost)


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
    return tensor.multiply(weight, keep)
