"""Sparsification methods as strategies of the :class:`spartan.Sparsifier` (docs/design.md §1.4 and §2).

A method declares what it needs from the Sparsifier and does its part of every step:

- ``attaches_masks``: False for ``dense`` (the model trains unmasked: no masks, no budget groups);
- ``soft_mask``: the Sparsifier keeps a soft-mask buffer per budget group and the method solves the soft top-k
  into it every step (the threshold ``λ`` is warm-started from the previous step);
- ``straight_through``: before the freeze, pruned weights receive the dense gradient (dual averaging);
- ``global_correction``: the gradient has a per-group term that :meth:`Sparsifier.finish_backward` applies once
  the whole backward (and DDP's averaging) is done;
- the freeze (:meth:`Method.freeze`): each layer keeps the multiplier its forward used at the freeze step (the
  soft value ``m`` of kept entries for Spartan, 1 otherwise), dropped entries are 0, and training continues with
  plain masking.

Per step the Sparsifier writes each group's unit values (``|w|`` summed per entry, divided by the entry cost
when all entries cost the same) and hands the method the budget and β: :meth:`Method.update_group` selects the
kept entries (hard top-k by default), :meth:`Method.set_layer` hands each member layer its slice, and
:meth:`Method.forward` computes a layer's forward weight. A new method is one subclass plus
:func:`register_method`; a new selection pattern (e.g. N:M) overrides :meth:`Method.update_group`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from spartan.layers import MaskedTensor
from spartan.masking import GradientCorrection, masked_weight, spartan_weight, straight_through_weight
from spartan.topk import HardThreshold, hard_threshold, solve_soft_topk


@dataclass(eq=False)
class Group:
    """Masked tensors sharing one budget (all of them for ``global`` allocation, else one tensor).

    ``values`` holds the entries' unit values (solver precision), ``costs`` per-entry costs (None when they all
    equal ``unit_cost``, the budget then counts entries); ``soft`` and ``correction`` exist for methods that
    declare ``soft_mask`` / ``global_correction``.
    """

    members: list[int]
    slices: list[slice]
    costs: Tensor | None
    unit_cost: float
    total_cost: float
    values: Tensor
    hard: Tensor
    previous_hard: Tensor
    soft: Tensor | None = None
    correction: GradientCorrection | None = None
    beta: float | None = None
    lam: float | None = None
    threshold: HardThreshold | None = None
    telemetry: dict = field(default_factory=dict)


class LayerMask(nn.Module):
    """The parametrization of one masked weight: ``weight -> effective weight`` by its method.

    ``keep`` is the per-entry forward multiplier (entry-shaped, the weight's dtype): what the forward applies and
    what stays after the freeze. ``soft``, ``slope`` (``m(1 − m)``), ``cost`` (one entry's cost) and
    ``correction`` are set for soft-mask methods only.
    """

    def __init__(self, tensor: MaskedTensor, method: Method):
        super().__init__()
        self.tensor, self.method = tensor, method
        self.keep: Tensor | None = None
        self.frozen = False
        self.soft: Tensor | None = None
        self.slope: Tensor | None = None
        self.cost = 1.0
        self.correction: GradientCorrection | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self.keep.device != weight.device or self.keep.dtype != weight.dtype:
            raise RuntimeError(
                f"{self.tensor.name} is {weight.dtype} on {weight.device} but its mask was built for "
                f"{self.keep.dtype} on {self.keep.device}: move the model (model.to(...)) before "
                f"creating the Sparsifier"
            )
        if self.frozen:
            return masked_weight(weight, self.tensor, self.keep)
        return self.method.forward(weight, self)


class Method:
    """Hard top-k masks by unit value; the declarations (class attributes) are described in the module docstring.

    The base class is plain masking (pruned weights get no gradient): gradual magnitude pruning.
    """

    name: ClassVar[str]
    attaches_masks: ClassVar[bool] = True
    soft_mask: ClassVar[bool] = False
    straight_through: ClassVar[bool] = False
    global_correction: ClassVar[bool] = False

    def update_group(self, group: Group, budget: float, beta: float, tol: float) -> None:
        """Select the kept entries of ``group`` (``group.hard``) for ``budget`` (cost units, or entries when
        ``group.costs`` is None); record the flip rate against the previous step in ``group.telemetry``."""
        group.previous_hard, group.hard = group.hard, group.previous_hard
        group.threshold = hard_threshold(group.values, budget, group.costs, init=group.threshold)
        group.threshold.mask(group.values, group.costs, out=group.hard)
        flips = int(torch.count_nonzero(group.hard ^ group.previous_hard))
        group.telemetry = {"flip_rate": flips / group.hard.numel()}

    def set_layer(self, layer: LayerMask, group: Group, part: slice, entry_cost: float) -> None:
        """Hand ``layer`` its slice ``part`` of the group's masks (``entry_cost``: one entry's cost units)."""
        layer.keep = group.hard[part].view(layer.tensor.entry_shape).to(layer.tensor.weight.dtype)

    def forward(self, weight: Tensor, layer: LayerMask) -> Tensor:
        """The forward weight of ``layer`` before the freeze."""
        if self.straight_through:
            return straight_through_weight(weight, layer.tensor, layer.keep)
        return masked_weight(weight, layer.tensor, layer.keep)

    def freeze(self, layer: LayerMask) -> None:
        """Fix ``layer``'s mask for fine-tuning: it keeps its forward multiplier, with plain masking."""
        layer.frozen = True
        layer.soft = layer.slope = layer.correction = None

    def telemetry(self, groups: list[Group], layers: list[LayerMask]) -> dict[str, Any]:
        """Method-specific numbers for :meth:`Sparsifier.step`'s telemetry (after :meth:`update_group`)."""
        return {}


METHODS: dict[str, type[Method]] = {}
"""Registered methods by name (``SparsityConfig.method``)."""


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under its ``name`` (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]()


@register_method
class Spartan(Method):
    """``w_eff = ST(m ⊙ w, H)``: soft top-k mask ``m`` forward (on the hard top-k set), exact gradient through
    ``m`` split into a local part and one global term per group."""

    name = "spartan"
    soft_mask = True
    straight_through = True
    global_correction = True

    def update_group(self, group: Group, budget: float, beta: float, tol: float) -> None:
        super().update_group(group, budget, beta, tol)
        solution = solve_soft_topk(group.values, budget, beta, group.costs, lam_init=group.lam, tol=tol, out=group.soft)
        group.lam = solution.lam if math.isfinite(solution.lam) else None  # trivial budgets: no λ
        group.correction.beta = beta
        group.correction.slope_total = solution.slope_total * group.unit_cost  # S = Σ c·s
        group.telemetry.update(lam=solution.lam, solver_iterations=solution.iterations)

    def set_layer(self, layer: LayerMask, group: Group, part: slice, entry_cost: float) -> None:
        shape = layer.tensor.entry_shape
        soft = group.soft[part].view(shape)  # soft and slope stay in the solver's precision
        layer.soft, layer.slope = soft, soft * (1 - soft)
        layer.keep = torch.where(group.hard[part].view(shape), soft, 0.0).to(layer.tensor.weight.dtype)
        layer.cost, layer.correction = entry_cost, group.correction

    def forward(self, weight: Tensor, layer: LayerMask) -> Tensor:
        return spartan_weight(weight, layer.tensor, layer.keep, layer.soft, layer.slope, layer.cost, layer.correction)

    def telemetry(self, groups: list[Group], layers: list[LayerMask]) -> dict[str, Any]:
        """``λ`` and the mean soft value of kept and dropped entries of the first group; the most solver passes."""
        first = groups[0]
        kept_soft = sum(float(layers[i].keep.sum()) for i in first.members)
        n_kept = int(torch.count_nonzero(first.hard))
        n_dropped = first.hard.numel() - n_kept
        dropped_soft = float(first.soft.sum()) - kept_soft
        return {
            "lam": first.telemetry["lam"],
            "soft_kept": kept_soft / n_kept if n_kept else math.nan,
            "soft_dropped": dropped_soft / n_dropped if n_dropped else math.nan,
            "solver_iterations": max(g.telemetry["solver_iterations"] for g in groups),
        }


@register_method
class TopKAST(Method):
    """``w_eff = ST(w, H)``: hard top-k forward, dense gradient (dual averaging; Top-KAST without backward
    sparsity)."""

    name = "topkast"
    straight_through = True


@register_method
class Magnitude(Method):
    """``w_eff = H ⊙ w``: gradual magnitude pruning; pruned weights get no gradient."""

    name = "magnitude"


@register_method
class Dense(Method):
    """No masking: the dense baseline, trained by the same loop."""

    name = "dense"
    attaches_masks = False
