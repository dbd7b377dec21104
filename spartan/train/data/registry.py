"""The ``data=`` backends by name, and the dispatcher that builds a config's loaders.

Backends are the modules of :mod:`spartan.train.data.backends`, found when first asked for. A backend's loaders
are named by ``"module:function"`` and imported only when it is used, so optional dependencies (FFCV,
WebDataset) load only for the backend that needs them.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import torch

from spartan.train.data.common import Backend, DataConfig, Loaders
from spartan.train.errors import ConfigError


@cache
def all_backends() -> dict[str, Backend]:
    """Every backend in :mod:`spartan.train.data.backends`, by name."""
    package = importlib.import_module("spartan.train.data.backends")
    found = {}
    for module in pkgutil.iter_modules(package.__path__):
        backend = importlib.import_module(f"{package.__name__}.{module.name}").BACKEND
        found[backend.name] = backend
    return found


def get_backend(name: str) -> Backend:
    if name not in all_backends():
        raise ConfigError(f"data.name must be one of {tuple(sorted(all_backends()))}, got {name!r}")
    return all_backends()[name]


def build_loaders(
    config: DataConfig,
    *,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    device: torch.device | None = None,
    train: bool = True,
) -> Loaders:
    """The loaders of ``config``'s backend for process ``rank`` of ``world``: training batches (``len()`` = batches
    per epoch; ``train=False``: none, for evaluation) and validation batches that see every image exactly once
    across processes. A :class:`ConfigError` for data that cannot be read, before anything is built."""
    return get_backend(config.name).build(
        config, rank=rank, world=world, seed=seed, device=device or torch.device("cpu"), train=train
    )
