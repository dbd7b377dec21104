"""Straightforward reference solvers, for tests and benchmarks only (not used in training).

- :func:`sinkhorn_soft_topk`: the paper's 2-column Sinkhorn iteration for the same transport problem as
  :func:`spartan.soft_topk`, with its stopping rule (relative change of ``Σ m·v`` <= 1%, at most 100
  iterations). It is a fixed-point iteration on the single threshold and converges slowly as the mask sharpens.
- :func:`sorted_hard_topk`: the hard top-k set by a full sort and cumulative sum.

Units as in :mod:`spartan.topk`: budget in cost units, ``u = v / c``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spartan.topk import FIT_RTOL


def sinkhorn_soft_topk(
    values: Tensor, budget: float, beta: float, costs: Tensor | None = None, *, tol: float = 0.01, max_iter: int = 100
) -> tuple[Tensor, int]:
    """Soft top-k mask by Sinkhorn; returns ``(mask, iterations)``, computed in ``values``' dtype.

    Transport plan ``P = [c·m, c·(1 − m)]`` between entries (row masses ``c``) and the bins keep / drop
    (capacities ``B`` and ``Σc − B``), with scores ``z = β·u`` for keep and 0 for drop. In log domain,
    with the drop column's potential fixed at 0: rows ``ν = log c − softplus(z + μ)``, keep column
    ``μ = log B − logsumexp(z + ν)``; the mask is ``m = sigmoid(z + μ)``.
    """
    v = values.detach().reshape(-1)
    c = torch.ones_like(v) if costs is None else costs.detach().reshape(-1).to(v.dtype)
    z = beta * (v / c)
    log_c, log_budget = torch.log(c), torch.log(torch.tensor(float(budget), dtype=v.dtype))
    mu = torch.zeros((), dtype=v.dtype)
    previous = None
    for iteration in range(1, max_iter + 1):
        nu = log_c - F.softplus(z + mu)
        mu = log_budget - torch.logsumexp(z + nu, 0)
        mask = torch.sigmoid(z + mu)
        objective = float((mask * v).sum())
        if previous is not None and abs(objective - previous) <= tol * abs(previous):
            break
        previous = objective
    return mask.view(values.shape), iteration


def sorted_hard_topk(values: Tensor, budget: float, costs: Tensor | None = None) -> tuple[Tensor, float]:
    """Hard top-k by unit value (ties: lower index first) within ``budget``; returns ``(mask, threshold)``.

    ``threshold`` is the unit value of the first entry that does not fit (``-inf`` if all fit).
    """
    u = values.detach().reshape(-1)
    c = torch.ones_like(u, dtype=torch.float64) if costs is None else costs.detach().reshape(-1).double()
    if costs is not None:
        u = u / costs.detach().reshape(-1).to(u.dtype)
    order = torch.sort(u, descending=True, stable=True).indices
    cumulative = torch.cumsum(c[order], 0)
    n_fit = int((cumulative <= budget * (1 + FIT_RTOL)).sum())
    mask = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    mask[order[:n_fit]] = True
    threshold = float(u[order[n_fit]]) if n_fit < len(u) else float("-inf")
    return mask.view(values.shape), threshold
