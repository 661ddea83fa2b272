"""The four IDX files on disk: their names, checksums (SHA-256 of the decompressed bytes), the
user cache, and the memo there of files already verified (by absolute path, size and mtime)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from fashionlab.errors import DataError
from fashionlab.serialize import remove_stale_staging, staging_path

__all__ = [
    "CACHE_ENV",
    "FILE_NAMES",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "FileChecksum",
    "PathLike",
    "cache_dir",
    "check",
    "files_in",
    "find_one",
    "memo_entry",
    "read_memo",
    "remember",
    "remembered",
    "sha256",
    "write_atomic",
]

PathLike: TypeAlias = "str | os.PathLike[str]"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

CACHE_ENV = "FASHIONLAB_CACHE"


@dataclass(frozen=True)
class FileChecksum:
    """What a file must decompress to."""

    sha256: str  # hex digest of the decompressed bytes
    size: int  # decompressed size in bytes


# ---------------------------------------------------------------------------------------------
# Checksums.


def sha256(data: bytes | bytearray) -> str:
    """The hex SHA-256 of (decompressed) file contents, as the checksum tables hold it."""
    return hashlib.sha256(data).hexdigest()


def check(data: bytes | bytearray, expected: FileChecksum, *, source: PathLike) -> str:
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


def find_one(directory: Path, name: str) -> Path | None:
    """`directory/name`, else `directory/name.gz`, else None."""
    # The raw file wins: it loads without decompressing.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def files_in(directory: Path) -> tuple[Path, ...]:
    """The four files in `directory` as they lie there (each raw, else gzipped), in FILE_NAMES
    order; a missing one by its raw name."""
    return tuple(find_one(directory, name) or directory / name for name in FILE_NAMES)


_MEMO_NAME = "verified.json"


def read_memo() -> dict[str, dict[str, object]]:
    """The memo of verified files (absolute path -> size, mtime_ns, sha256); {} when unreadable."""
    try:
        files = json.loads((cache_dir() / _MEMO_NAME).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def remembered(memo: Mapping[str, object], path: Path, stat: os.stat_result,
               expected: FileChecksum) -> bool:
    """Whether `memo` holds `path` verified against `expected`, unchanged since (size, mtime)."""
    entry = memo.get(str(path.resolve()))
    return entry == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected.sha256}


def memo_entry(path: Path, stat: os.stat_result, digest: str) -> dict[str, dict[str, object]]:
    """The memo entry saying that `path`, as `stat` describes it, hashed to `digest`."""
    return {str(path.resolve()): {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "sha256": digest}}


def remember(new: Mapping[str, dict[str, object]]) -> None:
    """Add verified files to the memo; an unwritable cache only means hashing again next time."""
    if not new:
        return
    files = {path: entry for path, entry in {**read_memo(), **new}.items()
             if os.path.exists(path)}
    remove_stale_staging(cache_dir(), names={_MEMO_NAME})  # of a process killed writing it
    try:
        write_atomic(cache_dir(), _MEMO_NAME, json.dumps({"files": files}, indent=1).encode())
    except OSError:
        pass


def write_atomic(directory: Path, name: str, data: bytes | bytearray) -> Path:
    """Write under a temporary name in `directory`, then rename: readers never see a partial file."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(directory / name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name
