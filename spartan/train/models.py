"""Model factory: builtin networks, torchvision models and timm models by name; the Sparsifier attached to one."""

from __future__ import annotations

import torch
from torch import nn

from spartan import Sparsifier, SparsityConfig
from spartan.train.config import ModelConfig
from spartan.train.errors import ConfigError


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN for 8×8 images: three 3×3 convs with BatchNorm (32/64/128 channels), one linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv-BN layers and a shortcut (a strided 1×1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def fmnist_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A small ResNet for 28×28 images: a 3×3 stem of ``width`` channels, three basic blocks that halve the
    resolution and double the channels (28 → 14 → 7 → 4; 2·/4·/8·width), global pooling, one linear head.
    ``width=16``: 0.30M parameters, 9.3M multiply-adds per image."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        BasicBlock(4 * width, 8 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )


BUILTIN = {"digits_cnn": digits_cnn, "fmnist_resnet": fmnist_resnet}


def build_model(config: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised model (uses the global torch RNG: seed before calling)."""
    try:
        return _build(config, num_classes, in_channels)
    except TypeError as err:  # e.g. a model.kwargs key the constructor does not take
        raise ConfigError(
            f"model.kwargs={dict(config.kwargs)!r} rejected by {config.source} model {config.name!r}: {err}"
        ) from None


def _build(config: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    if config.source == "builtin":
        if config.name not in BUILTIN:
            raise ConfigError(
                f"model.name must be one of the builtin models {tuple(BUILTIN)} with "
                f"model.source=builtin, got {config.name!r}"
            )
        return BUILTIN[config.name](num_classes=num_classes, in_channels=in_channels, **config.kwargs)
    if config.source == "torchvision":
        import torchvision

        if config.name not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(
                f"model.name {config.name!r} is not a torchvision classification model "
                f"(see torchvision.models.list_models())"
            )
        if in_channels != 3:
            raise ConfigError(f"torchvision models take 3-channel images, data.channels is {in_channels}")
        return torchvision.models.get_model(config.name, num_classes=num_classes, **config.kwargs)
    import timm

    if not timm.is_model(config.name):
        raise ConfigError(f"model.name {config.name!r} is not a timm model (see timm.list_models())")
    return timm.create_model(
        config.name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **config.kwargs
    )


def build_sparsifier(
    model: nn.Module, config: SparsityConfig, total_steps: int, optimizer: torch.optim.Optimizer | None = None
) -> Sparsifier:
    """The ``sparsity`` group's Sparsifier on ``model``; its errors (e.g. a block that does not divide a layer)
    name the group."""
    try:
        return Sparsifier(model, config, total_steps, optimizer=optimizer)
    except ValueError as err:
        raise ConfigError(f"sparsity: {err}") from None
