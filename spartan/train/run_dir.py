"""The run directory's lifecycle: which checkpoint a run resumes from, fresh starts, and its metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from spartan.train.checkpoint import LAST
from spartan.train.errors import ConfigError
from spartan.train.files import atomic_write_text


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
        raise ConfigError(
            f"resume={resume!r} does not exist (give auto, a checkpoint file or a run directory holding {LAST})"
        )
    return path


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run must not overwrite an earlier run's checkpoint, final model or metrics."""
    earlier = [name for name in (str(LAST), "model_final.pt", "metrics.jsonl") if (run_dir / name).exists()]
    if earlier:
        raise ConfigError(
            f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(earlier)}): continue it with "
            f"resume=auto, or choose a new hydra.run.dir"
        )


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records logged after ``step`` (what a killed run logged after its last checkpoint); return how
    many: the resumed run logs them again, identically, and the metric logger had already sent them on."""
    if not path.is_file():
        return 0
    lines = [(json.loads(line)["step"], line) for line in path.read_text().splitlines()]
    kept = [line for logged, line in lines if logged <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its final model and summary)."""
    return (run_dir / "model_final.pt").is_file() and (run_dir / "summary.json").is_file()
