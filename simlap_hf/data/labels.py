"""Class labels, standardised in one place for every reader: class ids 0..C-1 with their names, range checks and the
warnings about classes a split lacks. Works on NumPy arrays, so that array sources use it without ``datasets``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence, Sized
from typing import Any

import numpy as np

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT

__all__ = [
    "check_label_range",
    "check_not_empty",
    "check_two_classes",
    "renumber_integer_labels",
    "standardize_labels",
    "stream_label_names",
    "warn_classes_missing_from_a_split",
]

logger = logging.getLogger(__package__)


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


def check_two_classes(present: Sequence[int], label_names: Sequence[str]) -> None:
    """Training needs at least 2 classes in its split (``present``: the class ids it holds); a ValueError that names
    the classes otherwise."""
    if len(present) < 2:
        names = ", ".join(repr(label_names[i]) for i in present)
        raise ValueError(
            f"The training split holds a single class ({names}; classes named by the data: {list(label_names)}). "
            "Training needs at least 2 classes: the contrastive loss has no negatives and the cross-entropy nothing "
            "to separate, so nothing would be learned. Check --train_dir / --dataset_name and --label_column_name."
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


def _integer_values(values: np.ndarray, column: str, description: str, split: str) -> np.ndarray:
    """int64 labels (N,) from integer or integral-float values (N,); a ValueError naming the first other value."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if not bad.size:
            return values.astype(np.int64)
        example: Any = bad[0].item()
    else:
        example = (
            values[0].item() if len(values) and hasattr(values[0], "item") else (values[0] if len(values) else None)
        )
    raise ValueError(
        f"{description}, split {split!r}: label column {column!r} must hold integer class ids or class-name "
        f"strings, found {values.dtype} value {example!r}. Choose another column with --label_column_name."
    )


def standardize_labels(
    values: Mapping[str, np.ndarray], column: str, label_names: Sequence[str] | None, description: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class ids (N,) int64 per split and the class names, from the raw label values (N,) of each split.

    Strings (``U`` arrays in every split) are class names: the classes are their sorted distinct values. Integers (or
    integral floats) are class ids named by ``label_names``, or without names the sorted distinct values renumbered
    0..C-1 and named by their value (:func:`renumber_integer_labels`). Every id is checked against the classes.
    """
    if values and all(array.dtype.kind == "U" for array in values.values()):
        names = np.unique(np.concatenate(list(values.values())))
        return {split: np.searchsorted(names, array).astype(np.int64) for split, array in values.items()}, [
            str(name) for name in names
        ]
    ids = {split: _integer_values(array, column, description, split) for split, array in values.items()}
    if label_names is not None:
        names = list(label_names)
    else:
        ids, names = renumber_integer_labels(ids, column, description)
    for split, split_ids in ids.items():
        check_label_range(split_ids, len(names), column, description, split)
    return ids, names


def stream_label_names(label_names: Sequence[str] | None, collected: Sequence[int]) -> list[str]:
    """Class names of a stream, which cannot be read ahead to renumber its labels: the names its source gives, else
    ``"0"`` to the largest class id among the ``collected`` rows."""
    if label_names is not None:
        return list(label_names)
    return [str(i) for i in range(max(collected, default=0) + 1)]


def warn_classes_missing_from_a_split(ids: Mapping[str, np.ndarray], names: Sequence[str], description: str) -> None:
    """Warn, naming the classes, when a class has no training images (the model can never learn it; its validation
    images are all errors) or no validation images (it is never evaluated). ``ids``: class ids (N,) of ``train``
    and ``validation``."""
    present = {split: set(np.unique(values).tolist()) for split, values in ids.items()}
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
