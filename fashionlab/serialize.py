"""JSON-ready values (numpy to Python, NaN and infinities to null, paths to strings), and text
files written whole or not at all."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: under a temporary name, then renamed, so that a
    full disk or a kill never leaves half a file under `path`. OSError when it cannot."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
