"""Fault injection: a study on the default parallel path (a worker process beside the
fashionlab process) is killed, terminated, damaged and starved, and must always resume to the
numbers of an uninterrupted run, leaving no process and no temporary file behind.

The kills land at seeded random moments: `FASHIONLAB_FAULT_KILLS` sets how many (6 by
default; 50 for the long mode: `FASHIONLAB_FAULT_KILLS=50 make test ARGS=tests/faults`) and
`FASHIONLAB_FAULT_SEED` which moments.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_study_toml

KILLS = int(os.environ.get("FASHIONLAB_FAULT_KILLS", "6"))
SEED = int(os.environ.get("FASHIONLAB_FAULT_SEED", "0"))

# Two dense stacks and a CNN: three independent jobs, so --workers 2 trains them side by side.
STUDY = {"epochs": 6, "folds": 3, "train": "", "final": True}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fashionlab.cli import main; main()", *args]


def _study(tmp: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    path = tmp / "faults.toml"
    if not path.exists():
        path.write_text(tiny_study_toml(data, name="faults", **STUDY))
    return _command("study", str(path), "--workers", "2", "--run-dir", str(run_dir), *extra)


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (Linux /proc), recursively."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited: only its parent's wait() is missing
            alive.add(pid)
    return alive


def _assert_all_gone(pids: set[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids), f"processes of the killed run still alive: {_alive(pids)}"


def _rows(run_dir: Path) -> list[tuple[object, ...]]:
    """Every stored epoch (key, epoch, metrics); NaN as None so that rows compare."""
    # closing(): sqlite3's own context manager commits but leaves the connection open, and its
    # late close would delete the -shm file under a following rmtree of the run directory.
    with contextlib.closing(sqlite3.connect(run_dir / "fashionlab.db")) as db:
        rows = db.execute("SELECT key, epoch, loss, accuracy, val_loss, val_accuracy "
                          "FROM fl_epochs ORDER BY key, epoch").fetchall()
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row)
            for row in rows]


def _results(run_dir: Path) -> tuple[str, list[tuple[object, ...]]]:
    (output,) = [p for p in run_dir.iterdir() if p.is_dir()]
    return (output / "results.csv").read_text(), _rows(run_dir)


def _temporary_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, tuple]:
    """An uninterrupted run: (data dir, work dir, its duration, its results)."""
    from conftest import write_tiny_idx

    tmp = tmp_path_factory.mktemp("faults")
    data = write_tiny_idx(tmp / "data")
    started = time.monotonic()
    subprocess.run(_study(tmp, data, tmp / "reference"), check=True, capture_output=True,
                   env=_environment(), timeout=600)
    return data, tmp, time.monotonic() - started, _results(tmp / "reference")


def _kill_at(command: list[str], delay: float, sig: int) -> tuple[int, set[int], str]:
    """Start `command`, send `sig` to it after `delay` seconds (or let it end first):
    (exit status, the processes it had started, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=_environment())
    deadline = time.monotonic() + delay
    seen: set[int] = set()
    while time.monotonic() < deadline and process.poll() is None:
        seen |= _descendants(process.pid)
        time.sleep(0.05)
    seen |= _descendants(process.pid)
    if process.poll() is None:
        process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, seen, err


def test_sigkill_at_random_moments_always_resumes_to_the_same_numbers(reference, tmp_path):
    data, tmp, duration, expected = reference
    run_dir = tmp_path / "killed"
    rng = random.Random(SEED)
    kills = 0
    for attempt in range(3 * KILLS):  # a kill that lands after the end does not count
        delay = rng.uniform(0.15, 0.9) * duration
        status, children, err = _kill_at(_study(tmp, data, run_dir), delay, signal.SIGKILL)
        _assert_all_gone(children)
        assert status in (0, -signal.SIGKILL), err[-2000:]
        rows = _rows(run_dir) if (run_dir / "fashionlab.db").exists() else []
        assert len(rows) == len({(key, epoch) for key, epoch, *_ in rows})  # none twice
        if status == 0:  # it finished before the kill: start the chain again
            shutil.rmtree(run_dir)
            continue
        kills += 1
        if kills == KILLS:
            break
    assert kills == KILLS, f"only {kills} kills landed in {attempt + 1} attempts"
    subprocess.run(_study(tmp, data, run_dir), check=True, capture_output=True,
                   env=_environment(), timeout=600)
    assert _results(run_dir) == expected
    assert _temporary_files(run_dir) == []
    assert not (next(p for p in run_dir.iterdir() if p.is_dir()) / "checkpoints").exists()


def test_sigterm_stops_the_study_like_ctrl_c(reference, tmp_path):
    data, tmp, duration, expected = reference
    run_dir = tmp_path / "terminated"
    # Halfway: late enough to be past start-up, early enough not to land in the exit itself,
    # unless this run is much faster than the reference was (a machine busy while that one
    # ran): a signal after the work is done ends the process the default way (-15), or not at
    # all (0). Then again, earlier.
    for attempt in range(4):
        status, children, err = _kill_at(_study(tmp, data, run_dir), 0.5 ** (attempt + 1)
                                         * duration, signal.SIGTERM)
        if status not in (0, -signal.SIGTERM):
            break
        _assert_all_gone(children)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == ("stopped by SIGTERM: the run is kept; run the "
                                            "same command again to resume it")
    assert "Traceback" not in err
    _assert_all_gone(children)
    listed = subprocess.run(_command("runs", "list", "--run-dir", str(run_dir), "--json"),
                            check=True, capture_output=True, text=True, env=_environment())
    # Interrupted; or finished when the signal came while its report was being written (the
    # same command then writes the report: see test_study's "tidied" test).
    assert '"status": "interrupted"' in listed.stdout or '"status": "finished"' in listed.stdout
    subprocess.run(_study(tmp, data, run_dir), check=True, capture_output=True,
                   env=_environment(), timeout=600)
    assert _results(run_dir) == expected


@pytest.fixture(scope="module")
def killed_with_checkpoints(reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed while it had checkpoints: each damage test damages a copy of it."""
    data, tmp, duration, _ = reference
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    rng = random.Random(f"{SEED}-checkpoints")
    for _ in range(10):  # kill until a checkpoint is there to damage
        _kill_at(_study(tmp, data, run_dir), rng.uniform(0.4, 0.8) * duration, signal.SIGKILL)
        if list(run_dir.glob("*/checkpoints/*.pt")):
            return run_dir
        shutil.rmtree(run_dir, ignore_errors=True)
    pytest.fail("no kill left a checkpoint")


@pytest.mark.parametrize("damage", ["truncate", "empty", "random bytes"])
def test_a_damaged_checkpoint_is_reported_and_the_run_resumes(
        reference, killed_with_checkpoints, tmp_path, damage):
    data, tmp, _, expected = reference
    run_dir = tmp_path / "damaged"
    shutil.copytree(killed_with_checkpoints, run_dir)  # a run directory resumes where it lies
    checkpoints = sorted(run_dir.glob("*/checkpoints/*.pt"))
    for path in checkpoints:
        raw = path.read_bytes()
        path.write_bytes({"truncate": raw[: len(raw) // 2], "empty": b"",
                          "random bytes": os.urandom(len(raw))}[damage])
    resumed = subprocess.run(_study(tmp, data, run_dir), capture_output=True, text=True,
                             env=_environment(), timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert _results(run_dir) == expected
    assert _temporary_files(run_dir) == []


def test_a_finished_run_is_shown_from_a_read_only_store(reference, tmp_path):
    data, tmp, _, expected = reference
    run_dir = tmp_path / "read-only"
    shutil.copytree(tmp / "reference", run_dir)
    before = (run_dir / "fashionlab.db").read_bytes()
    url = f"sqlite:///{run_dir / 'fashionlab.db'}?mode=ro&uri=true"  # root ignores chmod
    shown = subprocess.run(_study(tmp, data, run_dir, "--store", url), capture_output=True,
                           text=True, env=_environment(), timeout=600, check=False)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "faults: run" in shown.stdout
    assert (run_dir / "fashionlab.db").read_bytes() == before
    assert _results(run_dir) == expected
