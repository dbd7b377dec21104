"""``data=synthetic``: random normalised images with random labels, for throughput runs and smoke tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from spartan.train.data.common import Backend, DataConfig, DataLoaderOptions, Loaders, map_style_loaders
from spartan.train.errors import positive_int


@dataclass
class SyntheticConfig(DataLoaderOptions, DataConfig):
    """``train_size`` / ``val_size`` images per epoch (a bank of 64 repeated), ``num_classes`` labels."""

    name: str = "synthetic"
    batch_size: int = 128
    num_classes: int = 1000
    train_size: int = 12800
    val_size: int = 1280

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_classes", "train_size", "val_size"):
            positive_int(f"data.{key}", getattr(self, key))


class SyntheticImages(Dataset):
    """Random normalised images with random labels (a fixed bank of 64, repeated)."""

    BANK = 64

    def __init__(self, config: SyntheticConfig, size: int, offset: int):
        gen = torch.Generator().manual_seed(offset)
        shape = (min(size, self.BANK), config.channels, config.image_size, config.image_size)
        self.images = torch.randn(shape, generator=gen)
        self.labels = torch.randint(0, config.num_classes, (shape[0],), generator=gen)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index % len(self.images)], self.labels[index % len(self.images)]


def build_loaders(
    config: SyntheticConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    train_set = SyntheticImages(config, config.train_size, offset=0) if train else None
    val_set = SyntheticImages(config, config.val_size, offset=config.train_size)
    return map_style_loaders(
        config, train_set, val_set, config.num_classes, rank=rank, world=world, seed=seed, device=device
    )


BACKEND = Backend("synthetic", SyntheticConfig, f"{__name__}:build_loaders")
