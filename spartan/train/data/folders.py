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

from spartan.train.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The sample a dataset yields for an image it could not decode: a string, because it must survive pickling to
# worker processes and WebDataset's map stage (which silently drops None).
UNREADABLE = "unreadable"


def class_folders(root: Path, split: str, source: str = "data.path") -> list[str]:
    """The class folder names of ``root/split``; a clear error, naming the setting ``source`` that gave ``root``,
    for a missing or empty folder and for class folders without images (all of them listed)."""
    folder = root / split
    if not root.is_dir():
        raise ConfigError(f"{source} {str(root)!r} is not a directory (expected {split}/<class>/<image> inside)")
    if not folder.is_dir():
        raise ConfigError(f"{source} {str(root)!r} has no {split}/ folder (expected {split}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"{source} {str(root)!r}: {split}/ has no class folders")
    empty = [name for name in classes if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (folder / name).iterdir())]
    if empty:
        shown = ", ".join(f"{split}/{name}" for name in empty[:5]) + (
            f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        )
        folders, have = ("class folder", "has") if len(empty) == 1 else ("class folders", "have")
        raise ConfigError(f"{source} {str(root)!r}: {folders} {shown} {have} no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes


def split_classes(root: Path, split: str, source: str = "data.path") -> list[str]:
    """:func:`class_folders` of ``root/split``, which for a split other than train must equal train/'s: labels are
    indices of the sorted class folders, so different folders would pair images with other classes' labels."""
    classes = class_folders(root, split, source)
    train = root / "train"
    if split != "train" and train.is_dir():
        reference = sorted(d.name for d in train.iterdir() if d.is_dir())
        if reference != classes:
            missing, extra = sorted(set(reference) - set(classes)), sorted(set(classes) - set(reference))
            raise ConfigError(
                f"{source} {str(root)!r}: {split}/ and train/ have different class folders (missing "
                f"in {split}/: {missing[:5] or 'none'}, extra: {extra[:5] or 'none'}); labels are "
                f"class indices, so they would not match between the splits"
            )
    return classes


def labelled_images(root: Path, split: str, source: str = "data.path") -> list[tuple[str, int]]:
    """``[(path, label), ...]`` of ``root/split`` in ImageFolder's order, the folders checked by
    :func:`split_classes` first."""
    split_classes(root, split, source)
    return datasets.ImageFolder(str(root / split), allow_empty=True).samples


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
