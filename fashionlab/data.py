"""Fashion-MNIST on disk: finding, downloading and verifying the files, the splits, tensors.

Where `load_fashion_mnist` looks, in order:
  1. an explicit directory (argument, else the FASHIONLAB_DATA environment variable);
  2. the user cache (FASHIONLAB_CACHE, else $XDG_CACHE_HOME/fashionlab, else ~/.cache/fashionlab);
  3. Debian's dataset package (DEBIAN_DIR);
  4. the public mirrors (DEFAULT_MIRRORS, or FASHIONLAB_MIRRORS), downloaded into the cache.
A location counts only when it holds all four files. Files are verified by the SHA-256 of their
decompressed bytes, so any gzip encoding of the same data passes; a successful check is
remembered in the cache (keyed by absolute path, size and mtime), so later loads skip hashing.

The IDX format itself lives in `fashionlab.idx`; `parse_idx`, `read_idx` and `write_idx` are
re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from fashionlab.errors import DataError
from fashionlab.idx import gunzip, parse_idx, read_decompressed, read_idx, write_idx

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "DEFAULT_MIRRORS",
    "FASHION_MNIST_CHECKSUMS",
    "FILE_NAMES",
    "Dataset",
    "FileChecksum",
    "Split",
    "cache_dir",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "load_idx_dataset",
    "locate_fashion_mnist",
    "normalize",
    "parse_idx",
    "read_idx",
    "to_tensors",
    "write_idx",
]

PathLike: TypeAlias = "str | os.PathLike[str]"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SHAPE = (28, 28)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

DATA_ENV = "FASHIONLAB_DATA"
CACHE_ENV = "FASHIONLAB_CACHE"
MIRRORS_ENV = "FASHIONLAB_MIRRORS"  # comma- or space-separated base URLs

# Read at call time, so tests can monkeypatch it.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)


@dataclass(frozen=True)
class FileChecksum:
    """What a file must decompress to."""

    sha256: str  # hex digest of the decompressed bytes
    size: int  # decompressed size in bytes


FASHION_MNIST_CHECKSUMS: Mapping[str, FileChecksum] = MappingProxyType({
    TRAIN_IMAGES: FileChecksum(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    TRAIN_LABELS: FileChecksum(
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    TEST_IMAGES: FileChecksum(
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    TEST_LABELS: FileChecksum(
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
})  # fmt: skip


@dataclass(frozen=True, eq=False)
class Split:
    """One split. Arrays compare by identity (eq=False): element-wise == is not a bool."""

    images: np.ndarray  # (N, 28, 28) uint8, 0 = background
    labels: np.ndarray  # (N,) uint8 class indices

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
        """Images per class, (n_classes,) int64."""
        return np.bincount(self.labels, minlength=n_classes)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits with where they came from."""

    train: Split
    test: Split
    source: Path  # directory the files were read from
    verified: bool  # every file matched its SHA-256 (checked now, or remembered)
    class_names: tuple[str, ...] = CLASS_NAMES
    files: tuple[Path, ...] = ()  # the files read, in FILE_NAMES order


# ---------------------------------------------------------------------------------------------
# Checksums.


def sha256(data: bytes | bytearray) -> str:
    """The hex SHA-256 of (decompressed) file contents, as the checksum tables hold it."""
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes | bytearray, expected: FileChecksum, *, source: PathLike) -> str:
    """Raise unless `data` is what `expected` describes; return its digest."""
    if len(data) != expected.size:
        raise DataError(f"{source}: checksum mismatch: decompresses to {len(data)} bytes, "
                        f"expected {expected.size}")
    digest = sha256(data)
    if digest != expected.sha256:
        raise DataError(f"{source}: checksum mismatch: SHA-256 {digest}, expected {expected.sha256}")
    return digest


# ---------------------------------------------------------------------------------------------
# Locations and the verification memo.


def cache_dir() -> Path:
    """The user cache: FASHIONLAB_CACHE, else $XDG_CACHE_HOME/fashionlab, else ~/.cache/fashionlab."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "fashionlab"


def _find_one(directory: Path, name: str) -> Path | None:
    # The raw file wins: it loads without decompressing.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_fashion_mnist(directory: PathLike | None = None) -> Path | None:
    """The directory `load_fashion_mnist` would read, or None when the files must be downloaded.

    An explicit directory (or FASHIONLAB_DATA) is returned as is: missing files there are an
    error when loading, not a reason to look elsewhere.
    """
    explicit = directory if directory is not None else os.environ.get(DATA_ENV)
    if explicit:
        return Path(explicit).expanduser()
    for candidate in (cache_dir(), DEBIAN_DIR):
        if all(_find_one(candidate, name) for name in FILE_NAMES):
            return candidate
    return None


_MEMO_NAME = "verified.json"


def _read_memo() -> dict[str, dict[str, object]]:
    try:
        files = json.loads((cache_dir() / _MEMO_NAME).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _remembered(memo: Mapping[str, object], path: Path, stat: os.stat_result,
                expected: FileChecksum) -> bool:
    entry = memo.get(str(path.resolve()))
    return entry == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected.sha256}


def _memo_entry(path: Path, stat: os.stat_result, digest: str) -> dict[str, dict[str, object]]:
    return {str(path.resolve()): {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "sha256": digest}}


def _remember(new: Mapping[str, dict[str, object]]) -> None:
    """Add verified files to the memo; an unwritable cache only means hashing again next time."""
    if not new:
        return
    files = {path: entry for path, entry in {**_read_memo(), **new}.items()
             if os.path.exists(path)}
    try:
        _write_atomic(cache_dir(), _MEMO_NAME, json.dumps({"files": files}, indent=1).encode())
    except OSError:
        pass


def _write_atomic(directory: Path, name: str, data: bytes | bytearray) -> Path:
    """Write under a temporary name in `directory`, then rename: readers never see a partial file."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name


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
    files = []
    for name in FILE_NAMES:
        found = _find_one(directory, name)
        if found is None:
            raise DataError(f"{directory / name}[.gz]: file not found")
        files.append(found)
    memo = _read_memo() if checksums is not None else {}
    verified, new_entries, arrays = checksums is not None, {}, []
    for name, path, ndim in zip(FILE_NAMES, files, (3, 1, 3, 1)):
        stat = path.stat()
        data = read_decompressed(path)
        arrays.append(parse_idx(data, source=path, ndim=ndim))
        expected = checksums.get(name) if checksums is not None else None
        if expected is None:
            verified = False
        elif not _remembered(memo, path, stat, expected):
            new_entries.update(_memo_entry(path, stat, _check(data, expected, source=path)))
    _remember(new_entries)
    n_classes = len(class_names)
    train = _split(*arrays[:2], *files[:2], n_classes=n_classes)
    test = _split(*arrays[2:], *files[2:], n_classes=n_classes)
    return Dataset(train, test, directory, verified, tuple(class_names), tuple(files))


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
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is out of "
                        f"range 0..{n_classes - 1} ({bad.size} such labels)")
    return Split(images, labels)


def load_fashion_mnist(
    directory: PathLike | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, FileChecksum] | None = None,
) -> Dataset:
    """Find (or download) Fashion-MNIST and load it; see the module docstring for the order.

    `verify=False` skips the checksums, for other IDX datasets in `directory` (MNIST digits).
    `checksums` defaults to FASHION_MNIST_CHECKSUMS; `mirrors` to FASHIONLAB_MIRRORS or
    DEFAULT_MIRRORS.
    """
    checksums = FASHION_MNIST_CHECKSUMS if checksums is None else checksums
    found = locate_fashion_mnist(directory)
    if found is None:
        if not download:
            raise DataError(f"Fashion-MNIST not found in {cache_dir()} or {DEBIAN_DIR}; "
                            "run `fashionlab data fetch` or set FASHIONLAB_DATA")
        found = fetch_fashion_mnist(mirrors=mirrors, checksums=checksums)
    return load_idx_dataset(found, checksums=checksums if verify else None)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255)


def to_tensors(
    split: Split, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 28, 28) in [0, 1], float32 unless `dtype` says otherwise; y int64 (N,)) on
    `device`. A bfloat16 x is the float32 x rounded, built without holding both."""
    import torch  # here, so that `fashionlab data info` starts without loading torch

    # torch.from_numpy warns on read-only arrays (a Split built by hand may hold them).
    images, labels = (a if a.flags.writeable else a.copy() for a in (split.images, split.labels))
    x = torch.empty(images.shape, dtype=dtype or torch.float32, device=device)  # (N, 28, 28)
    chunk = 8192
    for first in range(0, len(images), chunk):
        # Move uint8 (a quarter of the bytes of float32) and convert on the device.
        pixels = torch.from_numpy(images[first : first + chunk]).to(device)
        x[first : first + chunk] = pixels.float().div_(255)
    y = torch.from_numpy(labels).to(device).long()  # (N,)
    return x, y


# ---------------------------------------------------------------------------------------------
# Fetching: copy from Debian's directory or download, verify, and install atomically.


class _TransferError(Exception):
    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(" ".join(reason.split()))  # one line, whatever the server said
        self.transient = transient


def _mirrors(mirrors: Sequence[str] | None) -> tuple[str, ...]:
    if mirrors is not None:
        return tuple(mirrors)
    from_env = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
    return tuple(from_env) or DEFAULT_MIRRORS


def _download_once(url: str, *, timeout: float,
                   on_progress: Callable[[int, int | None], None]) -> bytes:
    """The body of `url`, complete and gzip-looking, or a _TransferError."""
    request = urllib.request.Request(url, headers={"User-Agent": "fashionlab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            chunks, received = [], 0
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                received += len(chunk)
                on_progress(received, total)
    except urllib.error.HTTPError as error:
        transient = error.code >= 500 or error.code == 429
        raise _TransferError(f"HTTP {error.code} {error.reason}", transient=transient) from None
    except urllib.error.URLError as error:
        transient = isinstance(error.reason, TimeoutError)
        raise _TransferError(f"cannot connect ({error.reason})", transient=transient) from None
    except TimeoutError:
        raise _TransferError(f"timed out after {timeout:g} s", transient=True) from None
    except (OSError, HTTPException) as error:
        raise _TransferError(f"transfer failed ({error!r})", transient=True) from None
    if total is not None and received < total:
        raise _TransferError(f"transfer cut short at {received} of {total} bytes", transient=True)
    body = b"".join(chunks)
    if body.lstrip()[:1] == b"<":
        raise _TransferError("returned an HTML page, not gzip data", transient=False)
    if body[:2] != b"\x1f\x8b":
        raise _TransferError(f"returned {len(body)} bytes that are not gzip data", transient=False)
    return body


def _download(name: str, *, mirrors: Sequence[str], expected: FileChecksum, timeout: float,
              retries: int, backoff: float, progress: bool) -> bytes:
    """Decompressed, verified contents of `name`, trying each mirror in turn."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not mirrors:
        raise DataError(f"could not download {name}.gz: no mirrors given (set {MIRRORS_ENV})")
    failures = []
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True,
                  disable=not progress) as bar:
        for base in mirrors:
            url = f"{base.rstrip('/')}/{name}.gz"
            for attempt in range(retries + 1):
                task = bar.add_task(f"{name}.gz", total=None)
                try:
                    body = _download_once(url, timeout=timeout, on_progress=lambda done, total,
                                          task=task: bar.update(task, completed=done, total=total))
                    data = gunzip(body, source=url)
                    _check(data, expected, source=url)
                    return data
                except _TransferError as error:
                    reason = str(error)
                    if error.transient and attempt < retries:
                        time.sleep(backoff * (attempt + 1))
                        continue
                except DataError as error:  # corrupt or wrong content: this mirror won't improve
                    reason = str(error).removeprefix(f"{url}: ")
                finally:
                    bar.remove_task(task)
                break
            failures.append(f"{url}: {reason}")
    raise DataError(f"could not download {name}.gz: " + "; ".join(failures))


def _ensure_writable(directory: Path, *, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise DataError(f"{what} {directory} is not writable ({error.strerror or error})") from None


def fetch_fashion_mnist(
    directory: PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, FileChecksum] | None = None,
    timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Make verified copies of the four files sit in `directory` (default: the user cache).

    Files already there and verified are kept; the others are copied from DEBIAN_DIR when it
    has them, else downloaded from `mirrors` (each tried `1 + retries` times on time-outs,
    dropped connections and server errors, with `timeout` seconds per network operation).
    They are stored decompressed, so that loading skips gunzip. `checksums` defaults to
    FASHION_MNIST_CHECKSUMS; `mirrors` to FASHIONLAB_MIRRORS or DEFAULT_MIRRORS. Returns the
    directory.
    """
    checksums = FASHION_MNIST_CHECKSUMS if checksums is None else checksums
    target = Path(directory).expanduser() if directory is not None else cache_dir()
    _ensure_writable(target, what="directory" if directory is not None else "cache directory")
    memo, new_entries = _read_memo(), {}
    for name in FILE_NAMES:
        expected = checksums[name]
        existing = _find_one(target, name)
        if existing is not None:
            stat = existing.stat()
            if _remembered(memo, existing, stat, expected):
                continue
            try:
                digest = _check(read_decompressed(existing), expected, source=existing)
                new_entries.update(_memo_entry(existing, stat, digest))
                continue
            except DataError:
                pass  # replaced below
        data = None
        debian = _find_one(DEBIAN_DIR, name)
        if debian is not None and debian.parent.resolve() != target.resolve():
            try:
                data = read_decompressed(debian)
                digest = _check(data, expected, source=debian)
            except DataError:
                data = None  # a damaged system copy: download instead
        if data is None:
            data = _download(name, mirrors=_mirrors(mirrors), expected=expected,
                             timeout=timeout, retries=retries, backoff=backoff, progress=progress)
            digest = expected.sha256
        try:
            final = _write_atomic(target, name, data)
        except OSError as error:
            raise DataError(f"{target / name}: cannot write ({error.strerror or error})") from None
        if existing is not None and existing != final:
            existing.unlink(missing_ok=True)  # a damaged .gz would otherwise linger beside it
        new_entries.update(_memo_entry(final, final.stat(), digest))
    _remember(new_entries)
    return target
