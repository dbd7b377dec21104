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

Both solvers work on *groups*: contiguous parts of one flat vector, each with its own budget, solved in
lockstep so that one host read per pass serves every group (:func:`hard_topk_groups`,
:func:`soft_topk_groups`; the Sparsifier's per-layer allocations are many groups). The one-vector functions
(:func:`hard_threshold`, :func:`solve_soft_topk`, :func:`soft_topk`) are the one-group case.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
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

    def warm_state(self) -> Tensor:
        """``[threshold, lo, hi, 0]`` (float64, on the CPU): the ``warm`` argument of :func:`hard_topk_groups`."""
        return torch.tensor([self.threshold, *self.band, 0.0], dtype=torch.float64)


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


def _positive_finite(name: str, x: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return x


def _sample(u: Tensor, costs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A deterministic strided sample of about ``_SAMPLE_SIZE`` entries (float64)."""
    stride = max(1, u.numel() // _SAMPLE_SIZE)
    return u[::stride].double(), None if costs is None else costs[::stride].double()


def _part(x: Tensor | None, part: slice) -> Tensor | None:
    return None if x is None else x[part]


# ------------------------------------------------------------------------------------------ soft top-k


@dataclass(frozen=True)
class SoftSolve:
    """One group's result from :func:`soft_topk_groups` (its mask is in ``out``); see :class:`SoftTopKSolution`.

    ``moment`` is ``Σ c·s·(u − λ)`` (the budget residual's derivative in β), and ``budget`` / ``beta`` are what
    was solved for: with ``slope_total`` they predict λ for a nearby budget and β (:meth:`predict`).
    """

    lam: float
    iterations: int
    budget_error: float
    slope_total: float
    moment: float = 0.0
    budget: float = 0.0
    beta: float = 1.0

    def predict(self, budget: float, beta: float) -> float:
        """λ for ``budget`` and ``beta`` to first order (the unit values unchanged): differentiating
        ``Σ c·sigmoid(β(u − λ)) = B`` gives ``dλ = (Σ c·s·(u − λ)·dβ − dB) / (β·S)``."""
        if self.slope_total <= 0:
            return self.lam
        return self.lam + (self.moment * (beta - self.beta) - (budget - self.budget)) / (self.beta * self.slope_total)


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
    _check_solver_options(tol, max_iter)
    if lam_init is not None and not math.isfinite(float(lam_init)):
        raise ValueError(f"lam_init must be finite or None, got {lam_init}")
    dtype = _compute_dtype(values)
    u = _unit_values(values, costs, dtype)
    c = None if costs is None else costs.detach().reshape(-1).to(dtype)
    mask = torch.empty_like(u) if out is None else out.view(-1)
    if mask.dtype != dtype or mask.numel() != u.numel():
        raise ValueError(f"out must hold {u.numel()} entries of dtype {dtype}, got {mask.numel()} of {mask.dtype}")
    if budget == 0.0 or budget >= total:
        _check_finite_values(float(u.double().sum()))
    whole = slice(0, u.numel())
    (solve,) = soft_topk_groups(u, [whole], [budget], [total], [beta], c, mask, [lam_init], tol, int(max_iter))
    return SoftTopKSolution(mask.view(values.shape), solve.lam, solve.iterations, solve.budget_error, solve.slope_total)


def _check_solver_options(tol: float, max_iter: int) -> None:
    if not 0 < float(tol) < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


class _LambdaSearch:
    """Safeguarded Newton (Halley) on one group's ``f(λ) = Σ c·sigmoid(β(u − λ)) − B``, strictly decreasing.

    Keeps a bracket ``lo < λ* < hi`` from the signs seen so far; a step leaving it, or one not shrinking fast
    enough, is replaced by bisection (as in Numerical Recipes' rtsafe).
    """

    def __init__(self, bounds: Callable[[], tuple[float, float]], budget: float, total: float, beta: float, lam):
        self.bounds, self.budget, self.beta, self.lam = bounds, budget, beta, lam
        self.rho = budget / total
        self.lo, self.hi = -math.inf, math.inf
        self.step = self.step_before = math.inf
        self.passes, self.error, self.slope, self.moment = 0, math.inf, 0.0, 0.0
        self.done = False

    def analytic_bracket(self) -> None:
        # At λ = max(u) + t/β every mask entry is <= sigmoid(−t) < ρ, so Σ c·m < B; symmetrically below.
        umin, umax = self.bounds()
        t = abs(math.log(self.rho) - math.log1p(-self.rho)) + 1.0
        self.lo, self.hi = max(self.lo, umin - t / self.beta), min(self.hi, umax + t / self.beta)

    def update(self, mass: float, slope: float, curvature: float, slope_max: float, tol: float) -> None:
        """Take one evaluation at ``self.lam``; set ``done`` or move ``lam`` for the next pass."""
        self.passes += 1
        f = mass - self.budget
        self.error, self.slope = abs(f) / self.budget, slope
        # To first order the remaining Newton step moves entry i by s_i·|f| / Σ c·s.
        if abs(f) <= tol * self.budget and abs(f) * slope_max <= tol * slope:
            self.done = True
            return
        if f > 0:
            self.lo = self.lam
        else:
            self.hi = self.lam
        newton = _halley_step(f, self.beta, slope, curvature)
        if (math.isinf(self.lo) or math.isinf(self.hi)) and abs(newton) > 64.0 / self.beta:
            self.analytic_bracket()  # a long step from a nearly saturated mask: bound it (one extra min/max pass)
        if self.lo < self.lam + newton < self.hi and abs(newton) <= 0.5 * abs(self.step_before):
            self.step_before, self.step = self.step, newton
        else:
            if math.isinf(self.lo) or math.isinf(self.hi):
                self.analytic_bracket()
            midpoint = 0.5 * (self.lo + self.hi)
            if not self.lo < midpoint < self.hi:  # the bracket has shrunk to adjacent floats
                self.done = True
                return
            self.step_before, self.step = self.step, midpoint - self.lam
        self.lam += self.step


def soft_topk_groups(
    u: Tensor,
    parts: list[slice],
    budgets: list[float],
    totals: list[float],
    betas: list[float],
    costs: Tensor | None,
    out: Tensor,
    lam_init: list[float | Tensor | None],
    tol: float,
    max_iter: int,
) -> list[SoftSolve]:
    """Solve every group's soft mask into ``out[part]``, all groups in lockstep: one host read per pass.

    ``u``: flat unit values (the compute dtype); ``costs``: flat per-entry costs or None; per group its
    ``part`` of them, its budget and total cost (cost units), β and starting λ: a number, a finite 0-dim
    float64 tensor on the device (a guess computed there: it is read with the first pass, not before), or None
    (a cold start from a sample's quantile).
    Trivial budgets (0 or the total) give a constant mask and ``λ = ±inf`` without a pass (nor a finiteness
    check: :func:`hard_topk_groups` checks every group). Arguments are trusted (the one-vector functions
    validate them).
    """
    solves: list[SoftSolve | None] = [None] * len(parts)
    searches: dict[int, _LambdaSearch] = {}
    extremes: dict[int, tuple[float, float]] = {}

    def bounds(g: int) -> tuple[float, float]:
        """min and max of group g's unit values; read for every group still searching at once."""
        if g not in extremes:
            pending = [k for k in searches if not searches[k].done and k not in extremes] or [g]
            rows = torch.stack([torch.stack(torch.aminmax(u[parts[k]])) for k in pending]).tolist()
            extremes.update(zip(pending, map(tuple, rows)))
        return extremes[g]

    for g, (part, budget, total, beta, lam) in enumerate(zip(parts, budgets, totals, betas, lam_init)):
        if budget == 0.0 or budget >= total:
            out[part].fill_(0.0 if budget == 0.0 else 1.0)
            solves[g] = SoftSolve(math.inf if budget == 0.0 else -math.inf, 0, 0.0, 0.0)
        else:
            if lam is None:
                lam = _initial_lambda(u[part], budget / total)
            searches[g] = _LambdaSearch(functools.partial(bounds, g), budget, total, beta, lam)
    active = list(searches)
    for _ in range(max_iter):
        if not active:
            break
        start = [searches[g].lam for g in active]
        host = torch.tensor([0.0 if isinstance(x, Tensor) else x for x in start], dtype=torch.float64)
        beta = torch.tensor([searches[g].beta for g in active], dtype=torch.float64)
        lam, beta = kernels.to_device(torch.stack([host, beta]), u.device).unbind(0)
        for k, x in enumerate(start):
            if isinstance(x, Tensor):
                lam[k].copy_(x)
        scalars = _soft_mask_scalars(lam, beta, u.dtype)
        sums = [
            kernels.launch(kernels.soft_mask_pass, u[parts[g]], _part(costs, parts[g]), out[parts[g]], *scalars[k])
            for k, g in enumerate(active)
        ]
        rows = torch.cat([torch.stack(sums), lam[:, None]], 1).tolist()  # the one host read of this pass
        for g, (mass, slope, curvature, finite_check, moment, slope_max, lam_used) in zip(active, rows):
            search = searches[g]
            if search.passes == 0:
                _check_finite_values(finite_check)
            search.lam, search.moment = lam_used, moment  # a device guess becomes known here
            search.update(mass, slope, curvature, slope_max, tol)
        active = [g for g in active if not searches[g].done]
    for g in active:
        warnings.warn(
            f"soft_topk: λ solve stopped after {searches[g].passes} passes with relative budget error "
            f"{searches[g].error:.3e} (tol {tol:.1e})",
            RuntimeWarning,
            stacklevel=3,
        )
    for g, search in searches.items():
        solves[g] = SoftSolve(
            search.lam, search.passes, search.error, search.slope, search.moment, search.budget, search.beta
        )
    return solves


def _soft_mask_scalars(lam: Tensor, beta: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows ``[λ_hi, λ_lo, β]`` in ``dtype`` for :func:`kernels.soft_mask_pass`, from float64 vectors ``lam`` and
    ``beta``: λ split in two floats so that ``u − λ`` keeps float64 accuracy in float32 arithmetic."""
    lam_hi = lam.to(dtype)
    lam_lo = (lam - lam_hi.double()).to(dtype)
    return torch.stack([lam_hi, lam_lo, beta.to(dtype)], 1)


def write_soft_masks(
    u: Tensor, parts: list[slice], costs: Tensor | None, out: Tensor, lam: Tensor, beta: Tensor
) -> None:
    """Write each group's soft mask ``sigmoid(β (u − λ))`` into ``out[part]`` at a given λ and β (float64 device
    vectors, one entry per part): one pass each, nothing read on the host."""
    scalars = _soft_mask_scalars(lam, beta, u.dtype)
    for k, part in enumerate(parts):
        kernels.launch(kernels.soft_mask_pass, u[part], _part(costs, part), out[part], *scalars[k])


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
    flags = torch.empty(u.shape, dtype=torch.uint8, device=u.device)
    kept = torch.empty(u.shape, dtype=torch.bool, device=u.device)
    warm = None if init is None else init.warm_state().to(u.device)
    whole = slice(0, u.numel())
    (state,) = hard_topk_groups(u, [whole], [budget], [total], c, flags, kept, [warm])
    if state is None:  # everything fits
        empty = torch.empty(0, dtype=torch.long, device=u.device)
        return HardThreshold(-math.inf, empty, total, (-math.inf, math.inf))
    threshold, lo, hi, _ = state.tolist()
    at_threshold = kept & (u == threshold)
    tie_keep = at_threshold.nonzero().squeeze(1)
    kept_cost = float(torch.count_nonzero(kept)) if c is None else float(c.double()[kept].sum())  # no int64 copy
    return HardThreshold(threshold, tie_keep, kept_cost, (lo, hi))


def hard_topk_groups(
    u: Tensor,
    parts: list[slice],
    budgets: list[float],
    totals: list[float],
    costs: Tensor | None,
    flags: Tensor,
    out: Tensor,
    warm: list[Tensor | None],
) -> list[Tensor | None]:
    """Write every group's hard top-k set into ``out[part]`` (bool), all groups in lockstep.

    ``u``: flat unit values; ``costs``: flat per-entry costs or None (then budgets count entries); ``flags``: a
    flat uint8 scratch buffer like ``u`` (it ends up flagging the entries inside the bands). Per group: its
    ``part``, budget and total cost (cost units) and its warm state from the previous call (None: cold start from
    a sample). Returns each group's new warm state, a float64 device tensor
    ``[threshold, band lo, band hi, movement]`` (None where everything fits).

    Host reads: one per band attempt (usually one) plus one to list the entries inside the bands; everything
    else stays on the device.
    """
    fits = [b * (1 + FIT_RTOL) for b in budgets]
    trivial = [total <= fit for total, fit in zip(totals, fits)]
    above_bytes = out.view(torch.uint8)  # the band pass writes the entries above the band straight into ``out``
    for part, is_trivial in zip(parts, trivial):
        if is_trivial:
            flags[part].zero_()
            out[part].fill_(True)
    active = [g for g in range(len(parts)) if not trivial[g]]
    # Σ (u − u) of the trivial groups, read with the first band attempt (NaN exactly when a value is not finite).
    trivial_check = torch.stack(
        [(u[p] - u[p]).sum().double() for p, t in zip(parts, trivial) if t] or [u.new_zeros((), dtype=torch.float64)]
    ).sum()
    if not active:
        _check_finite_values(float(trivial_check))
    bands = {g: _initial_band(u[parts[g]], _part(costs, parts[g]), budgets[g] / totals[g], warm[g]) for g in active}
    above: dict[int, float] = {}
    inside: dict[int, float] = {}
    band_of: dict[int, Tensor] = {}
    first = True
    while active:
        band = torch.stack([bands[g] for g in active]).to(u.dtype)
        sums = [
            kernels.launch(
                kernels.band_pass,
                u[parts[g]],
                _part(costs, parts[g]),
                (flags[parts[g]], above_bytes[parts[g]]),
                *band[k],
            )
            for k, g in enumerate(active)
        ]
        table = torch.cat([torch.stack(sums), band.double()], 1)
        if first:
            table = torch.cat([table, trivial_check.expand(1, table.shape[1])])
        rows = table.tolist()  # the one host read of this attempt
        if first:
            _check_finite_values(sum(row[2] for row in rows[:-1]) + rows[-1][0])
            rows, first = rows[:-1], False
        moved = []
        for k, (g, (cost_above, cost_inside, _, lo, hi)) in enumerate(zip(active, rows)):
            if cost_above > fits[g]:  # the boundary is at or above hi
                bands[g] = torch.tensor([hi, _step_out(hi, hi - lo, +1)], dtype=torch.float64)
            elif cost_above + cost_inside > fits[g]:
                above[g], inside[g], band_of[g] = cost_above, cost_inside, band[k].double()
                continue
            else:  # the whole band fits: the boundary is below lo
                bands[g] = torch.tensor([_step_out(lo, hi - lo, -1), lo], dtype=torch.float64)
            moved.append(g)
        for g in moved:
            bands[g] = kernels.to_device(bands[g], u.device)
        active = moved
    resolved = [g for g in range(len(parts)) if not trivial[g]]
    if not resolved:
        return [None] * len(parts)
    previous = {g: warm[g][0] for g in resolved if warm[g] is not None}
    states = _rank_bands(u, parts, resolved, costs, flags, out, fits, above, inside, band_of, previous)
    return [states.get(g) for g in range(len(parts))]


def _rank_bands(
    u: Tensor,
    parts: list[slice],
    resolved: list[int],
    costs: Tensor | None,
    flags: Tensor,
    out: Tensor,
    fits: list[float],
    above: dict[int, float],
    inside: dict[int, float],
    band_of: dict[int, Tensor],
    previous: dict[int, Tensor],
) -> dict[int, Tensor]:
    """Keep the flagged entries that fit, in descending unit value (ties: lower flat index first), per group.

    Sorts only the entries inside the bands, all groups together (by group, then value, then index); returns
    each resolved group's warm state ``[threshold, lo, hi, movement since the previous threshold]``.
    """
    device = u.device
    index = _flagged_positions(flags)  # ascending: ties are taken in this order
    bands = torch.stack([band_of[g] for g in resolved])
    if len(resolved) == 1 and costs is None:
        (g,) = resolved
        threshold = _select_in_band(u[index], index, min(math.floor(fits[g] - above[g]), int(inside[g])), out)
        return _warm_states(resolved, threshold.double().reshape(1), bands, previous)
    starts = kernels.to_device(torch.tensor([parts[g].start for g in resolved]), device)
    group = torch.searchsorted(starts, index, right=True) - 1  # position in ``resolved``
    values = u[index]
    order = torch.sort(values, descending=True, stable=True).indices
    if len(resolved) > 1:  # then by group, keeping the value order within each
        group_sorted, by_group = torch.sort(group[order], stable=True)
        order = order[by_group]
    else:
        group_sorted = group
    values, index = values[order], index[order]
    n = len(resolved)
    first = torch.searchsorted(group_sorted, torch.arange(n, device=device))
    band_size = kernels.to_device(torch.tensor([inside[g] for g in resolved], dtype=torch.float64), device)
    if costs is None:  # unit costs: the first ``n_fit`` of each group's band fit
        n_fit = [min(math.floor(fits[g] - above[g]), int(inside[g])) for g in resolved]
        n_kept = kernels.to_device(torch.tensor(n_fit), device)
        rank = torch.arange(len(index), device=device) - first[group_sorted]
        kept = rank < n_kept[group_sorted]
    else:
        n_band = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, group_sorted, torch.ones_like(index))
        band_size = n_band.double()
        host = torch.tensor([[above[g], fits[g]] for g in resolved], dtype=torch.float64)
        base_above, fit = kernels.to_device(host, device).unbind(1)
        cumulative = torch.cumsum(costs[index].double(), 0)
        before = torch.cat([cumulative.new_zeros(1), cumulative])[first]  # cost of earlier groups' band entries
        kept = cumulative - before[group_sorted] + base_above[group_sorted] <= fit[group_sorted]
        n_kept = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, group_sorted, kept.long())
    out[index] = kept
    # The threshold: the first entry that does not fit (the band's lower edge when rounding lets all of it fit).
    position = (first + n_kept).clamp(max=len(index) - 1)
    threshold = torch.where(n_kept < band_size, values[position].double(), bands[:, 0])
    return _warm_states(resolved, threshold, bands, previous)


def _flagged_positions(flags: Tensor) -> Tensor:
    """Positions of the nonzero bytes of a flat uint8 ``flags``, ascending.

    The CPU's ``nonzero`` takes about as long per byte as per 8-byte word, so where few bytes are set (the bands
    keep them few) the words holding one are listed first, then only their bytes: 4-5× less time for one more
    host read. On CUDA, ``nonzero`` is cheap and a host read is not.
    """
    n_words = flags.numel() // 8
    if flags.device.type != "cpu" or n_words < 1 << 14 or flags.storage_offset() % 8:
        return flags.nonzero().squeeze(1)
    words = flags[: 8 * n_words].view(torch.int64).nonzero().squeeze(1)
    if len(words) > n_words // 16:  # the bytes of that many words cost more than one pass over all of them
        return flags.nonzero().squeeze(1)
    candidates = torch.cat(
        [(8 * words[:, None] + torch.arange(8)).reshape(-1), torch.arange(8 * n_words, flags.numel())]
    )
    return candidates[flags[candidates].nonzero().squeeze(1)]


def _select_in_band(values: Tensor, index: Tensor, n_fit: int, out: Tensor) -> Tensor:
    """One group, unit costs: keep the ``n_fit`` largest of the band's ``values`` (ties: lower ``index`` first)
    by selection rather than a sort; returns the threshold (the largest value not kept). ``n_fit`` < band size."""
    threshold = torch.kthvalue(values, len(values) - n_fit).values
    above = values > threshold
    ties = values == threshold  # in ascending index order: the first ones fill what is left
    tie_rank = torch.cumsum(ties, 0, dtype=torch.int64)
    out[index] = above | (ties & (tie_rank <= n_fit - above.sum()))
    return threshold


def _warm_states(
    resolved: list[int], threshold: Tensor, bands: Tensor, previous: dict[int, Tensor]
) -> dict[int, Tensor]:
    last = torch.stack([previous.get(g, threshold[k]) for k, g in enumerate(resolved)])
    movement = torch.nan_to_num(threshold - last, nan=0.0, posinf=0.0, neginf=0.0)
    states = torch.cat([threshold[:, None], bands, movement[:, None]], 1)
    return dict(zip(resolved, states.unbind(0)))


def _initial_band(u: Tensor, c: Tensor | None, rho: float, warm: Tensor | None) -> Tensor:
    """The first band ``[lo, hi]`` (float64, on u's device) to try, computed on the device."""
    if warm is not None:
        # Centred where the threshold is heading (it moves steadily while the density ramps), half the last width
        # (bands narrow while they hold the boundary and widen on a miss) but at least the last movement's span.
        threshold, lo, hi, movement = warm.unbind(0)
        half = torch.maximum(0.25 * (hi - lo), 1.5 * movement.abs())
        centre = threshold + movement
        band = torch.stack([centre - half, centre + half])
        # A non-finite band (from an unbounded one) covers everything instead.
        unbounded = torch.full_like(band, math.inf)
        unbounded[0] = -math.inf
        return torch.where(torch.isfinite(band), band, unbounded)
    sample, sample_costs = _sample(u, c)
    order = torch.sort(sample, descending=True, stable=True).indices
    ranked = sample[order]
    weight = torch.ones_like(ranked) if sample_costs is None else sample_costs[order]
    fraction = torch.cumsum(weight, 0) / weight.sum()
    centre = torch.searchsorted(fraction, torch.full((1,), rho, dtype=fraction.dtype, device=fraction.device))
    # About four standard deviations of the sample quantile's rank on each side.
    span = int(4 * math.sqrt(len(ranked) * rho * (1 - rho))) + 4
    top, bottom = centre - span, centre + span
    inf = torch.full((1,), math.inf, dtype=ranked.dtype, device=ranked.device)
    hi = torch.where(top >= 0, ranked[top.clamp(min=0)], inf)
    lo = torch.where(bottom < len(ranked), ranked[bottom.clamp(max=len(ranked) - 1)], -inf)
    return torch.cat([lo, hi])


def _step_out(edge: float, width: float, direction: int) -> float:
    return edge + direction * 4.0 * max(width, 1e-6 * abs(edge), 1e-30)


def hard_topk(values: Tensor, budget: float, costs: Tensor | None = None) -> Tensor:
    """Boolean mask of the hard top-k set by unit value within ``budget`` (see :func:`hard_threshold`)."""
    return hard_threshold(values, budget, costs).mask(values, costs)
