"""Data pipeline of SimLAP-HF: from a data specification to augmented, batched tensors.

Every source ends in the same *standard form*: a :class:`datasets.DatasetDict` with the splits
``train`` and ``validation`` and exactly two columns,

* ``image``: a :class:`datasets.Image` feature (a ``PIL.Image.Image`` on access), and
* ``label``: a :class:`datasets.ClassLabel` carrying the class names.

Supported sources (see :func:`load_image_dataset`):

* named data sets: ``digits`` (scikit-learn's bundled 8x8 digits, works offline), ``cifar10``,
  ``cifar100``, ``fashion_mnist`` (local IDX files when present, else the Hub);
* any Hub data set id (``org/name``) with ``--image_column_name`` / ``--label_column_name``;
* local paths: a ``save_to_disk`` folder, a parquet file or folder of parquet files, a folder of
  MNIST-style IDX files, or an imagefolder tree through ``--train_dir`` / ``--validation_dir``.

Layers (each module imports only the ones above it):

* ``arguments``, ``registry``, ``idx``, ``samplers``: :class:`DataArguments` and the split names; the named data sets
  (one :class:`NamedDatasetSpec` row each, naming its source kind); IDX files (numpy only); the batch samplers.
* ``images``, ``labels``, ``preprocessing``, ``transforms``: image encoding/decoding and corrupt-image checks; class
  labels, standardised in one place for every reader; :func:`resolve_preprocessing`, the one source of input size,
  crop, interpolation and normalisation; augmentation and the evaluation transform.
* ``loaders``, ``sources``: from rows to batches (:class:`ImageTransform`, the training and evaluation loaders,
  resumable augmentation); the resolution of the data flags into a source, once.
* ``readers``: the reader contract; ``arrays`` (images held as arrays, without ``datasets``), ``columns`` and
  ``dataset`` (map-style ``datasets`` splits in the standard form, :func:`load_image_dataset`), ``stream_sources``
  and ``streaming`` (``--streaming`` from a ``datasets`` IterableDataset: repeated augmentation, split across
  processes and workers, resumable).
* ``pipeline``: :func:`create_reader` (flags -> reader), :func:`build_data_bundle` (the one builder of a run's
  loaders from any reader) and :func:`prepare_data` (both).

Rows are ``{"pixel_values": Tensor(C, H, W), "labels": int}`` (lazily transformed; which split is augmented is an
argument: ``with_image_transforms(..., augmented_split="train")``); :func:`collate_fn` stacks them into
``{"pixel_values": Tensor(B, C, H, W), "labels": LongTensor(B)}``. The training loader uses
:class:`RepeatedAugmentationBatchSampler` (each image ``ra`` times per epoch, all copies of an image in one batch,
for any batch size).

The names below are imported from their modules on first use, so that the modules that work without the optional
``datasets`` library (all but ``columns``, ``dataset``, ``stream_sources`` and ``streaming``) stay importable where it
is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DEFAULT_CROP_PCT": "arguments",
    "DEFAULT_INPUT_SIZE": "arguments",
    "DEFAULT_INTERPOLATION": "arguments",
    "SAMPLERS": "arguments",
    "TRAIN_SPLIT": "arguments",
    "VALIDATION_SPLIT": "arguments",
    "DataArguments": "arguments",
    "FASHION_MNIST_LABEL_NAMES": "registry",
    "NAMED_DATASETS": "registry",
    "NamedDatasetSpec": "registry",
    "SOURCE_LOADERS": "dataset",
    "load_image_dataset": "dataset",
    "with_image_transforms": "dataset",
    "get_label_names": "columns",
    "Source": "sources",
    "resolve_source": "sources",
    "Reader": "readers",
    "ArrayReader": "arrays",
    "DatasetsReader": "dataset",
    "StreamReader": "streaming",
    "read_idx": "idx",
    "image_file_checks_done": "images",
    "ClassBalancedBatchSampler": "samplers",
    "RepeatedAugmentationBatchSampler": "samplers",
    "RepeatedAugmentationSampler": "samplers",
    "Preprocessing": "preprocessing",
    "channel_stats": "preprocessing",
    "create_image_processor": "preprocessing",
    "processor_preprocessing": "preprocessing",
    "resolve_mean_std": "preprocessing",
    "resolve_preprocessing": "preprocessing",
    "save_image_processor": "preprocessing",
    "ConvertImageMode": "transforms",
    "TrainNormalizer": "transforms",
    "UInt8RandomErasing": "transforms",
    "create_eval_transform": "transforms",
    "create_train_normalizer": "transforms",
    "create_train_transform": "transforms",
    "eval_transform": "transforms",
    "DataBundle": "pipeline",
    "build_data_bundle": "pipeline",
    "create_reader": "pipeline",
    "prepare_data": "pipeline",
    "ImageTransform": "loaders",
    "ResumableAugmentations": "loaders",
    "capture_rng_state": "loaders",
    "collate_fn": "loaders",
    "create_eval_dataloader": "loaders",
    "create_train_dataloader": "loaders",
    "prepare_own_part_loader": "loaders",
    "restore_rng_state": "loaders",
    "StreamingRepeatedAugmentation": "streaming",
    "expand_shard_patterns": "stream_sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
