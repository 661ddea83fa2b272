"""JSON-ready values, whole-file writes and config flattening (fashionlab.serialize)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fashionlab.serialize import flatten, jsonable, write_text_atomic


def test_jsonable_turns_numpy_and_non_finite_values_into_json():
    assert jsonable({"a": np.array([1.0, math.nan]), "b": Path("x"), 3: math.inf}) == \
        {"a": [1.0, None], "b": "x", "3": None}


def test_flatten_keeps_leaf_types_and_splits_nested_lists():
    assert flatten({"a": {"b": 1, "c": [{"d": 2.5}], "e": [1, 2], "f": None, "g": {}},
                    "h": True}) == {"a.b": 1, "a.c.0.d": 2.5, "a.e": [1, 2], "a.f": None,
                                    "a.g": {}, "h": True}


def test_a_text_file_is_written_whole_or_not_at_all(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "results.md"
    write_text_atomic(path, "first")
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_text_atomic(path, "second")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary file left
