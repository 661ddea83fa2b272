"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fashionlab.cli import main
from fashionlab.progress import Silent


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `fashionlab ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A user error: exit code 2, exactly one line on stderr, no traceback."""
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def tiny_study_toml(data_dir: Path, *, name: str = "tiny", epochs: int = 4, folds: int = 3,
                    extra: str = "", candidates: str | None = None, final: bool = True,
                    train: str = "", patience: int = 2) -> str:
    """A small study over the tiny synthetic dataset: trains in seconds. `train` adds lines to
    the [train] table, `extra` whole tables."""
    if candidates is None:
        candidates = """
[[candidates]]
name = "small"
layers = [{ units = 16 }]

[[candidates]]
name = "small L2"
layers = [{ units = 16, l2 = 0.001 }]

[[candidates]]
name = "two layers"
layers = [{ units = 16, dropout = 0.2 }, { units = 8, dropout = 0.1 }]
"""
    finals = """
[[final]]
name = "cnn"
conv = [{ filters = 4, pool = 2 }, { filters = 8, pool = 2 }]
dropout = 0.2
layers = [{ units = 16 }]
train = { epochs = 2 }
""" if final else ""
    return f"""
name = "{name}"
seed = 3

[data]
directory = "{data_dir}"
verify = false

[train]
epochs = {epochs}
batch_size = 32
{train}

[cv]
n_splits = {folds}

[warning]
patience = {patience}
min_delta = 0.02
{extra}
{candidates}
{finals}
"""


def chatty_job(epochs: int, name: str, reporter) -> None:
    """A job for run_in_workers tests that reports `epochs` epochs as fast as it can and ends:
    its queue is still sending them when the job is over."""
    for epoch in range(1, epochs + 1):
        reporter.epoch(name, epoch, {})


def record_job(path: str, name: str, reporter) -> None:
    """A job for run_in_workers tests: note which process ran it, report one epoch."""
    import os
    import time

    if name == "fails":
        raise RuntimeError("this job fails")
    if name == "dies":  # as the out-of-memory killer ends a worker: no word, no exception
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    with open(path, "a") as out:
        out.write(f"{name} {os.getpid()}\n")
    reporter.epoch(name, 1, {})


class OnEpoch(Silent):
    """A reporter that calls `hook(key, epoch)` after each stored epoch of each model, the way
    tests interrupt or kill a run at a chosen moment."""

    def __init__(self, hook) -> None:
        self.hook = hook

    def epoch(self, label, epoch, metrics) -> None:
        for key in metrics:
            self.hook(key, epoch)


class Recorder(Silent):
    """A reporter that records every call: (name, args...)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, label, epochs) -> None:
        self.calls.append(("start", label, epochs))

    def epoch(self, label, epoch, metrics) -> None:
        self.calls.append(("epoch", label, epoch, sorted(metrics)))

    def finish(self, label) -> None:
        self.calls.append(("finish", label))

    def log(self, message) -> None:
        self.calls.append(("log", message))


def tiny_search_toml(data_dir: Path, *, n_trials: int) -> str:
    """A search over the learning rate of one small candidate, 2 folds of 2 epochs: seconds."""
    return tiny_study_toml(
        data_dir, name="tiny-search", epochs=2, patience=1, final=False, folds=2,
        candidates='[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n',
        extra=f'[search]\nn_trials = {n_trials}\npruner = "none"\n\n[search.space]\n'
              'learning_rate = { low = 1e-3, high = 0.1, log = true }\n')


def dead_pid() -> int:
    """The pid of a process that has ended (what a killed process's staging names carry)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def helper_job(mode: str, path: str, reporter) -> None:
    """A helper process's work for `runner.Helpers` tests: report an epoch, fail as a user's
    error does, stop as Ctrl-C does, or wait for a stop (noting it in `path`)."""
    import time

    from fashionlab.errors import ConfigError

    reporter.epoch(f"helper {mode}", 1, {})
    if mode == "fails":
        raise ConfigError("the helper's one line")
    if mode == "stops":
        raise KeyboardInterrupt
    if mode == "waits":
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            with open(path, "w") as out:
                out.write("stopped\n")
            raise


def _die_now() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class KillsWhoReadsIt:
    """An argument whose unpickling kills the process that reads it (a helper killed while it
    receives its work)."""

    def __reduce__(self):
        return (_die_now, ())
