"""ImageNet-layout folders (``train/<class>/*``, ``val/<class>/*``) read with torchvision's ImageFolder.

An unreadable image (corrupt or truncated file) is skipped with a warning naming the file: the dataset
returns :data:`UNREADABLE` for it and :func:`skip_unreadable` drops it from the batch (which is one image
smaller), so no image is ever paired with another's label and the trainer can count the skips.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import default_collate
from torchvision import datasets

from spartan.train.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The sample a dataset yields for an image it could not decode: a string, because it must survive pickling to
# worker processes and WebDataset's map stage (which silently drops None).
UNREADABLE = "unreadable"


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


def reference_classes(root: Path, split: str) -> list[str] | None:
    """The training split's class folders, which define the labels of every other split (None for train)."""
    train = root / "train"
    if split == "train" or not train.is_dir():
        return None
    return sorted(d.name for d in train.iterdir() if d.is_dir())


def class_mismatch(root: Path, split: str, classes: list[str], reference: list[str]) -> str:
    missing, extra = sorted(set(reference) - set(classes)), sorted(set(classes) - set(reference))
    return (f"{str(root)!r}: {split}/ and train/ have different class folders (missing in {split}/: "
            f"{missing[:5] or 'none'}, extra: {extra[:5] or 'none'}); labels are class indices, so they would not "
            f"match between the splits")


class SkippingImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images come back as :data:`UNREADABLE` (with a warning naming the file)."""

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for corrupt/truncated files
            warnings.warn(f"skipping unreadable image {self.samples[index][0]}: {err}", stacklevel=1)
            return UNREADABLE


def skip_unreadable(batch: list) -> Any:
    """``default_collate`` over the readable samples of ``batch``; None when none of them is readable."""
    readable = [sample for sample in batch if not isinstance(sample, str)]
    return default_collate(readable) if readable else None
