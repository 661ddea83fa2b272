"""MLflow: a run exported after the fact and logged live, read back with the real MLflow
client from a SQLite tracking store in a temp folder: one parent per run, nested candidate and
model runs, each model's metric history one value per epoch equal to the store's, nothing
duplicated by a second export or by an interrupted and resumed study."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from conftest import write_tiny_idx
from helpers import OnEpoch, Recorder, assert_one_line_error, run_cli, tiny_study_toml
from mlflow import MlflowClient

from fashionlab.config import load_study
from fashionlab.integrations.mlflow import (
    PARENT,
    TAG_PART,
    TAG_RUN,
    TAG_STARTED,
    export_run_to_mlflow,
    flatten,
    logging_to_mlflow,
    require_mlflow,
    without_password,
)
from fashionlab.integrations.mlflow.export import MlflowExport
from fashionlab.progress import Silent, Tee
from fashionlab.runs import delete_run
from fashionlab.schema import METRICS
from fashionlab.search import run_search
from fashionlab.store import Store, safe_url
from fashionlab.study import run_study


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite tracking URI in the test's folder (artifacts go to ./mlruns there); MLflow's
    usage telemetry off, as on any machine without the internet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished tiny study, shared by the export tests: (run directory, run id)."""
    root = tmp_path_factory.mktemp("finished")
    path = root / "tiny.toml"
    path.write_text(tiny_study_toml(write_tiny_idx(root / "tiny-idx"), epochs=3, folds=2))
    result = run_study(load_study(path), run_dir=root / "runs", progress=False)
    return root / "runs", result.run.id


def _study(tiny_idx_dir: Path, tmp_path: Path, **options) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=3, folds=2, **options))
    return path


def _runs(client: MlflowClient, run_id: str) -> dict[str, object]:
    """The MLflow runs of a fashionlab run, by part; fails on a part made twice."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_RUN}` = '{run_id}'",
                              max_results=1000)
    parts = [r.data.tags[TAG_PART] for r in runs]
    assert len(parts) == len(set(parts)), sorted(parts)
    return {r.data.tags[TAG_PART]: r for r in runs}


def _check_models_match_the_store(client: MlflowClient, store: Store, run_id: str) -> None:
    runs = _runs(client, run_id)
    histories = store.histories(run_id)
    assert histories
    for key, epochs in histories.items():
        mlflow_run = runs[f"model:{key}"]
        for metric in METRICS:
            stored = {e.epoch: getattr(e, metric) for e in epochs
                      if math.isfinite(getattr(e, metric))}
            logged = client.get_metric_history(mlflow_run.info.run_id, metric)
            steps = [m.step for m in logged]
            assert sorted(steps) == sorted(stored), (key, metric, steps)  # one per epoch
            for m in logged:
                assert m.value == pytest.approx(stored[m.step], rel=1e-6), (key, metric)


def test_a_study_exported_has_its_parent_candidates_and_models(
        finished: tuple[Path, str], tracking: str):
    store = Store.open(finished[0])
    run = store.run(finished[1])

    parent_id = export_run_to_mlflow(store, run.id, tracking)

    client = MlflowClient(tracking_uri=tracking)
    runs = _runs(client, run.id)
    parent = runs["run"]
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert PARENT not in parent.data.tags
    tags = parent.data.tags
    assert tags["fashionlab.seed"] == str(run.seed) == "3"
    assert tags["fashionlab.fingerprint"] == run.fingerprint
    assert tags["fashionlab.revision"] == run.environment["revision"]
    assert tags["mlflow.source.git.commit"] == run.environment["revision"].removesuffix("+dirty")
    assert tags["fashionlab.data.sha256"] == run.environment["data"]["sha256"]
    assert client.get_experiment(parent.info.experiment_id).name == run.name
    assert parent.data.params["cv.n_splits"] == "2"
    # A candidate: its config, mean curves, summary metrics and verdict.
    candidate = runs["candidate:small"]
    assert candidate.data.tags[PARENT] == parent_id
    assert candidate.data.params["model.layers.0.units"] == "16"
    assert candidate.data.params["train.epochs"] == "3"
    summary = next(c for c in run.summary["candidates"] if c["name"] == "small")
    curve = client.get_metric_history(candidate.info.run_id, "val_accuracy")
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(
        summary["mean_curves"]["val_accuracy"])
    assert candidate.data.metrics["val_accuracy_mean"] == pytest.approx(
        sum(summary["val_accuracy"]) / 2)
    for name in ("val_accuracy_std", "val_accuracy_ci_low", "val_accuracy_ci_high"):
        assert name in candidate.data.metrics
    assert candidate.data.tags["fashionlab.verdict"]
    # Folds under their candidate; the retrained and final models under theirs.
    fold = runs["model:small/fold-1"]
    assert fold.data.tags[PARENT] == candidate.info.run_id
    assert fold.data.params["fold"] == "1" and fold.info.status == "FINISHED"
    best = run.summary["best"]
    retrain = runs[f"model:{best}/retrain"]
    assert retrain.data.tags[PARENT] == runs[f"candidate:{best}"].info.run_id
    assert retrain.data.metrics["test_accuracy"] == pytest.approx(
        run.summary["retrain"]["test_accuracy"])
    assert runs["model:cnn/final"].data.tags[PARENT] == runs["candidate:cnn"].info.run_id
    _check_models_match_the_store(client, store, run.id)
    # The files: report, results, figures, model directories.
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.html", "results.md", "results.csv", "results.json", "figures",
            "models"} <= artifacts
    models = {a.path for a in client.list_artifacts(parent_id, "models")}
    assert f"models/{Path(run.summary['retrain']['model_dir']).name}" in models
    assert "models/cnn" in models
    store.close()


def test_exporting_twice_leaves_one_copy(finished: tuple[Path, str], tracking: str):
    store = Store.open(finished[0])
    run_id = finished[1]
    client = MlflowClient(tracking_uri=tracking)

    first = export_run_to_mlflow(store, run_id, tracking)
    before = {part: run.info.run_id for part, run in _runs(client, run_id).items()}
    second = export_run_to_mlflow(store, run_id, tracking)

    assert first == second
    assert {part: run.info.run_id for part, run in _runs(client, run_id).items()} == before
    assert len([part for part in before if part == "run"]) == 1
    _check_models_match_the_store(client, store, run_id)
    candidate = _runs(client, run_id)["candidate:small"].info.run_id
    assert len(client.get_metric_history(candidate, "val_accuracy")) == 3
    store.close()


def test_a_copied_run_directory_sends_the_copys_files(finished: tuple[Path, str],
                                                     tracking: str, tmp_path: Path):
    # Its store still records the original's folder; what is sent is the copy's.
    copy = tmp_path / "copy"
    shutil.copytree(finished[0], copy)
    run_id = finished[1]
    (copy / run_id / "results.md").write_text("the copy's\n")
    store = Store.open(copy)
    parent = export_run_to_mlflow(store, run_id, tracking)
    store.close()
    client = MlflowClient(tracking_uri=tracking)
    assert client.get_run(parent).data.tags["fashionlab.output_dir"] == str(
        copy.resolve() / run_id)
    sent = Path(client.download_artifacts(parent, "results.md", str(tmp_path / "sent")))
    assert sent.read_text() == "the copy's\n"


def test_two_exports_at_once_make_each_mlflow_run_once(finished: tuple[Path, str],
                                                       tracking: str):
    from fashionlab.integrations.mlflow.export import MlflowExport

    store = Store.open(finished[0])
    run_id = finished[1]
    # Both look before either makes anything (a live study and `runs export` side by side).
    early, late = (MlflowExport(store, run_id, tracking) for _ in range(2))
    late.sync(artifacts=False)
    early.sync(artifacts=False)
    client = MlflowClient(tracking_uri=tracking)
    _runs(client, run_id)  # fails on a part made twice
    _check_models_match_the_store(client, store, run_id)
    store.close()


def test_a_run_deleted_and_started_again_with_its_id_gets_its_own_mlflow_runs(
        tiny_idx_dir: Path, tmp_path: Path, tracking: str, monkeypatch: pytest.MonkeyPatch):
    """Run ids name the second they start in: a run deleted and started again within that
    second has the same id. Its export is its own, not merged into the deleted run's."""
    import fashionlab.store.store as store_module

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(store_module, "datetime", Frozen)
    spec = load_study(_study(tiny_idx_dir, tmp_path, final=False))
    run_dir = tmp_path / "runs"
    first = run_study(spec, run_dir=run_dir, progress=False).run
    store = Store.open(run_dir)
    first_parent = export_run_to_mlflow(store, first.id, tracking)
    delete_run(store, first.id)
    second = run_study(spec, run_dir=run_dir, progress=False).run
    assert second.id == first.id and second.started != first.started
    second_parent = export_run_to_mlflow(store, second.id, tracking)

    client = MlflowClient(tracking_uri=tracking)
    assert second_parent != first_parent
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string=f"tags.`{TAG_PART}` = 'run'")
    assert {p.info.run_id for p in parents} == {first_parent, second_parent}
    assert {p.data.tags[TAG_STARTED] for p in parents} == {
        f"{first.started:.6f}", f"{second.started:.6f}"}
    store.close()


def test_live_logging_through_an_interrupted_and_resumed_study(
        tiny_idx_dir: Path, tmp_path: Path, tracking: str):
    spec = load_study(_study(tiny_idx_dir, tmp_path, final=False))
    run_dir = tmp_path / "runs"

    def stop(key: str, epoch: int) -> None:
        if key == "small L2/fold-0" and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), logging_to_mlflow(
            tracking, spec, run_dir=run_dir, progress=OnEpoch(stop)) as progress:
        run_study(spec, run_dir=run_dir, progress=progress)
    store = Store.open(run_dir)
    stopped = store.runs()[0]
    client = MlflowClient(tracking_uri=tracking)
    runs = _runs(client, stopped.id)
    assert runs["run"].info.status == "KILLED"
    assert "model:small L2/fold-0" in runs  # logged while it trained
    assert not [part for part, r in runs.items() if r.info.status == "RUNNING"]
    _check_models_match_the_store(client, store, stopped.id)

    recorder = Recorder()
    parent_while_training: list[str] = []

    def look(key: str, epoch: int) -> None:  # after the live logger has logged this epoch
        recorder.epoch("", epoch, {key: None})
        parent_while_training.append(client.get_run(runs["run"].info.run_id).info.status)

    with logging_to_mlflow(tracking, spec, run_dir=run_dir, progress=OnEpoch(look)) as progress:
        result = run_study(spec, run_dir=run_dir, progress=progress)
    assert set(parent_while_training) == {"RUNNING"}  # resumed: no longer KILLED

    assert result.run.id == stopped.id and result.run.status == "finished"
    assert any(call[0] == "epoch" for call in recorder.calls)  # the caller's reporter too
    runs = _runs(client, result.run.id)
    assert runs["run"].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for part, r in runs.items()
               if part.startswith("model:"))
    _check_models_match_the_store(client, store, result.run.id)
    assert {a.path for a in client.list_artifacts(runs["run"].info.run_id)} >= {
        "report.html", "results.json"}
    store.close()


def test_a_stop_during_the_final_export_leaves_the_statuses_of_the_store(
        tiny_idx_dir: Path, tmp_path: Path, tracking: str, monkeypatch: pytest.MonkeyPatch):
    # The parent was left RUNNING (and its candidates with it) while the store said finished.
    spec = load_study(_study(tiny_idx_dir, tmp_path, final=False))
    run_dir = tmp_path / "runs"
    upload = MlflowExport._upload

    def stopped(self, *args, **kwargs):  # Ctrl-C while the artifacts are sent
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowExport, "_upload", stopped)
    with pytest.raises(KeyboardInterrupt), logging_to_mlflow(
            tracking, spec, run_dir=run_dir, progress=False) as progress:
        run_study(spec, run_dir=run_dir, progress=progress, workers=1)
    store = Store.open(run_dir)
    (run,) = store.runs()
    assert run.status == "finished"
    client = MlflowClient(tracking_uri=tracking)
    runs = _runs(client, run.id)
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert not client.list_artifacts(runs["run"].info.run_id)
    monkeypatch.setattr(MlflowExport, "_upload", upload)
    with logging_to_mlflow(tracking, spec, run_dir=run_dir, progress=False) as progress:
        run_study(spec, run_dir=run_dir, progress=progress)  # shown again: sends the rest
    assert {a.path for a in client.list_artifacts(runs["run"].info.run_id)} >= {
        "report.html", "results.json"}
    store.close()


def test_a_stop_inside_an_mlflow_call_logs_nothing_twice(
        tiny_idx_dir: Path, tmp_path: Path, tracking: str, monkeypatch: pytest.MonkeyPatch):
    spec = load_study(_study(tiny_idx_dir, tmp_path, final=False))
    run_dir = tmp_path / "runs"
    real = MlflowClient.log_batch
    calls = []

    def stopped_after_writing(self, run_id, metrics=(), **kwargs):
        real(self, run_id, metrics=metrics, **kwargs)
        calls.append(len(metrics))
        if metrics and len(calls) > 5:  # Ctrl-C lands once MLflow has written the batch
            raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "log_batch", stopped_after_writing)
    with pytest.raises(KeyboardInterrupt), logging_to_mlflow(
            tracking, spec, run_dir=run_dir, progress=False) as progress:
        run_study(spec, run_dir=run_dir, progress=progress, workers=1)
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    store = Store.open(run_dir)
    _check_models_match_the_store(MlflowClient(tracking_uri=tracking), store,
                                  store.runs()[0].id)
    store.close()


def test_a_search_exports_its_trials(tiny_idx_dir: Path, tmp_path: Path, tracking: str):
    path = tmp_path / "search.toml"
    path.write_text(tiny_study_toml(
        tiny_idx_dir, name="tiny-search", epochs=3, folds=2, patience=1, final=False,
        candidates='[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n',
        extra='[search]\nn_trials = 3\nsampler = "random"\npruner = "median"\n\n'
              '[search.space]\nunits = { low = 8, high = 32 }\n'))
    spec = load_study(path)
    with logging_to_mlflow(tracking, spec, kind="search", run_dir=tmp_path / "runs",
                           progress=False) as progress:
        result = run_search(spec, run_dir=tmp_path / "runs", progress=progress)
    store = Store.open(tmp_path / "runs")
    client = MlflowClient(tracking_uri=tracking)
    export_run_to_mlflow(store, result.run.id, tracking)  # again: nothing doubles

    runs = _runs(client, result.run.id)
    parent = runs["run"].info.run_id
    for trial in result.trials:
        run = runs[f"candidate:trial-{trial.number}"]
        assert run.data.tags[PARENT] == parent
        assert run.data.tags["fashionlab.state"] == "complete"
        assert run.data.params == {k: str(v) for k, v in trial.params.items()}
        assert run.data.metrics["value"] == pytest.approx(trial.value)
        steps = [m.step for m in client.get_metric_history(run.info.run_id,
                                                           "intermediate_value")]
        assert sorted(steps) == sorted(trial.intermediate_values)
        assert runs[f"model:trial-{trial.number}/fold-1"].data.tags[PARENT] == run.info.run_id
    best = result.summary["best_trial"]
    assert runs[f"model:trial-{best}/retrain"].data.tags[PARENT] \
        == runs[f"candidate:trial-{best}"].info.run_id
    assert runs["run"].data.metrics["best_value"] == pytest.approx(result.summary["best_value"])
    _check_models_match_the_store(client, store, result.run.id)
    store.close()


def test_the_command_line_exports_and_logs_live(tiny_idx_dir: Path, tmp_path: Path,
                                                tracking: str, capsys, monkeypatch):
    path = _study(tiny_idx_dir, tmp_path, final=False)
    monkeypatch.setenv("FASHIONLAB_MLFLOW", tracking)
    code, out, err = run_cli(capsys, "study", str(path), "--run-dir", str(tmp_path / "runs"),
                             "--workers", "1", "--json")
    assert code == 0, err
    monkeypatch.delenv("FASHIONLAB_MLFLOW")
    store = Store.open(tmp_path / "runs")
    run_id = store.runs()[0].id
    client = MlflowClient(tracking_uri=tracking)
    assert _runs(client, run_id)["run"].info.status == "FINISHED"
    _check_models_match_the_store(client, store, run_id)

    other = f"sqlite:///{tmp_path / 'other.db'}"
    code, out, err = run_cli(capsys, "runs", "export", run_id[:12], "--to", "mlflow", other,
                             "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "mlflow" in out and run_id in out
    _check_models_match_the_store(MlflowClient(tracking_uri=other), store, run_id)
    code, out, err = run_cli(capsys, "runs", "export", run_id, "--to", "wandb", other,
                             "--run-dir", str(tmp_path / "runs"))
    assert code == 2 and "mlflow" in err
    store.close()

    # A tracking URI that cannot be used: one line, not a traceback.
    (tmp_path / "afile").write_text("")
    missing = tmp_path / "typo" / "deeper"
    for uri, message in [("", "the MLflow tracking URI is empty"),
                         (f"sqlite:///{tmp_path / 'afile' / 'm.db'}", "mlflow sqlite:///"),
                         (f"sqlite:///{missing / 'm.db'}", (f"the folder {missing} does not "
                          "exist (create it, or correct the path)")),
                         # MLflow 3 refuses its file store (in a paragraph) unless allowed
                         (str(tmp_path / "mlruns"), "a folder (MLflow's file store)"),
                         (f"file://{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE=true"),
                         ("bogus://x", "mlflow bogus://x: MLflow stores no runs at a bogus://")]:
        code, out, err = run_cli(capsys, "runs", "export", run_id, "--to", "mlflow", uri,
                                 "--run-dir", str(tmp_path / "runs"))
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "typo").exists()  # MLflow would have made the folders
    code, _, err = run_cli(capsys, "study", "seed", "--mlflow", "mlruns",
                           "--run-dir", str(tmp_path / "new"))
    assert_one_line_error(code, err, "mlflow mlruns: a folder")  # before training, not after
    assert not (tmp_path / "new").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        require_mlflow(str(tmp_path / "mlruns"))  # the user's choice: MLflow writes it
    require_mlflow("databricks")  # a bare word MLflow reads as no folder


def test_a_bare_postgresql_uri_exports_through_the_installed_driver(
        finished: tuple[Path, str], postgres_url: str, tracking: str):
    # The fixture's postgresql:// is psycopg 3 to SQLAlchemy 2.1; the postgres extra has psycopg2.
    require_mlflow(postgres_url)
    store = Store.open(finished[0])
    parent = export_run_to_mlflow(store, finished[1], postgres_url)
    store.close()
    client = MlflowClient(tracking_uri=postgres_url.replace("postgresql://",
                                                            "postgresql+psycopg2://"))
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_database_uri_that_cannot_be_used_fails_at_once_its_password_hidden(
        finished: tuple[Path, str], tmp_path: Path, tracking: str, capsys,
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir, run_id = finished
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for uri, message in [  # MLflow itself retries a database it cannot open for ~100 s
            (f"sqlite:///{folder}", f"{folder} is a folder, not a database file"),
            # sysfs makes no files, even for root (a read-only mount alike)
            ("sqlite:////sys/mlflow.db", "cannot write in the folder /sys (Permission denied)"),
            ("postgresql+psycopg2://me:s3cret@127.0.0.1:1/db", "cannot open the database"),
            ("postgres://me:s3cret@127.0.0.1:1/db", "cannot open the database"),
            ("http://me:s3cret@127.0.0.1:1", "http://me:***@127.0.0.1:1")]:
        start = time.monotonic()
        code, _, err = run_cli(capsys, "runs", "export", run_id, "--to", "mlflow", uri,
                               "--run-dir", str(run_dir))
        assert_one_line_error(code, err, message)
        assert "s3cret" not in err and time.monotonic() - start < 30, err
    code, _, err = run_cli(capsys, "study", "seed", "--mlflow", "postgresql://me:s3cret@"
                           "127.0.0.1:1/db", "--run-dir", str(tmp_path / "new"))
    assert_one_line_error(code, err, "mlflow postgresql://me:***@127.0.0.1:1/db: cannot open")
    assert "s3cret" not in err and not (tmp_path / "new").exists()  # before training
    assert without_password("failed: me:s3cret@h and s3cret", "http://me:s3cret@h") == \
        "failed: me:***@h and ***"
    assert safe_url("http://me:s%40cret@h:5000/x") == "http://me:***@h:5000/x"  # the URI shown
    assert without_password("at me:s@cret", "http://me:s%40cret@h") == "at me:***"
    # A short password is hidden in the URI, not in every word that holds its letters.
    assert without_password("cannot open http://me:a@h/db: a timeout", "http://me:a@h/db") == \
        "cannot open http://me:***@h/db: a timeout"
    assert without_password("user me, password s3cret1: refused", "http://me:s3cret1@h") == \
        "user me, password ***: refused"


def test_a_quiet_study_still_says_that_mlflow_failed(tiny_idx_dir: Path, tmp_path: Path,
                                                     capsys, monkeypatch: pytest.MonkeyPatch):
    path = _study(tiny_idx_dir, tmp_path, final=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down
    code, _, err = run_cli(capsys, "study", str(path), "--run-dir", str(tmp_path / "runs"),
                             "--workers", "1", "-q", "--mlflow", "http://127.0.0.1:1")
    assert code == 0
    assert err.startswith("mlflow: cannot log to http://127.0.0.1:1 (") and \
        err.count("\n") == 1, err


def test_an_mlflow_failure_does_not_stop_training(tiny_idx_dir: Path, tmp_path: Path,
                                                  tracking: str, monkeypatch: pytest.MonkeyPatch):
    spec = load_study(_study(tiny_idx_dir, tmp_path, final=False))
    recorder = Recorder()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down
    with logging_to_mlflow("http://127.0.0.1:1", spec, run_dir=tmp_path / "runs",
                           progress=recorder) as progress:
        result = run_study(spec, run_dir=tmp_path / "runs", progress=progress)
    assert result.run.status == "finished"
    messages = [call[1] for call in recorder.calls if call[0] == "log"]
    assert len([m for m in messages if m.startswith("mlflow: cannot log")]) == 1


def test_flatten_and_tee():
    assert flatten({"a": {"b": 1, "c": [{"d": 2}], "e": [1, 2], "f": None}, "g": "x"}) == {
        "a.b": "1", "a.c.0.d": "2", "a.e": "[1, 2]", "a.f": "null", "g": "x"}
    one, two = Recorder(), Recorder()
    tee = Tee(one, Silent(), two)
    tee.start("s", 3)
    tee.epoch("s", 1, {})
    tee.finish("s")
    tee.log("hi")
    assert one.calls == two.calls == [("start", "s", 3), ("epoch", "s", 1, []),
                                      ("finish", "s"), ("log", "hi")]


def test_without_mlflow_installed_the_error_is_one_line(tiny_idx_dir: Path, tmp_path: Path,
                                                        monkeypatch, capsys):
    # to stand in for a missing MLflow, where require_mlflow looks it up
    import fashionlab.integrations.mlflow.export as integration

    monkeypatch.setattr(integration, "MlflowClient", None)
    store = Store.open(tmp_path / "runs")
    with pytest.raises(integration.MlflowError, match=r"pip install 'fashionlab\[mlflow\]'"):
        export_run_to_mlflow(store, "any", "sqlite:///x.db")
    store.close()
    code, _, err = run_cli(capsys, "study", str(_study(tiny_idx_dir, tmp_path)), "--mlflow",
                           "sqlite:///x.db", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, "MLflow is not installed")
    assert not Store.open(tmp_path / "runs").runs()  # it stopped before training


def test_without_a_tracking_uri_mlflow_is_not_imported():
    # Every study and search passes through logging_to_mlflow: without a URI it must not
    # cost them MLflow's import (~80 MB and a second).
    script = ("import sys\n"
              "from fashionlab.config import load_study\n"
              "from fashionlab.integrations.mlflow import logging_to_mlflow\n"
              "with logging_to_mlflow(None, load_study('seed'), progress=False) as progress:\n"
              "    assert progress is False\n"
              "assert 'mlflow' not in sys.modules and 'optuna' not in sys.modules\n"
              "from fashionlab.integrations.mlflow import export_run_to_mlflow\n"
              "assert 'mlflow' in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_the_command_prints_none_of_mlflows_info_lines(tiny_idx_dir: Path, tmp_path: Path):
    # A fresh process: MLflow reads its logging level when it is imported.
    path = _study(tiny_idx_dir, tmp_path, final=False)
    script = ("import sys\nfrom fashionlab.cli import main\n"
              "main(sys.argv[1:])\n")
    done = subprocess.run(
        [sys.executable, "-c", script, "study", str(path), "--run-dir", str(tmp_path / "runs"),
         "--workers", "1", "-q", "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=tmp_path)  # MLflow puts a SQLite URI's artifacts in ./mlruns
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # was: "INFO mlflow.store.db.utils: Creating initial MLflow ..."


def test_the_library_prints_none_of_mlflows_info_lines_unless_asked(finished: tuple[Path, str],
                                                                     tmp_path: Path):
    """From Python too (a notebook): live logging and an export say nothing of MLflow's
    database being created; MLFLOW_LOGGING_LEVEL, when set, is the user's choice."""
    run_dir, run_id = finished
    script = textwrap.dedent(f"""
        from fashionlab.config import load_study
        from fashionlab.integrations.mlflow import export_run_to_mlflow, logging_to_mlflow
        from fashionlab.store import Store
        from fashionlab.study import run_study

        spec = load_study({str(run_dir.parent / "tiny.toml")!r})
        with logging_to_mlflow("sqlite:///live.db", spec, run_dir="runs",
                               progress=False) as progress:
            run_study(spec, run_dir="runs", progress=progress)
        export_run_to_mlflow(Store.open({str(run_dir)!r}), {run_id!r}, "sqlite:///after.db",
                             artifacts=False)
        """)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300, check=False, cwd=tmp_path, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""  # was: "INFO mlflow.store.db.utils: Creating initial MLflow ..."
    for name in ("live.db", "after.db"):
        (tmp_path / name).unlink()
    asked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300, check=False, cwd=tmp_path,
                           env={**env, "MLFLOW_LOGGING_LEVEL": "INFO"})
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert "Creating initial MLflow database tables" in asked.stderr
    for name in ("live.db", "after.db"):
        (tmp_path / name).unlink()
    # (after importing MLflow, which sets its logger's level from MLFLOW_LOGGING_LEVEL)
    debug = 'import logging, mlflow; logging.getLogger("mlflow").setLevel(logging.DEBUG)\n'
    asked = subprocess.run([sys.executable, "-c", debug + script], capture_output=True,
                           text=True, timeout=300, check=False, cwd=tmp_path, env=env)
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert "Creating initial MLflow database tables" in asked.stderr  # asked for in code


def test_mlflows_commit_tag_holds_only_a_commit():
    from fashionlab.integrations.mlflow.export import revision_tags

    sha = "82d69e9" + "0" * 33
    assert revision_tags(sha) == {"fashionlab.revision": sha, "mlflow.source.git.commit": sha}
    assert revision_tags(f"{sha}+dirty")["mlflow.source.git.commit"] == sha
    assert revision_tags(f"fashionlab 0.1.0 from commit {sha}")["mlflow.source.git.commit"] == sha
    assert revision_tags("fashionlab 0.1.0") == {"fashionlab.revision": "fashionlab 0.1.0"}
    assert revision_tags(None) == {}


def test_a_process_killed_while_mlflow_makes_its_tables_leaves_no_broken_database(
        tracking: str, tmp_path: Path):
    """MLflow makes its tables in place over some seconds; killed then, the file it left
    refused every later call ("table already exists"). Now the tables are made in a draft
    beside it: the database is whole or not there, whenever the process dies."""
    from fashionlab.integrations.mlflow.export import create_sqlite_whole

    database = tmp_path / "mlflow.db"
    create_sqlite_whole(tracking)
    assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no draft left
    database.unlink()

    script = textwrap.dedent("""
        import sys
        import mlflow.store.tracking.sqlalchemy_store, mlflow.tracking._tracking_service.utils
        from fashionlab.integrations.mlflow.export import create_sqlite_whole
        print("imported", flush=True)
        create_sqlite_whole(sys.argv[1])
        print("made", flush=True)
        """)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    killed_while_drafting = 0
    # Killed once its draft exists, at once or a little later: timed from the draft seen, not
    # from a duration measured here, which another busy process on the machine made a guess.
    for delay in (0.0, 0.0, 0.1, 0.3):
        process = subprocess.Popen([sys.executable, "-c", script, tracking], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
        assert process.stdout.readline() == "imported\n"
        draft = tmp_path / f".mlflow.db.{process.pid}.initializing"  # this one's
        deadline = time.monotonic() + 60
        while not draft.exists() and not database.exists():
            assert time.monotonic() < deadline, "no draft, no database"
            time.sleep(0.002)
        time.sleep(delay)
        drafting = draft.exists()
        process.kill()
        process.communicate(timeout=60)
        if database.exists():  # it finished first: whole
            assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
            database.unlink()
        else:
            killed_while_drafting += drafting
    assert killed_while_drafting >= 2  # the kills landed while the tables were being made
    assert any(tmp_path.glob(".mlflow.db.*.initializing"))  # the last killed process's draft

    create_sqlite_whole(tracking)  # the next one makes it whole, and clears the drafts
    assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
    assert not any(tmp_path.glob(".mlflow.db.*"))
    before = sorted(tmp_path.iterdir())
    create_sqlite_whole("sqlite:///:memory:")  # no file: not one named ":memory:" either
    assert sorted(tmp_path.iterdir()) == before
