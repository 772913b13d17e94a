"""Samplers of the training loaders, free of the ``datasets`` library (usable wherever torch is installed)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["RepeatedAugmentationSampler"]


class RepeatedAugmentationSampler(Sampler[int]):
    """Repeated augmentation: each index appears ``repeats`` times per epoch, copies adjacent.

    The order is a permutation drawn from a private ``torch.Generator`` seeded with ``seed + epoch``
    (independent of the global RNG, identical on every process), with each index repeated ``repeats``
    times consecutively: ``[p0, p0, p0, p1, p1, p1, ...]``. ``len == num_samples * repeats``, so one epoch
    is ``repeats`` passes over the data. Batching it with a batch size that is a multiple of ``repeats``
    keeps all copies of an image in the same batch; sharding whole batches across processes (accelerate's
    ``BatchSamplerShard``) then gives every process different images.
    """

    def __init__(self, num_samples: int, repeats: int = 3, shuffle: bool = True, seed: int = 0) -> None:
        """See the class docstring; ``num_samples`` is the data set length."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}.")
        self.num_samples = int(num_samples)
        self.repeats = int(repeats)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (seeded with ``seed + epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        """Indices of the current epoch, each repeated ``repeats`` times consecutively."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        return iter(order.repeat_interleave(self.repeats).tolist())

    def __len__(self) -> int:
        """``num_samples * repeats``."""
        return self.num_samples * self.repeats
