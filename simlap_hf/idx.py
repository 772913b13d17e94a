"""IDX files (the MNIST / Fashion-MNIST format), read with numpy alone.

Kept free of the ``datasets`` library so that scripts running where only torch is installed can use it too
(``simlap_hf.data`` builds data sets from it).
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

__all__ = ["read_idx"]

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
