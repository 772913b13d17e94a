"""The standard form: every source ends as ``train`` and ``validation`` splits with an ``image`` and a ``label``
column (see :func:`load_image_dataset`)."""

from __future__ import annotations

import datasets

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .arrays import carve_indices, limit_indices
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
    """Split ``fraction`` of ``train`` into validation (:func:`~simlap_hf.data.arrays.carve_indices`: seeded,
    stratified by label when every class allows it).

    The rows are applied with ``select(keep_in_memory=True)`` so that nothing is written next to memory-mapped
    sources (``Dataset.train_test_split`` would write index cache files).
    """
    train_rows, validation_rows = carve_indices(label_values(train).to_numpy(), fraction, seed, description)
    return datasets.DatasetDict(
        {
            TRAIN_SPLIT: train.select(train_rows, keep_in_memory=True),
            VALIDATION_SPLIT: train.select(validation_rows, keep_in_memory=True),
        }
    )


def _limited(data: datasets.DatasetDict, args: DataArguments, seed: int, description: str) -> datasets.DatasetDict:
    """Both splits, each cut to its ``max_*_samples`` (:func:`~simlap_hf.data.arrays.limit_indices`)."""
    limits = {TRAIN_SPLIT: args.max_train_samples, VALIDATION_SPLIT: args.max_eval_samples}
    result = {}
    for split in (TRAIN_SPLIT, VALIDATION_SPLIT):
        ds = data[split]
        check_not_empty(ds, split, description)
        rows = limit_indices(len(ds), limits[split], seed)
        result[split] = ds if rows is None else ds.select(rows, keep_in_memory=True)
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
        * Corrupt images: by default an imagefolder tree (``train_dir``, ``validation_dir``) of at most
          ``EAGER_CHECK_MAX_IMAGES`` (10,000) images is decoded before anything is built and a file that PIL
          cannot decode raises ``ValueError`` naming it; other sources (bytes stored in Arrow) are not scanned.
          With ``skip_corrupt_images=True`` every split of at most ``EAGER_CHECK_MAX_IMAGES`` images, of any
          source, is decoded once at load time, failing rows are dropped and their number is logged (WARNING,
          logger ``simlap_hf.data``) per split. Larger trees and splits are not decoded here (a log line at INFO
          says so); an undecodable image that is not dropped is met when it is first transformed
          (:class:`~simlap_hf.data.ImageTransform`): it raises ``ValueError`` naming its path/row, or with
          ``skip_corrupt_images=True`` is replaced in its batch by another image of the batch, with that image's
          label, and named in a warning.
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
        data = drop_corrupt_rows(data, source.description)
    if VALIDATION_SPLIT not in data:
        fraction = source.validation_fraction if source.validation_fraction is not None else args.train_val_split
        check_not_empty(data[TRAIN_SPLIT], TRAIN_SPLIT, source.description)
        data = _carve_validation(data[TRAIN_SPLIT], fraction, seed, source.description)
    result = _limited(data, args, seed, source.description)
    warn_classes_missing_from_a_split(result, source.description)
    return result
