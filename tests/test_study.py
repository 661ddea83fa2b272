"""Studies end to end on the tiny dataset: results, files, store rows, resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from html import escape as html_escape
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
import torch
from helpers import OnEpoch, Recorder, assert_one_line_error, dead_pid, run_cli, tiny_study_toml

from fashionlab import stops
from fashionlab.config import load_study, study_from_dict
from fashionlab.cv import make_folds
from fashionlab.data import Split, load_fashion_mnist, write_idx
from fashionlab.errors import ConfigError, StoreError
from fashionlab.jobs import job_rows
from fashionlab.progress import Silent
from fashionlab.results import table_rows
from fashionlab.runner import MIN_PARALLEL_FLOPS, Job, auto_workers
from fashionlab.stats import proportion_ci
from fashionlab.steps import RunContext, load_study_data
from fashionlab.store import DB_NAME, Store
from fashionlab.study import independent_jobs, run_study
from fashionlab.study import jobs as study_jobs
from fashionlab.study import run as study_run
from fashionlab.study.jobs import JobInputs
from fashionlab.tables import HEADERS, display_rows
from fashionlab.train import Tensors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture
def study_file(tiny_idx_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir))
    return path


def _epoch_rows(run_dir: Path, run_id: str) -> dict[tuple[str, int], tuple[float, ...]]:
    store = Store.open(run_dir)
    rows = {(e.key, e.epoch): tuple(None if math.isnan(v) else v  # NaN == NaN here
                                    for v in (e.loss, e.accuracy, e.val_loss, e.val_accuracy))
            for e in store.epochs(run_id)}
    assert len(rows) == len(store.epochs(run_id))  # no duplicates
    store.close()
    return rows


def test_a_study_runs_end_to_end(study_file: Path, tmp_path: Path):
    spec = load_study(study_file)
    result = run_study(spec, run_dir=tmp_path / "runs", progress=False)

    assert [c.name for c in result.candidates] == ["small", "small L2", "two layers"]
    for candidate in result.candidates:
        assert candidate.curves["val_loss"].shape == (3, 4)  # 3 folds x 4 epochs
        assert len(candidate.val_accuracy) == 3
        assert not math.isnan(candidate.val_accuracy.mean())
    assert result.best in {"small", "small L2", "two layers"}
    assert {c.name for c in result.comparisons} == {"small", "small L2", "two layers"}
    assert result.retrain is not None and 0 <= result.retrain.test_accuracy <= 1
    assert result.final[0].name == "cnn" and result.final[0].curves["val_loss"].shape == (1, 2)

    out = result.output_dir
    for name in ("results.md", "results.csv", "results.json", "study.toml",
                 "figures/samples.png", "figures/curves-small.png", "figures/curves-cnn.png",
                 f"models/{result.best.replace(' ', '_')}/model.safetensors",
                 "models/cnn/model.json"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "random guess" in table and "(retrained)" in table and "± " in table
    assert not (out / "checkpoints").exists()

    store = Store.open(tmp_path / "runs")
    run = store.run(result.run.id)
    assert run.state == "finished" and run.summary["best"] == result.best
    assert run.config["name"] == "tiny" and run.environment["versions"]["torch"]
    assert run.environment["machine"]["cores"] >= 1
    # The vector instructions name the CPU's kind where its marketing name does not.
    assert run.environment["machine"]["cpu_capability"] in {  # torch's documented values
        "DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"}
    assert run.environment["machine"]["cpu_bf16"] in (True, False, None)  # None: not x86
    models = store.models(run.id)
    assert len(models) == 3 * 3 + 2  # folds, the retrained best, the CNN
    assert all(m.status == "finished" for m in models)
    epochs = store.epochs(run.id)
    assert len(epochs) == 3 * 3 * 4 + result.retrain.epochs + 2


def test_same_seed_same_numbers(study_file: Path, tmp_path: Path):
    spec = load_study(study_file)
    a = run_study(spec, run_dir=tmp_path / "a", progress=False)
    b = run_study(spec, run_dir=tmp_path / "b", progress=False)
    assert _epoch_rows(tmp_path / "a", a.run.id) == _epoch_rows(tmp_path / "b", b.run.id)


def test_workers_train_stacks_in_parallel_processes_with_the_same_numbers(
        study_file: Path, tmp_path: Path):
    spec = load_study(study_file)
    # The same threads per job (a convolution's numbers depend on them): one each.
    one = run_study(spec, run_dir=tmp_path / "one", progress=False, threads=1)
    two = run_study(spec, run_dir=tmp_path / "two", progress=False, workers=2)
    assert two.threads == one.threads == 1
    assert _epoch_rows(tmp_path / "two", two.run.id) == _epoch_rows(tmp_path / "one", one.run.id)
    assert two.best == one.best
    # The final CNN trained in a worker too: same test score, its model saved by the worker.
    assert two.final[0].test_accuracy == one.final[0].test_accuracy
    assert (two.output_dir / "models" / "cnn" / "model.safetensors").exists()


def test_workers_train_on_the_dataset_the_caller_gave(study_file: Path, tiny_idx_dir: Path,
                                                     tmp_path: Path):
    # Worker processes map the calling process's images (shared memory) instead of loading
    # the study's files again: with the files gone, a two-worker run still trains, on the
    # very data given, and gives the numbers of a run in one process.
    spec = load_study(study_file)
    dataset = load_study_data(spec)
    tiny_idx_dir.rename(tmp_path / "elsewhere")
    one = run_study(spec, run_dir=tmp_path / "one", progress=False, threads=1, dataset=dataset)
    two = run_study(spec, run_dir=tmp_path / "two", progress=False, workers=2, dataset=dataset)
    assert two.workers == 2 and two.threads == one.threads == 1
    assert _epoch_rows(tmp_path / "two", two.run.id) == _epoch_rows(tmp_path / "one", one.run.id)
    assert two.final[0].test_accuracy == one.final[0].test_accuracy
    # More workers than jobs start no more processes, and say so (not "1000 processes").
    many = run_study(spec, run_dir=tmp_path / "many", progress=False, workers=1000,
                     dataset=dataset)
    store = Store.open(tmp_path / "many")
    parallel = [key for key in job_rows(store, many.run.id)
                if key not in (study_jobs.RETRAIN, study_jobs.OUTPUTS)]  # the CV stacks, the CNN
    store.close()
    assert 2 <= many.workers == len(parallel) < 1000


def test_a_script_without_the_main_guard_is_told_so_by_its_workers(study_file: Path,
                                                                    tmp_path: Path):
    # Workers start by spawn, which imports the calling script again: without the guard, each
    # would start the study anew. The worker says why it stops; the caller, that it did.
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nimport fashionlab as fl\n"
                      "fl.run_study(fl.load_study(sys.argv[1]), run_dir=sys.argv[2], workers=2, "
                      "progress=False)\n")
    done = subprocess.run([sys.executable, str(script), str(study_file), str(tmp_path / "runs")],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert "ConfigError: run_study was called while a worker process imported your script: " \
           "a script that asks for workers must call it under `if __name__ == \"__main__\":`" \
        in done.stderr
    assert "WorkerDied: a worker process died (it ended with an error, exit status 1: see " \
           "its message on stderr)" in done.stderr


def test_a_given_dataset_gets_the_studys_limits_and_its_runs_are_told_apart(
        tiny_idx_dir: Path, tmp_path: Path):
    """`dataset=` stands for the study's files: cut to its [data] limits, and a run is shown
    or resumed only for the same data (the store keeps their digest)."""
    path = tmp_path / "limited.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=2, final=False))
    spec = load_study(path)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, train_limit=150))
    whole = load_fashion_mnist(tiny_idx_dir, verify=False)  # 300 training images
    first = run_study(spec, run_dir=tmp_path, progress=False, dataset=whole)
    assert first.n_train + first.n_val == 150  # not 300
    assert first.run.environment["data"] == {"sha256": load_study_data(spec).sha256(),
                                             "train": 150, "test": 100}
    # The study's own files are the same data: its run is shown, nothing trains.
    assert run_study(spec, run_dir=tmp_path, progress=False).run.id == first.run.id
    # Other data (one label changed) are another run, said in a note; the first stays.
    labels = whole.train.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    other = dataclasses.replace(whole, train=Split(whole.train.images, labels))
    second = run_study(spec, run_dir=tmp_path, progress=False, dataset=other)
    assert second.run.id != first.run.id
    note = (f"run {second.run.id} is a new run: its data differ from those of run "
            f"{first.run.id} of the same settings (SHA-256 "
            f"{second.run.environment['data']['sha256'][:12]} against "
            f"{first.run.environment['data']['sha256'][:12]}), which is left as it is (the same "
            "data show or resume it)")
    assert second.notes == [note]
    assert run_study(spec, run_dir=tmp_path, progress=False, dataset=whole).run.id == first.run.id
    assert run_study(spec, run_dir=tmp_path, progress=False, dataset=other).run.id == \
        second.run.id
    # --fresh on data that have a run: new because asked for, not because of the data.
    assert run_study(spec, run_dir=tmp_path, progress=False, dataset=other,
                     fresh=True).notes == []


def test_a_study_whose_data_folder_moved_resumes_its_run(tiny_idx_dir: Path, tmp_path: Path):
    """Where the files are read from is not a setting: the same files in another folder
    resume the interrupted run; other files there start a new run, as other data do."""
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    path = tmp_path / "moving.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=3, final=False))
    with pytest.raises(KeyboardInterrupt):
        run_study(load_study(path), run_dir=tmp_path, progress=OnEpoch(stop))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_idx_dir, moved)
    path.write_text(tiny_study_toml(moved, epochs=3, final=False))
    resumed = run_study(load_study(path), run_dir=tmp_path, progress=False)
    (run,) = Store.open(tmp_path).runs()
    assert resumed.run.id == run.id and run.state == "finished" and resumed.notes == []
    assert run_study(load_study(path), run_dir=tmp_path, progress=False).already_finished

    other = tmp_path / "other"
    shutil.copytree(tiny_idx_dir, other)
    labels = other / "train-labels-idx1-ubyte.gz"
    whole = load_fashion_mnist(tiny_idx_dir, verify=False)
    changed = whole.train.labels.copy()
    changed[0] = (changed[0] + 1) % 10
    write_idx(labels, changed)
    path.write_text(tiny_study_toml(other, epochs=3, final=False))
    second = run_study(load_study(path), run_dir=tmp_path, progress=False)
    assert second.run.id != run.id
    assert second.notes and "its data differ" in second.notes[0]


def test_a_run_stored_before_runs_recorded_their_data_is_still_shown(study_file: Path,
                                                                     tmp_path: Path):
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    environment = {k: v for k, v in first.run.environment.items() if k != "data"}
    engine = sa.create_engine(f"sqlite:///{tmp_path / DB_NAME}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE fl_runs SET environment = :e WHERE id = :id"),
                           {"e": json.dumps(environment), "id": first.run.id})
    engine.dispose()
    again = run_study(spec, run_dir=tmp_path, progress=False)
    assert again.run.id == first.run.id and again.notes == []


def test_a_model_saved_by_a_resumed_run_records_the_process_that_trained_it(
        study_file: Path, tmp_path: Path):
    # The run keeps the environment of the process that started it; a model trained after a
    # resume (here on "another machine", with other code) records its own process's.
    from fashionlab.provenance import code_revision

    first = run_study(load_study(study_file), run_dir=tmp_path, progress=False)
    started = first.run.environment
    elsewhere = {**started, "revision": "0123456789ab (elsewhere)",
                 "machine": {**started["machine"], "hostname": "elsewhere",
                             "torch_threads": 99}}
    engine = sa.create_engine(f"sqlite:///{tmp_path / DB_NAME}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE fl_runs SET environment = :e, status = 'interrupted' "
                                   "WHERE id = :id"),
                           {"e": json.dumps(elsewhere), "id": first.run.id})
    engine.dispose()
    shutil.rmtree(first.retrain.model_dir)
    again = run_study(load_study(study_file), run_dir=tmp_path, progress=False)
    assert again.run.id == first.run.id
    assert again.run.environment["machine"]["hostname"] == "elsewhere"  # the run's own
    saved = json.loads((again.retrain.model_dir / "model.json").read_text())["metadata"]
    assert saved["revision"] == code_revision()
    assert saved["machine"]["hostname"] != "elsewhere"
    assert saved["machine"]["torch_threads"] == torch.get_num_threads()
    assert saved["data"] == started["data"]


def test_workers_get_each_image_tensor_once_on_their_own_device():
    # The parent shares its tensors (in place on the CPU); a GPU worker copies them to its
    # own device, once per distinct tensor: the final models' training images are the
    # cross-validation's ("meta" stands in for a GPU here).
    x, y, x_test, y_test = torch.rand(6, 28, 28), torch.arange(6), torch.rand(2, 28, 28), \
        torch.arange(2)
    inputs = JobInputs([], ("a",), Tensors(x, y, x, y), Tensors(x, y, x_test, y_test))
    shared = study_jobs._in_shared_memory(inputs)
    assert shared.cv_data.x_train is x and shared.final_data.x_val is x_test
    assert x.is_shared() and y_test.is_shared()
    moved = study_jobs._on_device(shared, torch.device("meta"))
    assert {t.device.type for data in (moved.cv_data, moved.final_data)
            for t in vars(data).values()} == {"meta"}
    assert moved.cv_data.x_train is moved.cv_data.x_val is moved.final_data.x_train
    assert moved.final_data.x_val is not moved.final_data.x_train


def test_a_worker_process_does_not_load_the_figures():
    # A worker unpickles its job function from fashionlab.study.jobs, which imports the
    # package first: matplotlib (~30 MB a process) stays out until results are drawn.
    script = ("import sys, fashionlab.study.jobs\n"
              "assert 'matplotlib' not in sys.modules, 'matplotlib loaded'\n"
              "from fashionlab.study import run_study\n"
              "assert 'matplotlib' in sys.modules, 'run_study without its figures?'\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_dense_models_give_the_same_numbers_on_any_number_of_threads(tiny_idx_dir: Path,
                                                                     tmp_path: Path):
    # What lets a dense stack follow the free cores epoch by epoch (hardware.CpuShare).
    path = tmp_path / "dense.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, final=False))
    spec = load_study(path)
    rows = []
    cpus = os.cpu_count() or 1
    for threads in sorted({1, 2, 3, cpus + 1}):
        shown = Recorder()
        result = run_study(spec, run_dir=tmp_path / f"t{threads}", progress=shown,
                           threads=threads)
        assert result.threads == threads
        rows.append(_epoch_rows(tmp_path / f"t{threads}", result.run.id))
        # More threads than CPUs is allowed (a run planned on a larger machine keeps its
        # threads), and said: they take turns.
        note = (f"{threads} threads on this machine's {cpus} CPUs: they take turns, which is "
                "slower (the numbers are the same); --threads sets fewer for a new run")
        assert result.notes == ([note] if threads > cpus else [])
        assert (("log", note) in shown.calls) == (threads > cpus)
    assert all(other == rows[0] for other in rows[1:])


def _job(flops: float) -> Job:
    return Job("cv", ("a/fold-0",), "a", 4, flops)


def test_auto_workers_start_processes_only_for_big_independent_work():
    cpu = torch.device("cpu")
    big = MIN_PARALLEL_FLOPS
    assert auto_workers([_job(big)], cpu) == 1  # one job: nothing to run beside it
    assert auto_workers([_job(big / 10)] * 3, cpu) == 1  # too small to pay for start-up
    cores = os.cpu_count() or 1
    assert auto_workers([_job(big)] * 3, cpu) == min(3, cores)
    assert auto_workers([_job(big)] * (cores + 5), cpu) == cores


def test_independent_jobs_are_the_cv_stacks_and_final_models_largest_first(
        study_file: Path, tmp_path: Path):
    spec = load_study(study_file)
    result = run_study(spec, run_dir=tmp_path, progress=False, workers=1)
    store = Store.open(tmp_path)
    folds = make_folds(len(load_study_data(spec).train), spec.cv, seed=spec.seed)
    ctx = RunContext(store, result.run, spec, result.output_dir, torch.device("cpu"), Silent())
    assert independent_jobs(ctx, folds) == []
    fresh = store.create_run(kind="study", name=spec.name, fingerprint="x", seed=0,
                             config={}, environment={}, output_root=tmp_path)
    ctx = RunContext(store, fresh, spec, tmp_path / fresh.id, torch.device("cpu"), Silent())
    jobs = independent_jobs(ctx, folds)
    assert {job.kind for job in jobs} == {"cv", "final"}
    assert [job.flops for job in jobs] == sorted((job.flops for job in jobs), reverse=True)
    cv_keys = [key for job in jobs if job.kind == "cv" for key in job.names]
    assert sorted(cv_keys) == sorted(k for c in result.candidates for k in c.keys)
    store.close()


def test_a_finished_study_is_not_rerun_unless_fresh(study_file: Path, tmp_path: Path):
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    epochs = Store.open(tmp_path).epochs(first.run.id)
    stored = Store.open(tmp_path).run(first.run.id)
    again = run_study(spec, run_dir=tmp_path, progress=False)
    assert again.run.id == first.run.id and again.best == first.best
    assert again.retrain.test_accuracy == first.retrain.test_accuracy
    # Nothing retrained: every row, its timing included, is as it was (repr: NaN equals NaN),
    # and the run itself was not written to (shown, not claimed).
    assert repr(Store.open(tmp_path).epochs(first.run.id)) == repr(epochs)
    assert Store.open(tmp_path).run(first.run.id) == stored
    assert again.wall_seconds == first.wall_seconds  # the run's, not the showing's
    fresh = run_study(spec, run_dir=tmp_path, progress=False, fresh=True)
    assert fresh.run.id != first.run.id


def test_a_second_thread_on_a_running_study_is_told_it_is_this_process(study_file: Path,
                                                                        tmp_path: Path):
    # (It was told "being trained by another process (pid <its own pid> ...)".)
    spec = load_study(study_file)
    told: list[BaseException] = []

    def second() -> None:
        try:
            run_study(spec, run_dir=tmp_path, progress=False, workers=1)
        except ConfigError as error:
            told.append(error)

    def start_second(key: str, epoch: int) -> None:  # while the first is at its first epoch
        if not told:
            thread = threading.Thread(target=second)
            thread.start()
            thread.join(timeout=300)

    run_study(spec, run_dir=tmp_path, progress=OnEpoch(start_second), workers=1)
    assert len(told) == 1
    assert re.fullmatch(r"run \S+ of this study is being trained by this process \(another "
                        r"thread, or a call still running\): one run_study per run at a time; "
                        r"wait for it, or pass fresh=True for a new run", str(told[0]))
    assert run_study(spec, run_dir=tmp_path, progress=False).already_finished  # the first's


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from fashionlab.config import load_study, study_from_dict
    from fashionlab.progress import Silent
    from fashionlab.store import Store
    from fashionlab.study import run_study

    study, run_dir, mode, target_key, target_epoch = sys.argv[1:6]
    target_epoch = int(target_epoch)

    class Killer(Silent):  # a progress reporter: it hears of each epoch once it is stored
        def epoch(self, label, epoch, metrics):
            if mode == "after-commit" and target_key in metrics and epoch == target_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "before-commit":  # die with the checkpoint written but the epoch not stored
        record = Store.record_epochs
        calls = {"n": 0}
        def dying_record(self, run_id, rows, updates=None, **options):
            calls["n"] += 1
            if calls["n"] == target_epoch:
                os.kill(os.getpid(), signal.SIGKILL)
            return record(self, run_id, rows, updates, **options)
        Store.record_epochs = dying_record

    run_study(load_study(study), run_dir=run_dir, progress=Killer())
""")


@pytest.mark.parametrize("mode", ["after-commit", "before-commit"])
def test_a_killed_study_resumes_to_the_uninterrupted_numbers(
        study_file: Path, tmp_path: Path, mode: str):
    spec = load_study(study_file)
    reference = run_study(spec, run_dir=tmp_path / "reference", progress=False)
    expected = _epoch_rows(tmp_path / "reference", reference.run.id)

    rng = random.Random()  # a different moment each time; printed on failure
    key, epoch = rng.choice(sorted(expected))
    if mode == "before-commit":
        epoch = rng.randint(1, 12)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    run_dir = tmp_path / "interrupted"
    killed = subprocess.run([sys.executable, str(script), str(study_file), str(run_dir), mode,
                             key, str(epoch)], capture_output=True, text=True, timeout=300,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, (key, epoch, killed.stderr[-2000:])

    store = Store.open(run_dir)
    (interrupted,) = store.runs()
    assert interrupted.state == "interrupted"
    stored_before = _epoch_rows(run_dir, interrupted.id)
    store.close()

    resumed = run_study(spec, run_dir=run_dir, progress=False)
    assert resumed.run.id == interrupted.id  # the same run, continued
    rows = _epoch_rows(run_dir, resumed.run.id)
    assert rows == expected, (mode, key, epoch)
    for k, values in stored_before.items():  # what was stored before the kill is untouched
        assert rows[k] == values
    assert resumed.best == reference.best
    assert resumed.retrain.test_accuracy == reference.retrain.test_accuracy


def test_a_stop_is_what_is_said_when_the_store_cannot_be_written_after_it(
        study_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stop while the database server hangs: the cleanup's writes fail too (after their
    connect timeout), and the stop, not their StoreError, is what comes out (`stopped by
    SIGINT`, not `error: cannot write to the store`)."""
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    def unreachable(*args: object, **kwargs: object) -> None:
        raise StoreError("cannot write to the store postgresql://db/x: timeout expired")

    monkeypatch.setattr(Store, "end_run", unreachable)
    with pytest.raises(KeyboardInterrupt):
        run_study(load_study(study_file), run_dir=tmp_path, progress=OnEpoch(stop))
    monkeypatch.setattr(study_run, "release_claims", unreachable)
    with pytest.raises(KeyboardInterrupt):
        run_study(load_study(study_file), run_dir=tmp_path / "other", progress=OnEpoch(stop))


def test_a_creator_stopped_while_another_machine_trains_leaves_the_run_running(
        study_file: Path, tmp_path: Path):
    """Ctrl-C in the process that created a shared run, while another machine holds one of
    its jobs: its own jobs go back, and the run stays running (its row names no process; the
    next of the others to beat takes it), not interrupted, which `runs delete` would delete
    under the others."""
    from fashionlab.jobs import claim_job, job_rows
    from fashionlab.runs import RunError, delete_run
    from fashionlab.schema import jobs

    run_dir = tmp_path / "runs"

    def another_machine_claims_then_stop(key: str, epoch: int) -> None:
        if epoch != 2:
            return
        store = Store.open(run_dir)
        (run,) = store.runs()
        pending = next(k for k, job in job_rows(store, run.id).items()
                       if job.status == "pending")
        assert claim_job(store, run.id, pending, by="machine b's command") is not None
        with store.engine.begin() as conn:
            conn.execute(jobs.update().where((jobs.c.run_id == run.id) & (jobs.c.key == pending))
                         .values(host="machine-b", heartbeat=time.time()))
        store.close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_study(load_study(study_file), run_dir=run_dir,
                  progress=OnEpoch(another_machine_claims_then_stop))
    store = Store.open(run_dir)
    (run,) = store.runs()
    assert run.state == "running" and run.pid is None
    # Said so: the run goes on there, and is not "kept" to "resume"
    assert isinstance(stopped.value, stops.LeftRunning)
    assert f"run {run.id} goes on in the other processes" in "".join(stopped.value.__notes__)
    with pytest.raises(RunError, match="is running"):
        delete_run(store, run.id)
    store.close()

    # Nobody else trains it: a stop leaves it interrupted, as before.

    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_study(load_study(study_file), run_dir=tmp_path / "alone", progress=OnEpoch(stop))
    assert Store.open(tmp_path / "alone").runs()[0].state == "interrupted"
    assert not isinstance(stopped.value, stops.LeftRunning)
    assert "is kept; run_study with the same study" in "".join(stopped.value.__notes__)


def test_a_process_that_leaves_a_shared_run_to_its_writer_leaves_no_empty_folder(
        tmp_path: Path):
    """Its checkpoints are in the database (the writer removes them there): the folder of the
    run in its own run directory goes with them where nothing else is in it; a model it saved
    stays, and the folder with it."""
    closed = []
    shared = SimpleNamespace(shared=True, close=lambda: closed.append(True))
    empty, kept = tmp_path / "a" / "RUN", tmp_path / "b" / "RUN"
    for folder in (empty, kept):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "stack.pt").write_bytes(b"x")
    (kept / "models").mkdir()
    (kept / "models" / "model.json").write_text("{}")
    study_run._leave(shared, empty)
    study_run._leave(shared, kept)
    assert not empty.exists() and empty.parent.exists()
    assert sorted(p.name for p in kept.iterdir()) == ["models"]
    assert closed == [True, True]


def test_a_ctrl_c_that_a_finaliser_swallows_still_stops_run_study(
        study_file: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder):
    """A notebook's interrupt raises KeyboardInterrupt wherever the main thread is; inside a
    finaliser (a weakref callback of the database driver, a `__del__`) Python prints
    "Exception ignored" and carries on, and the study trained on to its end."""
    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler interrupts this, inside the finaliser

    def swallowed(key: str, epoch: int) -> None:
        if epoch == 1:
            Finalised()  # dropped at once

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_study(load_study(study_file), run_dir=tmp_path, progress=OnEpoch(swallowed))
    (run,) = Store.open(tmp_path).runs()
    assert run.state == "interrupted"  # raised again by the next step: not trained to the end
    if sys.version_info >= (3, 11):
        assert "is kept; run_study with the same study" in "".join(stopped.value.__notes__)
    assert not [w for w in recwarn if "Exception ignored" in str(w.message)]  # not shown
    assert signal.getsignal(signal.SIGINT) is before and not stops.received  # as it was
    assert run_study(load_study(study_file), run_dir=tmp_path, progress=False).run.id == run.id


def test_a_resumed_run_says_its_wall_time_is_the_last_processs_only(
        study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    spec = load_study(study_file)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_study(spec, run_dir=tmp_path, progress=OnEpoch(stop))
    (stored,) = Store.open(tmp_path).runs()
    if sys.version_info >= (3, 11):  # said under the traceback, as the command says it
        assert stopped.value.__notes__ == [
            (f"fashionlab: run {stored.id} is kept; run_study with the same study and run "
             "directory resumes it")]
    code, out, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path), "-q")
    assert code == 0, err
    note = "in the process that resumed the run (the earlier processes not counted)"
    assert note in out.replace("\n", " ")
    (run,) = Store.open(tmp_path).runs()
    assert run.summary["resumed"] is True
    assert note in (tmp_path / run.id / "report.html").read_text()
    shown = run_study(spec, run_dir=tmp_path, progress=False)  # read back: still says so
    assert shown.resumed and note in (tmp_path / run.id / "results.md").read_text()

    fresh = run_study(spec, run_dir=tmp_path / "fresh", progress=False)
    assert not fresh.resumed and "resumed" not in (fresh.output_dir / "results.md").read_text()


def test_a_diverging_candidate_is_reported_and_the_study_goes_on(tiny_idx_dir: Path,
                                                                  tmp_path: Path):
    candidates = """
[[candidates]]
name = "fine"
layers = [{ units = 16 }]

[[candidates]]
name = "exploding"
layers = [{ units = 16, l2 = 1e38 }]
"""
    path = tmp_path / "nan.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, candidates=candidates, final=False))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    exploding = next(c for c in result.candidates if c.name == "exploding")
    assert exploding.failed and "diverged" in exploding.failures[0]
    # no epoch with a finite val_loss: no score either (not epoch 1's accuracy, with a CI)
    assert exploding.result_epochs.tolist() == [0, 0, 0]
    assert all(math.isnan(v) for v in [*exploding.val_loss, *exploding.val_accuracy])
    table = json.loads((result.output_dir / "results.json").read_text())["table"]
    row = next(r for r in table if r["model"] == "exploding")
    assert row["val_accuracy_mean"] is None and row["ci_low"] is None
    assert result.best == "fine" and result.retrain is not None
    # Its verdict cell says why it has none (it was blank, with a mean of the other folds
    # where only some diverged), and Holm does not count it.
    assert row["vs_best"] == "not compared (3 of 3 folds diverged)"
    assert [(c.name, c.is_best, c.not_worse) for c in result.comparisons] == [
        ("fine", True, True), ("exploding", False, None)]
    assert "diverged" in (result.output_dir / "results.md").read_text()


def test_a_candidate_whose_folds_all_diverged_claims_no_epoch(tiny_idx_dir: Path,
                                                             tmp_path: Path):
    # Its folds diverge at epoch 3: the warning fired on the two epochs before, and the row
    # said "1 (warning)" beside numbers it has not.
    candidates = """
[[candidates]]
name = "fine"
layers = [{ units = 16 }]

[[candidates]]
name = "diverging"
layers = [{ units = 16, l2 = 0.5 }]
train = { optimizer = "sgd", learning_rate = 10.0 }
"""
    path = tmp_path / "diverging.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=8, candidates=candidates, final=False))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False, workers=1)
    diverging = next(c for c in result.candidates if c.name == "diverging")
    assert diverging.warning.fired and diverging.result_epochs.tolist() == [0, 0, 0]
    assert next(r for r in table_rows(result) if r.model == "diverging").epoch == "-"


def test_the_longest_names_name_their_files(tiny_idx_dir: Path, tmp_path: Path):
    longest = ("L" * 100, "\u00e9" * 100)  # 100 characters; 200 bytes as a file name
    candidates = "".join(f'\n[[candidates]]\nname = "{name}"\nlayers = [{{ units = 8 }}]\n'
                         for name in longest)
    path = tmp_path / "long.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, name="N" * 100, epochs=2, folds=2,
                                    candidates=candidates, final=False))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert result.run.state == "finished"
    assert {c.name for c in result.candidates} == set(longest)
    figures = {p.name for p in (result.output_dir / "figures").iterdir()}
    assert {f"curves-{name}.png" for name in longest} <= figures


def test_names_and_paths_are_printed_as_text_not_styles(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "markup.toml"  # rich would read [/] as a closing tag, [v2] as a style
    path.write_text(tiny_study_toml(tiny_idx_dir, name="markup [/] [bold]", epochs=1, folds=2,
                                    final=False))
    run_dir = tmp_path / "runs[v2]"
    code, out, err = run_cli(capsys, "study", str(path), "--run-dir", str(run_dir), "-q")
    assert code == 0, err
    assert "markup [/] [bold]: run " in out and f"results in {run_dir}" in out


def test_results_md_shows_names_as_written(tiny_idx_dir: Path, tmp_path: Path):
    from markdown_it import MarkdownIt  # rich's Markdown parser

    names = ["<script>alert(1)</script>", r"pipe | star * `tick` _u_ [l](x) x\|y",
             "1. ~~struck~~", "# heading"]
    candidates = "".join(f"\n[[candidates]]\nname = '{name}'\nlayers = [{{ units = 8 }}]\n"
                         for name in names)
    path = tmp_path / "names.toml"
    # Early stopping: every candidate gets a note line, "- NAME: early stopping ...".
    path.write_text(tiny_study_toml(tiny_idx_dir, name="a *b*", epochs=1, folds=2,
                                    candidates=candidates, final=False,
                                    train="early_stopping = { patience = 1 }"))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(
        (result.output_dir / "results.md").read_text())
    assert "<h1>a *b*: results</h1>" in html
    cells = re.findall(r"<td>(.*?)</td>", html)
    items = re.findall(r"<li>(.*?): early stopping", html)
    for name in names:
        assert html_escape(name, quote=False) in cells, (name, cells)
        assert html_escape(name, quote=False) in items, (name, items)
    assert not re.search(r"<(script|em|a|s|del|ol|h2)\b", html)
    assert html.count("<code>") == 1  # the run id


def test_a_final_model_that_stops_early_is_tested_and_saved_at_its_best_epoch(
        tiny_idx_dir: Path, tmp_path: Path):
    from fashionlab.artifacts import load_model  # (the models a study saves)
    from fashionlab.evaluate import evaluate

    path = tmp_path / "es.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, final=False, candidates="""
[[final]]
name = "stops"
layers = [{ units = 32 }]
train = { epochs = 12, early_stopping = { monitor = "val_accuracy", patience = 1 } }
"""))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    final = result.final[0]
    best = int(final.result_epochs[0])
    assert best < final.trained_epochs  # it kept an earlier epoch than its last
    saved = load_model(final.model_dir)
    assert saved.metadata["weights_epoch"] == best < saved.metadata["epochs"]
    assert evaluate(saved, load_fashion_mnist(tiny_idx_dir, verify=False).test).accuracy \
        == pytest.approx(final.test_accuracy, abs=1e-6)
    row = next(r for r in table_rows(result) if r.model == "stops")
    assert row.note.startswith(f"validated on the test set; test accuracy of epoch {best}'s "
                               "weights (early stopping's best)")


def test_a_study_tested_on_part_of_the_test_set_says_so(tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "part.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=2, folds=2, candidates="""
[[candidates]]
name = "small"
layers = [{ units = 8 }]
""").replace("verify = false", "verify = false\ntest_limit = 40"))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    rows = {row.kind: row for row in table_rows(result)}
    notes = {kind: row.note for kind, row in rows.items()}
    assert notes["retrain"].endswith("tested on the first 40 test images")
    for kind in ("retrain", "final"):  # the test accuracy's interval is of 40 images
        row = rows[kind]
        assert (row.test_ci_low, row.test_ci_high) == proportion_ci(row.test_accuracy, 40)
        assert row.test_ci_high - row.test_ci_low > 0.1  # 40 images say little
    assert math.isnan(rows["cv"].test_ci_low)  # nothing tested
    shown = dict(zip(HEADERS, display_rows([rows["retrain"]])[0], strict=True))["test acc %"]
    low, high = (f"{100 * v:.1f}" for v in proportion_ci(rows["retrain"].test_accuracy, 40))
    assert shown == f"{100 * rows['retrain'].test_accuracy:.2f} [{low}, {high}]"
    csv_header = (result.output_dir / "results.csv").read_text().splitlines()[0]
    assert csv_header.endswith(",note,test_ci_low,test_ci_high")
    # A limit above the test set's 100 images cuts nothing: the test set it is.
    path.write_text(path.read_text().replace("test_limit = 40", "test_limit = 1000"))
    whole = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert next(r for r in table_rows(whole) if r.kind == "retrain").note.endswith(
        "tested on the test set")
    assert notes["final"] == ("validated on the first 40 test images; test accuracy after the "
                              "last epoch")


def test_test_time_flips_of_a_model_that_never_saw_one_are_noted(tiny_idx_dir: Path,
                                                                   tmp_path: Path):
    candidates = """
[[candidates]]
name = "plain"
layers = [{ units = 8 }]

[[candidates]]
name = "mirrored"
layers = [{ units = 8 }]
tta = "flip"

[[candidates]]
name = "trained on flips"
layers = [{ units = 8 }]
tta = "flip-shift"
train = { augment = { flip = true } }
"""
    path = tmp_path / "views.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, folds=2, final=False,
                                    candidates=candidates))
    recorder = Recorder()
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=recorder)
    said = ("'mirrored': tta averages mirrored images, which this model never trained on "
            "(augment.flip is off): expect a lower score than without tta")
    assert result.notes == [said] and ("log", said) in recorder.calls


def test_what_a_killed_run_left_half_written_is_removed_when_it_runs_again(
        tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, folds=2, final=False))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    dead = dead_pid()
    out = result.output_dir
    left = [out / f".results.csv.{dead}.tmp", out / "figures" / f".samples.png.{dead}.tmp",
            out / "models" / f".small.{dead}.tmp"]
    for path_left in left[:2]:
        path_left.write_text("half")
    left[2].mkdir()
    again = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert again.run.id == result.run.id and not any(p.exists() for p in left)


@pytest.mark.parametrize("command", ["study", "search"])
@pytest.mark.parametrize(("directory", "says"), [
    ("nowhere", "data.directory: {}: no such folder"),
    ("a-file", "data.directory: {}: a file, not a folder"),
    ("empty", "data.directory: {}"),  # a folder without the dataset: and the missing file
    # (each named with the study file: found only once it runs)
])
def test_data_that_cannot_be_read_leaves_no_store(command: str, directory: str, says: str,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty").mkdir()
    path = tmp_path / "nodata.toml"
    text = tiny_study_toml(tmp_path / directory, final=False)
    if command == "search":
        text += ("\n[search]\nn_trials = 2\n[search.space]\n"
                 "learning_rate = { choices = [0.001, 0.01] }\n")
    path.write_text(text)
    # (a shortened, reseeded study is still read from its file)
    shortened = ["--quick", "--seed", "3"] if command == "study" else ["--quick"]
    for options in ([], shortened):
        code, _, err = run_cli(capsys, command, str(path), "--run-dir", str(tmp_path / "runs"),
                               *options)
        assert_one_line_error(code, err, f"error: {path}: " + says.format(tmp_path / directory))
    if directory == "empty":
        assert "file not found" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["study", "search"])
def test_more_folds_than_images_leaves_no_store(command: str, tiny_idx_dir: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "folds.toml"
    text = tiny_study_toml(tiny_idx_dir, folds=1000, final=False)  # 300 training images
    if command == "search":
        text += ("\n[search]\nn_trials = 2\n[search.space]\n"
                 "learning_rate = { choices = [0.001, 0.01] }\n")
    path.write_text(text)
    code, _, err = run_cli(capsys, command, str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, f"error: {path}: cv.n_splits: 1000 folds need at least "
                          "1000 training images (the data has 300)")
    assert not (tmp_path / "runs").exists()


def test_the_study_command_writes_the_table(study_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path),
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["best"] in {"small", "small L2", "two layers"}
    assert summary["table"][0]["model"] == "random guess"
    (results,) = tmp_path.glob("*/results.json")
    assert summary == json.loads(results.read_text())  # the same numbers, peak memory too
    code, out, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path),
                             "--fresh")
    assert code == 0 and "random guess" in out and "(retrained)" in out
    assert "had finished" not in out
    code, out, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path))
    assert code == 0 and "random guess" in out  # the fresh run, read back: said so
    assert "had finished: shown from the store, nothing trained; --fresh runs the study " \
        "again" in " ".join(out.split())


def test_quick_variant_of_the_seed_study_is_small():
    from fashionlab.config import quick_variant

    quick = quick_variant(load_study("seed"))
    assert quick.data.train_limit <= 6000 and all(c.train.epochs <= 8 for c in quick.candidates)
    assert os.environ.get("FASHIONLAB_DATA") is None


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_workers_must_be_a_positive_number_or_auto(capsys: pytest.CaptureFixture[str],
                                                   study_file: Path, tmp_path: Path, value: str):
    code, _, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path),
                           "--workers", value)
    assert_one_line_error(code, err, "--workers", f"'{value}'")
    assert not (tmp_path / "fashionlab.db").exists()  # nothing started


def test_a_full_disk_while_writing_the_results_is_one_line_and_resumable(
        study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch):
    import errno

    import fashionlab.results as results_module

    real = results_module.write_text_atomic

    def full(path: Path, text: str) -> None:
        if path.name == "results.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(results_module, "write_text_atomic", full)
    code, _, err = run_cli(capsys, "study", str(study_file), "--run-dir", str(tmp_path),
                           "--json")  # no progress bars on stderr
    assert_one_line_error(code, err, "results.json: cannot write the run's results",
                          "No space left on device", "run the same command again")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    (run,) = Store.open(tmp_path).runs()
    assert run.state == "interrupted"  # resumable, from this very process too
    monkeypatch.setattr(results_module, "write_text_atomic", real)
    again = run_study(load_study(study_file), run_dir=tmp_path, progress=False)
    assert again.run.id == run.id and again.run.state == "finished"
    assert (again.output_dir / "results.json").exists()


def test_a_model_saved_but_not_scored_before_a_kill_is_trained_again(study_file: Path,
                                                                       tmp_path: Path):
    # The window between saving a final (or retrained) model and storing its test scores.
    import sqlalchemy as sa

    from fashionlab import schema as schema_module

    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    store = Store.open(tmp_path)
    with store.engine.begin() as conn:
        conn.execute(sa.update(schema_module.models).values(test_loss=None, test_accuracy=None))
        conn.execute(sa.update(schema_module.runs).values(status="interrupted"))
    store.close()
    again = run_study(spec, run_dir=tmp_path, progress=False)
    assert again.run.id == first.run.id
    assert again.final[0].test_accuracy == first.final[0].test_accuracy
    assert again.retrain.test_accuracy == first.retrain.test_accuracy
    assert not math.isnan(again.final[0].test_accuracy)


def test_a_run_killed_just_after_it_finished_is_tidied_when_shown(study_file: Path,
                                                                   tmp_path: Path):
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    (first.output_dir / "report.html").unlink()  # killed before the report and the clean-up
    (first.output_dir / "checkpoints").mkdir()
    (first.output_dir / "checkpoints" / "x.pt").write_bytes(b"left over")
    stored = Store.open(tmp_path).run(first.run.id)
    run_study(spec, run_dir=tmp_path, progress=False)
    assert (first.output_dir / "report.html").exists()
    assert not (first.output_dir / "checkpoints").exists()
    assert Store.open(tmp_path).run(first.run.id) == stored  # the store only read


def test_a_finished_run_is_shown_where_its_results_are(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # Machine b only trained jobs of a run that machine a finished and wrote: b's folder of
    # the run holds no results (here b's store is a copy of the shared one).
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, folds=2, final=False))
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    first = run_study(load_study(path), run_dir=a, progress=False)
    (b / first.run.id / "models").mkdir(parents=True)
    shutil.copy(a / DB_NAME, b / DB_NAME)
    code, out, err = run_cli(capsys, "study", str(path), "--run-dir", str(b))
    assert code == 0, err
    assert f"results in {first.output_dir}\n" in out
    assert not (b / first.run.id / "report.html").exists()  # no report of a folder without
    assert not any((b / first.run.id / "models").iterdir())  # shown: nothing trained again
    # Written on another machine: said so, and nothing is created here.
    elsewhere = tmp_path / "only-on-machine-a" / first.run.id
    with sa.create_engine(f"sqlite:///{b / DB_NAME}").begin() as conn:
        conn.execute(sa.text("UPDATE fl_runs SET output_dir = :d, host = 'machine-a'"),
                     {"d": str(elsewhere)})
    code, out, err = run_cli(capsys, "study", str(path), "--run-dir", str(b))
    assert code == 0, err
    assert f"results in {elsewhere} on machine-a\n" in out
    assert not elsewhere.parent.exists()
    assert not any((b / first.run.id / "models").iterdir())
    models = Store.open(b).models(first.run.id)
    assert models == Store.open(a).models(first.run.id)  # the store only read


def test_a_one_cycle_candidate_is_read_and_retrained_at_the_end_of_its_schedule(
        tiny_idx_dir: Path, tmp_path: Path):
    """The warning (made for a constant learning rate) does not choose the epoch of a
    schedule planned over the epochs: its folds are read at the schedule's last epoch, and the
    best is retrained for the whole schedule, not for a compressed one."""
    candidates = """
[[candidates]]
name = "one-cycle"
layers = [{ units = 16 }]
train = { optimizer = "adamw", learning_rate = 0.01, schedule = "onecycle" }
"""
    path = tmp_path / "onecycle.toml"
    # A warning that fires early (a val_loss that does not halve in the next 2 epochs).
    path.write_text(tiny_study_toml(tiny_idx_dir, candidates=candidates, final=False,
                                    epochs=6, patience=2).replace("min_delta = 0.02",
                                                                  "min_delta = 0.5"))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    (candidate,) = result.candidates
    assert candidate.warning.fired and candidate.warning.epoch < 6  # what it would read
    assert list(candidate.result_epochs) == [6, 6, 6]
    assert list(candidate.val_accuracy) == list(candidate.curves["val_accuracy"][:, -1])
    assert result.retrain is not None and result.retrain.epochs == 6
    assert len(result.retrain.history) == 6
    assert "6 (schedule end)" in (result.output_dir / "results.md").read_text()
    # Its curves mark the epoch it is read at, not the warning; so do the report and the JSON.
    assert candidate.schedule_end == 6
    figure = result.figure("one-cycle")
    labels = [text.get_text() for ax in figure.axes for text in ax.get_legend().get_texts()]
    assert "read at the schedule's end (epoch 6)" in labels
    assert not any("overfitting warning" in label for label in labels)
    summary = json.loads((result.output_dir / "results.json").read_text())
    assert summary["candidates"][0]["schedule_end"] == 6
    assert "read at the end of its schedule, epoch 6" in \
        (result.output_dir / "report.html").read_text()


def test_repeated_cross_validation_curves_say_folds_times_repeats(tiny_idx_dir: Path,
                                                                  tmp_path: Path):
    path = tmp_path / "repeated.toml"
    candidates = '[[candidates]]\nname = "small"\nlayers = [{ units = 8 }]\n'
    path.write_text(tiny_study_toml(tiny_idx_dir, candidates=candidates, final=False, epochs=2,
                                    folds=2).replace(
        "n_splits = 2", 'n_splits = 2\nstrategy = "shuffled"\nrepeats = 3'))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert len(result.candidates[0].curves["loss"]) == 6
    assert result.figure("small").get_suptitle() == "small, mean \u00b1 1 std of 2 folds x 3 repeats"


@pytest.mark.parametrize(("arguments", "message"), [
    ({"workers": 0}, "workers: expected a positive whole number or \"auto\", got 0"),
    ({"workers": 1.5}, "workers: expected a positive whole number or \"auto\", got 1.5"),
    ({"workers": "two"}, "workers: expected a positive whole number or \"auto\", got 'two'"),
    ({"threads": 0}, "threads: expected a positive whole number, got 0"),
    ({"threads": True}, "threads: expected a positive whole number, got True"),
    ({"threads": 8 * (os.cpu_count() or 1) + 1},
     (f"threads: {8 * (os.cpu_count() or 1) + 1} is more than 8 per CPU of this machine's "
      f"{os.cpu_count() or 1} (at most {8 * (os.cpu_count() or 1)})")),
    ({"fresh": "no"}, "fresh: expected True or False, got 'no'"),
    ({"progress": "yes"}, ("progress: expected True, False or a fashionlab.progress.Reporter "
                          "(methods start, epoch, finish, log); 'yes' has no start, epoch, "
                          "finish, log")),
    ({"progress": SimpleNamespace(epoch=print)},
     ("progress: expected True, False or a fashionlab.progress.Reporter (methods start, epoch, "
     "finish, log); namespace(epoch=<built-in function print>) has no start, finish, log")),
    ({"progress": Silent}, ("progress: expected True, False or a fashionlab.progress.Reporter "
                           "object, got the class Silent (call it: Silent())")),
    ({"dataset": "x"}, ("dataset: expected a fashionlab.data.Dataset (from load_fashion_mnist) "
                       "or None, got str")),
    ({"run_dir": 123}, "run_dir: expected a folder's path, got int"),
])
def test_run_studys_arguments_are_checked_before_any_run_exists(
        study_file: Path, tmp_path: Path, arguments: dict, message: str):
    arguments = {"run_dir": tmp_path / "runs", "progress": False, **arguments}
    with pytest.raises(ConfigError) as error:
        run_study(load_study(study_file), **arguments)
    assert str(error.value) == message
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="spec: expected a StudySpec .*, got str"):
        run_study(str(study_file), run_dir=tmp_path / "runs")  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_run_directory_moved_or_copied_resumes_in_its_new_place(
        study_file: Path, tmp_path: Path, how: str):
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    spec = load_study(study_file)
    old, new = tmp_path / "old", tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, run_dir=old, progress=OnEpoch(stop))
    shutil.copytree(old, new) if how == "copied" else shutil.move(old, new)
    # The original run's folder (its database's -wal and -shm files may go when the first
    # process's connections close: SQLite's doing, not the resumed run's).
    (original,) = [p for p in old.iterdir() if p.is_dir()] if how == "copied" else [None]
    before = sorted(original.rglob("*")) if original is not None else None

    result = run_study(spec, run_dir=new, progress=False)
    run_folder = new / result.run.id
    assert result.output_dir == run_folder.resolve()
    assert Path(result.run.output_dir) == run_folder.resolve()
    assert (run_folder / "results.csv").is_file() and (run_folder / "report.html").is_file()
    assert any((run_folder / "models").iterdir())
    assert not (run_folder / "checkpoints").exists()
    if how == "moved":
        assert not old.exists()  # nothing written where the run used to be
    else:
        assert sorted(original.rglob("*")) == before  # untouched


def test_a_study_changed_after_an_interruption_says_it_starts_a_new_run(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    before = study_from_dict(tomllib.loads(tiny_study_toml(tiny_idx_dir, epochs=3)))
    with pytest.raises(KeyboardInterrupt):
        run_study(before, run_dir=tmp_path, progress=OnEpoch(stop))
    (interrupted,) = Store.open(tmp_path).runs()
    changed = study_from_dict(tomllib.loads(tiny_study_toml(tiny_idx_dir, epochs=4)))
    recorder = Recorder()
    result = run_study(changed, run_dir=tmp_path, progress=recorder)
    logs = [call[1] for call in recorder.calls if call[0] == "log"]
    assert logs[0] == (f"run {result.run.id} is a new run: the settings of study 'tiny' differ "
                       f"from those of its interrupted run {interrupted.id}, which is left as "
                       f"it is (the same settings resume it; `fashionlab runs delete "
                       f"{interrupted.id}` removes it)")
    assert result.notes == [logs[0]]  # kept with the result
    recorder = Recorder()
    run_study(changed, run_dir=tmp_path, progress=recorder)  # shown again: nothing to say
    assert not any(call[0] == "log" and "new run" in call[1] for call in recorder.calls)
    # Without progress (--json, -q) the note is still said, on stderr.
    path = tmp_path / "changed-again.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=2))
    code, out, err = run_cli(capsys, "study", str(path), "--json", "--run-dir", str(tmp_path))
    assert code == 0 and json.loads(out)
    assert f"differ from those of its interrupted run {interrupted.id}" in err


def test_a_study_renamed_after_an_interruption_names_its_interrupted_run(
        tiny_idx_dir: Path, tmp_path: Path):
    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study_from_dict(tomllib.loads(tiny_study_toml(tiny_idx_dir, epochs=3))),
                  run_dir=tmp_path, progress=OnEpoch(stop))
    (interrupted,) = Store.open(tmp_path).runs()
    renamed = study_from_dict(tomllib.loads(tiny_study_toml(tiny_idx_dir, epochs=3,
                                                            name="tiny v2")))
    result = run_study(renamed, run_dir=tmp_path, progress=False)
    assert result.notes == [
        (f"run {result.run.id} is a new run: study 'tiny v2' has the settings of the interrupted "
        f"run {interrupted.id} of study 'tiny', which is left as it is (under its old name they "
        f"resume it; `fashionlab runs delete {interrupted.id}` removes it)")]
    # Renamed and changed: another study, nothing to say.
    other = study_from_dict(tomllib.loads(tiny_study_toml(tiny_idx_dir, epochs=2, name="tiny 3")))
    assert run_study(other, run_dir=tmp_path, progress=False).notes == []


@pytest.mark.parametrize(("where", "damage"), [("here", "truncated"), ("copied", "truncated"),
                                               ("copied", "deleted")])
def test_damaged_results_of_a_finished_run_are_written_again_when_it_is_shown(
        study_file: Path, tmp_path: Path, where: str, damage: str):
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path / "runs", progress=False)
    written = {name: (first.output_dir / name).read_bytes()
               for name in ("results.md", "results.csv", "results.json")}
    run_dir = tmp_path / "runs"
    if where == "copied":  # the store names the original's folder, intact
        run_dir = tmp_path / "copy"
        shutil.copytree(tmp_path / "runs", run_dir)
    folder = (run_dir / first.run.id).resolve()
    if damage == "truncated":
        with open(folder / "results.json", "r+b") as damaged:
            damaged.truncate(100)  # a disk that filled up, a bad copy
        (folder / "results.md").unlink()
    else:
        (folder / "results.json").unlink()
        (folder / "results.csv").unlink()
    stored = Store.open(run_dir).run(first.run.id)
    again = run_study(spec, run_dir=run_dir, progress=False)
    assert again.output_dir == folder
    assert again.notes == [(f"{folder}: the results were missing or damaged and are "
                           "written again from the store")]
    for name, content in written.items():  # as they were (a copy's naming its own models)
        expected = content.replace(str(first.output_dir).encode(), str(folder).encode())
        assert (folder / name).read_bytes() == expected, name
    assert Store.open(run_dir).run(first.run.id) == stored  # the store only read
    assert run_study(spec, run_dir=run_dir, progress=False).notes == []  # whole again


def test_results_written_again_for_an_older_run_agree_with_its_csv(study_file: Path,
                                                                   tmp_path: Path):
    """A run stored by an older version (the one-model CNN row's std stored as 0.0, since
    undefined) gets its results.json recomputed as its csv is, keeping the measures of the
    process that trained it."""
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    written = json.loads((first.output_dir / "results.json").read_text())
    (cnn_row,) = [row for row in written["table"] if row["model"] == "cnn"]
    assert cnn_row["val_accuracy_std"] is None and cnn_row["n"] == 1
    old = json.loads(json.dumps(written))
    for row in old["table"]:
        if row["model"] == "cnn":
            row["val_loss_std"] = row["val_accuracy_std"] = 0.0
    old["peak_rss_mb"], old["wall_seconds"] = 1234.5, 99.0
    engine = sa.create_engine(f"sqlite:///{tmp_path / DB_NAME}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE fl_runs SET summary = :s WHERE id = :id"),
                           {"s": json.dumps(old), "id": first.run.id})
    engine.dispose()
    (first.output_dir / "results.json").unlink()
    run_study(spec, run_dir=tmp_path, progress=False)
    again = json.loads((first.output_dir / "results.json").read_text())
    (cnn_row,) = [row for row in again["table"] if row["model"] == "cnn"]
    assert cnn_row["val_loss_std"] is None and cnn_row["val_accuracy_std"] is None
    assert (again["peak_rss_mb"], again["wall_seconds"]) == (1234.5, 99.0)
    assert {k: v for k, v in again.items() if k not in ("peak_rss_mb", "wall_seconds")} == \
        {k: v for k, v in written.items() if k not in ("peak_rss_mb", "wall_seconds")}


def test_a_deleted_model_of_a_finished_run_is_said_when_it_is_shown(study_file: Path,
                                                                    tmp_path: Path):
    spec = load_study(study_file)
    first = run_study(spec, run_dir=tmp_path, progress=False)
    (cnn,) = [c.model_dir for c in first.final]
    shutil.rmtree(cnn)  # weights are nowhere else: the store holds the scores only
    again = run_study(spec, run_dir=tmp_path, progress=False)
    assert again.notes == [(f"{cnn}: not found (deleted, or saved on another machine); the "
                            "store keeps no weights: --fresh (fresh=True) trains the study "
                            "again, as a new run")]
    assert again.final[0].test_accuracy == first.final[0].test_accuracy  # read back
    assert not cnn.exists()
    cnn.mkdir()  # a folder without its weights file says the same
    assert run_study(spec, run_dir=tmp_path, progress=False).notes == again.notes
