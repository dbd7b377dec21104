"""Where and in what precision a run computes: device, backend settings, autocast dtype, memory format; and a
description of the device for the run's records."""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
from pathlib import Path

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


def configure_backend(device: torch.device, cudnn_benchmark: bool) -> dict[str, bool]:
    """``trainer.cudnn_benchmark``: on a CUDA ``device``, sets ``torch.backends.cudnn.benchmark`` (cuDNN times
    its convolution algorithms for each new input shape and keeps the fastest: faster with fixed shapes, but the
    choice, and thus rounding, may differ between runs). On the CPU, which does not use cuDNN, the setting is
    ignored and torch's flag left as it is. Returns the setting in effect: ``{"cudnn_benchmark": bool}``."""
    if device.type != "cuda":
        return {"cudnn_benchmark": False}
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return {"cudnn_benchmark": cudnn_benchmark}


def describe_device(device: torch.device) -> dict[str, str]:
    """What ``device`` is, for the run's records. CUDA: ``type``, ``index``, ``name`` (the GPU's), ``cuda`` (the
    CUDA version torch was built with), ``driver`` (the NVIDIA driver's, from ``nvidia-smi``, else ``unknown``),
    ``cudnn`` (cuDNN's version number, or ``none``). CPU: ``type``, ``name`` (the processor's model) and
    ``threads`` (torch's intra-op threads)."""
    if device.type == "cuda":
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return {
            "type": "cuda",
            "index": str(device.index if device.index is not None else torch.cuda.current_device()),
            "name": torch.cuda.get_device_name(device),
            "cuda": str(torch.version.cuda),
            "driver": driver_version(),
            "cudnn": str(cudnn) if cudnn is not None else "none",
        }
    return {"type": device.type, "name": cpu_name(), "threads": str(torch.get_num_threads())}


def driver_version() -> str:
    """The NVIDIA driver's version (``nvidia-smi``; torch 2.14 does not report it), or ``unknown``."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown"
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    versions = done.stdout.split()  # one per GPU, all the same driver's
    return versions[0] if versions else "unknown"


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else ``platform``'s processor or machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
