"""From rows to batches: the batch transform of stored images (:class:`ImageTransform`), the training and evaluation
loaders, and resumable augmentation. Works without the ``datasets`` library.

Rows are ``{"pixel_values": Tensor(C, H, W), "labels": int}``; :func:`collate_fn` stacks them into
``{"pixel_values": Tensor(B, C, H, W), "labels": LongTensor(B)}``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from .arguments import DataArguments
from .images import decode_image, describe_image, image_key, logger
from .samplers import ClassBalancedBatchSampler, RepeatedAugmentationBatchSampler

__all__ = [
    "ImageTransform",
    "ResumableAugmentations",
    "capture_rng_state",
    "collate_fn",
    "create_eval_dataloader",
    "create_train_dataloader",
    "restore_rng_state",
]


class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: ``{"image", "label"}`` -> ``{"pixel_values", "labels"}``.

    ``pixel_values`` is a list of tensors (C, H, W); ``labels`` a list of ints. With ``decode_once`` (default),
    an image that appears several times in the batch (its repeated-augmentation copies, which the training sampler
    puts in one batch) is decoded once and augmented once per copy.

    An image that cannot be decoded raises ValueError naming it. With ``skip_corrupt_images`` its rows take the
    image and the label of the next row of the batch (wrapping around) whose image decodes, so the batch keeps its
    size and every label stays that of its pixels; a WARNING names the file the first time this transform meets it.
    A batch without any readable image raises ValueError.
    """

    def __init__(
        self,
        transform: Callable[[PIL.Image.Image], torch.Tensor],
        decode_once: bool = True,
        skip_corrupt_images: bool = False,
    ) -> None:
        """``transform``: PIL image -> Tensor(C, H, W)."""
        self.transform = transform
        self.decode_once = decode_once
        self.skip_corrupt_images = skip_corrupt_images
        self._reported: set[str] = set()

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Decode and transform a batch of rows (lists of equal length B)."""
        images = self._decode(batch["image"])
        labels = [int(label) for label in batch["label"]]
        unreadable = {index: image for index, image in enumerate(images) if isinstance(image, ValueError)}
        if unreadable:
            images, labels = self._replace_unreadable(batch["image"], images, labels, unreadable)
        return {"pixel_values": [self.transform(image) for image in images], "labels": labels}

    def _decode(self, values: list[Any]) -> list[PIL.Image.Image | ValueError]:
        """Each row's image, each distinct one decoded once; an unreadable one's error (with ``skip_corrupt_images``)
        in its place."""
        decoded: dict[Any, PIL.Image.Image | ValueError] = {}
        images: list[PIL.Image.Image | ValueError] = []
        for index, value in enumerate(values):
            key = image_key(value) if self.decode_once else None
            image = decoded.get(key) if key is not None else None
            if image is None:
                try:
                    image = decode_image(value, index)
                    if key is not None:
                        image.load()  # decode now, once, rather than lazily in each copy's first operation
                except ValueError as error:
                    if not self.skip_corrupt_images:
                        raise
                    image = error
                if key is not None:
                    decoded[key] = image
            images.append(image)
        return images

    def _replace_unreadable(
        self,
        values: list[Any],
        images: list[PIL.Image.Image | ValueError],
        labels: list[int],
        unreadable: dict[int, ValueError],
    ) -> tuple[list[PIL.Image.Image], list[int]]:
        """Give each unreadable row the image and label of the next readable row (wrapping around); warn once per
        file. Without random draws, so that the other rows get the augmentations they would get without the file."""

        def name(index: int) -> str:
            value = values[index]
            return describe_image(value, index) if isinstance(value, Mapping) else repr(value)

        size = len(images)
        if len(unreadable) == size:
            listed = ", ".join(sorted({name(index) for index in unreadable})[:5])
            raise ValueError(
                f"Every image of a batch of {size} is unreadable ({listed}): --skip_corrupt_images can only replace "
                f"an unreadable image by a readable one of its batch. Fix or remove these images."
            )
        images, labels = list(images), list(labels)
        for index, error in unreadable.items():
            source = next(row for row in (index + step for step in range(1, size)) if row % size not in unreadable)
            images[index], labels[index] = images[source % size], labels[source % size]
            where = name(index)
            if where not in self._reported:
                self._reported.add(where)
                cause = error.__cause__ if error.__cause__ is not None else error
                logger.warning(
                    "Unreadable image %s (%s: %s) replaced in its batch by %s, with that image's label %d "
                    "(--skip_corrupt_images); its later replacements are not logged.",
                    where,
                    type(cause).__name__,
                    cause,
                    name(source % size),
                    labels[index],
                )
        return images, labels


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows into ``{"pixel_values": (B, C, H, W), "labels": LongTensor(B)}``: float32, or uint8 samples kept
    as uint8 (normalised on the device by :class:`~simlap_hf.data.TrainNormalizer`); other dtypes become float32."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    if not pixel_values.is_floating_point() and pixel_values.dtype != torch.uint8:
        pixel_values = pixel_values.float()
    labels = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.int64)
    return {"pixel_values": pixel_values, "labels": labels}


class ResumableAugmentations(torch.utils.data.Dataset):
    """The training set, with the random state before each batch's augmentations remembered so that a mid-epoch
    resume draws the same augmentations as an uninterrupted run.

    Rows are those of ``dataset`` unchanged.

    The loader fetches a batch ahead of the one being trained, so when a checkpoint is written after batch ``k``
    the global RNGs (Python, NumPy, torch) have already been advanced by the augmentations of batch ``k + 1``; a
    resumed run would draw them again from there. With :meth:`state_before_batch` saved in the checkpoint and
    :meth:`resume_at` called on resume, the first fetched batch is augmented from the remembered state and the
    checkpoint's state is put back afterwards, which is exactly where the uninterrupted run stood.
    Only with ``dataloader_num_workers=0``: worker processes draw from their own generators.
    """

    # Whether a resumed epoch reaches its position by itself (start_epoch(first_batch)) rather than by the loop
    # skipping the batches before it.
    replays_to_position = False

    def __init__(self, dataset: torch.utils.data.Dataset, keep: int = 4) -> None:
        self.dataset = dataset
        self.keep = keep
        self._states: dict[int, dict[str, Any]] = {}
        self._next_batch = 0
        self._pending: tuple[dict[str, Any], dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """One training batch; called once per batch by the DataLoader."""
        after = self._begin_batch()
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        self._end_batch(after)
        return rows

    def _begin_batch(self) -> dict[str, Any] | None:
        """Remember (or, on a resume, put back) the RNG states before the next batch's augmentations. Returns the
        states to put back once the batch is augmented (None: keep going from where the batch leaves them)."""
        after = None
        if self._pending is not None:
            state, after = self._pending
            restore_rng_state(state)
            self._pending = None
        else:
            state = capture_rng_state()
        self._states[self._next_batch] = state
        self._states.pop(self._next_batch - self.keep, None)
        self._next_batch += 1
        return after

    def _end_batch(self, after: dict[str, Any] | None) -> None:
        """After a batch's augmentations: the states :meth:`_begin_batch` returned, if any."""
        if after is not None:
            restore_rng_state(after)

    def start_epoch(self, first_batch: int = 0) -> None:
        """Number the coming fetches from ``first_batch`` (the batches a resumed epoch skips are not fetched)."""
        self._next_batch = first_batch
        self._states.clear()
        self._pending = None

    def state_before_batch(self, index: int) -> dict[str, Any] | None:
        """The RNG states before batch ``index`` (0-based, in this epoch) was augmented, if it was fetched here."""
        return self._states.get(index)

    def resume_at(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Augment the next fetched batch from ``before`` (what :meth:`state_before_batch` gave the stopped run),
        then continue from ``after`` (the states the checkpoint restored)."""
        self._pending = (before, after)


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU) global random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the global random states that :func:`capture_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def create_train_dataloader(
    train_dataset: torch.utils.data.Dataset,
    args: DataArguments,
    batch_size: int,
    seed: int = 42,
    class_ids: Sequence[int] | None = None,
) -> DataLoader:
    """Training loader: :class:`~simlap_hf.data.RepeatedAugmentationBatchSampler` (any ``batch_size``, each image
    ``ra`` times with all its copies in one batch), or with ``args.sampler == "pk"``
    :class:`~simlap_hf.data.ClassBalancedBatchSampler` (P classes x K images per batch, same copies) over
    ``class_ids`` (the class id of every row, (N,); required then), + :func:`collate_fn`.

    Batches are ``{"pixel_values": Tensor(batch_size, C, H, W), "labels": LongTensor(batch_size)}``.
    The image-order sampler stays reachable as ``loader.batch_sampler.sampler`` (accelerate forwards ``set_epoch``
    there).

    Raises:
        ValueError: ``batch_size`` is not positive, or the data is too small for one full batch.
        TypeError: ``args.sampler == "pk"`` without ``class_ids``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if args.sampler == "pk":
        if class_ids is None:
            raise TypeError("create_train_dataloader: the 'pk' sampler needs class_ids, the class id of every row.")
        batch_sampler = ClassBalancedBatchSampler(
            class_ids, batch_size, images_per_class=args.pk_images_per_class, repeats=args.ra, seed=seed
        )
    else:
        batch_sampler = RepeatedAugmentationBatchSampler(len(train_dataset), batch_size, repeats=args.ra, seed=seed)
    if len(batch_sampler) == 0:
        raise ValueError(
            f"The training set has {len(train_dataset)} images, fewer than the {batch_sampler.images_per_batch} "
            f"images of one batch (batch_size={batch_size} with ra={args.ra}); lower --per_device_train_batch_size."
        )
    workers = args.loader_workers()
    return DataLoader(
        ResumableAugmentations(train_dataset) if workers == 0 else train_dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def create_eval_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential evaluation loader (all rows, last batch may be short) with :func:`collate_fn`.

    Batches are ``{"pixel_values": FloatTensor(B, C, H, W), "labels": LongTensor(B)}`` with B <= batch_size.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def prepare_own_part_loader(accelerator: Accelerator, loader: DataLoader) -> DataLoader:
    """Device placement for a loader whose dataset already reads only this process's part: accelerate's own
    preparation of an iterable loader would read everything on the main process and dispatch it, or have every
    process read the whole stream, so the loader is prepared as a single process's."""
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=True,
        non_blocking=accelerator.dataloader_config.non_blocking,
    )
