"""``data=synthetic``: random normalised images with random labels, for throughput runs and smoke tests.

The batches are made on the run's device (a GPU's own generator, then one gather per batch): no DataLoader, no
host-side collation or pinning, so a throughput run measures the GPU, not the host. The images and labels follow
from the run's seed (the ``synthetic`` stream) and the device type (CPU and CUDA generators draw differently).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from spartan.train.data.common import Backend, DataConfig, DataInfo, Loaders, check_batch_fits
from spartan.train.errors import positive_int
from spartan.train.seeding import derive_seed

BANK = 64  # distinct images per split; an epoch's samples repeat them


@dataclass
class SyntheticConfig(DataConfig):
    """``train_size`` / ``val_size`` images per epoch (a bank of 64 repeated), ``num_classes`` labels. The batches
    are generated in the main process on the run's device, so ``num_workers`` is unused."""

    name: str = "synthetic"
    batch_size: int = 128
    num_classes: int = 1000
    train_size: int = 12800
    val_size: int = 1280

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_classes", "train_size", "val_size"):
            positive_int(f"data.{key}", getattr(self, key))


class ImageBank:
    """``min(size, BANK)`` random normalised images (float32, ``channels`` × ``image_size``²) with random labels
    in ``[0, num_classes)``, drawn on ``device`` from ``seed``; sample ``i`` of the split is image ``i % BANK``."""

    def __init__(self, config: SyntheticConfig, size: int, seed: int, device: torch.device):
        generator = torch.Generator(device).manual_seed(seed)
        shape = (min(size, BANK), config.channels, config.image_size, config.image_size)
        self.images = torch.randn(shape, generator=generator, device=device)
        self.labels = torch.randint(0, config.num_classes, (shape[0],), generator=generator, device=device)

    def batch(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the split's samples ``samples`` (indices on the bank's device)."""
        rows = samples % len(self.images)
        return self.images[rows], self.labels[rows]


class TrainBatches:
    """Process ``rank`` of ``world``'s training batches: each epoch a permutation of the ``size`` samples drawn on
    the bank's device from ``(seed, epoch)`` (the ``order`` stream, the same on every process), process ``rank``
    taking samples ``rank, rank + world, ...`` (``size // world`` of them, then whole batches only), as
    ``DistributedSampler(drop_last=True)`` deals them; :meth:`set_epoch` starts an epoch at any batch."""

    def __init__(self, bank: ImageBank, size: int, batch_size: int, *, rank: int, world: int, seed: int):
        self.bank, self.size, self.batch_size = bank, size, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = self.start = 0

    def __len__(self) -> int:
        return self.size // self.world // self.batch_size

    def set_epoch(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.bank.images.device
        generator = torch.Generator(device).manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.size, generator=generator, device=device)
        mine = order[self.rank :: self.world]
        for batch in range(self.start, len(self)):
            yield self.bank.batch(mine[batch * self.batch_size : (batch + 1) * self.batch_size])


class ValBatches:
    """Process ``rank`` of ``world``'s validation batches: samples ``rank, rank + world, ...`` of ``size`` in order
    (every sample once over all processes, no padding; the last batch may be short)."""

    def __init__(self, bank: ImageBank, size: int, batch_size: int, *, rank: int, world: int):
        self.bank, self.batch_size = bank, batch_size
        self.samples = torch.arange(rank, size, world, device=bank.images.device)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for part in self.samples.split(self.batch_size):
            yield self.bank.batch(part)


def build_loaders(
    config: SyntheticConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    val_bank = ImageBank(config, config.val_size, derive_seed(seed, "synthetic", 1), device)
    val = ValBatches(val_bank, config.val_size, config.val_batch_size or config.batch_size, rank=rank, world=world)
    info = DataInfo(
        config.num_classes,
        (config.channels, config.image_size, config.image_size),
        config.train_size if train else 0,
        config.val_size,
    )
    if not train:
        return Loaders(None, val, info)
    check_batch_fits(config, world, config.train_size, "data=synthetic")
    train_bank = ImageBank(config, config.train_size, derive_seed(seed, "synthetic", 0), device)
    batches = TrainBatches(train_bank, config.train_size, config.batch_size, rank=rank, world=world, seed=seed)
    return Loaders(batches, val, info, batches.set_epoch)


BACKEND = Backend("synthetic", SyntheticConfig, f"{__name__}:build_loaders")
