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

Per step the Sparsifier writes every group's unit values into the shared :class:`Entries` (``|w|`` summed per
entry, divided by the entry's cost) and hands the method the budgets and βs: :meth:`Method.select` selects the
kept entries of all groups together (hard top-k by default, solved in lockstep so the host is read a few times
per step, not per group), :meth:`Method.set_layer` hands each member layer its slice, and
:meth:`Method.forward` computes a layer's forward weight. A new method is one
subclass plus :func:`register_method`; a new selection pattern (e.g. N:M) overrides :meth:`Method.select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from spartan.layers import MaskedTensor
from spartan.masking import GradientCorrection, like_weight, masked_weight, spartan_weight, straight_through_weight
from spartan.topk import SoftSolve, hard_topk_groups, soft_topk_groups


@dataclass(eq=False)
class Entries:
    """The per-entry buffers of all budget groups, flat and in the masked tensors' order (solver precision).

    ``values`` holds unit values (``|w|`` summed per entry, divided by the entry's cost), ``costs`` per-entry costs
    (None when every group's entries cost the same: budgets then count entries), ``hard`` / ``previous_hard``
    this and the last step's hard masks, ``flags`` the hard top-k's scratch; ``soft`` exists for methods that
    declare ``soft_mask``.
    """

    values: Tensor
    costs: Tensor | None
    hard: Tensor
    previous_hard: Tensor
    flags: Tensor
    soft: Tensor | None = None


@dataclass(eq=False)
class Group:
    """Masked tensors sharing one budget (all of them for ``global`` allocation, else one tensor): the ``part``
    of :class:`Entries` they own, and each member's slice of it. ``total`` is what the budget is counted in
    (entries, or cost units when ``Entries.costs`` is set); ``correction`` exists for ``global_correction``.
    """

    members: list[int]
    part: slice
    slices: list[slice]
    unit_cost: float
    total_cost: float
    total: float
    correction: GradientCorrection | None = None
    beta: float | None = None
    lam: float | None = None
    warm: Tensor | None = None
    """The hard top-k's warm start ``[threshold, band lo, band hi, movement]`` (float64, on the device)."""
    solve: SoftSolve | None = None
    """The last soft top-k solution (it predicts where the next solve starts)."""
    agreed_lam: Tensor | None = None
    """Under DDP, the λ every rank's soft mask was written from (the first rank's)."""
    telemetry: dict = field(default_factory=dict)


class LayerMask(nn.Module):
    """The parametrization of one masked weight: ``weight -> effective weight`` by its method.

    ``keep`` is the per-entry forward multiplier (entry-shaped; in the weight's layout when it has the weight's
    shape): what the forward applies and what stays after the freeze; the hard mask itself (bool) for hard-mask
    methods, else in the weight's dtype.
    ``soft`` (the soft mask ``m``), ``cost`` (one entry's cost) and ``correction``
    are set for soft-mask methods only.
    """

    def __init__(self, tensor: MaskedTensor, method: Method):
        super().__init__()
        self.tensor, self.method = tensor, method
        self.keep: Tensor | None = None
        self.frozen = False
        self.soft: Tensor | None = None
        self.cost = 1.0
        self.correction: GradientCorrection | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self.keep.device != weight.device or self.keep.dtype not in (torch.bool, weight.dtype):
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

    def select(
        self, entries: Entries, groups: list[Group], budgets: list[float], betas: list[float], tol: float
    ) -> None:
        """Select every group's kept entries into ``entries.hard`` for its budget (counted like ``group.total``),
        all groups together; ``entries.previous_hard`` must end up holding the last step's mask (for the flip
        rate). Reads the host only a few times per call, whatever the number of groups."""
        entries.previous_hard, entries.hard = entries.hard, entries.previous_hard
        states = hard_topk_groups(
            entries.values,
            [g.part for g in groups],
            budgets,
            [g.total for g in groups],
            entries.costs,
            entries.flags,
            entries.hard,
            [g.warm for g in groups],
        )
        for group, state in zip(groups, states):
            group.warm = state

    def set_layer(self, layer: LayerMask, entries: Entries, group: Group, part: slice, entry_cost: float) -> None:
        """Hand ``layer`` its slice ``part`` of the masks (``entry_cost``: one entry's cost units)."""
        # The mask's bytes themselves, not a float copy: the forward selects with them.
        layer.keep = like_weight(entries.hard[part].view(layer.tensor.entry_shape), layer.tensor.weight)

    def forward(self, weight: Tensor, layer: LayerMask) -> Tensor:
        """The forward weight of ``layer`` before the freeze."""
        if self.straight_through:
            return straight_through_weight(weight, layer.tensor, layer.keep)
        return masked_weight(weight, layer.tensor, layer.keep)

    def freeze(self, layer: LayerMask) -> None:
        """Fix ``layer``'s mask for fine-tuning: it keeps its forward multiplier, with plain masking."""
        layer.frozen = True
        layer.soft = layer.correction = None

    def telemetry(
        self, entries: Entries, groups: list[Group], layers: list[LayerMask], statistics: bool
    ) -> dict[str, Any]:
        """Method-specific numbers for :meth:`Sparsifier.step`'s telemetry (after :meth:`select`): host numbers
        or 0-dim device tensors, never read on the host here; ``statistics``: also those that cost a pass."""
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

    def select(
        self, entries: Entries, groups: list[Group], budgets: list[float], betas: list[float], tol: float
    ) -> None:
        super().select(entries, groups, budgets, betas, tol)
        solves = soft_topk_groups(
            entries.values,
            [g.part for g in groups],
            budgets,
            [g.total for g in groups],
            betas,
            entries.costs,
            entries.soft,
            [_lambda_guess(g, budget, beta) for g, budget, beta in zip(groups, budgets, betas)],
            tol,
            max_iter=100,
        )
        for group, beta, solve in zip(groups, betas, solves):
            group.lam = solve.lam if math.isfinite(solve.lam) else None  # trivial budgets: no λ
            group.solve = solve if group.lam is not None else None
            group.correction.set(beta, solve.slope_total * group.unit_cost)  # S = Σ c·s
            group.telemetry = {"lam": solve.lam, "solver_iterations": solve.iterations}

    def set_layer(self, layer: LayerMask, entries: Entries, group: Group, part: slice, entry_cost: float) -> None:
        shape, weight = layer.tensor.entry_shape, layer.tensor.weight
        soft = entries.soft[part].view(shape)  # soft stays in the solver's precision
        if layer.keep is None:  # written in place every step: no weight-sized allocation per layer and step
            layer.keep = torch.empty_like(weight) if shape == weight.shape else weight.new_empty(shape)
        torch.mul(entries.hard[part].view(shape), soft, out=layer.keep)  # m where kept, else 0 (m is finite)
        layer.soft = like_weight(soft, weight)
        layer.cost, layer.correction = entry_cost, group.correction

    def forward(self, weight: Tensor, layer: LayerMask) -> Tensor:
        return spartan_weight(weight, layer.tensor, layer.keep, layer.soft, layer.cost, layer.correction)

    def telemetry(
        self, entries: Entries, groups: list[Group], layers: list[LayerMask], statistics: bool
    ) -> dict[str, Any]:
        """``λ`` of the first group and the most solver passes; with ``statistics``, the mean soft value of the
        first group's kept and dropped entries (0-dim tensors)."""
        first = groups[0]
        cheap = {
            "lam": first.telemetry["lam"],
            "solver_iterations": max(g.telemetry["solver_iterations"] for g in groups),
        }
        if not statistics:
            return cheap
        hard = entries.hard[first.part]
        kept_soft = torch.stack([layers[i].keep.sum() for i in first.members]).sum()  # float32: it is telemetry
        n_kept = torch.count_nonzero(hard)
        n_dropped = hard.numel() - n_kept
        dropped_soft = entries.soft[first.part].sum() - kept_soft
        # NaN when nothing is kept (dropped)
        return {**cheap, "soft_kept": kept_soft / n_kept, "soft_dropped": dropped_soft / n_dropped}


def _lambda_guess(group: Group, budget: float, beta: float) -> float | Tensor | None:
    """Where this step's λ solve starts: the last solution moved to first order for the new budget and β; on a
    cold start the hard top-k boundary just found (a device value, read with the first pass)."""
    if group.solve is not None:
        return group.solve.predict(budget, beta)
    if group.lam is not None:
        return group.lam
    if group.warm is not None:
        return torch.nan_to_num(group.warm[0], nan=0.0, posinf=0.0, neginf=0.0)
    return None


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
