"""The dataset in memory: the splits and their class names, loading a directory of IDX files
into them, and tensors for training."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fashionlab.data.files import (
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    FileChecksum,
    PathLike,
    check,
    find_one,
    memo_entry,
    read_memo,
    remember,
    remembered,
)
from fashionlab.errors import DataError
from fashionlab.idx import parse_idx, read_decompressed, read_idx_bytes

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SHAPE",
    "Dataset",
    "Split",
    "load_idx_dataset",
    "load_idx_test_split",
    "normalize",
    "to_tensors",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True, eq=False)
class Split:
    """One split. Arrays compare by identity (eq=False): element-wise == is not a bool."""

    images: np.ndarray  # (N, 28, 28) uint8, 0 = background
    labels: np.ndarray  # (N,) uint8 class indices

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # the shapes, not ~50 lines of pixels
        return (f"Split(images={self.images.shape} {self.images.dtype}, "
                f"labels={self.labels.shape} {self.labels.dtype})")

    def class_counts(self, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
        """Images per class, (n_classes,) int64."""
        return np.bincount(self.labels, minlength=n_classes)

    def head(self, n: int | None) -> Split:
        """The first `n` images (views, no copy); all of them where there are fewer or `n` is
        None: what a study's `[data]` limits keep."""
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def first_per_class(self, n: int) -> Split:
        """A copy of the first `n` images of each class, in their order here: what a figure
        of samples shows, without holding the whole split."""
        keep = np.sort(np.concatenate(
            [np.flatnonzero(self.labels == c)[:n] for c in np.unique(self.labels)]
            or [np.zeros(0, np.int64)]))
        return Split(self.images[keep], self.labels[keep])  # fancy indexing: copies


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits with where they came from."""

    train: Split
    test: Split
    source: Path  # directory the files were read from
    verified: bool  # every file matched its SHA-256 (checked now, or remembered)
    class_names: tuple[str, ...] = CLASS_NAMES
    files: tuple[Path, ...] = ()  # the files read, in FILE_NAMES order

    def to_dict(self) -> dict[str, Any]:
        """What `fashionlab data info --json` prints: where the files are, whether they were
        verified, the class names, each split's shapes and images per class, and `sha256`."""
        splits = {}
        for name, split in (("train", self.train), ("test", self.test)):
            counts = split.class_counts(len(self.class_names))
            splits[name] = {
                "images_shape": list(split.images.shape),
                "labels_shape": list(split.labels.shape),
                "class_counts": {c: int(n) for c, n in zip(self.class_names, counts)},
            }
        return {
            "source": str(self.source),
            "files": [str(path) for path in self.files],
            "verified": self.verified,
            "class_names": list(self.class_names),
            "splits": splits,
            "sha256": self.sha256(),
        }

    def sha256(self) -> str:
        """The SHA-256 of what a model learns from: both splits' images and labels (their
        shapes and dtypes too: labels as int64 are not the files' uint8) and the class names.
        Equal arrays, equal digests, wherever they came from."""
        digest = hashlib.sha256(json.dumps(self.class_names).encode())
        for array in (self.train.images, self.train.labels, self.test.images, self.test.labels):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading.


def load_idx_dataset(
    directory: PathLike,
    *,
    checksums: Mapping[str, FileChecksum] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Dataset:
    """Load the four Fashion-MNIST-named IDX files in `directory` (raw or .gz).

    Any dataset with the same layout loads (MNIST digits, say). With `checksums`, every file
    must match its entry; without, only the format, counts and label range are checked.
    """
    directory = Path(directory).expanduser()
    arrays, files, verified = _read_idx_files(directory, FILE_NAMES, checksums)
    n_classes = len(class_names)
    train = _split(*arrays[:2], *files[:2], n_classes=n_classes)
    test = _split(*arrays[2:], *files[2:], n_classes=n_classes)
    return Dataset(train, test, directory, verified, tuple(class_names), tuple(files))


def load_idx_test_split(
    directory: PathLike,
    *,
    checksums: Mapping[str, FileChecksum] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Split:
    """Load only the test images and labels in `directory` (t10k-*, raw or .gz), checked as
    `load_idx_dataset` checks them: scoring a model needs no training files."""
    directory = Path(directory).expanduser()
    arrays, files, _ = _read_idx_files(directory, (TEST_IMAGES, TEST_LABELS), checksums)
    return _split(*arrays, *files, n_classes=len(class_names))


def _read_idx_files(directory: Path, names: Sequence[str],
                    checksums: Mapping[str, FileChecksum] | None,
                    ) -> tuple[list[np.ndarray], list[Path], bool]:
    """The arrays of the named files (images 3-D, labels 1-D), their paths, and whether every
    one matched its checksum (each verified once per file version: the memo)."""
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{directory} is a file, not a folder (name the folder of the IDX "
                        "files)")
    files = []
    for name in names:
        found = find_one(directory, name)
        if found is None:
            raise DataError(f"{directory / name}[.gz]: file not found")
        files.append(found)
    memo = read_memo() if checksums is not None else {}
    verified, new_entries, arrays = checksums is not None, {}, []
    for name, path in zip(names, files):
        stat = path.stat()
        expected = checksums.get(name) if checksums is not None else None
        # Decompressed no further than its checksum's size, or its header's: a small .gz that
        # unpacks to gigabytes is refused before it fills the memory.
        data = read_idx_bytes(path) if expected is None else \
            read_decompressed(path, size=expected.size)
        arrays.append(parse_idx(data, source=path, ndim=3 if "images" in name else 1))
        if expected is None:
            verified = False
        elif not remembered(memo, path, stat, expected):
            new_entries.update(memo_entry(path, stat, check(data, expected, source=path)))
    remember(new_entries)
    return arrays, files, verified


def _split(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path, *,
           n_classes: int) -> Split:
    for array, path in ((images, images_path), (labels, labels_path)):
        if array.dtype != np.uint8:
            raise DataError(f"{path}: holds {array.dtype.name}, expected uint8 (IDX code 0x08)")
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels, but {images_path.name} "
                        f"has {len(images)} images")
    if not len(images):  # nothing to train on or score: a NaN accuracy, or worse, later
        raise DataError(f"{images_path}: holds no images")
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is out of "
                        f"range 0..{n_classes - 1} ({bad.size} such "
                        f"label{'s' if bad.size > 1 else ''})")
    return Split(images, labels)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255)


def to_tensors(
    split: Split, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 28, 28) in [0, 1], float32 unless `dtype` says otherwise; y int64 (N,)) on
    `device`. A bfloat16 x is the float32 x rounded, built without holding both; a uint8 x
    holds the pixels themselves (0-255), for `train.as_images` to convert batch by batch."""
    import torch  # here, so that `fashionlab data info` starts without loading torch

    # torch.from_numpy warns on read-only arrays (a Split built by hand may hold them).
    images, labels = (a if a.flags.writeable else a.copy() for a in (split.images, split.labels))
    if dtype == torch.uint8:  # the pixels themselves, row-major whatever the array's order
        pixels = torch.empty(images.shape, dtype=torch.uint8, device=device)
        return pixels.copy_(torch.from_numpy(images)), torch.from_numpy(labels).to(device).long()
    x = torch.empty(images.shape, dtype=dtype or torch.float32, device=device)  # (N, 28, 28)
    chunk = 8192
    for first in range(0, len(images), chunk):
        # Move uint8 (a quarter of the bytes of float32) and convert on the device.
        pixels = torch.from_numpy(images[first : first + chunk]).to(device)
        x[first : first + chunk] = pixels.float().div_(255)
    y = torch.from_numpy(labels).to(device).long()  # (N,)
    return x, y
