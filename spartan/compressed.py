"""A compressed file format for finalized sparse models: only the non-zero entries (or blocks) of each tensor.

:func:`compress` turns a plain ``state_dict`` into a dict of tensors, lists and strings that ``torch.save`` writes
and ``torch.load(weights_only=True)`` reads; :func:`decompress` gives the ``state_dict`` back, bit for bit. The
layout (format :data:`FORMAT`) is simple enough to decode without this package::

    {"format": "spartan.compressed/1",
     "meta": {...},                          # strings and numbers: what the model is, where it came from
     "tensors": {name: entry, ...}}          # in the state_dict's order

An entry is ``{"encoding": "dense", "data": tensor}`` or ``{"encoding": "blocks", "shape": [d0, d1, ...],
"block": [bh, bw], "mask": uint8, "values": tensor}``. For ``blocks``, the tensor is cut into blocks of
``bh × bw`` over its first two dims (one block per position of the other dims, as the Sparsifier blocks a conv
weight); ``mask`` is one bit per block in row-major order over the grid ``(d0/bh, d1/bw, d2, ...)``, least
significant bit first, and ``values`` holds the blocks whose bit is set, in that order, shaped ``(kept, bh, bw)``.
Every other entry is zero (+0.0). ``[1, 1]`` blocks are single entries, and a 1-dim tensor is read as
``(d0, 1)``. Each tensor gets the smallest of: dense, single entries, or square blocks of 2 to 64 that divide its
first two dims. A block is stored when any bit of any of its entries is set, so −0.0 survives and nothing is
lost whatever the pattern.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FORMAT = "spartan.compressed/1"
BLOCK_SIDES = (2, 4, 8, 16, 32, 64)
"""Square block sides tried for each tensor besides single entries (``(1, 1)``)."""

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def compress(state_dict: dict[str, Tensor], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compressed form of ``state_dict`` (any tensors; float ones of 1 or more dims are candidates)."""
    return {
        "format": FORMAT,
        "meta": dict(meta or {}),
        "tensors": {name: encode(tensor) for name, tensor in state_dict.items()},
    }


def decompress(compressed: dict[str, Any]) -> dict[str, Tensor]:
    """The plain ``state_dict`` that :func:`compress` was given, bit for bit."""
    if not is_compressed(compressed):
        found = compressed.get("format") if isinstance(compressed, dict) else type(compressed).__name__
        raise ValueError(f"not a {FORMAT} file (format: {found!r})")
    return {name: decode(entry) for name, entry in compressed["tensors"].items()}


def is_compressed(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def encode(tensor: Tensor) -> dict[str, Any]:
    """One tensor's entry: the smallest of dense and the block sizes that divide it (see the module docstring)."""
    tensor = tensor.detach().cpu()
    dense = {"encoding": "dense", "data": tensor.clone()}
    if tensor.dtype not in _BITS or tensor.dim() == 0:
        return dense
    shape = list(tensor.shape)
    grid = tensor.reshape(shape[0], 1) if tensor.dim() == 1 else tensor
    nonzero = grid.contiguous().view(_BITS[tensor.dtype]) != 0
    best, best_bytes = dense, tensor.numel() * tensor.element_size()
    for block in _block_candidates(grid.shape):
        mask = _blocks(nonzero, block).flatten(start_dim=-2).any(-1)
        kept = int(mask.count_nonzero())
        size = (mask.numel() + 7) // 8 + kept * block[0] * block[1] * tensor.element_size()
        if size < best_bytes:
            best, best_bytes = (block, mask), size
    if best is dense:
        return dense
    block, mask = best
    return {
        "encoding": "blocks",
        "shape": shape,
        "block": list(block),
        "mask": _pack_bits(mask.flatten()),
        "values": _blocks(grid, block)[mask].clone(),
    }


def decode(entry: dict[str, Any]) -> Tensor:
    """The tensor an :func:`encode` entry holds."""
    if entry["encoding"] == "dense":
        return entry["data"].clone()
    if entry["encoding"] != "blocks":
        raise ValueError(f"unknown tensor encoding {entry['encoding']!r} (allowed: 'dense', 'blocks')")
    shape, block, values = entry["shape"], tuple(entry["block"]), entry["values"]
    grid_shape = [shape[0], 1] if len(shape) == 1 else shape
    grid = torch.zeros(grid_shape, dtype=values.dtype)
    view = _blocks(grid, block)
    mask = _unpack_bits(entry["mask"], view.shape[:-2].numel()).view(view.shape[:-2])
    view[mask] = values  # the view writes through to grid
    return grid.reshape(shape)


def _block_candidates(shape: torch.Size) -> list[tuple[int, int]]:
    return [(1, 1)] + [(s, s) for s in BLOCK_SIDES if shape[0] % s == 0 and shape[1] % s == 0]


def _blocks(grid: Tensor, block: tuple[int, int]) -> Tensor:
    """``grid`` (d0, d1, *rest) as ``(d0/bh, d1/bw, *rest, bh, bw)``: a view of a contiguous ``grid``."""
    (bh, bw), (d0, d1, *rest) = block, grid.shape
    split = grid.reshape(d0 // bh, bh, d1 // bw, bw, *rest)
    order = (0, 2, *range(4, 4 + len(rest)), 1, 3)
    return split.permute(order)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(bits: Tensor) -> Tensor:
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, count: int) -> Tensor:
    return (packed[:, None] & _BIT_WEIGHTS).ne(0).flatten()[:count]
