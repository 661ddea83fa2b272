"""Checkpoint files: a stack's training state written so that a crash or a power cut at any
moment leaves a usable one, and verified when read back.

A checkpoint is written under a temporary name, synced to disk, and renamed into place after
the previous generation was renamed aside (x.pt -> x.prev.pt); the folder is synced so the
renames survive a power cut. Each file carries the SHA-256 of its payload: an empty,
truncated or altered file is recognised (`DamagedCheckpoint`), never unpickled blindly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fashionlab.errors import CheckpointError
from fashionlab.text import first_line

__all__ = ["CHECKPOINT_MAGIC", "DamagedCheckpoint", "install_checkpoint", "previous_checkpoint",
           "read_checkpoint", "remove_checkpoint", "temporary_path", "write_checkpoint"]

# A file is: 8 bytes CHECKPOINT_MAGIC | payload length (u64, little-endian) | SHA-256 of the
# payload (32 bytes) | payload (torch.save of the state, read back with weights_only=True).

CHECKPOINT_MAGIC = b"FLCKPT\x00\x01"  # "fashionlab checkpoint", format 1
_LENGTH = slice(8, 16)  # bytes of the header holding the payload's length
_DIGEST = slice(16, 48)  # and its SHA-256
_HEADER_SIZE = 48


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be used; the message says why, in a few words."""


def previous_checkpoint(path: Path) -> Path:
    """The generation before `path`, kept in case the newest is damaged: x.pt -> x.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def temporary_path(path: Path) -> Path:
    """Where a checkpoint is written before it takes its name."""
    return path.with_name(path.name + ".tmp")


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` so that a crash or power cut at any moment leaves a complete
    checkpoint under `path` or under `previous_checkpoint(path)`, never only half of one.

    Any OSError (a full disk) removes the temporary file and raises CheckpointError.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = (CHECKPOINT_MAGIC + len(payload).to_bytes(8, "little")
              + hashlib.sha256(payload).digest())
    _write_durably(path, (header, payload))


def install_checkpoint(path: Path, data: bytes) -> None:
    """Put a checkpoint file's bytes (as `read_bytes` gave them elsewhere: a stack continued
    on another machine) under `path`, as durably as `write_checkpoint` does. They are verified
    when read, like any checkpoint."""
    _write_durably(path, (data,))


def _write_durably(path: Path, chunks: tuple[bytes | memoryview, ...]) -> None:
    tmp, previous = temporary_path(path), previous_checkpoint(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            file.writelines(chunks)
            file.flush()
            # Without it the rename can reach the disk before the data: after a power cut the
            # name would point at an empty or partial file.
            os.fsync(file.fileno())
        if path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the renames themselves survive a power cut
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        advice = "free some space" if full else "fix this"
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({error.strerror or error}); {advice} and "
            "run the same command again: it resumes") from None


def _fsync_directory(directory: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder; NTFS journals renames itself
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems (network or FUSE mounts) cannot sync a folder: the rename is done
        # and nothing more can be asked of them.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The verified state in a checkpoint file. FileNotFoundError when there is none;
    DamagedCheckpoint when it is empty, truncated, altered or not a checkpoint at all."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DamagedCheckpoint(f"cannot read: {error.strerror or error}") from None
    if not data:
        raise DamagedCheckpoint("empty file")
    if data[:2] == b"PK":
        # Written by fashionlab before checksums (a bare torch.save zip): still resumable.
        return _unpickle(data, device)
    if data[: len(CHECKPOINT_MAGIC)] != CHECKPOINT_MAGIC:
        raise DamagedCheckpoint("not a fashionlab checkpoint")
    if len(data) < _HEADER_SIZE:
        raise DamagedCheckpoint(f"truncated: {len(data)} bytes, less than its header")
    length = int.from_bytes(data[_LENGTH], "little")
    payload = memoryview(data)[_HEADER_SIZE:]
    if len(payload) != length:
        raise DamagedCheckpoint(f"truncated: {len(payload)} of {length} bytes"
                                if len(payload) < length else
                                f"{len(payload) - length} bytes more than written")
    if hashlib.sha256(payload).digest() != data[_DIGEST]:
        raise DamagedCheckpoint("checksum mismatch: its contents changed after writing")
    return _unpickle(payload, device)


def _unpickle(data: bytes | memoryview, device: torch.device | str) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 (the unpickler raises many kinds; all mean damage)
        raise DamagedCheckpoint(f"unreadable: {first_line(error)[:200]}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"holds a {type(state).__name__}, not a checkpoint")
    return state


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, its previous generation and any temporary file it left."""
    for file in (path, previous_checkpoint(path), temporary_path(path)):
        file.unlink(missing_ok=True)
