"""Columns of the standard form for ``datasets`` splits: which source columns are the image and the label, renamed to
``image`` (a :class:`datasets.Image`) and ``label`` (a :class:`datasets.ClassLabel` shared by all splits, its ids and
names decided by :func:`~simlap_hf.data.labels.standardize_labels`)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa

from .arguments import TRAIN_SPLIT
from .labels import check_not_empty, standardize_labels, warn_classes_missing_from_a_split

__all__ = ["get_label_names", "label_values", "standardize_columns", "warn_missing_classes"]


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


def _raw_labels(array: pa.ChunkedArray, column: str, description: str, split: str) -> np.ndarray:
    """A label column as NumPy values (N,): strings as a ``U`` array, numbers as they are; a ValueError when a
    value is missing."""
    if array.null_count:
        raise ValueError(
            f"{description}, split {split!r}: label column {column!r} has {array.null_count} missing value(s) "
            f"(None); every image needs a class."
        )
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.asarray(array.to_pylist(), dtype=str) if len(array) else np.zeros(0, dtype=str)
    return array.to_numpy()


def _standardize_labels(
    data: datasets.DatasetDict, column: str, label_names: Sequence[str] | None, description: str
) -> datasets.DatasetDict:
    """Turn the ``label`` column of every split into a ClassLabel shared by all splits (a ClassLabel column is kept:
    its names name the ids, which are range-checked)."""
    feature = next(iter(data.values())).features["label"]
    values = {split: _raw_labels(label_values(ds), column, description, split) for split, ds in data.items()}
    if isinstance(feature, datasets.ClassLabel):
        standardize_labels(values, column, feature.names, description)
        return data
    ids, names = standardize_labels(values, column, label_names, description)
    class_label = datasets.ClassLabel(names=names)
    return datasets.DatasetDict(
        {
            split: ds.remove_columns("label").add_column("label", ids[split], feature=class_label)
            for split, ds in data.items()
        }
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


def warn_missing_classes(data: datasets.DatasetDict, description: str) -> None:
    """:func:`~simlap_hf.data.labels.warn_classes_missing_from_a_split` for standard-form splits."""
    ids = {split: label_values(ds).to_numpy() for split, ds in data.items()}
    warn_classes_missing_from_a_split(ids, get_label_names(data), description)


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
