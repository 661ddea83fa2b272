"""Errors a user can fix. The command line prints them as one line, without a traceback."""

from __future__ import annotations


class FashionlabError(Exception):
    """Base class: something about the user's input, files or environment is wrong."""


class DataError(FashionlabError):
    """A dataset file is missing, malformed, or fails verification."""


class ConfigError(FashionlabError):
    """A study file or option is invalid; the message names the file and field."""


class StoreError(FashionlabError):
    """The experiment store cannot be opened or written, or a requested run does not exist."""


class FieldValueError(ValueError):
    """Raised by a config validator to point at a place below the field it validates, e.g. the
    parameter `units` of `search.space`: path ("units",), message "low (512) must be ..."."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


class CheckpointError(FashionlabError):
    """A checkpoint cannot be written (a full disk, a read-only folder); the run can resume."""


class OutputError(FashionlabError):
    """A run's files (tables, figures) cannot be written: a full disk, no permission."""
