"""fashionlab.idx: the IDX reader and writer against a struct-based reference, malformed bytes."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fashionlab.errors import DataError
from fashionlab.idx import idx_shape, parse_idx, read_idx, write_idx


def slow_read_idx(raw: bytes) -> np.ndarray:
    """The reference: the IDX format read field by field with struct, one value at a time."""
    formats = {0x08: "B", 0x09: "b", 0x0B: "h", 0x0C: "i", 0x0D: "f", 0x0E: "d"}
    zero, code, n_dims = struct.unpack_from(">HBB", raw)
    assert zero == 0
    shape = struct.unpack_from(f">{n_dims}I", raw, 4)
    values = struct.unpack_from(f">{int(np.prod(shape))}{formats[code]}", raw, 4 + 4 * n_dims)
    return np.array(values).reshape(shape)


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_read_round_trip_matches_reference(tmp_path: Path, dtype: str, suffix: str):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((5, 3, 4)) * 100).astype(dtype)
    path = tmp_path / f"array-idx3{suffix}"
    write_idx(path, array)

    loaded = read_idx(path)
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    np.testing.assert_array_equal(slow_read_idx(raw), array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == bool(suffix)


def test_multibyte_values_are_big_endian_on_disk(tmp_path: Path):
    write_idx(tmp_path / "x", np.array([258, -2], dtype=np.int16))
    assert (tmp_path / "x").read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE])


def test_write_idx_rejects_what_idx_cannot_hold(tmp_path: Path):
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.array(3, dtype=np.uint8))


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"\x00\x00", "less than the IDX header"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
    (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x07", "unknown IDX dtype code 0x0a"),
    (b"\x00\x00\x08\x00", "has 0 dimensions"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "less than its 12-byte header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x07", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07\x07", "trailing bytes"),
])
def test_parse_idx_rejects_malformed_bytes(raw: bytes, fragment: str):
    with pytest.raises(DataError, match=fragment):
        parse_idx(raw, source="some-file")


def test_parse_idx_checks_the_number_of_dimensions():
    raw = b"\x00\x00\x08\x02\x00\x00\x00\x01\x00\x00\x00\x01\x07"
    assert parse_idx(raw, source="f", ndim=2).shape == (1, 1)
    with pytest.raises(DataError, match="has 2 dimensions, expected 3"):
        parse_idx(raw, source="f", ndim=3)


def test_a_compressed_file_is_read_no_further_than_its_header_declares(tmp_path: Path):
    # One image declared, then 50 MB of zeros (50 kB compressed): refused as trailing bytes
    # having decompressed 793 bytes, not 50 MB.
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 28, 28))
        for _ in range(50):
            f.write(bytes(1 << 20))
    with pytest.raises(DataError, match=r"trailing bytes: decompresses to more than the 800 "
                                        r"bytes its header declares$"):
        read_idx(path)
    assert idx_shape(path) == (1, 28, 28)
    write_idx(tmp_path / "ok-idx3-ubyte.gz", np.arange(784, dtype=np.uint8).reshape(1, 28, 28))
    assert read_idx(tmp_path / "ok-idx3-ubyte.gz").sum() == np.arange(784, dtype=np.uint8).sum()
    assert idx_shape(tmp_path / "ok-idx3-ubyte.gz") == (1, 28, 28)
    (tmp_path / "text-idx3-ubyte").write_text("no header")
    assert idx_shape(tmp_path / "text-idx3-ubyte") is None
    # No header at all, 50 MB of zeros: what is wrong with the header is said having
    # decompressed no more than the longest header, not the 50 MB.
    zeros = tmp_path / "zeros.gz"
    with gzip.open(zeros, "wb") as f:
        for _ in range(50):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="unknown IDX dtype code 0x00"):
            read_idx(zeros)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, peak
