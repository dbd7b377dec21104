"""Image transforms of the ImageFolder and WebDataset backends, and the batch mixer the trainer applies to every
backend's batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from spartan.train.data.common import AugmentOptions, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(config: AugmentOptions) -> v2.Compose:
    """RandomResizedCrop → flip → RandAugment/TrivialAugment → tensor, normalize → random erasing."""
    interpolation = InterpolationMode(config.interpolation)
    steps = [
        v2.RGB(),
        v2.RandomResizedCrop(
            config.image_size, scale=(config.min_scale, 1.0), interpolation=interpolation, antialias=True
        ),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if config.auto_augment == "randaugment":
        steps.append(v2.RandAugment(config.randaugment_ops, config.randaugment_magnitude, interpolation=interpolation))
    elif config.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    steps += _to_normalized_tensor()
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(config.random_erasing, value=0))
    return v2.Compose(steps)


def val_transform(config: AugmentOptions) -> v2.Compose:
    """Resize the short side to ``image_size / val_crop_ratio`` (256 for 224), center-crop, normalize."""
    resize = round(config.image_size / config.val_crop_ratio)
    return v2.Compose(
        [
            v2.RGB(),
            v2.Resize(resize, interpolation=InterpolationMode(config.interpolation), antialias=True),
            v2.CenterCrop(config.image_size),
            *_to_normalized_tensor(),
        ]
    )


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def batch_mixer(config: DataConfig, num_classes: int) -> Callable | None:
    """Mixup and/or CutMix on a batch ``(images, labels) → (images, soft targets)`` (rows sum to 1), or None.

    With both enabled one of the two is drawn per batch, as in the DeiT/ViT recipes. Uses the torch RNG,
    which the trainer seeds per epoch and process.
    """
    mixers = []
    if config.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
