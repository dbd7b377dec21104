"""Crash-safe, self-describing checkpoints and run metadata (code version, environment)."""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spartan.train.config import ConfigError

FORMAT = "spartan.checkpoint/1"
LAST = Path("checkpoints") / "last.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` next to ``path`` and rename it into place: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint written by :func:`atomic_save` (tensors, numbers and strings only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"resume: {str(path)!r} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"resume: {str(path)!r} is not a spartan training checkpoint (format {FORMAT})")
    return state


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``resume`` points at: ``auto`` = this run dir's last one if any, a file, or a run dir."""
    if resume is None:
        return None
    if resume == "auto":
        path = run_dir / LAST
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise ConfigError(f"resume={resume!r} does not exist (give auto, a checkpoint file or a run directory "
                         f"holding {LAST})")
    return path


def seed_everything(seed: int, *streams: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` from ``seed`` and optional stream ids (rank, epoch)."""
    derived = int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0]) if streams else seed
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run must not overwrite an earlier run's checkpoint, final model or metrics."""
    earlier = [name for name in (str(LAST), "model_final.pt", "metrics.jsonl") if (run_dir / name).exists()]
    if earlier:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(earlier)}): continue it "
                          f"with resume=auto, or choose a new hydra.run.dir")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (epochs a crashed run logged but did not checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def git_version() -> str:
    """``<commit>`` of the code that runs, ``+dirty`` if it has uncommitted changes, or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(world: int) -> dict[str, Any]:
    import torchvision

    env = {"python": sys.version.split()[0], "torch": str(torch.__version__),
           "torchvision": str(torchvision.__version__),
           "platform": platform.platform(), "host": socket.gethostname(), "processes": world,
           "cpu_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name())
    return env
