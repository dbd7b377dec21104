"""Fused single-pass kernels: the reductions behind the top-k solvers (:func:`launch`) and the elementwise
gradient passes of Spartan's masks (:func:`fuse`).

Each top-k kernel is plain PyTorch over one flat slice and returns two float64 vectors, partial sums and
partial maxima, so the same code runs two ways: compiled by ``torch.compile`` over the whole vector (one
fused loop, no temporaries) for large inputs, or eagerly over fixed-size chunks (bounded temporaries) for
small inputs and wherever compilation is unavailable; the chunks' sums add up and their maxima combine.
``band_pass`` alone has an eager twin (``_band_pass_eager``, the same results): what Inductor vectorizes well and
what eager PyTorch runs fast differ for its bool and uint8 work.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

COMPILE_MIN_NUMEL = 1 << 17
"""Inputs with at least this many entries use the compiled kernels (when compilation is enabled)."""

EAGER_CHUNK = 1 << 20
"""Entries per chunk on the eager path on the CPU: bounds its temporaries to a few MB."""

EAGER_CHUNK_CUDA = 1 << 24
"""Entries per chunk on the eager path on CUDA: a few launches per pass, temporaries of tens of MB."""

_compile_enabled = os.environ.get("SPARTAN_COMPILE", "1") != "0"
_fallback_reason = "" if _compile_enabled else "turned off (SPARTAN_COMPILE=0 or kernels.set_compile(False))"
_compiled: dict[Callable, Callable] = {}
_over_limit: set[Callable] = set()

RECOMPILE_LIMIT = 64
"""Compiled variants each kernel may have. Dynamo's default (8) counts every dtype, block shape and buffer offset
that a process meets, and a process training several models (the test suite, a notebook) goes past it."""


def soft_mask_pass(
    u: Tensor, costs: Tensor | None, out: Tensor, lam_hi: Tensor, lam_lo: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """Write ``m = sigmoid(beta * (u - lam))`` into ``out``.

    Returns ``[Σ c·m, Σ c·s, Σ c·s·(1 − 2m), Σ (u − u), Σ c·s·(u − λ)]`` and ``[max s]`` with ``s = m(1 − m)``:
    the budget residual's value and first two derivatives in λ (up to powers of ``-beta``), a validity check,
    and the residual's derivative in β (to predict the next step's λ).

    ``lam = lam_hi + lam_lo`` is split in two floats of ``u``'s dtype so that ``u − lam`` keeps
    float64 accuracy in float32 arithmetic (``u − lam_hi`` is exact near the threshold, where it
    matters). ``Σ (u − u)`` is NaN exactly when some entry is not finite, and 0 otherwise.
    """
    x = (u - lam_hi) - lam_lo
    m = torch.sigmoid(x * beta)
    out.copy_(m)
    s = m * (1 - m)
    curve = s * (1 - 2 * m)
    moment = s * x
    terms = (m, s, curve, moment)
    if costs is None:  # sums accumulate in float64 without float64 copies
        mass, slope, curvature, moment = (t.sum(dtype=torch.float64) for t in terms)
    else:
        c = costs.double()
        mass, slope, curvature, moment = ((t.double() * c).sum() for t in terms)
    sums = torch.stack([mass, slope, curvature, (u - u).sum().double(), moment])
    return sums, s.amax().double().reshape(1)


def band_pass(
    u: Tensor, costs: Tensor | None, out: tuple[Tensor, Tensor], lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor]:
    """Into ``out = (inside, above)`` (uint8, like ``u``) write 1 where ``lo <= u < hi`` and where ``u >= hi``.

    Returns ``[cost of u >= hi, cost in band, Σ (u − u)]`` and no maxima; costs are counts without ``costs``.
    Written for Inductor's C++ code: int64 ``where``s, sums and uint8 stores vectorize (bool stores, and sums of
    uint8 converted to int32, run 3–15× slower); :func:`_band_pass_eager` is the same for eager chunks.
    ``above`` is meant to be the hard mask's bytes (``mask.view(torch.uint8)``): no second pass writes it.
    """
    inside, above = out
    from_lo = torch.where(u >= lo, 1, 0)
    from_hi = torch.where(u >= hi, 1, 0)
    inside.copy_((from_lo - from_hi).to(torch.uint8))
    above.copy_(from_hi.to(torch.uint8))
    if costs is None:  # exact integer counts
        cost_above = from_hi.sum().double()
        cost_inside = from_lo.sum().double() - cost_above
    else:
        c = costs.double()
        cost_above = torch.where(from_hi == 1, c, 0.0).sum()
        cost_inside = torch.where(from_lo == 1, c, 0.0).sum() - cost_above
    sums = torch.stack([cost_above, cost_inside, (u - u).sum().double()])
    return sums, sums.new_empty(0)


def _band_pass_eager(
    u: Tensor, costs: Tensor | None, out: tuple[Tensor, Tensor], lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`band_pass` in the fewest eager ops (bool compares, sums with an int32 accumulator)."""
    inside, above = out
    from_lo, from_hi = u >= lo, u >= hi
    above.copy_(from_hi.view(torch.uint8))
    torch.sub(from_lo.view(torch.uint8), above, out=inside)
    if costs is None:
        cost_above = from_hi.sum(dtype=torch.int32).double()
        cost_inside = from_lo.sum(dtype=torch.int32).double() - cost_above
    else:
        c = costs.double()
        cost_above = torch.where(from_hi, c, 0.0).sum()
        cost_inside = torch.where(from_lo, c, 0.0).sum() - cost_above
    sums = torch.stack([cost_above, cost_inside, (u - u).sum().double()])
    return sums, sums.new_empty(0)


_EAGER = {band_pass: _band_pass_eager}


def launch(
    kernel: Callable[..., tuple[Tensor, Tensor]],
    u: Tensor,
    costs: Tensor | None,
    out: Tensor | tuple[Tensor, ...],
    *scalars: Tensor,
) -> Tensor:
    """Run ``kernel(u, costs, out, *scalars)`` over all of ``u`` (``out``: one tensor like ``u`` or a tuple of
    them); return its sums followed by its maxima as one float64 tensor on ``u``'s device (nothing is read on
    the host).

    A compilation failure raises on CUDA (the eager path launches hundreds of kernels per pass there); set
    ``SPARTAN_COMPILE=0`` or call :func:`set_compile` to run eagerly on purpose. On the CPU it warns once and
    falls back to the eager chunks; :func:`path` reports which path is active and why.
    """
    if _compile_enabled and u.numel() >= COMPILE_MIN_NUMEL:
        ran, result = _run_compiled(kernel, u, costs, out, *scalars)
        if ran:
            return torch.cat(result)
    chunk = EAGER_CHUNK_CUDA if u.device.type == "cuda" else EAGER_CHUNK
    eager = _EAGER.get(kernel, kernel)
    sums = maxima = None
    for start in range(0, u.numel(), chunk):
        part = slice(start, start + chunk)
        chunk_out = tuple(o[part] for o in out) if isinstance(out, tuple) else out[part]
        chunk_sums, chunk_maxima = eager(u[part], None if costs is None else costs[part], chunk_out, *scalars)
        sums = chunk_sums if sums is None else sums + chunk_sums
        maxima = chunk_maxima if maxima is None else torch.maximum(maxima, chunk_maxima)
    return torch.cat([sums, maxima])


def fuse(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)``, compiled into one loop when its first argument has at least :data:`COMPILE_MIN_NUMEL`
    entries and compilation is on; eagerly otherwise, and inside a region ``torch.compile`` is tracing (the
    kernel is then part of the caller's graph). Failures are handled as in :func:`launch`."""
    if _compile_enabled and args[0].numel() >= COMPILE_MIN_NUMEL and not torch.compiler.is_compiling():
        ran, result = _run_compiled(kernel, *args)
        if ran:
            return result
    return kernel(*args)


def _run_compiled(kernel: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """``(True, result)`` of ``kernel`` compiled, or ``(False, None)`` where it cannot run compiled now: past
    :data:`RECOMPILE_LIMIT` variants (warned once per kernel; that call runs eagerly), or after a compilation
    failure (see :func:`_compile_failed`)."""
    fn = _compiled.get(kernel)
    if fn is None:
        fn = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    try:
        # no_grad: nothing here is differentiated, and one grad mode halves the variants
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
            return True, fn(*_unaliased(*args))
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        if kernel not in _over_limit:
            _over_limit.add(kernel)
            warnings.warn(
                f"spartan: {kernel.__name__} reached {limit} compiled variants (dtypes, block shapes, buffer "
                f"offsets) in this process; inputs needing a new one run eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
    except Exception as err:
        _compile_failed(args[0].device, err)
    return False, None


def _unaliased(*args: Any) -> list[Any]:
    """Tensors (also inside tuples) detached: the same memory, but a view no longer carries its ``_base``, on
    whose shape dynamo would otherwise guard (one compiled variant per layer shape or buffer it was cut from)."""
    return [
        tuple(a.detach() for a in arg) if isinstance(arg, tuple) else arg.detach() if isinstance(arg, Tensor) else arg
        for arg in args
    ]


def _compile_failed(device: torch.device, err: Exception) -> None:
    """A compiled kernel raised ``err`` on ``device``: raise on CUDA; elsewhere switch to the eager chunks for the
    rest of the process, with one warning."""
    global _compile_enabled, _fallback_reason
    cause = f"{type(err).__name__}: {err}"
    if device.type == "cuda":
        raise RuntimeError(
            f"spartan: torch.compile of the top-k kernels failed on {device} ({cause}); the eager "
            f"fallback would be slow here: fix the toolchain (Triton) or set SPARTAN_COMPILE=0 to run "
            f"eagerly on purpose"
        ) from err
    _compile_enabled, _fallback_reason = False, f"torch.compile failed ({cause})"
    warnings.warn(
        f"spartan: torch.compile of the top-k kernels failed ({cause}); falling back to eager chunked kernels",
        RuntimeWarning,
        stacklevel=3,
    )


def warm_up(device: torch.device, dtype: torch.dtype, with_costs: bool) -> None:
    """Compile both kernels for ``device`` and ``dtype`` now (on a small vector) rather than inside the first
    training step; a no-op when compilation is off."""
    if not _compile_enabled:
        return
    u = torch.linspace(0.0, 1.0, COMPILE_MIN_NUMEL, dtype=dtype, device=device)
    costs = torch.ones_like(u) if with_costs else None
    scalars = torch.tensor([0.5, 0.0, 1.0], dtype=dtype).to(device).unbind(0)
    launch(soft_mask_pass, u, costs, torch.empty_like(u), *scalars)
    inside, above = (torch.empty(u.shape, dtype=torch.uint8, device=device) for _ in range(2))
    launch(band_pass, u, costs, (inside, above), scalars[2] * 0.25, scalars[0])


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without making the host wait (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def set_compile(enabled: bool, reason: str = "turned off (SPARTAN_COMPILE=0 or kernels.set_compile(False))") -> None:
    """Turn the compiled kernels on or off (``SPARTAN_COMPILE=0`` turns them off at import); ``reason`` is what
    :func:`path` reports while they are off."""
    global _compile_enabled, _fallback_reason
    _compile_enabled = enabled
    _fallback_reason = "" if enabled else reason


def path() -> str:
    """The active path for large inputs: ``compiled``, or ``eager`` with the reason."""
    return "compiled" if _compile_enabled else f"eager: {_fallback_reason}"
