"""Samplers of the training loaders, free of the ``datasets`` library (usable wherever torch is installed)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..errors import UsageError

__all__ = [
    "ClassBalancedBatchSampler",
    "RepeatedAugmentationBatchSampler",
    "RepeatedAugmentationSampler",
    "copies_per_image",
]


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


def copies_per_image(batch_size: int, images: int) -> list[int]:
    """Copies of each of ``images`` images that fill ``batch_size`` places: as even as possible, the spare places
    going to the first images (batch 256 with 85 images: one image 4 times, the others 3 times)."""
    base, spare = divmod(batch_size, images)
    return [base + 1] * spare + [base] * (images - spare)


class RepeatedAugmentationBatchSampler(Sampler[list[int]]):
    """Batches of repeated-augmentation copies for any batch size and any ``repeats``.

    Each epoch the images are put in a seeded random order (``self.sampler``, a
    :class:`RepeatedAugmentationSampler` with one copy, so ``set_epoch`` reaches it the way accelerate forwards it)
    and cut into groups of ``images_per_batch = max(1, batch_size // repeats)`` images; the incomplete last group is
    dropped (its images come first in other epochs' orders). A batch holds every copy of each of its images, copies
    adjacent:

    - ``batch_size % repeats == 0``: each image ``repeats`` times (the reference's layout; identical to batching
      :class:`RepeatedAugmentationSampler` with ``drop_last``);
    - otherwise the ``batch_size % repeats`` spare places go to extra copies, spread evenly from the batch's first
      image on, so ``batch_size=256, repeats=3`` gives 85 images: 1 image with 4 copies and 84 with 3;
    - ``batch_size < repeats``: one image, ``batch_size`` copies.

    So no image's copies are ever split across batches, every image of the epoch's full groups is seen at least
    ``repeats`` times, and ``len == num_samples // images_per_batch``. Whole batches are what accelerate's
    ``BatchSamplerShard`` hands to the processes, so each process gets its own images and all copies of each.
    """

    def __init__(
        self, num_samples: int, batch_size: int, repeats: int = 3, shuffle: bool = True, seed: int = 0
    ) -> None:
        """See the class docstring; ``num_samples`` is the data set length."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.sampler = RepeatedAugmentationSampler(num_samples, repeats=1, shuffle=shuffle, seed=seed)
        self.batch_size = int(batch_size)
        self.repeats = int(repeats)
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}.")
        self.drop_last = True  # read by accelerate's BatchSamplerShard
        self.images_per_batch = max(1, self.batch_size // self.repeats)
        # (images_per_batch,) copies of each image slot; sums to batch_size
        self.copies = torch.tensor(copies_per_image(self.batch_size, self.images_per_batch), dtype=torch.int64)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the image order of ``epoch``."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        """``len(self)`` batches of ``batch_size`` indices."""
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        for start in range(0, len(self) * self.images_per_batch, self.images_per_batch):
            images = order[start : start + self.images_per_batch]
            yield images.repeat_interleave(self.copies).tolist()

    def __len__(self) -> int:
        """Full groups of ``images_per_batch`` images in the data set."""
        return self.sampler.num_samples // self.images_per_batch


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """P x K batches: each batch holds ``images_per_class`` (K) images of each of P classes, every image with all its
    repeated-augmentation copies, so that arbitrary pairs find many partners in the batch.

    A batch holds ``max(1, batch_size // repeats)`` images (as :class:`RepeatedAugmentationBatchSampler`), i.e.
    P = that // K classes (at least 1; a remainder of images comes from one more class) with copies spread the same
    way. Each epoch, every class's images are shuffled and cut into groups of K (the last group filled up by drawing
    the class's images again); each batch takes one group from each of P different classes, chosen at random with
    weights proportional to the groups they have left (a class that has given all its groups starts a new round).
    An epoch has as many batches as the plain sampler's (about one pass over the data; each image about ``repeats``
    times). The order is seeded with ``seed + epoch``, identical on every process, and whole batches go to the
    processes, so the composition holds on each process. With fewer classes than P, K grows so that a batch still
    holds ``batch_size`` samples.

    Args:
        labels: (N,) class index of every image of the data set.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        images_per_class: int = 4,
        repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        """See the class docstring."""
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}.")
        self.layout = RepeatedAugmentationBatchSampler(len(labels), batch_size, repeats=repeats, seed=seed)
        per_batch = self.layout.images_per_batch
        if per_batch <= images_per_class and len(torch.unique(torch.as_tensor(labels))) > 1:
            raise UsageError(
                f"--sampler pk: a batch holds {per_batch} distinct images (--per_device_train_batch_size "
                f"{batch_size} / --ra {repeats}), no more than --pk_images_per_class {images_per_class}: every batch "
                "would hold a single class, with no negatives. Raise --per_device_train_batch_size to "
                f"{(images_per_class + 1) * repeats} or more, or lower --pk_images_per_class to "
                f"{max(1, per_batch // 2)}."
            )
        self.sampler = self.layout.sampler  # where accelerate's set_epoch lands
        self.batch_size = self.layout.batch_size
        self.drop_last = True
        self.images_per_class = min(int(images_per_class), self.layout.images_per_batch)
        self.shuffle = shuffle
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes = [torch.nonzero(self.labels == c).flatten() for c in torch.unique(self.labels).tolist()]
        per_batch = self.layout.images_per_batch
        if len(self.classes) * self.images_per_class < per_batch:  # too few classes for P x K: more images of each
            self.images_per_class = -(-per_batch // max(1, len(self.classes)))
        self.classes_per_batch = max(1, per_batch // self.images_per_class)
        self.group_sizes = [self.images_per_class] * self.classes_per_batch
        if per_batch - sum(self.group_sizes) > 0:
            self.group_sizes.append(per_batch - sum(self.group_sizes))  # the remainder: one more class

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of ``epoch``."""
        self.sampler.set_epoch(epoch)

    def _class_groups(self, members: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """A class's images in a fresh random order, cut into groups of K (filled up by redrawing when short)."""
        k = self.images_per_class
        order = members[torch.randperm(len(members), generator=generator)] if self.shuffle else members
        if len(order) % k:
            extra = members[torch.randint(len(members), (k - len(order) % k,), generator=generator)]
            order = torch.cat([order, extra])
        return [order[i : i + k] for i in range(0, len(order), k)]

    def _batches(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        groups = [self._class_groups(members, generator) for members in self.classes]
        needed = min(len(self.group_sizes), len(groups))
        for _ in range(len(self)):
            left = torch.tensor([max(len(g), 1) for g in groups], dtype=torch.float64)
            chosen = torch.multinomial(left, needed, replacement=False, generator=generator).tolist()
            images = []
            for c, size in zip(chosen, self.group_sizes, strict=False):
                if not groups[c]:  # the class has given all its images this epoch: a new round of them
                    groups[c] = self._class_groups(self.classes[c], generator)
                images.append(groups[c].pop()[:size])
            batch = torch.cat(images)
            yield batch.repeat_interleave(self.layout.copies[: len(batch)]).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """The epoch's batches of ``batch_size`` indices."""
        return self._batches()

    def __len__(self) -> int:
        """As many batches as :class:`RepeatedAugmentationBatchSampler` gives: about one pass over the images."""
        return len(self.layout)
