"""The progress reporters: the plain lines written off a terminal, the choice between bars and
lines, and what `fashionlab study` prints into a log."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

from helpers import tiny_study_toml
from rich.console import Console

from fashionlab.progress import Lines, Silent, interactive, reporting
from fashionlab.train import EpochMetrics

EPOCH_LINE = re.compile(r"^(?P<label>.+?)  epoch (?P<epoch>\d+)/(?P<epochs>\d+)  loss ")


def _metrics(loss: float, accuracy: float, val_loss: float, val_accuracy: float,
             seconds: float = 1.25) -> EpochMetrics:
    return EpochMetrics(loss, accuracy, val_loss, val_accuracy, seconds)


def test_lines_writes_the_means_over_a_stacks_models_one_flushed_line_per_epoch():
    out = io.StringIO()
    lines = Lines(out)
    lines.start("dense(64) · dense(64) L2  (2 models)", 40)
    lines.epoch("dense(64) · dense(64) L2  (2 models)", 3, {
        "a": _metrics(0.4, 0.85, 0.39, 0.86), "b": _metrics(0.42, 0.86, 0.41, 0.8624)})
    assert out.getvalue() == ("dense(64) · dense(64) L2  (2 models)  epoch 3/40  loss 0.4100  "
                              "val_loss 0.4000  val_acc 0.8612  1.2 s\n")


def test_lines_without_validation_shows_the_training_accuracy():
    out = io.StringIO()
    lines = Lines(out)
    lines.start("retrain", 4)
    lines.epoch("retrain", 4, {"a": _metrics(1.0291, 0.9767, math.nan, math.nan, 130.0)})
    assert out.getvalue() == "retrain  epoch 4/4  loss 1.0291  acc 0.9767  2.2 min\n"


def test_lines_leaves_out_a_diverged_model_and_shows_dash_when_none_is_finite():
    out = io.StringIO()
    lines = Lines(out)
    lines.start("s", 2)
    lines.epoch("s", 1, {"ok": _metrics(0.5, 0.8, 0.6, 0.7),
                         "nan": _metrics(math.nan, 0.1, math.nan, 0.1)})
    lines.epoch("s", 2, {"nan": _metrics(math.nan, 0.1, math.nan, math.nan)})
    assert out.getvalue().splitlines() == [
        "s  epoch 1/2  loss 0.5000  val_loss 0.6000  val_acc 0.4000  1.2 s",
        "s  epoch 2/2  loss -  acc 0.1000  1.2 s"]


def test_lines_says_where_a_resumed_stack_goes_on_and_writes_log_messages():
    out = io.StringIO()
    lines = Lines(out)
    lines.start("s", 40)
    lines.start("s", 40)  # again: no-op
    lines.epoch("s", 12, {})
    lines.finish("s")
    lines.epoch("unknown", 3, {})
    lines.log("a checkpoint was damaged")
    assert out.getvalue().splitlines() == [
        "s  resumed at epoch 12/40", "unknown  resumed at epoch 3", "a checkpoint was damaged"]


def test_progress_true_draws_bars_only_where_they_can_be_drawn():
    assert interactive(Console(file=io.StringIO(), force_terminal=True, force_jupyter=False))
    assert not interactive(Console(file=io.StringIO(), force_terminal=False,
                                   force_jupyter=False))
    # A Jupyter kernel: bars where ipywidgets can draw them, else lines (rich would warn in
    # the cell, "install ipywidgets for Jupyter support", at every bar).
    jupyter = Console(file=io.StringIO(), force_jupyter=True)
    with mock.patch.object(importlib.util, "find_spec", return_value=object()):
        assert interactive(jupyter)
    with mock.patch.object(importlib.util, "find_spec", return_value=None):
        assert not interactive(jupyter)
    with reporting(True) as reporter:  # pytest captures stderr: not a terminal
        assert isinstance(reporter, Lines)
    with reporting(False) as reporter:
        assert isinstance(reporter, Silent)
    mine = Silent()
    with reporting(mine) as reporter:
        assert reporter is mine


def _command(*args: str) -> str:
    """`fashionlab ARGS` in a child process, stdout and stderr into one pipe, as `> log 2>&1`
    or CI would take them: the combined output, in order."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    root = str(Path(__file__).resolve().parent.parent)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [env.get("PYTHONPATH")])]))
    done = subprocess.run(
        [sys.executable, "-c", "from fashionlab.cli import main; main()", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300,
        check=False)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_a_study_off_a_terminal_logs_each_epoch_of_each_stack_before_the_table(
        tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=3))
    output = _command("study", str(path), "--run-dir", str(tmp_path / "runs"), "--workers", "1")
    lines = output.splitlines()
    table = next(i for i, line in enumerate(lines) if "tiny: run " in line)
    epochs: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        match = EPOCH_LINE.match(line)
        if match:
            assert i < table, "an epoch line after the table"
            epochs.setdefault(match["label"], []).append(int(match["epoch"]))
            assert "\x1b[" not in line  # plain text, no colour codes
    retrain = [label for label in epochs if label.startswith("retrain ")]
    assert len(retrain) == 1, output  # the best candidate, on all training images
    assert epochs == {
        "small · small L2  (6 models)": [1, 2, 3],  # one stack: the same layer shapes
        "two layers  (3 models)": [1, 2, 3],
        retrain[0]: [1, 2, 3],
        "cnn on all 300, test set as validation": [1, 2],  # its own epochs
    }, output
    assert "val_acc " in output and "  acc " in output  # the retrain has no validation
    assert any("wall time" in line for line in lines[table:])

    quiet = _command("study", str(path), "--run-dir", str(tmp_path / "runs-quiet"),
                     "--workers", "1", "--quiet")
    assert not any(EPOCH_LINE.match(line) for line in quiet.splitlines()), quiet
    assert "tiny: run " in quiet and "wall time" in quiet


def test_a_search_off_a_terminal_logs_its_trials_epochs_unless_quiet(tiny_idx_dir: Path,
                                                                     tmp_path: Path):
    path = tmp_path / "search.toml"
    path.write_text(tiny_study_toml(
        tiny_idx_dir, name="tiny-search", epochs=2, final=False,
        candidates='[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n',
        extra='[search]\nn_trials = 1\npruner = "none"\n\n[search.space]\n'
              'learning_rate = { low = 1e-3, high = 0.1, log = true }\n'))
    output = _command("search", str(path), "--run-dir", str(tmp_path / "runs"))
    lines = output.splitlines()
    table = next(i for i, line in enumerate(lines) if "top trials of run" in line)
    logged = [(i, m["label"], int(m["epoch"])) for i, line in enumerate(lines)
              if (m := EPOCH_LINE.match(line))]
    assert [(label.split()[0:2], epoch) for _, label, epoch in logged] == [
        (["trial", "0"], 1), (["trial", "0"], 2), (["retrain", "trial-0"], 1),
        (["retrain", "trial-0"], 2)], output
    assert all(i < table for i, _, _ in logged)
    assert any(line.startswith("trial 0 complete") for line in lines[:table])  # its log line
    quiet = _command("search", str(path), "--run-dir", str(tmp_path / "runs"), "--fresh",
                     "--quiet")
    assert not any(EPOCH_LINE.match(line) for line in quiet.splitlines()), quiet
    assert "top trials of run" in quiet


def test_bars_show_names_as_text():
    from fashionlab.progress import Bars

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_jupyter=False, width=200)
    with Bars(console=console) as bars:  # rich read "[/]" as a closing tag: MarkupError
        bars.start("markup [/] [red]x", 3)
        bars.finish("markup [/] [red]x")
    assert "markup [/] [red]x" in out.getvalue()


def test_bars_on_a_narrow_terminal_cut_the_name_not_the_numbers():
    from fashionlab.progress import Bars

    name = "dense(64), dense(64) l2, dense(64) dropout: 5 folds each"
    for width in (60, 80):
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, force_jupyter=False, width=width,
                          color_system=None)
        with Bars(console=console) as bars:
            bars.start(name, 40)
            bars.epoch(name, 12, {"fold-0": EpochMetrics(0.5, 0.8, 0.4, 0.8812, 1.0)})
        last = [line for line in out.getvalue().split("\x1b[2K") if "12/40" in line][-1]
        assert "12/40 epochs val_acc 0.8812" in last  # whole, and the times after them
        assert re.search(r"\d:\d\d:\d\d -:--:--|\d:\d\d:\d\d \d:\d\d:\d\d", last), last
        assert name not in last and "…" in last  # the name is what gives way
