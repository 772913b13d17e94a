"""The one data pipeline of a run: the flags are resolved once into a reader (:func:`create_reader`), and one function
builds the run's loaders from any reader (:func:`build_data_bundle`); :func:`prepare_data` does both."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .arrays import ArrayReader, missing_datasets_error
from .loaders import create_eval_dataloader
from .readers import Reader
from .sources import resolve_source
from .transforms import create_eval_transform, create_train_normalizer, create_train_transform

__all__ = ["DataBundle", "build_data_bundle", "create_reader", "datasets_installed", "prepare_data"]


@dataclass
class DataBundle:
    """Loaders of one run: ``train`` (augmented, repeated), ``validation`` and ``train_eval`` (train images with the
    eval transform, for kNN) — the latter two sequential and unaugmented."""

    label_names: list[str]
    train: DataLoader
    validation: DataLoader
    train_eval: DataLoader
    # Normalises uint8 training batches on the device (None: the loader already normalised them).
    train_normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The training loader yields only this process's part already (a stream split across processes): it is placed
    # on the device but not sharded again.
    train_split_per_process: bool = False


def datasets_installed() -> bool:
    """Whether the optional ``datasets`` library can be imported (without it, only array sources train).

    Imported, not only looked up: an installation that is present but fails to import counts as missing."""
    try:
        importlib.import_module("datasets")
    except ImportError:
        return False
    return True


def create_reader(data_args: DataArguments, seed: int) -> Reader:
    """The reader of the data that ``data_args`` name (splits seeded with ``seed``): a stream with ``--streaming``,
    else the map-style ``datasets`` reader, or where ``datasets`` is not installed the array reader (array sources
    only; any other source is a one-line error saying that it needs ``datasets``)."""
    if not datasets_installed():
        if data_args.streaming:
            raise missing_datasets_error("--streaming", source=False)
        return ArrayReader(resolve_source(data_args), seed)
    # The readers below import the optional ``datasets`` library, so they are imported only when it is installed.
    if data_args.streaming:
        from .streaming import StreamReader

        return StreamReader(data_args)
    from .dataset import DatasetsReader

    return DatasetsReader(resolve_source(data_args), seed)


def build_data_bundle(
    reader: Reader, num_channels: int, train_batch_size: int, eval_batch_size: int, seed: int
) -> DataBundle:
    """The three loaders of a run (see :class:`DataBundle`) from any reader: the ``train`` split through the training
    augmentation in batches of ``train_batch_size`` (order seeded with ``seed``); the ``validation`` and ``train``
    splits through the evaluation transform in sequential batches of ``eval_batch_size``; ``num_channels`` image
    channels."""
    args = reader.args
    train_transform = create_train_transform(args, num_channels)
    eval_transform = create_eval_transform(args, num_channels)
    workers = args.loader_workers()
    return DataBundle(
        label_names=reader.label_names,
        train=reader.training_loader(train_transform, train_batch_size, seed),
        validation=create_eval_dataloader(
            reader.evaluation_rows(VALIDATION_SPLIT, eval_transform), eval_batch_size, workers
        ),
        train_eval=create_eval_dataloader(
            reader.evaluation_rows(TRAIN_SPLIT, eval_transform), eval_batch_size, workers
        ),
        train_normalizer=create_train_normalizer(args, num_channels),
        train_split_per_process=reader.training_split_per_process,
    )


def prepare_data(
    data_args: DataArguments, num_channels: int, train_batch_size: int, eval_batch_size: int, seed: int
) -> DataBundle:
    """Load the data of ``data_args`` (:func:`create_reader`, splits seeded with ``seed``) and build the three loaders
    of a run (:func:`build_data_bundle`): training batches of ``train_batch_size`` (order seeded with ``seed``),
    evaluation batches of ``eval_batch_size``, images of ``num_channels`` channels."""
    return build_data_bundle(create_reader(data_args, seed), num_channels, train_batch_size, eval_batch_size, seed)
