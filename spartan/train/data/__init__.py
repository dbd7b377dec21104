"""Data for the trainer: digits, synthetic images, ImageNet-layout folders, FFCV files and WebDataset shards.

``build_loaders(config, ...)`` returns :class:`Loaders`: a training iterable of ``(images, labels)``
batches (``len()`` = batches per epoch), a validation iterable that sees every image exactly once across
processes, :class:`DataInfo`, an epoch hook and the optional batch mixer (Mixup/CutMix, applied by the
trainer on the device so that every loader gets the same soft targets). FFCV and WebDataset are imported only
when selected.
"""

from spartan.train.data.loaders import DataInfo, Loaders, build_loaders, check_data, digits_split

__all__ = ["DataInfo", "Loaders", "build_loaders", "check_data", "digits_split"]
