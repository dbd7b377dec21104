"""ImageNet-layout folders (``train/<class>/*``, ``val/<class>/*``) read with torchvision's ImageFolder.

An unreadable image (corrupt or truncated file) is skipped with a warning naming the file: the dataset
returns None for it and :func:`skip_unreadable` drops it from the batch (which is one image smaller), so no
image is ever paired with another's label.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import default_collate
from torchvision import datasets

from spartan.train.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folders(root: Path, split: str) -> list[str]:
    """The class folder names of ``root/split``; a clear error for a missing, empty or image-less folder."""
    folder = root / split
    if not root.is_dir():
        raise ConfigError(f"data.path {str(root)!r} is not a directory (expected {split}/<class>/<image> inside)")
    if not folder.is_dir():
        raise ConfigError(f"data.path {str(root)!r} has no {split}/ folder (expected {split}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"data.path {str(root)!r}: {split}/ has no class folders")
    for name in classes:
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (folder / name).iterdir()):
            raise ConfigError(f"data.path {str(root)!r}: class folder {split}/{name} has no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    return classes


class SkippingImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images come back as None (with a warning naming the file)."""

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for corrupt/truncated files
            warnings.warn(f"skipping unreadable image {self.samples[index][0]}: {err}", stacklevel=1)
            return None


def skip_unreadable(batch: list) -> Any:
    """``default_collate`` over the readable samples of ``batch``."""
    return default_collate([sample for sample in batch if sample is not None])
