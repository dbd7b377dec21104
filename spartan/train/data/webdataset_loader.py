"""The loaders of ``data=webdataset`` (:mod:`spartan.train.data.backends.webdataset`): ImageNet as sharded tar
files (``<key>.jpg`` + ``<key>.cls`` per sample), local or URLs.

Training: every epoch the shard list is shuffled by ``(seed, epoch)`` and dealt to processes (``shards[rank::
world]``) and then to DataLoader workers; samples pass a shuffle buffer; each process yields exactly
``train_size // (batch_size × processes)`` batches per epoch (its shards are cycled if they run short), so
all processes take the same number of steps. Validation: each process reads its shards once, so every image
is evaluated exactly once. Unreadable images are skipped with a warning naming shard and key (their batch is
one image smaller, as with ImageFolder). Imported only when that backend is used.
"""

from __future__ import annotations

import io
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from spartan.train.data.backends.webdataset import WebDatasetConfig
from spartan.train.data.common import DataInfo, Loaders, ReadAhead, check_batch_fits, worker_options
from spartan.train.data.folders import UNREADABLE, skip_unreadable
from spartan.train.data.transforms import train_transform, val_transform
from spartan.train.errors import ConfigError
from spartan.train.seeding import derive_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def shard_list(config: WebDatasetConfig, split: str) -> list[str]:
    """The shards of ``split``: ``data.<split>_path`` (braces expanded) or ``<data.path>/<split>/*.tar``."""
    pattern = getattr(config, f"{split}_path")
    if pattern:
        shards = list(wds.shardlists.expand_urls(pattern))
        local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
        missing = [s for s in local if not Path(s).is_file()]
        if missing:
            raise ConfigError(f"data.{split}_path={pattern!r}: {len(missing)} shard(s) missing, e.g. {missing[0]!r}")
        return shards
    folder = Path(config.path) / split
    shards = sorted(str(p) for p in folder.glob("*.tar")) if folder.is_dir() else []
    if not shards:
        raise ConfigError(f"data.path {config.path!r} has no {split}/*.tar shards (or set data.{split}_path)")
    return shards


def count_samples(shards: list[str]) -> int:
    """Images in local shards, read from the tar headers (no decoding)."""
    if any("://" in s or s.startswith("pipe:") for s in shards):
        raise ConfigError("data.train_size / data.val_size must be given for remote WebDataset shards")
    keys = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                stem, _, ext = name.rpartition(".")
                if ext.lower() in IMAGE_KEYS:
                    keys.add((shard, stem))
    return len(keys)


class ShardStream(IterableDataset):
    """This process's samples as ``(image, label)`` after ``transform``: shards in an order drawn from
    ``(seed, epoch, pass)`` (the ``shards`` stream), split over workers, shuffled in a buffer; ``cycle`` repeats
    the shards forever."""

    def __init__(
        self,
        shards: list[str],
        rank: int,
        world: int,
        seed: int,
        transform: Callable,
        *,
        cycle: bool,
        shuffle_buffer: int,
        num_classes: int,
    ):
        self.shards, self.rank, self.world, self.seed = shards, rank, world, seed
        self.transform, self.cycle, self.shuffle_buffer = transform, cycle, shuffle_buffer
        self.num_classes = num_classes
        self.epoch = 0
        self.shards_since_sample = 0  # per worker: a cycling stream that reads no sample must fail, not spin

    def _urls(self) -> Iterator[dict[str, str]]:
        passes = range(10**9) if self.cycle else range(1)
        for n in passes:
            order = list(self.shards)
            if self.cycle:
                random.Random(derive_seed(self.seed, "shards", self.epoch, n)).shuffle(order)
            mine = order[self.rank :: self.world]
            if self.cycle and not mine:  # fewer shards than processes: training reuses one, validation must not
                mine = order[self.rank % len(order) :: len(order)]
            yield from ({"url": url} for url in mine)

    def _count_shards(self, urls: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        for url in urls:
            self.shards_since_sample += 1
            if self.cycle and self.shards_since_sample > 2 * len(self.shards):
                raise RuntimeError(
                    f"no sample in {self.shards_since_sample - 1} WebDataset shards read in a row, "
                    f"e.g. {url['url']}: are they readable tar files?"
                )
            yield url

    def _saw_sample(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            self.shards_since_sample = 0
            yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | str]:
        stages: list[Any] = [
            self._urls,
            wds.split_by_worker,
            self._count_shards,
            wds.tarfile_to_samples(handler=_warn_and_skip),
            self._saw_sample,
        ]
        if self.shuffle_buffer > 1 and self.cycle:
            # Seeded from this worker's torch seed (the DataLoader derives it from the epoch's generator).
            stages.append(
                wds.shuffle(
                    self.shuffle_buffer, initial=min(1000, self.shuffle_buffer), seed=torch.initial_seed() % 2**63
                )
            )
        stages.append(wds.map(self._decode))
        return iter(wds.DataPipeline(*stages))

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int] | str:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            if key is None or "cls" not in sample:
                raise ValueError(f"needs an image ({'/'.join(IMAGE_KEYS)}) and a cls entry, has {sorted(sample)}")
            image = Image.open(io.BytesIO(sample[key]))
            image.load()
            label = int(sample["cls"])
        except (OSError, ValueError, SyntaxError) as err:
            warnings.warn(
                f"skipping unreadable sample {sample.get('__key__')} in {sample.get('__url__')}: {err}", stacklevel=1
            )
            return UNREADABLE  # dropped by the collate function, which shrinks the batch (counted by the trainer)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"sample {sample.get('__key__')} in {sample.get('__url__')} has label {label}, outside "
                f"data.num_classes={self.num_classes}"
            )
        return self.transform(image), label


def _warn_and_skip(error: Exception) -> bool:
    warnings.warn(f"skipping part of a WebDataset shard: {error}", stacklevel=1)
    return True


class FixedBatches:
    """The first ``batches`` batches of a fresh pass over ``loader``: the same count on every process."""

    def __init__(self, loader: DataLoader, batches: int):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        for _ in range(self.batches):
            yield next(iterator)


def webdataset_loaders(
    config: WebDatasetConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    workers = worker_options(config, device)
    workers["collate_fn"] = skip_unreadable
    val_shards = shard_list(config, "val")
    val_stream = ShardStream(
        val_shards,
        rank,
        world,
        seed,
        val_transform(config),
        cycle=False,
        shuffle_buffer=0,
        num_classes=config.num_classes,
    )
    val_loader = DataLoader(val_stream, batch_size=config.val_batch_size or config.batch_size, **workers)
    val_size = config.val_size or count_samples(val_shards)
    shape = (config.channels, config.image_size, config.image_size)
    if not train:
        return Loaders(None, val_loader, DataInfo(config.num_classes, shape, 0, val_size))
    train_shards = shard_list(config, "train")
    train_size = config.train_size or count_samples(train_shards)
    check_batch_fits(config, world, train_size, "data=webdataset")
    batches = train_size // (config.batch_size * world)
    stream = ShardStream(
        train_shards,
        rank,
        world,
        seed,
        train_transform(config),
        cycle=True,
        shuffle_buffer=config.shuffle_buffer,
        num_classes=config.num_classes,
    )
    generator = torch.Generator()
    loader = DataLoader(stream, batch_size=config.batch_size, generator=generator, **workers)

    train_batches = ReadAhead(FixedBatches(loader, batches))

    def on_epoch(epoch: int, start: int) -> None:
        stream.epoch, train_batches.start = epoch, start
        generator.manual_seed(derive_seed(seed, "workers", rank, epoch))

    return Loaders(train_batches, val_loader, DataInfo(config.num_classes, shape, train_size, val_size), on_epoch)
