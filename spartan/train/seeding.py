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
  needs one seed per epoch (repeated augmentation, ``data=synthetic``);
- ``shards`` (epoch, pass): WebDataset's shard order;
- ``samples`` (rank, epoch, position): the augmentation of the sample at ``position`` of one process's epoch (map-style
  backends that augment), so a run resumed mid-epoch draws the same augmentations whatever worker decodes them;
- ``synthetic`` (split): the images and labels of ``data=synthetic`` (split 0 training, 1 validation).

A checkpoint written mid-epoch also holds the RNG states of that moment (:func:`rng_state`).

Seeds are hashed (numpy's ``SeedSequence``), so run seed 1 in epoch 0 draws nothing like run seed 0 in epoch 1.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

STREAMS: dict[str, tuple[int, ...]] = {
    "process": (),
    "workers": (1,),
    "order": (2,),
    "shards": (3,),
    "samples": (4,),
    "synthetic": (5,),
}


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


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and its current GPU), numpy and ``random`` states, as tensors and numbers (they
    load with ``torch.load(weights_only=True)``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,  # this process's GPU only
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "random": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss_next"]))
