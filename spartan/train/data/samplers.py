"""Samplers: validation shards without padding, and repeated augmentation for training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from spartan.train.seeding import derive_seed


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: each sample is seen by exactly one process, none twice."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RepeatedAugmentSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): each drawn image is repeated ``repeats`` times, the
    copies dealt to consecutive processes (augmented differently there; with fewer processes than repeats some
    copies share a process), while each process still sees ``size // world`` samples per epoch — so an epoch
    covers about ``1 / repeats`` of the distinct images. Shuffled by the run's ``seed`` and the epoch (the
    ``order`` stream), identically on every process."""

    def __init__(self, size: int, rank: int, world: int, repeats: int, seed: int):
        self.size, self.rank, self.world, self.repeats, self.seed = size, rank, world, repeats, seed
        self.per_process = size // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.size, generator=gen).repeat_interleave(self.repeats)
        total = math.ceil(len(order) / self.world) * self.world
        order = torch.cat([order, order[: total - len(order)]])  # pad so every process gets as many
        return iter(order[self.rank :: self.world][: self.per_process].tolist())

    def __len__(self) -> int:
        return self.per_process
