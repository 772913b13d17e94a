"""Training from a stream (``--streaming``): repeated augmentation over a ``datasets`` IterableDataset, each process
and loader worker reading its own part, with equal batch counts everywhere and an exact mid-epoch resume.

Batches are ``{"pixel_values": Tensor(batch_size, C, H, W), "labels": LongTensor(batch_size)}``, as the map-style
training loader's: ``batch_size // ra`` images per batch, each decoded once and augmented once per copy, the copies
adjacent in the batch (spare places go to extra copies of the first images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import PIL.Image
import pyarrow
import torch
from accelerate import PartialState
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from ..errors import UsageError
from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .columns import get_label_names
from .dataset import image_rows
from .images import decode_image
from .loaders import ResumableAugmentations, collate_fn
from .readers import ImageTransformFn, Reader
from .samplers import RepeatedAugmentationBatchSampler, copies_per_image
from .sources import resolve_stream_sources
from .stream_sources import StandardStream, collect_split, hub_validation_split, open_stream

__all__ = ["StreamReader", "StreamingRepeatedAugmentation"]

logger = logging.getLogger("simlap_hf")


class StreamingRepeatedAugmentation(ResumableAugmentations, torch.utils.data.IterableDataset):
    """One process's training batches from a stream, for a DataLoader with ``batch_size=None``.

    The stream is shuffled in a buffer of ``buffer_size`` images seeded with ``seed`` (datasets adds the epoch set by
    :meth:`set_epoch`), then split across the ``world_size`` processes with ``split_dataset_by_node`` (whole shards
    when their number divides evenly, else every ``world_size``-th image), and across loader workers by datasets
    (whole shards; each worker needs at least one).

    Every process yields ``len(self) = num_examples // (world_size * images_per_batch)`` batches per epoch, whatever
    the size of its part: a part that runs out starts over from its beginning (as DistributedSampler pads), and what
    is left at the end is dropped. So the collectives of a step never wait for a process that has no batch. Loader
    worker ``w`` of ``W`` yields the batches ``w, w + W, ...`` (the DataLoader takes them round robin).

    A resume at batch ``k`` of an epoch (:meth:`start_epoch`) replays the epoch's stream up to the position, reading
    but not decoding the ``k * images_per_batch`` images before it; with ``dataloader_num_workers=0`` the RNG states
    of the remembered batch make the augmentations those of the uninterrupted run (see
    :class:`~simlap_hf.data.ResumableAugmentations`).
    """

    replays_to_position = True  # the training loop passes a resume position to start_epoch instead of skipping

    def __init__(
        self,
        stream: datasets.IterableDataset,
        transform: Callable[[PIL.Image.Image], torch.Tensor],
        args: DataArguments,
        num_examples: int,
        batch_size: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """``stream`` yields standard rows ``{"image": {"bytes", "path"}, "label": int}``; ``num_examples`` is its
        length over all processes; ``transform``: PIL image -> Tensor(C, H, W); ``args`` gives ``ra``,
        ``shuffle_buffer_size`` and ``skip_corrupt_images``; ``rank`` / ``world_size`` default to accelerate's."""
        super().__init__(stream)
        if rank is None or world_size is None:
            rank, world_size = PartialState().process_index, PartialState().num_processes
        self.world_size = world_size
        layout = RepeatedAugmentationBatchSampler(0, batch_size, repeats=args.ra)
        self.batch_size, self.images_per_batch = batch_size, layout.images_per_batch
        self.transform, self.skip_corrupt_images = transform, args.skip_corrupt_images
        self.num_batches = num_examples // (world_size * self.images_per_batch)
        self._warned_wrap = False  # the warning that the stream ran out within an epoch, given once
        shuffled = stream.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        self.part = split_dataset_by_node(shuffled, rank, world_size)
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the coming epoch with ``seed + epoch``."""
        self.epoch = epoch

    def start_epoch(self, first_batch: int = 0) -> None:
        """Begin the coming epoch at batch ``first_batch`` (a mid-epoch resume)."""
        super().start_epoch(first_batch)
        self._skip = first_batch

    def _rows_once(self) -> Iterator[dict[str, Any]]:
        """This process's (and worker's) part of the epoch's stream, once."""
        self.part.set_epoch(self.epoch)
        yield from self.part

    def _rows(self) -> Iterator[dict[str, Any]]:
        """This process's (and worker's) part of the epoch's stream, started over whenever it runs out."""
        while True:
            count = 0
            for row in self._rows_once():
                count += 1
                yield row
            if count and not self._warned_wrap:  # the epoch needs more images than this part of the stream holds
                self._warned_wrap = True
                logger.warning(
                    "The training stream ran out after %d images (this process's and loader worker's part) before the "
                    "end of the epoch: it is read again from the start, so images repeat within an epoch. "
                    "--streaming_num_examples (or the source's size) is larger than the stream; pass the stream's "
                    "number of images for one pass per epoch.",
                    count,
                )
            if not count:
                raise RuntimeError(
                    f"A process or loader worker got no part of the stream ({self.part.n_shards} shard(s)): use "
                    "fewer --dataloader_num_workers, or more shards than processes x workers."
                )

    def _augment(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Decode each image of a group once and augment it once per copy: (batch_size, C, H, W) and labels."""
        images, labels = [], []
        for index, row in enumerate(rows):
            try:
                image = decode_image(row["image"], index)
            except ValueError:
                if not self.skip_corrupt_images:
                    raise
                logger.warning("Skipped an undecodable image of the stream: %s", row["image"].get("path"))
                continue
            image.load()
            images.append(image)
            labels.append(row["label"])
        if not images:
            raise ValueError("Every image of a training batch is undecodable.")
        samples = [
            {"pixel_values": self.transform(image), "labels": label}
            for image, label, copies in zip(images, labels, copies_per_image(self.batch_size, len(images)), strict=True)
            for _ in range(copies)
        ]
        return collate_fn(samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches of the epoch, from the resume position on."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, self._skip = self._skip, 0
        mine = range(worker, self.num_batches, workers)
        skipped = sum(1 for index in mine if index < first)
        rows = self._rows()
        for _ in range(skipped * self.images_per_batch):
            next(rows)
        for _ in mine[skipped:]:
            group = [next(rows) for _ in range(self.images_per_batch)]
            after = self._begin_batch()
            batch = self._augment(group)
            self._end_batch(after)
            yield batch


def _num_examples(args: DataArguments, train: StandardStream) -> int:
    """Training images in the stream: ``--streaming_num_examples``, else what the source says; a ValueError that
    names the flag when neither is known."""
    if args.streaming_num_examples is not None:
        if train.num_examples is not None and args.streaming_num_examples > train.num_examples:
            logger.warning(
                "--streaming_num_examples %d is larger than the %d training images of the stream: each epoch reads "
                "the stream about %.1f times (images repeat within an epoch). Pass --streaming_num_examples %d for "
                "one pass per epoch.",
                args.streaming_num_examples,
                train.num_examples,
                args.streaming_num_examples / train.num_examples,
                train.num_examples,
            )
        return args.streaming_num_examples
    if train.num_examples is None:
        raise ValueError(
            "--streaming: the source does not say how many training images it holds; pass --streaming_num_examples N "
            "(it sets the epoch length and the learning-rate schedule)."
        )
    return train.num_examples


def _check_enough(dataset: StreamingRepeatedAugmentation, num_examples: int) -> None:
    """A ValueError when the stream is too small for one batch on each process."""
    if len(dataset) == 0:
        raise ValueError(
            f"The training stream has {num_examples} images, fewer than the {dataset.images_per_batch} images of one "
            f"batch on each of {dataset.world_size} process(es); lower --per_device_train_batch_size."
        )


def _opened(open_split: Callable[[], StandardStream], flag: str, files: Any) -> StandardStream:
    """``open_split()``; tar shards that Arrow cannot read (an empty or damaged tar) are a user error naming the
    flag and the files."""
    try:
        return open_split()
    except pyarrow.ArrowInvalid as error:
        if not files:
            raise
        raise UsageError(
            f"{flag} {files!r}: the tar shards could not be read ({' '.join(str(error).split())}). Each shard must "
            "hold image files with their label files (WebDataset layout); an empty or damaged tar gives this error."
        ) from error


class StreamReader(Reader):
    """The reader of ``--streaming``: the training stream of this process (:class:`StreamingRepeatedAugmentation`),
    the validation split and the first ``--streaming_train_eval_examples`` training images in memory."""

    training_split_per_process = True

    def __init__(self, args: DataArguments) -> None:
        train_source, validation_source = resolve_stream_sources(args)
        self.train = _opened(lambda: open_stream(train_source, args, TRAIN_SPLIT), "--train_files", args.train_files)
        split = hub_validation_split(validation_source) if validation_source.kind == "hub" else VALIDATION_SPLIT
        validation_stream = _opened(
            lambda: open_stream(validation_source, args, split), "--validation_files", args.validation_files
        )
        validation = collect_split(validation_stream, args.max_eval_samples, self.train.label_names)
        label_names = get_label_names(validation)
        self.splits = {
            VALIDATION_SPLIT: validation,
            TRAIN_SPLIT: collect_split(self.train, args.streaming_train_eval_examples, label_names),
        }
        super().__init__(args, label_names, train_source.description)

    def training_loader(self, transform: ImageTransformFn, batch_size: int, seed: int) -> DataLoader:
        num_examples = _num_examples(self.args, self.train)
        dataset = StreamingRepeatedAugmentation(self.train.rows, transform, self.args, num_examples, batch_size, seed)
        _check_enough(dataset, num_examples)
        # Not persistent: the workers must see the epoch and resume position set before each epoch's iteration.
        return DataLoader(
            dataset, batch_size=None, num_workers=self.args.loader_workers(), pin_memory=torch.cuda.is_available()
        )

    def evaluation_rows(self, split: str, transform: ImageTransformFn) -> datasets.Dataset:
        return image_rows(self.splits[split], transform, self.args.skip_corrupt_images)
