"""JSON-ready values (numpy to Python, NaN and infinities to null, paths to strings), and
files written whole or not at all: under a staging name first (`staging_path`), which names
the writing process, so that what a killed process left is found and removed
(`remove_stale_staging`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fashionlab.process import ProcessIdentity, pid_exists


def jsonable(value: Any) -> Any:
    """A copy of value that `json.dumps(..., allow_nan=False)` accepts."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value


def staging_path(path: Path) -> Path:
    """Where this process writes `path` (a file or a folder) before renaming it to `path`:
    `.NAME.PID.MACHINE.tmp` beside it, MACHINE naming this machine and its boot (a folder
    shared by several machines, NFS say, holds other machines' files; a pid names a process
    on one machine, in one boot)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{_machine_tag()}.tmp")


def fresh_staging_path(path: Path) -> Path:
    """`staging_path(path)`, once what killed processes left half-written for the same `path`
    is removed (each write of a file or folder clears its own kind of leftover)."""
    remove_stale_staging(path.parent, names={path.name})
    return staging_path(path)


# Another machine's staging file this old is a leftover: no file takes a day to write.
STALE_ELSEWHERE_SECONDS = 24 * 3600

_STAGING_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<pid>\d+)(\.(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8}))?\.tmp$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@functools.cache  # read once per process: every staging name and every stale check use it
def _machine_tag() -> str:
    """This machine (its host name) and boot, 8 hex digits each."""
    return f"{_digest(socket.gethostname())}-{_digest(ProcessIdentity.current().boot_id or '')}"


def _is_stale(match: re.Match[str], path: Path) -> bool:
    """Whether the process that named a staging file or folder is gone."""
    if match["host"] is None:  # `.NAME.PID.tmp`, as earlier versions named them
        return not pid_exists(int(match["pid"]))
    host, boot = _machine_tag().split("-")
    if match["host"] == host:  # this machine: gone with its boot, or when its pid is
        return match["boot"] != boot or not pid_exists(int(match["pid"]))
    try:  # another machine: whether its process runs cannot be seen from here
        return time.time() - path.lstat().st_mtime > STALE_ELSEWHERE_SECONDS
    except OSError:
        return False


def remove_stale_staging(folder: Path, *, recursive: bool = False,
                         names: Collection[str] | None = None) -> list[Path]:
    """Remove what killed processes left half-written in `folder` (and below it, `recursive`):
    files and folders named by `staging_path` (of `names` only, when given) whose process is
    gone: on this machine, no longer running (or of an earlier boot); on another machine
    sharing the folder, a day old. Best effort; returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        match = _STAGING_NAME.match(path.name)
        if match is None or (names is not None and match["name"] not in names) \
                or not _is_stale(match, path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def file_in_the_way(path: Path) -> Path | None:
    """The file (not folder) at `path` or above it that keeps `path` from being a folder, or
    made one: checked before work whose output is written there at the end."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def folder_blocked(path: Path) -> str | None:
    """Why the file `path` could not be written once made, said before the work that makes it
    ("notes is a file, not a folder (the folder of notes/model.onnx)", or a folder this process
    cannot write in); None where nothing is in the way (its folder is made when it is written)."""
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        return f"{blocking} is a file, not a folder (the folder of {path})"
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    why = cannot_write_in(folder)
    return None if why is None else f"{folder}: cannot write there ({why}) (the folder of {path})"


def cannot_write_in(folder: Path) -> str | None:
    """Why this process cannot make a file in `folder` (the system's reason), or None.

    Tried, not judged from the mode bits: root passes those, and a read-only mount, a quota or
    a special file system refuse only when asked. The file has no name left once closed
    (unlinked at once, or never named at all with O_TMPFILE)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def why_not_written(path: Path, error: OSError) -> str:
    """Why writing `path` failed, in words: a file where one of its folders should be (mkdir's
    "File exists" would not say which), else the system's reason."""
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    return error.strerror or str(error)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: under a temporary name, then renamed, so that a
    full disk or a kill never leaves half a file under `path`. OSError when it cannot."""
    staging = fresh_staging_path(path)
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted names and leaf values, the way tracking tools take parameters
    (`model.layers.0.units`): mappings by key, lists holding mappings or lists by index; a
    list of plain values, an empty mapping or list, and any other value stay one leaf."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple))
                                                for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}
