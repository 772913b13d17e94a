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
import torch
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from ..errors import UsageError
from .arguments import DataArguments
from .images import decode_image
from .labels import get_label_names
from .loaders import DataBundle, ResumableAugmentations, collate_fn, create_eval_dataloader, with_image_transforms
from .samplers import RepeatedAugmentationBatchSampler, copies_per_image
from .stream_sources import StandardStream, collect_split, open_train_stream, open_validation_stream
from .transforms import create_train_normalizer, create_train_transform

__all__ = ["StreamingRepeatedAugmentation", "prepare_own_part_loader", "prepare_streaming_data"]

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


def _opened(
    open_stream: Callable[[DataArguments], StandardStream], args: DataArguments, flag: str, files: Any
) -> StandardStream:
    """``open_stream(args)``; tar shards that Arrow cannot read (an empty or damaged tar) are a user error naming the
    flag and the files."""
    import pyarrow

    try:
        return open_stream(args)
    except pyarrow.ArrowInvalid as error:
        if not files:
            raise
        raise UsageError(
            f"{flag} {files!r}: the tar shards could not be read ({' '.join(str(error).split())}). Each shard must "
            "hold image files with their label files (WebDataset layout); an empty or damaged tar gives this error."
        ) from error


def prepare_streaming_data(
    data_args: DataArguments, num_channels: int, train_batch_size: int, eval_batch_size: int, seed: int
) -> DataBundle:
    """The three loaders of a ``--streaming`` run (see :class:`~simlap_hf.data.DataBundle`): the training stream of
    this process, the validation split and the first ``--streaming_train_eval_examples`` training images in
    memory (sequential, evaluation transform)."""
    train = _opened(open_train_stream, data_args, "--train_files", data_args.train_files)
    validation_stream = _opened(open_validation_stream, data_args, "--validation_files", data_args.validation_files)
    validation = collect_split(validation_stream, data_args.max_eval_samples, train.label_names)
    label_names = get_label_names(validation)
    train_eval = collect_split(train, data_args.streaming_train_eval_examples, label_names)
    views = with_image_transforms(
        datasets.DatasetDict(validation=validation, train_eval=train_eval), data_args, num_channels
    )
    num_examples = _num_examples(data_args, train)
    transform = create_train_transform(data_args, num_channels)
    dataset = StreamingRepeatedAugmentation(train.rows, transform, data_args, num_examples, train_batch_size, seed)
    _check_enough(dataset, num_examples)
    workers = data_args.loader_workers()
    # Not persistent: the workers must see the epoch and resume position set before each epoch's iteration.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
    return DataBundle(
        label_names=label_names,
        train=loader,
        validation=create_eval_dataloader(views["validation"], eval_batch_size, workers),
        train_eval=create_eval_dataloader(views["train_eval"], eval_batch_size, workers),
        train_normalizer=create_train_normalizer(data_args, num_channels),
        train_split_per_process=True,
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
