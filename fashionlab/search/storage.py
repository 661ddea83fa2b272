"""Where a search lives: Optuna's storage on the experiment store's database, and the lock by
which the workers sharing it take turns to start trials.

A lost trial (its worker killed, its machine gone) is failed once its heartbeat has been
silent for GRACE_PERIOD seconds and retried once with the same parameters; a worker on the
same machine notices a dead process at once (fashionlab.search).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from filelock import FileLock

from fashionlab.rng import derive_seed
from fashionlab.store import database_url

__all__ = ["GRACE_PERIOD", "HEARTBEAT_INTERVAL", "ClaimLock", "delete_study", "open_storage",
           "study_name"]

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's signs of life in the database
GRACE_PERIOD = 120  # a trial silent this long is failed and retried (once)


def study_name(search: str, fingerprint: str) -> str:
    """The Optuna study of a search: named after the search and the fingerprint of what it
    searches, the same as its store run's (`RunRecord.name`, `RunRecord.fingerprint`)."""
    return f"{search}-{fingerprint}"


def delete_study(url: str, name: str) -> bool:
    """Delete an Optuna study and its trials from the store's database; False when there was
    none of that name."""
    storage = open_storage(url)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return False
    finally:
        storage.engine.dispose()
    return True


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on the store's database, with heartbeats and one retry per lost trial."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            database_url(url), engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=GRACE_PERIOD,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1))


class ClaimLock:
    """One worker at a time may start a trial (or create or finish the search), whichever
    machine it runs on: an advisory lock of the database server, or a lock file beside a
    SQLite database (the `filelock` library: flock on Unix, msvcrt on Windows). Re-entrant
    release: releasing a free lock does nothing."""

    def __init__(self, url: str, name: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.dialect = self.engine.dialect.name
        self.key = derive_seed(0, "search", name)  # 63 bits: a PostgreSQL bigint
        self.name = f"fashionlab-{hashlib.sha256(name.encode()).hexdigest()[:40]}"
        database = sa.make_url(url).database if self.dialect == "sqlite" else None
        self.path = Path(f"{database}.search-lock") if database else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sa.Connection | None = None
        self._file: FileLock | None = None

    def acquire(self) -> None:
        if self._conn is not None or self._file is not None:
            return
        if self.dialect in ("postgresql", "mysql"):
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            sql = "SELECT pg_advisory_lock(:key)" if self.dialect == "postgresql" \
                else "SELECT GET_LOCK(:name, -1)"
            conn.execute(sa.text(sql), {"key": self.key, "name": self.name})
            self._conn = conn
        elif self.path is not None:
            # Not thread-local: whichever thread of this process releases it, it is released.
            lock = FileLock(self.path, timeout=-1, thread_local=False)
            lock.acquire()
            self._file = lock

    def release(self) -> None:
        if self._conn is not None:
            sql = "SELECT pg_advisory_unlock(:key)" if self.dialect == "postgresql" \
                else "SELECT RELEASE_LOCK(:name)"
            self._conn.execute(sa.text(sql), {"key": self.key, "name": self.name})
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.release(force=True)
            self._file = None

    def __enter__(self) -> ClaimLock:  # noqa: PYI034 - a final class
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
