"""IDX files (the MNIST / Fashion-MNIST format): finding them in a folder and reading them, with numpy alone.

Kept free of the ``datasets`` library so that scripts running where only torch is installed can use it too
(``simlap_hf.data.sources`` builds data sets from what it reads).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .arguments import TRAIN_SPLIT, VALIDATION_SPLIT

__all__ = ["IDX_SPLIT_PREFIXES", "find_idx_file", "is_idx_folder", "read_idx", "read_idx_folder"]

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# File name prefixes of each split, in order of preference (MNIST calls its test split "t10k").
IDX_SPLIT_PREFIXES: dict[str, tuple[str, ...]] = {TRAIN_SPLIT: ("train",), VALIDATION_SPLIT: ("t10k", "test")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw (detected from the content).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the big-endian data.

    Returns:
        An array of shape ``dims`` in native byte order (e.g. (60000, 28, 28) uint8 for images, (60000,) for labels).

    Raises:
        ValueError: the file is not a valid IDX file (bad magic number, unknown type, wrong size), naming the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"Could not read IDX file {path!r}: {err}.") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path!r} is not an IDX file: magic number {data[:4].hex() or '<empty>'} should be 0000TTDD with "
            f"type TT in {sorted(hex(k) for k in _IDX_DTYPES)}."
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"IDX file {path!r} is truncated in its header ({ndim} dimensions announced).")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    count = math.prod(dims)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"IDX file {path!r} holds {len(data) - offset} data bytes but its header {dims} announces "
            f"{count * dtype.itemsize}; the file is truncated or corrupt."
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def find_idx_file(folder: Path, prefixes: Sequence[str], kind: str, ndim: int) -> Path | None:
    """Find ``{prefix}-{kind}-idx{ndim}-ubyte[.gz]`` (also ``{prefix}-{kind}.idx...``) in ``folder``.

    For example ``find_idx_file(folder, ("t10k", "test"), "labels", 1)`` finds ``t10k-labels-idx1-ubyte.gz``.
    """
    for prefix in prefixes:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def is_idx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a train images IDX file (raw or gzip)."""
    return find_idx_file(folder, IDX_SPLIT_PREFIXES[TRAIN_SPLIT], "images", 3) is not None


def _read_split(
    folder: Path, split: str, images_path: Path | None, labels_path: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W[, 3]) uint8 and labels (N,) int64 of one split, checked against each other."""
    if images_path is None or labels_path is None:
        missing = "images" if images_path is None else "labels"
        ndim = 3 if missing == "images" else 1
        raise FileNotFoundError(
            f"IDX folder {str(folder)!r} has no {split} {missing} file: expected "
            f"{IDX_SPLIT_PREFIXES[split][0]}-{missing}-idx{ndim}-ubyte[.gz] next to the other file."
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
    return images, labels.astype(np.int64)


def read_idx_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the ``train-*`` (and ``t10k-*`` / ``test-*``, as ``validation``) image/label pairs of ``folder``.

    Returns:
        ``{split: (images, labels)}``: images (N, H, W) or (N, H, W, 3) uint8, labels (N,) int64. The train split
        is always there; the validation split only when its files are.

    Raises:
        FileNotFoundError: a split has one file of the pair but not the other (or no train files at all).
        ValueError: a file is not valid IDX, or images and labels do not match.
    """
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, prefixes in IDX_SPLIT_PREFIXES.items():
        images_path = find_idx_file(folder, prefixes, "images", 3)
        labels_path = find_idx_file(folder, prefixes, "labels", 1)
        if images_path is None and labels_path is None and split != TRAIN_SPLIT:
            continue
        arrays[split] = _read_split(folder, split, images_path, labels_path)
    return arrays
