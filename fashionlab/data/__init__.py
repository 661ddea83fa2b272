"""Fashion-MNIST on disk: finding, downloading and verifying the files, the splits, tensors.

    files     the four IDX files: names, checksums, the user cache, the verification memo
    dataset   the splits in memory, loading a directory of IDX files, tensors for training
    fetch     where load_fashion_mnist looks (a named directory, the cache, Debian's package,
              the mirrors); copying or downloading, verifying and installing atomically
Each imports only the ones listed before it.

The IDX format itself lives in `fashionlab.idx`; `parse_idx`, `read_idx` and `write_idx` are
re-exported here.

    >>> from fashionlab.data import load_fashion_mnist, to_tensors
    >>> dataset = load_fashion_mnist()           # finds, fetches and verifies the files
    >>> x, y = to_tensors(dataset.train, "cuda")   # (60000, 28, 28) float32, (60000,) int64
"""

from __future__ import annotations

from fashionlab.data.dataset import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    Dataset,
    Split,
    load_idx_dataset,
    load_idx_test_split,
    normalize,
    to_tensors,
)
from fashionlab.data.fetch import (
    DATA_ENV,
    DEBIAN_DIR,
    DEFAULT_MIRRORS,
    FASHION_MNIST_CHECKSUMS,
    MIRRORS_ENV,
    fetch_fashion_mnist,
    load_fashion_mnist,
    load_fashion_mnist_test,
    locate_fashion_mnist,
)
from fashionlab.data.files import (
    CACHE_ENV,
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    FileChecksum,
    cache_dir,
    files_in,
    sha256,
)
from fashionlab.idx import parse_idx, read_idx, write_idx

__all__ = [
    "CACHE_ENV",
    "CLASS_NAMES",
    "DATA_ENV",
    "DEBIAN_DIR",
    "DEFAULT_MIRRORS",
    "FASHION_MNIST_CHECKSUMS",
    "FILE_NAMES",
    "IMAGE_SHAPE",
    "MIRRORS_ENV",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "Dataset",
    "FileChecksum",
    "Split",
    "cache_dir",
    "fetch_fashion_mnist",
    "files_in",
    "load_fashion_mnist",
    "load_fashion_mnist_test",
    "load_idx_dataset",
    "load_idx_test_split",
    "locate_fashion_mnist",
    "normalize",
    "parse_idx",
    "read_idx",
    "sha256",
    "to_tensors",
    "write_idx",
]
