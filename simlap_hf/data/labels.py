"""Columns and labels of the standard form: which source columns are the image and the label, and a ``label``
ClassLabel shared by all splits (class names, renumbering, range checks, warnings about classes a split lacks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT
from .arrays import check_label_range, check_not_empty, renumber_integer_labels

__all__ = [
    "check_label_range",
    "check_not_empty",
    "get_label_names",
    "label_values",
    "renumber_integer_labels",
    "standardize_columns",
    "warn_classes_missing_from_a_split",
]

logger = logging.getLogger(__package__)


def column_error(kind: str, wanted: str | None, columns: Sequence[str], description: str, flag: str) -> str:
    """Message for a missing / undetectable column that lists the columns and the fixing flag."""
    what = f"{kind} column {wanted!r} not found" if wanted else f"could not detect the {kind} column"
    return f"{description}: {what}; columns present: {list(columns)}. Set the {kind} column with {flag}."


def _resolve_image_column(ds: datasets.Dataset, wanted: str | None, description: str) -> str:
    """The image column: ``wanted`` if given, else the single Image column (or 'image'/'img')."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(column_error("image", wanted, columns, description, "--image_column_name"))
        return wanted
    candidates = [name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        named = [name for name in ("image", "img") if name in columns]
        if named:
            return named[0]
    raise ValueError(
        column_error("image", None, columns, description, "--image_column_name")
        + (f" Several Image columns: {candidates}." if candidates else "")
    )


def _resolve_label_column(ds: datasets.Dataset, wanted: str | None, image_column: str, description: str) -> str:
    """The label column: ``wanted`` if given, else 'label'/'labels', else the single ClassLabel."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(column_error("label", wanted, columns, description, "--label_column_name"))
        return wanted
    for name in ("label", "labels"):
        if name in columns and name != image_column:
            return name
    class_labels = [name for name, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    raise ValueError(column_error("label", None, columns, description, "--label_column_name"))


def label_values(ds: datasets.Dataset) -> pa.ChunkedArray:
    """The ``label`` column of ``ds`` as an Arrow ChunkedArray (N,), indices mapping applied."""
    return ds.with_format("arrow")["label"]


def _integer_labels(array: pa.ChunkedArray, column: str, description: str, split: str) -> np.ndarray:
    """Return int64 labels (N,) from an integer or integral-float Arrow column; ValueError otherwise."""
    if array.null_count:
        raise ValueError(
            f"{description}, split {split!r}: label column {column!r} has {array.null_count} missing value(s) "
            f"(None); every image needs an integer class id."
        )
    kind = array.type
    if pa.types.is_integer(kind):
        return array.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(kind):
        floats = array.to_numpy()
        bad = floats[~np.isfinite(floats) | (floats != np.round(floats))]
        if not bad.size:
            return floats.astype(np.int64)
        example: Any = bad[0].item()
    else:
        example = array[0].as_py() if len(array) else None
    raise ValueError(
        f"{description}, split {split!r}: label column {column!r} must hold integer class ids or class-name "
        f"strings, found {kind} value {example!r}. Choose another column with --label_column_name."
    )


def _class_names_to_ids(
    arrays: dict[str, pa.ChunkedArray], column: str, description: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class-name strings -> ids (N,) per split, the classes being the sorted distinct names of all splits."""
    for split, array in arrays.items():
        if array.null_count:
            raise ValueError(
                f"{description}, split {split!r}: label column {column!r} has {array.null_count} missing "
                f"value(s) (None); every image needs a class."
            )
    names = sorted({name for a in arrays.values() for name in pc.unique(a).to_pylist()})
    lookup = pa.array(names, type=pa.string())
    converted = {
        split: pc.index_in(a.cast(pa.string()), value_set=lookup).to_numpy().astype(np.int64)
        for split, a in arrays.items()
    }
    return converted, names


def _integer_ids(
    arrays: dict[str, pa.ChunkedArray], column: str, label_names: Sequence[str] | None, description: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Integer class ids (N,) per split, named by ``label_names`` or else renumbered and named by their values."""
    converted = {split: _integer_labels(a, column, description, split) for split, a in arrays.items()}
    if label_names is not None:
        names = list(label_names)
    else:
        converted, names = renumber_integer_labels(converted, column, description)
    for split, values in converted.items():
        check_label_range(values, len(names), column, description, split)
    return converted, names


def _standardize_labels(
    data: datasets.DatasetDict, column: str, label_names: Sequence[str] | None, description: str
) -> datasets.DatasetDict:
    """Turn the ``label`` column of every split into a ClassLabel shared by all splits.

    ClassLabel -> kept (values range-checked); integers -> names ``label_names``, or without names the sorted
    distinct values renumbered 0..C-1 and named by their value (:func:`renumber_integer_labels`); strings -> sorted
    unique names, mapped to their index.
    """
    first = next(iter(data.values()))
    feature = first.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        for split, ds in data.items():
            values = _integer_labels(label_values(ds), column, description, split)
            check_label_range(values, feature.num_classes, column, description, split)
        return data
    arrays = {split: label_values(ds) for split, ds in data.items()}
    if all(pa.types.is_string(a.type) or pa.types.is_large_string(a.type) for a in arrays.values()):
        converted, names = _class_names_to_ids(arrays, column, description)
    else:
        converted, names = _integer_ids(arrays, column, label_names, description)
    class_label = datasets.ClassLabel(names=names)
    return datasets.DatasetDict(
        {
            split: ds.remove_columns("label").add_column("label", converted[split], feature=class_label)
            for split, ds in data.items()
        }
    )


def warn_classes_missing_from_a_split(data: datasets.DatasetDict, description: str) -> None:
    """Warn, naming the classes, when a class has no training images (the model can never learn it; its validation
    images are all errors) or no validation images (it is never evaluated)."""
    names = get_label_names(data)
    present = {split: set(np.unique(label_values(ds).to_numpy()).tolist()) for split, ds in data.items()}
    everything = set(range(len(names)))
    for split, other in ((TRAIN_SPLIT, VALIDATION_SPLIT), (VALIDATION_SPLIT, TRAIN_SPLIT)):
        missing = sorted(everything - present[split])
        if not missing:
            continue
        also = sorted(set(missing) & present[other])
        shown = ", ".join(repr(names[i]) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        consequence = "the model cannot learn them" if split == TRAIN_SPLIT else "they are never evaluated"
        logger.warning(
            "%s: %d of %d class(es) have no %s images: %s (%d of them appear in %s); %s. Check the labels, "
            "--max_train_samples / --max_eval_samples and --train_val_split.",
            description,
            len(missing),
            len(names),
            split,
            shown,
            len(also),
            other,
            consequence,
        )


def _standard_split(
    ds: datasets.Dataset, split: str, image_column: str, label_column: str, description: str
) -> datasets.Dataset:
    """One split reduced to the columns ``image`` (a datasets.Image) and ``label`` (still as in the source)."""
    check_not_empty(ds, split, description)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in ds.column_names:
            where = f"{description} (split {split!r})"
            raise ValueError(column_error(kind, column, ds.column_names, where, f"--{kind}_column_name"))
    ds = ds.select_columns([image_column, label_column])
    ds = ds.rename_columns({image_column: "image", label_column: "label"})
    if not isinstance(ds.features["image"], datasets.Image):
        try:
            ds = ds.cast_column("image", datasets.Image())
        except Exception as err:
            raise ValueError(
                f"{description}: column {image_column!r} ({ds.features['image']}) is not an image "
                f"column and cannot be read as one; choose the image column with --image_column_name."
            ) from err
    return ds


def standardize_columns(
    data: datasets.DatasetDict,
    image_column: str | None,
    label_column: str | None,
    label_names: Sequence[str] | None,
    description: str,
) -> datasets.DatasetDict:
    """The one column-mapping path: pick image/label columns, rename them, make ``label`` a ClassLabel.

    ``data`` holds the splits ``train`` (and maybe ``validation``); ``image_column`` / ``label_column`` are the
    wanted source columns (None: detected from the train split); ``label_names`` name integer labels.
    """
    train = data[TRAIN_SPLIT]
    image_column = _resolve_image_column(train, image_column, description)
    label_column = _resolve_label_column(train, label_column, image_column, description)
    if image_column == label_column:
        raise ValueError(
            f"{description}: image and label column are both {image_column!r}; set distinct "
            f"--image_column_name and --label_column_name."
        )
    standard = {
        split: _standard_split(ds, split, image_column, label_column, description) for split, ds in data.items()
    }
    return _standardize_labels(datasets.DatasetDict(standard), label_column, label_names, description)


def get_label_names(dataset: datasets.DatasetDict | datasets.Dataset) -> list[str]:
    """Class names of the ``label`` ClassLabel column (of ``train``, or the first split of a DatasetDict)."""
    if isinstance(dataset, datasets.DatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits, so it has no label names.")
        dataset = dataset[TRAIN_SPLIT] if TRAIN_SPLIT in dataset else next(iter(dataset.values()))
    feature = dataset.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"Column 'label' must be a datasets.ClassLabel to have names, got {feature!r}; load the data with "
            f"load_image_dataset()."
        )
    return list(feature.names)
