"""The runs browser: list (with running and interrupted runs), show, compare with the paired
test where folds match, export as CSV and JSON, delete after asking; unknown ids."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
from conftest import write_tiny_idx
from helpers import assert_one_line_error, run_cli, tiny_study_toml

from fashionlab import schema as schema_module
from fashionlab import stats
from fashionlab.config import load_study
from fashionlab.errors import StoreError
from fashionlab.provenance import environment, machine_text
from fashionlab.report import write_report
from fashionlab.results import StudyResult
from fashionlab.runs import (
    EXPORT_FIELDS,
    RunError,
    compare_runs,
    delete_run,
    describe_run,
    epoch_rows,
    export_run,
    list_runs,
)
from fashionlab.serialize import jsonable
from fashionlab.store import Store, default_url
from fashionlab.study import run_study
from fashionlab.trials import rdb_storage, study_name

CANDIDATES = """
[[candidates]]
name = "small"
layers = [{ units = 16 }]

[[candidates]]
name = "wide"
layers = [{ units = 32 }]
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StudyResult]:
    """Three tiny studies in one run directory: a; b, which differs only in its learning rate;
    c, which differs only in its seed (other weights and draws; the same contiguous folds)."""
    root = tmp_path_factory.mktemp("runs")
    data = write_tiny_idx(root / "tiny-idx")
    path_a, path_b = root / "a.toml", root / "b.toml"
    path_a.write_text(tiny_study_toml(data, epochs=3, candidates=CANDIDATES, final=False))
    path_b.write_text(path_a.read_text().replace("batch_size = 32\n",
                                                 "batch_size = 32\nlearning_rate = 0.01\n"))
    spec_a = load_study(path_a)
    specs = {"a": spec_a, "b": load_study(path_b), "c": dataclasses.replace(spec_a, seed=4)}
    assert specs["b"].candidates[0].train.learning_rate == 0.01
    with pytest.MonkeyPatch.context() as env:  # the autouse fixtures are per test
        env.setenv("FASHIONLAB_CACHE", str(root / "cache"))
        env.setenv("FASHIONLAB_MIRRORS", "http://127.0.0.1:9/")
        return {key: run_study(spec, run_dir=root / "runs", progress=False)
                for key, spec in specs.items()}


def _run_dir(runs: dict[str, StudyResult]) -> str:
    return str(runs["a"].output_dir.parent)


def _fake_run(store: Store, name: str, *, summary: dict | None = None, output_root=None,
              host: str | None = None, stale: bool = False, seed: int = 0,
              config: dict | None = None, environment: dict | None = None) -> str:
    run = store.create_run(kind="study", name=name, fingerprint="0" * 32, seed=seed,
                           config=config or {"cv": {"n_splits": 3}, "data": {}},
                           environment=environment or {}, output_root=output_root)
    if summary is not None:
        store.end_run(run.id, "finished", summary)
    if host is not None:
        with store.engine.begin() as conn:
            conn.execute(sa.update(schema_module.runs).where(schema_module.runs.c.id == run.id)
                         .values(host=host, heartbeat=time.time() - (3600 if stale else 0)))
    return run.id


# --------------------------------------------------------------------------------------------


def test_list_newest_first_with_the_best_score(runs: dict[str, StudyResult],
                                               capsys: pytest.CaptureFixture[str]):
    store = Store.open(_run_dir(runs))
    listed = list_runs(store)
    store.close()
    assert [r.id for r in listed] == [runs[k].run.id for k in ("c", "b", "a")]
    for overview in listed:
        result = next(r for r in runs.values() if r.run.id == overview.id)
        best = next(c for c in result.candidates if c.name == result.best)
        assert overview.status == "finished" and overview.study == "tiny"
        assert overview.best == result.best
        assert overview.best_score == pytest.approx(float(np.mean(best.val_accuracy)))
        assert overview.duration > 0

    code, out, _ = run_cli(capsys, "runs", "list", "--run-dir", _run_dir(runs))
    assert code == 0
    for header in ("id", "study", "started", "status", "best score", "duration"):
        assert header in out
    assert all(runs[k].run.id in out for k in "abc") and out.count("finished") == 3
    code, out, _ = run_cli(capsys, "runs", "list", "--json", "--run-dir", _run_dir(runs))
    assert [r["id"] for r in json.loads(out)] == [r.id for r in listed]


def test_running_and_interrupted_runs_show_as_such(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)
    running = _fake_run(store, "alive")  # this process: alive
    interrupted = _fake_run(store, "gone", host="elsewhere", stale=True)
    elsewhere = _fake_run(store, "far away", host="elsewhere")  # a fresh heartbeat
    states = {r.id: r.status for r in list_runs(store)}
    for run_id in (running, interrupted):  # a model it was training when it stopped
        store.register_models(run_id, [{"key": "m/fold-0", "candidate": "m", "role": "cv",
                                        "epochs_planned": 2}])
        store.update_model(run_id, "m/fold-0", status="running")
    store.close()
    assert states == {running: "running", interrupted: "interrupted", elsewhere: "running"}

    code, out, _ = run_cli(capsys, "runs", "list", "--json", "--run-dir", str(tmp_path))
    assert {r["id"]: r["status"] for r in json.loads(out)} == states
    code, out, _ = run_cli(capsys, "runs", "list", "--run-dir", str(tmp_path))
    assert out.count("interrupted") == 1 and out.count("running") == 2
    code, out, _ = run_cli(capsys, "runs", "show", interrupted, "--run-dir", str(tmp_path))
    assert code == 0 and "interrupted" in out
    code, out, _ = run_cli(capsys, "runs", "show", interrupted, "--json",
                           "--run-dir", str(tmp_path))
    assert json.loads(out)["models"]["by_status"] == {"interrupted": 1}  # not "running"
    code, out, _ = run_cli(capsys, "runs", "show", running, "--json", "--run-dir", str(tmp_path))
    assert json.loads(out)["models"]["by_status"] == {"running": 1}


def test_show_a_run(runs: dict[str, StudyResult], capsys: pytest.CaptureFixture[str]):
    a = runs["a"]
    code, out, _ = run_cli(capsys, "runs", "show", a.run.id, "--run-dir", _run_dir(runs))
    assert code == 0
    for text in (a.run.id, "finished", "random guess", "small", "wide", "(retrained)",
                 "test accuracy", "report.html"):
        assert text in out, text
    # The test accuracy with its interval from the number of test images, as in the table.
    tested = a.run.data["test"]
    low, high = stats.proportion_ci(a.retrain.test_accuracy, tested)
    assert (f"test accuracy {100 * a.retrain.test_accuracy:.2f}% [95% interval "
            f"{100 * low:.1f}, {100 * high:.1f}]: {a.retrain.candidate} (retrained)") in out
    code, out, _ = run_cli(capsys, "runs", "show", a.run.id, "--json", "--run-dir",
                           _run_dir(runs))
    info = json.loads(out)
    assert info["id"] == a.run.id and info["seed"] == 3
    assert info["models"] == {"total": 2 * 3 + 1, "by_status": {"finished": 7},
                              "epochs_stored": 2 * 3 * 3 + a.retrain.epochs}
    assert [row["model"] for row in info["table"]][:3] == ["random guess", "small", "wide"]
    assert "report.html" in info["files"] and info["config"]["name"] == "tiny"
    assert info["test_intervals"] == {f"{a.retrain.candidate} (retrained)": [low, high]}


def test_the_api_on_a_copied_run_directory_reads_and_writes_the_copy(
        runs: dict[str, StudyResult], tmp_path: Path):
    """A copied run directory's store still records the original's folders; the library's
    functions, given only that store, use the copy's (`Store.run_dir`), as the commands do
    with --run-dir, and leave the original alone."""
    from fashionlab.integrations.tensorboard import export_run_to_tensorboard

    original = Path(_run_dir(runs))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    a = runs["a"].run.id
    before = {p: p.stat().st_mtime_ns for p in (original / a).rglob("*")}
    store = Store.open(copy, create=False)
    assert store.run_dir == copy.resolve() and store.run_dir_holding(a) == copy.resolve()
    assert write_report(store, a) == copy.resolve() / a / "report.html"
    assert describe_run(store, a)["output_dir"] == str(copy.resolve() / a)
    # runs list and runs compare name the copy's folders too, as runs show does
    listed = {run.id: run.output_dir for run in list_runs(store)}
    assert listed[a] == str(copy.resolve() / a)
    compared = compare_runs(store, a, runs["b"].run.id)
    assert compared.a.output_dir == str(copy.resolve() / a)
    assert export_run_to_tensorboard(store, a) == copy.resolve() / a / "tensorboard"
    delete_run(store, a)
    store.close()
    assert not (copy / a).exists()
    assert {p: p.stat().st_mtime_ns for p in (original / a).rglob("*")} == before
    # A store opened by its URL beside another folder: the folder it recorded is the run's.
    elsewhere = Store(default_url(tmp_path / "empty"))
    assert elsewhere.run_dir == (tmp_path / "empty").resolve()
    assert elsewhere.run_dir_holding(a) is None


def test_unknown_run_ids_are_one_line_errors(runs: dict[str, StudyResult],
                                             capsys: pytest.CaptureFixture[str]):
    for args in (["show", "nope"], ["compare", runs["a"].run.id, "nope"],
                 ["export", "nope"], ["delete", "nope", "--yes"]):
        code, _, err = run_cli(capsys, "runs", *args, "--run-dir", _run_dir(runs))
        assert_one_line_error(code, err, "no run 'nope'", "fashionlab runs list")


def test_compare_pairs_the_folds_when_they_match(runs: dict[str, StudyResult],
                                                 capsys: pytest.CaptureFixture[str]):
    a, b = runs["a"], runs["b"]
    store = Store.open(_run_dir(runs))
    result = compare_runs(store, a.run.id, b.run.id)
    store.close()
    assert result.folds_match and result.reason is None
    assert [c.name for c in result.candidates] == ["small", "wide"]
    # The reference: the paired test of b's per-fold scores against a's, Holm across both.
    by_name = {c.name: c for c in a.candidates}, {c.name: c for c in b.candidates}
    expected = {name: stats.corrected_resampled_ttest(
        by_name[1][name].val_accuracy, by_name[0][name].val_accuracy,
        n_train=a.n_train, n_test=a.n_val) for name in ("small", "wide")}
    holm = stats.holm([expected[n].p_value for n in ("small", "wide")])
    for candidate, p_holm in zip(result.candidates, holm):
        test = expected[candidate.name]
        assert candidate.t == pytest.approx(test.t, nan_ok=True)
        assert candidate.p_value == pytest.approx(test.p_value)
        assert candidate.p_holm == pytest.approx(p_holm)
        assert candidate.difference == pytest.approx(test.mean_difference)
        assert candidate.a.mean == pytest.approx(np.mean(by_name[0][candidate.name].val_accuracy))
        assert candidate.verdict.endswith(f"(p={p_holm:.3g})")
    (row,) = result.tests
    assert row == (f"{a.best} (retrained)" if a.best == b.best else
                   f"retrained best ({a.best} in a, {b.best} in b)")
    assert result.tests[row] == (a.retrain.test_accuracy, b.retrain.test_accuracy)
    assert result.test_images == (100, 100)  # the tiny test set
    assert result.test_intervals(row) == tuple(
        stats.proportion_ci(r.retrain.test_accuracy, 100) for r in (a, b))

    code, out, _ = run_cli(capsys, "runs", "compare", a.run.id, b.run.id, "--run-dir",
                           _run_dir(runs))
    assert code == 0 and "folds match" in out and "small" in out and "test accuracy" in out
    assert "validation accuracy %: mean ± std across folds" in out
    code, out, _ = run_cli(capsys, "runs", "compare", a.run.id, b.run.id, "--json",
                           "--run-dir", _run_dir(runs))
    data = json.loads(out)
    assert data["folds_match"] and data["candidates"][0]["p_holm"] == pytest.approx(holm[0])


def test_contiguous_folds_pair_whatever_the_seed(runs: dict[str, StudyResult],
                                                 capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "runs", "compare", runs["a"].run.id, runs["c"].run.id,
                           "--json", "--run-dir", _run_dir(runs))
    data = json.loads(out)
    assert code == 0 and data["folds_match"] and data["reason"] is None
    assert all(c["p_value"] is not None and c["a"]["n"] == 3 for c in data["candidates"])


def test_compare_says_when_folds_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)
    summary = {"n_train": 200, "n_val": 100, "candidates": [
        {"name": "x", "val_accuracy": [0.80, 0.82, 0.81]}]}

    def run(seed: int = 0, cv: dict | None = None, sha256: str = "d1", **data) -> str:
        return _fake_run(store, "s", summary=summary, seed=seed,
                         config={"cv": cv or {"n_splits": 3}, "data": data},
                         environment={"data": {"sha256": sha256}})

    shuffled = {"n_splits": 3, "strategy": "shuffled"}
    base = run(train_limit=600, test_limit=100)
    for other, reason in [
            (run(seed=1, train_limit=600, test_limit=100), None),  # contiguous: no seed in them
            (run(train_limit=600, test_limit=50, sha256="d2"), None),  # no fold sees the test
            (run(train_limit=500, test_limit=100), "folds differ ([data] is not the same)"),
            (run(cv={"n_splits": 4}, train_limit=600, test_limit=100),
             "folds differ ([cv] is not the same)"),
            (run(train_limit=600, test_limit=100, sha256="d3"),
             "folds differ (the runs trained on other data: another SHA-256)")]:
        assert compare_runs(store, base, other).reason == reason
    assert compare_runs(store, run(cv=shuffled), run(seed=2, cv=shuffled)).reason == \
        "folds differ (seed 0 vs 2)"
    with pytest.raises(RunError, match="twice: name two runs"):
        compare_runs(store, base, base)
    store.close()
    code, out, _ = run_cli(capsys, "runs", "compare", base, other, "--json", "--run-dir",
                           str(tmp_path))
    data = json.loads(out)
    assert code == 0 and not data["folds_match"] and data["reason"].startswith("folds differ")
    assert [c["verdict"] for c in data["candidates"]] == ["folds differ"]
    assert data["candidates"][0]["p_value"] is None


def test_compare_puts_the_retrained_bests_side_by_side_with_their_intervals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Two runs that retrained different candidates: one row for both, not two half-empty
    ones; each accuracy with Wilson's interval from its run's number of test images."""
    store = Store.open(tmp_path)

    def run(best: str, accuracy: float, images: int | None) -> str:
        return _fake_run(store, "s", summary={
            "n_train": 200, "n_val": 100,
            "candidates": [{"name": best, "val_accuracy": [0.8, 0.8, 0.8]}],
            "retrain": {"candidate": best, "test_accuracy": accuracy},
            "final": [{"name": "cnn", "test_accuracy": accuracy + 0.02}]},
            environment={} if images is None else {"data": {"test": images}})

    a, b, old = run("x", 0.8835, 10000), run("y", 0.9, 2000), run("x", 0.88, None)
    result = compare_runs(store, a, b)
    assert result.tests == {"retrained best (x in a, y in b)": (0.8835, 0.9),
                            "cnn": (pytest.approx(0.9035), pytest.approx(0.92))}
    assert result.test_images == (10000, 2000)
    low, high = result.test_intervals("retrained best (x in a, y in b)")[0]
    assert (round(100 * low, 2), round(100 * high, 2)) == (87.71, 88.96)  # stats' example
    assert compare_runs(store, a, b).test_intervals("cnn")[1] == stats.proportion_ci(0.92, 2000)
    # A run stored before runs recorded their data: no interval, the accuracy alone.
    assert all(map(math.isnan, compare_runs(store, a, old).test_intervals("x (retrained)")[1]))
    store.close()

    code, out, _ = run_cli(capsys, "runs", "compare", a, b, "--run-dir", str(tmp_path))
    assert code == 0
    assert "88.35 [87.7, 89.0]" in out and "retrained best (x in a, y in b)" in out
    code, out, _ = run_cli(capsys, "runs", "compare", a, old, "--run-dir", str(tmp_path))
    assert code == 0 and "88.00" in out and "x (retrained)" in out
    code, out, _ = run_cli(capsys, "runs", "compare", a, b, "--json", "--run-dir",
                           str(tmp_path))
    data = json.loads(out)
    assert data["test_images"] == [10000, 2000]
    assert data["test_intervals"]["cnn"][1] == pytest.approx(list(stats.proportion_ci(0.92, 2000)))


def test_compare_candidates_in_one_run_only_and_unfinished_runs(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture):
    store = Store.open(tmp_path)
    values = {"x": [0.80, 0.82, 0.81], "y": [0.70, 0.71, 0.69], "z": [0.5, 0.5, 0.5]}

    def summary(names: str, shift: float) -> dict:
        return {"n_train": 200, "n_val": 100, "candidates": [
            {"name": n, "val_accuracy": [v + shift for v in values[n]]} for n in names]}

    a = _fake_run(store, "s", summary=summary("xy", 0.0))
    b = _fake_run(store, "s", summary=summary("xz", 0.05))
    result = compare_runs(store, a, b)
    verdicts = {c.name: c.verdict for c in result.candidates}
    assert verdicts["y"] == "only in a" and verdicts["z"] == "only in b"
    # A constant difference of 5 points on every fold: infinitely significant.
    assert verdicts["x"] == "b better (p=0)" and result.candidates[0].difference == \
        pytest.approx(0.05)
    assert math.isnan(result.candidates[1].t)

    unfinished = _fake_run(store, "s")
    with pytest.raises(RunError, match=f"run {unfinished} is running"):
        compare_runs(store, a, unfinished)
    store.close()
    code, _, err = run_cli(capsys, "runs", "compare", a, unfinished, "--run-dir", str(tmp_path))
    assert_one_line_error(code, err, "only finished studies can be compared")


def test_export_every_epoch_as_csv_and_json(runs: dict[str, StudyResult], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]):
    a = runs["a"]
    store = Store.open(_run_dir(runs))
    stored = store.epochs(a.run.id)
    rows = epoch_rows(store, a.run.id)
    assert json.loads(export_run(store, a.run.id, "json")) == jsonable(rows)  # NaN: null
    store.close()
    assert len(rows) == len(stored) == 2 * 3 * 3 + a.retrain.epochs

    code, out, _ = run_cli(capsys, "runs", "export", a.run.id, "--run-dir", _run_dir(runs))
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and tuple(table[0]) == EXPORT_FIELDS and len(table) == len(stored)
    first = next(r for r in table if r["key"] == "small/fold-1" and r["epoch"] == "2")
    record = next(e for e in stored if e.key == "small/fold-1" and e.epoch == 2)
    assert first["run"] == a.run.id and first["candidate"] == "small"
    assert first["role"] == "cv" and first["fold"] == "1"
    assert float(first["val_accuracy"]) == record.val_accuracy
    retrain = next(r for r in table if r["role"] == "retrain")
    assert retrain["fold"] == "" and retrain["val_loss"] == ""  # no validation: empty cells

    out_file = tmp_path / "epochs.json"
    # A prefix of the id (not its first 18 characters: the fixture's runs share a name, and
    # two made within one second share those too, which the command rightly calls ambiguous)
    code, _, err = run_cli(capsys, "runs", "export", a.run.id[:-2], "--format", "json",
                           "--out", str(out_file), "--run-dir", _run_dir(runs))
    data = json.loads(out_file.read_text())
    assert code == 0 and str(out_file) in err and len(data) == len(stored)
    assert next(r for r in data if r["role"] == "retrain")["val_loss"] is None
    inferred = tmp_path / "epochs-too.json"  # the format from the suffix
    code, _, err = run_cli(capsys, "runs", "export", a.run.id, "--out", str(inferred),
                           "--run-dir", _run_dir(runs))
    assert code == 0 and json.loads(inferred.read_text()) == data

    study_file = tmp_path / "study.toml"  # a slip of the command line: nothing written over
    study_file.write_text("name = 'mine'\n")
    for args in (["--out", str(study_file)], ["--format", "csv", "--out", str(out_file)]):
        code, _, err = run_cli(capsys, "runs", "export", a.run.id, *args,
                               "--run-dir", _run_dir(runs))
        assert_one_line_error(code, err, "export must be written to a")
    code, _, err = run_cli(capsys, "runs", "export", a.run.id, "--out",
                           str(study_file / "e.csv"), "--run-dir", _run_dir(runs))
    assert_one_line_error(code, err, f"cannot write ({study_file} is a file, not a folder)")
    assert study_file.read_text() == "name = 'mine'\n" and json.loads(out_file.read_text())


class _StoppedWhileReading(io.StringIO):
    """Standard input at which the user stops the command (SIGTERM) instead of answering."""

    def readline(self, *args: object) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return "y\n"


def test_a_stop_at_the_delete_prompt_is_said_as_a_stop_and_deletes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    store = Store.open(tmp_path)
    keep = _fake_run(store, "keep", summary={"candidates": []}, output_root=tmp_path)
    (tmp_path / keep).mkdir()
    store.close()
    monkeypatch.setattr("sys.stdin", _StoppedWhileReading())
    code, _, err = run_cli(capsys, "runs", "delete", keep, "--run-dir", str(tmp_path))
    assert code == 128 + signal.SIGTERM and err == "stopped by SIGTERM\n"  # not "aborted"
    assert (tmp_path / keep).is_dir()


def test_delete_asks_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch):
    store = Store.open(tmp_path)
    summary = {"candidates": []}
    keep, gone, quick = (_fake_run(store, name, summary=summary, output_root=tmp_path)
                         for name in ("keep", "gone", "quick"))
    for run_id in (keep, gone, quick):
        (tmp_path / run_id / "models").mkdir(parents=True)
        (tmp_path / run_id / "report.html").write_text("x")
    running = _fake_run(store, "running", output_root=tmp_path)
    store.close()

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, out, err = run_cli(capsys, "runs", "delete", keep, "--run-dir", str(tmp_path))
    assert code == 1 and f"Delete run {keep}" in out and (tmp_path / keep).is_dir()
    assert err == "aborted\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, _ = run_cli(capsys, "runs", "delete", gone, "--run-dir", str(tmp_path))
    assert code == 0 and f"deleted run {gone}" in out
    code, out, _ = run_cli(capsys, "runs", "delete", quick, "--yes", "--run-dir", str(tmp_path))
    assert code == 0

    assert not (tmp_path / gone).exists() and not (tmp_path / quick).exists()
    store = Store.open(tmp_path)
    assert {r.id for r in store.runs()} == {keep, running}
    assert (tmp_path / "fashionlab.db").is_file()
    with pytest.raises(RunError, match="is running"):
        delete_run(store, running)
    store.close()
    code, _, err = run_cli(capsys, "runs", "delete", running, "--yes", "--run-dir",
                           str(tmp_path))
    assert_one_line_error(code, err, f"run {running} is running")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # refused before it asks
    code, out, err = run_cli(capsys, "runs", "delete", running, "--run-dir", str(tmp_path))
    assert "Delete run" not in out
    assert_one_line_error(code, err, f"run {running} is running")


def test_delete_leaves_a_directory_that_is_not_the_runs_own(tmp_path: Path):
    store = Store.open(tmp_path / "runs")
    run_id = _fake_run(store, "odd", summary={"candidates": []})
    precious = tmp_path / "precious"
    precious.mkdir()
    with store.engine.begin() as conn:
        conn.execute(sa.update(schema_module.runs).values(output_dir=str(precious)))
    delete_run(store, run_id)
    assert precious.is_dir() and store.runs() == []
    store.close()


def test_a_report_of_a_run_deleted_while_it_is_drawn_is_not_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fashionlab import report
    from fashionlab.report import ReportError

    store = Store.open(tmp_path)
    run_id = _fake_run(store, "deleted", summary={"candidates": []}, output_root=tmp_path)
    (tmp_path / run_id / "models").mkdir(parents=True)
    drawing = report.render_report

    def deleted_meanwhile(*args, **kwargs) -> str:  # `runs delete` from another process
        html = drawing(*args, **kwargs)
        other = Store.open(tmp_path)
        delete_run(other, run_id)
        other.close()
        return html

    monkeypatch.setattr(report, "render_report", deleted_meanwhile)
    with pytest.raises(ReportError, match=f"run {run_id} was deleted while its report was made"):
        write_report(store, run_id)
    store.close()
    assert not (tmp_path / run_id).exists()  # its folder not made again for the report


def test_delete_touches_no_file_when_the_store_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "kept", summary={"candidates": []}, output_root=tmp_path)
    (tmp_path / run_id).mkdir(exist_ok=True)
    (tmp_path / run_id / "report.html").write_text("results")

    def read_only(self: Store, run_id: str) -> None:
        raise StoreError("cannot write to the store: attempt to write a readonly database")

    monkeypatch.setattr(Store, "delete_run", read_only)
    with pytest.raises(StoreError, match="readonly"):
        delete_run(store, run_id)
    assert (tmp_path / run_id / "report.html").read_text() == "results"
    monkeypatch.undo()
    assert [r.id for r in store.runs()] == [run_id]
    store.close()


def test_delete_in_a_copied_run_directory_deletes_the_copys_folder(tmp_path: Path):
    original, copy = tmp_path / "a", tmp_path / "b"
    store = Store.open(original)
    run_id = _fake_run(store, "copied", summary={"candidates": []}, output_root=original)
    (original / run_id).mkdir(exist_ok=True)
    store.close()
    shutil.copytree(original, copy)  # its store still records a/<run id> as the run's folder
    copied = Store.open(copy)
    delete_run(copied, run_id, run_dir=copy)
    assert copied.runs() == []
    copied.close()
    assert not (copy / run_id).exists() and (original / run_id).is_dir()


def test_a_copys_store_named_by_url_shows_and_deletes_the_copys_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    # FASHIONLAB_STORE (or --store) naming a copied run directory's fashionlab.db, no
    # --run-dir, from another folder: the runs' folders are the copy's, not the original's
    # the store recorded, nor ./fashionlab-runs.
    original, copy, elsewhere = tmp_path / "a", tmp_path / "b", tmp_path / "cwd"
    store = Store.open(original)
    run_id = _fake_run(store, "copied", summary={"candidates": []}, output_root=original)
    (original / run_id).mkdir(exist_ok=True)
    store.close()
    shutil.copytree(original, copy)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FASHIONLAB_STORE", default_url(copy))
    code, out, _ = run_cli(capsys, "runs", "show", run_id, "--json")
    assert code == 0 and json.loads(out)["output_dir"] == str(copy.resolve() / run_id)
    monkeypatch.delenv("FASHIONLAB_STORE")
    code, _, err = run_cli(capsys, "runs", "delete", run_id, "--yes", "--store",
                           default_url(copy))
    assert code == 0, err
    assert not (copy / run_id).exists() and (original / run_id).is_dir()
    assert not (elsewhere / "fashionlab-runs").exists()


def test_a_question_with_the_input_closed_is_answered_no(tmp_path: Path):
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "kept", summary={"candidates": []}, output_root=tmp_path)
    store.close()
    done = subprocess.run([sys.executable, "-c", "from fashionlab.console import main; main()",
                           "runs", "delete", run_id, "--run-dir", str(tmp_path)],
                          capture_output=True,
                          text=True, timeout=60, check=False,
                          preexec_fn=lambda: os.close(0))  # `<&-`
    assert done.returncode == 1 and done.stderr == "aborted\n", done.stderr
    store = Store.open(tmp_path)
    assert [r.id for r in store.runs()] == [run_id]
    store.close()


def test_an_empty_run_id_matches_no_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "only", summary={"candidates": []})
    store.close()
    code, _, err = run_cli(capsys, "runs", "delete", "", "--yes", "--run-dir", str(tmp_path))
    assert_one_line_error(code, err, "the run id is empty")
    store = Store.open(tmp_path)
    assert [r.id for r in store.runs()] == [run_id]
    store.close()


def test_a_run_directory_with_no_store_is_one_line_and_stays_uncreated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "typo"
    for args in (["runs", "list"], ["runs", "show", "x"], ["runs", "export", "x"],
                 ["runs", "delete", "x", "--yes"], ["report", "x"]):
        code, _, err = run_cli(capsys, *args, "--run-dir", str(missing))
        assert_one_line_error(code, err, f"no store at {missing / 'fashionlab.db'}",
                              "nothing has run there yet")
    assert not missing.exists()


def test_a_database_without_a_store_is_one_line_and_stays_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # An empty file (SQLite reads it as a new database) and another program's database: a
    # command that only looks makes no store in them.
    empty = tmp_path / "runs" / "fashionlab.db"
    empty.parent.mkdir()
    empty.touch()
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")  # whose readers leave -wal and -shm files
        conn.execute("CREATE TABLE notes (text)")
    before = other.read_bytes()
    unversioned = tmp_path / "unversioned.db"  # a version table with no version in it
    with contextlib.closing(sqlite3.connect(unversioned)) as conn, conn:
        conn.execute("CREATE TABLE fl_schema (version INTEGER, applied TEXT)")
    unversioned_before = unversioned.read_bytes()
    looks = (["runs", "list"], ["runs", "show", "x"], ["runs", "delete", "x", "--yes"],
             ["report", "x"])
    for where, options in ((empty, ["--run-dir", str(empty.parent)]),
                           (other, ["--store", f"sqlite:///{other}"]),
                           (unversioned, ["--store", f"sqlite:///{unversioned}"])):
        for args in looks:
            code, _, err = run_cli(capsys, *args, *options)
            assert_one_line_error(code, err, f"no store at {where}", "nothing has run there yet")
    assert empty.stat().st_size == 0 and other.read_bytes() == before
    assert unversioned.read_bytes() == unversioned_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db", "runs",
                                                           "unversioned.db"]  # no journal left


def test_a_store_damaged_inside_is_one_line_wherever_a_query_meets_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """SQLite's opening check reads the first pages only: a page of the runs table
    overwritten (a bad disk block, a copy cut short) showed as a traceback of the driver's
    DatabaseError at the first query that read it."""
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "only", summary={"candidates": []})
    store.close()
    path = tmp_path / "fashionlab.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                               (schema_module.runs.name,)).fetchone()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 64)
    for args in (["runs", "list"], ["runs", "show", run_id], ["report", run_id]):
        code, out, err = run_cli(capsys, *args, "--run-dir", str(tmp_path))
        assert_one_line_error(code, err, f"the store {path} is damaged (database disk image "
                              "is malformed): put back a copy of it")
        assert out == ""
    store = Store.open(tmp_path, create=False)  # the Python API: the same StoreError
    with pytest.raises(StoreError, match="is damaged"):
        store.runs()
    store.close()


def test_a_run_whose_json_was_edited_into_garbage_is_named_and_can_be_deleted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Our writes are whole JSON; a hand edit that breaks one made every `runs` command fail
    with the JSON decoder's traceback, for every run in the store."""
    store = Store.open(tmp_path)
    kept = _fake_run(store, "kept", summary={"candidates": []})
    edited = _fake_run(store, "edited", summary={"candidates": []})
    store.close()
    database = tmp_path / "fashionlab.db"
    for column in ("config", "summary"):
        with contextlib.closing(sqlite3.connect(database)) as conn, conn:
            conn.execute("UPDATE fl_runs SET config = ?, summary = ? WHERE id = ?",
                         ("{}", "{}", edited))  # whole again, but for the column edited now
            conn.execute(f"UPDATE fl_runs SET {column} = ? WHERE id = ?", ('{"oops', edited))
        for args in (["runs", "list"], ["runs", "show", edited], ["report", edited]):
            code, out, err = run_cli(capsys, *args, "--run-dir", str(tmp_path))
            assert_one_line_error(code, err, f"run {edited} in the store", f"its {column} is "
                                  "not valid JSON", f"`fashionlab runs delete {edited}`")
            assert out == ""
    store = Store.open(tmp_path, create=False)  # the Python API: the same StoreError
    with pytest.raises(StoreError, match="not valid JSON"):
        store.runs()
    store.close()
    code, out, _ = run_cli(capsys, "runs", "delete", edited, "--yes", "--run-dir", str(tmp_path))
    assert code == 0 and f"deleted run {edited}" in out
    code, out, _ = run_cli(capsys, "runs", "list", "--json", "--run-dir", str(tmp_path))
    assert code == 0 and [run["id"] for run in json.loads(out)] == [kept]


def test_options_that_do_not_apply_are_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "only", summary={"candidates": []})
    store.close()
    code, _, err = run_cli(capsys, "runs", "list", "--kind", "studies", "--run-dir",
                           str(tmp_path))
    assert_one_line_error(code, err, "kind: expected study or search (got 'studies')")
    for extra in (["--format", "json"], ["--out", str(tmp_path / "e.csv")]):
        code, _, err = run_cli(capsys, "runs", "export", run_id, "--to", "mlflow",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", *extra,
                               "--run-dir", str(tmp_path))
        assert_one_line_error(code, err, "--format and --out write the epochs to a file")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "e.csv").exists()


def test_a_search_that_minimises_val_loss_lists_its_loss_not_a_percentage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)

    def search(name: str, summary: dict) -> str:
        run = store.create_run(kind="search", name=name, fingerprint="0" * 32, seed=0,
                               config={}, environment={}, output_root=tmp_path)
        store.end_run(run.id, "finished", summary)
        return run.id

    loss = search("by-loss", {"objective": "val_loss", "best": "trial 1", "best_value": 0.5623})
    accuracy = search("by-accuracy", {"objective": "val_accuracy", "best": "trial 2",
                                      "best_value": 0.9})
    store.close()
    code, out, err = run_cli(capsys, "runs", "list", "--run-dir", str(tmp_path))
    assert code == 0, err
    assert "0.5623 val_loss trial 1" in out and "56.23%" not in out
    assert "90.00% trial 2" in out
    code, out, _ = run_cli(capsys, "runs", "list", "--json", "--run-dir", str(tmp_path))
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed[loss]["best_metric"] == "val_loss"
    assert listed[accuracy]["best_metric"] == "val_accuracy"


def test_a_delete_stopped_after_the_rows_is_finished_by_deleting_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "half", summary={"candidates": []}, output_root=tmp_path)
    (tmp_path / run_id / "models").mkdir(parents=True)
    store.close()

    def stopped(path: Path, *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the user stops it while the files go
        time.sleep(5)

    monkeypatch.setattr("fashionlab.runs.shutil.rmtree", stopped)
    code, _, err = run_cli(capsys, "runs", "delete", run_id, "--yes", "--run-dir", str(tmp_path))
    assert code == 128 + signal.SIGTERM
    assert err == ("stopped by SIGTERM: run the same command again to finish the deletion\n")
    monkeypatch.undo()
    store = Store.open(tmp_path)
    assert store.runs() == [] and (tmp_path / run_id).is_dir()  # rows gone, folder left
    store.close()

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, err = run_cli(capsys, "runs", "delete", run_id, "--run-dir", str(tmp_path))
    assert code == 0, err
    assert f"the folder of run {run_id}, which the store no longer holds?" in out
    assert not (tmp_path / run_id).exists()
    # Only a whole run id names such a folder: a prefix, or another folder, is no run.
    (tmp_path / "notes").mkdir()
    code, _, err = run_cli(capsys, "runs", "delete", "notes", "--yes", "--run-dir", str(tmp_path))
    assert_one_line_error(code, err, "no run 'notes'")
    assert (tmp_path / "notes").is_dir()

    # The Python API finishes it too (the command asks first, then calls it).
    store = Store.open(tmp_path)
    run_id = _fake_run(store, "half again", summary={"candidates": []}, output_root=tmp_path)
    (tmp_path / run_id / "models").mkdir(parents=True)
    store.delete_run(run_id)  # the rows only: as a stop after them leaves it
    assert delete_run(store, run_id) is None and not (tmp_path / run_id).exists()
    with pytest.raises(StoreError, match="no run 'notes'"):
        delete_run(store, "notes", run_dir=tmp_path)
    with pytest.raises(StoreError, match=f"no run '{run_id}'"):  # nothing left to finish
        delete_run(store, run_id)
    store.close()
    assert (tmp_path / "notes").is_dir()


def test_a_cpu_whose_bfloat16_cannot_be_read_records_it_as_unknown(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert environment()["machine"]["cpu_bf16"] is None  # not False: nobody looked
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert isinstance(environment()["machine"]["cpu_bf16"], bool)


def test_a_machine_shows_its_vector_instructions_beside_the_cpu_name():
    machine = {"hostname": "vm", "cpu": "AMD EPYC", "cpu_capability": "AVX512",
               "cpu_bf16": True, "accelerator": None, "device": "cpu", "cores": 2}
    assert machine_text(machine) == "vm, AMD EPYC (AVX512, bf16), cpu"
    assert machine_text({**machine, "cpu_capability": "AVX2", "cpu_bf16": False}) \
        == "vm, AMD EPYC (AVX2), cpu"
    # A run stored before they were recorded.
    assert machine_text({"hostname": "vm", "cpu": "AMD EPYC", "device": "cuda",
                         "accelerator": "NVIDIA H200"}) == "vm, AMD EPYC, NVIDIA H200, cuda"
    assert machine_text({}) == ""
    # An ARM machine: torch knows no vector instructions to name.
    assert machine_text({"cpu": "Neoverse", "cpu_capability": "DEFAULT"}) == "Neoverse"


def test_show_counts_the_running_trial_of_an_interrupted_search_as_lost(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = Store.open(tmp_path)
    run = store.create_run(kind="search", name="s", fingerprint="0" * 32, seed=0,
                           config={"cv": {"n_splits": 3}, "data": {}}, environment={})
    storage = rdb_storage(store.url)
    study = optuna.create_study(study_name=study_name("s", "0" * 32), storage=storage)
    study.tell(study.ask(), 0.5)
    study.ask()  # a trial its process is training
    storage.engine.dispose()
    assert describe_run(store, run.id)["trials"]["counts"]["running"] == 1
    with store.engine.begin() as conn:  # its process gone: silent for an hour
        conn.execute(sa.update(schema_module.runs).values(host="elsewhere",
                                                         heartbeat=time.time() - 3600))
    counts = describe_run(store, run.id)["trials"]["counts"]
    assert (counts["running"], counts["lost"], counts["complete"]) == (0, 1, 1)
    store.close()
    code, out, err = run_cli(capsys, "runs", "show", run.id, "--run-dir", str(tmp_path))
    assert code == 0, err
    assert "(1 lost with its process, run again when the search goes on)" in " ".join(out.split())
