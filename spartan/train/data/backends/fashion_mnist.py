"""``data=fashion_mnist``: Zalando's Fashion-MNIST (70,000 28×28 grayscale images of clothing, 10 classes).

Read from its four IDX files (gzipped or not), by default where the Debian package ``dataset-fashion-mnist``
installs them (gzipped, in one folder). torchvision's ``FashionMNIST`` cannot read them there: it wants the
uncompressed files under ``<root>/FashionMNIST/raw/`` and otherwise downloads, so a twenty-line IDX reader is used.
``val_size`` of the 60,000 training images (stratified, fixed) are the validation split used for every choice of
hyperparameters; the 10,000 test images are the ``test`` loader, which the trainer evaluates once, after the last
epoch.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from spartan.train.data.common import Backend, DataConfig, DataLoaderOptions, Loaders, map_style_loaders
from spartan.train.errors import ConfigError

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install -y dataset-fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}
TRAIN_IMAGES = 60_000


@dataclass
class FashionMNISTConfig(DataLoaderOptions, DataConfig):
    """``path``: the folder of ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; ``val_size``: training images
    held out for validation."""

    name: str = "fashion_mnist"
    channels: int = 1
    image_size: int = 28
    path: str = DEBIAN_PATH
    val_size: int = 6000

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.image_size, self.channels) != (28, 1):
            raise ConfigError(
                f"data=fashion_mnist has 1×28×28 images: data.image_size must be 28 and data.channels 1, got "
                f"{self.image_size} and {self.channels}"
            )
        if not (isinstance(self.val_size, int) and 0 < self.val_size < TRAIN_IMAGES):
            raise ConfigError(f"data.val_size must be an integer in (0, {TRAIN_IMAGES}), got {self.val_size!r}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, unsigned bytes), gzipped or not, as a uint8 array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()!r})")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: its header says {shape}, it holds {data.size} values")
    return data.reshape(shape)


def _idx_file(folder: Path, split: str, kind: str) -> Path:
    stem = f"{SPLITS[split]}-{kind}-ubyte"
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    hint = f" (install it: {INSTALL}, as root)" if str(folder) == DEBIAN_PATH else ""
    raise ConfigError(f"data.path={str(folder)!r} has no {stem}[.gz] of Fashion-MNIST{hint}")


def load_split(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 1, 28, 28), labels int64 (N,))`` of the ``train`` or ``test`` split."""
    folder = Path(folder)
    images = read_idx(_idx_file(folder, split, "images-idx3"))
    labels = read_idx(_idx_file(folder, split, "labels-idx1"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ConfigError(
            f"data.path={str(folder)!r}: the {split} split has images {images.shape} and labels {labels.shape}, "
            f"expected (N, 28, 28) and (N,)"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_splits(config: FashionMNISTConfig) -> dict[str, TensorDataset]:
    """The ``train`` / ``val`` / ``test`` datasets: float32 images standardised by the training split's mean/std;
    ``val`` is a fixed stratified sample of ``val_size`` training images."""
    from sklearn.model_selection import train_test_split

    images, labels = load_split(config.path, "train")
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=config.val_size, random_state=0, stratify=labels.numpy()
    )
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    test_images, test_labels = load_split(config.path, "test")
    scale = images[train_idx].float() / 255
    mean, std = scale.mean(), scale.std()

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    return {
        "train": TensorDataset(standardise(images[train_idx]), labels[train_idx]),
        "val": TensorDataset(standardise(images[val_idx]), labels[val_idx]),
        "test": TensorDataset(standardise(test_images), test_labels),
    }


def build_loaders(
    config: FashionMNISTConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    splits = fashion_mnist_splits(config)
    return map_style_loaders(
        config,
        splits["train"] if train else None,
        splits["val"],
        10,
        test_set=splits["test"],
        rank=rank,
        world=world,
        seed=seed,
        device=device,
    )


BACKEND = Backend("fashion_mnist", FashionMNISTConfig, f"{__name__}:build_loaders")
