"""Image arrays held in memory (scikit-learn's digits, folders of MNIST-style IDX files), read without the
``datasets`` library.

Both paths start here: the standard form (:func:`~simlap_hf.data.load_image_dataset`) stores these arrays as PNGs in
Arrow, and where ``datasets`` is not installed :func:`prepare_array_data` trains from the arrays directly. The
splits, validation carve-out, sample limits, label checks, batch order and augmentation are the same on both paths,
so a run gives the same weights either way (the images decoded from the PNGs equal the arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .idx import is_idx_folder, read_idx_folder
from .registry import known_names, local_copy, named_spec, normalize_name

__all__ = [
    "ArrayImages",
    "ArraySource",
    "ArraySplit",
    "carve_indices",
    "check_label_range",
    "check_not_empty",
    "digits_arrays",
    "idx_arrays",
    "limit_indices",
    "load_array_source",
    "prepare_array_data",
    "renumber_integer_labels",
]

logger = logging.getLogger(__package__)


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


def check_label_range(values: np.ndarray, num_classes: int, column: str, description: str, split: str) -> None:
    """Raise ValueError naming the column, the first bad value and the valid range [0, num_classes)."""
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{description}, split {split!r}: label column {column!r} has value {int(bad[0])} outside the valid "
            f"range [0, {num_classes}) ({bad.size} bad value(s)). Fix the labels or choose another column with "
            f"--label_column_name."
        )


def check_not_empty(rows: Sized, split: str, description: str) -> None:
    """Raise ValueError naming the split when ``rows`` (a split of any form) has no rows."""
    if len(rows) == 0:
        raise ValueError(
            f"{description}: split {split!r} is empty; every split needs images (check the source, "
            f"--train_val_split and --skip_corrupt_images)."
        )


def renumber_integer_labels(
    labels: dict[str, np.ndarray], column: str, description: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class ids for integer labels without class names: the sorted distinct values become 0..C-1 and each class is
    named by its original value. Values that are already 0..C-1 stay as they are; any other set (starting above 0,
    with gaps, negative) is renumbered with a warning that gives the mapping, so that no class is ever empty."""
    values = np.unique(np.concatenate([v for v in labels.values() if v.size] or [np.zeros(0, np.int64)]))
    if values.size and values[0] < 0:  # negative ids usually mark unlabelled images
        for split, split_values in labels.items():
            check_label_range(split_values, int(values[-1]) + 1, column, description, split)
    names = [str(int(v)) for v in values]
    if values.size and (values[0] != 0 or values[-1] != values.size - 1):
        shown = ", ".join(f"{int(v)}->{i}" for i, v in enumerate(values[:12])) + (", ..." if values.size > 12 else "")
        logger.warning(
            "%s: label column %r holds %d distinct integer ids that are not 0..%d (%s); they are renumbered %s "
            "and the classes are named by their original ids. Give the column class names (a ClassLabel) to "
            "choose the order yourself.",
            description,
            column,
            values.size,
            values.size - 1,
            f"starting at {int(values[0])}" if values[0] != 0 else "with gaps",
            shown,
        )
        labels = {split: np.searchsorted(values, v).astype(np.int64) for split, v in labels.items()}
    return labels, names


def digits_arrays() -> ArraySource:
    """scikit-learn's bundled digits: 1,797 8x8 images, values 0..16 scaled to grayscale uint8 0..255."""
    from sklearn.datasets import load_digits

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
    labels = {split: split_labels for split, (_, split_labels) in arrays.items()}
    if label_names is None:
        labels, names = renumber_integer_labels(labels, "label", description)
    else:
        names = list(label_names)
    for split, values in labels.items():
        check_label_range(values, len(names), "label", description, split)
    splits = {split: ArraySplit(images, labels[split]) for split, (images, _) in arrays.items()}
    return ArraySource(splits, names, description)


def load_array_source(args: DataArguments) -> ArraySource:
    """The data of ``args`` when it is an array source: ``digits``, a named data set with a local IDX copy (e.g.
    ``fashion_mnist``), or a folder of IDX files. Any other source needs the ``datasets`` library: a ValueError
    saying so."""
    name = (args.dataset_name or "").strip()
    spec = named_spec(name)
    if not args.train_dir and spec is not None and normalize_name(name) == spec.name:
        if spec.loader == "sklearn_digits":
            return digits_arrays()
        local = local_copy(spec)
        if local and Path(local).is_dir() and is_idx_folder(Path(local)):
            return idx_arrays(Path(local), spec.label_names, f"IDX folder {local!r}")
    path = Path(name).expanduser()
    if not args.train_dir and name and path.is_dir() and is_idx_folder(path):
        label_names = spec.label_names if spec is not None else None
        return idx_arrays(path, label_names, f"IDX folder {name!r}")
    source = f"--train_dir {args.train_dir!r}" if args.train_dir else f"--dataset_name {name!r}"
    raise ValueError(
        f"{source} needs the 'datasets' library, which is not installed (pip install datasets). Without it only "
        f"images held as arrays load: --dataset_name digits, a named data set with a local IDX copy "
        f"({known_names()}), or a folder of IDX files."
    )


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


def _standard_splits(source: ArraySource, args: DataArguments, seed: int) -> dict[str, ArraySplit]:
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

    def __init__(self, split: ArraySplit, transform: Callable[[PIL.Image.Image], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {
            "pixel_values": self.transform(PIL.Image.fromarray(self.images[index])),
            "labels": int(self.labels[index]),
        }


def prepare_array_data(
    data_args: DataArguments, num_channels: int, train_batch_size: int, eval_batch_size: int, seed: int
):
    """:func:`~simlap_hf.data.prepare_data` for an array source (see :func:`load_array_source`) without the
    ``datasets`` library: the same three loaders, batches and augmentation as the standard-form path."""
    from .loaders import DataBundle, check_two_classes, create_eval_dataloader, create_train_dataloader
    from .transforms import create_eval_transform, create_train_normalizer, create_train_transform

    if data_args.streaming or data_args.skip_corrupt_images:
        flag = "--streaming" if data_args.streaming else "--skip_corrupt_images"
        raise ValueError(f"{flag} needs the 'datasets' library, which is not installed (pip install datasets).")
    source = load_array_source(data_args)
    splits = _standard_splits(source, data_args, seed)
    check_two_classes(np.unique(splits[TRAIN_SPLIT].labels).tolist(), source.label_names)
    train_transform = create_train_transform(data_args, num_channels)
    eval_transform = create_eval_transform(data_args, num_channels)
    workers = data_args.loader_workers()
    return DataBundle(
        label_names=source.label_names,
        train=create_train_dataloader(
            ArrayImages(splits[TRAIN_SPLIT], train_transform), data_args, train_batch_size, seed=seed
        ),
        validation=create_eval_dataloader(
            ArrayImages(splits[VALIDATION_SPLIT], eval_transform), eval_batch_size, workers
        ),
        train_eval=create_eval_dataloader(ArrayImages(splits[TRAIN_SPLIT], eval_transform), eval_batch_size, workers),
        train_normalizer=create_train_normalizer(data_args, num_channels),
    )
