"""Building the loaders of every ``data=`` option; the PyTorch ones share samplers and seeding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from spartan.train.config import ConfigError, DataConfig
from spartan.train.data.folders import SkippingImageFolder, skip_unreadable, split_classes
from spartan.train.data.samplers import RepeatedAugmentSampler, ShardSampler
from spartan.train.data.transforms import batch_mixer, train_transform, val_transform


@dataclass
class DataInfo:
    num_classes: int
    input_shape: tuple[int, int, int]  # one sample, as the model sees it at the end: channels, height, width
    train_size: int
    val_size: int


@dataclass
class Loaders:
    train: Iterable | None  # batches of (images, labels); len() = batches per epoch
    val: Iterable
    info: DataInfo
    on_epoch: Callable[[int], None] | None = None  # reshuffle / reseed workers / resize for an epoch
    mix: Callable | None = None  # (images, labels) → (images, soft targets), applied on the device

    def set_epoch(self, epoch: int) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch)


def check_data(config: DataConfig, train: bool = True) -> None:
    """Raise :class:`ConfigError` for data that cannot be read, before anything is built or written."""
    if config.name == "digits" and (config.image_size, config.channels) != (8, 1):
        raise ConfigError(f"data=digits has 1×8×8 images: data.image_size must be 8 and data.channels 1, got "
                          f"{config.image_size} and {config.channels}")
    if config.name in ("imagefolder", "ffcv", "webdataset") and config.channels != 3:
        raise ConfigError(f"data={config.name} decodes RGB images: data.channels must be 3, got {config.channels}")
    if config.name == "imagefolder":
        for split in ("train", "val") if train else ("val",):
            split_classes(Path(config.path), split)


def build_loaders(config: DataConfig, *, rank: int = 0, world: int = 1, seed: int = 0,
                  device: torch.device | None = None, train: bool = True) -> Loaders:
    """Loaders for ``config``; ``train=False`` builds the validation loader only (evaluation)."""
    check_data(config, train)
    device = device or torch.device("cpu")
    if config.name == "ffcv":
        from spartan.train.data.ffcv_loader import ffcv_loaders

        return ffcv_loaders(config, rank=rank, world=world, seed=seed, device=device, train=train)
    if config.name == "webdataset":
        from spartan.train.data.webdataset_loader import webdataset_loaders

        return webdataset_loaders(config, rank=rank, world=world, seed=seed, device=device, train=train)
    train_set, val_set, num_classes = _datasets(config, train)
    return torch_loaders(config, train_set, val_set, num_classes, rank=rank, world=world, seed=seed, device=device,
                         collate=skip_unreadable if config.name == "imagefolder" else None)


def check_batch_fits(config: DataConfig, world: int, train_size: int, source: str) -> None:
    """One global batch must fit in the training set (drop_last would leave an epoch without a step)."""
    if train_size < config.batch_size * world:
        raise ConfigError(f"data.batch_size={config.batch_size} × {world} process(es) exceeds the {train_size} "
                          f"training images of {source}")


def worker_options(config: DataConfig, device: torch.device) -> dict[str, Any]:
    return {"num_workers": config.num_workers, "pin_memory": config.pin_memory and device.type == "cuda",
            "persistent_workers": config.persistent_workers and config.num_workers > 0}


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one process's data workers in one epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0])


def order_seed(seed: int) -> int:
    """The seed of the shuffled order (which adds the epoch): hashed, so run seeds 0 and 1 do not draw
    the same orders one epoch apart."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])


def torch_loaders(config: DataConfig, train_set: Dataset | None, val_set: Dataset, num_classes: int, *, rank: int,
                  world: int, seed: int, device: torch.device, collate: Callable | None = None) -> Loaders:
    """DataLoaders over map-style datasets: a training shard per process reshuffled by ``(seed, epoch)``, worker
    seeds from ``(seed, rank, epoch)`` (a resumed run replays both), validation without padding."""
    workers = worker_options(config, device)
    info = DataInfo(num_classes, (config.channels, config.image_size, config.image_size),
                    len(train_set) if train_set is not None else 0, len(val_set))
    val_loader = DataLoader(val_set, batch_size=config.val_batch_size or config.batch_size,
                            sampler=ShardSampler(len(val_set), rank, world), collate_fn=collate, **workers)
    if train_set is None:
        return Loaders(None, val_loader, info)
    check_batch_fits(config, world, len(train_set), f"data={config.name}")
    if config.repeated_augment > 1:
        sampler = RepeatedAugmentSampler(len(train_set), rank, world, config.repeated_augment, order_seed(seed))
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=order_seed(seed),
                                     drop_last=True)
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                              generator=generator, collate_fn=collate, **workers)

    def on_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        generator.manual_seed(epoch_seed(seed, rank, epoch))

    return Loaders(train_loader, val_loader, info, on_epoch, batch_mixer(config, num_classes))


def _datasets(config: DataConfig, train: bool) -> tuple[Dataset | None, Dataset, int]:
    if config.name == "digits":
        x_train, y_train, x_val, y_val = digits_split(config.val_fraction)
        return TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), 10
    if config.name == "synthetic":
        return (SyntheticImages(config, config.train_size, offset=0) if train else None,
                SyntheticImages(config, config.val_size, offset=config.train_size), config.num_classes)
    root = Path(config.path)  # the folders were checked by check_data
    train_set = SkippingImageFolder(str(root / "train"), transform=train_transform(config)) if train else None
    val_set = SkippingImageFolder(str(root / "val"), transform=val_transform(config))
    return train_set, val_set, len(val_set.classes)


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
