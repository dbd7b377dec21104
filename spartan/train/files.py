"""Writing the run directory's files so that a crash or a full disk never leaves a half-written one.

Whole files go to ``<name>.tmp`` and are renamed into place; appended lines are cut back to the previous end if the
write fails. A failed write removes its temporary file and raises :class:`~spartan.train.lifecycle.RunError` naming
the file and, when the disk is full, the bytes it needs.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spartan.train.lifecycle import RunError


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` next to ``path``, then renamed into place: a crash or full disk leaves the old file."""
    _write_atomically(path, lambda tmp: torch.save(obj, tmp), _nbytes(obj))


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` next to ``path``, then renamed into place."""
    data = text.encode()
    _write_atomically(path, lambda tmp: tmp.write_bytes(data), len(data))


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (a newline is added) to ``path``; on failure the file is cut back to its previous end, so
    it never ends in a partial line."""
    data = memoryview((line + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as err:
            os.ftruncate(fd, end)
            error = _write_error(path, err, len(data))
            if error is None:
                raise
            raise error from err
    finally:
        os.close(fd)


def _write_atomically(path: Path, write: Callable[[Path], Any], nbytes: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:  # also a second Ctrl-C during the write: no half-written file is left
        tmp.unlink(missing_ok=True)
        error = _write_error(path, err, nbytes) if isinstance(err, Exception) else None
        if error is None:
            raise
        raise error from err


def _write_error(path: Path, err: Exception, nbytes: int) -> RunError | None:
    """A one-line error for a write that failed for lack of space (torch's writer reports it only as a failed
    stream position, so the free space decides), else None."""
    code = getattr(err, "errno", None)
    free = shutil.disk_usage(path.parent).free
    if code is not None and code != errno.ENOSPC or code is None and free >= nbytes:
        return None  # another failure (e.g. permissions): raised as it is
    previous = f"; the previous {path.name} is intact" if path.exists() else ""
    return RunError(
        f"no space left on the device holding {path.parent}: writing {path.name} needs about "
        f"{nbytes:,} bytes, {free:,} are free{previous}"
    )


def _nbytes(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: its tensors' data plus a margin for the rest."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values()) + 64 * len(obj)
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj) + 16 * len(obj)
    return 64
