"""The ``datasets`` reader: map-style sources loaded with the ``datasets`` library and brought into the standard
form, ``train`` and ``validation`` splits with exactly two columns,

* ``image``: a :class:`datasets.Image` feature (a ``PIL.Image.Image`` on access), and
* ``label``: a :class:`datasets.ClassLabel` carrying the class names

(see :func:`load_image_dataset`). One loader function per source kind (:data:`SOURCE_LOADERS`); the kind is decided by
:func:`~simlap_hf.data.sources.resolve_source`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import UsageError
from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .arrays import carve_indices, limit_indices, read_array_source
from .columns import get_label_names, label_values, standardize_columns, warn_missing_classes
from .images import check_image_files, dataset_from_arrays, drop_corrupt_rows, list_image_files
from .labels import check_not_empty
from .loaders import ImageTransform
from .readers import ImageTransformFn, MapReader
from .sources import Source, resolve_source
from .transforms import create_eval_transform, create_train_transform

__all__ = ["SOURCE_LOADERS", "DatasetsReader", "image_rows", "load_image_dataset", "with_image_transforms"]

SourceLoader = Callable[[Source], datasets.DatasetDict]


def _as_dataset_dict(loaded: Any, description: str) -> datasets.DatasetDict:
    """Wrap a loaded Dataset as ``{'train': ...}``; reject streaming / unknown results."""
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({TRAIN_SPLIT: loaded})
    raise ValueError(
        f"{description} loaded as {type(loaded).__name__}; only map-style Dataset / DatasetDict are supported "
        f"(streaming data sets are not)."
    )


def load_hub(source: Source) -> datasets.DatasetDict:
    """``datasets.load_dataset(hub_id, config_name)``; failures get a note that says how to work offline."""
    hub_id, config_name = source.location, source.config
    try:
        loaded = datasets.load_dataset(hub_id, config_name)
    except (ConnectionError, OSError, ValueError) as err:  # offline, not cached, no such id or config
        reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
        raise UsageError(
            f"--dataset_name: could not load the Hub data set {hub_id!r} (config {config_name!r}): {reason}. Check "
            "the id ('org/name') and your network; offline, only data sets already in the cache load: pass a local "
            "path (save_to_disk folder, parquet file or folder, IDX folder) as --dataset_name or an imagefolder tree "
            "as --train_dir."
        ) from err
    except Exception as err:
        err.add_note(
            f"simlap_hf.data: could not load Hub data set {hub_id!r} (config {config_name!r}). Check the id "
            f"('org/name') and your network; offline, pass a local path (save_to_disk folder, parquet file or "
            f"folder, IDX folder) as --dataset_name or an imagefolder tree as --train_dir. If {hub_id!r} was meant "
            f"as a local path, it does not exist."
        )
        raise
    return _as_dataset_dict(loaded, f"Hub data set {hub_id!r}")


def load_arrays(source: Source) -> datasets.DatasetDict:
    """An array source (scikit-learn's digits, a folder of IDX files: :func:`~simlap_hf.data.arrays.read_array_source`)
    as PNGs in Arrow: (N, H, W) images become grayscale PNGs (mode "L"), (N, H, W, 3) RGB PNGs."""
    arrays = read_array_source(source)
    return datasets.DatasetDict(
        {
            split: dataset_from_arrays(data.images, data.labels, arrays.label_names)
            for split, data in arrays.splits.items()
        }
    )


def _imagefolder_files(flag: str, directory: str, skip_corrupt_images: bool) -> Path:
    """Check one imagefolder tree (it exists, holds images, no empty class folder; without ``skip_corrupt_images`` no
    corrupt file, when it holds at most ``EAGER_CHECK_MAX_IMAGES`` images); returns its root."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{flag} {directory!r} does not exist or is not a directory; point it at an imagefolder tree "
            f"<dir>/<class_name>/<image files>."
        )
    files = list_image_files(root)
    if not files:
        raise ValueError(
            f"{flag} {directory!r} contains no image files (looked for .png, .jpg, .jpeg, ... in "
            f"<dir>/<class_name>/); point it at an imagefolder tree."
        )
    # The imagefolder builder takes class names from the images' folders, so an empty class folder would vanish
    # from the label set without a word (and shift every later class index): refuse it instead.
    used = {path.relative_to(root).parts[0] for path in files if len(path.relative_to(root).parts) > 1}
    empty = sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith((".", "__")) and entry.name not in used
    )
    if empty:
        raise ValueError(
            f"{flag} {directory!r}: class folder(s) {', '.join(repr(name) for name in empty)} hold no image "
            f"files, so these classes would silently be missing from the label set. Add images to them or "
            f"remove them."
        )
    if not skip_corrupt_images:
        check_image_files(files, directory)
    return root


def load_imagefolder(source: Source) -> datasets.DatasetDict:
    """Load ``train_dir`` (and ``validation_dir``) through datasets' ``imagefolder`` builder.

    A tree of at most ``EAGER_CHECK_MAX_IMAGES`` images is decoded with PIL first (cheap for small images): a
    corrupt file raises unless ``skip_corrupt_images`` is set, in which case the later row-level check drops it. A
    larger tree is not decoded here (see :func:`~simlap_hf.data.images.checked_at_load`).
    """
    args = source.args
    dirs = {TRAIN_SPLIT: args.train_dir}
    if args.validation_dir:
        dirs[VALIDATION_SPLIT] = args.validation_dir
    data_files = {}
    for split, directory in dirs.items():
        flag = "--train_dir" if split == TRAIN_SPLIT else "--validation_dir"
        root = _imagefolder_files(flag, directory, args.skip_corrupt_images)
        data_files[split] = os.path.join(glob.escape(str(root.resolve())), "**")
    loaded = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False)
    return _as_dataset_dict(loaded, source.description)


def _empty_saved_splits(path: Path) -> list[str]:
    """Splits of a save_to_disk folder stored without any data file (``datasets`` cannot load those)."""
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            folders = {split: path / split for split in splits}
        else:
            folders = {TRAIN_SPLIT: path}
        return [
            split
            for split, folder in folders.items()
            if json.loads((folder / "state.json").read_text()).get("_data_files") == []
        ]
    except (OSError, ValueError, KeyError, TypeError):  # unexpected layout: let datasets report it
        return []


def load_save_to_disk(source: Source) -> datasets.DatasetDict:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    description = source.description
    for split in _empty_saved_splits(source.path):
        check_not_empty(datasets.Dataset.from_dict({}), split, description)
    return _as_dataset_dict(datasets.load_from_disk(str(source.path)), description)


def load_parquet(source: Source) -> datasets.DatasetDict:
    """A parquet file (the train split) or a folder of parquet files (splits named by the file names)."""
    if source.path.is_file():
        loaded = datasets.load_dataset("parquet", data_files={TRAIN_SPLIT: str(source.path)})
    else:
        loaded = datasets.load_dataset("parquet", data_dir=str(source.path))
    return _as_dataset_dict(loaded, source.description)


SOURCE_LOADERS: dict[str, SourceLoader] = {
    "hub": load_hub,
    "sklearn_digits": load_arrays,
    "idx": load_arrays,
    "imagefolder": load_imagefolder,
    "save_to_disk": load_save_to_disk,
    "parquet": load_parquet,
}


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
    return standard_form(resolve_source(args), seed)


def standard_form(source: Source, seed: int) -> datasets.DatasetDict:
    """The standard form of a resolved source (see :func:`load_image_dataset`), splits seeded with ``seed``."""
    args, description = source.args, source.description
    data = _pick_splits(SOURCE_LOADERS[source.kind](source), description)
    data = standardize_columns(
        data,
        args.image_column_name or source.image_column,
        args.label_column_name or source.label_column,
        source.label_names,
        description,
    )
    if args.skip_corrupt_images:
        data = drop_corrupt_rows(data, description)
    if VALIDATION_SPLIT not in data:
        fraction = source.validation_fraction if source.validation_fraction is not None else args.train_val_split
        check_not_empty(data[TRAIN_SPLIT], TRAIN_SPLIT, description)
        data = _carve_validation(data[TRAIN_SPLIT], fraction, seed, description)
    result = _limited(data, args, seed, description)
    warn_missing_classes(result, description)
    return result


def image_rows(ds: datasets.Dataset, transform: ImageTransformFn, skip_corrupt_images: bool) -> datasets.Dataset:
    """``ds`` with a lazy transform: rows ``{"pixel_values": transform(image) (C, H, W), "labels": int}``. The image
    column is switched to ``Image(decode=False)`` (metadata only) so that decoding happens in
    :class:`~simlap_hf.data.ImageTransform` and an undecodable image raises a ValueError naming its file."""
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return raw.with_transform(ImageTransform(transform, skip_corrupt_images=skip_corrupt_images))


def with_image_transforms(
    dataset: datasets.DatasetDict, args: DataArguments, num_channels: int = 3, *, augmented_split: str | None = None
) -> datasets.DatasetDict:
    """Attach lazy transforms (:func:`image_rows`): the split ``augmented_split`` (None: none) gets the training
    augmentation, every other split the evaluation transform.

    Rows become ``{"pixel_values": Tensor(num_channels, input_size, input_size), "labels": int}`` (uint8 training
    rows with ``args.uint8_transfer``, float32 otherwise).
    """
    if augmented_split is not None and augmented_split not in dataset:
        raise KeyError(f"augmented_split {augmented_split!r} is not a split of the data ({sorted(dataset)}).")
    train_transform = create_train_transform(args, num_channels) if augmented_split is not None else None
    eval_transform = create_eval_transform(args, num_channels)
    return datasets.DatasetDict(
        {
            split: image_rows(
                ds, train_transform if split == augmented_split else eval_transform, args.skip_corrupt_images
            )
            for split, ds in dataset.items()
        }
    )


class DatasetsReader(MapReader):
    """The reader of a map-style source through ``datasets``: its standard form (:func:`standard_form`, splits
    seeded with ``seed``), rows transformed lazily (:func:`image_rows`)."""

    def __init__(self, source: Source, seed: int) -> None:
        self.data = standard_form(source, seed)
        super().__init__(source.args, get_label_names(self.data), source.description)

    def rows(self, split: str, transform: ImageTransformFn) -> datasets.Dataset:
        return image_rows(self.data[split], transform, self.args.skip_corrupt_images)

    def class_ids(self, split: str) -> np.ndarray:
        return label_values(self.data[split]).to_numpy()
