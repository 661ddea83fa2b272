"""TensorBoard event files, read back with TensorBoard's own readers: one scalar per epoch per
metric of every model, equal to the store's; an HParams entry per candidate (or trial); a run
interrupted and resumed, or exported again, writes no step twice."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import OnEpoch, assert_one_line_error, run_cli, tiny_search_toml, tiny_study_toml

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.backend.event_processing.event_file_loader import (
    LegacyEventFileLoader,
)
from tensorboard.plugins.hparams import plugin_data_pb2

from fashionlab.config import load_study
from fashionlab.errors import ConfigError
from fashionlab.integrations.tensorboard import (
    TensorBoard,
    export_run_to_tensorboard,
    model_logdir,
    tensorboard_dir,
    write_shown_run,
)
from fashionlab.schema import METRICS
from fashionlab.search import run_search
from fashionlab.store import Store
from fashionlab.study import run_study


@pytest.fixture
def study_file(tiny_idx_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=4, folds=2))
    return path


def _step_counts(directory: Path) -> Counter[tuple[str, int]]:
    """How many times each (tag, step) is in the directory's event files (all of them)."""
    counts: Counter[tuple[str, int]] = Counter()
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            counts.update((value.tag, event.step) for value in event.summary.value)
    return counts


def _assert_curves_match_the_store(run_dir: Path, run_id: str, logdir: Path | None = None):
    store = Store.open(run_dir, read_only=True)
    run = store.run(run_id)
    logdir = logdir or tensorboard_dir(run)
    models = store.models(run_id)
    assert models
    for model in models:
        directory = model_logdir(logdir, model.key)
        counts = _step_counts(directory)
        assert counts and max(counts.values()) == 1, (model.key, counts)  # no step twice
        board = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        board.Reload()
        records = store.epochs(run_id, model.key)
        assert records, model.key
        for metric in METRICS:
            stored = [(r.epoch, getattr(r, metric)) for r in records
                      if math.isfinite(getattr(r, metric))]
            if not stored:  # a retrain has no validation split
                assert metric not in board.Tags()["scalars"], (model.key, metric)
                continue
            written = [(e.step, e.value) for e in board.Scalars(metric)]
            assert [s for s, _ in written] == [e for e, _ in stored], (model.key, metric)
            assert [v for _, v in written] == pytest.approx([v for _, v in stored], rel=1e-6)
    store.close()
    return run, models


def _hparams(directory: Path) -> tuple[dict[str, object], dict[str, float]]:
    """The HParams entry in `directory`: (hyperparameters, metric values)."""
    board = EventAccumulator(directory.as_posix(), size_guidance={"scalars": 0})
    board.Reload()
    content = board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    params = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
              for name, value in start.hparams.items()}
    metrics = {tag: board.Scalars(tag)[-1].value for tag in board.Tags()["scalars"]}
    return params, metrics


def test_the_study_command_writes_every_models_curves_and_the_hparams(
        study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run_dir = tmp_path / "runs"
    code, _, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(run_dir),
                           "--workers", "1", "--tensorboard", "--json")
    assert code == 0, err
    store = Store.open(run_dir, read_only=True)
    (run,) = store.runs()
    store.close()
    run, models = _assert_curves_match_the_store(run_dir, run.id)
    assert {m.role for m in models} == {"cv", "retrain", "final"}
    summary = run.summary
    logdir = tensorboard_dir(run)
    assert logdir.parent == run_dir.resolve() / run.id
    for candidate in summary["candidates"]:
        params, metrics = _hparams(model_logdir(logdir, candidate["name"]))
        config = next(c for c in run.config["candidates"] if c["name"] == candidate["name"])
        assert params["train.learning_rate"] == pytest.approx(config["train"]["learning_rate"])
        assert params["model.layers.0.units"] == config["model"]["layers"][0]["units"]
        assert params["role"] == "cv"
        # Not the number 0.0 or the text 'None': as the study's values read.
        assert params["train.augment.flip"] == "false"
        assert params["train.early_stopping"] == "null"
        folds = candidate["val_accuracy"]
        assert metrics["hparam/val_accuracy"] == pytest.approx(sum(folds) / len(folds))
        if candidate["warning_epoch"] is not None:
            assert metrics["hparam/warning_epoch"] == candidate["warning_epoch"]
    best = summary["retrain"]
    _, metrics = _hparams(model_logdir(logdir, best["candidate"]))
    assert metrics["hparam/test_accuracy"] == pytest.approx(best["test_accuracy"])
    params, metrics = _hparams(model_logdir(logdir, "cnn"))  # a final model: its test score
    assert params["role"] == "final" and params["model.conv.0.filters"] == 4
    assert metrics["hparam/test_accuracy"] == pytest.approx(summary["final"][0]["test_accuracy"])


def test_an_interrupted_and_resumed_study_writes_no_step_twice(study_file: Path,
                                                               tmp_path: Path):
    run_dir, spec = tmp_path / "runs", load_study(study_file)

    def stop(key: str, epoch: int) -> None:
        if key == "small L2/fold-1" and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), TensorBoard(run_dir=run_dir,
                                                       then=OnEpoch(stop)) as board:
        run_study(spec, run_dir=run_dir, progress=board)
    store = Store.open(run_dir, read_only=True)
    (run,) = store.runs()
    assert run.status == "interrupted"
    directory = model_logdir(tensorboard_dir(run), "small L2/fold-1")
    assert {s for (tag, s) in _step_counts(directory) if tag == "loss"} == {1, 2}

    with TensorBoard(run_dir=run_dir) as board:
        result = run_study(spec, run_dir=run_dir, progress=board)
    assert result.run.id == run.id and store.run(run.id).status == "finished"
    store.close()
    assert len(list(directory.glob("events.out.tfevents.*"))) == 2  # one per process
    _assert_curves_match_the_store(run_dir, run.id)  # every step once, equal to the store's


def test_a_run_directory_moved_or_copied_gets_its_curves_where_it_is(study_file: Path,
                                                                     tmp_path: Path):
    # They went to the folder the store recorded: the old one made again, or a copy's
    # original, while the run's own folder kept only what came before the move.
    spec = load_study(study_file)

    def stop(key: str, epoch: int) -> None:
        if key == "small L2/fold-1" and epoch == 2:
            raise KeyboardInterrupt

    first = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt), TensorBoard(run_dir=first,
                                                       then=OnEpoch(stop)) as board:
        run_study(spec, run_dir=first, progress=board)
    moved = tmp_path / "moved"
    first.rename(moved)
    with TensorBoard(run_dir=moved) as board:
        result = run_study(spec, run_dir=moved, progress=board)
    assert not first.exists()
    _assert_curves_match_the_store(moved, result.run.id, moved / result.run.id / "tensorboard")

    shown = tmp_path / "copy"  # a finished run's copy, shown again with TensorBoard asked for
    shutil.copytree(moved, shown)
    shutil.rmtree(moved / result.run.id / "tensorboard")
    shutil.rmtree(shown / result.run.id / "tensorboard")
    with TensorBoard(run_dir=shown) as board:
        again = run_study(spec, run_dir=shown, progress=board)
    assert write_shown_run(again, run_dir=shown) == shown / result.run.id / "tensorboard"
    assert not (moved / result.run.id / "tensorboard").exists()  # the original's untouched
    _assert_curves_match_the_store(shown, result.run.id, shown / result.run.id / "tensorboard")


def test_export_after_the_fact_writes_the_same_and_nothing_twice(study_file: Path,
                                                                 tmp_path: Path):
    run_dir = tmp_path / "runs"
    result = run_study(load_study(study_file), run_dir=run_dir, progress=False)
    store = Store.open(run_dir)
    logdir = tmp_path / "board"
    assert export_run_to_tensorboard(store, result.run.id, logdir) == logdir
    export_run_to_tensorboard(store, result.run.id, logdir)  # again: nothing new
    store.close()
    _assert_curves_match_the_store(run_dir, result.run.id, logdir)
    params, metrics = _hparams(model_logdir(logdir, "small"))
    assert params["train.batch_size"] == 32
    assert "hparam/val_accuracy" in metrics
    assert _step_counts(model_logdir(logdir, "small"))[("_hparams_/session_start_info", 0)] == 1


def test_the_command_exports_a_run_to_a_log_directory_once(
        study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run_dir = tmp_path / "runs"
    result = run_study(load_study(study_file), run_dir=run_dir, progress=False)
    logdir = tmp_path / "my board" / "tiny"  # a space: the command shown quotes it
    for _ in range(2):  # again: nothing written twice
        code, out, err = run_cli(capsys, "runs", "export", result.run.id[:8], "--to",
                                 "tensorboard", str(logdir), "--run-dir", str(run_dir))
        assert code == 0, err
        assert out == f"wrote run {result.run.id} to {logdir} (view: tensorboard --logdir " \
            f"'{logdir}')\n"
    _assert_curves_match_the_store(run_dir, result.run.id, logdir)
    assert "hparam/val_accuracy" in _hparams(model_logdir(logdir, "small"))[1]
    (tmp_path / "afile").write_text("")
    for target in (tmp_path / "afile", tmp_path / "afile" / "below"):
        code, _, err = run_cli(capsys, "runs", "export", result.run.id, "--to", "tensorboard",
                               str(target), "--run-dir", str(run_dir))
        assert_one_line_error(code, err, f"{tmp_path / 'afile'} is a file, not a folder")
    code, _, err = run_cli(capsys, "runs", "export", result.run.id, "--to", "tensorboard",
                           "/proc/fashionlab-none/board", "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "/proc/fashionlab-none: cannot write TensorBoard's event "
                          "files (No such file or directory)")
    code, _, err = run_cli(capsys, "runs", "export", result.run.id, "--to", "tensorboard",
                           str(logdir), "--format", "csv", "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "--to tensorboard sends the whole run instead")
    code, _, err = run_cli(capsys, "runs", "export", result.run.id, "--to", "tensorboard", " ",
                           "--run-dir", str(run_dir))  # not the current folder
    assert_one_line_error(code, err, "logdir (--to tensorboard DIR): the log directory is empty")
    code, _, err = run_cli(capsys, "runs", "export", result.run.id, "--to", "wandb", "x",
                           "--run-dir", str(run_dir))
    assert_one_line_error(code, err, "Invalid value for '--to': 'wandb' is not one of "
                          "'mlflow', 'tensorboard'.")


def test_a_search_writes_each_trials_folds_and_params(tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "search.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=2))
    run_dir = tmp_path / "runs"
    with TensorBoard(run_dir=run_dir) as board:
        result = run_search(load_study(path), run_dir=run_dir, progress=board)
    assert result.finished
    run, models = _assert_curves_match_the_store(run_dir, result.run.id)
    assert {m.key for m in models} >= {"trial-0/fold-0", "trial-1/fold-1"}
    for trial in result.trials:
        params, metrics = _hparams(model_logdir(tensorboard_dir(run), f"trial-{trial.number}"))
        assert params["learning_rate"] == pytest.approx(trial.params["learning_rate"])
        assert metrics["hparam/val_accuracy"] == pytest.approx(trial.value)


def test_a_models_event_folder_stays_in_the_log_folder_whatever_its_name(tmp_path: Path):
    logdir = tmp_path / "tensorboard"
    for key, expected in [("../../../ESCAPED/fold-0", ".._.._.._ESCAPED/fold-0"),
                          ("dense/8 ü/fold-1", "dense_8_ü/fold-1"),  # as its models' folder
                          ("dense(64)/fold-3", "dense_64_/fold-3"), ("cnn", "cnn"),
                          ("../final", "__/final")]:
        directory = model_logdir(logdir, key)
        assert directory == logdir / expected
        assert directory.resolve().is_relative_to(logdir.resolve())


def test_tensorboard_on_a_finished_run_shown_again_writes_its_curves(
        study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run_dir = tmp_path / "runs"
    code, _, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(run_dir),
                           "--workers", "1", "--json")  # no --tensorboard: no event files
    assert code == 0, err
    store = Store.open(run_dir, read_only=True)
    (run,) = store.runs()
    store.close()
    assert not tensorboard_dir(run).exists()
    for _ in range(2):  # shown from the store, twice: every step once
        code, _, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(run_dir),
                               "--workers", "1", "--tensorboard", "--json")
        assert code == 0, err
    _assert_curves_match_the_store(run_dir, run.id)


def test_a_board_given_another_run_directory_than_the_study_says_so(study_file: Path,
                                                                     tmp_path: Path):
    spec = load_study(study_file)
    other = tmp_path / "other"
    run_study(spec, run_dir=other, workers=1, progress=False)  # a store, without this run
    with pytest.warns(UserWarning, match=f"TensorBoard wrote nothing: the store of {other} "
                      "holds no run this process trains; give it the run_dir"), \
            TensorBoard(run_dir=other) as board:
        result = run_study(spec, run_dir=tmp_path / "runs", workers=1, fresh=True,
                           progress=board)
    assert not tensorboard_dir(result.run).exists()
    # No store there at all: said at the first epoch, the run kept to resume.
    with pytest.raises(ConfigError, match="TensorBoard: no store at .*missing.*; give it the "
                       "run_dir"), TensorBoard(run_dir=tmp_path / "missing") as board:
        run_study(spec, run_dir=tmp_path / "runs", workers=1, fresh=True, progress=board)
    assert Store.open(tmp_path / "runs").runs()[0].state == "interrupted"
    assert not (tmp_path / "missing").exists()


def test_the_library_writes_the_finished_run_shown_again(study_file: Path, tmp_path: Path):
    """As the command does: the run the study shows, though a newer run of the same settings
    failed (the study passes over it; the newest of its fingerprint is not the one shown)."""
    run_dir = tmp_path / "runs"
    spec = load_study(study_file)
    first = run_study(spec, run_dir=run_dir, workers=1, progress=False)
    store = Store.open(run_dir)
    failed = store.create_run(kind="study", name=spec.name, fingerprint=spec.fingerprint(),
                              seed=spec.seed, config=spec.to_dict(), environment={},
                              output_root=run_dir)
    store.end_run(failed.id, "failed")
    store.close()
    with TensorBoard(run_dir=run_dir) as board:  # shown from the store: no epoch reported
        again = run_study(spec, run_dir=run_dir, workers=1, progress=board)
    assert again.run.id == first.run.id and not again.trained_here
    assert not tensorboard_dir(first.run).exists()
    assert write_shown_run(again, run_dir=run_dir) == tensorboard_dir(first.run, run_dir)
    _assert_curves_match_the_store(run_dir, first.run.id)


def test_search_tensorboard_on_a_finished_search_writes_its_curves(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "search.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=2))
    run_dir = tmp_path / "runs"
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished and not tensorboard_dir(result.run).exists()
    code, _, err = run_cli(capsys, "search", str(path), "--run-dir", str(run_dir),
                           "--tensorboard", "--json")
    assert code == 0, err
    _assert_curves_match_the_store(run_dir, result.run.id)
    params, _ = _hparams(model_logdir(tensorboard_dir(result.run), "trial-0"))
    assert params["learning_rate"] == pytest.approx(result.trials[0].params["learning_rate"])


def test_the_hparams_of_a_candidate_named_with_a_slash_sit_above_its_curves(
        tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "slash.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, folds=2, final=False,
                                    candidates='[[candidates]]\nname = "a/b"\n'
                                               'layers = [{ units = 8 }]\n'))
    run_dir = tmp_path / "runs"
    result = run_study(load_study(path), run_dir=run_dir, progress=False)
    export_run_to_tensorboard(Store.open(run_dir, read_only=True), result.run.id)
    folder = model_logdir(tensorboard_dir(result.run), "a/b/fold-0").parent
    params, _ = _hparams(folder)  # beside fold-0 and fold-1, not in a folder "a/b"
    assert params["role"] == "cv" and folder.name == "a_b"


def test_a_retried_trials_hparams_sit_where_it_trained():
    from fashionlab.integrations.tensorboard import _entries

    trials = [{"number": 0, "state": "fail", "value": None, "params": {"lr": 0.1},
               "models": "trial-0"},
              {"number": 1, "state": "complete", "value": 0.9, "params": {"lr": 0.1},
               "models": "trial-0"},  # the retry of trial 0 trains into trial-0's folders
              {"number": 2, "state": "complete", "value": 0.8, "params": {"lr": 0.2},
               "models": "trial-2"}]
    run = SimpleNamespace(kind="search", summary={"objective": "val_accuracy",
                                                  "trials": trials})
    entries = {name: (params["state"], scores) for name, params, scores in _entries(run)}
    assert entries == {"trial-0": ("complete", {"val_accuracy": 0.9}),
                       "trial-2": ("complete", {"val_accuracy": 0.8})}


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_an_export_the_disk_refuses_is_one_line_and_leaves_no_empty_event_file(
        study_file: Path, tmp_path: Path):
    # A real write failure, in a process whose files may not grow past a limit: at 0 bytes the
    # event file's first record fails (an empty file was left behind); at 2000 a later one
    # fails in TensorBoard's writer thread, which printed "Exception in thread ..." as well.
    run_dir = tmp_path / "runs"
    run = run_study(load_study(study_file), run_dir=run_dir, progress=False).run
    for limit in (0, 2000):
        logdir = tmp_path / f"board-{limit}"
        script = f"""
import resource, signal
from fashionlab.errors import OutputError
from fashionlab.integrations.tensorboard import export_run_to_tensorboard
from fashionlab.store import Store
store = Store.open({str(run_dir)!r})  # opened first: the limit is on the event files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
try:
    export_run_to_tensorboard(store, {run.id!r}, {str(logdir)!r})
except OutputError as error:
    print(error)
"""
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=False, timeout=120)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert done.stdout == f"{logdir}: cannot write TensorBoard's event files (File too " \
                              "large)\n"
        assert not [p for p in logdir.rglob("events.out.tfevents.*") if p.stat().st_size == 0]
