"""The standard form: every source ends as ``train`` and ``validation`` splits with an ``image`` and a ``label``
column (see :func:`load_image_dataset`)."""

from __future__ import annotations

import datasets
import numpy as np

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .images import drop_corrupt_rows
from .labels import check_not_empty, label_values, standardize_columns, warn_classes_missing_from_a_split
from .sources import load_source

__all__ = ["load_image_dataset"]

# Source split names accepted as the validation split, in order of preference.
_VALIDATION_ALIASES: tuple[str, ...] = ("validation", "valid", "val", "dev", "eval", "test")
_TRAIN_ALIASES: tuple[str, ...] = ("train", "training")


def _pick_splits(data: datasets.DatasetDict, description: str) -> datasets.DatasetDict:
    """Keep the train split and the preferred validation-like split, renamed to ``train`` / ``validation``."""
    lowered = {split.lower(): split for split in data}
    train = next((lowered[a] for a in _TRAIN_ALIASES if a in lowered), None)
    if train is None:
        if len(data) != 1:
            raise ValueError(
                f"{description} has no train split; splits present: {sorted(data)}. Provide a source with a "
                f"'train' split."
            )
        train = next(iter(data))
    picked = {TRAIN_SPLIT: data[train]}
    validation = next((lowered[a] for a in _VALIDATION_ALIASES if a in lowered and lowered[a] != train), None)
    if validation is not None:
        picked[VALIDATION_SPLIT] = data[validation]
    return datasets.DatasetDict(picked)


def _carve_validation(train: datasets.Dataset, fraction: float, seed: int, description: str) -> datasets.DatasetDict:
    """Split ``fraction`` of ``train`` into validation: seeded, stratified by label when every class allows it.

    Indices are computed here and applied with ``select(keep_in_memory=True)`` so that nothing is written
    next to memory-mapped sources (``Dataset.train_test_split`` would write index cache files).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"{description} has no validation/test split, so --train_val_split must be in (0, 1) to carve one "
            f"out of train; got {fraction}."
        )
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(train))
    labels = np.asarray(label_values(train).to_numpy())
    try:
        train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single image, or fewer validation images than classes
        try:
            train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed)
        except ValueError as err:
            raise ValueError(
                f"{description}: cannot carve --train_val_split={fraction} out of {len(train)} training images "
                f"({err}); provide a validation split or more data."
            ) from err
    return datasets.DatasetDict(
        {
            TRAIN_SPLIT: train.select(np.sort(train_idx), keep_in_memory=True),
            VALIDATION_SPLIT: train.select(np.sort(val_idx), keep_in_memory=True),
        }
    )


def _limited(data: datasets.DatasetDict, args: DataArguments, seed: int, description: str) -> datasets.DatasetDict:
    """Both splits, each cut to its ``max_*_samples`` first rows of a permutation seeded with ``seed``."""
    limits = {TRAIN_SPLIT: args.max_train_samples, VALIDATION_SPLIT: args.max_eval_samples}
    result = {}
    for split in (TRAIN_SPLIT, VALIDATION_SPLIT):
        ds = data[split]
        check_not_empty(ds, split, description)
        limit = limits[split]
        if limit is not None and limit < len(ds):
            order = np.random.default_rng(seed).permutation(len(ds))[:limit]
            ds = ds.select(order, keep_in_memory=True)
        result[split] = ds
    return datasets.DatasetDict(result)


def load_image_dataset(args: DataArguments, seed: int = 42) -> datasets.DatasetDict:
    """Load the data described by ``args`` in the standard form.

    Returns:
        ``DatasetDict`` with splits ``train`` and ``validation``; columns ``image`` (``datasets.Image``, a
        PIL image on access) and ``label`` (``datasets.ClassLabel`` with names).

    Behaviour:
        * ``train_dir`` wins over ``dataset_name``.
        * The source's ``test`` (or ``validation``/``valid``/``val``/``dev``/``eval``) split becomes
          ``validation``; without one, ``train_val_split`` of train is carved out (seeded with ``seed``,
          stratified by label when possible; ``digits`` always uses 20%).
        * ``max_train_samples`` / ``max_eval_samples`` keep the first N rows after a shuffle seeded with ``seed``.
        * Corrupt images: by default an imagefolder file that PIL cannot decode raises ``ValueError`` naming
          the file, before anything is built; other sources (bytes stored in Arrow) are not scanned at load
          time and an undecodable image raises ``ValueError`` naming its path/row when it is first transformed
          (:func:`~simlap_hf.data.with_image_transforms`). With ``skip_corrupt_images=True`` every image of every
          source is decoded once at load time, failing rows are dropped and their number is logged (WARNING,
          logger ``simlap_hf.data``) per split.
        * Nothing is written to disk except the ``datasets`` cache of builders (imagefolder, parquet, Hub).

    Raises:
        ValueError / FileNotFoundError: unknown name, missing path, missing column, bad labels, empty split,
        corrupt image; each message names the bad value and the flag that fixes it.
    """
    source = load_source(args)
    data = _pick_splits(source.data, source.description)
    data = standardize_columns(
        data,
        args.image_column_name or source.image_column,
        args.label_column_name or source.label_column,
        source.label_names,
        source.description,
    )
    if args.skip_corrupt_images:
        data = drop_corrupt_rows(data)
    if VALIDATION_SPLIT not in data:
        fraction = source.validation_fraction if source.validation_fraction is not None else args.train_val_split
        check_not_empty(data[TRAIN_SPLIT], TRAIN_SPLIT, source.description)
        data = _carve_validation(data[TRAIN_SPLIT], fraction, seed, source.description)
    result = _limited(data, args, seed, source.description)
    warn_classes_missing_from_a_split(result, source.description)
    return result
