"""Where and in what precision a run computes: device, autocast dtype, memory format."""

from __future__ import annotations

import contextlib

import torch

from spartan.train.distributed import Process
from spartan.train.errors import ConfigError


def resolve_device(name: str, process: Process) -> torch.device:
    """``trainer.device``: ``auto`` is CUDA when available; ``cuda`` is this process's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but CUDA is not available here (use trainer.device=cpu or auto)")
        if name == "cuda":
            return torch.device("cuda", process.local_rank)
        if process.world > 1:
            raise ConfigError(
                f"trainer.device={name} would put every torchrun process on one GPU: use "
                f"trainer.device=cuda (process i uses GPU LOCAL_RANK=i)"
            )
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device, input_dtype: str = "float32") -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA and full precision on CPU. Half-precision input
    (``input_dtype``, e.g. FFCV's ``data.dtype``) needs autocast: the model's weights stay float32."""
    if mode == "auto":
        amp = torch.bfloat16 if device.type == "cuda" else None
    elif mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"trainer.amp=fp16 needs a CUDA device, trainer.device resolves to {device}")
    else:
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    if amp is None and input_dtype != "float32":
        raise ConfigError(
            f"data.dtype={input_dtype} needs mixed precision (trainer.amp=bf16 or fp16), but trainer.amp="
            f"{mode} runs in float32 on {device}"
        )
    return amp


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``; full precision for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    """``trainer.channels_last``: kernels, and thus rounding, follow the layout, so training and evaluation agree."""
    return torch.channels_last if channels_last else torch.contiguous_format
