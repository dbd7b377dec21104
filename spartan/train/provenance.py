"""What a run records about where it ran: the code version and the environment."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from spartan.train.device import describe_device


def git_version() -> str:
    """``<commit>`` of the code that runs, ``+dirty`` if it has uncommitted changes, or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(world: int, device: torch.device | None = None) -> dict[str, Any]:
    """Python/torch/torchvision versions, platform, host, processes, CPU threads, the command line, and ``device``
    described by :func:`~spartan.train.device.describe_device` (GPU, CUDA, driver, cuDNN; or the CPU). ``device``
    defaults to this process's current GPU when CUDA is available, else the CPU."""
    import torchvision

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "processes": world,
        "cpu_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "device": describe_device(device),
    }
