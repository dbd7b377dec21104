"""Data loaders for the trainer: scikit-learn's digits, synthetic images, and ImageNet-layout folders.

Every option yields a training loader over a :class:`~torch.utils.data.DistributedSampler` (shuffled by
``seed`` and the epoch; one shard per process, also when training on one process) and a validation loader
over :class:`ShardSampler` (every sample exactly once across processes, no padding), so metrics reduced
across ranks equal single-process metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from spartan.train.config import ConfigError, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataInfo:
    num_classes: int
    input_shape: tuple[int, int, int]  # one sample: channels, height, width
    train_size: int
    val_size: int


@dataclass
class Loaders:
    train: DataLoader | None
    val: DataLoader
    info: DataInfo

    def set_epoch(self, epoch: int, seed: int, rank: int) -> None:
        """Reshuffle for ``epoch`` (one order for all processes) and seed this process's augmentation workers;
        both follow from ``(seed, rank, epoch)`` alone, so a resumed run replays them."""
        self.train.sampler.set_epoch(epoch)
        self.train.generator.manual_seed(int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0]))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: each sample is seen by exactly one process, none twice."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_data(config: DataConfig) -> None:
    """Raise :class:`ConfigError` for a dataset that cannot be read, before anything is built or written."""
    if config.name == "digits" and (config.image_size, config.channels) != (8, 1):
        raise ConfigError(f"data=digits has 1×8×8 images: data.image_size must be 8 and data.channels 1, got "
                          f"{config.image_size} and {config.channels}")
    if config.name == "imagefolder":
        if config.channels != 3:
            raise ConfigError(f"data=imagefolder decodes RGB images: data.channels must be 3, got {config.channels}")
        for split in ("train", "val"):
            _class_folders(Path(config.path), split)


def _class_folders(root: Path, split: str) -> list[str]:
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


def build_loaders(config: DataConfig, *, rank: int = 0, world: int = 1, seed: int = 0, device: torch.device | None = None,
                  train: bool = True) -> Loaders:
    """Loaders for ``config``; ``train=False`` builds the validation loader only (evaluation)."""
    check_data(config)
    train_set, val_set, num_classes = _datasets(config, train)
    info = DataInfo(num_classes, (config.channels, config.image_size, config.image_size),
                    len(train_set) if train_set is not None else 0, len(val_set))
    pin = config.pin_memory and device is not None and device.type == "cuda"
    workers = {"num_workers": config.num_workers, "pin_memory": pin,
               "persistent_workers": config.persistent_workers and config.num_workers > 0}
    train_loader = None
    if train_set is not None:
        if len(train_set) < config.batch_size * world:
            raise ConfigError(f"data.batch_size={config.batch_size} × {world} process(es) exceeds the "
                              f"{len(train_set)} training images of data={config.name}")
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                                  generator=torch.Generator(), **workers)
    val_loader = DataLoader(val_set, batch_size=config.val_batch_size or config.batch_size,
                            sampler=ShardSampler(len(val_set), rank, world), **workers)
    return Loaders(train_loader, val_loader, info)


def _datasets(config: DataConfig, train: bool) -> tuple[Dataset | None, Dataset, int]:
    if config.name == "digits":
        return _digits(config)
    if config.name == "synthetic":
        return (SyntheticImages(config, config.train_size, offset=0) if train else None,
                SyntheticImages(config, config.val_size, offset=config.train_size), config.num_classes)
    return _image_folders(config, train)


def digits_split(val_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits as ``(x_train, y_train, x_val, y_val)``: a fixed stratified split,
    images standardised by the training mean/std, shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=val_fraction, random_state=0, stratify=labels)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _digits(config: DataConfig) -> tuple[Dataset, Dataset, int]:
    x_train, y_train, x_val, y_val = digits_split(config.val_fraction)
    return TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), 10


class SyntheticImages(Dataset):
    """Random normalised images with random labels (a fixed bank of 64, repeated): for throughput runs."""

    BANK = 64

    def __init__(self, config: DataConfig, size: int, offset: int):
        gen = torch.Generator().manual_seed(offset)
        shape = (min(size, self.BANK), config.channels, config.image_size, config.image_size)
        self.images = torch.randn(shape, generator=gen)
        self.labels = torch.randint(0, config.num_classes, (shape[0],), generator=gen)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index % len(self.images)], self.labels[index % len(self.images)]


def _image_folders(config: DataConfig, train: bool) -> tuple[Dataset | None, Dataset, int]:
    from torchvision import datasets
    from torchvision.transforms import InterpolationMode, v2

    root = Path(config.path)
    classes = _class_folders(root, "val")
    if train and _class_folders(root, "train") != classes:
        raise ConfigError(f"data.path {str(root)!r}: train/ and val/ have different class folders")
    interpolation = InterpolationMode(config.interpolation)
    normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(config.image_size, interpolation=interpolation, antialias=True),
                           *([v2.RandomHorizontalFlip()] if config.hflip else []), *normalize])
    val_tf = v2.Compose([v2.Resize(round(config.image_size / config.val_crop_ratio), interpolation=interpolation,
                                   antialias=True), v2.CenterCrop(config.image_size), *normalize])
    train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf) if train else None
    return train_set, datasets.ImageFolder(str(root / "val"), transform=val_tf), len(classes)
