"""Jobs of a run shared by several processes: claims, their grace period, lost claims, and
whole studies trained by two processes on one PostgreSQL store (one of them killed)."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import OnEpoch, assert_one_line_error, run_cli, tiny_search_toml, tiny_study_toml

from fashionlab import stops
from fashionlab.config import load_study
from fashionlab.jobs import ClaimLost, claim_job, job_rows, register_jobs, release_claims
from fashionlab.runs import RunError, delete_run
from fashionlab.schema import epochs, jobs, runs
from fashionlab.store import CLAIM_STALE_AFTER, Store, database_url
from fashionlab.study import run_study

# --------------------------------------------------------------------------------------------
# Claims


def _store_with_jobs(tmp_path: Path) -> tuple[Store, str]:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    run = store.create_run(kind="study", name="s", fingerprint="f" * 32, seed=1, config={},
                           environment={})
    store.register_models(run.id, [{"key": "m", "candidate": "c", "role": "cv",
                                    "epochs_planned": 2}])
    assert register_jobs(store, run.id, [("a", "job a"), ("b", "job b")], threads=3) == 3
    # Registered again (another process of the run): nothing changes, the first threads hold.
    assert register_jobs(store, run.id, [("a", "job a"), ("b", "job b")], threads=5) == 3
    return store, run.id


def _set_claim(store: Store, run_id: str, key: str, **values: object) -> None:
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where((jobs.c.run_id == run_id) & (jobs.c.key == key))
                     .values(**values))


def test_a_job_is_claimed_once_and_a_silent_claim_of_another_machine_after_the_grace(
        tmp_path: Path):
    store, run_id = _store_with_jobs(tmp_path)
    first = claim_job(store, run_id, "a", by="me", grace=60)
    assert first is not None and first.token == 1 and first.threads == 3
    assert claim_job(store, run_id, "a", by="other", grace=60) is None  # this process lives

    # Held by a process of another machine, silent for 10 s: taken over only once the grace
    # period is shorter than that.
    _set_claim(store, run_id, "a", host="a-machine-gone", heartbeat=time.time() - 10)
    assert claim_job(store, run_id, "a", by="other", grace=60) is None
    second = claim_job(store, run_id, "a", by="other", grace=5)
    assert second is not None and second.token == 2
    assert job_rows(store, run_id)["a"].claimed_by == "other"

    # The first claim is lost: an epoch stored under it is refused, and nothing of it stays.
    with pytest.raises(ClaimLost):
        store.record_epochs(run_id, [("m", 1, (1.0, 0.5, 1.0, 0.5, 0.1))],
                            within=lambda conn: first.keep(conn, None))
    assert store.epochs(run_id) == []
    store.record_epochs(run_id, [("m", 1, (1.0, 0.5, 1.0, 0.5, 0.1))],
                        within=lambda conn: second.keep(conn, None))
    assert len(store.epochs(run_id)) == 1
    first.release()  # gives back nothing: the job is not its own any more
    assert job_rows(store, run_id)["a"].status == "claimed"
    second.done()
    assert job_rows(store, run_id)["a"].status == "done"
    assert claim_job(store, run_id, "a", by="me", grace=0.001) is None  # done: never again
    store.close()


def test_a_dead_process_of_this_machine_loses_its_claims_at_once(tmp_path: Path):
    store, run_id = _store_with_jobs(tmp_path)
    assert claim_job(store, run_id, "b", by="me") is not None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _set_claim(store, run_id, "b", pid=dead.pid, pid_start=None)  # fresh heartbeat, pid gone
    taken = claim_job(store, run_id, "b", by="other", grace=3600)
    assert taken is not None
    release_claims(store, run_id, by="other")  # a stopping command gives its jobs back
    assert job_rows(store, run_id)["b"].status == "pending"
    taken.release()
    store.close()


def test_a_run_whose_first_process_died_runs_while_others_hold_its_jobs(tmp_path: Path):
    store, run_id = _store_with_jobs(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store.engine.begin() as conn:  # the process that created the run was killed
        conn.execute(runs.update().values(pid=dead.pid, pid_start=None))
    assert store.run(run_id).state == "interrupted"

    claim = claim_job(store, run_id, "a", by="another command")  # a live process trains
    assert claim is not None
    assert store.run(run_id).state == "running" and store.runs()[0].state == "running"
    with pytest.raises(RunError, match="is running"):
        delete_run(store, run_id)
    # Held on another machine: while its heartbeat is fresh.
    _set_claim(store, run_id, "a", host="machine-b", heartbeat=time.time())
    assert store.run(run_id).state == "running"
    _set_claim(store, run_id, "a", heartbeat=time.time() - CLAIM_STALE_AFTER - 1)
    assert store.run(run_id).state == "interrupted"
    _set_claim(store, run_id, "a", host=socket.gethostname(), heartbeat=time.time())
    claim.done()
    assert store.run(run_id).state == "interrupted"  # nobody trains it any more
    store.close()


# --------------------------------------------------------------------------------------------
# One study, two processes, one PostgreSQL store

CNN_EPOCHS = 30  # ~0.1 s each here: long enough to be caught in the middle


def _study(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "shared.toml"
    path.write_text(tiny_study_toml(data, name="shared", epochs=6, folds=3, final=False,
                                    extra=f"""
[[final]]
name = "cnn"
conv = [{{ filters = 16, pool = 2 }}, {{ filters = 32, pool = 2 }}]
layers = [{{ units = 16 }}]
train = {{ epochs = {CNN_EPOCHS} }}
"""))
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from fashionlab.cli import main; main()",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out, err


def _rows(url: str) -> list[tuple[object, ...]]:
    """Every stored epoch of the store's one study run: (key, epoch, metrics), NaN as None."""
    store = Store(database_url(url))
    (run,) = store.runs(kind="study")
    rows = [(e.key, e.epoch, e.loss, e.accuracy, e.val_loss, e.val_accuracy)
            for e in store.epochs(run.id)]
    store.close()
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row)
            for row in rows]


def _results_csv(*run_dirs: Path) -> str:
    (path,) = [p for d in run_dirs if d.exists() for p in d.glob("*/results.csv")]
    return path.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list, str]:
    """The study run by one process on a SQLite store: (study file, its folder, epoch rows,
    results.csv)."""
    from conftest import write_tiny_idx

    tmp = tmp_path_factory.mktemp("shared")
    path = _study(tmp, write_tiny_idx(tmp / "data"))
    _finish(_cli("study", str(path), "--workers", "1", "--quiet", "--run-dir",
                 str(tmp / "reference")))
    return path, tmp, _rows(f"sqlite:///{tmp / 'reference' / 'fashionlab.db'}"), \
        _results_csv(tmp / "reference")


@functools.cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(database_url(url))


def _wait_for(condition, what: str, process: subprocess.Popen[str],
              timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended before {what}: {process.communicate()[1][-12000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _clean(url: str) -> None:
    """Empty the database of the module's server: each test starts a new run."""
    with _engine(url).begin() as conn:
        for table in ("fl_checkpoints", "fl_jobs", "fl_epochs", "fl_models", "fl_runs"):
            if sa.inspect(conn).has_table(table):
                conn.execute(sa.text(f"DELETE FROM {table}"))


def _claimed(url: str) -> list[sa.Row]:
    with _engine(url).connect() as conn:
        if not sa.inspect(conn).has_table("fl_jobs"):
            return []
        return list(conn.execute(sa.select(jobs).where(jobs.c.status == "claimed")))


def _busy_sessions(url: str) -> int:
    """Sessions of other clients inside a transaction (which a stopped process would hold)."""
    with _engine(url).connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
            "pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'")).scalar()


def _pause_at_first_claim(process: subprocess.Popen[str], url: str) -> None:
    """Pause the process (SIGSTOP) once it has claimed its first job, between two transactions
    (a paused process of this machine is alive: its job is not taken from it)."""
    while True:
        _wait_for(lambda: _claimed(url), "the process's first claim", process)
        os.kill(process.pid, signal.SIGSTOP)
        if _busy_sessions(url) == 0:
            return
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.003)


def test_two_processes_share_a_study_on_postgresql(postgres_url: str, reference,
                                                  tmp_path: Path):
    study, _, expected_rows, expected_csv = reference
    _clean(postgres_url)
    run_dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]

    def start(i: int) -> subprocess.Popen[str]:
        return _cli("study", str(study), "--store", postgres_url, "--workers", "1", "--json",
                    "--run-dir", str(run_dirs[i]))

    # Machine a starts and claims the first job (the CNN); it is paused there, between two
    # transactions, so that machine b surely finds work: the other jobs. A paused process
    # of this machine is alive: its job is not taken from it.
    a = start(0)
    _pause_at_first_claim(a, postgres_url)
    try:
        (held,) = _claimed(postgres_url)
        b = start(1)

        def b_trained() -> bool:
            with _engine(postgres_url).connect() as conn:
                return bool(conn.execute(sa.select(jobs.c.key).where(
                    (jobs.c.status == "done") & (jobs.c.claimed_by != held.claimed_by))).first())

        _wait_for(b_trained, "machine b's first job", b)
        assert [r.key for r in _claimed(postgres_url) if r.key == held.key]  # still a's
    finally:
        os.kill(a.pid, signal.SIGCONT)
    reports = [_finish(a), _finish(b)]

    outputs = [json.loads(out) for out, _ in reports]
    writers = [o for o in outputs if "candidates" in o]  # the writer prints the summary
    others = [o for o in outputs if "trained" in o]
    assert len(writers) == 1 and len(others) == 1, outputs
    with _engine(postgres_url).connect() as conn:
        done_by = {r.key: r.claimed_by for r in conn.execute(sa.select(jobs))}
        count = conn.execute(sa.select(sa.func.count()).select_from(epochs)).scalar()
    trainers = {by for key, by in done_by.items() if key != "outputs"}
    assert len(trainers) == 2, done_by  # each process trained at least one job
    assert others[0]["trained"] and others[0]["results_by"] in trainers
    assert _rows(postgres_url) == expected_rows  # the numbers of one process, exactly
    assert count == len(expected_rows)  # one row per (model, epoch)
    assert _results_csv(*run_dirs) == expected_csv
    # Whichever process created the run, its row names the one that wrote the results (a
    # creator that leaves first hands the row over: the run reads as running until the end).
    with _engine(postgres_url).connect() as conn:
        run_pid = conn.execute(sa.text("SELECT pid FROM fl_runs")).scalar()
    assert run_pid == (a.pid if "candidates" in outputs[0] else b.pid)

    # `runs show` says which machine trained which model (here one machine; then the CNN's
    # row as if another one had trained it).
    run_id = outputs[0].get("run_id") or outputs[0]["run"]
    shown, _ = _finish(_cli("runs", "show", run_id, "--store", postgres_url))
    assert f"trained: on {socket.gethostname()}" in shown
    with _engine(postgres_url).begin() as conn:
        conn.execute(sa.text("UPDATE fl_models SET host = 'machine-b' WHERE key = 'cnn/final'"))
    shown, _ = _finish(_cli("runs", "show", run_id, "--store", postgres_url))
    assert "trained: on machine-b: cnn/final" in shown.replace("\n", " "), shown


def test_a_process_stopped_while_another_waits_for_its_job_leaves_the_run_to_it(
        postgres_url: str, reference, tmp_path: Path):
    """Machine b has trained every job it could and waits for machine a's; a is stopped (and
    gives its job back). The run goes on in b, which says so: a's line says that the run goes
    on, not that it is kept, the run reads as running, and b trains a's job and writes the
    results. (A waiting process holds the claim of writing the outputs.)"""
    study, _, expected_rows, expected_csv = reference
    _clean(postgres_url)
    run_dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]

    def start(i: int) -> subprocess.Popen[str]:
        return _cli("study", str(study), "--store", postgres_url, "--workers", "1",
                    "--run-dir", str(run_dirs[i]))

    a = start(0)
    _pause_at_first_claim(a, postgres_url)  # holding the CNN
    (held,) = _claimed(postgres_url)
    b = start(1)
    try:
        _wait_for(lambda: {r.key for r in _claimed(postgres_url)} == {held.key, "outputs"},
                  "machine b to wait for the CNN", b)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    os.kill(a.pid, signal.SIGINT)
    _, err_a = a.communicate(timeout=120)
    assert a.returncode == 128 + signal.SIGINT, err_a[-3000:]
    assert "the run goes on in the other processes that train it" in err_a, err_a[-3000:]
    store = Store(database_url(postgres_url))
    (run,) = store.runs()
    assert store.run(run.id).state in ("running", "finished")  # not interrupted, ever
    store.close()

    out, _ = _finish(b)
    assert "results in" in out
    with _engine(postgres_url).connect() as conn:
        done_by = {r.key: r.claimed_by for r in conn.execute(sa.select(jobs))}
    assert done_by[held.key] == done_by["outputs"] != held.claimed_by  # b trained a's CNN
    assert _rows(postgres_url) == expected_rows
    assert _results_csv(run_dirs[1]) == expected_csv
    store = Store(database_url(postgres_url))
    assert store.run(run.id).status == "finished"
    store.close()


def test_a_killed_machines_job_is_taken_over_after_the_grace_period(
        postgres_url: str, reference, tmp_path: Path):
    study, _, expected_rows, expected_csv = reference
    _clean(postgres_url)
    grace = 12.0  # counted from machine a's last heartbeat, once b has nothing else to train
    env = {"FASHIONLAB_CLAIM_GRACE": str(grace)}
    run_dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]

    def start(i: int) -> subprocess.Popen[str]:
        return _cli("study", str(study), "--store", postgres_url, "--workers", "1",
                    "--run-dir", str(run_dirs[i]), env=env)

    def checkpoint_epoch() -> int:
        with _engine(postgres_url).connect() as conn:
            if not sa.inspect(conn).has_table("fl_checkpoints"):
                return 0
            return conn.execute(sa.text("SELECT coalesce(max(epoch), 0) FROM fl_checkpoints")
                                ).scalar()

    a = start(0)
    _wait_for(lambda: checkpoint_epoch() >= 2, "machine a's second epoch of the CNN", a)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    (lost,) = _claimed(postgres_url)
    assert lost.key == "final:cnn" and checkpoint_epoch() < CNN_EPOCHS  # in the middle of it
    # Machine a's claim as another machine would leave it: its liveness cannot be seen from
    # here, only its heartbeat. It goes on beating while b trains the other jobs (however
    # long a loaded machine makes them), then stops: b must wait out the grace period.
    def beat() -> float:
        now = time.time()
        with _engine(postgres_url).begin() as conn:
            conn.execute(jobs.update().where(jobs.c.key == lost.key).values(host="machine-a",
                                                                             heartbeat=now))
        return now

    def only_the_lost_job_left() -> bool:
        with _engine(postgres_url).connect() as conn:
            left = conn.execute(sa.select(jobs.c.key).where(jobs.c.status != "done")).scalars()
            return set(left) <= {lost.key, "outputs"}

    killed_at = beat()
    b = start(1)
    while not only_the_lost_job_left():
        assert b.poll() is None, b.communicate()[1][-3000:]
        killed_at = beat()
        time.sleep(0.5)
    out, err = _finish(b)
    with _engine(postgres_url).connect() as conn:
        job = conn.execute(sa.select(jobs).where(jobs.c.key == lost.key)).one()
        count = conn.execute(sa.select(sa.func.count()).select_from(epochs)).scalar()
    assert job.status == "done" and job.token == 2 and job.claimed_by != lost.claimed_by
    assert "waiting for 1 job(s) trained by" in err  # b waited for the grace period ...
    assert time.time() - killed_at >= grace
    assert "resumed at epoch" in err  # ... then continued a's checkpoint, from the database
    assert not (run_dirs[1] / "checkpoints").exists()
    assert _rows(postgres_url) == expected_rows
    assert count == len(expected_rows)  # one row per (model, epoch)
    assert _results_csv(run_dirs[1]) == expected_csv
    assert "results in" in out


# --------------------------------------------------------------------------------------------
# A server that stops answering


class _Stopped(Exception):
    pass


def test_a_joined_process_stopped_while_the_run_goes_on_elsewhere_says_so(
        postgres_url: str, tiny_idx_dir: Path, tmp_path: Path):
    """Ctrl-C in a process that joined another machine's run: the run goes on there, and the
    stop says so (stops.LeftRunning, which the CLI words as "goes on ... joins it again"), not
    that the run "is kept" to be resumed."""
    _clean(postgres_url)
    spec = load_study(_study(tmp_path, tiny_idx_dir))

    def stop(key: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:  # alone: the run is interrupted
        run_study(spec, run_dir=tmp_path / "a", store_url=postgres_url, progress=OnEpoch(stop))
    assert not isinstance(stopped.value, stops.LeftRunning)
    store = Store.open(url=postgres_url)
    (run,) = store.runs()
    with store.transaction() as conn:  # machine b's process takes it up, and beats
        conn.execute(runs.update().values(status="running", host="machine-b", pid=4242,
                                          pid_start=None, boot_id=None, heartbeat=time.time()))
    assert store.run(run.id).state == "running"
    with pytest.raises(KeyboardInterrupt) as stopped:  # this one joins it, and is stopped
        run_study(spec, run_dir=tmp_path / "b", store_url=postgres_url, progress=OnEpoch(stop))
    assert isinstance(stopped.value, stops.LeftRunning)
    assert f"run {run.id} goes on in the other processes" in "".join(stopped.value.__notes__)
    assert store.run(run.id).host == "machine-b"  # still theirs, still running
    assert store.run(run.id).state == "running"
    store.close()


def test_a_stop_signal_ends_a_wait_on_a_server_that_does_not_answer(postgres_url: str):
    """A frozen server (a paused VM, a hung disk) keeps a query waiting: Ctrl-C or SIGTERM
    must still end it at once, not when the server wakes up."""
    store = Store(postgres_url)  # opening a psycopg2 store makes its waits interruptible
    connection = store.engine.raw_connection()
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    backend = cursor.fetchone()[0]

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGUSR1, stop)
    os.kill(backend, signal.SIGSTOP)
    signaller = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1))
    # Without the fix the signal waits for the server: wake it after a while, so that the
    # test fails instead of hanging.
    waker = threading.Timer(8.0, os.kill, (backend, signal.SIGCONT))
    started = time.monotonic()
    try:
        signaller.start()
        waker.start()
        with pytest.raises(_Stopped):
            cursor.execute("SELECT 1")
        assert time.monotonic() - started < 5
    finally:
        signaller.cancel()
        waker.cancel()
        os.kill(backend, signal.SIGCONT)
        signal.signal(signal.SIGUSR1, previous)
        connection.invalidate()
        store.close()


@pytest.mark.parametrize(("command", "grace"), [("study", "soon"), ("search", "soon"),
                                               ("search", "inf"), ("study", "0.001")])
def test_a_bad_claim_grace_is_said_before_a_run_exists(
        command: str, grace: str, tiny_idx_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=1) if command == "search"
                    else tiny_study_toml(tiny_idx_dir))
    monkeypatch.setenv("FASHIONLAB_CLAIM_GRACE", grace)
    code, _, err = run_cli(capsys, command, str(path), "--run-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, "FASHIONLAB_CLAIM_GRACE: expected a number of seconds "
                          f"from 1 to 86400, got '{grace}'")
    assert not (tmp_path / "runs").exists()  # not an empty run left interrupted
