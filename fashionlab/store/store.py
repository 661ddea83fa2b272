"""`Store`, access to the experiment store: runs, their models and their epochs written and
read, each write in a transaction whose refusal is a one-line StoreError, and a heartbeat thread
that keeps alive a run this process runs.

The tables and their numbered migrations are `fashionlab.schema`'s; `Store` applies the missing
migrations when it opens a database.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fashionlab.errors import StoreError
from fashionlab.schema import (
    EPOCH_FIELDS,
    MODEL_FIELDS,
    checkpoints,
    epochs,
    jobs,
    migrate,
    models,
    no_store,
    runs,
    schema,
)
from fashionlab.serialize import file_in_the_way, jsonable
from fashionlab.store.engine import (
    DB_NAME,
    DEFAULT_RUN_DIR,
    connect_args,
    database_url,
    holds_rows,
    make_folder,
    open_error,
    read_only_url,
    refuse_damaged_file,
    resolved_url,
    safe_url,
    sqlite_file,
    sqlite_pragmas,
    sqlite_read_only_pragmas,
    sqlite_read_only_url,
    writable,
)
from fashionlab.store.records import (
    HEARTBEAT_EVERY,
    EpochRecord,
    ModelRecord,
    RunRecord,
    claim_alive,
    this_process,
)
from fashionlab.text import first_line


def _none_if_nan(value: float | None) -> float | None:
    # NaN is not portable across databases (PostgreSQL accepts it, SQLite stores NULL); store
    # NULL and read it back as NaN.
    return None if value is None or math.isnan(value) else float(value)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


class Store:
    """Access to the experiment store. `Store(url)` with any SQLAlchemy URL, or
    `Store.open(run_dir, url)` for the default layout (a SQLite file in the run directory).

    A SQLite file that this user cannot write (the file or its folder), or any SQLite file
    with `read_only=True`, opens in SQLite's read-only mode: everything reads, nothing is
    written on open, and a write is a StoreError. A database server's own permissions decide
    there. A write that fails (read-only, disk full, no permission) is a one-line StoreError.
    `create=False` (commands that only look) refuses a SQLite file that does not exist instead
    of creating it, and its folder, where a mistyped path points; and a database without a
    store in it (an empty file, another program's tables) instead of making one there.
    """

    def __init__(self, url: str, *, read_only: bool = False, create: bool = True) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url: expected a database URL string, got {url!r} "
                            "(Store.open(run_dir) opens the store of a run directory)")
        self.url = url = database_url(url)
        self._beats: dict[str, threading.Event] = {}  # run id -> stops its heartbeat thread
        path: Path | None = None
        self._file, self.read_only, self._in_memory = None, read_only, False
        try:
            try:
                engine_url = sa.make_url(url)
            except ValueError as error:  # not from the database: a port like "abc"
                raise open_error(url, error) from None
            path = sqlite_file(engine_url)
            self._file = path
            blocking = None if path is None else file_in_the_way(path.parent)
            if blocking is not None:  # --run-dir naming a file
                raise StoreError(f"cannot open the store {path}: {blocking} is a file, not "
                                 "a folder")
            if path is not None and path.is_dir():  # a URL naming a folder (SQLite: "unable
                # to open database file")
                raise StoreError(f"cannot open the store {path}: a folder, not a database "
                                 "file (a run directory's store is its fashionlab.db)")
            # (nor one without a store in it: an empty file, another program's database)
            if path is not None and not create and (not path.exists() or (
                    path.is_file() and not holds_rows(path, schema.name))):
                raise no_store(str(path))
            self.read_only = read_only or read_only_url(engine_url) or (
                path is not None and path.exists() and not writable(path))
            if path is not None and self.read_only:
                engine_url = sqlite_read_only_url(path)
            elif path is not None:
                try:
                    make_folder(path.parent)
                except StoreError as error:
                    raise StoreError(f"cannot open the store {safe_url(url)}: {error}") \
                        from None
            # An in-memory SQLite database lives in one connection: share it (tests).
            self._in_memory = engine_url.drivername.startswith("sqlite") and path is None
            self._connect(engine_url, create=create)
        except (ImportError, SQLAlchemyError, OSError) as error:  # ImportError: no driver
            if create or self.read_only or path is None or not _side_files_refused(error, path):
                problem = open_error(url, error)
                if path is not None and _disk_full(path.parent):  # SQLite: "disk I/O error"
                    problem = StoreError(f"{problem} (the disk is full: free some space and "
                                         "run again)")
                raise problem from None
            # A command that only looks, on a full disk: SQLite could not make the side files
            # (-shm) a WAL reader writes. Nothing is being written (no -wal holds pages), so
            # the file is read as it is, as a copy nobody writes.
            if hasattr(self, "engine"):
                self.engine.dispose()
            self.read_only = True
            try:
                self._connect(sqlite_read_only_url(path, immutable=True), create=False)
            except (SQLAlchemyError, OSError):
                raise open_error(url, error) from None

    def _connect(self, engine_url: sa.URL, *, create: bool) -> None:
        """The engine, its connections' settings, and the schema checked (or made)."""
        self.engine = sa.create_engine(
            engine_url, poolclass=sa.pool.StaticPool if self._in_memory else None,
            connect_args={"check_same_thread": False} if self._in_memory
            else connect_args(engine_url))
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect",
                            sqlite_read_only_pragmas if self.read_only else sqlite_pragmas)
            where = str(self._file) if self._file is not None else safe_url(self.url)
            sa.event.listen(self.engine, "handle_error",
                            functools.partial(refuse_damaged_file, where=where))
        migrate(self.engine, read_only=self.read_only, create=create,
                where=str(self._file) if self._file is not None else safe_url(self.url))

    @classmethod
    def open(cls, run_dir: str | Path = DEFAULT_RUN_DIR, url: str | None = None, *,
             read_only: bool = False, create: bool = True) -> Store:
        """The store at `resolved_url(url, run_dir)`: `url`, else FASHIONLAB_STORE's, else
        the SQLite file in `run_dir`."""
        return cls(resolved_url(url, run_dir),
                   read_only=read_only, create=create)

    def close(self) -> None:
        for stop in self._beats.values():
            stop.set()
        self._beats.clear()
        self.engine.dispose()

    @property
    def in_memory(self) -> bool:
        """An in-memory SQLite database: one connection, which no other process sees."""
        return self._in_memory

    @property
    def run_dir(self) -> Path | None:
        """The run directory whose store this is, where its runs' files are `<run_dir>/<run
        id>` whatever folder the store recorded (a run directory copied or moved keeps the
        original's paths in its store): the folder of a SQLite file named fashionlab.db. None
        for any other store (a database server, a SQLite file named otherwise)."""
        if self._file is None or self._file.name != DB_NAME:
            return None
        return self._file.parent.resolve()

    def seen_run(self, run_id: str, run_dir: str | Path | None = None) -> RunRecord:
        """The run (`run`) with its files where they are, seen from `run_dir` (default: this
        store's own run directory): `RunRecord.seen_from`."""
        return self.run(run_id).seen_from(self.run_dir if run_dir is None else run_dir)

    def run_dir_holding(self, run_id: str) -> Path | None:
        """This store's run directory where it holds the run's folder (`<run_dir>/<run
        id>`), else None: the folder the store recorded is the run's (a store opened by URL
        beside another run directory)."""
        if self.run_dir is None or not (self.run_dir / run_id).is_dir():
            return None
        return self.run_dir

    def has_table(self, name: str) -> bool:
        """Whether the store's database has this table (another library's, sharing it: Optuna's
        `studies`), found without creating anything."""
        with self.reading() as conn:
            return sa.inspect(conn).has_table(name)

    @property
    def shared(self) -> bool:
        """Whether other machines may use this store (a database server, not a SQLite file)."""
        return self.engine.dialect.name != "sqlite"

    @contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[sa.Connection]:
        """A write transaction; one the database refuses is a StoreError naming the store.
        `exclusive` takes SQLite's write lock from the start, so that what the transaction
        reads cannot change before it writes (a server database locks the rows it selects
        FOR UPDATE instead)."""
        try:
            with self.engine.begin() as conn:
                if exclusive and self.engine.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
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
    def reading(self) -> Iterator[sa.Connection]:
        """A connection to read with; a database that cannot be read is a StoreError."""
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
        with self.transaction() as conn:
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
                started=now, heartbeat=now, **this_process(),
                output_dir=str(Path(output_root).resolve() / run_id) if output_root else None,
            ))
        self._keep_alive(run_id)
        return self.run(run_id)

    def claim_run(self, run_id: str) -> RunRecord:
        """Mark an existing run as running in this process (resuming it); its heartbeat beats
        until end_run (or close)."""
        with self.transaction() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(
                status="running", heartbeat=time.time(), finished=None, **this_process()))
        self._keep_alive(run_id)
        return self.run(run_id)

    def join_run(self, run_id: str) -> RunRecord:
        """Take part in a run that another process runs (a study trained by several machines):
        its row stays the other's, and this process's heartbeat keeps it alive too, until
        close."""
        self._keep_alive(run_id)
        return self.run(run_id)

    def hand_over_run(self, run_id: str, holder: Mapping[str, Any]) -> None:
        """Leave a running run to another process that goes on running it (a study trained by
        several processes, whose outputs another one writes): the row then names that process
        (`holder`: its host, pid, pid_start and boot_id, as `this_process()` gives them), so
        the run reads as running while that process lives, not while this one did. A run that
        has ended meanwhile is left as it is."""
        self._stop_beating(run_id)
        with self.transaction() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id, runs.c.status == "running")
                         .values(**{k: holder[k] for k in ("host", "pid", "pid_start",
                                                            "boot_id")}))

    def leave_run(self, run_id: str) -> None:
        """Stop running a run that other processes go on running (a search's workers, a
        study's processes that hold its jobs): its row names no process, so it reads as
        running while their heartbeats are fresh, and the next of them to beat takes it."""
        self.hand_over_run(run_id, {"host": None, "pid": None, "pid_start": None,
                                    "boot_id": None})

    def heartbeat(self, run_id: str) -> None:
        """Say that this process still runs the run; a running run that names no process (its
        holder left it to the others, as a search's worker does when it is done) is taken
        over: it then reads as interrupted as soon as this process is gone, not only after
        STALE_AFTER without a beat."""
        with self.transaction() as conn:
            _beat_run(conn, run_id)

    def end_run(self, run_id: str, status: str, summary: dict[str, Any] | None = None, *,
                output_dir: str | Path | None = None, if_held_here: bool = False,
                finished: float | None = None) -> None:
        """This process stops running the run: finished, failed, or interrupted (left to
        resume, by this process too). `output_dir`: where its files are now (a run trained
        by several machines ends with the outputs of the one that wrote them).
        `if_held_here`: only while the row names this process, or none (a search's worker
        stopped while another may have just taken the row to start a trial). `finished`:
        when it ended, where that was earlier (its results written again: not a longer run)."""
        self._stop_beating(run_id)
        now = time.time()
        with self.transaction() as conn:
            values: dict[str, Any] = {"status": status, "finished": finished or now,
                                      "heartbeat": now}
            if summary is not None:
                values["summary"] = json.dumps(jsonable(summary), allow_nan=False)
            if output_dir is not None:
                values["output_dir"] = str(Path(output_dir).resolve())
            query = runs.update().where(runs.c.id == run_id)
            if if_held_here:
                me = this_process()
                query = query.where(runs.c.pid.is_(None) | (
                    (runs.c.pid == me["pid"]) & (runs.c.host == me["host"])))
            conn.execute(query.values(**values))

    def run(self, run_id: str, *, damaged_ok: bool = False) -> RunRecord:
        """The run with this id, or a unique id prefix; StoreError when there is none.
        `damaged_ok`: a row whose JSON was changed by hand comes back with it empty (to be
        deleted) instead of as a StoreError."""
        if not isinstance(run_id, str):
            raise TypeError(f"run id: expected a string, got {type(run_id).__name__} "
                            f"{run_id!r}")
        if not run_id.strip():  # an empty prefix would match every run (the only one, or all)
            raise StoreError("the run id is empty (`fashionlab runs list` shows the runs)")
        with self.reading() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                matches = conn.execute(
                    sa.select(runs).where(runs.c.id.like(f"{_escape_like(run_id)}%", escape="\\"))
                ).all()
                if len(matches) > 1:
                    ids = sorted(match.id for match in matches)
                    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3
                                                  else "")
                    raise StoreError(f"run id '{run_id}' is ambiguous ({len(matches)} runs "
                                     f"match: {shown})")
                row = matches[0] if matches else None
            if row is not None:
                return _jobs_held(conn, [_run_record(row, self.url, damaged_ok=damaged_ok)])[0]
        raise StoreError(f"no run '{run_id}' in {safe_url(self.url)} "
                         "(`fashionlab runs list` shows the runs)")

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
        with self.reading() as conn:
            return _jobs_held(conn, [_run_record(row, self.url) for row in conn.execute(query)])

    def delete_run(self, run_id: str) -> None:
        run_id = self.run(run_id, damaged_ok=True).id
        self._stop_beating(run_id)
        with self.transaction() as conn:
            conn.execute(epochs.delete().where(epochs.c.run_id == run_id))
            conn.execute(jobs.delete().where(jobs.c.run_id == run_id))
            conn.execute(checkpoints.delete().where(checkpoints.c.run_id == run_id))
            conn.execute(models.delete().where(models.c.run_id == run_id))
            conn.execute(runs.delete().where(runs.c.id == run_id))

    # ---- models and epochs ----------------------------------------------------------------

    def insert_missing(
        self, table: sa.Table, run_id: str,
        new_rows: Callable[[dict[str, sa.Row[Any]]], list[dict[str, Any]]],
    ) -> dict[str, sa.Row[Any]]:
        """Insert `new_rows(existing)` into a run's rows of `table` (keyed by `key`), in one
        exclusive transaction; returns the rows that existed, by key. Another process of a
        shared run inserting the same rows at the same moment fails this one's insert: the
        second attempt finds them."""
        def insert() -> dict[str, sa.Row[Any]]:
            with self.transaction(exclusive=True) as conn:
                existing = {r.key: r for r in conn.execute(
                    sa.select(table).where(table.c.run_id == run_id))}
                new = new_rows(existing)
                if new:
                    conn.execute(table.insert(), new)
            return existing

        try:
            return insert()
        except sa.exc.IntegrityError:
            return insert()

    def register_models(self, run_id: str, rows: Iterable[dict[str, Any]]) -> None:
        """Insert the planned models of a run (status pending) unless they already exist."""
        rows = list(rows)
        self.insert_missing(models, run_id, lambda existing: [
            {"run_id": run_id, "status": "pending", **row}
            for row in rows if row["key"] not in existing])

    def update_model(self, run_id: str, key: str, **values: Any) -> None:
        unknown = set(values) - set(MODEL_FIELDS)
        if unknown:
            raise ValueError(f"unknown model fields: {sorted(unknown)}")
        values = {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in values.items()}
        with self.transaction() as conn:
            conn.execute(models.update().where(
                (models.c.run_id == run_id) & (models.c.key == key)).values(**values))

    def record_epochs(
        self, run_id: str, rows: Sequence[tuple[str, int, Sequence[float]]],
        model_updates: dict[str, dict[str, Any]] | None = None,
        *, within: Callable[[sa.Connection], None] | None = None,
    ) -> None:
        """Write epoch rows (key, epoch, (loss, accuracy, val_loss, val_accuracy, seconds)) and
        model status changes in one transaction; an existing (key, epoch) row is replaced.
        `within(conn)` runs last in the same transaction (a job's claim checked, its
        checkpoint stored): whatever it raises undoes the whole. A run deleted meanwhile (by
        another process) is a one-line StoreError, not the database's foreign-key error."""
        try:
            self._record_epochs(run_id, rows, model_updates, within)
        except sa.exc.IntegrityError:
            with self.reading() as conn:
                gone = conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() \
                    is None
            if not gone:
                raise
            raise StoreError(f"run {run_id} is no longer in the store {safe_url(self.url)}: "
                             "it was deleted while this process trained it") from None

    def _record_epochs(self, run_id: str, rows: Sequence[tuple[str, int, Sequence[float]]],
                       model_updates: dict[str, dict[str, Any]] | None,
                       within: Callable[[sa.Connection], None] | None) -> None:
        with self.transaction() as conn:
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
            _beat_run(conn, run_id)
            if within is not None:
                within(conn)

    def models(self, run_id: str) -> list[ModelRecord]:
        with self.reading() as conn:
            rows = conn.execute(sa.select(models).where(models.c.run_id == run_id)
                                .order_by(models.c.candidate, models.c.repeat, models.c.fold))
            return [ModelRecord(**row._mapping) for row in rows]

    def epochs(self, run_id: str, key: str | None = None) -> list[EpochRecord]:
        query = sa.select(epochs).where(epochs.c.run_id == run_id)
        if key is not None:
            query = query.where(epochs.c.key == key)
        with self.reading() as conn:
            rows = conn.execute(query.order_by(epochs.c.key, epochs.c.epoch))
            return [EpochRecord(row.key, row.epoch, *(_nan_if_none(getattr(row, f))
                                                      for f in EPOCH_FIELDS)) for row in rows]

    def histories(self, run_id: str) -> dict[str, list[EpochRecord]]:
        out: dict[str, list[EpochRecord]] = {}
        for record in self.epochs(run_id):
            out.setdefault(record.key, []).append(record)
        return out


# --------------------------------------------------------------------------------------------


def as_store(value: object) -> Store:
    """`value`, a Store; any other is a TypeError saying how to open one (a run directory
    given in its place is the likely slip)."""
    if isinstance(value, Store):
        return value
    hint = (f" (Store.open({str(value)!r}) opens a run directory's store)"
            if isinstance(value, str | os.PathLike) else "")
    raise TypeError(f"store: expected a fashionlab Store, got {type(value).__name__}{hint}")


def _disk_full(folder: Path) -> bool:
    """Whether the file system of `folder` (or of its nearest existing parent) has less than
    a page of SQLite's to give."""
    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free < 64 * 1024
            except OSError:
                return False
    return False


def _side_files_refused(error: BaseException, path: Path) -> bool:
    """Whether opening an existing SQLite file failed where SQLite writes beside it (a full
    disk: "disk I/O error", "database or disk is full") while no writer's pages wait in its
    -wal, so that the file alone holds everything stored."""
    if not path.is_file() or not any(
            reason in str(error) for reason in ("disk I/O error", "disk is full")):
        return False
    wal = path.with_name(path.name + "-wal")
    return not wal.exists() or wal.stat().st_size == 0


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


def _beat_run(conn: sa.Connection, run_id: str) -> None:
    """A run's heartbeat, from a process that runs it (see `Store.heartbeat`)."""
    conn.execute(runs.update().where(runs.c.id == run_id).values(heartbeat=time.time()))
    conn.execute(runs.update().where(runs.c.id == run_id, runs.c.status == "running",
                                     runs.c.pid.is_(None)).values(**this_process()))


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


def _jobs_held(conn: sa.Connection, records: list[RunRecord]) -> list[RunRecord]:
    """The records, those whose process is gone but whose jobs a live process holds marked
    so (`RunRecord.jobs_held`): a run trained by several machines (a study's jobs, a search's
    trials) outlives its first."""
    silent = [r.id for r in records if r.state == "interrupted" and r.status == "running"]
    if not silent:
        return records
    claims = conn.execute(sa.select(jobs.c.run_id, jobs.c.host, jobs.c.pid, jobs.c.pid_start,
                                    jobs.c.boot_id, jobs.c.heartbeat)
                          .where(jobs.c.run_id.in_(silent), jobs.c.status == "claimed"))
    held = {c.run_id for c in claims
            if claim_alive(c.host, c.pid, c.pid_start, c.boot_id, c.heartbeat)}
    return [dataclasses.replace(r, jobs_held=True) if r.id in held else r for r in records]


def _run_record(row: Any, url: str, *, damaged_ok: bool = False) -> RunRecord:
    """The run of a `runs` row. Its JSON columns are written whole by fashionlab; one that
    does not parse was changed outside it: a one-line StoreError naming the run, or with
    `damaged_ok` (what deleting the run needs) empty values in its place."""
    data = dict(row._mapping)
    for column, empty in (("config", {}), ("environment", {}), ("summary", None)):
        if data[column] is None and column == "summary":
            continue
        try:
            data[column] = json.loads(data[column])
        except ValueError:
            if not damaged_ok:
                raise StoreError(f"run {data['id']} in the store {safe_url(url)}: its "
                                 f"{column} is not valid JSON (changed outside fashionlab); "
                                 f"`fashionlab runs delete {data['id']}` removes the run"
                                 ) from None
            data[column] = empty
    return RunRecord(**data)


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name.lower())
    return "-".join(part for part in keep.split("-") if part)[:40] or "run"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
