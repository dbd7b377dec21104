"""``data=imagefolder``: an ImageNet-layout folder, ``<path>/train/<class>/*`` and ``<path>/val/<class>/*``, read
with torchvision's ImageFolder and ``transforms.v2`` in ``num_workers`` processes (unreadable images skipped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spartan.train.data.common import AugmentOptions, Backend, DataConfig, DataLoaderOptions, Loaders, map_style_loaders
from spartan.train.data.folders import SkippingImageFolder, skip_unreadable, split_classes
from spartan.train.data.transforms import train_transform, val_transform
from spartan.train.errors import ConfigError, positive_int


@dataclass
class ImageFolderConfig(AugmentOptions, DataLoaderOptions, DataConfig):
    """``path``: the folder holding ``train/`` and ``val/``. ``repeated_augment`` > 1 repeats each image that
    often per epoch, in different processes (DeiT's repeated augmentation)."""

    name: str = "imagefolder"
    path: str | None = None
    batch_size: int = 256
    num_workers: int = 8
    repeated_augment: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError(f"data.path must name a dataset folder for data=imagefolder, got {self.path!r}")
        positive_int("data.repeated_augment", self.repeated_augment)


def build_loaders(
    config: ImageFolderConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    root = Path(config.path)
    for split in ("train", "val") if train else ("val",):
        split_classes(root, split)
    train_set = SkippingImageFolder(str(root / "train"), transform=train_transform(config)) if train else None
    val_set = SkippingImageFolder(str(root / "val"), transform=val_transform(config))
    return map_style_loaders(
        config,
        train_set,
        val_set,
        len(val_set.classes),
        rank=rank,
        world=world,
        seed=seed,
        device=device,
        collate=skip_unreadable,
        repeats=config.repeated_augment,
        augmenting=True,
    )


BACKEND = Backend("imagefolder", ImageFolderConfig, f"{__name__}:build_loaders")
