"""Fused single-pass reductions behind the top-k solvers.

Each kernel is plain PyTorch over one flat slice and returns two float64 vectors, partial sums and
partial maxima, so the same code runs two ways: compiled by ``torch.compile`` over the whole vector (one
fused loop, no temporaries) for large inputs, or eagerly over fixed-size chunks (bounded temporaries) for
small inputs and wherever compilation is unavailable; the chunks' sums add up and their maxima combine.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

COMPILE_MIN_NUMEL = 1 << 18
"""Inputs with at least this many entries use the compiled kernels (when compilation is enabled)."""

EAGER_CHUNK = 1 << 20
"""Entries per chunk on the eager path: bounds its temporaries to a few MB."""

_compile_enabled = os.environ.get("SPARTAN_COMPILE", "1") != "0"
_compiled: dict[Callable, Callable] = {}


def soft_mask_pass(
    u: Tensor, costs: Tensor | None, out: Tensor, lam_hi: Tensor, lam_lo: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """Write ``m = sigmoid(beta * (u - lam))`` into ``out``.

    Returns ``[Σ c·m, Σ c·s, Σ c·s·(1 − 2m), Σ (u − u)]`` and ``[max s]`` with ``s = m(1 − m)``: the
    budget residual's value and first two derivatives (up to powers of ``-beta``) and a validity check.

    ``lam = lam_hi + lam_lo`` is split in two floats of ``u``'s dtype so that ``u − lam`` keeps
    float64 accuracy in float32 arithmetic (``u − lam_hi`` is exact near the threshold, where it
    matters). ``Σ (u − u)`` is NaN exactly when some entry is not finite, and 0 otherwise.
    """
    m = torch.sigmoid(((u - lam_hi) - lam_lo) * beta)
    out.copy_(m)
    s = m * (1 - m)
    curve = s * (1 - 2 * m)
    if costs is None:
        mass, slope, curvature = m.double(), s.double(), curve.double()
    else:
        c = costs.double()
        mass, slope, curvature = m.double() * c, s.double() * c, curve.double() * c
    sums = torch.stack([mass.sum(), slope.sum(), curvature.sum(), (u - u).sum().double()])
    return sums, s.amax().double().reshape(1)


def band_pass(u: Tensor, costs: Tensor | None, flags: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Set ``flags`` (uint8) to 1 where ``lo <= u < hi``.

    Returns ``[cost of u >= hi, cost in band, Σ (u − u)]`` and no maxima; costs are counts without ``costs``.
    """
    inside = (u >= lo) & (u < hi)
    # uint8 rather than bool: Inductor's C++ backend does not vectorize bool stores (8x slower here).
    inside_u8 = torch.where(inside, 1, 0).to(torch.uint8)
    flags.copy_(inside_u8)
    if costs is None:  # exact integer counts, loaded narrow (twice as fast as float64 sums)
        cost_above = (u >= hi).to(torch.int32).sum().double()
        cost_inside = inside_u8.to(torch.int32).sum().double()
    else:
        c = costs.double()
        cost_above = torch.where(u >= hi, c, 0.0).sum()
        cost_inside = torch.where(inside, c, 0.0).sum()
    sums = torch.stack([cost_above, cost_inside, (u - u).sum().double()])
    return sums, sums.new_empty(0)


def run(
    kernel: Callable[..., tuple[Tensor, Tensor]], u: Tensor, costs: Tensor | None, out: Tensor, *scalars: Tensor
) -> list[float]:
    """Run ``kernel(u, costs, out, *scalars)`` over all of ``u``; return its sums followed by its maxima."""
    global _compile_enabled
    if _compile_enabled and u.numel() >= COMPILE_MIN_NUMEL:
        fn = _compiled.get(kernel)
        if fn is None:
            fn = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
        try:
            return torch.cat(fn(u, costs, out, *scalars)).tolist()
        except Exception as err:  # a missing C++ compiler or Triton must not stop training
            _compile_enabled = False
            warnings.warn(
                f"spartan: torch.compile of the top-k kernels failed ({type(err).__name__}: "
                f"{err}); falling back to eager chunked kernels",
                RuntimeWarning,
                stacklevel=2,
            )
    sums = maxima = None
    for start in range(0, u.numel(), EAGER_CHUNK):
        part = slice(start, start + EAGER_CHUNK)
        chunk_sums, chunk_maxima = kernel(u[part], None if costs is None else costs[part], out[part], *scalars)
        sums = chunk_sums if sums is None else sums + chunk_sums
        maxima = chunk_maxima if maxima is None else torch.maximum(maxima, chunk_maxima)
    return torch.cat([sums, maxima]).tolist()


def set_compile(enabled: bool) -> None:
    """Turn the compiled kernels on or off (``SPARTAN_COMPILE=0`` turns them off at import)."""
    global _compile_enabled
    _compile_enabled = enabled
