"""``data=ffcv``: FFCV ``.beton`` files written by ``scripts/write_ffcv.py``, decoded by FFCV's compiled pipeline
with this package's one-pass decode + crop + resize + flip decoder (:mod:`spartan.train.data.ffcv_loader`, which
imports FFCV, an optional dependency, only when this option is used)."""

from __future__ import annotations

from dataclasses import dataclass

from spartan.train.data.common import Backend, CropOptions, DataConfig, PackedFiles
from spartan.train.errors import ConfigError, choice, positive_int

DTYPES = ("float32", "float16", "bfloat16")
RESOLUTION_STEP = 32


@dataclass
class FFCVConfig(CropOptions, PackedFiles, DataConfig):
    """``path``: the folder holding ``train.beton`` and ``val.beton`` (or name the files in ``train_path`` /
    ``val_path``). ``num_workers``: FFCV's decoding threads (0: all cores). ``os_cache``: read through the OS page
    cache (true when the file fits in RAM) instead of FFCV's own page reader. Progressive resizing: the training
    resolution is ``min_res`` until ``ramp_start_epoch``, then grows linearly to ``image_size`` at
    ``ramp_end_epoch`` (multiples of 32 px in between). ``dtype``: the images handed to the model (half
    precision needs autocast). FFCV resizes with OpenCV's area interpolation; torchvision's augmentations are
    not available (use ``data=imagefolder`` or ``data=webdataset`` for them)."""

    name: str = "ffcv"
    batch_size: int = 256
    num_workers: int = 8
    os_cache: bool = False
    min_res: int | None = None
    ramp_start_epoch: int = 0
    ramp_end_epoch: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("data.dtype", self.dtype, DTYPES)
        for key in ("ramp_start_epoch", "ramp_end_epoch"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 0):
                raise ConfigError(f"data.{key} must be an integer >= 0, got {getattr(self, key)!r}")
        if self.ramp_end_epoch < self.ramp_start_epoch:
            raise ConfigError(
                f"data.ramp_end_epoch must be >= data.ramp_start_epoch = {self.ramp_start_epoch}, "
                f"got {self.ramp_end_epoch}"
            )
        if self.min_res is not None:
            positive_int("data.min_res", self.min_res)
            if self.ramp_end_epoch <= 0:
                raise ConfigError(
                    f"data.min_res={self.min_res} needs data.ramp_end_epoch > 0 (the epoch at which "
                    f"the resolution reaches data.image_size), got {self.ramp_end_epoch}"
                )

    def image_dtype(self) -> str:
        return self.dtype

    def epoch_resolution(self, epoch: int) -> int:
        """Training resolution of ``epoch``: ``min_res`` until ``ramp_start_epoch``, then linear to ``image_size``
        at ``ramp_end_epoch`` (in between rounded down to a multiple of 32 px, never past either end);
        ``image_size`` throughout when ``min_res`` is None."""
        if self.min_res is None:
            return self.image_size
        start, end = self.ramp_start_epoch, self.ramp_end_epoch
        if epoch >= end:
            return self.image_size
        if epoch <= start:
            return self.min_res
        res = self.min_res + (self.image_size - self.min_res) * (epoch - start) / (end - start)
        low, high = sorted((self.min_res, self.image_size))
        return int(min(high, max(low, int(res) // RESOLUTION_STEP * RESOLUTION_STEP)))


BACKEND = Backend("ffcv", FFCVConfig, "spartan.train.data.ffcv_loader:ffcv_loaders")
