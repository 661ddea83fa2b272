"""JSON-ready values, whole-file writes and config flattening (fashionlab.serialize)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import dead_pid

from fashionlab.serialize import (
    STALE_ELSEWHERE_SECONDS,
    flatten,
    jsonable,
    remove_stale_staging,
    staging_path,
    write_text_atomic,
)


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


def test_what_a_killed_process_left_half_written_is_removed(tmp_path: Path):
    dead, alive = dead_pid(), os.getpid()
    staging = staging_path(tmp_path / "results.csv")
    assert staging.parent == tmp_path and staging.name.startswith(f".results.csv.{alive}.")
    left = [tmp_path / f".results.csv.{dead}.tmp", tmp_path / "models" / f".cnn.{dead}.tmp",
            tmp_path / "figures" / f".curves-a.png.{dead}.tmp"]
    kept = [tmp_path / f".report.html.{alive}.tmp",  # being written by a live process
            tmp_path / ".notes.tmp", tmp_path / f"plain.{dead}.tmp"]  # not staging names
    for path in left + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half") if "models" not in path.parts else path.mkdir()
    (left[1] / "model.json").write_text("{}")
    assert remove_stale_staging(tmp_path) == [left[0]]  # this folder only
    assert remove_stale_staging(tmp_path, recursive=True) == sorted(left[1:])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)

    other = tmp_path / f".user-file.{dead}.tmp"
    other.write_text("mine")
    assert remove_stale_staging(tmp_path, names={"train-images-idx3-ubyte"}) == []
    assert other.exists()


def test_each_whole_file_write_clears_what_killed_writers_of_that_file_left(tmp_path: Path):
    """`fashionlab export` or `data show` killed while writing left its staging file; the
    next write of the same file (not of others: a study clears its own folder) removes it."""
    import matplotlib.figure

    from fashionlab.export import export_onnx
    from fashionlab.plots import save_figure

    dead = dead_pid()
    machine = staging_path(tmp_path / "x").name.split(".")[-2]
    left = {name: tmp_path / f".{name}.{dead}.{machine}.tmp"
            for name in ("notes.md", "grid.png", "other.png", "model.onnx")}
    for path in left.values():
        path.write_text("half")
    write_text_atomic(tmp_path / "notes.md", "whole")
    save_figure(matplotlib.figure.Figure(figsize=(1, 1)), tmp_path / "grid.png")
    assert not left["notes.md"].exists() and not left["grid.png"].exists()
    assert left["other.png"].exists()  # another file's: left to its own next write

    pytest.importorskip("onnxruntime")
    from fashionlab.artifacts import load_model, save_model
    from fashionlab.config import DenseLayer, ModelSpec
    from fashionlab.data import CLASS_NAMES
    from fashionlab.models import build_module

    spec = ModelSpec(layers=(DenseLayer(8),))
    model = save_model(tmp_path / "model", spec=spec, state=build_module(spec).state_dict(),
                       class_names=CLASS_NAMES, metadata={})
    export_onnx(load_model(model), tmp_path / "model.onnx")
    assert not left["model.onnx"].exists()


def test_staging_files_of_other_machines_and_earlier_boots(tmp_path: Path):
    mine = staging_path(tmp_path / "results.csv")
    pid, machine = mine.name.split(".")[-3:-1]
    host, boot = machine.split("-")

    def another(tag: str) -> str:
        return "f" * 8 if tag != "f" * 8 else "e" * 8

    dead = dead_pid()
    earlier_boot = tmp_path / f".a.csv.{pid}.{host}-{another(boot)}.tmp"
    elsewhere_now = tmp_path / f".b.csv.{pid}.{another(host)}-{boot}.tmp"
    elsewhere_old = tmp_path / f".c.csv.{dead}.{another(host)}-{boot}.tmp"
    gone_here = tmp_path / f".d.csv.{dead}.{machine}.tmp"
    for path in (mine, earlier_boot, elsewhere_now, elsewhere_old, gone_here):
        path.write_text("half")
    day_and_more = time.time() - STALE_ELSEWHERE_SECONDS - 60
    os.utime(elsewhere_old, (day_and_more, day_and_more))
    # Another machine's process may be writing its file (NFS): kept until a day old. Here, a
    # pid of an earlier boot is no process of this one, even when a live one has that pid.
    assert remove_stale_staging(tmp_path) == sorted([earlier_boot, elsewhere_old, gone_here])
    assert mine.exists() and elsewhere_now.exists()
