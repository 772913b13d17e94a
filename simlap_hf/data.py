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

Named data sets and arbitrary sources share one column-mapping code path
(:func:`_standardize_columns`); a named data set only contributes defaults (Hub id, column names,
class names, normalisation statistics) through the table :data:`NAMED_DATASETS`.

Training rows are produced lazily by :func:`with_image_transforms` as
``{"pixel_values": FloatTensor(C, H, W), "labels": int}``; :func:`collate_fn` stacks them into
``{"pixel_values": FloatTensor(B, C, H, W), "labels": LongTensor(B)}``. The training loader uses
:class:`RepeatedAugmentationBatchSampler` (each image ``ra`` times per epoch, all copies of an image in one batch,
for any batch size).
"""

import glob
import io
import json
import logging
import os
import random
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from .idx import read_idx
from .samplers import ClassBalancedBatchSampler, RepeatedAugmentationBatchSampler, RepeatedAugmentationSampler

__all__ = [
    "ClassBalancedBatchSampler",
    "FASHION_MNIST_LABEL_NAMES",
    "ConvertImageMode",
    "DataArguments",
    "ImageTransform",
    "NAMED_DATASETS",
    "NamedDatasetSpec",
    "RepeatedAugmentationBatchSampler",
    "RepeatedAugmentationSampler",
    "collate_fn",
    "create_eval_dataloader",
    "create_eval_transform",
    "create_train_dataloader",
    "create_train_normalizer",
    "create_train_transform",
    "get_label_names",
    "load_image_dataset",
    "read_idx",
    "resolve_mean_std",
    "with_image_transforms",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_LABEL_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR_ENV = "SIMLAP_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

TRAIN_SPLIT = "train"
SAMPLERS = ("random", "pk")
VALIDATION_SPLIT = "validation"
# Source split names accepted as the validation split, in order of preference.
_VALIDATION_ALIASES: tuple[str, ...] = ("validation", "valid", "val", "dev", "eval", "test")
_TRAIN_ALIASES: tuple[str, ...] = ("train", "training")


@dataclass(frozen=True)
class NamedDatasetSpec:
    """Defaults contributed by a named data set; everything else goes through the generic path.

    Attributes:
        name: the short name accepted by ``--dataset_name``.
        hub_id: Hub repository id, or ``None`` for a built-in source.
        image_column: name of the image column in the source.
        label_column: name of the label column in the source.
        mean: per-channel normalisation mean (3 values).
        std: per-channel normalisation std (3 values).
        label_names: class names to use when the source only stores integer labels.
        config_label_columns: ``--dataset_config_name`` values that select another label column
            (the Hub config itself is then left at its default).
        local_dir_env: environment variable naming a local IDX folder tried before the Hub.
        local_dir_default: folder tried when ``local_dir_env`` is unset.
        validation_fraction: fixed fraction carved into ``validation`` (overrides ``train_val_split``).
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...] | None = None
    config_label_columns: Mapping[str, str] = field(default_factory=dict)
    local_dir_env: str | None = None
    local_dir_default: str | None = None
    validation_fraction: float | None = None


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

NAMED_DATASETS: dict[str, NamedDatasetSpec] = {
    "cifar10": NamedDatasetSpec(
        name="cifar10",
        hub_id="uoft-cs/cifar10",
        image_column="img",
        label_column="label",
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
    ),
    "cifar100": NamedDatasetSpec(
        name="cifar100",
        hub_id="uoft-cs/cifar100",
        image_column="img",
        label_column="fine_label",
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
        config_label_columns={"fine": "fine_label", "coarse": "coarse_label"},
    ),
    # Fashion-MNIST statistics of the 60k training images (0.2860 / 0.3530), replicated to 3 channels.
    "fashion_mnist": NamedDatasetSpec(
        name="fashion_mnist",
        hub_id="zalando-datasets/fashion_mnist",
        image_column="image",
        label_column="label",
        mean=(0.2860,) * 3,
        std=(0.3530,) * 3,
        label_names=FASHION_MNIST_LABEL_NAMES,
        local_dir_env=FASHION_MNIST_DIR_ENV,
        local_dir_default=FASHION_MNIST_DEFAULT_DIR,
    ),
    # scikit-learn digits: statistics of all 1,797 images after scaling 0..16 -> 0..255 (0.3053 / 0.3759).
    "digits": NamedDatasetSpec(
        name="digits",
        hub_id=None,
        image_column="image",
        label_column="label",
        mean=(0.3053,) * 3,
        std=(0.3759,) * 3,
        label_names=tuple(str(i) for i in range(10)),
        validation_fraction=0.2,
    ),
}


@dataclass
class DataArguments:
    """Arguments that describe the data and its augmentation (parsable by ``transformers.HfArgumentParser``).

    Note: ``dataloader_num_workers`` has the same name as a ``transformers.TrainingArguments`` field, so
    parse this class with its own parser (or drop one of them) when combining it with ``TrainingArguments``.
    """

    dataset_name: str | None = field(
        default="digits",
        metadata={
            "help": "Named data set (cifar10, cifar100, fashion_mnist, digits), a Hub data set id ('org/name'), "
            "or a local path: a save_to_disk folder, a parquet file or folder, or a folder of MNIST IDX files."
        },
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Hub config name; for cifar100, 'coarse' or 'fine' selects the label column."},
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Imagefolder tree (train_dir/<class>/<image>) for training; wins over dataset_name."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Imagefolder tree for validation (used with --train_dir)."}
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Image column of the source; default: per named data set, else the single Image column."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Label column of the source; default: per named data set, else 'label'/'labels'."},
    )
    train_val_split: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of train carved (seeded, stratified when possible) into validation when the "
            "source has no validation/test split."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training images after a seeded shuffle."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation images after a seeded shuffle."}
    )
    input_size: int = field(default=32, metadata={"help": "Side of the square network input in pixels."})
    scale: list[float] = field(
        default_factory=lambda: [0.7, 1.0], metadata={"help": "RandomResizedCrop area scale range (min max)."}
    )
    ratio: list[float] = field(
        default_factory=lambda: [0.75, 1.3333333333333333],
        metadata={"help": "RandomResizedCrop aspect ratio range (min max)."},
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    aa: str | None = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm RandAugment / AutoAugment policy string; None or 'none' disables it."},
    )
    color_jitter: float | None = field(
        default=None,
        metadata={
            "help": "Color jitter strength, only used by timm when --aa is disabled; None (default) disables it "
            "(timm's own default would be 0.4)."
        },
    )
    reprob: float = field(default=0.1, metadata={"help": "RandomErasing probability."})
    interpolation: str = field(default="bicubic", metadata={"help": "Resize interpolation (bicubic, bilinear, ...)."})
    crop_pct: float = field(
        default=0.875,
        metadata={"help": "Eval: resize to input_size / crop_pct, then center crop input_size (32 -> 36 -> 32)."},
    )
    mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean (1 or 3 values); default: per data set."}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std (1 or 3 values); default: per data set."}
    )
    ra: int = field(default=3, metadata={"help": "Repeated augmentation: copies of each image per epoch (1 disables)."})
    sampler: str = field(
        default="random",
        metadata={"help": "Training batches: 'random' (images in random order) or 'pk' (P classes x K images each, "
                          "--pk_images_per_class; many partners per class for arbitrary pairs when classes are many)."},
    )
    pk_images_per_class: int = field(default=4, metadata={"help": "K of --sampler pk: images of each class per batch."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    uint8_transfer: bool = field(
        default=True,
        metadata={"help": "Training samples leave the loader as uint8 (4x less to copy to the device) and are "
                          "normalised on the device; --no_uint8_transfer normalises in the loader (float32)."},
    )
    skip_corrupt_images: bool = field(
        default=False,
        metadata={
            "help": "Skip images that cannot be decoded (and log how many) instead of raising an error that "
            "names the file."
        },
    )

    def __post_init__(self) -> None:
        """Check value ranges early, with messages that name the flag and the bad value."""
        if not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in [0, 1), got {self.train_val_split}.")
        for flag in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag} must be a positive integer or None, got {value}.")
        if self.input_size <= 0:
            raise ValueError(f"--input_size must be positive, got {self.input_size}.")
        for flag in ("scale", "ratio"):
            value = getattr(self, flag)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"--{flag} needs two increasing positive numbers (min max), got {value}.")
        for flag in ("hflip", "reprob"):
            value = getattr(self, flag)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{flag} is a probability and must be in [0, 1], got {value}.")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"--crop_pct must be in (0, 1], got {self.crop_pct}.")
        if self.ra < 1:
            raise ValueError(f"--ra (repeated augmentation count) must be >= 1, got {self.ra}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler={self.sampler!r} is not valid; choose one of {', '.join(SAMPLERS)}.")
        if self.pk_images_per_class < 1:
            raise ValueError(f"--pk_images_per_class must be >= 1, got {self.pk_images_per_class}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}.")
        for flag in ("mean", "std"):
            value = getattr(self, flag)
            if value is not None and len(value) not in (1, 3):
                raise ValueError(f"--{flag} needs 1 or 3 values, got {len(value)}: {value}.")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"--std values must be positive, got {self.std}.")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _normalize_name(name: str) -> str:
    """Canonical form of a data set name: stripped, lower case, '-' -> '_'."""
    return name.strip().lower().replace("-", "_")


def _named_spec(name: str | None) -> NamedDatasetSpec | None:
    """Return the named spec for a short name (``cifar10``) or its Hub id (``uoft-cs/cifar10``)."""
    if not name:
        return None
    key = _normalize_name(name)
    if key in NAMED_DATASETS:
        return NAMED_DATASETS[key]
    for spec in NAMED_DATASETS.values():
        if spec.hub_id is not None and spec.hub_id.lower() == name.strip().lower():
            return spec
    return None


def _looks_like_local_path(name: str) -> bool:
    """Names that cannot be Hub ids: absolute, home- or dot-relative paths, Windows paths, data file names."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.lower().endswith((".parquet", ".arrow", ".gz"))
        or name.count("/") > 1
    )


def _known_names() -> str:
    """Comma-separated named data sets, for error messages."""
    return ", ".join(sorted(NAMED_DATASETS))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: big-endian length, type, payload, CRC-32 of type + payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _encode_png_chunk(images: np.ndarray) -> list[bytes]:
    """Encode uint8 images of shape (N, H, W) (grayscale) or (N, H, W, 3) (RGB) to PNG files.

    The PNG files are written directly (signature, IHDR, one IDAT with filter type 0 per row, IEND);
    ``zlib.compress`` releases the GIL, so chunks encode in parallel threads.
    """
    n, height, width = images.shape[:3]
    channels = 1 if images.ndim == 3 else images.shape[3]
    color_type = {1: 0, 3: 2}[channels]
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    trailer = _png_chunk(b"IEND", b"")
    rows = images.reshape(n, height, width * channels)
    filtered = np.zeros((n, height, width * channels + 1), dtype=np.uint8)  # leading 0 = filter "None"
    filtered[:, :, 1:] = rows
    return [header + _png_chunk(b"IDAT", zlib.compress(item.tobytes(), 6)) + trailer for item in filtered]


def _encode_png_batch(images: np.ndarray) -> list[bytes]:
    """Encode (N, H, W[, 3]) uint8 images to a list of N PNG byte strings, using all CPU cores."""
    if len(images) == 0:
        return []
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunks = np.array_split(images, max(1, min(len(images) // 1024, workers * 4)))
    if workers == 1 or len(chunks) == 1:
        return [png for chunk in chunks for png in _encode_png_chunk(chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [png for encoded in pool.map(_encode_png_chunk, chunks) for png in encoded]


def _dataset_from_arrays(images: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> datasets.Dataset:
    """Build an in-memory standard-form split from uint8 images (N, H, W[, 3]) and int labels (N,).

    Images are stored as PNG bytes in an Arrow struct column, so the ``image`` column is a regular
    :class:`datasets.Image` feature (PIL on access) without a per-image PIL encode.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"Images must be uint8 to be stored as PNG, got dtype {images.dtype}.")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"Images must have shape (N, H, W) or (N, H, W, 3), got {images.shape}.")
    pngs = _encode_png_batch(images)
    image_column = pa.StructArray.from_arrays(
        [pa.array(pngs, type=pa.binary()), pa.nulls(len(pngs), type=pa.string())], names=["bytes", "path"]
    )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(label_names))})
    return datasets.Dataset.from_dict(
        {"image": image_column, "label": pa.array(np.asarray(labels, dtype=np.int64))}, features=features
    )


# ----------------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------------

_IDX_SPLIT_PREFIXES: dict[str, tuple[str, ...]] = {TRAIN_SPLIT: ("train",), VALIDATION_SPLIT: ("t10k", "test")}


def _find_idx_file(folder: Path, prefixes: Sequence[str], kind: str, ndim: int) -> Path | None:
    """Find ``{prefix}-{kind}-idx{ndim}-ubyte[.gz]`` (also ``{prefix}-{kind}.idx...``) in ``folder``."""
    for prefix in prefixes:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _is_idx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a train images IDX file (raw or gzip)."""
    return _find_idx_file(folder, _IDX_SPLIT_PREFIXES[TRAIN_SPLIT], "images", 3) is not None


def _load_idx_folder(folder: Path, label_names: Sequence[str] | None = None) -> datasets.DatasetDict:
    """Load ``train-*`` (and ``t10k-*`` as validation) IDX image/label pairs from ``folder``.

    Images (N, H, W) uint8 become grayscale PNGs (mode "L"), (N, H, W, 3) RGB PNGs. Class names are
    ``label_names`` when given, else the labels' values (renumbered 0..C-1 when they are not, with a warning).
    """
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, prefixes in _IDX_SPLIT_PREFIXES.items():
        images_path = _find_idx_file(folder, prefixes, "images", 3)
        labels_path = _find_idx_file(folder, prefixes, "labels", 1)
        if images_path is None and labels_path is None and split != TRAIN_SPLIT:
            continue
        if images_path is None or labels_path is None:
            missing = "images" if images_path is None else "labels"
            ndim = 3 if missing == "images" else 1
            raise FileNotFoundError(
                f"IDX folder {str(folder)!r} has no {split} {missing} file: expected "
                f"{prefixes[0]}-{missing}-idx{ndim}-ubyte[.gz] next to the other file."
            )
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"IDX images {str(images_path)!r} must be uint8 with shape (N, H, W) or (N, H, W, 3), "
                f"got {images.dtype} {images.shape}."
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"IDX labels {str(labels_path)!r} have shape {labels.shape} but {str(images_path)!r} holds "
                f"{len(images)} images; expected one label per image."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"IDX labels {str(labels_path)!r} must be integers, got dtype {labels.dtype}.")
        arrays[split] = (images, labels.astype(np.int64))
    if label_names is None:
        labels_by_split, label_names = _renumber_integer_labels(
            {split: labels for split, (_, labels) in arrays.items()}, "label", f"IDX folder {str(folder)!r}"
        )
        arrays = {split: (images, labels_by_split[split]) for split, (images, _) in arrays.items()}
    for split, (_, labels) in arrays.items():
        _check_label_range(labels, len(label_names), "label", f"IDX folder {str(folder)!r}", split)
    return datasets.DatasetDict(
        {split: _dataset_from_arrays(images, labels, label_names) for split, (images, labels) in arrays.items()}
    )


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _RawSource:
    """A loaded source before column mapping: its splits plus the defaults that apply to it."""

    data: datasets.DatasetDict
    description: str
    image_column: str | None = None
    label_column: str | None = None
    label_names: Sequence[str] | None = None
    validation_fraction: float | None = None


def _load_digits() -> datasets.DatasetDict:
    """scikit-learn's bundled digits: 1,797 8x8 images, values 0..16 scaled to grayscale uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    names = [str(i) for i in range(10)]
    return datasets.DatasetDict({TRAIN_SPLIT: _dataset_from_arrays(images, bunch.target, names)})


def _load_hub(hub_id: str, config_name: str | None) -> datasets.DatasetDict:
    """``datasets.load_dataset(hub_id, config_name)``; failures get a note that says how to work offline."""
    try:
        loaded = datasets.load_dataset(hub_id, config_name)
    except Exception as err:
        err.add_note(
            f"simlap_hf.data: could not load Hub data set {hub_id!r} (config {config_name!r}). Check the id "
            f"('org/name') and your network; offline, pass a local path (save_to_disk folder, parquet file or "
            f"folder, IDX folder) as --dataset_name or an imagefolder tree as --train_dir. If {hub_id!r} was meant "
            f"as a local path, it does not exist."
        )
        raise
    return _as_dataset_dict(loaded, f"Hub data set {hub_id!r}")


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


def _list_image_files(root: Path) -> list[Path]:
    """Image files under ``root`` that the imagefolder builder would pick up (hidden entries skipped)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.startswith((".", "__")) and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(directory) / name)
    return found


def _image_problem(value: Mapping[str, Any] | str | os.PathLike) -> str | None:
    """Try to decode one image (``{"bytes", "path"}`` storage or a path); return the error text or ``None``.

    JPEGs are decoded at reduced size (``draft``), which still reads the whole stream, so the check stays cheap.
    """
    try:
        if isinstance(value, Mapping):
            source: Any = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
            if source is None:
                return "neither bytes nor path is set"
        else:
            source = os.fspath(value)
        with PIL.Image.open(source) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error, ...)
        return f"{type(err).__name__}: {err}"
    return None


def _describe_image(value: Mapping[str, Any], index: int) -> str:
    """Name an image for messages: its path, else its row in the split."""
    return repr(value.get("path")) if value.get("path") else f"<embedded image bytes at row {index}>"


def _check_image_files(files: Sequence[Path], root: str) -> None:
    """Raise ValueError naming the first corrupt file among ``files`` (imagefolder, before anything is built)."""
    bad = [(path, problem) for path in files if (problem := _image_problem(path)) is not None]
    if bad:
        listed = "; ".join(f"{str(path)!r} ({problem})" for path, problem in bad[:5])
        raise ValueError(
            f"{len(bad)} unreadable image file(s) under {root!r}: {listed}. Remove or fix them, or pass "
            f"--skip_corrupt_images to skip them (the number skipped is logged)."
        )


def _load_imagefolder(args: DataArguments) -> _RawSource:
    """Load ``train_dir`` (and ``validation_dir``) through datasets' ``imagefolder`` builder.

    Image files are opened with PIL first (cheap for small images); a corrupt one raises unless
    ``skip_corrupt_images`` is set, in which case the later row-level check drops it.
    """
    dirs = {TRAIN_SPLIT: args.train_dir}
    if args.validation_dir:
        dirs[VALIDATION_SPLIT] = args.validation_dir
    data_files = {}
    for split, directory in dirs.items():
        flag = "--train_dir" if split == TRAIN_SPLIT else "--validation_dir"
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"{flag} {directory!r} does not exist or is not a directory; point it at an imagefolder tree "
                f"<dir>/<class_name>/<image files>."
            )
        files = _list_image_files(root)
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
        if not args.skip_corrupt_images:
            _check_image_files(files, directory)
        data_files[split] = os.path.join(glob.escape(str(root.resolve())), "**")
    loaded = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False)
    description = f"imagefolder {args.train_dir!r}" + (f" + {args.validation_dir!r}" if args.validation_dir else "")
    return _RawSource(_as_dataset_dict(loaded, description), description, "image", "label")


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


def _load_local_path(path: Path, name: str, spec: NamedDatasetSpec | None) -> _RawSource:
    """Load a local path: save_to_disk folder, parquet file/folder, IDX folder or imagefolder-like folder."""
    label_names = spec.label_names if spec else None
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files={TRAIN_SPLIT: str(path)})
            return _RawSource(_as_dataset_dict(loaded, f"parquet file {name!r}"), f"parquet file {name!r}")
        raise ValueError(
            f"Local file {name!r} is not a supported data set (expected a .parquet file); pass a save_to_disk "
            f"folder, a parquet file or folder, or a folder of IDX files."
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        description = f"save_to_disk folder {name!r}"
        for split in _empty_saved_splits(path):
            _check_not_empty(datasets.Dataset.from_dict({}), split, description)
        return _RawSource(_as_dataset_dict(datasets.load_from_disk(str(path)), description), description)
    if _is_idx_folder(path):
        return _RawSource(_load_idx_folder(path, label_names), f"IDX folder {name!r}", "image", "label")
    if any(path.rglob("*.parquet")):
        loaded = datasets.load_dataset("parquet", data_dir=str(path))
        description = f"parquet folder {name!r}"
        return _RawSource(_as_dataset_dict(loaded, description), description)
    raise ValueError(
        f"Local folder {name!r} holds no supported data: expected a save_to_disk folder (dataset_dict.json or "
        f"state.json), parquet files, or IDX files (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz]). "
        f"For an imagefolder tree use --train_dir."
    )


def _load_source(args: DataArguments) -> _RawSource:
    """Resolve ``args`` to a loaded source with its column / label-name / split defaults."""
    if args.train_dir:
        return _load_imagefolder(args)
    if args.validation_dir:
        raise ValueError(f"--validation_dir {args.validation_dir!r} is only used together with --train_dir.")
    name = args.dataset_name
    if not name or not name.strip():
        raise ValueError(
            f"No data given: set --dataset_name (named: {_known_names()}; a Hub id 'org/name'; or a local path) "
            f"or --train_dir."
        )
    spec = _named_spec(name)
    config = args.dataset_config_name
    label_column: str | None = None
    if spec is not None and spec.config_label_columns and config is not None:
        if config not in spec.config_label_columns:
            raise ValueError(
                f"--dataset_config_name {config!r} is not valid for {spec.name}; choose one of "
                f"{sorted(spec.config_label_columns)}."
            )
        label_column, config = spec.config_label_columns[config], None

    if spec is not None and _normalize_name(name) == spec.name:
        if spec.name == "digits":
            source = _RawSource(_load_digits(), "digits (scikit-learn)", validation_fraction=spec.validation_fraction)
        else:
            local = None
            if spec.local_dir_env or spec.local_dir_default:
                local = os.environ.get(spec.local_dir_env or "", "") or spec.local_dir_default
            if local and Path(local).is_dir() and _is_idx_folder(Path(local)):
                source = _RawSource(_load_idx_folder(Path(local), spec.label_names), f"IDX folder {local!r}")
            else:
                hub_id = spec.hub_id or spec.name
                source = _RawSource(_load_hub(hub_id, config), f"Hub data set {hub_id!r}")
        source.label_names = spec.label_names
    else:
        path = Path(name).expanduser()
        if path.exists():
            source = _load_local_path(path, name, spec)
        elif _looks_like_local_path(name):
            raise FileNotFoundError(
                f"Local data set path {name!r} does not exist; pass an existing save_to_disk folder, parquet file "
                f"or folder, or IDX folder (or a named data set: {_known_names()})."
            )
        elif "/" in name:
            source = _RawSource(_load_hub(name, config), f"Hub data set {name!r}")
        else:
            raise ValueError(
                f"Unknown --dataset_name {name!r}: it is not a named data set ({_known_names()}), not an existing "
                f"local path, and not a Hub id (Hub ids look like 'org/name', e.g. 'uoft-cs/cifar10')."
            )
    if spec is not None:
        source.image_column = source.image_column or spec.image_column
        source.label_column = label_column or spec.label_column
    return source


# ----------------------------------------------------------------------------------------------------------------
# Standard form
# ----------------------------------------------------------------------------------------------------------------


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


def _column_error(kind: str, wanted: str | None, columns: Sequence[str], description: str, flag: str) -> str:
    """Message for a missing / undetectable column that lists the columns and the fixing flag."""
    what = f"{kind} column {wanted!r} not found" if wanted else f"could not detect the {kind} column"
    return f"{description}: {what}; columns present: {list(columns)}. Set the {kind} column with {flag}."


def _resolve_image_column(ds: datasets.Dataset, wanted: str | None, description: str) -> str:
    """The image column: ``wanted`` if given, else the single Image column (or 'image'/'img')."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(_column_error("image", wanted, columns, description, "--image_column_name"))
        return wanted
    candidates = [name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        named = [name for name in ("image", "img") if name in columns]
        if named:
            return named[0]
    raise ValueError(
        _column_error("image", None, columns, description, "--image_column_name")
        + (f" Several Image columns: {candidates}." if candidates else "")
    )


def _resolve_label_column(ds: datasets.Dataset, wanted: str | None, image_column: str, description: str) -> str:
    """The label column: ``wanted`` if given, else 'label'/'labels', else the single ClassLabel."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(_column_error("label", wanted, columns, description, "--label_column_name"))
        return wanted
    for name in ("label", "labels"):
        if name in columns and name != image_column:
            return name
    class_labels = [name for name, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    raise ValueError(_column_error("label", None, columns, description, "--label_column_name"))


def _check_label_range(values: np.ndarray, num_classes: int, column: str, description: str, split: str) -> None:
    """Raise ValueError naming the column, the first bad value and the valid range [0, num_classes)."""
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{description}, split {split!r}: label column {column!r} has value {int(bad[0])} outside the valid "
            f"range [0, {num_classes}) ({bad.size} bad value(s)). Fix the labels or choose another column with "
            f"--label_column_name."
        )


def _label_values(ds: datasets.Dataset) -> pa.ChunkedArray:
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


def _standardize_labels(
    data: datasets.DatasetDict, column: str, label_names: Sequence[str] | None, description: str
) -> datasets.DatasetDict:
    """Turn the ``label`` column of every split into a ClassLabel shared by all splits.

    ClassLabel -> kept (values range-checked); integers -> names ``label_names``, or without names the sorted
    distinct values renumbered 0..C-1 and named by their value (:func:`_renumber_integer_labels`); strings -> sorted
    unique names, mapped to their index.
    """
    first = next(iter(data.values()))
    feature = first.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        for split, ds in data.items():
            values = _integer_labels(_label_values(ds), column, description, split)
            _check_label_range(values, feature.num_classes, column, description, split)
        return data
    arrays = {split: _label_values(ds) for split, ds in data.items()}
    if all(pa.types.is_string(a.type) or pa.types.is_large_string(a.type) for a in arrays.values()):
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
    else:
        converted = {split: _integer_labels(a, column, description, split) for split, a in arrays.items()}
        if label_names is not None:
            names = list(label_names)
        else:
            converted, names = _renumber_integer_labels(converted, column, description)
        for split, values in converted.items():
            _check_label_range(values, len(names), column, description, split)
    class_label = datasets.ClassLabel(names=names)
    return datasets.DatasetDict(
        {
            split: ds.remove_columns("label").add_column("label", converted[split], feature=class_label)
            for split, ds in data.items()
        }
    )


def _renumber_integer_labels(
    labels: dict[str, np.ndarray], column: str, description: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class ids for integer labels without class names: the sorted distinct values become 0..C-1 and each class is
    named by its original value. Values that are already 0..C-1 stay as they are; any other set (starting above 0,
    with gaps, negative) is renumbered with a warning that gives the mapping, so that no class is ever empty."""
    values = np.unique(np.concatenate([v for v in labels.values() if v.size] or [np.zeros(0, np.int64)]))
    if values.size and values[0] < 0:  # negative ids usually mark unlabelled images
        for split, split_values in labels.items():
            _check_label_range(split_values, int(values[-1]) + 1, column, description, split)
    names = [str(int(v)) for v in values]
    if values.size and (values[0] != 0 or values[-1] != values.size - 1):
        shown = ", ".join(f"{int(v)}->{i}" for i, v in enumerate(values[:12])) + (", ..." if values.size > 12 else "")
        logger.warning(
            "%s: label column %r holds %d distinct integer ids that are not 0..%d (%s); they are renumbered %s "
            "and the classes are named by their original ids. Give the column class names (a ClassLabel) to "
            "choose the order yourself.", description, column, values.size, values.size - 1,
            f"starting at {int(values[0])}" if values[0] != 0 else "with gaps", shown,
        )
        labels = {split: np.searchsorted(values, v).astype(np.int64) for split, v in labels.items()}
    return labels, names


def _warn_classes_missing_from_a_split(data: datasets.DatasetDict, description: str) -> None:
    """Warn, naming the classes, when a class has no training images (the model can never learn it; its validation
    images are all errors) or no validation images (it is never evaluated)."""
    names = get_label_names(data)
    present = {split: set(np.unique(_label_values(ds).to_numpy()).tolist()) for split, ds in data.items()}
    everything = set(range(len(names)))
    for split, other in ((TRAIN_SPLIT, VALIDATION_SPLIT), (VALIDATION_SPLIT, TRAIN_SPLIT)):
        missing = sorted(everything - present[split])
        if not missing:
            continue
        also = sorted(set(missing) & present[other])
        shown = ", ".join(repr(names[i]) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        consequence = ("the model cannot learn them" if split == TRAIN_SPLIT else "they are never evaluated")
        logger.warning(
            "%s: %d of %d class(es) have no %s images: %s (%d of them appear in %s); %s. Check the labels, "
            "--max_train_samples / --max_eval_samples and --train_val_split.", description, len(missing),
            len(names), split, shown, len(also), other, consequence,
        )


def _standardize_columns(source: _RawSource, args: DataArguments) -> datasets.DatasetDict:
    """The one column-mapping path: pick image/label columns, rename them, make ``label`` a ClassLabel."""
    data = _pick_splits(source.data, source.description)
    train = data[TRAIN_SPLIT]
    image_column = _resolve_image_column(train, args.image_column_name or source.image_column, source.description)
    label_column = _resolve_label_column(
        train, args.label_column_name or source.label_column, image_column, source.description
    )
    if image_column == label_column:
        raise ValueError(
            f"{source.description}: image and label column are both {image_column!r}; set distinct "
            f"--image_column_name and --label_column_name."
        )
    standard = {}
    for split, ds in data.items():
        _check_not_empty(ds, split, source.description)
        for kind, column in (("image", image_column), ("label", label_column)):
            if column not in ds.column_names:
                where = f"{source.description} (split {split!r})"
                raise ValueError(_column_error(kind, column, ds.column_names, where, f"--{kind}_column_name"))
        ds = ds.select_columns([image_column, label_column])
        ds = ds.rename_columns({image_column: "image", label_column: "label"})
        if not isinstance(ds.features["image"], datasets.Image):
            try:
                ds = ds.cast_column("image", datasets.Image())
            except Exception as err:
                raise ValueError(
                    f"{source.description}: column {image_column!r} ({ds.features['image']}) is not an image "
                    f"column and cannot be read as one; choose the image column with --image_column_name."
                ) from err
        standard[split] = ds
    return _standardize_labels(datasets.DatasetDict(standard), label_column, source.label_names, source.description)


def _check_not_empty(ds: datasets.Dataset, split: str, description: str) -> None:
    """Raise ValueError naming the split when ``ds`` has no rows."""
    if len(ds) == 0:
        raise ValueError(
            f"{description}: split {split!r} is empty; every split needs images (check the source, "
            f"--train_val_split and --skip_corrupt_images)."
        )


def _drop_corrupt_rows(data: datasets.DatasetDict) -> datasets.DatasetDict:
    """Decode every image once and drop the rows that fail; log how many were skipped per split."""
    kept = {}
    for split, ds in data.items():
        storage = ds.with_format("arrow")["image"]
        bad: list[tuple[int, str]] = []
        index = 0
        for chunk in storage.chunks:
            for value in chunk.to_pylist():
                if _image_problem(value) is not None:
                    bad.append((index, _describe_image(value, index)))
                index += 1
        if bad:
            logger.warning(
                "Skipped %d corrupt image(s) in split %r (skip_corrupt_images=True), e.g. %s",
                len(bad),
                split,
                ", ".join(name for _, name in bad[:5]),
            )
            bad_rows = {i for i, _ in bad}
            ds = ds.select([i for i in range(len(ds)) if i not in bad_rows], keep_in_memory=True)
        kept[split] = ds
    return datasets.DatasetDict(kept)


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
    labels = np.asarray(_label_values(train).to_numpy())
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
          (:func:`with_image_transforms`). With ``skip_corrupt_images=True`` every image of every source is
          decoded once at load time, failing rows are dropped and their number is logged (WARNING, logger
          ``simlap_hf.data``) per split.
        * Nothing is written to disk except the ``datasets`` cache of builders (imagefolder, parquet, Hub).

    Raises:
        ValueError / FileNotFoundError: unknown name, missing path, missing column, bad labels, empty split,
        corrupt image; each message names the bad value and the flag that fixes it.
    """
    source = _load_source(args)
    data = _standardize_columns(source, args)
    if args.skip_corrupt_images:
        data = _drop_corrupt_rows(data)
    if VALIDATION_SPLIT not in data:
        fraction = source.validation_fraction if source.validation_fraction is not None else args.train_val_split
        _check_not_empty(data[TRAIN_SPLIT], TRAIN_SPLIT, source.description)
        data = _carve_validation(data[TRAIN_SPLIT], fraction, seed, source.description)
    limits = {TRAIN_SPLIT: args.max_train_samples, VALIDATION_SPLIT: args.max_eval_samples}
    result = {}
    for split in (TRAIN_SPLIT, VALIDATION_SPLIT):
        ds = data[split]
        _check_not_empty(ds, split, source.description)
        limit = limits[split]
        if limit is not None and limit < len(ds):
            order = np.random.default_rng(seed).permutation(len(ds))[:limit]
            ds = ds.select(order, keep_in_memory=True)
        result[split] = ds
    result = datasets.DatasetDict(result)
    _warn_classes_missing_from_a_split(result, source.description)
    return result


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


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


def resolve_mean_std(args: DataArguments) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics: explicit ``args.mean`` / ``args.std`` win, each on its own.

    Defaults: the named data set's values (CIFAR-10/100 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616);
    fashion_mnist 0.2860 / 0.3530 and digits 0.3053 / 0.3759, replicated to 3 channels); any other source
    (local paths, ``train_dir``, other Hub ids) gets timm's ImageNet defaults.

    Returns:
        ``(mean, std)``: tuples of 3 values (or 1 value when given so explicitly).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    spec = None if args.train_dir else _named_spec(args.dataset_name)
    default_mean = spec.mean if spec else IMAGENET_DEFAULT_MEAN
    default_std = spec.std if spec else IMAGENET_DEFAULT_STD
    mean = tuple(float(v) for v in args.mean) if args.mean is not None else tuple(default_mean)
    std = tuple(float(v) for v in args.std) if args.std is not None else tuple(default_std)
    return mean, std


def _stats_for_channels(values: tuple[float, ...], num_channels: int, what: str) -> tuple[float, ...]:
    """Adapt mean/std to ``num_channels``: replicate 1 value, average 3 values for 1 channel."""
    if len(values) == num_channels:
        return values
    if len(values) == 1:
        return values * num_channels
    if num_channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} values but the images have {num_channels} channels.")


def _auto_augment(policy: str | None) -> str | None:
    """The timm policy string, or ``None`` when disabled (None, '', 'none', 'null')."""
    if policy is None or policy.strip().lower() in ("", "none", "null"):
        return None
    return policy


class ConvertImageMode:
    """Convert a PIL image to ``"L"`` (``num_channels=1``) or ``"RGB"`` (``num_channels=3``).

    Palette images go through RGBA so transparency is resolved before dropping alpha.
    """

    def __init__(self, num_channels: int = 3) -> None:
        """``num_channels``: 1 (-> mode 'L') or 3 (-> mode 'RGB')."""
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        self.mode = "L" if num_channels == 1 else "RGB"

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """Return ``image`` in the target mode (unchanged when already in it)."""
        if image.mode == self.mode:
            return image
        if image.mode == "P":
            image = image.convert("RGBA")
        return image.convert(self.mode)

    def __repr__(self) -> str:
        """Readable form, shown inside the composed transform's repr."""
        return f"{type(self).__name__}(mode={self.mode!r})"


class UInt8RandomErasing:
    """Random erasing of one rectangle of a (C, H, W) uint8 image, filled with a constant colour (the mean, so that
    it normalises to 0 like timm's ``RandomErasing(mode='const')`` of a normalised image).

    With probability ``probability``: an area of 2% to 1/3 of the image and an aspect ratio log-uniform in
    (0.3, 1/0.3), up to 10 tries to fit it. Draws from Python's ``random`` (the loader's resumable state).
    """

    def __init__(self, probability: float, fill: Sequence[int], min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3) -> None:
        self.probability = probability
        self.fill = torch.tensor(list(fill), dtype=torch.uint8).view(-1, 1, 1)
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (np.log(min_aspect), np.log(1 / min_aspect))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.probability <= 0 or random.random() > self.probability:
            return image
        _, height, width = image.shape
        for _ in range(10):
            area = random.uniform(self.min_area, self.max_area) * height * width
            aspect = float(np.exp(random.uniform(*self.log_aspect)))
            h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
            if 0 < h < height and 0 < w < width:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                image = image.clone()
                image[:, top : top + h, left : left + w] = self.fill
                return image
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, fill={self.fill.flatten().tolist()})"


class TrainNormalizer:
    """On the device: (B, C, H, W) uint8 training batches -> float32 ``(x / 255 - mean) / std``, the same operations
    (and so the same values) as ToTensor + Normalize in the loader. Float batches pass unchanged."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.is_floating_point():
            return pixel_values
        if self.mean.device != pixel_values.device:
            self.mean, self.std = self.mean.to(pixel_values.device), self.std.to(pixel_values.device)
        return pixel_values.to(torch.float32).div(255).sub(self.mean).div(self.std)


def create_train_normalizer(args: DataArguments, num_channels: int = 3) -> TrainNormalizer | None:
    """The device-side normalisation of uint8 training batches, or None when the loader normalises."""
    if not args.uint8_transfer:
        return None
    mean, std = resolve_mean_std(args)
    return TrainNormalizer(_stats_for_channels(mean, num_channels, "mean"), _stats_for_channels(std, num_channels,
                                                                                                  "std"))


class _Compose:
    """Picklable composition of callables (used so DataLoader workers can receive the transform)."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        """``steps``: callables applied in order."""
        self.steps = list(steps)

    def __call__(self, value: Any) -> Any:
        """Apply every step in order."""
        for step in self.steps:
            value = step(value)
        return value

    def __repr__(self) -> str:
        """Readable form listing the steps."""
        return "Compose(" + ", ".join(repr(step) for step in self.steps) + ")"


def create_train_transform(args: DataArguments, num_channels: int = 3) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Training augmentation: mode conversion, then timm's ``create_transform(is_training=True)``.

    RandomResizedCrop(input_size, scale, ratio, interpolation) -> horizontal flip -> RandAugment (``args.aa``)
    -> ToTensor -> Normalize -> RandomErasing(``args.reprob``). Color jitter only when ``args.color_jitter``
    is set and ``aa`` is disabled. With ``args.uint8_transfer`` the result stays uint8 (no ToTensor scaling, no
    Normalize; the erased rectangle gets the mean colour, which normalises to 0 as timm's erasing) and
    :class:`TrainNormalizer` finishes it on the device.

    Returns:
        A callable mapping any PIL image to a tensor of shape (num_channels, input_size, input_size): float32, or
        uint8 with ``args.uint8_transfer``.
    """
    from timm.data import create_transform

    mean, std = resolve_mean_std(args)
    mean, std = _stats_for_channels(mean, num_channels, "mean"), _stats_for_channels(std, num_channels, "std")
    # uint8: timm stops before ToTensor/Normalize (mean still sets RandAugment's fill) and erasing is done here.
    finish = {"normalize": False} if args.uint8_transfer else {"re_prob": args.reprob}
    timm_transform = create_transform(
        input_size=args.input_size,
        is_training=True,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter if args.color_jitter else None,
        auto_augment=_auto_augment(args.aa),
        interpolation=args.interpolation,
        mean=mean,
        std=std,
        **finish,
    )
    steps = [ConvertImageMode(num_channels), timm_transform]
    if args.uint8_transfer and args.reprob > 0:
        steps.append(UInt8RandomErasing(args.reprob, tuple(round(255 * value) for value in mean)))
    return _Compose(steps)


def create_eval_transform(args: DataArguments, num_channels: int = 3) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Deterministic evaluation transform: mode conversion, Resize(input_size / crop_pct) + CenterCrop(input_size).

    For input 32 and crop_pct 0.875: Resize(36, bicubic) -> CenterCrop(32) -> ToTensor -> Normalize.

    Returns:
        A callable mapping any PIL image to a float tensor of shape (num_channels, input_size, input_size).
    """
    from timm.data import create_transform

    mean, std = resolve_mean_std(args)
    timm_transform = create_transform(
        input_size=args.input_size,
        is_training=False,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=_stats_for_channels(mean, num_channels, "mean"),
        std=_stats_for_channels(std, num_channels, "std"),
    )
    return _Compose([ConvertImageMode(num_channels), timm_transform])


_IMAGE_DECODER = datasets.Image()


def _decode_image(value: Any, index: int) -> PIL.Image.Image:
    """Decode one ``{"bytes", "path"}`` image value; ValueError naming the file (or row) when that fails."""
    if isinstance(value, PIL.Image.Image):
        return value
    try:
        return _IMAGE_DECODER.decode_example(value)
    except Exception as err:
        where = _describe_image(value, index) if isinstance(value, Mapping) else repr(value)
        raise ValueError(
            f"Could not decode image {where}: {type(err).__name__}: {err}. Fix or remove it, or reload the data "
            f"with --skip_corrupt_images to drop undecodable images."
        ) from err


def _image_key(value: Any) -> Any:
    """What identifies a stored image (its path and bytes), or None when it cannot be told apart cheaply."""
    if isinstance(value, Mapping):
        return value.get("path"), value.get("bytes")
    return None


class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: ``{"image", "label"}`` -> ``{"pixel_values", "labels"}``.

    ``pixel_values`` is a list of float tensors (C, H, W); ``labels`` a list of ints. With ``decode_once`` (default),
    an image that appears several times in the batch (its repeated-augmentation copies, which the training sampler
    puts in one batch) is decoded once and augmented once per copy.
    """

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor], decode_once: bool = True) -> None:
        """``transform``: PIL image -> FloatTensor(C, H, W)."""
        self.transform = transform
        self.decode_once = decode_once

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Decode and transform a batch of rows (lists of equal length B)."""
        decoded: dict[Any, PIL.Image.Image] = {}
        images = []
        for index, value in enumerate(batch["image"]):
            key = _image_key(value) if self.decode_once else None
            image = decoded.get(key) if key is not None else None
            if image is None:
                image = _decode_image(value, index)
                if key is not None:
                    image.load()  # decode now, once, rather than lazily in each copy's first operation
                    decoded[key] = image
            images.append(image)
        return {
            "pixel_values": [self.transform(image) for image in images],
            "labels": [int(label) for label in batch["label"]],
        }


def with_image_transforms(
    dataset: datasets.DatasetDict, args: DataArguments, num_channels: int = 3
) -> datasets.DatasetDict:
    """Attach lazy transforms: ``train`` gets the training augmentation, every other split the eval transform.

    Rows become ``{"pixel_values": FloatTensor(num_channels, input_size, input_size), "labels": int}``. The
    image column is switched to ``Image(decode=False)`` (metadata only) so that decoding happens here and an
    undecodable image raises a ValueError naming its file.
    """
    train_transform = create_train_transform(args, num_channels)
    eval_transform = create_eval_transform(args, num_channels)
    out = {}
    for split, ds in dataset.items():
        transform = train_transform if split == TRAIN_SPLIT else eval_transform
        raw = ds.cast_column("image", datasets.Image(decode=False))
        out[split] = raw.with_transform(ImageTransform(transform))
    return datasets.DatasetDict(out)


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows into ``{"pixel_values": (B, C, H, W), "labels": LongTensor(B)}``: float32, or uint8 samples kept
    as uint8 (normalised on the device by :class:`TrainNormalizer`); other dtypes become float32."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    if not pixel_values.is_floating_point() and pixel_values.dtype != torch.uint8:
        pixel_values = pixel_values.float()
    labels = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.int64)
    return {"pixel_values": pixel_values, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------
# Sampling and loaders
# ----------------------------------------------------------------------------------------------------------------


class ResumableAugmentations(torch.utils.data.Dataset):
    """The training set, with the random state before each batch's augmentations remembered so that a mid-epoch
    resume draws the same augmentations as an uninterrupted run.

    Rows are those of ``dataset`` unchanged.

    The loader fetches a batch ahead of the one being trained, so when a checkpoint is written after batch ``k``
    the global RNGs (Python, NumPy, torch) have already been advanced by the augmentations of batch ``k + 1``; a
    resumed run would draw them again from there. With :meth:`state_before_batch` saved in the checkpoint and
    :meth:`resume_at` called on resume, the first fetched batch is augmented from the remembered state and the
    checkpoint's state is put back afterwards, which is exactly where the uninterrupted run stood.
    Only with ``dataloader_num_workers=0``: worker processes draw from their own generators.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, keep: int = 4) -> None:
        self.dataset = dataset
        self.keep = keep
        self._states: dict[int, dict[str, Any]] = {}
        self._next_batch = 0
        self._pending: tuple[dict[str, Any], dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """One training batch; called once per batch by the DataLoader."""
        after = None
        if self._pending is not None:
            state, after = self._pending
            restore_rng_state(state)
            self._pending = None
        else:
            state = capture_rng_state()
        self._states[self._next_batch] = state
        self._states.pop(self._next_batch - self.keep, None)
        self._next_batch += 1
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        if after is not None:
            restore_rng_state(after)
        return rows

    def start_epoch(self, first_batch: int = 0) -> None:
        """Number the coming fetches from ``first_batch`` (the batches a resumed epoch skips are not fetched)."""
        self._next_batch = first_batch
        self._states.clear()
        self._pending = None

    def state_before_batch(self, index: int) -> dict[str, Any] | None:
        """The RNG states before batch ``index`` (0-based, in this epoch) was augmented, if it was fetched here."""
        return self._states.get(index)

    def resume_at(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Augment the next fetched batch from ``before`` (what :meth:`state_before_batch` gave the stopped run),
        then continue from ``after`` (the states the checkpoint restored)."""
        self._pending = (before, after)


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU) global random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def create_train_dataloader(
    train_dataset: torch.utils.data.Dataset, args: DataArguments, batch_size: int, seed: int = 42
) -> DataLoader:
    """Training loader: :class:`RepeatedAugmentationBatchSampler` (any ``batch_size``, each image ``ra`` times with
    all its copies in one batch), or with ``args.sampler == "pk"`` :class:`ClassBalancedBatchSampler` (P classes x
    K images per batch, same copies), + :func:`collate_fn`.

    Batches are ``{"pixel_values": FloatTensor(batch_size, C, H, W), "labels": LongTensor(batch_size)}``.
    The image-order sampler stays reachable as ``loader.batch_sampler.sampler`` (accelerate forwards ``set_epoch``
    there).

    Raises:
        ValueError: ``batch_size`` is not positive, or the data is too small for one full batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if args.sampler == "pk":
        labels = _label_values(train_dataset).to_numpy() if isinstance(train_dataset, datasets.Dataset) else [
            int(train_dataset[i]["labels"]) for i in range(len(train_dataset))]
        batch_sampler = ClassBalancedBatchSampler(labels, batch_size, images_per_class=args.pk_images_per_class,
                                                  repeats=args.ra, seed=seed)
    else:
        batch_sampler = RepeatedAugmentationBatchSampler(len(train_dataset), batch_size, repeats=args.ra, seed=seed)
    if len(batch_sampler) == 0:
        raise ValueError(
            f"The training set has {len(train_dataset)} images, fewer than the {batch_sampler.images_per_batch} "
            f"images of one batch (batch_size={batch_size} with ra={args.ra}); lower --per_device_train_batch_size."
        )
    workers = args.dataloader_num_workers
    return DataLoader(
        ResumableAugmentations(train_dataset) if workers == 0 else train_dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def create_eval_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential evaluation loader (all rows, last batch may be short) with :func:`collate_fn`.

    Batches are ``{"pixel_values": FloatTensor(B, C, H, W), "labels": LongTensor(B)}`` with B <= batch_size.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
