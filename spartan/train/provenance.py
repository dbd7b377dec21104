"""What a run records about where it ran: the code version and the environment."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


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


def environment(world: int) -> dict[str, Any]:
    """Python/torch/torchvision versions, platform, host, processes, CPU threads, the command line; CUDA and GPU."""
    import torchvision

    env = {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "processes": world,
        "cpu_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name())
    return env
