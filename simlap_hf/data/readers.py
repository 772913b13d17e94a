"""Readers: what a resolved source becomes (as timm's ``create_reader`` makes one per data set), and the one contract
that :func:`~simlap_hf.data.pipeline.build_data_bundle` builds a run's loaders from.

Three readers implement it: :class:`~simlap_hf.data.arrays.ArrayReader` (images held as arrays, without the
``datasets`` library), :class:`~simlap_hf.data.dataset.DatasetsReader` (map-style ``datasets`` splits) and
:class:`~simlap_hf.data.streaming.StreamReader` (``--streaming``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader

from .arguments import TRAIN_SPLIT, DataArguments
from .labels import check_two_classes
from .loaders import create_train_dataloader

__all__ = ["ImageTransformFn", "MapReader", "Reader"]

ImageTransformFn = Callable[[PIL.Image.Image], torch.Tensor]


class Reader(ABC):
    """The splits of one source, ready to be batched.

    Attributes:
        args: the run's data arguments.
        label_names: the class names, index = class id.
        description: what is read, for messages.
        training_split_per_process: the training loader yields only this process's part already (a stream split
            across processes): it is placed on the device but not sharded again.
    """

    training_split_per_process: bool = False

    def __init__(self, args: DataArguments, label_names: Sequence[str], description: str) -> None:
        self.args = args
        self.label_names = list(label_names)
        self.description = description

    @abstractmethod
    def training_loader(self, transform: ImageTransformFn, batch_size: int, seed: int) -> DataLoader:
        """Training batches ``{"pixel_values": Tensor(batch_size, C, H, W), "labels": LongTensor(batch_size)}`` of
        the ``train`` split, each image passed through ``transform`` (the augmentation), order seeded with ``seed``."""

    @abstractmethod
    def evaluation_rows(self, split: str, transform: ImageTransformFn) -> torch.utils.data.Dataset:
        """Rows ``{"pixel_values": Tensor(C, H, W), "labels": int}`` of ``split`` (``train`` or ``validation``),
        in order, each image passed through ``transform``."""


class MapReader(Reader):
    """A reader whose splits are indexable: the training loader draws repeated-augmentation (or class-balanced)
    batches from :meth:`rows`, reading the class ids from :meth:`class_ids` without decoding images."""

    @abstractmethod
    def rows(self, split: str, transform: ImageTransformFn) -> torch.utils.data.Dataset:
        """Rows ``{"pixel_values": Tensor(C, H, W), "labels": int}`` of ``split``, each image through ``transform``."""

    @abstractmethod
    def class_ids(self, split: str) -> np.ndarray:
        """The class id of every row of ``split`` (N,) int64, read without decoding images."""

    def training_loader(self, transform: ImageTransformFn, batch_size: int, seed: int) -> DataLoader:
        class_ids = self.class_ids(TRAIN_SPLIT)
        check_two_classes(np.unique(class_ids).tolist(), self.label_names)
        rows = self.rows(TRAIN_SPLIT, transform)
        return create_train_dataloader(rows, self.args, batch_size, seed=seed, class_ids=class_ids)

    def evaluation_rows(self, split: str, transform: ImageTransformFn) -> torch.utils.data.Dataset:
        return self.rows(split, transform)
