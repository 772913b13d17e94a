"""Resolution: the data flags decide, once and here only, what a run reads (a :class:`Source`, or for ``--streaming``
a :class:`StreamSource` per split). Reading is the readers' part (``arrays``, ``dataset``, ``stream_sources``); this
module reads no data and works without the ``datasets`` library.

A map-style source has a *kind*: ``imagefolder`` (``--train_dir``), a named data set's loader kind (its row in
``simlap_hf.data.registry``), the kind of an existing local path (``save_to_disk``, ``parquet``, ``idx``), or ``hub``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .arguments import DataArguments
from .idx import is_idx_folder
from .registry import NamedDatasetSpec, known_names, local_copy, named_spec, normalize_name

__all__ = [
    "ARRAY_KINDS",
    "Source",
    "StreamSource",
    "resolve_source",
    "resolve_stream_sources",
    "resolve_train_stream",
]

# Kinds whose images are arrays in memory: read without the ``datasets`` library (see .arrays).
ARRAY_KINDS: tuple[str, ...] = ("sklearn_digits", "idx")

# Columns that a kind's reader names itself (whatever the named row says about the image column).
_KIND_COLUMNS: dict[str, tuple[str, str]] = {"imagefolder": ("image", "label"), "idx": ("image", "label")}


@dataclass(frozen=True)
class Source:
    """A resolved map-style source: what its reader reads and the defaults that apply to it.

    Attributes:
        kind: how it is read (``hub``, ``sklearn_digits``, ``idx``, ``imagefolder``, ``save_to_disk``, ``parquet``).
        args: the run's data arguments.
        location: the Hub id, or the local path as given (named in messages).
        spec: the named data set's row that applies, if any.
        config: the Hub config to load.
        path: ``location`` as an existing local path (local kinds only).
        image_column / label_column: the source's columns when the flags do not name them (None: detected).
        label_names: class names of integer labels (None: named by their values).
        validation_fraction: the fraction carved out as validation, overriding ``--train_val_split``.
    """

    kind: str
    args: DataArguments
    location: str
    spec: NamedDatasetSpec | None = None
    config: str | None = None
    path: Path | None = None
    image_column: str | None = None
    label_column: str | None = None
    label_names: Sequence[str] | None = None
    validation_fraction: float | None = None

    @property
    def description(self) -> str:
        """What the source is, for messages."""
        if self.kind == "imagefolder":
            validation = f" + {self.args.validation_dir!r}" if self.args.validation_dir else ""
            return f"imagefolder {self.args.train_dir!r}{validation}"
        if self.kind == "sklearn_digits":
            return "digits (scikit-learn)"
        if self.kind == "parquet":
            return f"parquet {'file' if self.path.is_file() else 'folder'} {self.location!r}"
        names = {"hub": "Hub data set", "idx": "IDX folder", "save_to_disk": "save_to_disk folder"}
        return f"{names.get(self.kind, self.kind)} {self.location!r}"

    @property
    def flag(self) -> str:
        """The flag and value that chose this source, for messages."""
        return (
            f"--train_dir {self.args.train_dir!r}"
            if self.kind == "imagefolder"
            else f"--dataset_name {self.location!r}"
        )


@dataclass(frozen=True)
class StreamSource:
    """One split of ``--streaming``: ``kind`` ``webdataset`` (tar shard patterns in ``files``), ``imagefolder`` (the
    folder ``location``) or ``hub`` (the data set id ``location`` with ``config``; ``spec``: its named row)."""

    kind: str
    location: str = ""
    files: tuple[str, ...] = ()
    spec: NamedDatasetSpec | None = None
    config: str | None = None

    @property
    def description(self) -> str:
        """What the stream reads, for messages."""
        if self.kind == "webdataset":
            return f"the tar shards {list(self.files)}"
        if self.kind == "imagefolder":
            return f"the image folder {self.location}"
        return f"Hub data set {self.location!r}"


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


def _kind_and_location(name: str, spec: NamedDatasetSpec | None) -> tuple[str, str, Path | None]:
    """(kind, location, local path) of ``--dataset_name``: a named data set (its local IDX copy when the row names
    one that exists, else the row's loader kind), an existing local path, or a Hub id."""
    if spec is not None and normalize_name(name) == spec.name:
        local = local_copy(spec)
        if local and Path(local).is_dir() and is_idx_folder(Path(local)):
            return "idx", local, Path(local)
        return spec.loader, spec.hub_id or spec.name, None
    path = Path(name).expanduser()
    if path.exists():
        return _local_kind(path, name), name, path
    if _looks_like_local_path(name):
        raise FileNotFoundError(
            f"Local data set path {name!r} does not exist; pass an existing save_to_disk folder, parquet file "
            f"or folder, or IDX folder (or a named data set: {known_names()})."
        )
    if "/" in name:
        return "hub", name, None
    raise ValueError(
        f"Unknown --dataset_name {name!r}: it is not a named data set ({known_names()}), not an existing "
        f"local path, and not a Hub id (Hub ids look like 'org/name', e.g. 'uoft-cs/cifar10')."
    )


def resolve_source(args: DataArguments) -> Source:
    """The map-style source of ``args`` with its column / label-name / split defaults (``--train_dir`` wins over
    ``--dataset_name``); a ValueError / FileNotFoundError naming the flag when the flags name no source."""
    if args.train_dir:
        return Source("imagefolder", args, args.train_dir, image_column="image", label_column="label")
    if args.validation_dir:
        raise ValueError(f"--validation_dir {args.validation_dir!r} is only used together with --train_dir.")
    name = args.dataset_name
    if not name or not name.strip():
        raise ValueError(
            f"No data given: set --dataset_name (named: {known_names()}; a Hub id 'org/name'; or a local path) "
            f"or --train_dir."
        )
    spec = named_spec(name)
    config, config_label_column = _config_and_label_column(spec, args.dataset_config_name)
    kind, location, path = _kind_and_location(name, spec)
    image_column, label_column = _KIND_COLUMNS.get(kind, (None, None))
    label_names, validation_fraction = None, None
    if spec is not None:
        if normalize_name(name) == spec.name:
            label_names = spec.label_names
        image_column = image_column or spec.image_column
        label_column = config_label_column or spec.label_column
        if kind == "sklearn_digits":
            validation_fraction = spec.validation_fraction
    return Source(
        kind, args, location, spec, config, path, image_column, label_column, label_names, validation_fraction
    )


def _stream_source(args: DataArguments, files: Sequence[str] | None, directory: str | None) -> StreamSource:
    """One split's stream: tar shards, else an image folder, else ``--dataset_name`` on the Hub."""
    if files:
        return StreamSource("webdataset", files=tuple(files))
    if directory:
        return StreamSource("imagefolder", directory)
    spec = named_spec(args.dataset_name)
    if spec is not None and spec.hub_id is None:
        raise ValueError(
            f"--streaming reads tar shards (--train_files), image folders (--train_dir) or Hub data sets; "
            f"{args.dataset_name!r} is built in and small: drop --streaming."
        )
    name = spec.hub_id if spec is not None else args.dataset_name
    return StreamSource("hub", name, spec=spec, config=args.dataset_config_name)


def resolve_train_stream(args: DataArguments) -> StreamSource:
    """The training stream of ``--streaming``: ``--train_files``, ``--train_dir`` or the Hub data set
    ``--dataset_name``."""
    return _stream_source(args, args.train_files, args.train_dir)


def resolve_stream_sources(args: DataArguments) -> tuple[StreamSource, StreamSource]:
    """(training, validation) streams of ``--streaming``: ``--train_files`` / ``--train_dir`` / the Hub data set
    ``--dataset_name``, and ``--validation_files`` / ``--validation_dir`` / the same Hub data set (whose validation or
    test split the reader picks). A ValueError when local training data has no validation source."""
    train = resolve_train_stream(args)
    if args.validation_files or args.validation_dir:
        return train, _stream_source(args, args.validation_files, args.validation_dir)
    if train.kind != "hub":
        raise ValueError(
            "--streaming from local data needs a validation split: pass --validation_files (tar shards) or "
            "--validation_dir (an image folder)."
        )
    return train, train
