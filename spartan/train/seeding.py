"""Every random number of a run follows from its ``seed`` through named streams.

Nothing random is stored in checkpoints: each epoch's randomness is re-derived from ``(seed, rank, epoch)``, so
a resumed run replays an uninterrupted one exactly, processes draw different augmentations, and a changed world
size cannot break a resume. The streams (ids in order):

- the model's initial weights: :func:`seed_everything` with the run seed itself, as ``torch.manual_seed(seed)``
  before building the model would;
- ``process`` (rank, epoch): torch, numpy and ``random`` of one process in one epoch (dropout, Mixup/CutMix, the
  main process's augmentation);
- ``workers`` (rank, epoch): the generator DataLoader worker seeds are drawn from;
- ``order`` (): the training order's seed, to which samplers add the epoch; ``order`` (epoch) where a sampler
  needs one seed per epoch (repeated augmentation);
- ``shards`` (epoch, pass): WebDataset's shard order.

Seeds are hashed (numpy's ``SeedSequence``), so run seed 1 in epoch 0 draws nothing like run seed 0 in epoch 1.
"""

from __future__ import annotations

import random

import numpy as np
import torch

STREAMS: dict[str, tuple[int, ...]] = {"process": (), "workers": (1,), "order": (2,), "shards": (3,)}


def derive_seed(seed: int, stream: str, *ids: int) -> int:
    """The 32-bit seed of ``stream`` (one of :data:`STREAMS`) for run ``seed`` and the stream's ``ids``."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {tuple(STREAMS)}, got {stream!r}")
    return int(np.random.SeedSequence([seed, *ids, *STREAMS[stream]]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
