"""The loaders of ``data=ffcv`` (:mod:`spartan.train.data.backends.ffcv`) over ``.beton`` files written by
``scripts/write_ffcv.py``; imported only when that backend is used (FFCV is an optional dependency).

Training: a random resized crop decoded straight to the epoch's resolution (progressive resizing, see
:meth:`~spartan.train.data.backends.ffcv.FFCVConfig.epoch_resolution`) and optionally flipped, in one pass
(:class:`~spartan.train.data.ffcv_decoder.CropResizeDecoder`), then normalized with the ImageNet mean/std (on the
GPU when ``device`` is one), channels-last, in ``data.dtype``, on ``device``. Order: FFCV's quasi-random order
(page-local shuffling, suited to datasets larger than RAM) in one process; with several processes a random order
split across them (FFCV's ``distributed=True``, which needs an initialised ``torch.distributed`` process group).
``Loaders.on_epoch(epoch, start)`` sets the resolution and makes the order of the epoch a function of ``(seed,
epoch)`` only, so a resumed run draws the order of an uninterrupted one; an epoch resumed at batch ``start`` reads
and drops the batches before it. The crops and flips come from numba's per-thread
generators and are not reproducible.

Validation: resize so that the center crop of ``val_crop_ratio`` × the short side becomes ``image_size``
(256 → 224), sequential order, process ``rank`` of ``world`` evaluates images ``rank, rank + world, ...``:
every image exactly once, no padding.

The batches are FFCV's buffers, reused a few batches later: use each batch before asking for the next
``batches_ahead`` ones (clone what must be kept).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import Convert, NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from spartan.train.data.backends.ffcv import FFCVConfig
from spartan.train.data.common import DataInfo, Loaders, ReadAhead, check_batch_fits
from spartan.train.data.ffcv_decoder import CropResizeDecoder
from spartan.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spartan.train.errors import ConfigError
from spartan.train.seeding import derive_seed

# numpy | cupy | torch (see _to_normalized_tensor); None: numpy on the CPU, cupy on a GPU if installed, else torch
NORMALIZE_MODE: str | None = None


def beton_files(config: FFCVConfig, train: bool = True) -> tuple[str | None, str]:
    """``(train file, val file)``: ``data.train_path`` / ``data.val_path``, else ``<data.path>/train.beton`` /
    ``<data.path>/val.beton``; a :class:`ConfigError` naming the key for a missing file. Without ``train`` the
    training file is neither needed nor resolved (None)."""
    files: list[str | None] = [] if train else [None]
    for split in ("train", "val") if train else ("val",):
        explicit = getattr(config, f"{split}_path")
        if explicit:
            if not Path(explicit).is_file():
                raise ConfigError(f"data.{split}_path {explicit!r} is not a file (write it with scripts/write_ffcv.py)")
            files.append(str(explicit))
        else:
            if not config.path:
                raise ConfigError(f"data=ffcv needs data.path (a folder holding {split}.beton) or data.{split}_path")
            file = Path(config.path) / f"{split}.beton"
            if not file.is_file():
                raise ConfigError(
                    f"data.path {config.path!r} has no {split}.beton (write it with scripts/write_ffcv.py)"
                )
            files.append(str(file))
    return files[0], files[1]


def ffcv_loaders(config: FFCVConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool) -> Loaders:
    """The FFCV training (``train=True``) and validation loaders of process ``rank`` of ``world``."""
    train_file, val_file = beton_files(config, train)
    val_reader = Reader(val_file)
    _check_fields(val_reader, "val", config)
    val_size = int(val_reader.num_samples)
    workers = _threads(config)
    val_indices = np.arange(rank, val_size, world)
    val_batch = config.val_batch_size or config.batch_size
    if len(val_indices):
        val_loader: Any = Loader(
            val_file,
            batch_size=val_batch,
            num_workers=workers,
            os_cache=config.os_cache,
            order=OrderOption.SEQUENTIAL,
            indices=val_indices,
            drop_last=False,
            seed=seed,
            pipelines=_pipelines(config, device, train=False, resolution=config.image_size),
        )
    else:  # more processes than validation images
        val_loader = []

    train_loader = None
    on_epoch = None
    train_size = 0
    if train_file is not None:
        train_reader = Reader(train_file)
        _check_fields(train_reader, "train", config)
        train_size = int(train_reader.num_samples)
        check_batch_fits(config, world, train_size, train_file)
        pipelines = _pipelines(config, device, train=True, resolution=config.epoch_resolution(0))
        decoder = pipelines["image"][0]
        distributed = world > 1
        if distributed:
            _check_process_group(rank, world)
        train_loader = Loader(
            train_file,
            batch_size=config.batch_size,
            num_workers=workers,
            os_cache=config.os_cache,
            distributed=distributed,
            seed=derive_seed(seed, "order"),
            drop_last=True,
            order=OrderOption.RANDOM if distributed else OrderOption.QUASI_RANDOM,
            pipelines=pipelines,
        )
        train_loader = ReadAhead(train_loader)
        on_epoch = _epoch_setter(config, train_loader, decoder)

    info = DataInfo(config.num_classes, (3, config.image_size, config.image_size), train_size, val_size)
    return Loaders(train_loader, val_loader, info, on_epoch)


def _check_process_group(rank: int, world: int) -> None:
    """FFCV's distributed order splits by ``torch.distributed``'s rank and world size: they must exist and match."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"data=ffcv training with {world} processes needs an initialised torch.distributed "
            f"process group (FFCV splits the order by it)"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(
            f"data=ffcv: rank/world {rank}/{world} differ from torch.distributed's "
            f"{dist.get_rank()}/{dist.get_world_size()}"
        )


def _check_fields(reader: Any, split: str, config: FFCVConfig) -> None:
    names = list(reader.field_names)
    if names[:2] != ["image", "label"]:
        raise ConfigError(
            f"data=ffcv: the {split} file {reader.file_name} has fields {names}, expected image and "
            f"label (write it with scripts/write_ffcv.py)"
        )
    labels = reader.metadata["f1"]
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ConfigError(
            f"data.num_classes={config.num_classes} but the {split} file {reader.file_name} has "
            f"labels {int(labels.min())}..{int(labels.max())}"
        )


def _threads(config: FFCVConfig) -> int:
    """FFCV's decoding threads: ``data.num_workers``, or all cores for 0 (at most numba's thread limit)."""
    return max(1, min(config.num_workers or (os.cpu_count() or 1), numba.config.NUMBA_NUM_THREADS))


def _pipelines(config: FFCVConfig, device: torch.device, *, train: bool, resolution: int) -> dict[str, list]:
    if train:
        decoder = CropResizeDecoder(
            (resolution, resolution),
            crop="random",
            scale=(config.min_scale, 1.0),
            flip_prob=0.5 if config.hflip else 0.0,
        )
    else:
        decoder = CropResizeDecoder((resolution, resolution), crop="center", center_ratio=config.val_crop_ratio)
    return {
        "image": [decoder, *_to_normalized_tensor(config.dtype, device)],
        "label": [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)],
    }


def _to_device(device: torch.device) -> list:
    """FFCV's copy to ``device``; none on the CPU, where it would only copy each batch into another buffer."""
    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _to_normalized_tensor(dtype: str, device: torch.device) -> list:
    """uint8 H×W×3 batches → normalized N×C×H×W channels-last tensors of ``dtype`` on ``device``.

    ``numpy`` (the CPU): FFCV's jitted ``NormalizeImage`` on the uint8 arrays (float16 comes out as int16 bits
    that ``ToTorchImage`` views back as float16; bfloat16, which NumPy lacks, is converted from float32).
    On a GPU the uint8 batch is copied first and normalized there: ``cupy``, ``NormalizeImage``'s CuPy kernel
    (float32/float16, when CuPy is installed), else ``torch``, :class:`TorchNormalize`.
    """
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    np_dtype = np.float16 if dtype == "float16" else np.float32
    mode = NORMALIZE_MODE or (
        "numpy" if device.type == "cpu" else "cupy" if dtype != "bfloat16" and _has_cupy() else "torch"
    )
    if mode == "numpy":
        return [
            NormalizeImage(mean, std, np_dtype),
            ToTensor(),
            *_to_device(device),
            ToTorchImage(channels_last=True),
            *([Convert(torch.bfloat16)] if dtype == "bfloat16" else []),
        ]
    head = [ToTensor(), *_to_device(device), ToTorchImage(channels_last=True)]
    if mode == "cupy":
        return [*head, NormalizeImage(mean, std, np_dtype)]
    return [*head, TorchNormalize(mean, std, getattr(torch, dtype))]


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _epoch_setter(config: FFCVConfig, batches: ReadAhead, decoder: Any):
    """``on_epoch(epoch, start)``: the epoch's resolution, its order from ``(seed, epoch)`` only, and its batches
    from ``start`` on (the earlier ones read and dropped).

    FFCV draws epoch ``e``'s order from ``loader.next_epoch`` (incremented by each ``iter``). Its quasi-random
    order also shuffles a page → samples table in place each epoch, so the order would depend on every
    earlier epoch: the table is restored to its initial state before each epoch.
    """
    loader = batches.batches
    order = loader.traversal_order
    table = getattr(order, "page_to_samples_array", None)
    pristine = table.copy() if table is not None else None

    def on_epoch(epoch: int, start: int) -> None:
        res = config.epoch_resolution(epoch)
        decoder.output_size = (res, res)
        loader.next_epoch = epoch
        batches.start = start
        if pristine is not None:
            order.page_to_samples_array[...] = pristine

    return on_epoch


class TorchNormalize(Operation):
    """Normalize a uint8 N×C×H×W tensor with PyTorch ops on its device (FFCV's GPU normalization needs CuPy),
    into FFCV-allocated channels-last buffers of ``dtype`` (FFCV's per-slot events keep them from being reused
    while the consumer's stream still reads them)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = dtype
        self.device = torch.device("cpu")

    def generate_code(self):
        mean, std = self.mean.to(self.device), self.std.to(self.device)

        def normalize(images, dst):
            out = dst[: images.shape[0]].permute(0, 3, 1, 2)  # N×H×W×C storage: a channels-last view
            out.copy_((images.float() - mean) / std)
            return out

        return normalize

    def declare_state_and_memory(self, previous_state):
        channels, height, width = previous_state.shape
        self.device = previous_state.device
        return (
            replace(previous_state, jit_mode=False, dtype=self.dtype),
            AllocationQuery((height, width, channels), self.dtype, self.device),
        )
