"""Shared fixtures: fixed seeds, an isolated data environment, a tiny synthetic IDX dataset, a
PostgreSQL server."""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from fashionlab.data import CLASS_NAMES, FILE_NAMES, write_idx
from fashionlab.store import database_url

SEED = 0


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background (`make test &`, a CI script) starts with SIGINT ignored,
    # and every command a test starts would inherit that: the tests that press Ctrl-C on one
    # would see it ignored, as the product means a background job to. Ctrl-C as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Several test processes (pytest-xdist): each gets its share of the cores, as the study's
    # workers do, and so do the commands they start. Two threads in each of two processes on
    # two cores stall at every parallel op's barrier (the training tests took 57 s, not 24 s).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch  # only for its thread count

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed Python, numpy and torch before every test, so runs repeat; returns the seed (0)."""
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture(autouse=True)
def isolated_data_env(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test off the real cache and the internet; returns the test's cache directory.

    FASHIONLAB_CACHE -> a fresh empty directory, FASHIONLAB_DATA unset, FASHIONLAB_MIRRORS -> a
    closed local port (a download fails at once instead of leaving the machine). Debian's
    /usr/share/datasets/fashion-mnist stays visible, so the real data still loads (verified
    on first load in each test: about half a second).
    """
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FASHIONLAB_CACHE", str(cache))
    monkeypatch.delenv("FASHIONLAB_DATA", raising=False)
    monkeypatch.setenv("FASHIONLAB_MIRRORS", "http://127.0.0.1:9/")
    return cache


def _tiny_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.uint8)  # (n,) balanced
    images = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)  # (n, 28, 28) dim noise
    for c in range(len(CLASS_NAMES)):
        # Class c: a bright 7x7 square in cell c of a 3x4 grid of 7x7 cells (none overlap).
        top, left = 7 * (c // 4), 7 * (c % 4)
        members = labels == c
        images[members, top:top + 7, left:left + 7] = rng.integers(
            160, 256, size=(int(members.sum()), 7, 7), dtype=np.uint8)
    return images, labels


@pytest.fixture
def tiny_idx_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST-shaped IDX dataset in a temporary directory; returns the directory.

    Files: the four standard names, gzip-compressed (train-images-idx3-ubyte.gz,
    train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz).
    train: 300 images, 30 per class; test: 100 images, 10 per class; images uint8
    (N, 28, 28), labels uint8 (N,) in 0..9, shuffled; the same bytes every time (seed 0).
    Pixels are noise in 0..63, plus for class c a 7x7 square of values in 160..255 at
    rows 7*(c // 4), columns 7*(c % 4): any classifier should reach ~100% accuracy quickly.
    Its checksums are not Fashion-MNIST's: load it with
    `load_fashion_mnist(tiny_idx_dir, verify=False)` or `load_idx_dataset(tiny_idx_dir)`.
    """
    return write_tiny_idx(tmp_path / "tiny-idx")


def write_tiny_idx(directory: Path) -> Path:
    """Write the tiny dataset of the `tiny_idx_dir` fixture into `directory` (for fixtures of
    wider scope, which cannot use a function-scoped fixture); returns the directory."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    train, test = _tiny_split(rng, 300), _tiny_split(rng, 100)
    for name, array in zip(FILE_NAMES, (*train, *test)):
        write_idx(directory / f"{name}.gz", array)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server from Debian's binaries on 127.0.0.1 in a temporary directory, with
    an empty database; stopped and removed afterwards. Missing binaries fail the test."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/"
                    "initdb): install them with `bash scripts/system-deps.sh all`")
    bin_dir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="fashionlab-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as `postgres`
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("no `postgres` system user to run the server as (Debian's postgresql "
                        "package creates it)")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            pytest.fail(f"{command[0]} failed: {done.stderr or done.stdout}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
        "-E", "UTF8", "--no-sync")
    for attempt in range(3):
        # The port was free when asked for; another test process (make test runs two) may take
        # it before the server binds it: then another port.
        started = subprocess.run(
            [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
             "-t", "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
             "start"], capture_output=True, text=True, timeout=120, check=False)
        if started.returncode == 0:
            break
        if attempt == 2:
            pytest.fail(f"pg_ctl failed: {started.stderr or started.stdout}")
        port = _free_port()
    try:
        engine = sa.create_engine(database_url(f"postgresql://postgres@127.0.0.1:{port}/postgres"),
                                  isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE fashionlab"))
        engine.dispose()
        yield f"postgresql://postgres@127.0.0.1:{port}/fashionlab"
    finally:
        subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)
