"""``data=digits``: scikit-learn's 1,797 handwritten digits (8×8 grayscale, 10 classes; ships with scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from spartan.train.data.common import Backend, DataConfig, DataLoaderOptions, Loaders, map_style_loaders
from spartan.train.errors import ConfigError


@dataclass
class DigitsConfig(DataLoaderOptions, DataConfig):
    """A fixed stratified hold-out of ``val_fraction`` of the images is the validation split."""

    name: str = "digits"
    channels: int = 1
    image_size: int = 8
    val_fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.image_size, self.channels) != (8, 1):
            raise ConfigError(
                f"data=digits has 1×8×8 images: data.image_size must be 8 and data.channels 1, got "
                f"{self.image_size} and {self.channels}"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")


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


def build_loaders(
    config: DigitsConfig, *, rank: int, world: int, seed: int, device: torch.device, train: bool
) -> Loaders:
    x_train, y_train, x_val, y_val = digits_split(config.val_fraction)
    return map_style_loaders(
        config,
        TensorDataset(x_train, y_train) if train else None,
        TensorDataset(x_val, y_val),
        10,
        rank=rank,
        world=world,
        seed=seed,
        device=device,
    )


BACKEND = Backend("digits", DigitsConfig, f"{__name__}:build_loaders")
