"""The experiment store: every run, model and epoch, in SQLite by default or any SQL database.

One database holds many runs (studies and searches). A run records its resolved config, seed,
package versions, code revision and machine; a model (one fold of a candidate, a retrained or
final model, a search trial's fold) records its status and outcome; an epoch row records the
metrics of one finished epoch, committed as soon as the epoch ends. Rows are keyed so that
writing the same epoch twice (after a resume) replaces it: nothing is stored twice.

Tables are prefixed `fl_` so that Optuna's tables can live in the same database. Schema changes
go through the numbered migrations at the bottom; `Store` applies the missing ones on open.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fashionlab.errors import StoreError
from fashionlab.process import ProcessIdentity
from fashionlab.serialize import jsonable
from fashionlab.text import first_line

DEFAULT_RUN_DIR = Path("fashionlab-runs")
DB_NAME = "fashionlab.db"

metadata = sa.MetaData()

schema = sa.Table(
    "fl_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied", sa.String(40), nullable=False),
)

runs = sa.Table(
    "fl_runs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # study | search
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("fingerprint", sa.String(32), nullable=False),  # hash of the resolved config
    sa.Column("status", sa.String(16), nullable=False),  # running|finished|failed|interrupted
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("config", sa.Text, nullable=False),  # JSON of the resolved config
    sa.Column("environment", sa.Text, nullable=False),  # JSON: versions, revision, machine
    sa.Column("started", sa.Float, nullable=False),  # unix seconds
    sa.Column("heartbeat", sa.Float, nullable=False),  # last sign of life of a running run
    sa.Column("finished", sa.Float),
    sa.Column("host", sa.String(200)),
    sa.Column("pid", sa.Integer),
    # With the pid, who the process is (ProcessIdentity): a pid alone is reused by later
    # processes and after a reboot. NULL where the machine has no /proc, or in older rows.
    sa.Column("pid_start", sa.BigInteger),  # clock ticks from boot to the process's start
    sa.Column("boot_id", sa.String(36)),  # the boot the process started in
    sa.Column("summary", sa.Text),  # JSON written when the run ends: the results table
    sa.Column("output_dir", sa.Text),  # where its files (table, figures, report) are
)

models = sa.Table(
    "fl_models", metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fl_runs.id"), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),  # e.g. "dense(64)/fold-3"
    sa.Column("candidate", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),  # cv | retrain | final | trial
    sa.Column("repeat", sa.Integer),
    sa.Column("fold", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),  # pending|running|finished|stopped|failed
    sa.Column("message", sa.Text),
    sa.Column("epochs_planned", sa.Integer, nullable=False),
    sa.Column("best_epoch", sa.Integer),
    sa.Column("n_train", sa.Integer),
    sa.Column("n_val", sa.Integer),
    sa.Column("seed", sa.BigInteger),
    sa.Column("test_loss", sa.Float),
    sa.Column("test_accuracy", sa.Float),
    sa.Column("seconds", sa.Float),
)

epochs = sa.Table(
    "fl_epochs", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),  # 1-based
    sa.Column("loss", sa.Float),
    sa.Column("accuracy", sa.Float),
    sa.Column("val_loss", sa.Float),
    sa.Column("val_accuracy", sa.Float),
    sa.Column("seconds", sa.Float),
    sa.ForeignKeyConstraint(["run_id", "key"], ["fl_models.run_id", "fl_models.key"]),
)

MODEL_FIELDS = ("candidate", "role", "repeat", "fold", "status", "message", "epochs_planned",
                "best_epoch", "n_train", "n_val", "seed", "test_loss", "test_accuracy", "seconds")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # of an epoch, as training reports
EPOCH_FIELDS = (*METRICS, "seconds")

# A process that runs a run refreshes its heartbeat every HEARTBEAT_EVERY seconds (a thread of
# the Store that created or claimed it) and at every epoch end. Where liveness rests on the
# heartbeat (another machine, no /proc), a run is interrupted after STALE_AFTER seconds without
# one: 15 missed beats, room for a database busy for a while or clocks a few minutes apart.
HEARTBEAT_EVERY = 60.0
STALE_AFTER = 15 * 60


@dataclass(frozen=True)
class RunRecord:
    id: str
    kind: str
    name: str
    fingerprint: str
    status: str  # as stored: running | finished | failed | interrupted
    seed: int
    config: dict[str, Any]
    environment: dict[str, Any]
    started: float
    heartbeat: float
    finished: float | None
    host: str | None
    pid: int | None
    summary: dict[str, Any] | None
    output_dir: str | None
    pid_start: int | None = None  # see ProcessIdentity.start_time
    boot_id: str | None = None

    @property
    def state(self) -> str:
        """running, finished, failed, or interrupted (stored as running, its process gone).

        On its own machine a run is running while its process is: the same pid, started at
        the same moment of the same boot (`ProcessIdentity`), so neither a later process that
        reuses the pid nor a reboot keeps it running. Where that cannot be told (a machine
        without /proc, a row from an older fashionlab), a process with the pid must exist
        and the heartbeat be under STALE_AFTER old; for a run of another machine, only the
        heartbeat counts."""
        if self.status != "running":
            return self.status
        if self.host == socket.gethostname() and self.pid is not None:
            alive = ProcessIdentity(self.pid, self.pid_start, self.boot_id).liveness()
            if alive is not None:
                return "running" if alive else "interrupted"
        return "running" if time.time() - self.heartbeat < STALE_AFTER else "interrupted"

    @property
    def duration(self) -> float:
        return (self.finished or self.heartbeat) - self.started


@dataclass(frozen=True)
class ModelRecord:
    run_id: str
    key: str
    candidate: str
    role: str
    repeat: int | None
    fold: int | None
    status: str
    message: str | None
    epochs_planned: int
    best_epoch: int | None
    n_train: int | None
    n_val: int | None
    seed: int | None
    test_loss: float | None
    test_accuracy: float | None
    seconds: float | None


@dataclass(frozen=True)
class EpochRecord:
    key: str
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


def _none_if_nan(value: float | None) -> float | None:
    # NaN is not portable across databases (PostgreSQL accepts it, SQLite stores NULL); store
    # NULL and read it back as NaN.
    return None if value is None or math.isnan(value) else float(value)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def database_url(url: str) -> str:
    """The URL with a PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, the `postgres` extra installs psycopg2."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(
            hide_password=False)
    return url


def default_url(run_dir: str | Path = DEFAULT_RUN_DIR) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / DB_NAME}"


class Store:
    """Access to the experiment store. `Store(url)` with any SQLAlchemy URL, or
    `Store.open(run_dir, url)` for the default layout (a SQLite file in the run directory).

    A SQLite file that this user cannot write (the file or its folder), or any SQLite file
    with `read_only=True`, opens in SQLite's read-only mode: everything reads, nothing is
    written on open, and a write is a StoreError. A database server's own permissions decide
    there. A write that fails (read-only, disk full, no permission) is a one-line StoreError.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url = database_url(url)
        self._beats: dict[str, threading.Event] = {}  # run id -> stops its heartbeat thread
        try:
            engine_url = sa.make_url(url)
            path = _sqlite_file(engine_url)
            self.read_only = read_only or _read_only_url(engine_url) or (
                path is not None and path.exists() and not _writable(path))
            if path is not None and self.read_only:
                engine_url = _sqlite_read_only_url(path)
            elif path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            # An in-memory SQLite database lives in one connection: share it (tests).
            self._in_memory = engine_url.drivername.startswith("sqlite") and path is None
            self.engine = sa.create_engine(
                engine_url, poolclass=sa.pool.StaticPool if self._in_memory else None,
                connect_args={"check_same_thread": False} if self._in_memory else {})
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect",
                                _sqlite_read_only_pragmas if self.read_only else _sqlite_pragmas)
            migrate(self.engine, read_only=self.read_only)
        except (SQLAlchemyError, OSError) as error:
            raise StoreError(f"cannot open the store {safe_url(url)}: {first_line(error)}") \
                from None

    @classmethod
    def open(cls, run_dir: str | Path = DEFAULT_RUN_DIR, url: str | None = None, *,
             read_only: bool = False) -> Store:
        return cls(url or os.environ.get("FASHIONLAB_STORE") or default_url(run_dir),
                   read_only=read_only)

    def close(self) -> None:
        for stop in self._beats.values():
            stop.set()
        self._beats.clear()
        self.engine.dispose()

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """A write transaction; one the database refuses is a StoreError naming the store."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InternalError, sa.exc.ProgrammingError,
                OSError) as error:
            reason = first_line(error)
            if isinstance(error, sa.exc.ProgrammingError) \
                    and "permission denied" not in reason.lower():
                raise  # a mistake in a statement, not the database's refusal
            raise StoreError(f"cannot write to the store {safe_url(self.url)}: {reason}"
                             f"{_write_advice(reason, self.read_only)}") from None

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except (sa.exc.OperationalError, OSError) as error:
            raise StoreError(f"cannot read the store {safe_url(self.url)}: "
                             f"{first_line(error)}") from None

    def _keep_alive(self, run_id: str) -> None:
        """Refresh the run's heartbeat from a thread until end_run, delete_run or close: the
        sign of life that other machines read (see RunRecord.state). Not for an in-memory
        database, which no other process sees."""
        if self._in_memory or run_id in self._beats:
            return
        stop = self._beats[run_id] = threading.Event()
        threading.Thread(target=_beat, args=(weakref.ref(self), run_id, stop), daemon=True,
                         name=f"fashionlab-heartbeat-{run_id}").start()

    def _stop_beating(self, run_id: str) -> None:
        stop = self._beats.pop(run_id, None)
        if stop is not None:
            stop.set()

    # ---- runs -----------------------------------------------------------------------------

    def create_run(
        self, *, kind: str, name: str, fingerprint: str, seed: int, config: dict[str, Any],
        environment: dict[str, Any], output_root: str | Path | None = None,
    ) -> RunRecord:
        """A new run, status running in this process; its files go to output_root/<run id>
        when given. Its heartbeat beats until end_run (or close)."""
        now = time.time()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{_slug(name)}-{fingerprint[:6]}"
        with self._begin() as conn:
            taken = {r[0] for r in conn.execute(
                sa.select(runs.c.id).where(runs.c.id.like(f"{run_id}%")))}
            suffix = 2
            base = run_id
            while run_id in taken:
                run_id, suffix = f"{base}-{suffix}", suffix + 1
            conn.execute(runs.insert().values(
                id=run_id, kind=kind, name=name, fingerprint=fingerprint, status="running",
                seed=seed, config=json.dumps(jsonable(config)),
                environment=json.dumps(jsonable(environment)),
                started=now, heartbeat=now, **_this_process(),
                output_dir=str(Path(output_root).resolve() / run_id) if output_root else None,
            ))
        self._keep_alive(run_id)
        return self.run(run_id)

    def claim_run(self, run_id: str) -> RunRecord:
        """Mark an existing run as running in this process (resuming it); its heartbeat beats
        until end_run (or close)."""
        with self._begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(
                status="running", heartbeat=time.time(), finished=None, **_this_process()))
        self._keep_alive(run_id)
        return self.run(run_id)

    def heartbeat(self, run_id: str) -> None:
        with self._begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(heartbeat=time.time()))

    def end_run(self, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
        """This process stops running the run: finished, failed, or interrupted (left to
        resume, by this process too)."""
        self._stop_beating(run_id)
        now = time.time()
        with self._begin() as conn:
            values: dict[str, Any] = {"status": status, "finished": now, "heartbeat": now}
            if summary is not None:
                values["summary"] = json.dumps(jsonable(summary), allow_nan=False)
            conn.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def run(self, run_id: str) -> RunRecord:
        """The run with this id, or a unique id prefix; StoreError when there is none."""
        with self._read() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                matches = conn.execute(
                    sa.select(runs).where(runs.c.id.like(f"{_escape_like(run_id)}%", escape="\\"))
                ).all()
                if len(matches) > 1:
                    raise StoreError(f"run id '{run_id}' is ambiguous ({len(matches)} runs match)")
                row = matches[0] if matches else None
        if row is None:
            raise StoreError(f"no run '{run_id}' in {safe_url(self.url)} "
                             "(`fashionlab runs list` shows the runs)")
        return _run_record(row)

    def runs(self, *, kind: str | None = None, name: str | None = None,
             fingerprint: str | None = None) -> list[RunRecord]:
        """Runs, newest first, optionally filtered."""
        query = sa.select(runs).order_by(runs.c.started.desc(), runs.c.id.desc())
        if kind is not None:
            query = query.where(runs.c.kind == kind)
        if name is not None:
            query = query.where(runs.c.name == name)
        if fingerprint is not None:
            query = query.where(runs.c.fingerprint == fingerprint)
        with self._read() as conn:
            return [_run_record(row) for row in conn.execute(query)]

    def delete_run(self, run_id: str) -> None:
        run_id = self.run(run_id).id
        self._stop_beating(run_id)
        with self._begin() as conn:
            conn.execute(epochs.delete().where(epochs.c.run_id == run_id))
            conn.execute(models.delete().where(models.c.run_id == run_id))
            conn.execute(runs.delete().where(runs.c.id == run_id))

    # ---- models and epochs ----------------------------------------------------------------

    def register_models(self, run_id: str, rows: Iterable[dict[str, Any]]) -> None:
        """Insert the planned models of a run (status pending) unless they already exist."""
        with self._begin() as conn:
            existing = {r[0] for r in conn.execute(
                sa.select(models.c.key).where(models.c.run_id == run_id))}
            new = [{"run_id": run_id, "status": "pending", **row}
                   for row in rows if row["key"] not in existing]
            if new:
                conn.execute(models.insert(), new)

    def update_model(self, run_id: str, key: str, **values: Any) -> None:
        unknown = set(values) - set(MODEL_FIELDS)
        if unknown:
            raise ValueError(f"unknown model fields: {sorted(unknown)}")
        values = {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in values.items()}
        with self._begin() as conn:
            conn.execute(models.update().where(
                (models.c.run_id == run_id) & (models.c.key == key)).values(**values))

    def record_epochs(
        self, run_id: str, rows: Sequence[tuple[str, int, Sequence[float]]],
        model_updates: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write epoch rows (key, epoch, (loss, accuracy, val_loss, val_accuracy, seconds)) and
        model status changes in one transaction; an existing (key, epoch) row is replaced."""
        with self._begin() as conn:
            for key, epoch, values in rows:
                conn.execute(epochs.delete().where(
                    (epochs.c.run_id == run_id) & (epochs.c.key == key)
                    & (epochs.c.epoch == epoch)))
            if rows:
                conn.execute(epochs.insert(), [
                    {"run_id": run_id, "key": key, "epoch": epoch,
                     **{f: _none_if_nan(v) for f, v in zip(EPOCH_FIELDS, values, strict=True)}}
                    for key, epoch, values in rows
                ])
            for key, update in (model_updates or {}).items():
                update = {k: _none_if_nan(v) if isinstance(v, float) else v
                          for k, v in update.items()}
                conn.execute(models.update().where(
                    (models.c.run_id == run_id) & (models.c.key == key)).values(**update))
            conn.execute(runs.update().where(runs.c.id == run_id).values(heartbeat=time.time()))

    def models(self, run_id: str) -> list[ModelRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(models).where(models.c.run_id == run_id)
                                .order_by(models.c.candidate, models.c.repeat, models.c.fold))
            return [ModelRecord(**row._mapping) for row in rows]

    def epochs(self, run_id: str, key: str | None = None) -> list[EpochRecord]:
        query = sa.select(epochs).where(epochs.c.run_id == run_id)
        if key is not None:
            query = query.where(epochs.c.key == key)
        with self._read() as conn:
            rows = conn.execute(query.order_by(epochs.c.key, epochs.c.epoch))
            return [EpochRecord(row.key, row.epoch, *(_nan_if_none(getattr(row, f))
                                                      for f in EPOCH_FIELDS)) for row in rows]

    def histories(self, run_id: str) -> dict[str, list[EpochRecord]]:
        out: dict[str, list[EpochRecord]] = {}
        for record in self.epochs(run_id):
            out.setdefault(record.key, []).append(record)
        return out


# --------------------------------------------------------------------------------------------
# Migrations: append, never edit. Each takes a connection inside a transaction.


def _migration_1(conn: sa.Connection) -> None:
    for table in (runs, models, epochs):
        table.create(conn, checkfirst=True)


def _migration_2(conn: sa.Connection) -> None:
    # The identity of a run's process. Migration 1 creates the tables as defined today, so a
    # new database has the columns already: add only the missing ones.
    _add_columns(conn, runs, "pid_start", "boot_id")


MIGRATIONS = [_migration_1, _migration_2]


def migrate(engine: sa.Engine, attempts: int = 5, *, read_only: bool = False) -> int:
    """Apply the missing migrations; returns the schema version.

    A store whose schema is current is only read, so a read-only one opens; a read-only one
    that needs a migration is a StoreError. Workers on several machines may open a new store
    at the same moment: on PostgreSQL the migration holds an advisory lock, on SQLite the
    write lock from its first statement; elsewhere a migration that lost the race is retried
    (it then finds the work done)."""
    with engine.connect() as conn:
        current = _schema_version(conn)
    if current == len(MIGRATIONS):
        return current
    if current > len(MIGRATIONS):
        raise _newer_schema(current)
    if read_only:
        where = _sqlite_file(engine.url) or safe_url(engine.url.render_as_string())
        raise StoreError(f"the store {where} needs an upgrade (schema version {current} -> "
                         f"{len(MIGRATIONS)}) but is read-only: open it once where it can be "
                         "written")
    for attempt in range(attempts):
        try:
            return migrate_once(engine)
        except sa.exc.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def migrate_once(engine: sa.Engine) -> int:
    """Apply the missing migrations in one transaction; returns the schema version. `migrate`
    retries it when a concurrent first open wins the race."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7165734)"))  # fashionlab's key
        elif engine.dialect.name == "sqlite":
            # Python's sqlite3 starts a transaction only before a data change, leaving the
            # version check and the DDL outside it: take the write lock first, so that a
            # second process waits here and then finds the migrations applied.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        schema.create(conn, checkfirst=True)
        current = _schema_version(conn)
        if current > len(MIGRATIONS):
            raise _newer_schema(current)
        for version in range(current + 1, len(MIGRATIONS) + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(schema.insert().values(
                version=version, applied=datetime.now(timezone.utc).isoformat()))
        return len(MIGRATIONS)


def _schema_version(conn: sa.Connection) -> int:
    """The applied schema version; 0 for a new database."""
    if not sa.inspect(conn).has_table(schema.name):
        return 0
    return conn.execute(sa.select(sa.func.max(schema.c.version))).scalar() or 0


def _newer_schema(current: int) -> StoreError:
    return StoreError(f"the store's schema (version {current}) is newer than this "
                      f"fashionlab (version {len(MIGRATIONS)}); upgrade fashionlab")


def _add_columns(conn: sa.Connection, table: sa.Table, *names: str) -> None:
    present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name not in present:
            kind = table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


# --------------------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (runs list, report) never block a run
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_read_only_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()  # the journal mode is the writers' to choose
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_file(url: sa.URL) -> Path | None:
    """The file of a SQLite URL (plain or `file:` URI form); None for another database or an
    in-memory one."""
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    database = url.database
    if url.query.get("uri") in ("true", "1") and database.startswith("file:"):
        if url.query.get("mode") == "memory":
            return None
        database = unquote(database.removeprefix("file:"))
    return Path(database)


def _read_only_url(url: sa.URL) -> bool:
    return url.drivername.startswith("sqlite") and url.query.get("uri") in ("true", "1") and (
        url.query.get("mode") == "ro" or url.query.get("immutable") == "1")


def _writable(path: Path) -> bool:
    # SQLite writes next to the file too (its -wal, -shm or journal): the folder counts.
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _sqlite_read_only_url(path: Path) -> sa.URL:
    """SQLite's read-only mode for this file. A WAL-mode file needs its -shm index, written
    even by readers: in a folder we cannot write, where none exists (no process has the file
    open), it is read as immutable, a copy that nobody writes."""
    path = path.resolve()
    shm = path.with_name(path.name + "-shm")
    immutable = not os.access(path.parent, os.W_OK) and not shm.exists()
    return sa.URL.create("sqlite", database=f"file:{quote(str(path))}",
                         query={"uri": "true", **({"immutable": "1"} if immutable
                                                  else {"mode": "ro"})})


def _write_advice(reason: str, read_only: bool) -> str:
    """What to do about a refused write, after its reason."""
    reason = reason.lower()
    if read_only or "readonly" in reason or "read-only" in reason or "permission" in reason:
        return " (it is read-only here: run where it can be written, or on a writable copy)"
    if "full" in reason or "no space" in reason:
        return " (free some disk space and run again)"
    if "locked" in reason:
        return " (another process held it too long: run again)"
    return ""


def _this_process() -> dict[str, Any]:
    """The columns of fl_runs that say which process runs a run: this one."""
    me = ProcessIdentity.current()
    return {"host": socket.gethostname(), "pid": me.pid, "pid_start": me.start_time,
            "boot_id": me.boot_id}


def _beat(store: weakref.ref[Store], run_id: str, stop: threading.Event) -> None:
    """A heartbeat thread's loop: refresh the run's heartbeat every HEARTBEAT_EVERY seconds
    until stopped or the store is gone."""
    while not stop.wait(HEARTBEAT_EVERY):
        alive = store()
        if alive is None:
            return
        try:
            alive.heartbeat(run_id)
        except (StoreError, SQLAlchemyError):
            pass  # the run's own next write reports what is wrong
        del alive


def _run_record(row: Any) -> RunRecord:
    data = dict(row._mapping)
    data["config"] = json.loads(data["config"])
    data["environment"] = json.loads(data["environment"])
    data["summary"] = json.loads(data["summary"]) if data["summary"] else None
    return RunRecord(**data)


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name.lower())
    return "-".join(part for part in keep.split("-") if part)[:40] or "run"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def safe_url(url: str) -> str:
    """A database URL fit to show: its password hidden."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL is shown as given
        return url
