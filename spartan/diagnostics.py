"""Diagnostics for GPU readiness: counts the calls that make the host wait for a device value (as they would on a
GPU), on any device. Used by the tests and scripts/gpu_check.py."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

READS = {
    Tensor.item,
    Tensor.__float__,
    Tensor.__int__,
    Tensor.__bool__,
    Tensor.__index__,
    Tensor.tolist,
    Tensor.cpu,
    Tensor.numpy,
    Tensor.nonzero,
    torch.nonzero,
    Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    Tensor.unique,
}


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...`` then ``reads.count`` / ``reads.calls``: host reads of tensors, boolean-mask
    indexing, and ``torch.tensor(..., device=...)`` (a blocking copy to the device)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.calls.append(func.__name__)
        elif func is Tensor.__getitem__ and _has_bool_index(args[1]):
            self.calls.append("boolean indexing")
        elif func is torch.tensor and kwargs.get("device") is not None:
            self.calls.append("torch.tensor(device=...)")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices)
