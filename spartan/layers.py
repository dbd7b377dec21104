"""Which weight tensors are masked, and how mask entries (single weights or blocks) map onto them.

Masked tensors: the weights of ``nn.Conv2d`` (any groups) and ``nn.Linear`` (timm attention and
``nn.MultiheadAttention.out_proj`` are Linears), and ``nn.MultiheadAttention``'s input projections
(packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``). Biases and norms are never masked.

A mask entry covers a block ``(bh, bw)`` of the first two weight dims (a conv weight ``(out, in, kh, kw)``
is blocked as ``(bh, bw, 1, 1)``); ``(1, 1)`` is unstructured.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

log = logging.getLogger("spartan")

_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class MaskedTensor:
    """One masked weight: ``getattr(module, attr)``, split into entries of ``block`` weights."""

    module_name: str
    module: nn.Module
    attr: str
    block: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def weight(self) -> nn.Parameter:
        """The Parameter itself, also while a mask parametrization is attached to it."""
        if parametrize.is_parametrized(self.module, self.attr):
            return self.module.parametrizations[self.attr].original
        return getattr(self.module, self.attr)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def block_numel(self) -> int:
        return self.block[0] * self.block[1]

    @property
    def entry_shape(self) -> tuple[int, ...]:
        rows, cols, *rest = self.shape
        return (rows // self.block[0], cols // self.block[1], *rest)

    @property
    def n_entries(self) -> int:
        return self.weight.numel() // self.block_numel

    def entry_values(self, weight: Tensor) -> Tensor:
        """``Σ |w|`` over each entry's block, shaped ``entry_shape``."""
        return self.block_sum(weight.abs())

    def block_sum(self, x: Tensor) -> Tensor:
        """Sum a weight-shaped tensor over each entry's block, giving ``entry_shape``."""
        if self.block == (1, 1):
            return x
        (bh, bw), (rows, cols, *rest) = self.block, self.entry_shape
        return x.reshape(rows, bh, cols, bw, *rest).sum(dim=(1, 3))

    def blocked(self, x: Tensor) -> Tensor | None:
        """A contiguous weight-shaped ``x`` as an ``(R, bh, C, bw, K)`` view, ``R × C × K`` being ``entry_shape``
        (``K``: a convolution's kernel positions, 1 for a Linear); None when ``x`` is not contiguous."""
        if not x.is_contiguous():
            return None
        (bh, bw), (rows, cols, *rest) = self.block, self.entry_shape
        return x.view(rows, bh, cols, bw, math.prod(rest))

    def multiply(self, x: Tensor, entries: Tensor) -> Tensor:
        """``x * expand(entries)`` for a weight-shaped ``x``, broadcasting each entry over its block instead of
        materializing the expansion when ``x`` is contiguous (one weight-sized pass, not two). Boolean ``entries``
        select: ``x`` where set, 0 elsewhere (no float multiplier is made)."""
        blocks = None if self.block == (1, 1) else self.blocked(x)
        if blocks is None:
            return _apply(x, self.expand(entries))
        rows, _, cols, _, k = blocks.shape
        return _apply(blocks, entries.reshape(rows, 1, cols, 1, k)).view(self.shape)

    def expand(self, entries: Tensor) -> Tensor:
        """Broadcast per-entry values (shaped ``entry_shape``) back to the weight's shape."""
        if self.block == (1, 1):
            return entries
        (bh, bw), (rows, cols, *rest) = self.block, self.entry_shape
        blocks = entries.reshape(rows, 1, cols, 1, *rest).expand(rows, bh, cols, bw, *rest)
        return blocks.reshape(self.shape)


def _apply(x: Tensor, multiplier: Tensor) -> Tensor:
    return torch.where(multiplier, x, 0.0) if multiplier.dtype == torch.bool else x * multiplier


def find_masked_tensors(
    model: nn.Module,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    block: Sequence[int] = (1, 1),
    block_fallback: bool = False,
) -> list[MaskedTensor]:
    """The maskable weights of ``model`` whose module name matches an ``include`` glob and no ``exclude`` glob.

    Every glob must match at least one maskable module (a typo must not silently mask nothing). A weight
    whose first two dims are not divisible by ``block`` is an error naming it, unless ``block_fallback``,
    which masks that weight unstructured and logs it.
    """
    block = _check_block(block)
    candidates = [(name, module, attr) for name, module in model.named_modules() for attr in _masked_attrs(module)]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Conv2d, Linear or MultiheadAttention weights to mask")
    module_names = sorted({name for name, _, _ in candidates})
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in module_names):
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no maskable layer; maskable layers are "
                    f"{_preview(module_names)}"
                )
    selected = []
    for name, module, attr in candidates:
        if not _matches(name, include) or _matches(name, exclude):
            continue
        shape = getattr(module, attr).shape
        tensor_block = block
        if shape[0] % block[0] or shape[1] % block[1]:
            where = f"{name + '.' if name else ''}{attr} of shape {tuple(shape)}"
            if not block_fallback:
                raise ValueError(
                    f"block {block} does not divide {where}; choose a block dividing its first two "
                    f"dims, exclude the layer, or enable block_fallback to mask it unstructured"
                )
            log.warning("spartan: block %s does not divide %s; masking it unstructured (block_fallback)", block, where)
            tensor_block = (1, 1)
        selected.append(MaskedTensor(name, module, attr, tensor_block))
    if not selected:
        raise ValueError(f"include={list(include)} and exclude={list(exclude)} leave no layer to mask")
    return selected


def _masked_attrs(module: nn.Module) -> Iterable[str]:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        yield "weight"
    elif isinstance(module, nn.MultiheadAttention):
        yield from (attr for attr in _ATTENTION_WEIGHTS if getattr(module, attr, None) is not None)


def _check_block(block: Sequence[int]) -> tuple[int, int]:
    try:
        bh, bw = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be two positive integers (bh, bw), got {block!r}") from None
    if bh < 1 or bw < 1 or (bh, bw) != tuple(block):
        raise ValueError(f"block must be two positive integers (bh, bw), got {block!r}")
    return bh, bw


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
