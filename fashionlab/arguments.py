"""What `run_study` and `run_search` check of their arguments before anything exists: a wrong
type or value is a ConfigError naming the argument, raised before a store, a run or a folder is
made, never an AttributeError deep inside a run left behind as interrupted."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

from fashionlab.data import Dataset
from fashionlab.errors import ConfigError
from fashionlab.progress import Reporter

# What a progress reporter answers to: the methods of the protocol, in its order.
_REPORTER_METHODS = tuple(name for name in vars(Reporter) if not name.startswith("_"))


def check_flag(name: str, value: Any) -> bool:
    """True or False, not a value Python would read as one ("no" is true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected True or False, got {value!r}")
    return value


def check_progress(progress: Any) -> None:
    """True, False, or an object with a Reporter's four methods (an instance: a class's
    methods are functions that would be called without it)."""
    if isinstance(progress, bool):
        return
    if isinstance(progress, type):
        raise ConfigError(f"progress: expected True, False or a fashionlab.progress.Reporter "
                          f"object, got the class {progress.__name__} (call it: "
                          f"{progress.__name__}())")
    missing = [m for m in _REPORTER_METHODS if not callable(getattr(progress, m, None))]
    if missing:
        raise ConfigError(f"progress: expected True, False or a fashionlab.progress.Reporter "
                          f"(methods {', '.join(_REPORTER_METHODS)}); {progress!r} has no "
                          f"{', '.join(missing)}")


def check_dataset(dataset: Any) -> None:
    """None (the study's own files) or a Dataset."""
    if dataset is not None and not isinstance(dataset, Dataset):
        raise ConfigError(f"dataset: expected a fashionlab.data.Dataset (from "
                          f"load_fashion_mnist) or None, got {type(dataset).__name__}")


def check_run_dir(run_dir: Any) -> Path:
    """A folder's path, as a Path."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ConfigError(f"run_dir: expected a folder's path, got {type(run_dir).__name__}")
    return Path(run_dir)


def check_count(name: str, value: Any, *, auto: bool = False) -> None:
    """A positive whole number (or "auto" where `auto`); a bool is no number here."""
    if auto and value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = 'a positive whole number or "auto"' if auto else "a positive whole number"
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def check_not_starting_a_worker(call: str) -> None:
    """End this process, saying why, when it is a worker importing the caller's script: workers
    start by the spawn method, which runs that script again, and a script without the
    `if __name__ == "__main__":` guard would start the study or search again in every worker.
    (The test is the one multiprocessing makes before it starts a process: the `_inheriting`
    flag it sets on a spawned process until that process has imported its parent's script.)"""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        error = ConfigError(
            f"{call} was called while a worker process imported your script: a script that "
            f"asks for workers must call it under `if __name__ == \"__main__\":` (workers "
            f"start by the spawn method, which imports the script again)")
        # Said, then this worker ends at once. Raised, the error would end it only after a
        # traceback and the shutdown of an interpreter that holds torch: slow enough, on a
        # busy machine, that the pool (which sees the worker's pipes close first) stops it
        # with SIGTERM, and the caller reads "killed" where the worker failed.
        sys.stderr.write(f"{type(error).__name__}: {error}\n")
        sys.stderr.flush()
        os._exit(1)
