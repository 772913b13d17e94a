"""Images in the standard form: PNG encoding of arrays, decoding, and the checks for images that do not decode."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

if TYPE_CHECKING:  # imported where used: decoding and the checks work without datasets (see .arrays)
    import datasets

__all__ = [
    "EAGER_CHECK_MAX_IMAGES",
    "check_image_files",
    "checked_at_load",
    "dataset_from_arrays",
    "decode_image",
    "describe_image",
    "drop_corrupt_rows",
    "image_file_checks_done",
    "image_key",
    "image_problem",
    "list_image_files",
]

logger = logging.getLogger(__package__)

# An image folder (--train_dir, --validation_dir) or a split of a loaded source with at most this many images is
# decoded image by image when the data is loaded, so that unreadable files are named before training; a larger one is
# not (a million images would take hours) and an unreadable image is reported when training meets it.
EAGER_CHECK_MAX_IMAGES = 10_000


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


def dataset_from_arrays(images: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> datasets.Dataset:
    """Build an in-memory standard-form split from uint8 images (N, H, W[, 3]) and int labels (N,).

    Images are stored as PNG bytes in an Arrow struct column, so the ``image`` column is a regular
    :class:`datasets.Image` feature (PIL on access) without a per-image PIL encode.
    """
    import datasets
    import pyarrow as pa

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


def list_image_files(root: Path) -> list[Path]:
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


def image_problem(value: Mapping[str, Any] | str | os.PathLike) -> str | None:
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


def describe_image(value: Mapping[str, Any], index: int) -> str:
    """Name an image for messages: its path, else its row in the split."""
    return repr(value.get("path")) if value.get("path") else f"<embedded image bytes at row {index}>"


_CHECKS_DONE = threading.local()


@contextlib.contextmanager
def image_file_checks_done() -> Iterator[None]:
    """Within this block :func:`check_image_files` checks nothing: another process of the machine has just run the
    same checks on the same files (decoding every image once per machine, not once per process)."""
    _CHECKS_DONE.active = True
    try:
        yield
    finally:
        _CHECKS_DONE.active = False


def checked_at_load(count: int, where: str, skip_corrupt_images: bool) -> bool:
    """Whether the ``count`` images of ``where`` are decoded when the data is loaded (at most
    :data:`EAGER_CHECK_MAX_IMAGES`); when they are not, a log line (INFO) says so and what happens to an unreadable
    image."""
    if count <= EAGER_CHECK_MAX_IMAGES:
        return True
    if skip_corrupt_images:
        when_met = "is replaced in its batch by another image of that batch and named in a warning"
    else:
        when_met = "stops the run with an error naming it (--skip_corrupt_images skips it instead)"
    logger.info(
        "%s holds %d images, more than %d: they are not decoded before training; an unreadable image %s when it is "
        "met.",
        where,
        count,
        EAGER_CHECK_MAX_IMAGES,
        when_met,
    )
    return False


def check_image_files(files: Sequence[Path], root: str) -> None:
    """Raise ValueError naming the corrupt files among ``files`` (imagefolder, before anything is built); only when
    there are at most :data:`EAGER_CHECK_MAX_IMAGES` of them (see :func:`checked_at_load`)."""
    if getattr(_CHECKS_DONE, "active", False) or not checked_at_load(len(files), f"Image folder {root!r}", False):
        return
    bad = [(path, problem) for path in files if (problem := image_problem(path)) is not None]
    if bad:
        listed = "; ".join(f"{str(path)!r} ({problem})" for path, problem in bad[:5])
        raise ValueError(
            f"{len(bad)} unreadable image file(s) under {root!r}: {listed}. Remove or fix them, or pass "
            f"--skip_corrupt_images to skip them (the number skipped is logged)."
        )


def drop_corrupt_rows(data: datasets.DatasetDict, description: str = "the data") -> datasets.DatasetDict:
    """Decode every image once and drop the rows that fail; log how many were skipped per split. A split of more
    than :data:`EAGER_CHECK_MAX_IMAGES` images is kept as it is (see :func:`checked_at_load`)."""
    import datasets

    kept = {}
    for split, ds in data.items():
        if not checked_at_load(len(ds), f"{description}, split {split!r},", True):
            kept[split] = ds
            continue
        storage = ds.with_format("arrow")["image"]
        bad: list[tuple[int, str]] = []
        index = 0
        for chunk in storage.chunks:
            for value in chunk.to_pylist():
                if image_problem(value) is not None:
                    bad.append((index, describe_image(value, index)))
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


@functools.cache
def _image_feature() -> datasets.Image:
    """``datasets.Image()``, built once, on the first image decoded (``datasets`` is imported only then)."""
    import datasets

    return datasets.Image()


def _decode_stored(value: Any) -> PIL.Image.Image:
    """A stored image value as ``datasets.Image`` decodes it (PIL image, file opened lazily)."""
    return _image_feature().decode_example(value)


def decode_image(value: Any, index: int) -> PIL.Image.Image:
    """Decode one ``{"bytes", "path"}`` image value; ValueError naming the file (or row) when that fails."""
    if isinstance(value, PIL.Image.Image):
        return value
    try:
        return _decode_stored(value)
    except Exception as err:
        where = describe_image(value, index) if isinstance(value, Mapping) else repr(value)
        raise ValueError(
            f"Could not decode image {where}: {type(err).__name__}: {err}. Fix or remove it, or pass "
            f"--skip_corrupt_images to skip undecodable images (each one skipped is logged)."
        ) from err


def image_key(value: Any) -> Any:
    """What identifies a stored image (its path and bytes), or None when it cannot be told apart cheaply."""
    if isinstance(value, Mapping):
        return value.get("path"), value.get("bytes")
    return None
