"""Sources: from ``DataArguments`` to loaded splits, one loader function per source kind.

:func:`load_source` decides the kind (an imagefolder tree, a named data set's row, an existing local path, a Hub
id) and calls the kind's loader from :data:`SOURCE_LOADERS`; a named data set's row in
``simlap_hf.data.registry`` names its loader kind. Adding a kind of source means adding a loader here.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..errors import UsageError
from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT, DataArguments
from .arrays import ArraySource, digits_arrays, idx_arrays
from .idx import is_idx_folder
from .images import check_image_files, dataset_from_arrays, list_image_files
from .labels import check_not_empty
from .registry import NamedDatasetSpec, known_names, local_copy, named_spec, normalize_name

__all__ = ["SOURCE_LOADERS", "RawSource", "SourceRequest", "load_source"]


@dataclass
class RawSource:
    """A loaded source before column mapping: its splits plus the defaults that apply to it."""

    data: datasets.DatasetDict
    description: str
    image_column: str | None = None
    label_column: str | None = None
    label_names: Sequence[str] | None = None
    validation_fraction: float | None = None


@dataclass(frozen=True)
class SourceRequest:
    """What a loader reads.

    Attributes:
        args: the run's data arguments.
        location: the Hub id, or the local path as given (named in messages).
        spec: the named data set's row that applies, if any.
        config: the Hub config to load.
        path: ``location`` as an existing local path (local kinds only).
    """

    args: DataArguments
    location: str
    spec: NamedDatasetSpec | None = None
    config: str | None = None
    path: Path | None = None


SourceLoader = Callable[[SourceRequest], RawSource]


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


def load_hub(request: SourceRequest) -> RawSource:
    """``datasets.load_dataset(hub_id, config_name)``; failures get a note that says how to work offline."""
    hub_id, config_name = request.location, request.config
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
    return RawSource(_as_dataset_dict(loaded, f"Hub data set {hub_id!r}"), f"Hub data set {hub_id!r}")


def _as_standard(source: ArraySource) -> datasets.DatasetDict:
    """An array source's splits as PNGs in Arrow: (N, H, W) images become grayscale PNGs (mode "L"), (N, H, W, 3)
    RGB PNGs."""
    return datasets.DatasetDict(
        {
            split: dataset_from_arrays(data.images, data.labels, source.label_names)
            for split, data in source.splits.items()
        }
    )


def load_sklearn_digits(request: SourceRequest) -> RawSource:
    """scikit-learn's bundled digits (:func:`~simlap_hf.data.arrays.digits_arrays`)."""
    source = digits_arrays()
    fraction = request.spec.validation_fraction if request.spec is not None else None
    return RawSource(_as_standard(source), source.description, validation_fraction=fraction)


def load_idx(request: SourceRequest) -> RawSource:
    """A folder of MNIST-style IDX files (:func:`~simlap_hf.data.arrays.idx_arrays`); class names from the named
    row, if any."""
    label_names = request.spec.label_names if request.spec is not None else None
    source = idx_arrays(request.path, label_names, f"IDX folder {str(request.path)!r}")
    return RawSource(_as_standard(source), f"IDX folder {request.location!r}", "image", "label")


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


def load_imagefolder(request: SourceRequest) -> RawSource:
    """Load ``train_dir`` (and ``validation_dir``) through datasets' ``imagefolder`` builder.

    A tree of at most ``EAGER_CHECK_MAX_IMAGES`` images is decoded with PIL first (cheap for small images): a
    corrupt file raises unless ``skip_corrupt_images`` is set, in which case the later row-level check drops it. A
    larger tree is not decoded here (see :func:`~simlap_hf.data.images.checked_at_load`).
    """
    args = request.args
    dirs = {TRAIN_SPLIT: args.train_dir}
    if args.validation_dir:
        dirs[VALIDATION_SPLIT] = args.validation_dir
    data_files = {}
    for split, directory in dirs.items():
        flag = "--train_dir" if split == TRAIN_SPLIT else "--validation_dir"
        root = _imagefolder_files(flag, directory, args.skip_corrupt_images)
        data_files[split] = os.path.join(glob.escape(str(root.resolve())), "**")
    loaded = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False)
    description = f"imagefolder {args.train_dir!r}" + (f" + {args.validation_dir!r}" if args.validation_dir else "")
    return RawSource(_as_dataset_dict(loaded, description), description, "image", "label")


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


def load_save_to_disk(request: SourceRequest) -> RawSource:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    description = f"save_to_disk folder {request.location!r}"
    for split in _empty_saved_splits(request.path):
        check_not_empty(datasets.Dataset.from_dict({}), split, description)
    return RawSource(_as_dataset_dict(datasets.load_from_disk(str(request.path)), description), description)


def load_parquet(request: SourceRequest) -> RawSource:
    """A parquet file (the train split) or a folder of parquet files (splits named by the file names)."""
    if request.path.is_file():
        description = f"parquet file {request.location!r}"
        loaded = datasets.load_dataset("parquet", data_files={TRAIN_SPLIT: str(request.path)})
    else:
        description = f"parquet folder {request.location!r}"
        loaded = datasets.load_dataset("parquet", data_dir=str(request.path))
    return RawSource(_as_dataset_dict(loaded, description), description)


SOURCE_LOADERS: dict[str, SourceLoader] = {
    "hub": load_hub,
    "sklearn_digits": load_sklearn_digits,
    "idx": load_idx,
    "imagefolder": load_imagefolder,
    "save_to_disk": load_save_to_disk,
    "parquet": load_parquet,
}


def _looks_like_local_path(name: str) -> bool:
    """Names that cannot be Hub ids: absolute, home- or dot-relative paths, Windows paths, data file names."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.lower().endswith((".parquet", ".arrow", ".gz"))
        or name.count("/") > 1
    )


def _local_kind(path: Path, name: str) -> str:
    """The source kind of an existing local path, or a ValueError saying what is supported."""
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        raise ValueError(
            f"Local file {name!r} is not a supported data set (expected a .parquet file); pass a save_to_disk "
            f"folder, a parquet file or folder, or a folder of IDX files."
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "save_to_disk"
    if is_idx_folder(path):
        return "idx"
    if any(path.rglob("*.parquet")):
        return "parquet"
    raise ValueError(
        f"Local folder {name!r} holds no supported data: expected a save_to_disk folder (dataset_dict.json or "
        f"state.json), parquet files, or IDX files (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz]). "
        f"For an imagefolder tree use --train_dir."
    )


def _named_request(args: DataArguments, spec: NamedDatasetSpec, config: str | None) -> tuple[str, SourceRequest]:
    """A named data set: its local IDX copy when the row names one that exists, else the row's loader kind."""
    local = local_copy(spec)
    if local and Path(local).is_dir() and is_idx_folder(Path(local)):
        return "idx", SourceRequest(args, local, spec, config, Path(local))
    return spec.loader, SourceRequest(args, spec.hub_id or spec.name, spec, config)


def _config_and_label_column(spec: NamedDatasetSpec | None, config: str | None) -> tuple[str | None, str | None]:
    """(Hub config to load, label column it selects): a named row may turn a config name into a label column."""
    if spec is not None and spec.config_label_columns and config is not None:
        if config not in spec.config_label_columns:
            raise ValueError(
                f"--dataset_config_name {config!r} is not valid for {spec.name}; choose one of "
                f"{sorted(spec.config_label_columns)}."
            )
        return None, spec.config_label_columns[config]
    return config, None


def _resolve_request(
    args: DataArguments, name: str, spec: NamedDatasetSpec | None, config: str | None
) -> tuple[str, SourceRequest]:
    """The source kind of ``--dataset_name`` and what its loader reads."""
    if spec is not None and normalize_name(name) == spec.name:
        return _named_request(args, spec, config)
    path = Path(name).expanduser()
    if path.exists():
        return _local_kind(path, name), SourceRequest(args, name, spec, config, path)
    if _looks_like_local_path(name):
        raise FileNotFoundError(
            f"Local data set path {name!r} does not exist; pass an existing save_to_disk folder, parquet file "
            f"or folder, or IDX folder (or a named data set: {known_names()})."
        )
    if "/" in name:
        return "hub", SourceRequest(args, name, spec, config)
    raise ValueError(
        f"Unknown --dataset_name {name!r}: it is not a named data set ({known_names()}), not an existing "
        f"local path, and not a Hub id (Hub ids look like 'org/name', e.g. 'uoft-cs/cifar10')."
    )


def load_source(args: DataArguments) -> RawSource:
    """Resolve ``args`` to a loaded source with its column / label-name / split defaults."""
    if args.train_dir:
        return load_imagefolder(SourceRequest(args, args.train_dir))
    if args.validation_dir:
        raise ValueError(f"--validation_dir {args.validation_dir!r} is only used together with --train_dir.")
    name = args.dataset_name
    if not name or not name.strip():
        raise ValueError(
            f"No data given: set --dataset_name (named: {known_names()}; a Hub id 'org/name'; or a local path) "
            f"or --train_dir."
        )
    spec = named_spec(name)
    config, label_column = _config_and_label_column(spec, args.dataset_config_name)
    kind, request = _resolve_request(args, name, spec, config)
    source = SOURCE_LOADERS[kind](request)
    if spec is not None:
        if normalize_name(name) == spec.name:
            source.label_names = spec.label_names
        source.image_column = source.image_column or spec.image_column
        source.label_column = label_column or spec.label_column
    return source
