"""Automated search: space errors, samplers and pruners, a tiny search that finds the good
region, pruning, resume after a kill, and two workers sharing a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
import torch
from helpers import (
    OnEpoch,
    Recorder,
    assert_one_line_error,
    dead_pid,
    run_cli,
    tiny_search_toml,
    tiny_study_toml,
)
from optuna.trial import TrialState, create_trial

from fashionlab import checkpoints, stops
from fashionlab.config import (
    TrainSpec,
    WarningRule,
    base_candidate,
    load_study,
    quick_variant,
    study_from_dict,
)
from fashionlab.cv import MemberResult
from fashionlab.data import Split, load_fashion_mnist
from fashionlab.errors import CheckpointError, ConfigError, OutputError, StoreError
from fashionlab.jobs import JobRow, job_rows, register_jobs
from fashionlab.models import forward_flops
from fashionlab.report import write_report
from fashionlab.runner import training_flops
from fashionlab.runs import describe_run
from fashionlab.schema import jobs, runs
from fashionlab.search import (
    SearchResult,
    consensus_scores,
    make_pruner,
    make_sampler,
    run_search,
    search_identity,
)
from fashionlab.search.finish import save_plots, top_table
from fashionlab.search.space import FixedParams, base_params, check_largest_model, grid, suggest
from fashionlab.search.storage import MAX_RETRIES, ClaimLock, RetryLostTrial, open_storage
from fashionlab.serialize import staging_path
from fashionlab.stats import proportion_ci
from fashionlab.steps import load_study_data
from fashionlab.store import CLAIM_STALE_AFTER, RunRecord, Store, database_url, default_url
from fashionlab.study import run_study
from fashionlab.tables import retrain_line
from fashionlab.train import EpochMetrics
from fashionlab.trials import fold_epochs, trial_counts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def search_toml(data_dir: Path, *, search: str, space: str, epochs: int = 3,
                candidate: str = 'layers = [{ units = 16 }]', train: str = "") -> str:
    return tiny_study_toml(
        data_dir, name="tiny-search", epochs=epochs, train=train, patience=1, final=False,
        candidates=f'[[candidates]]\nname = "small"\n{candidate}\n',
        extra=f"[search]\n{search}\n\n[search.space]\n{space}\n")


def _load(text: str, tmp_path: Path, name: str = "search.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _learning_rate_search(data_dir: Path, tmp_path: Path, search: str) -> Path:
    """A study file searching the learning rate alone, with these [search] settings."""
    return _load(search_toml(data_dir, search=search,
                             space="learning_rate = { low = 1e-3, high = 0.1, log = true }"),
                 tmp_path)


def _trials(run_dir: Path, spec_path: Path) -> list[optuna.trial.FrozenTrial]:
    spec = load_study(spec_path)
    storage = open_storage(default_url(run_dir))
    study = optuna.load_study(study_name=search_identity(spec)[0], storage=storage)
    trials = study.get_trials()
    storage.engine.dispose()
    return trials


# --------------------------------------------------------------------------------------------
# The space


BASE = """
name = "x"
[[candidates]]
name = "a"
layers = [{ units = 64 }]
"""


@pytest.mark.parametrize(("space", "message"), [
    ("units = { low = 512, high = 64 }", "search.space.units: low (512) must be below high (64)"),
    ("depth = { low = 1, high = 3 }",
     ("search.space.depth: unknown parameter (expected one of: batch_size, conv_dropout, crop, "
     "dropout,")),
    ("units = { choices = [] }", "search.space.units: choices must not be empty"),
    ("l2 = { low = 0.0, high = 0.01, log = true }",
     "search.space.l2: a log scale needs low > 0 (got 0.0)"),
    ("dropout = { low = 0.1, high = 1.0 }",
     "search.space.dropout: values must lie in [0, 1) (got 1.0)"),
    ("units = { low = 8.5, high = 64 }",
     "search.space.units: values must be whole numbers (got 8.5)"),
    ('optimizer = { choices = ["adam", "rmsprop"] }',
     "search.space.optimizer: 'rmsprop' is not one of: adam, adamw, sgd"),
    ("units = { low = 8 }", "search.space.units: a range needs both low and high"),
    ("units = { low = 8, high = 64, choices = [8] }", "search.space.units: give one of"),
    ("learning_rate = { low = 0.01, high = 0.1, shared = true }",
     "search.space.learning_rate: shared applies to per-layer parameters only"),
    ("units = { lo = 8, high = 64 }", "search.space.units: unknown key 'lo'"),
    ("filters = { low = 8, high = 64 }",
     "search.space.filters: the base candidate 'a' has no conv layers"),
    ("patience = { low = 2, high = 5 }",
     "search.space.patience: the base candidate 'a' does not stop early"),
    ("flip = { choices = [1, 0] }", "search.space.flip: 1 is not one of: false, true"),
    ("flip = { low = 0, high = 1 }",
     "search.space.flip: takes choices or a value, not a range (one of: false, true)"),
    ("crop = { low = 0, high = 9 }", "search.space.crop: values must lie in [0, 9) (got 9)"),
    ("erase = { low = -0.5, high = 1.0 }", "search.space.erase: values must be at least 0 (got -0.5)"),
    ('tta = { choices = ["flip", "crops"] }',
     "search.space.tta: 'crops' is not one of: none, flip, flip-shift"),
    ("units = { choices = [16, 16] }\noptimizer = \"adamw\"",
     "search.space: varies nothing: give at least one parameter a range or two choices"),
    ("", "search.space: varies nothing"),
    ("units = { low = 4, high = 8, step = 100 }",
     "search.space.units: step (100) must not exceed the range (4 to 8): it would draw 4 alone"),
    # Optuna warned on stderr and cut the range to [4, 14]
    ("units = { low = 4, high = 17, step = 5 }",
     ("search.space.units: step (5) does not divide the range (4 to 17): make high 14 (the "
      "last step) or change the step")),
    ("dropout = { low = 0.1, high = 0.5, step = 0.15 }",
     "search.space.dropout: step (0.15) does not divide the range (0.1 to 0.5): make high 0.4"),
    # Strict types, as everywhere in a study file; a union says what it takes.
    ('learning_rate = { low = "0.001", high = 0.1 }',
     'search.space.learning_rate.low: input should be a number (got "0.001")'),
    ("learning_rate = { low = true, high = 2 }",
     "search.space.learning_rate.low: input should be a number (got true)"),
    ("learning_rate = { low = 0.001, high = 0.1, step = inf }",
     "search.space.learning_rate.step: input should be a finite number (got inf)"),
    ('learning_rate = { low = 0.001, high = 0.1, log = "yes" }',
     'search.space.learning_rate.log: input should be a valid boolean (got "yes")'),
    ('units = { low = 4, high = 16, shared = "yes" }',
     'search.space.units.shared: input should be a valid boolean (got "yes")'),
    ("learning_rate = [0.1, 0.2]",
     ("search.space.learning_rate: a list of values to choose from is written choices = [0.1, "
     "0.2]")),
    (f"learning_rate = {{ low = 0.001, high = {'9' * 400} }}",
     "search.space.learning_rate: values must be finite numbers within a float's range (got 9"),
    (f"l2 = {{ choices = [0.0, {'9' * 400}] }}",
     "search.space.l2: values must be finite numbers within a float's range (got 99999"),
    (f"batch_size = {{ low = 1, high = {'9' * 400} }}",  # failed in the first trial's draw
     "search.space.batch_size: values must be finite numbers within a float's range (got 9999"),
    ("epochs = { low = 1, high = 100001 }",
     "search.space.epochs: values must be at most 100000 (got 100001)"),
])
def test_a_bad_space_is_one_line_naming_the_file_and_parameter(space: str, message: str):
    raw = tomllib.loads(BASE + "[search.space]\n" + space)
    with pytest.raises(ConfigError) as error:
        study_from_dict(raw, source="my.toml")
    assert str(error.value).startswith(f"my.toml: {message}"), str(error.value)
    assert "\n" not in str(error.value)


def test_search_settings_are_checked_too():
    for extra, message in [
        ('timeout = "60"', 'my.toml: search.timeout: input should be a valid number (got "60")'),
        ('[search.reference]\nscore = 0.9\nlabel = "a\\nb"',
         "my.toml: search.reference.label: 'a\\nb' contains a control character"),
        ('[search.reference]\nscore = 0.9\nlabel = ""',
         "my.toml: search.reference.label: a name must not be empty"),
        # Accepted before: tested against no study (''), or silently no reference at all
        ('[search.reference]\nstudy = ""',
         "my.toml: search.reference.study: a name must not be empty"),
        ('[search.reference]\nscore = 0.9\ncandidate = "x"',
         ("my.toml: search.reference.candidate: names a candidate of the reference study: give "
          "study too")),
        ('[search.reference]\nlabel = "x"',
         "my.toml: search.reference: compares with nothing: give a score, a study, or both"),
        ("timeout = inf", "my.toml: search.timeout: input should be a finite number (got inf)"),
        ("startup_trials = true",
         "my.toml: search.startup_trials: input should be a valid integer (got true)"),
        ("start_with_base = 1",
         "my.toml: search.start_with_base: input should be a valid boolean (got 1)"),
        ('base = "nope"', "my.toml: search.base: no candidate named 'nope' (candidates: a)"),
        ('sampler = "grid"\n[search.space]\ndropout = { low = 0.1, high = 0.5 }',
         "my.toml: search.space.dropout: the grid sampler needs choices or a step"),
        ('sampler = "anneal"', "my.toml: search.sampler: input should be"),
        ("n_trials = 0", "my.toml: search.n_trials: input should be greater than 0"),
        ("seed = 9223372036854775808", "my.toml: search.seed: input should be less than"),
        ("[search.reference]\nscore = 89.5",
         ("my.toml: search.reference.score: an accuracy is a fraction in [0, 1], as the "
          "objective val_accuracy is (got 89.5; for 89.5% write 0.895)")),
        ('objective = "val_loss"\n[search.reference]\nscore = -0.3',
         "my.toml: search.reference.score: a loss is not negative (got -0.3)"),
        ("n_trials = 3", "my.toml: search.space: varies nothing"),  # no space at all
        ("[search.reference]\nscore = nan",
         "my.toml: search.reference.score: input should be a finite number"),
    ]:
        if "[search.space]" not in extra and "varies nothing" not in message:
            extra += "\n[search.space]\nlearning_rate = { low = 0.001, high = 0.01 }"
        with pytest.raises(ConfigError) as error:
            study_from_dict(tomllib.loads(BASE + "[search]\n" + extra), source="my.toml")
        assert str(error.value).startswith(message), str(error.value)


def test_the_cli_says_a_bad_space_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _load(BASE + "[search.space]\nunits = { low = 512, high = 64 }\n", tmp_path, "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path))
    assert_one_line_error(code, err, f"{path}: search.space.units: low (512) must be below "
                          "high (64)")
    code, _, err = run_cli(capsys, "search", "seed", "--run-dir", str(tmp_path))
    assert_one_line_error(code, err, "error: seed.toml: no [search] table")


def test_a_search_without_a_stopping_rule_names_its_file(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]):
    # Only known once the command's options are in (--n-trials, --timeout): still by file.
    path = _load(BASE + "[search.space]\nunits = { low = 16, high = 64 }\n", tmp_path, "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, f"error: {path}: search: no stopping rule: set n_trials")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=r"^study 'x': search: no stopping rule"):  # in code
        run_search(dataclasses.replace(load_study(path)), run_dir=tmp_path / "runs")


@pytest.mark.parametrize(("space", "message"), [
    ("units = { low = 64, high = 200000000 }",
     ("its largest draw (units = 200000000) is too large: layers.0.units: the model would "
      "have 159,000,000,010 parameters, more than the 100,000,000 fashionlab trains")),
    ("n_layers = { low = 1, high = 12 }\nunits = { choices = [256, 4096] }",  # 11 x 4096^2
     "its largest draw (n_layers = 12, units = 4096 (each of 12 layers)) is too large: "),
])
def test_a_space_that_draws_too_large_a_model_is_refused_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], space: str, message: str):
    path = _load(BASE + f"[search.space]\n{space}\n", tmp_path, "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, f"error: {path}: search.space: {message}")
    assert not (tmp_path / "runs").exists()


def test_a_space_deeper_than_a_model_may_be_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # 100,000 layers of 16 units stay under the parameter cap: building them took minutes.
    path = _load(BASE + "[search.space]\nn_layers = { low = 1, high = 100000 }\n", tmp_path,
                 "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, f"{path}: search.space.n_layers: values must be at most "
                          "100 (got 100000)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("space", [
    ("units = { low = 8, high = 100000, step = 1 }\n"
     "learning_rate = { low = 0.0001, high = 0.01, step = 0.0000001 }"),  # 1e5 x 1e5 points
    "learning_rate = { low = 1e-3, high = 1e9, step = 1e-3 }",  # 1e12 values in one range
    "dropout = { low = 0.1, high = 0.5, step = 5e-324 }",  # countless: the count overflows
])
def test_a_grid_too_large_to_list_is_refused_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], space: str):
    path = _load(BASE + f'[search]\nsampler = "grid"\nn_trials = 2\n[search.space]\n{space}\n',
                 tmp_path, "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, f"error: {path}: search.space: the grid has ",
                          "points, more than the 100,000 the grid sampler lists")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"n_trials": 0}, "n_trials (--n-trials): expected a positive whole number (got 0)"),
    ({"n_trials": -2}, "n_trials (--n-trials): expected a positive whole number (got -2)"),
    ({"timeout": 0}, "timeout (--timeout): expected a positive number of seconds (got 0)"),
    ({"timeout": -5.0}, "timeout (--timeout): expected a positive number of seconds (got -5.0)"),
    ({"timeout": float("nan")},
     "timeout (--timeout): expected a positive number of seconds (got nan)"),
])
def test_zero_or_negative_limits_are_refused_not_replaced_by_the_files(
        tmp_path: Path, arguments: dict, message: str):
    spec = study_from_dict(tomllib.loads(BASE + "[search]\nn_trials = 3\ntimeout = 60\n"
                                         "[search.space]\nunits = { low = 8, high = 64 }\n"))
    with pytest.raises(ConfigError) as error:
        run_search(spec, run_dir=tmp_path / "runs", progress=False, **arguments)
    assert str(error.value) == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"fresh": 1}, "fresh: expected True or False, got 1"),
    ({"finish": "no"}, "finish: expected True or False, got 'no'"),
    ({"progress": None}, ("progress: expected True, False or a fashionlab.progress.Reporter "
                         "(methods start, epoch, finish, log); None has no start, epoch, "
                         "finish, log")),
    ({"dataset": []}, ("dataset: expected a fashionlab.data.Dataset (from load_fashion_mnist) "
                      "or None, got list")),
    ({"workers": 0}, 'workers: expected a positive whole number or "auto", got 0'),
])
def test_run_searchs_arguments_are_checked_before_any_run_exists(
        tmp_path: Path, arguments: dict, message: str):
    spec = study_from_dict(tomllib.loads(BASE + "[search]\nn_trials = 3\n"
                                         "[search.space]\nunits = { low = 8, high = 64 }\n"))
    with pytest.raises(ConfigError) as error:
        run_search(spec, **{"run_dir": tmp_path / "runs", "progress": False, **arguments})
    assert str(error.value) == message
    assert not (tmp_path / "runs").exists()


def test_optunas_plots_leave_matplotlibs_style_as_it_was(tmp_path: Path):
    # Optuna's matplotlib plots switch the process to the "ggplot" style: every figure drawn
    # after a search (a notebook's, fashionlab's curves) would turn grey.
    import matplotlib

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("n", 1, 3), n_trials=4)
    before = dict(matplotlib.rcParams)
    paths = save_plots(study, tmp_path, has_importances=True)
    assert [p.name for p in paths] == ["search-history.png", "search-importances.png",
                                       "search-parallel.png"]
    assert dict(matplotlib.rcParams) == before


def test_the_cli_says_a_zero_timeout_in_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]):
    path = _load(BASE + "[search]\nn_trials = 3\n[search.space]\nunits = { low = 8, high = 64 }\n",
                 tmp_path, "my.toml")
    code, _, err = run_cli(capsys, "search", str(path), "--timeout", "0", "--run-dir",
                           str(tmp_path / "runs"))
    assert_one_line_error(code, err, "timeout (--timeout): expected a positive number")


def test_a_search_without_progress_prints_nothing_not_even_optunas_lines(
        tiny_idx_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    path = _load(tiny_search_toml(tiny_idx_dir, n_trials=2), tmp_path)
    before = optuna.logging.get_verbosity()
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert result.finished
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # Optuna logs "A new study created ..." at INFO
    assert optuna.logging.get_verbosity() == before


def test_a_search_shows_its_own_trial_lines_not_optunas(
        tiny_idx_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """From Python with progress (a notebook), each trial is said once, by the search; a
    trial stopped by Ctrl-C is not Optuna's warning with the KeyboardInterrupt's traceback."""
    path = _load(tiny_search_toml(tiny_idx_dir, n_trials=2), tmp_path)
    recorder = Recorder()

    def stop(key: str, epoch: int) -> None:
        if key.startswith("trial-1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(stop))
    if sys.version_info >= (3, 11):  # said under the traceback, as the command says it
        (note,) = stopped.value.__notes__
        assert note.startswith("fashionlab: search run ") and "goes on" in note
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=recorder)
    assert result.finished
    assert [r.getMessage() for r in caplog.records if r.name.startswith("optuna")] == []
    assert any(c[0] == "log" and c[1].startswith("trial 2 complete") for c in recorder.calls)
    # Asked for, Optuna's lines show.
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        run_search(load_study(path), run_dir=tmp_path / "runs", progress=False, fresh=True)
    finally:
        optuna.logging.set_verbosity(optuna.logging.INFO)
    assert any("finished with value" in r.getMessage() for r in caplog.records)


def test_the_largest_space_that_fits_is_accepted():
    spec = study_from_dict(tomllib.loads(BASE + """
[search.space]
n_layers = { low = 1, high = 3 }
units = { low = 64, high = 4096, log = true }
"""))
    check_largest_model(spec.name, spec.search, base_candidate(spec))  # 4096 x 4096 x 2 + ...


def test_a_trial_draws_per_layer_or_shared_parameters_around_the_base():
    spec = study_from_dict(tomllib.loads(BASE + """
[search.space]
n_layers = { low = 1, high = 3 }
units = { low = 16, high = 256, log = true }
dropout = { low = 0.0, high = 0.5, shared = true }
learning_rate = { choices = [0.001, 0.01] }
optimizer = "adamw"
"""))
    base = base_candidate(spec)
    assert spec.search is not None
    params = {"n_layers": 2, "units_0": 128, "units_1": 32, "dropout": 0.25,
              "learning_rate": 0.01}
    candidate = suggest(FixedParams(params), spec.search, base, "trial-7")
    assert candidate.name == "trial-7"
    assert [(layer.units, layer.dropout) for layer in candidate.model.layers] == [
        (128, 0.25), (32, 0.25)]
    assert candidate.train.learning_rate == 0.01 and candidate.train.optimizer == "adamw"
    assert base_params(spec.search, base) == {"n_layers": 1, "units_0": 64, "dropout": 0.0,
                                              "learning_rate": 0.001}


def test_a_residual_layer_keeps_the_channels_its_input_layer_draws():
    spec = study_from_dict(tomllib.loads("""
name = "x"
[[candidates]]
name = "a"
conv = [{ filters = 8, padding = "same" }, { filters = 8, padding = "same", residual = true },
        { filters = 4, padding = "same", pool = 2 }]
[search.space]
filters = { low = 4, high = 32 }
"""))
    base = base_candidate(spec)
    assert spec.search is not None
    params = {"filters_0": 16, "filters_2": 24}
    candidate = suggest(FixedParams(params), spec.search, base, "t")
    assert [layer.filters for layer in candidate.model.conv] == [16, 16, 24]
    assert base_params(spec.search, base) == {"filters_0": 8, "filters_2": 4}
    grid_spec = study_from_dict(tomllib.loads(GRID_RESIDUAL))
    assert grid_spec.search is not None
    points = grid(grid_spec.search, base_candidate(grid_spec))
    assert points == {"filters_0": [4, 8], "filters_2": [4, 8]}  # no copies over filters_1


GRID_RESIDUAL = """
name = "x"
[[candidates]]
name = "a"
conv = [{ filters = 8, padding = "same" }, { filters = 8, padding = "same", residual = true },
        { filters = 4, padding = "same", pool = 2 }]
[search]
sampler = "grid"
[search.space]
filters = { low = 4, high = 8, step = 4 }
"""


def test_a_trial_draws_augmentation_ema_tta_and_init():
    spec = study_from_dict(tomllib.loads(BASE + """
[search.space]
crop = { low = 0, high = 3 }
flip = { choices = [false, true] }
erase = { low = 0.0, high = 1.0 }
ema = { choices = [0.0, 0.99] }
tta = { choices = ["none", "flip"] }
init = { choices = ["glorot", "pytorch"] }
"""))
    base = base_candidate(spec)
    assert spec.search is not None
    params = {"crop": 2, "flip": True, "erase": 0.4, "ema": 0.99, "tta": "flip",
              "init": "pytorch"}
    candidate = suggest(FixedParams(params), spec.search, base, "t")
    augment = candidate.train.augment
    assert (augment.crop, augment.flip, augment.erase) == (2, True, 0.4)
    assert (candidate.train.ema, candidate.model.tta) == (0.99, "flip")
    assert candidate.model.init == "pytorch"
    assert base_params(spec.search, base) == {"crop": 0, "flip": False, "erase": 0.0,
                                              "ema": 0.0, "tta": "none", "init": "glorot"}


def test_samplers_and_pruners_are_chosen_and_seeded():
    spec = study_from_dict(tomllib.loads(BASE + """
[search.space]
units = { choices = [16, 32] }
learning_rate = { low = 0.001, high = 0.1, log = true }
"""))
    assert spec.search is not None
    base = base_candidate(spec)
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "cmaes": optuna.samplers.CmaEsSampler}
    for name, kind in kinds.items():
        search = dataclasses.replace(spec.search, sampler=name)
        assert isinstance(make_sampler(search, base, seed=1), kind)
    grid = dataclasses.replace(spec.search, sampler="grid",
                               space={"units": spec.search.space["units"]})
    assert isinstance(make_sampler(grid, base, seed=1), optuna.samplers.GridSampler)
    pruners = {"median": optuna.pruners.MedianPruner, "wilcoxon": optuna.pruners.WilcoxonPruner,
               "none": optuna.pruners.NopPruner}
    for name, kind in pruners.items():
        search = dataclasses.replace(spec.search, pruner=name)
        assert isinstance(make_pruner(search), kind)
    a, b = (make_sampler(spec.search, base, seed=5) for _ in range(2))
    study_a, study_b = (optuna.create_study(sampler=s) for s in (a, b))
    draws = [[s.ask().suggest_float("x", 0, 1) for _ in range(3)] for s in (study_a, study_b)]
    assert draws[0] == draws[1]


def test_the_bundled_search_has_the_manual_studys_budget():
    spec = load_study("search")
    assert spec.search is not None
    assert spec.search.budget == 6 * 5 * 40 and spec.cv.n_splits == 5
    # Its TFLOP budget is the seed study's cross-validation arithmetic (39 TFLOP), rounded up.
    seed = load_study("seed")
    manual = sum(spec.cv.n_splits * training_flops(c.model, 48_000, c.train.epochs)
                 for c in seed.candidates) / 1e12
    assert manual <= (spec.search.budget_tflop or 0) < manual + 1
    assert spec.search.pruner == "median-compute"
    assert base_candidate(spec).name == "dense(256) dropout"
    assert set(spec.search.space) >= {"n_layers", "units", "dropout", "l2", "learning_rate",
                                      "batch_size"}
    quick = quick_variant(spec)
    assert quick.search is not None and quick.search.n_trials <= 6
    assert (quick.search.budget or 0) <= 6 * 5 * 8 and quick.data.train_limit <= 6000


# --------------------------------------------------------------------------------------------
# Searching the tiny dataset


def test_a_tiny_search_finds_the_good_learning_rates(tiny_idx_dir: Path, tmp_path: Path):
    path = _load(search_toml(tiny_idx_dir, search="""
n_trials = 8
sampler = "tpe"
startup_trials = 3
warmup = 1
[search.reference]
score = 0.5
""", space="learning_rate = { low = 1e-6, high = 0.05, log = true }"), tmp_path)
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)

    assert result.finished and result.stopped_by == "n_trials"
    trials = result.trials
    assert sum(t.state in FINISHED for t in trials) == 8
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value or 0)
    worst = min(complete, key=lambda t: t.value or 0)
    assert best.params["learning_rate"] >= 1e-3, best.params
    assert (best.value or 0) >= 0.8 and (best.value or 0) - (worst.value or 0) >= 0.3
    assert trials[0].params["learning_rate"] == 0.001  # the base candidate comes first
    # Pruned trials are the hopeless ones: tiny learning rates.
    for trial in trials:
        if trial.state == TrialState.PRUNED:
            assert trial.params["learning_rate"] < 1e-3, trial.params

    summary = result.summary
    assert summary is not None and summary["best_trial"] == best.number
    assert summary["top"][0]["verdict"] == "best" and len(summary["top"]) == len(complete)
    assert summary["reference"][0]["kind"] == "one-sample"
    assert summary["retrain"]["trial"] == best.number
    assert 0 <= summary["retrain"]["test_accuracy"] <= 1
    retrained = summary["retrain"]  # with its interval from the tiny data's 100 test images
    assert (retrained["test_ci_low"], retrained["test_ci_high"]) == \
        proportion_ci(retrained["test_accuracy"], 100)
    low, high = (f"{100 * v:.1f}" for v in proportion_ci(retrained["test_accuracy"], 100))
    assert f"% [95% interval {low}, {high}] (" in retrain_line(summary)
    out = result.output_dir
    for name in ("results.md", "results.json", "study.toml", "report.html",
                 "figures/search-history.png", "figures/search-importances.png",
                 "figures/search-parallel.png", f"models/trial-{best.number}/model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert f"| {best.number}" in (out / "results.md").read_text()
    store = Store.open(tmp_path / "runs")
    (run,) = store.runs(kind="search")
    assert run.state == "finished" and run.summary["best"] == f"trial {best.number}"
    trial_models = [m for m in store.models(run.id) if m.role == "trial"]
    assert len(trial_models) == 3 * 8  # every trial's folds, pruned ones included
    store.close()
    store = Store.open(tmp_path / "runs")
    shown = describe_run(store, run.id)  # what `fashionlab runs show` prints
    assert shown["kind"] == "search" and shown["table"] == []
    store.close()
    # Running it again shows the finished search: nothing is trained. What a process killed
    # after the search finished left undone is done: the report written, its half-written
    # files removed.
    (out / "report.html").unlink()
    dead = dead_pid()
    (out / f".report.html.{dead}.tmp").write_text("<html>half")
    again = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert again.summary == summary and len(again.trials) == len(trials)
    assert (out / "report.html").is_file() and not list(out.glob(".*.tmp"))
    # Shown from another run directory on the same store: its results are named where they
    # are (not `<other>/<run id>`, a folder that does not exist).
    elsewhere = run_search(load_study(path), run_dir=tmp_path / "other", progress=False,
                           store_url=default_url(tmp_path / "runs"))
    assert elsewhere.summary == summary and elsewhere.output_dir == out.resolve()


def test_pruning_stops_a_hopeless_trial_early(tiny_idx_dir: Path, tmp_path: Path):
    path = _load(search_toml(tiny_idx_dir, epochs=4, search="""
n_trials = 3
start_with_base = false
startup_trials = 2
warmup = 1
""", space="learning_rate = { low = 1e-7, high = 0.1, log = true }"), tmp_path)
    spec = load_study(path)
    run_dir = tmp_path / "runs"
    Store.open(run_dir).close()
    storage = open_storage(default_url(run_dir))
    study = optuna.create_study(study_name=search_identity(spec)[0], storage=storage,
                                direction="maximize")
    for lr in (0.01, 0.02, 1e-7):
        study.enqueue_trial({"learning_rate": lr})
    storage.engine.dispose()
    shown = Recorder()
    result = run_search(spec, run_dir=run_dir, progress=shown)
    states = [t.state for t in result.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    hopeless = result.trials[2]
    assert hopeless.user_attrs["stopped"] == "pruned at epoch 2"
    assert hopeless.user_attrs["fold_epochs"] == 3 * 2  # 3 folds stopped after 2 of 4 epochs
    # The epoch it was pruned at is shown as stored, before the trial's end is said.
    said = [c for c in shown.calls if c[0] in ("epoch", "log") and "trial 2" in c[1]]
    assert [c[2] for c in said if c[0] == "epoch"] == [1, 2]
    assert all(c[1].startswith("trial 2 folds 0, 1, 2  ") for c in said if c[0] == "epoch")
    assert said[-1][0] == "log" and said[-1][1].startswith("trial 2 pruned (pruned at epoch 2)")


def test_a_compute_budget_stops_the_search_and_every_trial_states_its_cost(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # One fold-epoch of dense(16) on 200 images: 3 x forward_flops x 200 = 1.5e-5 TFLOP.
    path = _load(search_toml(tiny_idx_dir, search="""
n_trials = 20
budget_tflop = 5e-4
sampler = "random"
pruner = "median-compute"
startup_trials = 1
warmup = 1
""", space="units = { low = 8, high = 64 }\nlearning_rate = { low = 1e-3, high = 0.05 }"),
        tmp_path)
    spec = load_study(path)
    assert spec.search is not None
    result = run_search(spec, run_dir=tmp_path / "runs", progress=False)
    assert result.finished and result.stopped_by == "budget_tflop"
    trials = [t for t in result.trials if t.state in FINISHED]
    assert 2 <= len(trials) < 20
    # No trial starts once the budget is spent: the last one started below it.
    assert sum(t.user_attrs["tflop"] for t in trials[:-1]) < 5e-4
    assert sum(t.user_attrs["tflop"] for t in trials) >= 5e-4
    base = base_candidate(spec)
    for trial in trials:
        model = suggest(FixedParams(trial.params), spec.search, base, "t").model
        expected = trial.user_attrs["fold_epochs"] * 3 * forward_flops(model) * 200 / 1e12
        assert trial.user_attrs["tflop"] == pytest.approx(expected)
        assert trial.user_attrs["train_seconds"] > 0
        # The equal-compute pruner's reports: the TFLOP trained up to each epoch.
        steps = trial.user_attrs["step_tflop"]
        assert steps == pytest.approx([3 * forward_flops(model) * 200 / 1e12 * 3 * e
                                       for e in range(1, len(steps) + 1)])
    summary = result.summary
    assert summary is not None and summary["budget_tflop"] == 5e-4
    assert summary["tflop"] == pytest.approx(sum(t.user_attrs["tflop"] for t in trials))
    assert summary["fold_epochs"] == sum(t.user_attrs["fold_epochs"] for t in trials)
    assert summary["train_seconds"] == pytest.approx(
        sum(t.user_attrs["train_seconds"] for t in trials))
    assert {row["tflop"] for row in summary["trials"]} >= {t.user_attrs["tflop"]
                                                          for t in trials}
    assert "/0.0005 TFLOP" in (result.output_dir / "results.md").read_text()
    report = (result.output_dir / "report.html").read_text()
    assert "TFLOP; stopped by budget_tflop" in report
    assert "Every fold read at the CV-consensus epoch" in report
    retrained = summary["retrain"]  # its retrained best tested in the report, as a study's
    assert retrained is not None and 'id="tested"' in report
    assert f'alt="confusion matrix of {retrained["candidate"]} (retrained' in report
    # The command line says what was spent (the finished search, read back).
    code, out, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "TFLOP; stopped by budget_tflop" in out and "of training" in out


def test_a_seconds_budget_starts_no_trial_once_spent(tiny_idx_dir: Path, tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 5\nbudget_seconds = 0.001")
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert result.stopped_by == "budget_seconds" and len(result.trials) == 1
    assert result.summary is not None and result.summary["train_seconds"] >= 0.001


def _history(val_loss: list[float], val_accuracy: list[float]) -> list[EpochMetrics]:
    return [EpochMetrics(0.0, 0.0, loss, acc, 1.0) for loss, acc in zip(val_loss, val_accuracy)]


def test_a_searchs_wall_time_counts_when_trials_ran_not_the_gaps_between_runs():
    """Two workers in parallel count once; the half hour between a stop and a resume not at
    all (the span from the first start to the last end would say 40 min)."""
    import datetime

    from fashionlab.search.finish import _span

    t0 = datetime.datetime(2026, 1, 1, 12, 0, 0)

    def trial(number: int, start: float, end: float | None) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(
            number=number, state=TrialState.COMPLETE if end is not None else TrialState.RUNNING,
            value=0.5 if end is not None else None, values=None,
            datetime_start=t0 + datetime.timedelta(minutes=start),
            datetime_complete=None if end is None else t0 + datetime.timedelta(minutes=end),
            params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=number)

    trials = [trial(0, 0, 4), trial(1, 2, 5), trial(2, 35, 40), trial(3, 36, 38),
              trial(4, 39, None)]
    assert _span(trials) == (5 + 5) * 60
    assert _span([trial(0, 0, None)]) is None


def test_consensus_scores_read_every_fold_at_one_epoch():
    # Fold a is best at epoch 2, fold b at 3; the mean val_loss curve is 1.0, 0.65, 0.5, 0.8:
    # with patience 1 the warning fires at epoch 3, which both folds are read at.
    a = MemberResult("a", _history([1.0, 0.5, 0.6, 0.7], [0.1, 0.8, 0.7, 0.6]))
    b = MemberResult("b", _history([1.0, 0.8, 0.4, 0.9], [0.2, 0.5, 0.9, 0.4]))
    train, rule = TrainSpec(), WarningRule(patience=1, min_delta=0.0)
    read = consensus_scores([a, b], train, rule)
    assert read.epoch == 3
    assert list(read.val_accuracy) == [0.7, 0.9] and list(read.val_loss) == [0.6, 0.4]
    # A fold stopped early (a after 3 epochs): the consensus lies within the epochs every
    # fold reached (1.0, 0.65, 0.5: no warning, the lowest mean is epoch 3); no fold is read
    # past its last epoch.
    a.history = a.history[:3]
    assert consensus_scores([a, b], train, rule).epoch == 3
    a.history = a.history[:2]
    read = consensus_scores([a, b], train, rule)
    assert read.epoch == 2 and list(read.val_accuracy) == [0.8, 0.5]


def test_a_one_cycle_trial_is_read_at_the_end_of_its_schedule():
    # The same folds trained with a one-cycle schedule: read at their last epoch (4), not at
    # the warning's epoch 3 or the lowest val_loss; a fold that ended early (a, after 3 epochs)
    # shortens it to the last epoch every fold reached.
    a = MemberResult("a", _history([1.0, 0.5, 0.6, 0.7], [0.1, 0.8, 0.7, 0.6]))
    b = MemberResult("b", _history([1.0, 0.8, 0.4, 0.9], [0.2, 0.5, 0.9, 0.4]))
    train, rule = TrainSpec(schedule="onecycle"), WarningRule(patience=1, min_delta=0.0)
    read = consensus_scores([a, b], train, rule)
    assert read.epoch == 4 and list(read.val_accuracy) == [0.6, 0.4]
    a.history = a.history[:3]
    assert consensus_scores([a, b], train, rule).epoch == 3


def test_trials_and_the_reference_candidate_are_read_by_one_rule(tiny_idx_dir: Path,
                                                                  tmp_path: Path):
    """The base trial is the reference study's candidate (same folds, seeds and training): read
    by the same rule, its fold scores are the reference's, though the reference study read
    each fold at its own early-stopping epoch."""
    train = ('learning_rate = 0.003\n'
             'early_stopping = { monitor = "val_loss", patience = 1, min_delta = 0.03 }')
    candidate = '[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n'
    reference = tmp_path / "reference.toml"
    reference.write_text(tiny_study_toml(tiny_idx_dir, name="tiny-ref", epochs=8, train=train,
                                         patience=1, final=False, candidates=candidate))
    run_dir = tmp_path / "runs"
    study = run_study(load_study(reference), run_dir=run_dir, progress=False)
    (theirs,) = [c for c in study.candidates if c.name == "small"]
    assert len(set(theirs.result_epochs)) > 1  # the folds stopped at different epochs
    path = _load(search_toml(tiny_idx_dir, epochs=8, train=train, search="""
n_trials = 2
pruner = "none"
objective = "val_loss"
[search.reference]
study = "tiny-ref"
candidate = "small"
""", space="learning_rate = { low = 1e-3, high = 0.05, log = true }"), tmp_path)
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    summary = result.summary
    assert summary is not None and summary["score_rule"] == "cv-consensus epoch"
    (row,) = summary["reference"]
    assert row["kind"] == "paired" and row["reference"] == f"small (run {study.run.id})"
    base = result.trials[0]
    assert base.user_attrs["base"] == "small"
    assert row["fold_scores"] == base.user_attrs["fold_scores"]
    assert row["epoch"] == base.user_attrs["consensus_epoch"]
    assert row["score"] == pytest.approx(sum(row["fold_scores"]) / 3)
    # Not the study's own reading (each fold at its best epoch, chosen on that fold).
    assert row["fold_scores"] != pytest.approx(list(theirs.val_loss))
    text = (result.output_dir / "results.md").read_text()
    assert f"at its CV-consensus epoch {row['epoch']})" in text
    assert "Every fold read at the CV-consensus epoch" in text


def test_a_one_cycle_reference_is_read_at_the_end_of_its_schedule(tiny_idx_dir: Path,
                                                                  tmp_path: Path):
    """The reference study's candidate is re-read by how it was trained: a one-cycle schedule at
    its last epoch, as the base trial (the same candidate) is, not at the warning's epoch."""
    train = 'optimizer = "adamw"\nlearning_rate = 0.01\nschedule = "onecycle"'
    early_warning = ("min_delta = 0.02", "min_delta = 0.5")  # fires within the 6 epochs
    candidate = '[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n'
    reference = tmp_path / "reference.toml"
    reference.write_text(tiny_study_toml(
        tiny_idx_dir, name="tiny-ref", epochs=6, train=train, patience=2, final=False,
        candidates=candidate).replace(*early_warning))
    run_dir = tmp_path / "runs"
    path = _load(search_toml(tiny_idx_dir, epochs=6, train=train, search="""
n_trials = 1
pruner = "none"
[search.reference]
study = "tiny-ref"
candidate = "small"
""", space="learning_rate = { low = 1e-3, high = 0.05, log = true }").replace(*early_warning),
                 tmp_path)
    # Searched before its reference study ran: said, and picked up once the study has run,
    # without training the search again.
    early = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert early.summary["reference"][0]["missing"].endswith("in the store: run it first")
    study = run_study(load_study(reference), run_dir=run_dir, progress=False)
    assert study.candidates[0].warning.epoch < 6
    epochs_before = len(Store.open(run_dir).epochs(early.run.id))
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.run.id == early.run.id
    assert len(Store.open(run_dir).epochs(early.run.id)) == epochs_before  # nothing trained
    assert result.summary["retrain"] == early.summary["retrain"]
    assert "not tested" not in (result.output_dir / "results.md").read_text()
    (row,) = result.summary["reference"]
    stored = Store.open(run_dir).run(early.run.id)
    assert stored.summary["reference"] == [row]
    assert stored.finished == early.run.finished  # written again, not run longer
    base = result.trials[0]
    assert row["epoch"] == base.user_attrs["consensus_epoch"] == 6
    assert row["fold_scores"] == base.user_attrs["fold_scores"]
    assert row["fold_scores"] == pytest.approx(list(study.candidates[0].val_accuracy))


def test_a_grid_with_the_wilcoxon_pruner_reports_per_fold(tiny_idx_dir: Path, tmp_path: Path):
    text = search_toml(tiny_idx_dir, search="""
sampler = "grid"
pruner = "wilcoxon"
warmup = 1
""", space="learning_rate = { choices = [0.001, 0.01, 0.05] }")
    # With 3 folds its test could never prune (the smallest p is 1/2**3 = 0.125 > 0.1): refused.
    with pytest.raises(ConfigError, match=r"search\.pruner: wilcoxon compares a trial's folds "
                       r"and can prune nothing with 3 folds \(its smallest p is 0\.125"):
        load_study(_load(text, tmp_path, "three.toml"))
    path = _load(text.replace("n_splits = 3", "n_splits = 4"), tmp_path)
    shown = Recorder()
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=shown)
    assert result.finished and result.stopped_by == "grid"  # n_trials: the grid's size
    # Each fold trains alone, and progress names the fold it trains.
    epochs = [c for c in shown.calls if c[0] == "epoch" and c[1].startswith("trial ")]
    assert epochs
    for _, label, _, (key,) in epochs:
        trial, fold = key.split("/")
        assert label.startswith(f"trial {trial.removeprefix('trial-')} fold "
                                f"{fold.removeprefix('fold-')}  "), (label, key)
    assert sorted(t.params["learning_rate"] for t in result.trials) == [0.001, 0.01, 0.05]
    for trial in result.trials:  # one report per fold, up to the fold it was pruned at
        reported = sorted(trial.intermediate_values)
        assert reported and reported == list(range(len(reported)))
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert reported == [0, 1, 2, 3]
            assert trial.intermediate_values[0] == trial.user_attrs["fold_scores"][0]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from fashionlab.config import load_study
    from fashionlab.progress import Silent
    from fashionlab.search import run_search

    study, run_dir, target_key, target_epoch = sys.argv[1:5]

    class Killer(Silent):  # a progress reporter: it hears of each epoch once it is stored
        def epoch(self, label, epoch, metrics):
            if target_key in metrics and epoch == int(target_epoch):
                os.kill(os.getpid(), signal.SIGKILL)

    run_search(load_study(study), run_dir=run_dir, progress=Killer())
""")


def test_finish_writes_the_results_of_the_trials_so_far_and_refuses_none(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 4\npruner = "none"')
    spec = load_study(path)
    missing = tmp_path / "nothing-here"
    code, _, err = run_cli(capsys, "search", str(path), "--finish", "--run-dir", str(missing))
    assert_one_line_error(code, err, f"no store at {missing / 'fashionlab.db'}")
    assert not missing.exists()

    run_dir = tmp_path / "runs"
    Store.open(run_dir).close()  # a store, but no trial of this search in it
    before = sorted((p.name, p.read_bytes()) for p in run_dir.iterdir())
    code, _, err = run_cli(capsys, "search", str(path), "--finish", "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "search 'tiny-search' has no trial that ran to its end",
                          "nothing to finish (run the search first)")
    # Untouched: neither Optuna's tables nor the search's lock file made in it
    assert sorted((p.name, p.read_bytes()) for p in run_dir.iterdir()) == before
    store = Store.open(run_dir)
    assert store.runs() == [] and not store.has_table("studies")  # no empty result run
    store.close()

    # Its only trial stopped by Ctrl-C (failed, and retried when the search goes on): that
    # trial did not run to its end either.
    def stop_in_the_first_trial(key: str, epoch: int) -> None:
        if key.startswith("trial-0/") and epoch == 2:
            raise KeyboardInterrupt

    stopped_early = tmp_path / "stopped-early"
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, run_dir=stopped_early, progress=OnEpoch(stop_in_the_first_trial))
    with pytest.raises(ConfigError, match="has no trial that ran to its end"):
        run_search(spec, run_dir=stopped_early, progress=False, finish=True)
    store = Store.open(stopped_early)
    assert [r.state for r in store.runs()] == ["interrupted"]  # no empty result
    store.close()

    def stop_in_the_second_trial(key: str, epoch: int) -> None:
        if key.startswith("trial-1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(spec, run_dir=run_dir, progress=OnEpoch(stop_in_the_second_trial))
    holder = Store.open(run_dir)  # another process running the search: --finish waits for it
    (running,) = holder.runs(kind="search")
    holder.claim_run(running.id)
    with pytest.raises(ConfigError, match=r"search 'tiny-search' is running \(pid \d+ on "):
        run_search(spec, run_dir=run_dir, progress=False, finish=True)
    holder.end_run(running.id, "interrupted")
    holder.close()
    finished = run_search(spec, run_dir=run_dir, progress=False, finish=True)
    assert finished.finished and finished.stopped_by == "finish"
    assert finished.summary["finished_trials"] == [0]
    assert finished.summary["best"] == "trial 0"


def test_a_killed_search_resumes_with_no_lost_or_repeated_trial(tiny_idx_dir: Path,
                                                                 tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, """
n_trials = 4
pruner = "none"
sampler = "random"
""")
    spec = load_study(path)
    reference = run_search(spec, run_dir=tmp_path / "reference", progress=False)

    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    run_dir = tmp_path / "interrupted"
    killed = subprocess.run([sys.executable, str(script), str(path), str(run_dir),
                             "trial-1/fold-1", "2"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = _trials(run_dir, path)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]

    resumed = run_search(spec, run_dir=run_dir, progress=False)
    trials = resumed.trials
    assert resumed.finished and sum(t.state in FINISHED for t in trials) == 4
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    assert trials[1].state == TrialState.FAIL  # the killed trial, failed ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # ... retried once
    retry = retries[0]
    assert retry.params == trials[1].params and retry.user_attrs["models"] == "trial-1"
    # It continued from the checkpoint to the numbers the uninterrupted search has.
    assert retry.value == reference.trials[1].value
    assert retry.user_attrs["fold_scores"] == reference.trials[1].user_attrs["fold_scores"]
    # And the trials after it are the ones the uninterrupted search drew, with its scores.
    finished = [t for t in trials if t.state in FINISHED]
    assert [(t.params, t.value) for t in finished] == \
        [(t.params, t.value) for t in reference.trials]
    # Its rows name the trial it retries, whose models and epochs it kept (models/trial-1).
    assert {row["trial"]: row["retry_of"] for row in resumed.summary["top"]}[retry.number] == 1
    assert f"| {retry.number} (retry of 1) |" in (resumed.output_dir / "results.md").read_text()

    store = Store.open(run_dir)
    (run,) = store.runs()
    models = [m for m in store.models(run.id) if m.role == "trial"]
    names = {m.candidate for m in models}
    assert len(names) == 4 and len(models) == 4 * 3  # one set of folds per finished trial
    assert all(m.status == "finished" for m in models)
    epochs = store.epochs(run.id)
    keys = [(e.key, e.epoch) for e in epochs]
    assert len(keys) == len(set(keys)) == 4 * 3 * 3 + 3  # folds' epochs + the retrain's
    store.close()


def test_finish_after_a_kill_counts_the_lost_trial_and_keeps_its_checkpoint(
        tiny_idx_dir: Path, tmp_path: Path):
    """`--finish` after the search's process was killed: the trial it trained is lost (and
    waits for its retry), not "running", and its checkpoint stays, so that the retry, when the
    search goes on, continues from it instead of training from its first epoch again."""
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 3\npruner = "none"')
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    run_dir = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(script), str(path), str(run_dir),
                             "trial-1/fold-1", "2"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    spec = load_study(path)
    finished = run_search(spec, run_dir=run_dir, progress=False, finish=True)
    assert finished.summary["counts"] == {"complete": 1, "pruned": 0, "fail": 0, "retried": 0,
                                          "waiting": 1, "running": 0}
    assert "(1 waiting to run again)" in (finished.output_dir / "results.md").read_text()
    assert list((finished.output_dir / "checkpoints").glob("*.pt"))
    shown = Recorder()
    resumed = run_search(spec, run_dir=run_dir, progress=shown)
    retried = [c[2] for c in shown.calls
               if c[0] == "epoch" and any(k.startswith("trial-1/") for k in c[3])]
    assert retried and retried[0] > 1  # from its checkpoint, not from epoch 1
    assert resumed.summary["counts"] == {"complete": 3, "pruned": 0, "fail": 0, "retried": 1,
                                         "waiting": 0, "running": 0}
    assert not (resumed.output_dir / "checkpoints").exists()  # none waits any more


def test_a_stop_while_a_trial_is_claimed_retries_it(tiny_idx_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C while the store records the trial's claim (before it trains): the trial is
    retried, as one stopped while training is, not failed for good."""
    from fashionlab.search import loop

    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 3\npruner = "none"\n'
                                 'sampler = "random"')
    reference = run_search(load_study(path), run_dir=tmp_path / "reference", progress=False)
    real, calls = loop.claim_job, []

    def stopped_at_the_second_claim(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "claim_job", stopped_at_the_second_claim)
    with pytest.raises(KeyboardInterrupt):
        run_search(load_study(path), run_dir=tmp_path, progress=False)
    monkeypatch.setattr(loop, "claim_job", real)
    result = run_search(load_study(path), run_dir=tmp_path, progress=False)
    assert result.summary["counts"] == {"complete": 3, "pruned": 0, "fail": 0, "retried": 1,
                                        "waiting": 0, "running": 0}
    assert result.trials[1].params == {}  # stopped before it drew
    # Its retry, and the trial after it, draw what an uninterrupted search draws.
    finished = [t for t in result.trials if t.state in FINISHED]
    assert [(t.params, t.value) for t in finished] == \
        [(t.params, t.value) for t in reference.trials]


def test_fresh_in_a_copied_run_directory_leaves_the_original_alone(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 1\npruner = "none"')
    original, copy = tmp_path / "original", tmp_path / "copy"
    first = run_search(load_study(path), run_dir=original, progress=False)
    shutil.copytree(original, copy)
    # --fresh with --finish: contradictory, refused before anything is deleted.
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(copy), "--fresh",
                           "--finish")
    assert_one_line_error(code, err, "finish and fresh (--finish, --fresh) contradict each other")
    assert [r.id for r in Store.open(copy).runs()] == [first.run.id]
    assert len(_trials(copy, path)) == 1
    again = run_search(load_study(path), run_dir=copy, progress=False, fresh=True)
    assert again.run.id != first.run.id or again.run.started > first.run.started
    assert (original / first.run.id / "results.md").exists()  # the original's files stay
    assert (copy / again.run.id / "results.md").exists()
    if again.run.id != first.run.id:  # the copy's files of the deleted run went with it
        assert not (copy / first.run.id).exists()


def test_an_interrupted_trial_is_retried_once_with_its_parameters(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, """
n_trials = 3
pruner = "none"
""")

    def interrupt(key: str, epoch: int) -> None:
        if key == "trial-1/fold-0" and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(load_study(path), run_dir=tmp_path, progress=OnEpoch(interrupt))
    # What the stopped trial trained is spent already, while its retry waits to run.
    storage = open_storage(default_url(tmp_path))
    name = search_identity(load_study(path))[0]
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    storage.engine.dispose()
    first, stopped, waiting = trials
    assert (stopped.state, waiting.state) == (TrialState.FAIL, TrialState.WAITING)
    stored = Store.open(tmp_path).epochs(Store.open(tmp_path).runs()[0].id)
    assert stopped.user_attrs["fold_epochs"] == sum(e.key.startswith("trial-1/") for e in stored)
    assert fold_epochs(trials) == first.user_attrs["fold_epochs"] \
        + stopped.user_attrs["fold_epochs"]
    # `runs show` of the unfinished search says how far it got and what it spent so far.
    (run,) = Store.open(tmp_path).runs()
    shown = describe_run(Store.open(tmp_path), run.id)["trials"]
    assert shown["counts"] == {"complete": 1, "pruned": 0, "fail": 0, "retried": 0,
                               "waiting": 1, "running": 0}
    assert shown["fold_epochs"] == fold_epochs(trials) and shown["stopped_by"] is None
    code, out, err = run_cli(capsys, "runs", "show", run.id, "--run-dir", str(tmp_path))
    assert code == 0, err
    assert (f"so far: 1 complete, 0 pruned, 0 failed trials (1 waiting to run again); "
            f"spent: {fold_epochs(trials)} fold-epochs") in " ".join(out.split())
    # Its report draws the trials so far from the Optuna study, as `runs show` counts them.
    html = write_report(Store.open(tmp_path), run.id).read_text()
    assert "so far: 1 complete, 0 pruned, 0 failed trials" in html
    # Trial 1 and its retry waiting to run are one trial, not two of Optuna's.
    assert "<p>2 trial(s), direction: maximize.</p>" in html
    assert 'alt="optimisation history"' in html and "No finished trials yet" not in html
    assert '<td class="num">0</td>' in html  # trial 0, the completed one, in the table
    result = run_search(load_study(path), run_dir=tmp_path, progress=False)
    states = [t.state for t in result.trials]
    assert states.count(TrialState.FAIL) == 1 and sum(s in FINISHED for s in states) == 3
    (retry,) = [t for t in result.trials if t.system_attrs.get("failed_trial") == 1]
    assert retry.params == result.trials[1].params and retry.user_attrs["models"] == "trial-1"
    # The stopped trial ran again: not failed (for good), and said so.
    assert result.summary["counts"] == {"complete": 3, "pruned": 0, "fail": 0, "retried": 1,
                                        "waiting": 0, "running": 0}
    assert ("3 complete, 0 pruned, 0 failed trials (1 stopped or lost and run again)"
            in (result.output_dir / "results.md").read_text())
    assert len(result.trials) == 4  # Optuna's: the stopped attempt and its retry are two
    html = write_report(Store.open(tmp_path), result.run.id).read_text()
    assert "<p>3 trial(s), direction: maximize.</p>" in html


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_trial_whose_checkpoint_the_disk_refuses_is_retried_not_failed(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, """
n_trials = 3
pruner = "none"
""")
    clean = run_search(load_study(path), run_dir=tmp_path / "clean", progress=False)
    real = checkpoints.temporary_path

    def on_a_full_disk(checkpoint: Path) -> Path:
        tmp = real(checkpoint)
        if not tmp.is_symlink():
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.symlink_to("/dev/full")  # every write there fails: ENOSPC from the kernel
        return tmp

    def fill_the_disk(key: str, epoch: int) -> None:
        if key == "trial-1/fold-0" and epoch == 1:
            monkeypatch.setattr(checkpoints, "temporary_path", on_a_full_disk)

    with pytest.raises(CheckpointError, match="No space left on device"):
        run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(fill_the_disk))
    monkeypatch.undo()  # space freed
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert result.summary["counts"] == {"complete": 3, "pruned": 0, "fail": 0, "retried": 1,
                                        "waiting": 0, "running": 0}

    def scored(trials):  # (parameters, score) of the completed trials
        return sorted(((t.params, t.value) for t in trials if t.state == TrialState.COMPLETE),
                      key=lambda pair: pair[1] or 0.0)

    assert scored(result.trials) == scored(clean.trials)  # the same trials, the same scores


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_figure_the_disk_refuses_is_named_and_the_search_ends_later(
        tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "s.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=2))

    def fill_the_disk(key: str, epoch: int) -> None:  # before the results are written
        (run_folder,) = [p for p in tmp_path.joinpath("runs").iterdir() if p.is_dir()]
        figure = run_folder / "figures" / "search-history.png"
        figure.parent.mkdir(exist_ok=True)
        if not staging_path(figure).is_symlink():
            staging_path(figure).symlink_to("/dev/full")  # its writes fail: ENOSPC

    with pytest.raises(OutputError) as refused:
        run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(fill_the_disk))
    assert str(refused.value).endswith(
        "figures/search-history.png: cannot write the search's figures (No space left on "
        "device); free some space or fix the permissions and run the same command again: the "
        "trials are kept in the store")
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert (result.output_dir / "figures" / "search-history.png").is_file()
    assert len(result.trials) == 2  # nothing trained again


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_optunas_tables_on_a_full_disk_are_one_line(tmp_path: Path):
    # Optuna makes its tables when a search first opens its storage: in a process whose files
    # may not grow past 1 KB (as on a full disk), SQLite's "database or disk is full" (or
    # "disk I/O error") is a StoreError, not a traceback of SQLAlchemy's.
    Store.open(tmp_path).close()  # the store's own tables, as a search makes them first
    script = f"""
import resource, signal
from fashionlab.errors import StoreError
from fashionlab.search.storage import open_storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
try:
    open_storage({default_url(tmp_path)!r})
except StoreError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"cannot use the store {default_url(tmp_path)}: "), done.stdout
    assert done.stdout.count("\n") == 1


def test_a_trial_stopped_again_in_every_retry_is_retried_every_time(tiny_idx_dir: Path,
                                                                     tmp_path: Path):
    path = _load(search_toml(tiny_idx_dir, epochs=6, search="""
n_trials = 3
pruner = "none"
sampler = "random"
""", space="learning_rate = { low = 1e-3, high = 0.1, log = true }"), tmp_path)
    reference = run_search(load_study(path), run_dir=tmp_path / "reference", progress=False)
    stops = range(1, MAX_RETRIES + 3)  # more stops than a crashing trial gets retries
    for stop_at in stops:  # in the trial, then in each retry (which goes on from its epoch)
        def interrupt(key: str, epoch: int, stop_at: int = stop_at) -> None:
            if key == "trial-1/fold-0" and epoch == stop_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(interrupt))
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    states = [t.state for t in result.trials]
    assert states.count(TrialState.FAIL) == len(stops) and sum(s in FINISHED for s in states) == 3
    finished = [t for t in result.trials if t.state in FINISHED]
    assert finished[1].user_attrs["models"] == "trial-1"  # the last retry: the trial's models
    assert [(t.params, t.value) for t in finished] == \
        [(t.params, t.value) for t in reference.trials]  # nothing lost, the same search


def test_a_store_that_fails_while_a_stop_is_cleaned_up_does_not_hide_the_stop(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # SQLite answered "database is locked" at once to a worker marking its stopped trial for
    # a retry (another worker was writing): the stop is what is said, not a store error, and
    # a new try marks the trial, which is retried.
    path = _load(tiny_search_toml(tiny_idx_dir, n_trials=3), tmp_path)
    reference = run_search(load_study(path), run_dir=tmp_path / "reference", progress=False)

    def stop(key: str, epoch: int) -> None:
        if key.startswith("trial-1/"):
            raise KeyboardInterrupt

    retry, refused = RetryLostTrial.__call__, []

    def locked_once(*args, **kwargs):
        if not refused:
            refused.append(True)
            raise sa.exc.OperationalError("INSERT INTO trials", {},
                                          Exception("database is locked"))
        return retry(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(RetryLostTrial, "__call__", locked_once)
        with pytest.raises(KeyboardInterrupt):
            run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(stop))
    assert refused  # the first try was refused
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    finished = [t for t in result.trials if t.state in FINISHED]
    assert [(t.params, t.value) for t in finished] == \
        [(t.params, t.value) for t in reference.trials]  # nothing lost, the same search


def test_a_search_changed_after_an_interruption_says_it_starts_a_new_run(tiny_idx_dir: Path,
                                                                         tmp_path: Path):
    def stop(key: str, epoch: int) -> None:
        if key.startswith("trial-1/"):
            raise KeyboardInterrupt

    path = _load(tiny_search_toml(tiny_idx_dir, n_trials=3), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_search(load_study(path), run_dir=tmp_path / "runs", progress=OnEpoch(stop))
    (interrupted,) = Store.open(tmp_path / "runs").runs()
    path.write_text(path.read_text().replace("epochs = 2", "epochs = 3", 1))  # other settings
    recorder = Recorder()
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=recorder)
    logs = [call[1] for call in recorder.calls if call[0] == "log"]
    assert (f"run {result.run.id} is a new run: the settings of search 'tiny-search' differ "
            f"from those of its interrupted run {interrupted.id}") in logs[0]


# --------------------------------------------------------------------------------------------
# Many workers, one PostgreSQL database


def test_a_deleted_search_runs_again_from_scratch(tiny_idx_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 2\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False)
    code, _, err = run_cli(capsys, "runs", "delete", first.run.id, "--yes",
                           "--run-dir", str(run_dir))
    assert code == 0, err
    with pytest.raises(KeyError):  # its trials went with it
        optuna.load_study(study_name=first.study_name,
                          storage=f"sqlite:///{run_dir / 'fashionlab.db'}")
    again = run_search(load_study(path), run_dir=run_dir, progress=False)
    # A new run (its id may repeat the deleted one's: ids name the second a run started).
    assert again.finished and again.run.started > first.run.started
    assert [t.params for t in again.trials] == [t.params for t in first.trials]
    assert again.summary["best_value"] == first.summary["best_value"]


def test_search_fresh_starts_again_and_orphan_trials_are_refused(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 2\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False)
    store = Store.open(run_dir)
    store.delete_run(first.run.id)  # the store forgets the run, Optuna keeps its trials
    store.close()
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "2 trial(s) but no fashionlab run", "--fresh")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir), "--fresh",
                           "--json")
    assert code == 0, err
    (run,) = Store.open(run_dir).runs(kind="search")
    # A new run (its id may repeat the deleted one's: ids name the second a run started).
    assert run.started > first.run.started and run.state == "finished"
    assert len(_trials(run_dir, path)) == 2
    # Refused while another process runs the search, in its own words.
    holder = Store.open(run_dir)
    holder.claim_run(run.id)
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir), "--fresh")
    holder.end_run(run.id, "finished")
    holder.close()
    assert_one_line_error(code, err, "search 'tiny-search' is running (pid ",
                          "stop it before starting it afresh (--fresh)")


def test_two_workers_share_a_search_on_postgresql(postgres_url: str, tiny_idx_dir: Path,
                                                 tmp_path: Path):
    n_trials = 10
    path = _load(search_toml(tiny_idx_dir, epochs=5, search=f"""
n_trials = {n_trials}
pruner = "none"
""", space="""
learning_rate = {{ low = 1e-3, high = 0.1, log = true }}
units = {{ low = 64, high = 256 }}
""".replace("{{", "{").replace("}}", "}")), tmp_path)
    command = shutil.which("fashionlab", path=str(Path(sys.executable).parent))
    base = [command] if command else [sys.executable, "-c",
                                      "from fashionlab.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([*base, "search", str(path), "--store", postgres_url,
                                 "--run-dir", str(tmp_path / f"machine-{i}"), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    reports = [json.loads(out) for out, _ in outputs]
    assert sum(r["finished"] for r in reports) >= 1  # the last one wrote the results

    spec = load_study(path)
    storage = open_storage(postgres_url)
    trials = optuna.load_study(study_name=search_identity(spec)[0], storage=storage).get_trials()
    storage.engine.dispose()
    assert [t.number for t in trials] == list(range(n_trials))  # each trial exactly once
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers_seen = {t.user_attrs["worker"] for t in trials}
    assert len(workers_seen) == 2, workers_seen

    store = Store(database_url(postgres_url))
    (run,) = store.runs(kind="search")
    assert run.state == "finished" and run.summary["finished_trials"] == list(range(n_trials))
    models = [m for m in store.models(run.id) if m.role == "trial"]
    assert len(models) == n_trials * 3
    assert len({m.key for m in models}) == len(models)
    epochs = [(e.key, e.epoch) for e in store.epochs(run.id) if not e.key.endswith("/retrain")]
    assert len(epochs) == len(set(epochs)) == n_trials * 3 * 5
    # Each trial was a claim of the run while it trained (SKIP LOCKED, two processes), and
    # each claim ended with its trial.
    claims = job_rows(store, run.id)
    store.close()
    assert sorted(claims) == sorted(f"trial-{n}" for n in range(n_trials))
    assert {c.status for c in claims.values()} == {"done"}


def test_a_search_whose_database_drops_its_connections_stops_in_one_line_and_goes_on(
        postgres_url: str, tiny_idx_dir: Path, tmp_path: Path):
    # The server ends every connection to the search's database mid-trial (as it does when it
    # stops or restarts): one StoreError, not Optuna's traceback, and the trial is no failure
    # of its own: the search run again retries it and finishes.
    import sqlalchemy as sa

    server = postgres_url.rsplit("/", 1)[0]
    admin = sa.create_engine(database_url(f"{server}/postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE dropped"))
    url = f"{server}/dropped"
    path = _load(search_toml(tiny_idx_dir, epochs=3, search='n_trials = 2\npruner = "none"',
                             space="learning_rate = { low = 1e-3, high = 0.1, log = true }"),
                 tmp_path)

    def drop(key: str, epoch: int) -> None:
        if epoch == 2:
            with admin.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = 'dropped'"))

    spec = load_study(path)
    with pytest.raises(StoreError, match=r"^cannot \w+( to)? the store postgresql\S*://"
                                         r"postgres@127\.0\.0\.1:\d+/dropped: "):
        run_search(spec, run_dir=tmp_path / "runs", store_url=url, progress=OnEpoch(drop))
    result = run_search(spec, run_dir=tmp_path / "runs", store_url=url, progress=False)
    admin.dispose()
    assert result.finished
    counts = trial_counts(result.trials)
    assert (counts["complete"], counts["fail"], counts["retried"]) == (2, 0, 1), counts


def test_a_search_whose_server_does_not_answer_says_so_in_one_line(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _load(search_toml(tiny_idx_dir, search="n_trials = 1",
                             space="learning_rate = { low = 1e-3, high = 0.1, log = true }"),
                 tmp_path)
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(tmp_path / "runs"),
                           "--store", f"postgresql://fl:secret@127.0.0.1:{port}/fashionlab")
    assert_one_line_error(code, err, f"error: cannot open the store postgresql+psycopg2://"
                          f"fl:***@127.0.0.1:{port}/fashionlab: ", "refused")
    assert "secret" not in err and not (tmp_path / "runs").exists()


def test_a_study_and_the_runs_browser_use_a_postgresql_store(postgres_url: str,
                                                             tiny_idx_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    from helpers import run_cli, tiny_study_toml

    from fashionlab.config import load_study
    from fashionlab.study import run_study

    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, name="on-postgres", epochs=2, final=False))
    result = run_study(load_study(path), run_dir=tmp_path, store_url=postgres_url,
                       progress=False)
    code, out, err = run_cli(capsys, "runs", "list", "--store", postgres_url, "--json")
    assert code == 0, err
    assert result.run.id in {run["id"] for run in json.loads(out)}
    assert not (tmp_path / "fashionlab.db").exists()  # nothing went to the default SQLite file


def test_a_run_directory_that_is_a_file_is_one_line(tiny_idx_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]):
    path = _load(tiny_search_toml(tiny_idx_dir, n_trials=1), tmp_path)
    (tmp_path / "afile").write_text("")
    for command in ("search", "study"):
        code, _, err = run_cli(capsys, command, str(path), "--run-dir", str(tmp_path / "afile"))
        assert_one_line_error(code, err, f"{tmp_path / 'afile'} is a file, not a folder")
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir",
                           str(tmp_path / "afile" / "below"))
    assert_one_line_error(code, err, f"{tmp_path / 'afile'} is a file, not a folder")
    for command in (["runs", "list"], ["runs", "show", "x"], ["report", "x"]):  # read only
        code, _, err = run_cli(capsys, *command, "--run-dir", str(tmp_path / "afile"))
        assert_one_line_error(code, err, f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == ""


def test_a_search_stopped_by_its_time_limit_is_finished_by_the_same_process(
        tiny_idx_dir: Path, tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 3\npruner = \"none\"")
    spec = load_study(path)
    stopped = run_search(spec, run_dir=tmp_path, progress=False, timeout=0.001)
    assert stopped.stopped_by == "timeout" and not stopped.finished
    finished = run_search(spec, run_dir=tmp_path, progress=False, finish=True)
    assert finished.finished and finished.run.state == "finished"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trials asked here
def test_a_trial_whose_worker_stopped_before_claiming_it_is_retried(tiny_idx_dir: Path,
                                                                   tmp_path: Path):
    """A worker stopped or killed after Optuna made its trial, before it claimed the trial
    (both under the lock), left a running trial that nothing judged lost: the search could
    never end ("1 running", no results, the run read as running). Such trials are retried."""
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 3\npruner = "none"')
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001)
    storage = open_storage(default_url(run_dir))
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    study.ask()  # killed at once: no claim
    registered = study.ask()  # killed between its claim's registration and the claim itself
    storage.engine.dispose()
    with contextlib.closing(Store.open(run_dir)) as store:
        key = f"trial-{registered.number}"
        register_jobs(store, first.run.id, [(key, key)], 1)
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished and result.run.state == "finished"
    states = [t.state for t in result.trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert [t.number for t in result.trials if t.state == TrialState.FAIL] == [1, 2]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trial asked here
def test_a_worker_done_while_others_run_trials_says_so(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 3\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    # One trial (the base), then stopped by its time limit: the run is not finished.
    first = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001)
    assert first.stopped_by == "timeout" and len(first.trials) == 1
    # Let go by this process, which lives on (a notebook's kernel): interrupted, not running,
    # so that the same process can finish it, start it afresh or delete it.
    assert first.run.state == "interrupted"
    storage = open_storage(default_url(run_dir))  # another worker is running a trial...
    other = optuna.load_study(study_name=first.study_name, storage=storage).ask()
    storage.engine.dispose()
    with contextlib.closing(Store.open(run_dir)) as store:  # ...claimed, on another machine
        key = f"trial-{other.number}"
        register_jobs(store, first.run.id, [(key, key)], 1)
        with store.transaction() as conn:
            conn.execute(jobs.update().where(jobs.c.key == key).values(
                status="claimed", host="machine-b", pid=4242, heartbeat=time.time()))
    code, out, err = run_cli(capsys, "search", str(path), "--timeout", "0.001",
                             "--run-dir", str(run_dir))
    assert code == 0, err
    assert " ".join(out.split()).startswith(
        "stopped (timeout); so far 1 complete, 0 pruned, 0 failed trials (1 running). Run the "
        "same command to continue")
    code, out, err = run_cli(capsys, "search", str(path), "--n-trials", "2",
                             "--run-dir", str(run_dir))
    assert code == 0, err
    out = " ".join(out.split())  # as one line, however the console folds it
    assert out.startswith("this worker is done; so far 1 complete, 0 pruned, 0 failed trials "
                          "(1 running); other workers are still "
                          "running trials, and the last to finish writes the results "
                          f"(`fashionlab runs show {first.run.id}`")
    assert "--finish" not in out and "Run the same command" not in out
    # The run goes on in the other worker: its row names no process (not this one, which
    # ends), so it reads as running while the workers' heartbeats are fresh.
    store = Store.open(run_dir)
    run = store.run(first.run.id)
    assert (run.host, run.pid, run.state) == (None, None, "running")
    assert run.holder == "processes that share it"  # as errors name it, not "pid None"
    # The other worker's next beat takes the row: once that process is gone, killed (its
    # claim silent too), the run reads as interrupted at once, not after STALE_AFTER without
    # a beat.
    with store.transaction() as conn:
        conn.execute(jobs.update().where(jobs.c.key == key).values(
            heartbeat=time.time() - CLAIM_STALE_AFTER - 1))
    beat = subprocess.run([sys.executable, "-c", (
        "import os, sys; from fashionlab.store import Store; "
        f"store = Store.open({str(run_dir)!r}); store.heartbeat({first.run.id!r}); "
        "print(os.getpid()); sys.stdout.flush(); os._exit(0)")],
        capture_output=True, text=True, check=True)
    run = store.run(first.run.id)
    store.close()
    assert run.pid == int(beat.stdout) and run.state == "interrupted"


def test_a_delete_killed_after_the_trials_went_is_finished_by_deleting_again(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 1\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False)
    # `runs delete` killed (-9) just after it deleted the Optuna study.
    script = f"""
import os, signal
import fashionlab.trials as trials
from fashionlab.cli import main

delete_study = trials.delete_study

def then_killed(*args, **kwargs):
    delete_study(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

trials.delete_study = then_killed
main(["runs", "delete", {first.run.id!r}, "--yes", "--run-dir", {str(run_dir)!r}])
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Store.open(run_dir)
    assert [r.id for r in store.runs()] == [first.run.id]  # the run is left, to delete again
    store.close()
    assert first.output_dir.is_dir()
    code, _, err = run_cli(capsys, "runs", "delete", first.run.id, "--yes",
                           "--run-dir", str(run_dir))
    assert code == 0, err
    assert not first.output_dir.exists()
    again = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert again.finished and [t.params for t in again.trials] == \
        [t.params for t in first.trials]  # from scratch: the same first draw


def test_runs_show_of_a_search_shows_its_top_trials(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 2\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    code, out, err = run_cli(capsys, "runs", "show", result.run.id, "--run-dir", str(run_dir))
    assert code == 0, err
    assert "top trials" in out and "retrained for" in out
    assert " ".join(out.split()).find(f"spent: {result.summary['fold_epochs']}") >= 0
    assert f"stopped by {result.summary['stopped_by']}" in out
    best = result.summary["top"][0]
    assert f"{best['mean'] * 100:.2f} ± {best['std'] * 100:.2f}" in out
    code, out, _ = run_cli(capsys, "runs", "show", result.run.id, "--json",
                           "--run-dir", str(run_dir))
    shown = json.loads(out)["trials"]
    assert shown["top"] == result.summary["top"] and shown["objective"] == "val_accuracy"
    for key in ("stopped_by", "counts", "fold_epochs", "train_seconds", "tflop"):
        assert shown[key] == json.loads(json.dumps(result.summary[key])), key  # what it spent


def test_a_search_with_no_completed_trial_says_so(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _load(search_toml(tiny_idx_dir, search="n_trials = 2\npruner = \"none\"",
                             space="learning_rate = { low = 1e20, high = 1e30, log = true }",
                             train='learning_rate = 1e25'), tmp_path)  # every trial diverges
    run_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir))
    assert code == 0, err
    out = " ".join(out.split())
    assert "no trial completed (2 pruned, 0 failed): nothing to rank" in out, out
    (results,) = run_dir.glob("*/results.md")
    assert "no trial completed (2 pruned, 0 failed)" in results.read_text()
    # `runs show` says so too, with what it spent; --json keeps every key of a search's.
    run_id = results.parent.name
    code, out, err = run_cli(capsys, "runs", "show", run_id, "--run-dir", str(run_dir))
    out = " ".join(out.split())
    assert code == 0 and "no trial completed (2 pruned, 0 failed)" in out, err
    assert "spent: " in out and "stopped by n_trials" in out
    code, out, _ = run_cli(capsys, "runs", "show", run_id, "--run-dir", str(run_dir), "--json")
    trials = json.loads(out)["trials"]
    assert trials["top"] == [] and trials["retrain"] is None and trials["counts"]["pruned"] == 2


def test_run_search_takes_a_study_spec_not_a_path(tiny_idx_dir: Path, tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 1")
    with pytest.raises(ConfigError, match="spec: expected a StudySpec .*, got PosixPath"):
        run_search(path, run_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


def test_a_base_partly_outside_the_space_and_the_next_trial_draw_apart(
        tiny_idx_dir: Path, tmp_path: Path):
    # The base's learning rate (0.001) is below the space: the base trial draws one.
    path = _load(search_toml(tiny_idx_dir, search="n_trials = 3\npruner = \"none\"",
                             space="learning_rate = { low = 1e-2, high = 0.1, log = true }",
                             epochs=1), tmp_path)
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    drawn = [t.params["learning_rate"] for t in result.trials]
    assert len(set(drawn)) == 3, drawn  # the same draw twice wasted a trial


def test_a_stop_while_optuna_records_a_trial_is_the_stop_not_optunas_error(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Optuna's `_run_trial` reads, in a `finally`, a variable that a KeyboardInterrupt inside
    its recording of the trial leaves unset: the stop became an UnboundLocalError, and the
    command printed its traceback (exit status 1). It is the stop, and the search goes on."""
    import optuna.study._optimize as optimize

    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 2\npruner = "none"')
    tell = optimize._tell_with_warning

    def stopped_while_telling(**kwargs):
        monkeypatch.setattr(optimize, "_tell_with_warning", tell)  # once
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, heard in here
        time.sleep(10)
        return tell(**kwargs)

    monkeypatch.setattr(optimize, "_tell_with_warning", stopped_while_telling)
    run_dir = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_search(load_study(path), run_dir=run_dir, progress=False)
    assert isinstance(stopped.value.__cause__, UnboundLocalError)  # what it would have been
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished
    assert sum(t.state == TrialState.COMPLETE for t in result.trials) == 2


def test_a_stop_while_optuna_starts_a_trials_heartbeat_leaves_no_thread_beating(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stop that lands in Optuna's start of a trial's heartbeat thread, once the thread
    runs, skips the `with` that stops it: the thread (no daemon) beat on, and the command
    hung at exit after its stop line. It is stopped when the search ends."""
    from optuna.storages._heartbeat import HeartbeatThread

    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 2\npruner = "none"')
    start = HeartbeatThread.start

    def stopped_once_started(self: HeartbeatThread) -> None:
        monkeypatch.setattr(HeartbeatThread, "start", start)  # once
        start(self)
        raise KeyboardInterrupt  # Ctrl-C, just after the thread's start

    def beating() -> list:
        return [t for t in threading.enumerate()
                if getattr(t, "_target", None) is HeartbeatThread._record_heartbeat]

    monkeypatch.setattr(HeartbeatThread, "start", stopped_once_started)
    run_dir = tmp_path / "runs"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_search(load_study(path), run_dir=run_dir, progress=False)
        deadline = time.monotonic() + 30
        while beating() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not beating()
    finally:
        for thread in beating():  # (without the fix: not left to hang pytest's exit)
            thread._args[2].set()
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished


def test_a_worker_stopped_while_the_other_is_between_trials_leaves_the_run_running(
        tiny_idx_dir: Path, tmp_path: Path):
    """A worker is present in the search from its start to its end, not only while it trains
    a trial: stopped while the other waits to start its next trial (holding no trial's
    claim), a worker leaves the search running, to the other, and says so."""
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 12\npruner = "none"')
    run_dir = tmp_path / "runs"
    url = default_url(run_dir)
    first = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", "from fashionlab.cli import main; main()",
                                 "search", str(path), "--run-dir", str(run_dir), "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for _ in range(2)]
    store = Store.open(run_dir)

    def trial_claims() -> list[JobRow]:
        return [row for row in job_rows(store, first.run.id).values() if row.pid is not None]

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            for worker in workers:
                assert worker.poll() is None, f"a worker ended before {what}: " \
                    f"{worker.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    lock = ClaimLock(url, search_identity(load_study(path))[0])
    try:
        wait_for(lambda: {w.pid for w in workers} <= {r.pid for r in trial_claims()},
                 "a trial of each worker")
        lock.acquire()  # no worker starts another trial: each waits for the lock, between two
        storage = open_storage(url)
        study = optuna.load_study(study_name=first.study_name, storage=storage)
        wait_for(lambda: all(r.status == "done" for r in trial_claims())
                 and not study.get_trials(states=(TrialState.RUNNING,)), "their trials' ends")
        storage.engine.dispose()
        workers[0].send_signal(signal.SIGINT)
        _, err = workers[0].communicate(timeout=120)
        assert workers[0].returncode == 128 + signal.SIGINT, err[-3000:]
        assert "the search goes on in the other workers that train its trials" in err, err
        assert store.run(first.run.id).state == "running"
    finally:
        lock.release()
        lock.engine.dispose()
    _, err = workers[1].communicate(timeout=300)
    assert workers[1].returncode == 0, err[-3000:]
    run = store.run(first.run.id)
    assert run.state == "finished" and len(run.summary["finished_trials"]) == 12
    # Each worker's presence (this process's too, the first) ended with it; none is a job.
    with store.reading() as conn:
        presences = conn.execute(sa.select(jobs.c.status, jobs.c.pid).where(
            jobs.c.key.startswith("present:"))).all()
    store.close()
    assert sorted(presences) == sorted(("done", pid) for pid in
                                       [os.getpid(), *(w.pid for w in workers)])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trial asked here
def test_a_worker_stopped_while_others_run_trials_leaves_the_run_running(
        tiny_idx_dir: Path, tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 3\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001)
    storage = open_storage(default_url(run_dir))  # another worker is running a trial...
    other = optuna.load_study(study_name=first.study_name, storage=storage).ask()
    storage.engine.dispose()
    store = Store.open(run_dir)
    key = f"trial-{other.number}"  # ...on another machine: its claim of the trial beats
    register_jobs(store, first.run.id, [(key, key)], 1)
    with store.transaction() as conn:
        conn.execute(jobs.update().where(jobs.c.key == key).values(
            status="claimed", host="machine-b", pid=4242, heartbeat=time.time()))

    def stop(key: str, epoch: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C in this worker, in its first epoch

    with pytest.raises(stops.LeftRunning) as left:  # said so: the command's "goes on" line
        run_search(load_study(path), run_dir=run_dir, progress=OnEpoch(stop))
    assert "goes on in the other workers" in left.value.__notes__[0]
    run = store.run(first.run.id)
    assert (run.status, run.host, run.pid) == ("running", None, None)  # theirs, not ended
    # That worker killed (its claim silent), this one stopped again: the last one stopped
    # leaves the run interrupted, though Optuna still has the dead worker's trial running.
    with store.transaction() as conn:
        conn.execute(jobs.update().where(jobs.c.key == key).values(
            heartbeat=time.time() - CLAIM_STALE_AFTER - 1))
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_search(load_study(path), run_dir=run_dir, progress=OnEpoch(stop))
    assert not isinstance(stopped.value, stops.LeftRunning)
    run = store.run(first.run.id)
    assert (run.status, run.state) == ("interrupted", "interrupted")

    # A worker elsewhere takes the row to start a trial just as this one stops: the row is
    # its, and stays running.
    def taken_then_stopped(key: str, epoch: int) -> None:
        with store.transaction() as conn:
            conn.execute(runs.update().where(runs.c.id == first.run.id).values(
                host="machine-b", pid=4343, pid_start=None, boot_id=None,
                heartbeat=time.time()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(load_study(path), run_dir=run_dir, progress=OnEpoch(taken_then_stopped))
    run = store.run(first.run.id)
    store.close()
    assert (run.status, run.state, run.holder) == ("running", "running", "pid 4343 on machine-b")


class _BothTrain(Recorder):
    """Records every report; this process's first epoch waits until another worker trains a
    trial too (a helper starts in seconds, tiny trials end in less)."""

    def __init__(self, run_dir: Path, path: Path) -> None:
        super().__init__()
        self.run_dir, self.path, self.waited = run_dir, path, False

    def epoch(self, label, epoch, metrics) -> None:
        super().epoch(label, epoch, metrics)
        deadline = time.monotonic() + 120
        while not self.waited and len(_workers_of(_trials(self.run_dir, self.path))) < 2:
            assert time.monotonic() < deadline, "the other worker never trained a trial"
            time.sleep(0.05)
        self.waited = True


def _workers_of(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    return {int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials
            if "worker" in t.user_attrs}


def test_a_search_with_two_workers_trains_in_both_and_ends_with_its_results(
        tiny_idx_dir: Path, tmp_path: Path):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 6\npruner = "none"')
    run_dir = tmp_path / "runs"
    reporter = _BothTrain(run_dir, path)
    threads = torch.get_num_threads()
    result = run_search(load_study(path), run_dir=run_dir, progress=reporter, workers=2)
    assert (result.finished, result.stopped_by) == (True, "n_trials")
    assert len(result.summary["finished_trials"]) == 6
    trials = _trials(run_dir, path)
    workers = _workers_of(trials)
    assert len(workers) == 2 and os.getpid() in workers
    # Every trial's epochs were shown here, the helper's too; the helper is gone, its
    # presence ended with it, and this process trains with its threads again.
    for trial in trials:
        assert any(c[0] == "epoch" and c[1].startswith(f"trial {trial.number} ")
                   for c in reporter.calls), trial.number
    assert not multiprocessing.active_children()
    store = Store.open(run_dir)
    with store.reading() as conn:
        presences = conn.execute(sa.select(jobs.c.status, jobs.c.pid).where(
            jobs.c.key.startswith("present:"))).all()
    store.close()
    assert sorted(presences) == sorted(("done", pid) for pid in workers)
    assert torch.get_num_threads() == threads


def _slow_trials_search(data_dir: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A search of 6 trials of ~2.5 s each (150 epochs of the tiny data: a worker started by
    the command has trials left to take once it has started, in seconds), its run created:
    (study file, run directory, run id)."""
    path = _load(search_toml(data_dir, search='n_trials = 6\npruner = "none"', epochs=150,
                             space="learning_rate = { low = 1e-3, high = 0.1, log = true }"),
                 tmp_path)
    run_dir = tmp_path / "runs"
    run = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001).run
    return path, run_dir, run.id


def _goes_on_to_the_end(path: Path, run_dir: Path) -> None:
    """The same command, run again, ends the search: every trial finished, none running."""
    command = _search_command(path, run_dir, "--workers", "2")
    _, err = command.communicate(timeout=300)
    assert command.returncode == 0, err[-3000:]
    trials = _trials(run_dir, path)
    assert sum(t.state in FINISHED for t in trials) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def _search_command(path: Path, run_dir: Path, *more: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from fashionlab.cli import main; main()", "search", str(path),
         "--run-dir", str(run_dir), "--quiet", *more],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _until_both_train(command: subprocess.Popen[str], run_dir: Path, run_id: str) -> int:
    """Wait until the command and a worker it started both hold a trial; the worker's pid."""
    store = Store.open(run_dir)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert command.poll() is None, command.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "timed out waiting for two trials"
            pids = {row.pid for row in job_rows(store, run_id).values()
                    if row.status == "claimed" and row.pid is not None}
            if command.pid in pids and len(pids) == 2:
                return (pids - {command.pid}).pop()
            time.sleep(0.02)
    finally:
        store.close()


def _gone(pid: int, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_search_with_workers_stops_whole_and_goes_on(tiny_idx_dir: Path, tmp_path: Path):
    """A SIGTERM to the command alone (a scheduler's) stops its worker too, as Ctrl-C to the
    terminal's whole group does; either way the command says so in one line, nothing it
    started runs on, and the same command goes on to the end."""
    path, run_dir, run_id = _slow_trials_search(tiny_idx_dir, tmp_path)
    for stop in ("SIGTERM to the command", "SIGINT to its group"):
        command = _search_command(path, run_dir, "--workers", "2")
        helper = _until_both_train(command, run_dir, run_id)
        if stop == "SIGTERM to the command":
            command.send_signal(signal.SIGTERM)
        else:
            os.killpg(command.pid, signal.SIGINT)
        _, err = command.communicate(timeout=120)
        assert command.returncode == (143 if "SIGTERM" in stop else 130), err[-3000:]
        assert "finished trials are kept" in err and "Traceback" not in err, err[-3000:]
        assert _gone(helper), stop
        store = Store.open(run_dir)
        run = store.run(run_id)
        store.close()
        assert run.state == "interrupted", stop
    _goes_on_to_the_end(path, run_dir)


def test_a_search_with_workers_killed_goes_on(tiny_idx_dir: Path, tmp_path: Path):
    """kill -9 of the command takes its worker with it; a worker killed alone (the
    out-of-memory killer) ends the command in one line. The same command then goes on."""
    path, run_dir, run_id = _slow_trials_search(tiny_idx_dir, tmp_path)
    command = _search_command(path, run_dir, "--workers", "2")
    helper = _until_both_train(command, run_dir, run_id)
    command.kill()
    command.communicate(timeout=60)
    assert _gone(helper, within=10)
    command = _search_command(path, run_dir, "--workers", "2")
    helper = _until_both_train(command, run_dir, run_id)
    os.kill(helper, signal.SIGKILL)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and "a worker process died (killed, or out of memory)" in err
    _goes_on_to_the_end(path, run_dir)


def test_a_search_runs_while_any_worker_trains_a_trial(tiny_idx_dir: Path, tmp_path: Path):
    """The run's row names the worker that started a trial last. When that one dies while
    another trains (workers on several machines), the run still runs: the trainer's claim of
    its trial holds it, as a study's job claims hold a study's run."""
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 2\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    was_dead = {"host": socket.gethostname(), "pid": dead_pid(), "pid_start": None,
                "boot_id": None}
    store = Store.open(run_dir)

    def named_dead(run_id: str) -> RunRecord:
        with store.transaction() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**was_dead))
        return store.run(run_id)

    seen: list[tuple[str, str]] = []

    def while_training(key: str, epoch: int) -> None:
        if "/fold-" in key:  # a trial's, not the best one's retrain once the search ends
            (run,) = store.runs(kind="search")
            run = named_dead(run.id)
            seen.append((run.state, run.holder))

    result = run_search(load_study(path), run_dir=run_dir, progress=OnEpoch(while_training))
    assert result.finished and len(seen) >= 2
    assert seen == [("running", "processes that share it")] * len(seen)
    # Once no trial trains, the process the row names is the run's only sign of life.
    with store.transaction() as conn:
        conn.execute(runs.update().where(runs.c.id == result.run.id).values(status="running"))
    assert named_dead(result.run.id).state == "interrupted"
    store.close()


def _a_claimed_trial(tiny_idx_dir: Path, tmp_path: Path, host: str, pid: int,
                     heartbeat: float) -> tuple[Path, SearchResult, int]:
    """A search of 2 trials in tmp_path/runs, started, with one trial running in Optuna and
    claimed in fl_jobs by the worker (host, pid) last heard of at `heartbeat`: (its study
    file, the first call's result, the trial's number)."""
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 2\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    first = run_search(load_study(path), run_dir=run_dir, progress=False, timeout=0.001)
    storage = open_storage(default_url(run_dir))
    trial = optuna.load_study(study_name=first.study_name, storage=storage).ask()
    trial.set_user_attr("worker", f"{host}:{pid}")
    storage.engine.dispose()
    store = Store.open(run_dir)
    key = f"trial-{trial.number}"
    register_jobs(store, first.run.id, [(key, key)], 1)
    with store.transaction() as conn:
        conn.execute(jobs.update().where(jobs.c.key == key).values(
            status="claimed", host=host, pid=pid, heartbeat=heartbeat))
    store.close()
    return path, first, trial.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trial asked here
def test_a_lost_workers_trial_claim_ends_with_its_trial(tiny_idx_dir: Path, tmp_path: Path):
    """A worker killed in a trial leaves its claim of it; once the trial is failed (and
    retried), the claim ends too, not left claimed in fl_jobs for good."""
    pid = dead_pid()  # the worker of this machine that was training it
    path, first, number = _a_claimed_trial(tiny_idx_dir, tmp_path, socket.gethostname(), pid,
                                           time.time())
    run_dir, key = tmp_path / "runs", f"trial-{number}"
    store = Store.open(run_dir)
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished and result.summary["counts"]["retried"] == 1
    rows = job_rows(store, first.run.id)
    store.close()
    assert rows[key].status == "done"
    assert {r.status for r in rows.values()} == {"done"}  # every trial's claim ended


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trial asked here
@pytest.mark.parametrize(("grace", "claim_age"), [(5, 10.0), (600, 1.0)])
def test_a_trial_elsewhere_is_lost_once_its_claim_outlives_the_claim_grace(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grace: int,
        claim_age: float):
    """A worker on another machine that went silent: its trial is failed and retried once its
    claim is older than FASHIONLAB_CLAIM_GRACE (as a study's jobs are taken over), not only
    after Optuna's own 120 s. A claim younger than that is a worker at work."""
    monkeypatch.setenv("FASHIONLAB_CLAIM_GRACE", str(grace))
    path, first, number = _a_claimed_trial(tiny_idx_dir, tmp_path, "far-away", 1,
                                           time.time() - claim_age)
    run_dir = tmp_path / "runs"
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    if claim_age > grace:
        assert result.finished and result.summary["counts"]["retried"] == 1
    else:  # the other worker's trial runs on: this one stops, leaving the search to it
        assert not result.finished and result.stopped_by == "others-running"
        assert optuna.load_study(study_name=first.study_name, storage=default_url(run_dir)
                                 ).trials[number].state == TrialState.RUNNING


def test_optuna_tables_tampered_with_are_one_line(tiny_idx_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 1\npruner = \"none\"")
    run_dir = tmp_path / "runs"
    assert run_search(load_study(path), run_dir=run_dir, progress=False).finished
    with sqlite3.connect(run_dir / "fashionlab.db") as conn:
        conn.execute("DROP TABLE studies")  # Optuna makes it again, empty
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "the search's Optuna tables in sqlite:///", "are damaged")


def test_a_search_in_a_folder_named_with_braces(tiny_idx_dir: Path, tmp_path: Path):
    # Optuna reads its storage URL as a format template ("{SCHEMA_VERSION}").
    path = _learning_rate_search(tiny_idx_dir, tmp_path, "n_trials = 1\npruner = \"none\"")
    result = run_search(load_study(path), run_dir=tmp_path / "runs {x} }{", progress=False)
    assert result.finished and (tmp_path / "runs {x} }{" / "fashionlab.db").is_file()


@pytest.mark.parametrize(("space", "message"), [
    ("units = { low = 4, high = 8 }",
     ("my.toml: search.space.units: the base candidate 'a' has no hidden layers: give n_layers "
     "(and units) in the space to add some")),
    ("n_layers = { low = 0, high = 2 }\ndropout = { low = 0.1, high = 0.5 }",
     ("my.toml: search.space.dropout: the base candidate 'a' has no hidden layers: give units "
     "in the space too")),
    ("n_layers = { low = 0, high = 2 }\nunits = { low = 4, high = 8 }", None),
])
def test_a_base_without_hidden_layers_needs_n_layers_to_vary_them(space: str,
                                                                  message: str | None):
    raw = tomllib.loads(BASE.replace("layers = [{ units = 64 }]", "layers = []")
                        + "[search]\nn_trials = 2\n[search.space]\n" + space)
    if message is None:
        assert study_from_dict(raw, source="my.toml").search is not None
        return
    with pytest.raises(ConfigError) as error:
        study_from_dict(raw, source="my.toml")
    assert str(error.value) == message


@pytest.mark.parametrize(("maximize", "folds", "inside"), [
    (True, [0.90, 0.97], lambda low, high: high == 1.0 and low > 0),  # val_accuracy
    (False, [0.05, 0.30], lambda low, high: low == 0.0 and high > 0.30),  # val_loss
])
def test_the_top_tables_intervals_stay_where_the_objective_can_be(maximize, folds, inside):
    # Two folds: t(0.975, 1) = 12.7 would reach past 100% accuracy or below a zero loss.
    trials = [create_trial(state=TrialState.COMPLETE, value=sum(scores) / 2, params={},
                           distributions={}, user_attrs={"fold_scores": scores})
              for scores in (folds, [v * 0.99 for v in folds])]
    for number, trial in enumerate(trials):
        trial.number = number
    rows = top_table(trials, n_train=100, n_val=50, maximize=maximize)
    for row in rows:
        assert inside(row["ci_low"], row["ci_high"]), row
        assert isinstance(row["ci_low"], float) and isinstance(row["ci_high"], float)



def test_a_search_is_not_continued_on_other_data(tiny_idx_dir: Path, tmp_path: Path):
    """One Optuna study holds a search's trials: trials scored on other data (`dataset=`,
    changed files) must not be mixed in; --fresh starts it again on the new data."""
    spec = load_study(_learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 1\n'
                                            'pruner = "none"'))
    run_dir = tmp_path / "runs"
    first = run_search(spec, run_dir=run_dir, progress=False)
    assert first.run.environment["data"]["sha256"] == load_study_data(spec).sha256()
    whole = load_fashion_mnist(tiny_idx_dir, verify=False)
    labels = whole.train.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    other = dataclasses.replace(whole, train=Split(whole.train.images, labels))
    with pytest.raises(ConfigError, match=rf"^search 'tiny-search': run {first.run.id} "
                                          r"searched other data \(SHA-256 [0-9a-f]{12}, these "
                                          r"[0-9a-f]{12}\); --fresh \(fresh=True\) starts it again"):
        run_search(spec, run_dir=run_dir, progress=False, dataset=other)
    assert run_search(spec, run_dir=run_dir, progress=False, dataset=whole).run.id == \
        first.run.id  # the same data: the same search
    again = run_search(spec, run_dir=run_dir, progress=False, dataset=other, fresh=True)
    assert again.finished and again.run.id != first.run.id


def test_a_trial_is_named_its_workers_before_other_workers_may_look_for_lost_ones(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A retry copies the attributes of the trial it retries, the dead worker's among them.
    Named this worker's only after the lock was let go, a second worker starting at that
    moment read it as lost and failed it while it trained (a traceback: "Cannot tell a FAIL
    trial")."""
    from fashionlab.jobs import ClaimLock

    path = _learning_rate_search(tiny_idx_dir, tmp_path, 'n_trials = 2\npruner = "none"')
    run_dir = tmp_path / "runs"
    seen: list[tuple[int, object]] = []
    release = ClaimLock.release

    def looking(self: ClaimLock) -> None:  # what another worker would see once it is let go
        spec = load_study(path)
        storage = open_storage(default_url(run_dir))
        with contextlib.suppress(KeyError):  # (no study yet)
            study = optuna.load_study(study_name=search_identity(spec)[0], storage=storage)
            seen.extend((t.number, t.user_attrs.get("worker"))
                        for t in study.get_trials(states=(TrialState.RUNNING,)))
        storage.engine.dispose()
        release(self)

    monkeypatch.setattr(ClaimLock, "release", looking)
    run_search(load_study(path), run_dir=run_dir, progress=False)
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert [number for number, _ in seen] == [0, 1]  # each trial, as its worker let go
    assert all(worker == here for _, worker in seen), seen
