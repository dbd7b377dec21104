"""How a target density is shared among masked layers (docs/design.md §1.6).

- ``global``: one budget over all masked entries; layers compete by unit value (the paper's setting), so
  there are no per-layer densities to compute here;
- ``uniform``: every layer at the same density;
- ``erk``: Erdős–Rényi-Kernel densities ``∝ Σ dims / Π dims`` of each weight (conv, linear and attention
  projections alike), capped at 1 with the excess redistributed over the other layers.

Densities are kept fractions (1 − sparsity) measured in cost units: with the ``params`` cost model, weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ALLOCATIONS = ("global", "uniform", "erk")
ACCOUNTINGS = ("all", "masked")


def layer_densities(
    shapes: Sequence[Sequence[int]], costs: Sequence[float], density: float, allocation: str
) -> list[float] | None:
    """Per-layer densities whose cost-weighted mean is ``density``; None for ``global`` allocation.

    ``shapes`` are the weight shapes and ``costs`` each layer's total cost (cost units) in the same order.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if allocation == "global":
        return None
    if allocation == "uniform":
        return [density] * len(shapes)
    return _erk(shapes, costs, density)


def _erk(shapes: Sequence[Sequence[int]], costs: Sequence[float], density: float) -> list[float]:
    raw = [sum(shape) / math.prod(shape) for shape in shapes]
    budget = density * sum(costs)
    dense: set[int] = set()
    while len(dense) < len(raw):
        # Scale the free layers to use what the dense ones leave; any that would exceed 1 become dense.
        free_budget = budget - sum(costs[i] for i in dense)
        free_weight = sum(raw[i] * costs[i] for i in range(len(raw)) if i not in dense)
        scale = free_budget / free_weight
        overfull = {i for i in range(len(raw)) if i not in dense and raw[i] * scale > 1.0}
        if not overfull:
            return [1.0 if i in dense else raw[i] * scale for i in range(len(raw))]
        dense |= overfull
    return [1.0] * len(raw)


def masked_density(target_density: float, masked_cost: float, unmasked_cost: float, accounting: str) -> float:
    """The density masked layers need so that the model meets ``target_density``.

    With ``accounting="all"`` the target counts everything (the ``unmasked_cost`` of biases, norms, embeddings
    and excluded layers stays dense), so masked layers get sparser; with ``"masked"`` it counts masked layers only.
    """
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    if accounting == "masked" or unmasked_cost == 0:
        return target_density
    needed = (target_density * (masked_cost + unmasked_cost) - unmasked_cost) / masked_cost
    if needed <= 0:
        floor = unmasked_cost / (masked_cost + unmasked_cost)
        raise ValueError(
            f"target sparsity {1 - target_density:g} is unreachable counting all parameters: the "
            f"unmasked ones alone are a density of {floor:.4f} (sparsity at most {1 - floor:.4f}); "
            f"use accounting='masked' or mask more layers"
        )
    return min(needed, 1.0)  # a target of 1 may compute as 1 + 1e-16
