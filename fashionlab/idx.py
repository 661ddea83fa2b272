"""The IDX file format: strict parsing, reading and writing, raw or gzip-compressed.

An IDX file is 2 zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
dimension, then the data in C order, big-endian. A name ending in .gz means gzip-compressed.
Every malformed input is a one-line DataError naming the file.

    >>> write_idx("labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    >>> read_idx("labels-idx1-ubyte.gz", ndim=1)
    array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=uint8)
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TypeAlias

import numpy as np

from fashionlab.errors import DataError

__all__ = [
    "TruncatedGzip",
    "gunzip",
    "idx_shape",
    "looks_like_idx",
    "parse_idx",
    "read_decompressed",
    "read_idx",
    "read_idx_bytes",
    "write_idx",
]

PathLike: TypeAlias = "str | os.PathLike[str]"

_LONGEST_HEADER = 4 + 4 * 255  # the magic number, and 255 dimensions of 4 bytes

_IDX_DTYPES: Mapping[int, np.dtype] = MappingProxyType({
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
})  # fmt: skip


def looks_like_idx(head: bytes) -> bool:
    """Whether a file's first 4 bytes are an IDX header: two zero bytes, a known dtype code and
    at least one dimension. (Other formats start with two zero bytes too: AVIF, JPEG 2000,
    ICO, TGA.)"""
    return len(head) >= 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and head[3] > 0


def parse_idx(data: bytes | bytearray, *, source: PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse the bytes of an IDX file strictly; `source` names the file in errors.

    Multi-byte data comes back in native byte order; the array shares `data`'s buffer otherwise.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated: {len(data)} bytes, less than the IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source}: not an IDX file (magic number 0x{bytes(data[:4]).hex()} "
            "does not start with two zero bytes)")
    code, n_dims = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x} {d.name}" for c, d in _IDX_DTYPES.items())
        raise DataError(f"{source}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    if n_dims == 0 or (ndim is not None and n_dims != ndim):
        raise DataError(f"{source}: has {n_dims} dimensions, expected {ndim or 'at least 1'}")
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise DataError(f"{source}: truncated: {len(data)} bytes, less than its {header}-byte header")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=n_dims, offset=4))
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected, present = count * dtype.itemsize, len(data) - header
    if present != expected:
        problem = "truncated" if present < expected else "trailing bytes"
        raise DataError(
            f"{source}: {problem}: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes) but {present} bytes follow it")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))  # torch and arithmetic want native order
    return array


def read_idx(path: PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (name ending in .gz). A compressed one is
    decompressed no further than its header declares: a small file of zeros after a short
    header is "trailing bytes" before it fills the memory."""
    return parse_idx(read_idx_bytes(path), source=path, ndim=ndim)


def read_idx_bytes(path: PathLike) -> bytearray:
    """An IDX file's bytes, decompressed (a .gz) no further than its header declares, or than
    the longest header where it has none: a DataError ("trailing bytes") for more."""
    path = Path(path)
    compressed = path.name.endswith(".gz")
    declared = _declared_bytes(path) if compressed else None
    # Without a valid header, no more than the longest header: enough for parse_idx to say
    # what is wrong with it, however much the file would unpack to.
    limit = declared if declared is not None or not compressed else _LONGEST_HEADER
    data = read_decompressed(path, limit=limit)
    if declared is not None and len(data) > declared:
        raise DataError(f"{path}: trailing bytes: decompresses to more than the {declared} "
                        "bytes its header declares")
    return data


def _declared_bytes(path: Path) -> int | None:
    """The size of the IDX file its header declares (header and data), or None."""
    header = _read_header(path)
    if header is None:
        return None
    dtype, shape = header
    return 4 + 4 * len(shape) + math.prod(shape) * dtype.itemsize


def idx_shape(path: PathLike) -> tuple[int, ...] | None:
    """The shape an IDX file's header declares (raw or .gz), read without its data: how much
    memory reading it would take, known before it is taken. None when there is no valid
    header to read (`read_idx` says why)."""
    header = _read_header(Path(path))
    return None if header is None else header[1]


def _read_header(path: Path) -> tuple[np.dtype, tuple[int, ...]] | None:
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(4)
            if not looks_like_idx(head):
                return None
            dims = f.read(4 * head[3])
    except (OSError, EOFError, zlib.error):
        return None
    if len(dims) < 4 * head[3]:
        return None
    return _IDX_DTYPES[head[2]], tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzip-compressed when the name ends in .gz."""
    array = np.asarray(array)
    code = next((c for c, d in _IDX_DTYPES.items()
                 if (d.kind, d.itemsize) == (array.dtype.kind, array.dtype.itemsize)), None)
    if code is None:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same array, same bytes
    Path(path).write_bytes(payload)


def read_decompressed(path: Path, *, limit: int | None = None,
                      size: int | None = None) -> bytearray:
    """The file's bytes, gunzipped when the name ends in .gz, in a writable buffer so that
    arrays over it are writable. A missing or unreadable file is a DataError naming it.
    `limit`: decompress at most one byte more than this (enough to tell a longer stream).
    `size`: the bytes it must decompress to (a checksum's): decompressing more is a checksum
    mismatch, said before the memory fills."""
    try:
        with open(path, "rb") as f:
            if not path.name.endswith(".gz"):
                buffer = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buffer)
                return buffer
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    return bytearray(gunzip(raw, source=path, size=size, limit=limit))


class TruncatedGzip(DataError):
    """Gzip data that end before their stream does: a file cut short, or a download whose
    connection dropped (which a retry may mend)."""


def gunzip(raw: bytes, *, source: PathLike, size: int | None = None,
           limit: int | None = None) -> bytes:
    """Decompress gzip data; anything else, or a truncated or corrupt stream, is a DataError.
    `size`: the bytes it must decompress to, where known; decompressing stops past them (a
    small file that unpacks to gigabytes fills no memory), a checksum mismatch. `limit`:
    decompress at most one byte more than this, and return that (the caller judges it)."""
    if raw[:2] != b"\x1f\x8b":
        raise DataError(f"{source}: not gzip data (starts with {raw[:8]!r})")
    try:
        if size is None and limit is None:
            return gzip.decompress(raw)
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read((size if size is not None else limit) + 1)
        if size is not None and len(data) > size:
            raise DataError(f"{source}: checksum mismatch: decompresses to more than {size} "
                            f"bytes, expected {size}")
        return data
    except EOFError:
        raise TruncatedGzip(f"{source}: gzip data is truncated") from None
    except (OSError, zlib.error) as error:
        raise DataError(f"{source}: corrupt gzip data ({error})") from None
