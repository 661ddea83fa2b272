"""The experiment store on an in-memory database: runs, models, epochs, migrations; which
runs are still running (a pid reused by another process or after a reboot does not count, also
through the command line); a store that can only be read."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import assert_one_line_error, run_cli, tiny_study_toml

from fashionlab import schema as schema_module
from fashionlab import store as store_module
from fashionlab.errors import StoreError
from fashionlab.jobs import register_jobs
from fashionlab.process import ProcessIdentity
from fashionlab.schema import MIGRATIONS, migrate
from fashionlab.store import Store, default_url, safe_url

# Where /proc is missing (macOS, Windows) a process is known by its pid only.
needs_proc = pytest.mark.skipif(ProcessIdentity.current().start_time is None,
                                reason="no /proc: processes are told apart by pid only")


@pytest.fixture
def store() -> Store:
    return Store("sqlite://")


def _run(store: Store, name: str = "seed", fingerprint: str = "abc123"):
    return store.create_run(kind="study", name=name, fingerprint=fingerprint, seed=0,
                            config={"name": name}, environment={"versions": {"torch": "x"}})


def _models(store: Store, run_id: str, *keys: str) -> None:
    store.register_models(run_id, [{"key": k, "candidate": k.split("/")[0], "role": "cv",
                                     "repeat": 0, "fold": i, "epochs_planned": 3}
                                    for i, k in enumerate(keys)])


def test_a_run_records_its_config_and_environment(store: Store):
    run = _run(store)
    again = store.run(run.id)
    assert again.config == {"name": "seed"} and again.environment["versions"]["torch"] == "x"
    assert again.status == "running" and again.state == "running"  # this process is alive
    assert again.pid == os.getpid()


def test_run_ids_are_unique_and_prefixes_resolve(store: Store):
    a, b = _run(store), _run(store)
    assert a.id != b.id
    assert store.run(b.id[:-1] if b.id.endswith("-2") else b.id).id in (a.id, b.id)
    with pytest.raises(StoreError, match="no run 'nope'.*runs list"):
        store.run("nope")
    made = sorted([a.id, b.id, *(_run(store).id for _ in range(3))])
    prefix = made[0][:4]  # the year: every run's
    with pytest.raises(StoreError) as ambiguous:
        store.run(prefix)
    assert str(ambiguous.value) == (f"run id '{prefix}' is ambiguous (5 runs match: "
                                    f"{', '.join(made[:3])} and 2 more)")


def test_a_run_whose_process_is_gone_is_interrupted(store: Store):
    run = _run(store)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE fl_runs SET pid = 999999999 WHERE id = :id"), {"id": run.id})
    assert store.run(run.id).state == "interrupted"
    store.claim_run(run.id)
    assert store.run(run.id).state == "running"
    store.end_run(run.id, "finished", {"best": "x", "nan": math.nan})
    finished = store.run(run.id)
    assert finished.state == "finished" and finished.summary == {"best": "x", "nan": None}


def test_epochs_written_twice_are_stored_once(store: Store):
    run = _run(store)
    _models(store, run.id, "a/fold-0", "a/fold-1")
    rows = [("a/fold-0", 1, (1.0, 0.5, 1.1, 0.4, 0.1)), ("a/fold-1", 1, (1.2, 0.5, 1.3, 0.4, 0.1))]
    store.record_epochs(run.id, rows, {"a/fold-0": {"status": "running"}})
    store.record_epochs(run.id, rows[:1] + [("a/fold-0", 2, (0.9, 0.6, 1.0, math.nan, 0.1))])
    history = store.histories(run.id)
    assert [e.epoch for e in history["a/fold-0"]] == [1, 2]
    assert len(history["a/fold-1"]) == 1
    assert math.isnan(history["a/fold-0"][1].val_accuracy)  # NaN survives the round trip
    status = {m.key: m.status for m in store.models(run.id)}
    assert status == {"a/fold-0": "running", "a/fold-1": "pending"}


def test_epochs_of_a_run_deleted_meanwhile_are_one_line(store: Store):
    """Another process deleted the run while this one trained it: a StoreError naming the
    run, not the database's foreign-key error."""
    run = _run(store)
    _models(store, run.id, "a/fold-0")
    store.delete_run(run.id)
    with pytest.raises(StoreError) as error:
        store.record_epochs(run.id, [("a/fold-0", 1, (1.0, 0.5, 1.1, 0.4, 0.1))])
    assert str(error.value) == (f"run {run.id} is no longer in the store "
                                f"{safe_url(store.url)}: it was deleted while this process "
                                "trained it")


def test_registering_models_again_keeps_their_state(store: Store):
    run = _run(store)
    _models(store, run.id, "a/fold-0")
    store.update_model(run.id, "a/fold-0", status="finished", best_epoch=3)
    _models(store, run.id, "a/fold-0", "b/fold-0")
    models = {m.key: m for m in store.models(run.id)}
    assert models["a/fold-0"].status == "finished" and models["a/fold-0"].best_epoch == 3
    assert models["b/fold-0"].status == "pending"


def test_listing_filters_and_deleting_removes_everything(store: Store):
    a, b = _run(store, "seed", "f1"), _run(store, "other", "f2")
    _models(store, a.id, "x/fold-0")
    store.record_epochs(a.id, [("x/fold-0", 1, (1, 1, 1, 1, 1))])
    assert [r.id for r in store.runs(name="seed")] == [a.id]
    assert [r.id for r in store.runs(fingerprint="f2")] == [b.id]
    store.delete_run(a.id)
    assert [r.id for r in store.runs()] == [b.id]
    assert store.epochs(a.id) == [] and store.models(a.id) == []


def test_migrations_are_applied_once_and_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    Store(url).close()
    engine = sa.create_engine(url)
    assert migrate(engine) == len(MIGRATIONS)
    with engine.begin() as conn:
        versions = conn.execute(sa.text("SELECT version FROM fl_schema")).scalars().all()
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        conn.execute(sa.text("INSERT INTO fl_schema VALUES (99, 'future')"))
    with pytest.raises(StoreError, match="newer than this fashionlab"):
        Store(url)


def test_an_unusable_store_url_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(f"sqlite:///{blocker / 'sub' / 'x.db'}")


@pytest.mark.parametrize("url", ["postgresql://ann:s3cret@db.lab:abc/runs",
                                 "postgresql://ann:s3c@ret@db.lab:54x/runs?sslmode=require"])
def test_a_url_whose_port_is_not_a_number_is_a_clear_error_without_its_password(url: str):
    with pytest.raises(StoreError, match="its port is not a number") as error:
        Store(url)
    assert "s3c" not in str(error.value) and "ann:***@" in str(error.value)


def test_a_url_whose_driver_is_not_installed_is_a_clear_error():
    # mysqlclient (MySQLdb) is not among fashionlab's dependencies
    with pytest.raises(StoreError, match="its database driver is not installed .No module"):
        Store("mysql+mysqldb://someone@localhost/db")


def test_a_bare_postgresql_url_without_a_driver_says_which_extra_installs_one(monkeypatch):
    # Neither psycopg2 (the `postgres` extra) nor psycopg 3: SQLAlchemy asks for psycopg 3.
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(StoreError, match=r"^cannot open the store postgresql://u:\*\*\*@127\.0\."
                                         r"0\.1:1/db: its database driver is not installed "
                                         r"\(.*psycopg.*\): pip install 'fashionlab\[postgres\]'$"):
        Store("postgresql://u:pw@127.0.0.1:1/db")


def test_a_bare_postgresql_url_gets_the_installed_driver():
    from fashionlab.store import database_url

    assert database_url("postgresql://me:pw@db:5432/fl") == \
        "postgresql+psycopg2://me:pw@db:5432/fl"
    assert database_url("postgresql+psycopg2://me@db/fl") == "postgresql+psycopg2://me@db/fl"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    # libpq's and many hosts' own scheme, which SQLAlchemy does not know
    assert database_url("postgres://me:p%40w@db:5433/fl?sslmode=require") == \
        "postgresql+psycopg2://me:p%40w@db:5433/fl?sslmode=require"
    assert database_url("postgres+psycopg2://me@db/fl") == "postgresql+psycopg2://me@db/fl"


def test_a_migration_that_loses_a_race_is_retried(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = schema_module.migrate_once

    def racing(engine):
        calls["n"] += 1
        if calls["n"] == 1:  # another process created the tables between check and create
            raise sa.exc.OperationalError("CREATE TABLE fl_runs", {}, Exception("exists"))
        return real(engine)

    monkeypatch.setattr(schema_module, "migrate_once", racing)
    Store(f"sqlite:///{tmp_path / 'x.db'}").close()
    assert calls["n"] == 2


# --------------------------------------------------------------------------------------------
# Which runs are running


def _set(store: Store, run_id: str, **values) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.update(schema_module.runs).where(schema_module.runs.c.id == run_id)
                     .values(**values))


def test_the_current_process_counts_as_running(store: Store):
    me = ProcessIdentity.current()
    assert me.pid == os.getpid() and me.alive()
    run = _run(store)
    assert (run.pid, run.pid_start, run.boot_id) == (me.pid, me.start_time, me.boot_id)
    _set(store, run.id, heartbeat=time.time() - 10 * store_module.STALE_AFTER)
    assert store.run(run.id).state == "running"  # on its machine, the process decides


@needs_proc
def test_a_live_pid_that_started_at_another_moment_is_interrupted(store: Store):
    run = _run(store)
    _set(store, run.id, pid_start=run.pid_start + 1)  # our pid, but not the run's process
    assert store.run(run.id).state == "interrupted"
    assert not ProcessIdentity(os.getpid(), run.pid_start + 1, run.boot_id).alive()


@needs_proc
def test_a_run_of_another_boot_is_interrupted(store: Store):
    run = _run(store)
    _set(store, run.id, boot_id=str(uuid.uuid4()))  # the same pid and start, before a reboot
    assert store.run(run.id).state == "interrupted"


def test_a_dead_pid_is_interrupted(store: Store):
    run = _run(store)
    _set(store, run.id, pid=999999999)
    assert store.run(run.id).state == "interrupted"
    assert not ProcessIdentity(999999999).alive()
    assert not ProcessIdentity(999999999, 1, ProcessIdentity.current().boot_id).alive()


def test_without_the_process_start_a_live_pid_needs_a_fresh_heartbeat(store: Store):
    # As on a machine without /proc, or for a row written before the start was recorded.
    run = _run(store)
    _set(store, run.id, pid_start=None, boot_id=None)
    assert store.run(run.id).state == "running"
    _set(store, run.id, heartbeat=time.time() - store_module.STALE_AFTER - 1)
    assert store.run(run.id).state == "interrupted"
    assert ProcessIdentity(os.getpid()).alive()


def test_a_run_elsewhere_is_running_while_its_heartbeat_is_fresh(store: Store):
    run = _run(store)
    _set(store, run.id, host="elsewhere", pid=1, pid_start=1, boot_id="another boot")
    assert store.run(run.id).state == "running"
    _set(store, run.id, heartbeat=time.time() - store_module.STALE_AFTER - 1)
    assert store.run(run.id).state == "interrupted"


def test_a_run_left_to_others_runs_while_one_beats_it_or_holds_a_job(store: Store):
    """A search's worker that ends while others train leaves the row naming no process: it
    runs while their beats are fresh or one of them holds a trial; with neither, it is
    interrupted after LEFT_STALE_AFTER, not STALE_AFTER (a worker killed before it took
    the row over is not waited for a quarter of an hour)."""
    run = _run(store)
    store.hand_over_run(run.id, {"host": None, "pid": None, "pid_start": None, "boot_id": None})
    assert store.run(run.id).state == "running"
    _set(store, run.id, heartbeat=time.time() - store_module.LEFT_STALE_AFTER + 30)
    assert store.run(run.id).state == "running"
    _set(store, run.id, heartbeat=time.time() - store_module.LEFT_STALE_AFTER - 1)
    assert store_module.LEFT_STALE_AFTER < store_module.STALE_AFTER
    assert store.run(run.id).state == "interrupted"
    register_jobs(store, run.id, [("trial-3", "trial 3")], 1)  # a worker elsewhere trains
    with store.transaction() as conn:
        conn.execute(sa.update(schema_module.jobs).values(
            status="claimed", host="elsewhere", pid=1, heartbeat=time.time()))
    run = store.run(run.id)
    assert (run.state, run.holder) == ("running", "processes that share it")


def test_a_claim_is_read_alive_by_the_grace_it_beats_by(store: Store,
                                                        monkeypatch: pytest.MonkeyPatch):
    """With FASHIONLAB_CLAIM_GRACE=600 a claim beats every 100 s: one 200 s old elsewhere is
    alive (under the default 120 s it would not be), for whoever reads the run."""
    run = _run(store)
    _set(store, run.id, pid=999999999)  # the run's own process is gone
    register_jobs(store, run.id, [("a", "a")], 1)
    with store.transaction() as conn:
        conn.execute(sa.update(schema_module.jobs).values(
            status="claimed", host="elsewhere", pid=1, heartbeat=time.time() - 200))
    assert store.run(run.id).state == "interrupted"
    monkeypatch.setenv("FASHIONLAB_CLAIM_GRACE", "600")
    assert store.run(run.id).state == "running"


def test_a_running_run_keeps_its_heartbeat_fresh(tmp_path: Path, monkeypatch):
    # The Store's heartbeat thread reads the interval where the Store is defined.
    monkeypatch.setattr("fashionlab.store.store.HEARTBEAT_EVERY", 0.05)
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    run = _run(store)
    _set(store, run.id, heartbeat=0.0)
    deadline = time.time() + 10
    while store.run(run.id).heartbeat == 0.0 and time.time() < deadline:
        time.sleep(0.05)
    assert store.run(run.id).heartbeat > time.time() - 10  # beating without any epoch
    store.end_run(run.id, "finished")
    time.sleep(0.2)  # a beat under way ends
    _set(store, run.id, heartbeat=0.0)
    time.sleep(0.3)
    assert store.run(run.id).heartbeat == 0.0  # a run that ended beats no more
    store.close()


# --------------------------------------------------------------------------------------------
# Upgrading a store of the previous schema


def _version_1_store(path: Path, pid: int) -> None:
    """A store as fashionlab's schema version 1 left it: fl_runs without the process's start
    time and boot id, fl_models without the host, no jobs; holding a finished run and a
    running one of process `pid`."""
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sa.text("""CREATE TABLE fl_runs (
            id VARCHAR(64) NOT NULL PRIMARY KEY, kind VARCHAR(16) NOT NULL,
            name VARCHAR(200) NOT NULL, fingerprint VARCHAR(32) NOT NULL,
            status VARCHAR(16) NOT NULL, seed BIGINT NOT NULL, config TEXT NOT NULL,
            environment TEXT NOT NULL, started FLOAT NOT NULL, heartbeat FLOAT NOT NULL,
            finished FLOAT, host VARCHAR(200), pid INTEGER, summary TEXT, output_dir TEXT)"""))
        schema_module.models.create(conn)
        conn.execute(sa.text("ALTER TABLE fl_models DROP COLUMN host"))  # added by version 3
        schema_module.epochs.create(conn)
        schema_module.schema.create(conn)
        conn.execute(sa.text("INSERT INTO fl_schema VALUES (1, '2025-01-01T00:00:00')"))
        for run_id, status, finished, summary in (("old-finished", "finished", 2.0, '{"b": 1}'),
                                                  ("old-running", "running", None, None)):
            conn.execute(sa.text(
                "INSERT INTO fl_runs VALUES (:id, 'study', 'old', 'f', :status, 7, '{}', '{}',"
                " 1.0, :beat, :finished, :host, :pid, :summary, NULL)"),
                {"id": run_id, "status": status, "beat": time.time(), "finished": finished,
                 "host": os.uname().nodename, "pid": pid, "summary": summary})
        conn.execute(sa.text("INSERT INTO fl_models (run_id, key, candidate, role, status, "
                             "epochs_planned) VALUES ('old-finished', 'a/fold-0', 'a', 'cv', "
                             "'finished', 1)"))
        conn.execute(sa.text("INSERT INTO fl_epochs VALUES ('old-finished', 'a/fold-0', 1, "
                             "1.0, 0.5, 1.1, 0.4, 0.1)"))
    engine.dispose()


def test_a_store_of_the_previous_schema_upgrades_on_open_and_its_runs_read(tmp_path: Path):
    path = tmp_path / "old.db"
    _version_1_store(path, os.getpid())
    store = Store(f"sqlite:///{path}")
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT max(version) FROM fl_schema")).scalar() == \
            len(MIGRATIONS) == 3
        tables = set(sa.inspect(conn).get_table_names())
    assert {"fl_jobs", "fl_checkpoints"} <= tables
    assert [m.host for m in store.models("old-finished")] == [None]  # not recorded then
    finished = store.run("old-finished")
    assert finished.state == "finished" and finished.summary == {"b": 1} and finished.seed == 7
    assert [e.val_loss for e in store.histories("old-finished")["a/fold-0"]] == [1.1]
    old = store.run("old-running")
    assert (old.pid, old.pid_start, old.boot_id) == (os.getpid(), None, None)
    assert old.state == "running"  # a live pid, a fresh heartbeat: nothing says otherwise
    store.claim_run(old.id)  # a resume records the whole identity
    assert store.run(old.id).pid_start == ProcessIdentity.current().start_time
    store.close()


def test_processes_opening_an_old_store_together_upgrade_it_once(tmp_path: Path):
    path = tmp_path / "old.db"
    _version_1_store(path, 999999999)
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(f"sqlite:///{path}").close()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM fl_schema")).scalars().all() == [1, 2, 3]
    engine.dispose()


# --------------------------------------------------------------------------------------------
# A store that can only be read


def _finished_store(path: Path) -> str:
    store = Store(f"sqlite:///{path}")
    run = _run(store)
    _models(store, run.id, "a/fold-0")
    store.record_epochs(run.id, [("a/fold-0", 1, (1.0, 0.5, 1.1, 0.4, 0.1))],
                        {"a/fold-0": {"status": "finished"}})
    store.end_run(run.id, "finished", {"best": "a"})
    store.close()
    return run.id


@pytest.mark.parametrize("how", ["read_only", "url"])
def test_a_read_only_store_reads_and_refuses_writes_in_one_line(tmp_path: Path, how: str):
    path = tmp_path / "runs" / "fashionlab.db"
    run_id = _finished_store(path)
    before = path.read_bytes()
    # SQLite's own read-only mode: tests run as root, which file permissions do not stop.
    store = Store(f"sqlite:///{path}", read_only=True) if how == "read_only" \
        else Store(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert store.read_only
    assert [r.id for r in store.runs()] == [run_id]
    assert store.run(run_id).state == "finished" and store.run(run_id).summary == {"best": "a"}
    assert [e.loss for e in store.histories(run_id)["a/fold-0"]] == [1.0]
    assert [m.status for m in store.models(run_id)] == ["finished"]
    for write in (lambda: store.claim_run(run_id), lambda: store.heartbeat(run_id),
                  lambda: store.end_run(run_id, "failed"), lambda: _run(store),
                  lambda: store.delete_run(run_id)):
        with pytest.raises(StoreError) as error:
            write()
        message = str(error.value)
        assert "\n" not in message and str(path) in message and "read-only" in message
    store.close()
    assert path.read_bytes() == before


def test_a_store_this_user_cannot_write_opens_read_only(tmp_path: Path, monkeypatch):
    path = tmp_path / "fashionlab.db"
    run_id = _finished_store(path)
    monkeypatch.setattr(os, "access", lambda p, mode, **_: mode != os.W_OK)
    store = Store.open(tmp_path)
    assert store.read_only and store.run(run_id).state == "finished"
    with pytest.raises(StoreError, match="cannot write to the store .*read-only"):
        store.claim_run(run_id)
    store.close()


def test_a_read_only_store_that_needs_an_upgrade_is_a_one_line_error(tmp_path: Path):
    path = tmp_path / "old.db"
    _version_1_store(path, 999999999)
    with pytest.raises(StoreError) as error:
        Store(f"sqlite:///{path}", read_only=True)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "needs an upgrade" in message
    assert Store(f"sqlite:///{path}").run("old-finished").state == "finished"  # writable: fine


# --------------------------------------------------------------------------------------------
# Through the command line


@needs_proc
def test_a_run_whose_pid_was_reused_resumes_and_deletes_from_the_command_line(
        tiny_idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=2, folds=2, final=False,
                                     candidates='[[candidates]]\nname = "small"\n'
                                                'layers = [{ units = 8 }]\n'))
    run_dir = tmp_path / "runs"
    code, _, err = run_cli(capsys, "study", str(study), "--run-dir", str(run_dir))
    assert code == 0, err
    store = Store.open(run_dir)
    (run,) = store.runs()

    other = subprocess.Popen(["sleep", "30"])  # an unrelated live process
    try:
        def crashed_with_pid_reused(start_offset: int) -> None:
            """The row of a run that died, its pid now taken by `other`."""
            taker = ProcessIdentity.of(other.pid)
            _set(store, run.id, status="running", finished=None, heartbeat=time.time(),
                 pid=taker.pid, pid_start=taker.start_time + start_offset,
                 boot_id=taker.boot_id)

        # The pid's own process, started when the row says: still running, refused (a SQLite
        # store is one machine's: the second process says who trains it and how to share).
        crashed_with_pid_reused(0)
        assert store.run(run.id).state == "running"
        code, _, err = run_cli(capsys, "study", str(study), "--run-dir", str(run_dir))
        assert_one_line_error(code, err, "being trained by another process",
                              f"pid {other.pid} on", "--store postgresql://")

        # The pid reused by a process that started at another moment: resumed, no --fresh.
        crashed_with_pid_reused(1)
        assert store.run(run.id).state == "interrupted"
        code, _, err = run_cli(capsys, "study", str(study), "--run-dir", str(run_dir))
        assert code == 0, err
        (resumed,) = store.runs()
        assert resumed.id == run.id and resumed.state == "finished"
        assert resumed.pid == os.getpid()  # claimed by this process

        crashed_with_pid_reused(1)
        code, out, err = run_cli(capsys, "runs", "delete", run.id, "--yes",
                                 "--run-dir", str(run_dir))
        assert code == 0 and f"deleted run {run.id}" in out, err
        assert store.runs() == [] and not Path(run.output_dir).exists()
    finally:
        other.kill()
        other.wait()
        store.close()


@needs_proc
def test_a_run_handed_over_reads_as_its_new_holder_does(store: Store):
    """A process leaving a run that another goes on running (a shared study whose outputs
    another process writes) hands the row over: the run is running while that process lives,
    interrupted once it is gone, and a run that has ended is left as it is."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = ProcessIdentity.of(holder.pid)
        run = _run(store)
        store.hand_over_run(run.id, {"host": socket.gethostname(), "pid": identity.pid,
                                     "pid_start": identity.start_time,
                                     "boot_id": identity.boot_id})
        handed = store.run(run.id)
        assert (handed.pid, handed.pid_start) == (holder.pid, identity.start_time)
        assert handed.state == "running"
    finally:
        holder.kill()
        holder.wait()
    assert store.run(run.id).state == "interrupted"  # its holder is gone, not this process
    store.end_run(run.id, "finished")
    store.hand_over_run(run.id, {"host": "elsewhere", "pid": 1, "pid_start": 1, "boot_id": "x"})
    assert store.run(run.id).status == "finished" and store.run(run.id).pid == holder.pid


@pytest.mark.parametrize("folder", ["x?1", "p%41x", "h#x", "sp ace ü"])
def test_a_run_directory_holds_its_own_store_whatever_its_name(tmp_path: Path, folder: str):
    run_dir = tmp_path / folder / "runs"
    store = Store.open(run_dir)
    store.create_run(kind="study", name="a", fingerprint="0" * 32, seed=0, config={},
                     environment={})
    store.close()
    assert (run_dir / "fashionlab.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder]  # not "x", "pAx" or "h"
    other = Store.open(tmp_path / f"{folder}-other")  # a sibling sees none of its runs
    assert other.runs() == []
    other.close()


def test_a_database_server_that_does_not_answer_is_an_error_after_the_connect_timeout(
        monkeypatch: pytest.MonkeyPatch):
    import socket

    from fashionlab.store import engine

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT", 2)
    with socket.socket() as silent:  # accepts connections (the kernel does), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot open the store .*timeout"):
            Store(f"postgresql://fl:secret@127.0.0.1:{port}/fashionlab")
        assert time.monotonic() - started < 8  # one try: no retries of an unreachable server


def test_connections_to_postgresql_get_timeouts_unless_the_url_sets_them():
    from fashionlab.store import connect_args

    url = "postgresql+psycopg2://fl@db/x"
    assert connect_args(url)["connect_timeout"] > 0 and connect_args(url)["keepalives"] == 1
    assert "connect_timeout" not in connect_args(url + "?connect_timeout=5")
    assert connect_args("sqlite:///x.db") == {} and connect_args("postgresql+pg8000://d/x") == {}


def test_database_trouble_is_found_through_the_chain_and_only_there():
    from fashionlab.store import database_trouble

    url = "postgresql+psycopg2://fl:secret@db/fl"
    dropped = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    def raised(make):
        try:
            make()
        except BaseException as error:  # noqa: BLE001 (the test looks at what was raised)
            return error
        raise AssertionError("nothing raised")

    def wrapped():  # as Optuna wraps it, and as its cleanup then fails on something else
        try:
            try:
                raise dropped
            except sa.exc.OperationalError as error:
                raise RuntimeError("storage internal error") from error
        except RuntimeError:
            raise UnboundLocalError("updated_state")

    found = database_trouble(raised(wrapped), url)
    assert str(found) == ("cannot use the store postgresql+psycopg2://fl:***@db/fl: "
                          "server closed the connection")
    store_error = StoreError("cannot write to the store x: gone")
    assert database_trouble(store_error, url) is store_error

    def hidden():  # its raiser said: not because of that
        try:
            raise dropped
        except sa.exc.OperationalError:
            raise ValueError("unrelated") from None

    def stopped():  # Ctrl-C while the database failed: a stop, not a store error
        try:
            raise dropped
        except sa.exc.OperationalError:
            raise KeyboardInterrupt

    assert database_trouble(raised(hidden), url) is None
    assert database_trouble(raised(stopped), url) is None
    assert database_trouble(ValueError("plain"), url) is None
    loop_a, loop_b = ValueError("a"), ValueError("b")
    loop_a.__context__, loop_b.__context__ = loop_b, loop_a
    assert database_trouble(loop_a, url) is None  # a cycle ends


def test_a_sqlite_url_naming_a_folder_says_so(tmp_path: Path):
    # (SQLite itself says only "unable to open database file")
    Store.open(tmp_path).close()
    for create in (True, False):
        with pytest.raises(StoreError, match=f"^cannot open the store {tmp_path}: a folder, not "
                                             "a database file"):
            Store(f"sqlite:///{tmp_path}", create=create)


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_a_full_disk_still_shows_what_is_stored_and_says_why_nothing_can_be_written(
        tmp_path: Path):
    # In a process whose files may not grow (as on a full disk), SQLite cannot make the side
    # file (-shm) a WAL reader writes: a command that only looks reads the file as it is;
    # one that would write says the disk is full (free space reads as none here).
    store = Store.open(tmp_path)
    run = store.create_run(kind="study", name="kept", fingerprint="0" * 32, seed=0,
                           config={}, environment={}, output_root=tmp_path)
    store.close()
    script = f"""
import collections, resource, shutil, signal
from fashionlab.errors import StoreError
from fashionlab.store import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
shutil.disk_usage = lambda path: collections.namedtuple("usage", "total used free")(1, 1, 0)
looking = Store.open({str(tmp_path)!r}, create=False)
print([r.id for r in looking.runs()], looking.read_only)
try:
    Store.open({str(tmp_path)!r})
except StoreError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    shown, refused = done.stdout.splitlines()
    assert shown == f"[{run.id!r}] True"
    assert refused.startswith(f"cannot open the store {default_url(tmp_path)}: ")
    assert refused.endswith("(the disk is full: free some space and run again)")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_zombie_holds_nothing():
    # A process that has ended but whose status nobody collected yet (a killed run's worker,
    # orphaned, until the init process reaps it: a second in some containers, never in
    # others): its run and its job claims are not held by it.
    from fashionlab.process import ProcessIdentity, pid_exists

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)
    identity = ProcessIdentity(child.pid, ProcessIdentity.current().start_time, None)
    try:
        assert not pid_exists(child.pid)
        assert identity.liveness() is False
    finally:
        child.wait()


@pytest.mark.parametrize("stopped", [True, False])
def test_a_stop_landing_in_a_connections_return_is_no_logged_traceback(
        stopped: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A Ctrl-C that lands while a connection goes back to its pool (a finaliser's, in a
    search) was logged by SQLAlchemy with its traceback above the command's one line. Another
    error there is still logged."""
    import signal

    from fashionlab import stops

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")

    @sa.event.listens_for(engine, "reset")
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # the signal handler's, inside the pool's reset

    connection = engine.connect()
    if stopped:
        stops.received.append(signal.SIGINT)  # as the command's handler records it
    try:
        with pytest.raises(KeyboardInterrupt):
            connection.close()
    finally:
        stops.forget()
        engine.dispose()
    logged = [r for r in caplog.records if r.getMessage() == "Exception during reset or similar"]
    assert len(logged) == (0 if stopped else 1)
