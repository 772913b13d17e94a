"""The array reader: images held in memory as arrays (scikit-learn's digits, folders of MNIST-style IDX files), read
without the ``datasets`` library.

Both readers start here for these sources: the ``datasets`` reader stores the arrays as PNGs in Arrow (the standard
form of :func:`~simlap_hf.data.load_image_dataset`), and where ``datasets`` is not installed :class:`ArrayReader` trains
from the arrays directly. The splits, validation carve-out, sample limits, label checks, batch order and augmentation
are the same on both paths, so a run gives the same weights either way (the images decoded from the PNGs equal the
arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..errors import UsageError
from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .idx import read_idx_folder
from .labels import check_not_empty, standardize_labels, warn_classes_missing_from_a_split
from .readers import ImageTransformFn, MapReader
from .registry import known_names, named_spec
from .sources import Source, resolve_source

__all__ = [
    "ArrayImages",
    "ArrayReader",
    "ArraySource",
    "ArraySplit",
    "carve_indices",
    "digits_arrays",
    "idx_arrays",
    "limit_indices",
    "load_array_source",
    "missing_datasets_error",
    "read_array_source",
]


@dataclass
class ArraySplit:
    """One split: ``images`` (N, H, W) grayscale or (N, H, W, 3) RGB uint8, ``labels`` (N,) int64 class ids."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ArraySplit:
        """The rows ``indices`` (M,), in that order."""
        return ArraySplit(self.images[indices], self.labels[indices])


@dataclass
class ArraySource:
    """Splits of an array source (``train``, and ``validation`` when the source has one) and their class names."""

    splits: dict[str, ArraySplit]
    label_names: list[str]
    description: str
    validation_fraction: float | None = None


def digits_arrays() -> ArraySource:
    """scikit-learn's bundled digits: 1,797 8x8 images, values 0..16 scaled to grayscale uint8 0..255."""
    from sklearn.datasets import load_digits  # scikit-learn is imported only by the runs that read digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    spec = named_spec("digits")
    return ArraySource(
        {TRAIN_SPLIT: ArraySplit(images, labels)},
        [str(i) for i in range(10)],
        "digits (scikit-learn)",
        validation_fraction=spec.validation_fraction if spec is not None else None,
    )


def idx_arrays(folder: Path, label_names: Sequence[str] | None, description: str) -> ArraySource:
    """``train-*`` (and ``t10k-*`` as validation) IDX image/label pairs of ``folder``. Class names are
    ``label_names`` when given, else the labels' values (renumbered 0..C-1 when they are not, with a warning)."""
    arrays = read_idx_folder(folder)
    labels, names = standardize_labels(
        {split: split_labels for split, (_, split_labels) in arrays.items()}, "label", label_names, description
    )
    splits = {split: ArraySplit(images, labels[split]) for split, (images, _) in arrays.items()}
    return ArraySource(splits, names, description)


def missing_datasets_error(what: str, source: bool = True) -> UsageError:
    """The one-line error for ``what`` (a flag, with its value when ``source``) when it needs the ``datasets``
    library, which is not installed."""
    hint = (
        f" Without it only images held as arrays load: --dataset_name digits, a named data set with a local IDX copy "
        f"({known_names()}), or a folder of IDX files."
        if source
        else ""
    )
    return UsageError(
        f"{what} needs the 'datasets' library, which is not installed (pip install datasets, or the extra: "
        f"pip install 'simlap-hf[datasets]').{hint}"
    )


def read_array_source(source: Source) -> ArraySource:
    """The arrays of a resolved source of an array kind (:data:`~simlap_hf.data.sources.ARRAY_KINDS`); any other
    kind needs the ``datasets`` library: a UsageError saying so."""
    if source.kind == "sklearn_digits":
        return digits_arrays()
    if source.kind == "idx":
        return idx_arrays(source.path, source.label_names, source.description)
    raise missing_datasets_error(source.flag)


def load_array_source(args: DataArguments) -> ArraySource:
    """The data of ``args`` when it is an array source: ``digits``, a named data set with a local IDX copy (e.g.
    ``fashion_mnist``), or a folder of IDX files. Any other source needs the ``datasets`` library: a UsageError
    saying so."""
    return read_array_source(resolve_source(args))


def carve_indices(labels: np.ndarray, fraction: float, seed: int, description: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (sorted) of the training and validation parts when ``fraction`` of a training split of ``labels`` (N,)
    is carved out as validation: seeded with ``seed``, stratified by label when every class allows it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"{description} has no validation/test split, so --train_val_split must be in (0, 1) to carve one "
            f"out of train; got {fraction}."
        )
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single image, or fewer validation images than classes
        try:
            train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed)
        except ValueError as err:
            raise ValueError(
                f"{description}: cannot carve --train_val_split={fraction} out of {len(labels)} training images "
                f"({err}); provide a validation split or more data."
            ) from err
    return np.sort(train_idx), np.sort(val_idx)


def limit_indices(size: int, limit: int | None, seed: int) -> np.ndarray | None:
    """The rows kept when a split of ``size`` rows is cut to ``limit`` (the first rows of a permutation seeded with
    ``seed``), or None when it is kept whole."""
    if limit is None or limit >= size:
        return None
    return np.random.default_rng(seed).permutation(size)[:limit]


def standard_splits(source: ArraySource, args: DataArguments, seed: int) -> dict[str, ArraySplit]:
    """``train`` and ``validation``, as the standard form makes them: the source's validation split or a seeded
    carve-out, then each cut to its ``max_*_samples``."""
    splits = dict(source.splits)
    if VALIDATION_SPLIT not in splits:
        train = splits[TRAIN_SPLIT]
        check_not_empty(train, TRAIN_SPLIT, source.description)
        fraction = source.validation_fraction if source.validation_fraction is not None else args.train_val_split
        train_rows, validation_rows = carve_indices(train.labels, fraction, seed, source.description)
        splits = {TRAIN_SPLIT: train.take(train_rows), VALIDATION_SPLIT: train.take(validation_rows)}
    limits = {TRAIN_SPLIT: args.max_train_samples, VALIDATION_SPLIT: args.max_eval_samples}
    for split, limit in limits.items():
        check_not_empty(splits[split], split, source.description)
        rows = limit_indices(len(splits[split]), limit, seed)
        if rows is not None:
            splits[split] = splits[split].take(rows)
    return splits


class ArrayImages(torch.utils.data.Dataset):
    """Rows ``{"pixel_values": transform(image), "labels": int}`` of an :class:`ArraySplit`, the image handed to
    ``transform`` as a PIL image (mode ``L`` for (H, W) arrays, ``RGB`` for (H, W, 3))."""

    def __init__(self, split: ArraySplit, transform: ImageTransformFn) -> None:
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {
            "pixel_values": self.transform(PIL.Image.fromarray(self.images[index])),
            "labels": int(self.labels[index]),
        }


class ArrayReader(MapReader):
    """The reader of an array source (:func:`read_array_source`): its ``train`` and ``validation`` splits (see
    :func:`standard_splits`, seeded with ``seed``) as :class:`ArrayImages`."""

    def __init__(self, source: Source, seed: int) -> None:
        if source.args.skip_corrupt_images:
            raise missing_datasets_error("--skip_corrupt_images", source=False)
        arrays = read_array_source(source)
        self.splits = standard_splits(arrays, source.args, seed)
        super().__init__(source.args, arrays.label_names, arrays.description)
        warn_classes_missing_from_a_split(
            {split: data.labels for split, data in self.splits.items()}, self.label_names, self.description
        )

    def rows(self, split: str, transform: ImageTransformFn) -> ArrayImages:
        return ArrayImages(self.splits[split], transform)

    def class_ids(self, split: str) -> np.ndarray:
        return self.splits[split].labels
