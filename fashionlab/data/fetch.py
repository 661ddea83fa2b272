"""Fashion-MNIST itself: finding its files, fetching them when missing, and loading them.

Where `load_fashion_mnist` looks, in order:
  1. an explicit directory (argument, else the FASHIONLAB_DATA environment variable);
  2. the user cache (FASHIONLAB_CACHE, else $XDG_CACHE_HOME/fashionlab, else ~/.cache/fashionlab);
  3. Debian's dataset package (DEBIAN_DIR);
  4. the public mirrors (DEFAULT_MIRRORS, or FASHIONLAB_MIRRORS), downloaded into the cache.
A location counts only when it holds all four files. Files are verified by the SHA-256 of their
decompressed bytes, so any gzip encoding of the same data passes; a successful check is
remembered in the cache (keyed by absolute path, size and mtime), so later loads skip hashing.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from http.client import HTTPException
from pathlib import Path
from types import MappingProxyType

from fashionlab.data.dataset import Dataset, Split, load_idx_dataset, load_idx_test_split
from fashionlab.data.files import (
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    FileChecksum,
    PathLike,
    cache_dir,
    check,
    find_one,
    memo_entry,
    read_memo,
    remember,
    remembered,
    write_atomic,
)
from fashionlab.errors import DataError
from fashionlab.idx import TruncatedGzip, gunzip, read_decompressed
from fashionlab.serialize import file_in_the_way, remove_stale_staging

__all__ = [
    "DATA_ENV",
    "DEBIAN_DIR",
    "DEFAULT_MIRRORS",
    "FASHION_MNIST_CHECKSUMS",
    "MIRRORS_ENV",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "load_fashion_mnist_test",
    "locate_fashion_mnist",
]

DATA_ENV = "FASHIONLAB_DATA"
MIRRORS_ENV = "FASHIONLAB_MIRRORS"  # comma- or space-separated base URLs

# Read at call time, so tests can monkeypatch it (here, as fashionlab.data.fetch.DEBIAN_DIR:
# the package's re-export is a separate name that nothing reads).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# A transfer slower than MIN_RATE bytes a second on average, once SLOW_AFTER seconds (or the
# time-out, if longer) have passed, is given up (and retried, then the next mirror): a server
# that trickles a byte at a time never trips the socket's time-out, and would take days.
MIN_RATE = 10_000
SLOW_AFTER = 60.0
DEFAULT_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)

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


# ---------------------------------------------------------------------------------------------
# Locating and loading.


def locate_fashion_mnist(directory: PathLike | None = None) -> Path | None:
    """The directory `load_fashion_mnist` would read, or None when the files must be downloaded.

    An explicit directory (or FASHIONLAB_DATA) is returned as is: missing files there are an
    error when loading, not a reason to look elsewhere.
    """
    named = _named_folder(directory)
    if named is not None:
        return named
    for candidate in (cache_dir(), DEBIAN_DIR):
        if all(find_one(candidate, name) for name in FILE_NAMES):
            return candidate
    return None


def _named_folder(directory: PathLike | None) -> Path | None:
    """The folder you named: `directory`, else FASHIONLAB_DATA; None where neither is."""
    explicit = directory if directory is not None else os.environ.get(DATA_ENV)
    return Path(explicit).expanduser() if explicit else None


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
    A damaged copy in the cache is fetched again (with `download`; else an error says how).
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
    try:
        return load_idx_dataset(found, checksums=checksums if verify else None)
    except DataError as error:
        if directory is None and os.environ.get(DATA_ENV):  # say where the folder came from
            raise DataError(f"{error} (FASHIONLAB_DATA={os.environ[DATA_ENV]})") from None
        if directory is not None or found != cache_dir():
            raise
        # Our own copy, damaged since (a disk error, a file edited or cut by hand): fetched
        # again from Debian's package or a mirror, every file hashed anew (a disk error keeps
        # a file's size and time, and the record of its earlier check would vouch for it).
        if not download:
            raise DataError(f"{error} (`fashionlab data fetch --recheck` replaces a damaged "
                            "copy in the cache)") from None
        try:
            fetch_fashion_mnist(mirrors=mirrors, checksums=checksums, recheck=True)
        except DataError as fetching:
            raise DataError(f"{error}; fetching it again failed: {fetching}") from None
        return load_idx_dataset(found, checksums=checksums if verify else None)


def load_fashion_mnist_test(
    directory: PathLike | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, FileChecksum] | None = None,
) -> tuple[Split, Path]:
    """The test split and the folder it was read from. A folder you name (or FASHIONLAB_DATA)
    needs only the two t10k files, which is all that scoring a model reads; elsewhere the
    dataset is found, fetched and loaded as `load_fashion_mnist` does."""
    checksums = FASHION_MNIST_CHECKSUMS if checksums is None else checksums
    named = _named_folder(directory)
    if named is None:
        dataset = load_fashion_mnist(download=download, verify=verify, mirrors=mirrors,
                                     checksums=checksums)
        return dataset.test, dataset.source
    try:
        return load_idx_test_split(named, checksums=checksums if verify else None), named
    except DataError as error:
        if directory is None:  # say where the folder came from
            raise DataError(f"{error} ({DATA_ENV}={os.environ[DATA_ENV]})") from None
        raise


# ---------------------------------------------------------------------------------------------
# Fetching: copy from Debian's directory or download, verify, and install atomically.


class _TransferError(Exception):
    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(" ".join(reason.split()))  # one line, whatever the server said
        self.transient = transient


def _mirrors(mirrors: Sequence[str] | None) -> tuple[str, ...]:
    """The mirrors to try, each checked to be an http(s) address: a DataError naming where
    it came from (`mirrors`, or FASHIONLAB_MIRRORS) otherwise."""
    source = "mirrors"
    if mirrors is None:
        mirrors = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split() or DEFAULT_MIRRORS
        source = MIRRORS_ENV
    for base in mirrors:
        try:
            parts = urllib.parse.urlsplit(base)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - read to check it: a port of letters, or over 65535
        except ValueError:  # e.g. "http://[::1", "http://host:abc/": does not parse
            valid = False
        if not valid:
            raise DataError(f"{source}: {_masked(base)!r} is not an http:// or https:// "
                            "address (e.g. https://example.org/fashion-mnist/)")
        if "@" in parts.netloc:  # urllib would send no credentials, and errors would show them
            raise DataError(f"{source}: {_masked(base)!r} holds a user name or password, "
                            "which fashionlab does not send: name a public mirror")
    return tuple(mirrors)


def _masked(url: str) -> str:
    """`url` as an error shows it: what comes before an "@" in its address masked."""
    scheme, separator, rest = url.partition("://")
    address, slash, path = rest.partition("/")
    if not separator or "@" not in address:
        return url
    return f"{scheme}://***@{address.rpartition('@')[2]}{slash}{path}"


def _download_once(url: str, *, timeout: float, limit: int,
                   on_progress: Callable[[int, int | None], None]) -> tuple[bytes, bool]:
    """The body of `url`, complete and gzip-looking, or a _TransferError; one of more than
    `limit` bytes is not read to its end (nor held in memory). With it, whether the server
    said its length (without, a connection that dropped looks like the end of the body)."""
    request = urllib.request.Request(url, headers={"User-Agent": "fashionlab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            chunks, received, started = [], 0, time.monotonic()
            # read1: what has arrived, so that a server sending a byte a second is judged
            # by its rate below (each byte resets the socket's time-out, and read() would
            # wait for all 64 kB)
            while chunk := response.read1(1 << 16):
                chunks.append(chunk)
                received += len(chunk)
                on_progress(received, total)
                if received > limit:
                    raise _TransferError(f"sent more than {limit} bytes, more than the file "
                                         "can take compressed", transient=False)
                elapsed = time.monotonic() - started
                if elapsed > max(timeout, SLOW_AFTER) and received < MIN_RATE * elapsed:
                    raise _TransferError(f"too slow: {received} bytes in {elapsed:.0f} s (less "
                                         f"than {MIN_RATE // 1000} kB/s)", transient=True)
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
    return body, total is not None


def _download(name: str, *, mirrors: Sequence[str], expected: FileChecksum, timeout: float,
              retries: int, backoff: float, progress: bool,
              unreachable: dict[str, str]) -> bytes:
    """Decompressed, verified contents of `name`, trying each mirror in turn. `unreachable`
    (mirror -> why) holds the mirrors a transfer failed from, for the next files: they are not
    tried again (a silent server costs its time-outs once, not once per file)."""
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
    console = Console(stderr=True)
    # Off a terminal a transient bar leaves only empty lines behind: none there.
    with Progress(*columns, console=console, transient=True,
                  disable=not progress or not console.is_terminal) as bar:
        for base in mirrors:
            url = f"{base.rstrip('/')}/{name}.gz"
            if base in unreachable:
                failures.append(f"{url}: not tried ({unreachable[base]} before)")
                continue
            for attempt in range(retries + 1):
                task = bar.add_task(f"{name}.gz", total=None)
                try:
                    # (gzip adds at most ~0.1% and its headers to data it cannot shrink)
                    body, sized = _download_once(
                        url, timeout=timeout, limit=expected.size + (1 << 20),
                        on_progress=lambda done, total, task=task: bar.update(
                            task, completed=done, total=total))
                    try:
                        data = gunzip(body, source=url, size=expected.size)
                    except TruncatedGzip:
                        if sized:  # the whole of what the server has: it won't improve
                            raise
                        # a dropped connection, of a server that sent no length: again
                        raise _TransferError("transfer cut short (its gzip data end early)",
                                             transient=True) from None
                    check(data, expected, source=url)
                    return data
                except _TransferError as error:
                    reason = str(error)
                    if error.transient and attempt < retries:
                        time.sleep(backoff * (attempt + 1))
                        continue
                    unreachable[base] = reason
                except DataError as error:  # corrupt or wrong content: this mirror won't improve
                    reason = str(error).removeprefix(f"{url}: ")
                finally:
                    bar.remove_task(task)
                break
            failures.append(f"{url}: {reason}")
            if progress and base != mirrors[-1]:  # a fallback is said, not silent
                console.print(f"{failures[-1]}; trying the next mirror", markup=False,
                              highlight=False, soft_wrap=True)
    raise DataError(f"could not download {name}.gz: " + "; ".join(failures))


def _ensure_writable(directory: Path, *, what: str) -> None:
    blocking = file_in_the_way(directory)
    if blocking is not None:
        raise DataError(f"{what} {directory}: {blocking} is a file, not a folder")
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
    recheck: bool = False,
) -> Path:
    """Make verified copies of the four files sit in `directory` (default: the user cache).

    Files already there and verified are kept (a folder that holds them all is only read;
    `recheck` hashes them again even where an earlier check is remembered). In the cache,
    damaged copies are replaced; in a `directory` of the caller's, a file that is there but
    not Fashion-MNIST's (damaged, or another dataset's, such as MNIST digits under the same
    names) is theirs: a DataError before anything is written, and nothing is deleted. The
    missing files are copied from DEBIAN_DIR when it has them, else downloaded from `mirrors`
    (each tried `1 + retries` times on time-outs, dropped connections and server errors, with
    `timeout` seconds per network operation; a mirror whose transfer failed is not asked again
    for the next files). They are stored decompressed, so that loading skips gunzip.
    `checksums` defaults to FASHION_MNIST_CHECKSUMS; `mirrors` to FASHIONLAB_MIRRORS or
    DEFAULT_MIRRORS. Returns the directory.
    """
    checksums = FASHION_MNIST_CHECKSUMS if checksums is None else checksums
    target = Path(directory).expanduser() if directory is not None else cache_dir()
    what = "directory" if directory is not None else "cache directory"
    if not target.is_dir():
        _ensure_writable(target, what=what)
    # Half-written copies of a fetch that was killed (a download is 30 MB): gone.
    remove_stale_staging(target, names=FILE_NAMES)
    memo = {} if recheck else read_memo()
    # What is there first, every file: a user's folder is refused before anything is written.
    new_entries, wanted = {}, {}
    for name in FILE_NAMES:
        expected = checksums[name]
        existing = find_one(target, name)
        if existing is None:
            wanted[name] = None
            continue
        stat = existing.stat()
        if remembered(memo, existing, stat, expected):
            continue
        try:
            digest = check(read_decompressed(existing, size=expected.size), expected,
                           source=existing)
            new_entries.update(memo_entry(existing, stat, digest))
        except DataError as problem:
            if directory is not None:
                raise DataError(f"{problem}: fetch replaces no file in a folder you name (it "
                                "may be another dataset's); move it away or fetch into "
                                "another folder") from None
            wanted[name] = existing  # a damaged copy in the cache: replaced
    if wanted:
        _ensure_writable(target, what=what)
    unreachable: dict[str, str] = {}  # mirrors that failed a transfer: not asked again
    for name, existing in wanted.items():
        expected = checksums[name]
        data = None
        debian = find_one(DEBIAN_DIR, name)
        if debian is not None and debian.parent.resolve() != target.resolve():
            try:
                data = read_decompressed(debian, size=expected.size)
                digest = check(data, expected, source=debian)
            except DataError:
                data = None  # a damaged system copy: download instead
        if data is None:
            data = _download(name, mirrors=_mirrors(mirrors), expected=expected,
                             timeout=timeout, retries=retries, backoff=backoff, progress=progress,
                             unreachable=unreachable)
            digest = expected.sha256
        try:
            final = write_atomic(target, name, data)
        except OSError as error:
            raise DataError(f"{target / name}: cannot write ({error.strerror or error})") from None
        if existing is not None and existing != final:
            existing.unlink(missing_ok=True)  # a damaged .gz would otherwise linger beside it
        new_entries.update(memo_entry(final, final.stat(), digest))
    remember(new_entries)
    return target
