"""Fetching: mirrors tried in turn, retries and time-outs, atomic installs, copies from Debian.

A local HTTP server (127.0.0.1, a free port) serves the tiny synthetic dataset; each first path
segment picks a behaviour, so one server plays every kind of mirror.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import dead_pid

from fashionlab import data
from fashionlab.data import FILE_NAMES, FileChecksum, fetch_fashion_mnist, load_fashion_mnist
from fashionlab.data import fetch as fetch_module
from fashionlab.data import files as files_module
from fashionlab.errors import DataError
from fashionlab.idx import read_idx, write_idx


class Mirror(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        mode, _, file = self.path.strip("/").partition("/")
        self.server.requests[mode] += 1
        self.server.behaviours[mode](self, file)

    def send_body(self, body: bytes, *, length: int | None = None,
                  content_type: str = "application/gzip") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # keep pytest's output clean


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is what some tests want


@pytest.fixture
def tiny_gz(tiny_idx_dir: Path) -> dict[str, bytes]:
    """The tiny dataset's .gz files as served: name (no .gz) -> bytes."""
    return {name: (tiny_idx_dir / f"{name}.gz").read_bytes() for name in FILE_NAMES}


@pytest.fixture
def sums(tiny_gz: dict[str, bytes]) -> dict[str, FileChecksum]:
    """The checksum table of the tiny dataset, injected in place of Fashion-MNIST's."""
    table = {}
    for name, body in tiny_gz.items():
        raw = gzip.decompress(body)
        table[name] = FileChecksum(data.sha256(raw), len(raw))
    return table


@pytest.fixture
def server(tiny_gz: dict[str, bytes]) -> Iterator[ThreadingHTTPServer]:
    flaky_seen: Counter[str] = Counter()

    def good(h: Mirror, file: str) -> None:
        h.send_body(tiny_gz[file.removesuffix(".gz")])

    def flaky(h: Mirror, file: str) -> None:  # a 503 first, then the file
        flaky_seen[file] += 1
        if flaky_seen[file] == 1:
            h.send_error(503)
        else:
            good(h, file)

    def trickle(h: Mirror, file: str) -> None:  # a byte every 50 ms: no read ever times out
        body = tiny_gz[file.removesuffix(".gz")]
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        with contextlib.suppress(OSError):  # until the client hangs up
            for byte in body:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(0.05)

    def cut_unsized(h: Mirror, body: bytes) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: the end of the connection ends the body
        h.wfile.write(body[: len(body) // 2])
        h.close_connection = True

    behaviours: dict[str, Callable[[Mirror, str], None]] = {
        "good": good,
        "flaky": flaky,
        "html": lambda h, f: h.send_body(b"<!DOCTYPE html><html>moved</html>",
                                         content_type="text/html"),
        "missing": lambda h, f: h.send_error(404),
        "short": lambda h, f: h.send_body(tiny_gz[f.removesuffix(".gz")][:-20]),
        "wrong": lambda h, f: h.send_body(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x07")),
        # Promises the whole file, sends half, hangs up.
        "cut": lambda h, f: h.send_body(tiny_gz[f.removesuffix(".gz")][:500],
                                        length=len(tiny_gz[f.removesuffix(".gz")])),
        "slow": lambda h, f: (time.sleep(1.0), good(h, f)),
        "trickle": trickle,
        # Half the file, no length said, then the connection dropped.
        "cut-unsized": lambda h, f: cut_unsized(h, tiny_gz[f.removesuffix(".gz")]),
    }
    httpd = QuietServer(("127.0.0.1", 0), Mirror)
    httpd.behaviours, httpd.requests = behaviours, Counter()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: ThreadingHTTPServer, mode: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{mode}/"


@pytest.fixture
def no_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Debian's directory pointed at an empty one, so fetching must download."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", empty)
    return empty


FAST = {"retries": 1, "backoff": 0.0, "timeout": 5.0, "progress": False}


def assert_installed(cache: Path, tiny_gz: dict[str, bytes]) -> None:
    """Exactly the four decompressed files (and the memo): no temporary leftovers."""
    assert sorted(p.name for p in cache.iterdir()) == sorted([*FILE_NAMES, "verified.json"])
    for name, body in tiny_gz.items():
        assert (cache / name).read_bytes() == gzip.decompress(body)


@pytest.mark.parametrize("broken", ["html", "missing", "short", "wrong"])
def test_broken_mirror_then_good(server: ThreadingHTTPServer, sums: dict[str, FileChecksum],
                                 tiny_gz: dict[str, bytes], isolated_data_env: Path,
                                 no_debian: Path, broken: str):
    mirrors = [url(server, broken), url(server, "good")]
    assert fetch_fashion_mnist(mirrors=mirrors, checksums=sums, **FAST) == isolated_data_env
    assert_installed(isolated_data_env, tiny_gz)
    # Wrong content is not transient: one request per file, no retries. A mirror whose
    # transfer failed (an HTML page, a 404) is not asked for the next files; one that sent a
    # damaged or wrong file is (another file may be whole there).
    asked = 1 if broken in ("html", "missing") else 4
    assert server.requests == {broken: asked, "good": 4}


def test_every_mirror_failing_is_one_line_listing_each(server: ThreadingHTTPServer,
                                                       sums: dict[str, FileChecksum],
                                                       isolated_data_env: Path,
                                                       no_debian: Path):
    mirrors = [url(server, mode) for mode in ("html", "missing", "short", "wrong")]
    with pytest.raises(DataError) as error:
        fetch_fashion_mnist(mirrors=mirrors, checksums=sums, **FAST)
    message = str(error.value)
    assert "\n" not in message and f"could not download {data.TRAIN_IMAGES}.gz" in message
    for mirror, reason in zip(mirrors, ("HTML page", "HTTP 404", "gzip data is truncated",
                                        "checksum mismatch")):
        assert f"{mirror}{data.TRAIN_IMAGES}.gz: " in message and reason in message, message
    assert list(isolated_data_env.iterdir()) == []


def test_interrupted_transfer_is_retried_and_leaves_nothing(server: ThreadingHTTPServer,
                                                            sums: dict[str, FileChecksum],
                                                            isolated_data_env: Path,
                                                            no_debian: Path):
    with pytest.raises(DataError, match="transfer cut short at 500 of"):
        fetch_fashion_mnist(mirrors=[url(server, "cut")], checksums=sums, **FAST)
    assert server.requests["cut"] == 2  # the first try and one retry
    assert list(isolated_data_env.iterdir()) == []


def test_transient_server_error_is_retried(server: ThreadingHTTPServer,
                                           sums: dict[str, FileChecksum],
                                           tiny_gz: dict[str, bytes], isolated_data_env: Path,
                                           no_debian: Path):
    fetch_fashion_mnist(mirrors=[url(server, "flaky")], checksums=sums, **FAST)
    assert_installed(isolated_data_env, tiny_gz)
    assert server.requests["flaky"] == 8  # a 503, then the file, for each of the four


def test_a_mirror_that_trickles_is_given_up_for_the_next(
        server: ThreadingHTTPServer, sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
        isolated_data_env: Path, no_debian: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]):
    """A byte now and then resets the socket's time-out each time: the transfer's rate, not
    the time-out, gives such a server up (here after 0.3 s instead of 60)."""
    monkeypatch.setattr(fetch_module, "SLOW_AFTER", 0.3)
    start = time.perf_counter()
    fetch_fashion_mnist(mirrors=[url(server, "trickle"), url(server, "good")], checksums=sums,
                        **{**FAST, "timeout": 0.2, "progress": True})
    assert time.perf_counter() - start < 5.0
    assert_installed(isolated_data_env, tiny_gz)
    assert server.requests == {"trickle": 2, "good": 4}  # a try and a retry, then never again
    assert "trickle/train-images-idx3-ubyte.gz: too slow: " in capfd.readouterr().err


def test_a_connection_dropped_without_a_length_is_retried(
        server: ThreadingHTTPServer, sums: dict[str, FileChecksum],
        isolated_data_env: Path, no_debian: Path):
    with pytest.raises(DataError, match=r"transfer cut short \(its gzip data end early\)"):
        fetch_fashion_mnist(mirrors=[url(server, "cut-unsized")], checksums=sums, **FAST)
    assert server.requests["cut-unsized"] == 2  # the first try and one retry
    assert list(isolated_data_env.iterdir()) == []


def test_time_outs_are_bounded(server: ThreadingHTTPServer, sums: dict[str, FileChecksum],
                               isolated_data_env: Path, no_debian: Path):
    start = time.perf_counter()
    with pytest.raises(DataError, match="timed out after 0.1 s"):
        fetch_fashion_mnist(mirrors=[url(server, "slow")], checksums=sums,
                            **{**FAST, "timeout": 0.1})
    assert time.perf_counter() - start < 1.0
    assert server.requests["slow"] == 2


def test_mirrors_from_the_environment(server: ThreadingHTTPServer,
                                      sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
                                      isolated_data_env: Path, no_debian: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str]):
    monkeypatch.setenv("FASHIONLAB_MIRRORS", f"{url(server, 'missing')}, {url(server, 'good')}")
    fetch_fashion_mnist(checksums=sums, **{**FAST, "progress": True})
    assert_installed(isolated_data_env, tiny_gz)
    # Off a terminal, no bar (not even its empty lines): the fallback's one line only.
    assert capfd.readouterr().err == (f"{url(server, 'missing')}{data.TRAIN_IMAGES}.gz: HTTP "
                                      "404 Not Found; trying the next mirror\n")
    assert server.requests == {"missing": 1, "good": 4}


@pytest.mark.parametrize("mirror", ["mirror.example.org/fashion", "http://[::1",
                                    "ftp://example.org/fashion", "https://",
                                    "http://127.0.0.1:abc/", "http://127.0.0.1:99999/"])
def test_a_mirror_that_is_no_http_address_is_one_line_before_any_download(
        sums: dict[str, FileChecksum], isolated_data_env: Path, no_debian: Path,
        monkeypatch: pytest.MonkeyPatch, mirror: str):
    monkeypatch.setenv("FASHIONLAB_MIRRORS", f"https://example.org/ok/ {mirror}")
    with pytest.raises(DataError) as error:
        fetch_fashion_mnist(checksums=sums, **FAST)
    assert str(error.value) == (f"FASHIONLAB_MIRRORS: {mirror!r} is not an http:// or https:// "
                                "address (e.g. https://example.org/fashion-mnist/)")
    with pytest.raises(DataError, match=r"^mirrors: 'x' is not an http"):
        fetch_fashion_mnist(mirrors=["x"], checksums=sums, **FAST)
    assert not any(isolated_data_env.rglob("*.gz"))


def test_load_downloads_when_nothing_is_local(server: ThreadingHTTPServer,
                                              sums: dict[str, FileChecksum],
                                              isolated_data_env: Path, no_debian: Path):
    with pytest.raises(DataError, match="run `fashionlab data fetch`"):
        load_fashion_mnist(download=False, checksums=sums)
    dataset = load_fashion_mnist(mirrors=[url(server, "good")], checksums=sums)
    assert dataset.source == isolated_data_env and dataset.verified
    assert dataset.train.images.shape == (300, 28, 28)


def test_unwritable_cache_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              sums: dict[str, FileChecksum], no_debian: Path):
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "cache"  # below a regular file: not creatable, even by root
    monkeypatch.setenv("FASHIONLAB_CACHE", str(cache))
    for call in (lambda: fetch_fashion_mnist(checksums=sums, **FAST),
                 lambda: load_fashion_mnist(checksums=sums)):
        with pytest.raises(DataError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message
        assert message == (f"cache directory {cache}: {tmp_path / 'a-file'} is a file, not a "
                           "folder"), message


def test_fetch_copies_decompressed_from_debian(tiny_idx_dir: Path, sums: dict[str, FileChecksum],
                                               tiny_gz: dict[str, bytes],
                                               isolated_data_env: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    # mirrors: a closed port (conftest)
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    fetch_fashion_mnist(checksums=sums, **FAST)
    assert_installed(isolated_data_env, tiny_gz)

    before = {name: (isolated_data_env / name).stat().st_mtime_ns for name in FILE_NAMES}
    hashed: list[int] = []
    monkeypatch.setattr(files_module, "sha256", lambda raw: hashed.append(1) or "unused")
    fetch_fashion_mnist(checksums=sums, **FAST)  # everything in place and remembered
    assert hashed == []
    assert before == {name: (isolated_data_env / name).stat().st_mtime_ns for name in FILE_NAMES}


def test_fetch_removes_what_a_killed_fetch_left(tiny_idx_dir: Path,
                                               sums: dict[str, FileChecksum],
                                               isolated_data_env: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    isolated_data_env.mkdir(parents=True, exist_ok=True)
    left = isolated_data_env / f".{data.TRAIN_IMAGES}.{dead_pid()}.tmp"
    left.write_bytes(b"half a download")
    fetch_fashion_mnist(checksums=sums, **FAST)
    assert not left.exists()
    assert not list(isolated_data_env.glob(".*.tmp"))


def test_fetch_replaces_a_damaged_cached_file(tiny_idx_dir: Path, sums: dict[str, FileChecksum],
                                              tiny_gz: dict[str, bytes], isolated_data_env: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    (isolated_data_env / f"{data.TRAIN_LABELS}.gz").write_bytes(b"not gzip")
    fetch_fashion_mnist(checksums=sums, **FAST)
    assert_installed(isolated_data_env, tiny_gz)


def test_damaged_debian_copy_falls_back_to_download(server: ThreadingHTTPServer,
                                                    tiny_idx_dir: Path,
                                                    sums: dict[str, FileChecksum],
                                                    tiny_gz: dict[str, bytes],
                                                    isolated_data_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    (tiny_idx_dir / f"{data.TEST_IMAGES}.gz").write_bytes(gzip.compress(b"other bytes"))
    fetch_fashion_mnist(mirrors=[url(server, "good")], checksums=sums, **FAST)
    assert_installed(isolated_data_env, tiny_gz)
    assert server.requests == {"good": 1}


def test_fetch_into_a_named_directory(tiny_idx_dir: Path, sums: dict[str, FileChecksum],
                                      tiny_gz: dict[str, bytes], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    target = tmp_path / "elsewhere" / "fm"
    assert fetch_fashion_mnist(target, checksums=sums, **FAST) == target
    assert sorted(os.listdir(target)) == sorted(FILE_NAMES)
    assert load_fashion_mnist(target, checksums=sums).verified


def test_a_silent_mirror_costs_its_time_outs_once_and_the_fallback_is_said(
        server: ThreadingHTTPServer, sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
        isolated_data_env: Path, no_debian: Path, capsys: pytest.CaptureFixture[str]):
    fetch_fashion_mnist(mirrors=[url(server, "slow"), url(server, "good")], checksums=sums,
                        **{**FAST, "timeout": 0.1, "progress": True})
    assert_installed(isolated_data_env, tiny_gz)
    # Its two tries for the first file, none for the three others.
    assert server.requests == {"slow": 2, "good": 4}
    said = capsys.readouterr().err
    assert f"{url(server, 'slow')}{data.TRAIN_IMAGES}.gz: timed out after 0.1 s; trying the " \
        "next mirror" in said, said


def test_fetch_never_deletes_or_mixes_into_a_folder_of_another_dataset(
        tiny_idx_dir: Path, sums: dict[str, FileChecksum], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    # A folder of the user's: MNIST digits, say, under Fashion-MNIST's file names, one of them
    # missing (a fetch must not fill it in beside the others), one with bytes after its gzip
    # stream (which zcat reads).
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    mine = tmp_path / "mnist"
    mine.mkdir()
    for name in FILE_NAMES[1:]:
        (mine / f"{name}.gz").write_bytes((tiny_idx_dir / f"{name}.gz").read_bytes())
    labels = mine / f"{data.TRAIN_LABELS}.gz"
    write_idx(labels, (read_idx(labels) + 1) % 10)  # a whole, valid IDX file of other labels
    (mine / f"{data.TEST_LABELS}.gz").write_bytes(
        (tiny_idx_dir / f"{data.TEST_LABELS}.gz").read_bytes() + b"trailing")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(DataError) as error:
        fetch_fashion_mnist(mine, checksums=sums, **FAST)
    message = str(error.value)
    assert message.startswith(f"{labels}: checksum mismatch: SHA-256 ") and message.endswith(
        ": fetch replaces no file in a folder you name (it may be another dataset's); move it "
        "away or fetch into another folder"), message
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before  # nothing written
    # Without the labels it is the file with trailing bytes that is refused, as it is.
    labels.unlink()
    with pytest.raises(DataError, match="fetch replaces no file in a folder you name"):
        fetch_fashion_mnist(mine, checksums=sums, **FAST)
    assert sorted(p.name for p in mine.iterdir()) == sorted(
        f"{name}.gz" for name in (data.TEST_IMAGES, data.TEST_LABELS))


def test_a_folder_holding_the_verified_files_is_only_read(tiny_idx_dir: Path,
                                                         sums: dict[str, FileChecksum],
                                                         isolated_data_env: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    fetch_fashion_mnist(checksums=sums, **FAST)

    def read_only(directory: Path, *, what: str) -> None:  # as a read-only mount answers
        raise DataError(f"{what} {directory} is not writable (Read-only file system)")

    monkeypatch.setattr(fetch_module, "_ensure_writable", read_only)
    (isolated_data_env / "verified.json").unlink()  # checked again, by reading
    assert fetch_fashion_mnist(checksums=sums, **FAST) == isolated_data_env
    (isolated_data_env / data.TEST_LABELS).write_bytes(b"cut")  # now one must be written
    with pytest.raises(DataError, match="is not writable"):
        fetch_fashion_mnist(checksums=sums, **FAST)


def test_a_damaged_copy_in_the_cache_is_fetched_again_when_loading(
        tiny_idx_dir: Path, sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
        isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    fetch_fashion_mnist(checksums=sums, **FAST)
    cut = isolated_data_env / data.TRAIN_IMAGES
    cut.write_bytes(cut.read_bytes()[:1000])  # cut short since (it hides Debian's good copy)
    with pytest.raises(DataError) as error:
        load_fashion_mnist(checksums=sums, download=False)
    assert str(error.value).startswith(f"{cut}: ") and str(error.value).endswith(
        "(`fashionlab data fetch --recheck` replaces a damaged copy in the cache)")
    assert len(load_fashion_mnist(checksums=sums).train) == 300
    assert_installed(isolated_data_env, tiny_gz)
    # Damaged where its size and time stay (a disk error): the record of its earlier check
    # vouches for it, and loading hashes it anew before fetching it again.
    stat = cut.stat()
    damaged = bytearray(cut.read_bytes())
    damaged[0] = 7  # no IDX magic any more
    cut.write_bytes(damaged)
    os.utime(cut, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(load_fashion_mnist(checksums=sums).train) == 300
    assert_installed(isolated_data_env, tiny_gz)


def test_a_file_too_large_is_refused_before_it_fills_the_memory(
        server: ThreadingHTTPServer, sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
        isolated_data_env: Path, no_debian: Path, monkeypatch: pytest.MonkeyPatch):
    # A small gzip that unpacks to 64 MB (a "bomb"), and a body larger than any gzip of the
    # file: neither is read whole (a 1 MB read limit here stands for the memory).
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    server.behaviours["bomb"] = lambda h, f: h.send_body(bomb)
    server.behaviours["huge"] = lambda h, f: h.send_body(b"\x1f\x8b" + bytes(4 << 20))
    read: list[int] = []
    original = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read",
                        lambda self, size=-1: read.append(size) or original(self, size))
    with pytest.raises(DataError) as error:
        fetch_fashion_mnist(mirrors=[url(server, "bomb"), url(server, "huge")], checksums=sums,
                            **FAST)
    message, size = str(error.value), sums[data.TRAIN_IMAGES].size
    assert f"bomb/{data.TRAIN_IMAGES}.gz: checksum mismatch: decompresses to more than {size} " \
        f"bytes, expected {size}" in message, message
    assert f"huge/{data.TRAIN_IMAGES}.gz: sent more than {size + (1 << 20)} bytes" in message
    assert read == [size + 1]  # never the whole stream
    assert list(isolated_data_env.iterdir()) == []


@pytest.mark.parametrize("mirror", ["http://me:s3cret@example.org/fm/",
                                    "https://ghp_S3CRET@example.org/fm/"])
def test_a_mirror_with_credentials_is_refused_without_showing_them(
        mirror: str, sums: dict[str, FileChecksum], isolated_data_env: Path, no_debian: Path):
    # urllib sends no user name or password: such a mirror can never work.
    with pytest.raises(DataError) as error:
        fetch_fashion_mnist(mirrors=[mirror], checksums=sums, **FAST)
    assert str(error.value) == ("mirrors: 'http" + mirror.partition("://")[0][4:] +
                                "://***@example.org/fm/' holds a user name or password, which "
                                "fashionlab does not send: name a public mirror")


def test_a_fallback_line_is_plain_text(server: ThreadingHTTPServer,
                                       sums: dict[str, FileChecksum], tiny_gz: dict[str, bytes],
                                       isolated_data_env: Path, no_debian: Path,
                                       capsys: pytest.CaptureFixture[str]):
    server.behaviours["[denied]"] = lambda h, f: h.send_error(403, "[/denied]")
    fetch_fashion_mnist(mirrors=[url(server, "[denied]"), url(server, "good")], checksums=sums,
                        **{**FAST, "progress": True})
    assert_installed(isolated_data_env, tiny_gz)
    said = capsys.readouterr().err
    assert f"{url(server, '[denied]')}{data.TRAIN_IMAGES}.gz: HTTP 403 [/denied]; trying the " \
        "next mirror" in said, said
