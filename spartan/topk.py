"""Soft top-k by regularized optimal transport, and the hard top-k it anneals to.

Units used throughout:

- ``values`` ``v``: any finite reals (Spartan passes ``|w|`` summed over a block);
- ``costs`` ``c > 0``: cost units per entry (1 when omitted);
- ``budget`` ``B``: cost units, ``0 <= B <= Σ c``; the kept *density* is ``B / Σ c``;
- unit value ``u = v / c``; the threshold ``λ`` is in unit-value units.

The soft mask ``m_i = sigmoid(β (u_i − λ))`` is a keep-weight in ``[0, 1]`` with ``Σ c·m = B``. It is
the solution of the entropy-regularized transport of each entry's cost to a "keep" bin of capacity ``B``
and a "drop" bin. We solve for the single scalar ``λ`` by safeguarded Newton and differentiate it
implicitly (see ``SoftTopK.backward``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from spartan import kernels

FIT_RTOL = 1e-9
"""An entry fits the hard budget when the cumulative cost through it is <= ``B·(1 + FIT_RTOL)``; this absorbs
rounding in budgets such as ``0.29 * 100``."""

_SAMPLE_SIZE = 1 << 16


@dataclass(frozen=True)
class SoftTopKSolution:
    """Result of :func:`solve_soft_topk`."""

    mask: Tensor
    """``m``, shaped like ``values``; float32 (float64 for float64 input)."""
    lam: float
    """Solved threshold ``λ`` (unit-value units); pass it as ``lam_init`` next time to warm-start."""
    iterations: int
    """Passes over the values (each evaluates the mask and the two sums Newton needs)."""
    budget_error: float
    """``|Σ c·m − B| / B`` of the returned mask (0 for the trivial budgets 0 and ``Σ c``)."""
    slope_total: float
    """``Σ c·m(1 − m)`` of the returned mask (cost units): the ``S`` of the implicit-differentiation backward."""


@dataclass(frozen=True)
class HardThreshold:
    """The hard top-k set: entries taken in descending unit value (ties: lower flat index first) while the
    cumulative cost fits the budget. Kept = ``u > threshold``, plus the tied entries listed in ``tie_keep``."""

    threshold: float
    """Unit value of the first entry that does not fit; ``-inf`` when everything fits."""
    tie_keep: Tensor
    """Flat indices of kept entries whose unit value equals ``threshold`` (usually empty)."""
    kept_cost: float
    """Total cost of the kept entries (cost units)."""
    band: tuple[float, float]
    """Unit-value interval ``[lo, hi)`` that contained the boundary; a warm-start hint for the next call."""

    def mask(self, values: Tensor, costs: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
        """Boolean keep-mask shaped like ``values`` (the same values and costs this threshold came from)."""
        u = _unit_values(values, costs, _compute_dtype(values))
        out = torch.empty(u.shape, dtype=torch.bool, device=u.device) if out is None else out.view(-1)
        torch.gt(u, torch.tensor(self.threshold, dtype=u.dtype, device=u.device), out=out)
        if self.tie_keep.numel():
            out[self.tie_keep.to(out.device)] = True
        return out.view(values.shape)


# ------------------------------------------------------------------------------------------ validation


def _compute_dtype(values: Tensor) -> torch.dtype:
    return torch.float64 if values.dtype == torch.float64 else torch.float32


def _unit_values(values: Tensor, costs: Tensor | None, dtype: torch.dtype) -> Tensor:
    u = values.detach().reshape(-1).to(dtype)
    return u if costs is None else u / costs.detach().reshape(-1).to(dtype)


def _validate(values: Tensor, budget: float, costs: Tensor | None) -> tuple[float, float]:
    """Check the shared arguments; return ``(budget, total_cost)`` as floats."""
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise ValueError(
            f"values must be a floating-point tensor, got {type(values).__name__}"
            f"{'' if not isinstance(values, Tensor) else ' of dtype ' + str(values.dtype)}"
        )
    if values.numel() == 0:
        raise ValueError("values must not be empty (got a tensor with 0 entries)")
    if costs is None:
        total = float(values.numel())
    else:
        if not isinstance(costs, Tensor) or costs.shape != values.shape:
            got = tuple(costs.shape) if isinstance(costs, Tensor) else type(costs).__name__
            raise ValueError(f"costs must be a tensor shaped like values {tuple(values.shape)}, got {got}")
        if costs.device != values.device:
            raise ValueError(f"costs must be on the values' device {values.device}, got {costs.device}")
        cmin, cmax = (float(x) for x in torch.aminmax(costs.detach().double()))
        if not (cmin > 0 and math.isfinite(cmax)):
            raise ValueError(f"costs must be finite and > 0, got values in [{cmin}, {cmax}]")
        total = float(costs.detach().double().sum())
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in [0, {total}] (cost units), got {budget!r}") from None
    if not (0.0 <= budget <= total * (1 + 1e-6)):
        raise ValueError(f"budget must be in [0, Σ costs = {total}] (cost units), got {budget}")
    return budget, total


def _check_finite_values(check: float) -> None:
    """``check`` is any sum that is NaN or infinite exactly when some value is (e.g. ``Σ (u − u)``)."""
    if not math.isfinite(check):
        raise ValueError("values must be finite, found NaN or Inf")


def _sample(u: Tensor, costs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A deterministic strided sample of about ``_SAMPLE_SIZE`` entries (float64)."""
    stride = max(1, u.numel() // _SAMPLE_SIZE)
    return u[::stride].double(), None if costs is None else costs[::stride].double()


# ------------------------------------------------------------------------------------------ soft top-k


def solve_soft_topk(
    values: Tensor,
    budget: float,
    beta: float,
    costs: Tensor | None = None,
    *,
    lam_init: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    out: Tensor | None = None,
) -> SoftTopKSolution:
    """Solve the soft top-k mask without autograd, returning ``λ`` and solver statistics.

    ``beta`` (> 0) is the inverse regularization strength in 1/unit-value units. Stops once
    ``|Σ c·m − B| <= tol·B`` and every entry is within ``tol`` of its limit to first order
    (``max s · |Σ c·m − B| / Σ c·s <= tol`` with ``s = m(1 − m)``); after ``max_iter`` passes it warns
    with the error reached. ``out`` (optional, flat or shaped like ``values``, of the compute dtype)
    receives the mask without allocating.
    """
    budget, total = _validate(values, budget, costs)
    beta = _positive_finite("beta", beta)
    tol = float(tol)
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if lam_init is not None and not math.isfinite(float(lam_init)):
        raise ValueError(f"lam_init must be finite or None, got {lam_init}")
    dtype = _compute_dtype(values)
    u = _unit_values(values, costs, dtype)
    c = None if costs is None else costs.detach().reshape(-1).to(dtype)
    mask = torch.empty_like(u) if out is None else out.view(-1)
    if mask.dtype != dtype or mask.numel() != u.numel():
        raise ValueError(f"out must hold {u.numel()} entries of dtype {dtype}, got {mask.numel()} of {mask.dtype}")

    with torch.no_grad():
        if budget == 0.0 or budget >= total:
            _check_finite_values(float(u.double().sum()))
            mask.fill_(0.0 if budget == 0.0 else 1.0)
            lam = math.inf if budget == 0.0 else -math.inf
            return SoftTopKSolution(mask.view(values.shape), lam, 0, 0.0, 0.0)
        lam, iterations, error, slope = _solve_lambda(u, c, mask, budget, total, beta, lam_init, tol, int(max_iter))
    return SoftTopKSolution(mask.view(values.shape), lam, iterations, error, slope)


def _positive_finite(name: str, x: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return x


def _solve_lambda(
    u: Tensor,
    c: Tensor | None,
    mask: Tensor,
    budget: float,
    total: float,
    beta: float,
    lam_init: float | None,
    tol: float,
    max_iter: int,
) -> tuple[float, int, float, float]:
    """Safeguarded Newton (Halley) on ``f(λ) = Σ c·sigmoid(β(u − λ)) − B``, strictly decreasing in λ.

    Keeps a bracket ``lo < λ* < hi`` from the signs seen so far; a step leaving it, or one not shrinking
    fast enough, is replaced by bisection. Returns ``(λ, passes, relative budget error, Σ c·s)``.
    """
    scalar = {"dtype": u.dtype, "device": u.device}
    beta_t = torch.tensor(beta, **scalar)
    rho = budget / total

    def evaluate(lam: float) -> tuple[float, float, float, float, float]:
        lam_hi = torch.tensor(lam, **scalar)
        lam_lo = torch.tensor(lam - float(lam_hi), **scalar)
        return tuple(kernels.run(kernels.soft_mask_pass, u, c, mask, lam_hi, lam_lo, beta_t))

    def analytic_bracket() -> tuple[float, float]:
        # At λ = max(u) + t/β every mask entry is <= sigmoid(−t) < ρ, so Σ c·m < B; symmetrically below.
        umin, umax = (float(x) for x in torch.aminmax(u))
        t = abs(math.log(rho) - math.log1p(-rho)) + 1.0
        return umin - t / beta, umax + t / beta

    lo, hi = -math.inf, math.inf
    lam = float(lam_init) if lam_init is not None else _initial_lambda(u, rho)
    step = step_before = math.inf
    for it in range(1, max_iter + 1):
        mass, slope, curvature, finite_check, slope_max = evaluate(lam)
        if it == 1:
            _check_finite_values(finite_check)
        f = mass - budget
        # To first order the remaining Newton step moves entry i by s_i·|f| / Σ c·s.
        if abs(f) <= tol * budget and abs(f) * slope_max <= tol * slope:
            return lam, it, abs(f) / budget, slope
        if f > 0:
            lo = lam
        else:
            hi = lam
        newton = _halley_step(f, beta, slope, curvature)
        if (math.isinf(lo) or math.isinf(hi)) and abs(newton) > 64.0 / beta:
            # A long step from a nearly saturated mask: bound it (one extra min/max pass).
            a_lo, a_hi = analytic_bracket()
            lo, hi = max(lo, a_lo), min(hi, a_hi)
        # Newton unless it leaves the bracket or is not shrinking fast enough (as in Numerical Recipes' rtsafe).
        if lo < lam + newton < hi and abs(newton) <= 0.5 * abs(step_before):
            step_before, step = step, newton
        else:
            if math.isinf(lo) or math.isinf(hi):
                a_lo, a_hi = analytic_bracket()
                lo, hi = max(lo, a_lo), min(hi, a_hi)
            midpoint = 0.5 * (lo + hi)
            if not lo < midpoint < hi:  # the bracket has shrunk to adjacent floats
                break
            step_before, step = step, midpoint - lam
        lam += step
    warnings.warn(
        f"soft_topk: λ solve stopped after {it} passes with relative budget error "
        f"{abs(f) / budget:.3e} (tol {tol:.1e})",
        RuntimeWarning,
        stacklevel=3,
    )
    return lam, it, abs(f) / budget, slope


def _halley_step(f: float, beta: float, slope: float, curvature: float) -> float:
    """Root step for ``f`` with ``f' = −β·slope`` and ``f'' = β²·curvature`` (cubic convergence; the
    second-order term is free in the fused pass). Falls back to Newton when the correction misbehaves."""
    if slope <= 0:
        return math.inf
    newton = f / (beta * slope)
    denominator = 1.0 - 0.5 * newton * beta * curvature / slope
    return newton / denominator if denominator > 0.5 else newton


def _initial_lambda(u: Tensor, rho: float) -> float:
    """Cold start: the (1 − ρ)-quantile of a sample of unit values, where the hard top-k boundary lies."""
    sample, _ = _sample(u, None)
    rank = min(len(sample), int((1.0 - rho) * len(sample)) + 1)
    return float(torch.kthvalue(sample.cpu(), rank).values)


class SoftTopK(torch.autograd.Function):
    """``m = soft_topk(values)`` with the closed-form implicit-differentiation backward.

    With ``s = m(1 − m)`` and ``S = Σ c·s``, differentiating ``Σ c·m = B`` gives
    ``∂L/∂v_j = β s_j (g_j / c_j − Σ_i g_i s_i / S)`` for ``g = ∂L/∂m``.
    """

    @staticmethod
    def forward(
        ctx,
        values: Tensor,
        costs: Tensor | None,
        budget: float,
        beta: float,
        lam_init: float | None,
        tol: float,
        max_iter: int,
    ) -> Tensor:
        solution = solve_soft_topk(values, budget, beta, costs, lam_init=lam_init, tol=tol, max_iter=max_iter)
        ctx.save_for_backward(solution.mask, costs)
        ctx.beta, ctx.slope_total = float(beta), solution.slope_total
        ctx.values_dtype = values.dtype
        return solution.mask

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        mask, costs = ctx.saved_tensors
        s = mask * (1 - mask)
        g = grad.to(mask.dtype)
        if ctx.slope_total == 0.0:  # a saturated (or trivial) mask: no direction changes it to first order
            return torch.zeros_like(grad, dtype=ctx.values_dtype), None, None, None, None, None, None
        shift = float((g * s).double().sum()) / ctx.slope_total
        per_cost = g if costs is None else g / costs.to(mask.dtype)
        grad_values = ctx.beta * s * (per_cost - shift)
        return grad_values.to(ctx.values_dtype), None, None, None, None, None, None


def soft_topk(
    values: Tensor,
    budget: float,
    beta: float,
    costs: Tensor | None = None,
    *,
    lam_init: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> Tensor:
    """Differentiable soft top-k mask ``m = sigmoid(β (v/c − λ))`` with ``Σ c·m = budget``.

    ``budget`` is in cost units (a number of entries when ``costs`` is None), ``beta`` > 0 sharpens the
    mask (``β → ∞`` gives the hard top-k). Gradients flow to ``values`` only. For ``λ`` and solver
    statistics, or to write into a preallocated buffer, use :func:`solve_soft_topk`.
    """
    return SoftTopK.apply(values, costs, budget, beta, lam_init, tol, max_iter)


# ------------------------------------------------------------------------------------------ hard top-k


def hard_threshold(
    values: Tensor, budget: float, costs: Tensor | None = None, *, init: HardThreshold | None = None
) -> HardThreshold:
    """Find the hard top-k set by unit value within ``budget`` (cost units) without sorting everything.

    A band of unit values around the boundary comes from the quantile of a strided sample (or, warm, from
    ``init``: its band re-centred on its threshold). One fused pass sums the cost above the band and flags the
    entries inside it; only those are sorted. A band that misses is moved past itself, four times wider.
    """
    budget, total = _validate(values, budget, costs)
    dtype = _compute_dtype(values)
    u = _unit_values(values, costs, dtype)
    c = None if costs is None else costs.detach().reshape(-1).to(dtype)
    fits = budget * (1 + FIT_RTOL)
    with torch.no_grad():
        if total <= fits:
            _check_finite_values(float(u.double().sum()))
            empty = torch.empty(0, dtype=torch.long, device=u.device)
            return HardThreshold(-math.inf, empty, total, (-math.inf, math.inf))
        flags = torch.empty(u.shape, dtype=torch.uint8, device=u.device)
        lo, hi = _initial_band(u, c, budget / total, init)
        for attempt in range(1000):
            lo_t, hi_t = (torch.tensor(x, dtype=dtype, device=u.device) for x in (lo, hi))
            lo, hi = float(lo_t), float(hi_t)
            cost_above, cost_inside, finite_check = kernels.run(kernels.band_pass, u, c, flags, lo_t, hi_t)
            if attempt == 0:
                _check_finite_values(finite_check)
            if cost_above > fits:  # the boundary is at or above hi
                lo, hi = hi, _step_out(hi, hi - lo, +1)
                continue
            if cost_above + cost_inside > fits:
                found = _boundary_in_band(u, c, flags, cost_above, fits)
                if found is not None:
                    return HardThreshold(*found, band=(lo, hi))
            lo, hi = _step_out(lo, hi - lo, -1), lo  # the whole band fits: the boundary is below lo
    raise RuntimeError("hard_threshold: no band held the boundary (please report this as a bug)")


def _initial_band(u: Tensor, c: Tensor | None, rho: float, init: HardThreshold | None) -> tuple[float, float]:
    if init is not None and math.isfinite(init.threshold) and all(map(math.isfinite, init.band)):
        # Half the last band's width: bands narrow while they keep holding the boundary and widen on a miss.
        half = 0.25 * (init.band[1] - init.band[0])
        return init.threshold - half, init.threshold + half
    sample, sample_costs = _sample(u, c)
    order = torch.sort(sample, descending=True, stable=True).indices
    ranked = sample[order]
    weight = torch.ones_like(ranked) if sample_costs is None else sample_costs[order]
    fraction = torch.cumsum(weight, 0) / weight.sum()
    centre = int(torch.searchsorted(fraction, torch.tensor(rho, dtype=fraction.dtype, device=fraction.device)))
    # About four standard deviations of the sample quantile's rank on each side.
    span = int(4 * math.sqrt(len(ranked) * rho * (1 - rho))) + 4
    top, bottom = centre - span, centre + span
    hi = float(ranked[top]) if top >= 0 else math.inf
    lo = float(ranked[bottom]) if bottom < len(ranked) else -math.inf
    return lo, hi


def _step_out(edge: float, width: float, direction: int) -> float:
    return edge + direction * 4.0 * max(width, 1e-6 * abs(edge), 1e-30)


def _boundary_in_band(
    u: Tensor, c: Tensor | None, flags: Tensor, cost_above: float, fits: float
) -> tuple[float, Tensor, float] | None:
    """Locate the first entry that does not fit among the flagged ones.

    Returns ``(threshold, tie_keep, kept_cost)``, or None when rounding makes the whole band fit after all.
    """
    index = flags.nonzero().squeeze(1)  # ascending: ties are taken in this order
    band_values = u[index]
    if c is None:  # unit costs: the boundary is an order statistic of the band
        n_fit = math.floor(fits - cost_above)
        if n_fit >= len(index):
            return None
        threshold = float(torch.kthvalue(band_values.cpu(), len(index) - n_fit).values)
        n_above = int((band_values > threshold).sum())
        tie_keep = index[band_values == threshold][: n_fit - n_above]
        return threshold, tie_keep, cost_above + n_fit
    order = torch.sort(band_values, descending=True, stable=True).indices
    cumulative = cost_above + torch.cumsum(c[index[order]].double(), 0)
    n_fit = int((cumulative <= fits).sum())
    if n_fit == len(order):
        return None
    threshold = float(band_values[order[n_fit]])
    kept = order[:n_fit]
    tie_keep = index[kept][band_values[kept] == threshold]
    return threshold, tie_keep, float(cumulative[n_fit - 1]) if n_fit else cost_above


def hard_topk(values: Tensor, budget: float, costs: Tensor | None = None) -> Tensor:
    """Boolean mask of the hard top-k set by unit value within ``budget`` (see :func:`hard_threshold`)."""
    return hard_threshold(values, budget, costs).mask(values, costs)
