"""Data for the trainer: one backend per ``data=`` option (:mod:`spartan.train.data.backends`): digits, synthetic
images, ImageNet-layout folders, FFCV files and WebDataset shards.

``build_loaders(config, ...)`` returns :class:`Loaders`: a training iterable of ``(images, labels)`` batches
(``len()`` = batches per epoch), a validation iterable that sees every image exactly once across processes,
:class:`DataInfo` and an epoch hook. Mixup/CutMix is applied by the trainer on the device
(:func:`spartan.train.data.transforms.batch_mixer`), the same for every backend. FFCV and WebDataset are imported
only when selected.
"""

from spartan.train.data.common import DataConfig, DataInfo, Loaders
from spartan.train.data.registry import all_backends, build_loaders, get_backend

__all__ = ["DataConfig", "DataInfo", "Loaders", "all_backends", "build_loaders", "get_backend"]
