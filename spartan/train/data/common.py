"""What every data backend shares: the schema fields, the loaders' types, checks, and the map-style loaders.

A backend (one module in :mod:`spartan.train.data.backends`) declares its schema as a dataclass built from
:class:`DataConfig` and the option groups below, so each field exists once with one default and a key that
does not belong to the selected ``data=`` option fails when Hydra composes the config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from spartan.train.data.samplers import RepeatedAugmentSampler, ShardSampler
from spartan.train.errors import ConfigError, choice, finite, fraction, positive_int
from spartan.train.lifecycle import ignore_stop_signals
from spartan.train.seeding import derive_seed

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


@dataclass
class DataConfig:
    """The fields of every ``data=`` option. ``batch_size`` is per device (per process); ``channels`` ×
    ``image_size`` × ``image_size`` is one sample as the model sees it (validation and the final training
    resolution). ``mixup_alpha`` / ``cutmix_alpha``: Mixup / CutMix applied by the trainer on the device (soft
    targets; with both > 0 one of the two per batch). ``name`` is the backend's and cannot be changed."""

    name: str = ""
    batch_size: int = 64
    val_batch_size: int | None = None  # default: batch_size
    num_workers: int = 0
    channels: int = 3
    image_size: int = 224
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        backend = next(f.default for f in fields(self) if f.name == "name")
        if self.name != backend:
            raise ConfigError(
                f"data.name is {backend!r} for this data option, got {self.name!r} (choose the "
                f"backend with data={self.name})"
            )
        positive_int("data.batch_size", self.batch_size)
        if self.val_batch_size is not None:
            positive_int("data.val_batch_size", self.val_batch_size)
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}")
        positive_int("data.channels", self.channels)
        positive_int("data.image_size", self.image_size)
        finite("data.mixup_alpha", self.mixup_alpha, 0.0)
        finite("data.cutmix_alpha", self.cutmix_alpha, 0.0)

    def image_dtype(self) -> str:
        """The dtype of the images a loader yields (float32 unless the backend converts them)."""
        return "float32"


@dataclass
class DataLoaderOptions:
    """Options of backends read through a PyTorch DataLoader. ``persistent_workers=true`` saves worker start-up
    per epoch, but workers keep their first epoch's seeds, so a resumed run's augmentation differs."""

    pin_memory: bool = True
    persistent_workers: bool = False


@dataclass
class CropOptions:
    """Training crops and validation center crops of decoded RGB images (``channels`` is 3): RandomResizedCrop at
    ``image_size`` with at least ``min_scale`` of the image area, an optional horizontal flip; validation resizes to
    ``image_size / val_crop_ratio`` (256 for 224) and center-crops ``image_size``."""

    val_crop_ratio: float = 0.875
    min_scale: float = 0.08
    hflip: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels != 3:
            raise ConfigError(f"data={self.name} decodes RGB images: data.channels must be 3, got {self.channels}")
        fraction("data.val_crop_ratio", self.val_crop_ratio)
        fraction("data.min_scale", self.min_scale)


@dataclass
class AugmentOptions(CropOptions):
    """torchvision's augmentations on top of the crops: ``interpolation`` of the resizes, RandAugment
    (``randaugment_ops`` ops of ``randaugment_magnitude``) or TrivialAugment, random erasing (probability)."""

    interpolation: str = "bicubic"
    auto_augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("data.interpolation", self.interpolation, INTERPOLATIONS)
        choice("data.auto_augment", self.auto_augment, AUTO_AUGMENTS)
        positive_int("data.randaugment_ops", self.randaugment_ops)
        if not (isinstance(self.randaugment_magnitude, int) and 0 <= self.randaugment_magnitude <= 30):
            raise ConfigError(f"data.randaugment_magnitude must be in [0, 30], got {self.randaugment_magnitude!r}")
        if not (isinstance(self.random_erasing, (int, float)) and 0 <= self.random_erasing <= 1):
            raise ConfigError(f"data.random_erasing must be a probability in [0, 1], got {self.random_erasing!r}")


@dataclass
class PackedFiles:
    """Datasets packed by this package's converters: ``path`` is the folder they were written to, or
    ``train_path`` / ``val_path`` name the files (shards) of each split; labels are stored as integers in
    ``[0, num_classes)``."""

    path: str | None = None
    train_path: str | None = None
    val_path: str | None = None
    num_classes: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path and not (self.train_path and self.val_path):
            raise ConfigError(
                f"data.path must name a dataset folder for data={self.name}, got {self.path!r} (or "
                f"set data.train_path and data.val_path)"
            )
        positive_int("data.num_classes", self.num_classes)


@dataclass
class DataInfo:
    num_classes: int
    input_shape: tuple[int, int, int]  # one sample, as the model sees it at the end: channels, height, width
    train_size: int
    val_size: int
    test_size: int = 0  # 0: the backend has no separate test split


@dataclass
class Loaders:
    """``train``: batches of ``(images, labels)``, ``len()`` = batches of a whole epoch; ``test``: the backend's
    separate test split, if it has one; ``set_epoch(epoch, start)`` prepares epoch ``epoch`` (order, worker seeds,
    resolution) from its batch ``start`` on, so that a run resumed mid-epoch gets the batches an uninterrupted one
    would (iteration then yields ``len() - start``)."""

    train: Iterable | None
    val: Iterable
    info: DataInfo
    on_epoch: Callable[[int, int], None] | None = None  # (epoch, start batch)
    test: Iterable | None = None  # a held-out test split, evaluated once after training (never for choices)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch, start)
        elif start:
            raise ValueError(f"these loaders cannot start an epoch at batch {start}")


def check_batch_fits(config: DataConfig, world: int, train_size: int, source: str) -> None:
    """One global batch must fit in the training set (drop_last would leave an epoch without a step)."""
    if train_size < config.batch_size * world:
        raise ConfigError(
            f"data.batch_size={config.batch_size} × {world} process(es) exceeds the {train_size} "
            f"training images of {source}"
        )


def worker_options(config: DataConfig, device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments from ``data.num_workers`` and the :class:`DataLoaderOptions`."""
    return {
        "num_workers": config.num_workers,
        "pin_memory": config.pin_memory and device.type == "cuda",
        "persistent_workers": config.persistent_workers and config.num_workers > 0,
        "worker_init_fn": ignore_stop_signals,
    }


class EpochSampler(Sampler):
    """One epoch of ``sampler``'s indices from batch ``start`` on (:meth:`set_epoch`). With ``tagged`` it yields
    ``(epoch, position, index)``, which :class:`SeededSamples` turns into a per-position augmentation seed."""

    def __init__(self, sampler: Sampler, batch_size: int, tagged: bool):
        self.sampler, self.batch_size, self.tagged = sampler, batch_size, tagged
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator:
        order = list(self.sampler)
        for position in range(self.start * self.batch_size, len(order)):
            yield (self.epoch, position, order[position]) if self.tagged else order[position]

    def __len__(self) -> int:
        return len(self.sampler)


class ReadAhead:
    """The batches of ``batches`` (an iterable with ``len()``) from ``start`` on, for backends that cannot seek:
    the earlier batches are read and dropped, so the rest are exactly those of an uninterrupted epoch (resuming
    mid-epoch costs the time to read them)."""

    def __init__(self, batches: Any):
        self.batches, self.start = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        if self.start >= len(self.batches):  # stopped after the epoch's last step: nothing left to read
            return
        iterator = iter(self.batches)
        for _ in range(self.start):
            next(iterator)
        yield from iterator


class SeededSamples(Dataset):
    """``dataset`` whose item ``(epoch, position, index)`` is sample ``index`` augmented under the seed of
    ``(seed, rank, epoch, position)`` (the ``samples`` stream), whichever worker decodes it."""

    def __init__(self, dataset: Dataset, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]) -> Any:
        epoch, position, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "samples", self.rank, epoch, position))
            return self.dataset[index]


def map_style_loaders(
    config: DataConfig,
    train_set: Dataset | None,
    val_set: Dataset,
    num_classes: int,
    *,
    rank: int,
    world: int,
    seed: int,
    device: torch.device,
    collate: Callable | None = None,
    repeats: int = 1,
    augmenting: bool = False,
    test_set: Dataset | None = None,
) -> Loaders:
    """DataLoaders over map-style datasets: a training shard per process reshuffled by ``(seed, epoch)``
    (``repeats`` > 1: repeated augmentation), worker seeds from ``(seed, rank, epoch)``, an epoch started at any
    batch; ``augmenting`` datasets draw each sample's augmentation from its position in the epoch (so a run resumed
    mid-epoch replays them exactly); validation (and ``test_set``) without padding (every image once over all
    processes)."""
    workers = worker_options(config, device)
    info = DataInfo(
        num_classes,
        (config.channels, config.image_size, config.image_size),
        len(train_set) if train_set is not None else 0,
        len(val_set),
        len(test_set) if test_set is not None else 0,
    )

    def evaluation_loader(dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=config.val_batch_size or config.batch_size,
            sampler=ShardSampler(len(dataset), rank, world),
            collate_fn=collate,
            **workers,
        )

    val_loader = evaluation_loader(val_set)
    test_loader = evaluation_loader(test_set) if test_set is not None else None
    if train_set is None:
        return Loaders(None, val_loader, info, test=test_loader)
    check_batch_fits(config, world, len(train_set), f"data={config.name}")
    if repeats > 1:
        order = RepeatedAugmentSampler(len(train_set), rank, world, repeats, seed)
    else:
        order = DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=derive_seed(seed, "order"), drop_last=True
        )
    sampler = EpochSampler(order, config.batch_size, tagged=augmenting)
    generator = torch.Generator()
    train_loader = DataLoader(
        SeededSamples(train_set, seed, rank) if augmenting else train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        collate_fn=collate,
        **workers,
    )

    def on_epoch(epoch: int, start: int) -> None:
        sampler.set_epoch(epoch, start)
        generator.manual_seed(derive_seed(seed, "workers", rank, epoch))

    return Loaders(train_loader, val_loader, info, on_epoch, test_loader)


@dataclass(frozen=True)
class Backend:
    """A ``data=`` option: its ``name``, its ``schema`` and the function building its loaders, ``"module:function"``
    called as ``function(config, *, rank, world, seed, device, train) -> Loaders``."""

    name: str
    schema: type[DataConfig]
    loaders: str

    def build(
        self, config: DataConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
    ) -> Loaders:
        module, function = self.loaders.split(":")
        return getattr(importlib.import_module(module), function)(
            config, rank=rank, world=world, seed=seed, device=device, train=train
        )
