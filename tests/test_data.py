"""fashionlab.data: loading, locating, verification, tensors, and the IDX re-exports."""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import dead_pid

from fashionlab import data, idx
from fashionlab.data import (
    CLASS_NAMES,
    FASHION_MNIST_CHECKSUMS,
    FILE_NAMES,
    FileChecksum,
    Split,
    load_fashion_mnist,
    load_idx_dataset,
)
from fashionlab.data import fetch as fetch_module
from fashionlab.data import files as files_module
from fashionlab.errors import DataError
from fashionlab.idx import write_idx
from fashionlab.serialize import staging_path

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real_data = pytest.mark.skipif(
    not all((REAL_DIR / f"{name}.gz").is_file() for name in FILE_NAMES),
    reason=f"the Debian package dataset-fashion-mnist is not installed ({REAL_DIR})")


def checksums_of(directory: Path) -> dict[str, FileChecksum]:
    table = {}
    for name in FILE_NAMES:
        raw = gzip.decompress((directory / f"{name}.gz").read_bytes())
        table[name] = FileChecksum(data.sha256(raw), len(raw))
    return table


def assert_one_line_naming(error: pytest.ExceptionInfo[DataError], path: Path, fragment: str):
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message, message
    assert fragment in message, message


def test_idx_functions_are_still_importable_from_data():
    assert {"parse_idx", "read_idx", "write_idx"} <= set(data.__all__)
    assert (data.parse_idx, data.read_idx, data.write_idx) == (
        idx.parse_idx, idx.read_idx, idx.write_idx)


# --- Loading a dataset directory and its bad inputs -----------------------------------------


def test_tiny_dataset_loads(tiny_idx_dir: Path):
    dataset = load_idx_dataset(tiny_idx_dir)
    assert dataset.train.images.shape == (300, 28, 28) and dataset.test.images.shape == (100, 28, 28)
    assert dataset.train.images.dtype == np.uint8 and dataset.train.labels.dtype == np.uint8
    assert dataset.train.class_counts().tolist() == [30] * 10
    assert dataset.test.class_counts().tolist() == [10] * 10
    assert len(dataset.train) == 300
    assert dataset.source == tiny_idx_dir and not dataset.verified
    assert dataset.class_names == CLASS_NAMES
    assert dataset.files == tuple(tiny_idx_dir / f"{name}.gz" for name in FILE_NAMES)
    assert dataset.train.images.flags.writeable  # torch.from_numpy needs it


def test_raw_file_is_preferred_over_gz(tiny_idx_dir: Path):
    gz = tiny_idx_dir / f"{data.TEST_LABELS}.gz"
    (tiny_idx_dir / data.TEST_LABELS).write_bytes(gzip.decompress(gz.read_bytes()))
    dataset = load_idx_dataset(tiny_idx_dir)
    assert dataset.files[3] == tiny_idx_dir / data.TEST_LABELS


def _corrupt(directory: Path, name: str, transform) -> Path:
    """Rewrite one tiny file (stored .gz) through `transform(decompressed bytes) -> bytes`."""
    path = directory / f"{name}.gz"
    path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))
    return path


def _rewrite(directory: Path, name: str, array: np.ndarray) -> Path:
    path = directory / f"{name}.gz"
    write_idx(path, array)
    return path


BAD_INPUTS = {
    "wrong magic": lambda d: (
        _corrupt(d, data.TRAIN_IMAGES, lambda b: b"\x08" + b[1:]), "not an IDX file"),
    "wrong dtype code": lambda d: (
        _corrupt(d, data.TRAIN_LABELS, lambda b: b[:2] + b"\x07" + b[3:]), "dtype code 0x07"),
    "truncated": lambda d: (_corrupt(d, data.TEST_IMAGES, lambda b: b[:-1]), "truncated"),
    "trailing bytes": lambda d: (_corrupt(d, data.TEST_IMAGES, lambda b: b + b"\0"), "trailing"),
    "wrong dimensions": lambda d: (
        _rewrite(d, data.TRAIN_IMAGES, np.zeros((300, 784), np.uint8)), "expected 3"),
    "not uint8": lambda d: (
        _rewrite(d, data.TRAIN_IMAGES, np.zeros((300, 28, 28), np.int16)), "expected uint8"),
    "not 28x28": lambda d: (
        _rewrite(d, data.TEST_IMAGES, np.zeros((100, 32, 32), np.uint8)), "expected 28x28"),
    "label count": lambda d: (
        _rewrite(d, data.TRAIN_LABELS, np.zeros(299, np.uint8)), "299 labels, but"),
    "label value": lambda d: (
        _rewrite(d, data.TEST_LABELS, np.array([0] * 99 + [10], np.uint8)),
        "label 10 at index 99 is out of range 0..9"),
    "no images": lambda d: (  # evaluate printed a NaN accuracy (and NaN in its JSON)
        _rewrite(d, data.TEST_LABELS, np.zeros(0, np.uint8))
        and _rewrite(d, data.TEST_IMAGES, np.zeros((0, 28, 28), np.uint8)), "holds no images"),
    "gz not gzip": lambda d: (
        _write(d / f"{data.TRAIN_LABELS}.gz", b"\x00\x00\x08\x01plain"), "not gzip data"),
    "gzip truncated": lambda d: (
        _write(d / f"{data.TRAIN_IMAGES}.gz",
               (d / f"{data.TRAIN_IMAGES}.gz").read_bytes()[:-100]), "gzip data is truncated"),
    "gzip corrupt": lambda d: (
        _write(d / f"{data.TRAIN_LABELS}.gz", b"\x1f\x8b\x08\x00garbage-garbage"), "corrupt gzip"),
    "missing file": lambda d: (
        _unlink(d / f"{data.TEST_LABELS}.gz"), "file not found"),
}


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path.with_suffix("")  # the message names the file without its .gz


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_error_naming_the_file(tiny_idx_dir: Path, case: str):
    path, fragment = BAD_INPUTS[case](tiny_idx_dir)
    with pytest.raises(DataError) as error:
        load_idx_dataset(tiny_idx_dir)
    assert_one_line_naming(error, path, fragment)


def test_checksum_mismatch_names_the_file(tiny_idx_dir: Path):
    checksums = checksums_of(tiny_idx_dir)
    path = _corrupt(tiny_idx_dir, data.TRAIN_IMAGES, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    with pytest.raises(DataError) as error:
        load_idx_dataset(tiny_idx_dir, checksums=checksums)
    assert_one_line_naming(error, path, "checksum mismatch: SHA-256")


def test_other_idx_datasets_load_without_fashion_checksums(tiny_idx_dir: Path):
    digits = tuple(str(d) for d in range(10))  # MNIST: same layout, other bytes
    dataset = load_idx_dataset(tiny_idx_dir, class_names=digits)
    assert dataset.class_names == digits and not dataset.verified
    assert load_fashion_mnist(tiny_idx_dir, verify=False).train.images.shape == (300, 28, 28)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_fashion_mnist(tiny_idx_dir)  # verify=True: these are not Fashion-MNIST's bytes


# --- Verification memo -----------------------------------------------------------------------


@pytest.fixture
def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = data.sha256

    def counting(raw: bytes | bytearray) -> str:
        calls.append(len(raw))
        return real(raw)

    monkeypatch.setattr(files_module, "sha256", counting)
    return calls


def test_verification_is_remembered_until_the_file_changes(tiny_idx_dir: Path,
                                                           isolated_data_env: Path,
                                                           count_hashing: list[int]):
    checksums = checksums_of(tiny_idx_dir)
    count_hashing.clear()
    assert load_idx_dataset(tiny_idx_dir, checksums=checksums).verified
    assert len(count_hashing) == 4
    assert (isolated_data_env / "verified.json").is_file()

    assert load_idx_dataset(tiny_idx_dir, checksums=checksums).verified
    assert len(count_hashing) == 4  # remembered: nothing hashed

    touched = tiny_idx_dir / f"{data.TEST_LABELS}.gz"
    stat = touched.stat()
    time_ns = stat.st_mtime_ns + 1_000_000
    os.utime(touched, ns=(time_ns, time_ns))
    assert load_idx_dataset(tiny_idx_dir, checksums=checksums).verified
    assert len(count_hashing) == 5  # only the changed file again


def test_unreadable_memo_only_means_hashing_again(tiny_idx_dir: Path, isolated_data_env: Path):
    (isolated_data_env / "verified.json").write_text("{not json")
    # And a half-written one that a killed process left goes when the memo is written again.
    killed = staging_path(isolated_data_env / "verified.json").name.replace(
        f".{os.getpid()}.", f".{dead_pid()}.")
    (isolated_data_env / killed).write_text("{half")
    assert load_idx_dataset(tiny_idx_dir, checksums=checksums_of(tiny_idx_dir)).verified
    assert sorted(p.name for p in isolated_data_env.iterdir()) == ["verified.json"]


def test_unwritable_cache_still_loads_a_read_only_directory(tiny_idx_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    # A cache path below a regular file cannot be created, even by root.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FASHIONLAB_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    dataset = load_fashion_mnist(checksums=checksums_of(tiny_idx_dir))
    assert dataset.verified and dataset.source == tiny_idx_dir


# --- Where the files are found ---------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("FASHIONLAB_CACHE", str(tmp_path / "explicit"))
    assert data.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FASHIONLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "fashionlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "fashionlab"


def test_search_order(tiny_idx_dir: Path, tmp_path: Path, isolated_data_env: Path,
                      monkeypatch: pytest.MonkeyPatch):
    places = {name: tmp_path / name for name in ("explicit", "env", "debian")}
    places["cache"] = isolated_data_env
    for place in places.values():
        shutil.copytree(tiny_idx_dir, place, dirs_exist_ok=True)
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", places["debian"])
    monkeypatch.setenv("FASHIONLAB_DATA", str(places["env"]))

    def source(*args: object) -> Path:
        return load_fashion_mnist(*args, verify=False, download=False).source

    assert source(places["explicit"]) == places["explicit"]
    assert source() == places["env"]
    monkeypatch.setenv("FASHIONLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"file not found \(FASHIONLAB_DATA=.*nowhere\)$"):
        source()  # the error says where the folder it names came from
    monkeypatch.delenv("FASHIONLAB_DATA")
    assert source() == places["cache"]
    (places["cache"] / f"{data.TEST_LABELS}.gz").unlink()  # an incomplete cache is passed over
    assert source() == places["debian"]
    shutil.rmtree(places["debian"])
    with pytest.raises(DataError, match="not found .* run `fashionlab data fetch`"):
        source()


def test_explicit_directory_missing_files_is_an_error(tmp_path: Path):
    with pytest.raises(DataError) as error:
        load_fashion_mnist(tmp_path, download=False)
    assert_one_line_naming(error, tmp_path / data.TRAIN_IMAGES, "file not found")


# --- Arrays for training ----------------------------------------------------------------------


def test_normalize_and_to_tensors(tiny_idx_dir: Path):
    import torch

    split = load_idx_dataset(tiny_idx_dir).train
    floats = data.normalize(split.images)
    assert floats.dtype == np.float32 and floats.min() >= 0 and floats.max() <= 1
    assert floats.max() == 1.0 or split.images.max() < 255

    x, y = data.to_tensors(split, "cpu")
    assert x.dtype == torch.float32 and x.shape == (300, 28, 28) and x.device.type == "cpu"
    assert y.dtype == torch.int64 and y.shape == (300,)
    np.testing.assert_array_equal(x.numpy(), floats)  # same float32 division, same bits
    np.testing.assert_array_equal(y.numpy(), split.labels)

    read_only = data.Split(split.images.copy(), split.labels.copy())
    read_only.images.flags.writeable = False
    read_only.labels.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x2, y2 = data.to_tensors(read_only)
        pixels, _ = data.to_tensors(read_only, dtype=torch.uint8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    np.testing.assert_array_equal(pixels.numpy(), split.images)  # the pixels themselves
    pixels[0, 0, 0] = 7  # a copy: the split's arrays are not the tensor's
    assert read_only.images[0, 0, 0] != 7 or split.images[0, 0, 0] == 7


# --- The real Fashion-MNIST (Debian's dataset-fashion-mnist) --------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[data.Dataset, Path]:
    """The real data loaded once, verified, with its own cache directory."""
    cache = tmp_path_factory.mktemp("real-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASHIONLAB_CACHE", str(cache))
        patch.setattr(fetch_module, "DEBIAN_DIR", REAL_DIR)
        return load_fashion_mnist(download=False), cache


@needs_real_data
def test_real_data_shapes_counts_and_checksums(real: tuple[data.Dataset, Path]):
    dataset, _ = real
    assert dataset.verified and dataset.source == REAL_DIR
    assert dataset.train.images.shape == (60000, 28, 28)
    assert dataset.test.images.shape == (10000, 28, 28)
    assert dataset.train.class_counts().tolist() == [6000] * 10
    assert dataset.test.class_counts().tolist() == [1000] * 10
    assert dataset.train.images.max() == 255 and dataset.train.images.min() == 0


@needs_real_data
def test_real_data_second_load_uses_remembered_verification(
        real: tuple[data.Dataset, Path], monkeypatch: pytest.MonkeyPatch,
        count_hashing: list[int]):
    _, cache = real
    monkeypatch.setenv("FASHIONLAB_CACHE", str(cache))
    again = load_fashion_mnist(download=False)
    assert again.verified and count_hashing == []


@needs_real_data
def test_real_data_fetched_into_the_cache_loads_without_gunzip_or_hashing(
        monkeypatch: pytest.MonkeyPatch, isolated_data_env: Path, count_hashing: list[int]):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", REAL_DIR)
    assert data.fetch_fashion_mnist(progress=False) == isolated_data_env
    for name in FILE_NAMES:  # decompressed copies, so loading skips gunzip
        assert (isolated_data_env / name).stat().st_size == FASHION_MNIST_CHECKSUMS[name].size
    hashed = len(count_hashing)

    # What makes it fast, asserted instead of a time (another test process may share the
    # cores): the cache holds decompressed copies (above) and no file is hashed again.
    dataset = load_fashion_mnist(download=False)
    assert dataset.source == isolated_data_env and dataset.verified
    assert len(count_hashing) == hashed  # fetch remembered what it verified


def test_first_per_class_keeps_the_first_images_of_each_class_as_a_copy():
    images = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2)
    split = Split(images, np.array([3, 1, 3, 0, 1, 2, 0, 0, 9, 1], dtype=np.uint8))
    first = split.first_per_class(1)
    assert first.labels.tolist() == [3, 1, 0, 2, 9]  # in their order in the split
    assert np.array_equal(first.images, images[[0, 1, 3, 5, 8]])
    assert split.first_per_class(2).labels.tolist() == [3, 1, 3, 0, 1, 2, 0, 9]
    assert len(split.first_per_class(0)) == 0
    # A copy: holding it does not hold the whole split's array.
    assert not np.shares_memory(first.images, images)
    # The figure of samples shows the same images from it as from the whole split.
    from fashionlab import plots  # matplotlib: this test only
    whole = plots.sample_grid(split.images, split.labels, per_class=1)
    kept = plots.sample_grid(first.images, first.labels, per_class=1)
    mosaics = [np.ma.getdata(f.axes[0].images[0].get_array()) for f in (whole, kept)]
    assert np.array_equal(*mosaics, equal_nan=True)  # NaN: blank cells


def test_a_datasets_digest_is_its_content(tiny_idx_dir: Path):
    dataset = data.load_fashion_mnist(tiny_idx_dir, verify=False)
    copy = data.Dataset(data.Split(dataset.train.images.copy(), dataset.train.labels.copy()),
                        data.Split(dataset.test.images.copy(), dataset.test.labels.copy()),
                        source=Path("elsewhere"), verified=False)
    assert copy.sha256() == dataset.sha256()  # where they came from does not count
    images = dataset.train.images.copy()
    images[0, 0, 0] ^= 1  # one pixel, one bit
    changed = [
        data.Dataset(data.Split(images, dataset.train.labels), dataset.test,
                     dataset.source, False),
        data.Dataset(data.Split(dataset.train.images[:-1], dataset.train.labels[:-1]),
                     dataset.test, dataset.source, False),
        data.Dataset(dataset.train, dataset.test, dataset.source, False,
                     class_names=tuple(reversed(dataset.class_names))),
        data.Dataset(dataset.train, dataset.train, dataset.source, False)]  # other test images
    digests = {dataset.sha256(), *(d.sha256() for d in changed)}
    assert len(digests) == 1 + len(changed)


@pytest.mark.parametrize("verify", [False, True])
def test_a_small_gz_that_unpacks_to_gigabytes_is_refused_before_the_memory_fills(
        tiny_idx_dir: Path, tmp_path: Path, verify: bool):
    """A 200 kB .gz of one image's header and 200 MB of zeros among the dataset's files:
    refused having decompressed no more than its header declares, or than the size of its
    checksum (47 MB for the training images), not after holding the 200 MB."""
    import tracemalloc

    folder = tmp_path / "bomb"
    shutil.copytree(tiny_idx_dir, folder)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([1, 28, 28], ">u4").tobytes())
        for _ in range(200):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            load_fashion_mnist(folder, verify=verify)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ("checksum mismatch: decompresses to more than" if verify else "trailing bytes") \
        in str(error.value)
    assert peak < (100 << 20 if verify else 5 << 20), peak
