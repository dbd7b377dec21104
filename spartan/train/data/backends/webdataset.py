"""``data=webdataset``: sharded tar files (``<key>.jpg`` + ``<key>.cls`` per sample, written by
``scripts/write_webdataset.py``), local or URLs, read by :mod:`spartan.train.data.webdataset_loader` (which imports
webdataset, an optional dependency, only when this option is used)."""

from __future__ import annotations

from dataclasses import dataclass

from spartan.train.data.common import AugmentOptions, Backend, DataConfig, DataLoaderOptions, PackedFiles
from spartan.train.errors import ConfigError, positive_int


@dataclass
class WebDatasetConfig(AugmentOptions, PackedFiles, DataLoaderOptions, DataConfig):
    """``path``: a folder holding ``train/*.tar`` and ``val/*.tar``; ``train_path`` / ``val_path``: shard URLs or
    brace patterns instead. ``train_size`` / ``val_size``: images in the shards (counted from local shards when
    not given; required for remote ones). ``shuffle_buffer``: samples shuffled in memory after the shard shuffle.
    Workers are not persistent (the epoch's shard order reaches them when they start)."""

    name: str = "webdataset"
    batch_size: int = 256
    num_workers: int = 8
    train_size: int | None = None
    val_size: int | None = None
    shuffle_buffer: int = 5000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.persistent_workers:
            raise ConfigError(
                "data.persistent_workers=true is not available with data=webdataset (each epoch's "
                "shard order reaches the workers when they start)"
            )
        for key in ("train_size", "val_size"):
            if getattr(self, key) is not None:
                positive_int(f"data.{key}", getattr(self, key))
        positive_int("data.shuffle_buffer", self.shuffle_buffer)


BACKEND = Backend("webdataset", WebDatasetConfig, "spartan.train.data.webdataset_loader:webdataset_loaders")
