"""Jobs of one run shared by the processes that train it, on one machine or on many.

A study's jobs (each cross-validation stack, each final model, the retrain, the writing of the
outputs) are rows of `fl_jobs`. A process claims one at a time, in the database: on PostgreSQL
with a row lock (`SELECT ... FOR UPDATE SKIP LOCKED`: two processes never wait on, nor both
take, the same row), on SQLite under its write lock. A claim is held while its process lives:
on its own machine, while that very process runs (pid, start time, boot: `store.gone`);
elsewhere, while its heartbeat is younger than the grace period (`claim_grace`). The heartbeat
is refreshed by a thread every sixth of the grace period and by every stored epoch. Once the
claim is stale the job is claimed again, and each claim has a higher token: every epoch is
stored only if the claim that trains it is still the job's newest (checked in the epoch's own
transaction), so a process that lost its claim (paused past the grace period, cut off from
the database) stores nothing more and two processes never both store a job.

A process may also say that it takes part in a run, between its jobs too (a search's worker
from one trial to the next): its presence, a row of `fl_jobs` that is no job (`be_present`),
claimed and judged alive as a job's claim is. `held_elsewhere` and a run's liveness count it;
`job_rows` does not list it.

Where the store is a database server (other machines may take a job over), a stack's newest
checkpoint travels with its epochs: replaced in `fl_checkpoints` in the same transaction
(`Claim.keep`), fetched before the stack trains (`fetch_checkpoint`). On SQLite (one machine)
the checkpoint files of the run's directory are shared already.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from filelock import FileLock

from fashionlab.errors import StoreError
from fashionlab.rng import derive_seed
from fashionlab.schema import checkpoints, jobs
from fashionlab.store import (
    CLAIM_STALE_AFTER,
    Store,
    claim_alive,
    claim_grace,
    connect_args,
    make_folder,
    open_error,
    this_process,
)

__all__ = ["DEFAULT_GRACE", "Claim", "ClaimLock", "ClaimLost", "JobRow", "be_present",
           "claim_grace", "claim_job", "close_claims", "command_identity", "drop_checkpoints",
           "fetch_checkpoint", "held_elsewhere", "job_rows", "register_jobs", "release_claims",
           "reopen_job"]

# A claim whose heartbeat is this old, held by a process of another machine (or one whose
# liveness cannot be told), is taken over: `claim_grace()` (fashionlab.store, where every
# reader of a claim's liveness finds it).
DEFAULT_GRACE = CLAIM_STALE_AFTER

PRESENCE = "present:"  # the key prefix of a process's presence in a run (`be_present`)
_A_JOB = jobs.c.key.not_like(f"{PRESENCE}%")  # a row of fl_jobs that is a job, no presence


def command_identity() -> str:
    """How a claim names the fashionlab command that holds it (its worker processes name
    their parent): "<host> pid <pid>"."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class ClaimLost(Exception):
    """The job was claimed by another process after this one's claim went stale: this one
    stops training it (nothing of the epoch at hand was stored)."""


@dataclass(frozen=True)
class JobRow:
    key: str
    label: str
    position: int
    threads: int | None
    status: str  # pending | claimed | done
    token: int
    claimed_by: str | None
    host: str | None
    pid: int | None
    pid_start: int | None
    boot_id: str | None
    heartbeat: float | None

    @property
    def holder(self) -> dict[str, Any]:
        """Which process holds the claim (the columns `store.this_process()` fills)."""
        return {"host": self.host, "pid": self.pid, "pid_start": self.pid_start,
                "boot_id": self.boot_id}

    def claimable(self, grace: float) -> bool:
        """Not done, and not claimed by a process that is alive."""
        if self.status == "pending":
            return True
        return self.status == "claimed" and not claim_alive(
            self.host, self.pid, self.pid_start, self.boot_id, self.heartbeat, grace)


def _row(row: Any) -> JobRow:
    data = dict(row._mapping)
    data.pop("run_id")
    return JobRow(**data)


def register_jobs(store: Store, run_id: str, planned: Sequence[tuple[str, str]],
                  threads: int) -> int:
    """Record a run's jobs, (key, label) in the order to claim them, pending, unless they
    exist already (another process registered them); returns the threads per job recorded
    with them, the first registration's."""
    def new_rows(existing: dict[str, Any]) -> list[dict[str, Any]]:
        start = max((r.position for r in existing.values()), default=-1) + 1
        return [{"run_id": run_id, "key": key, "label": label, "position": start + i,
                 "threads": threads, "status": "pending", "token": 0}
                for i, (key, label) in enumerate(k for k in planned if k[0] not in existing)]

    existing = store.insert_missing(jobs, run_id, new_rows)
    recorded = [r.threads for r in existing.values() if r.threads]
    return recorded[0] if recorded else threads


def job_rows(store: Store, run_id: str) -> dict[str, JobRow]:
    """The run's jobs by key, in their order (not the presences of its processes)."""
    return _rows(store, run_id, _A_JOB)


def _rows(store: Store, run_id: str, where: sa.ColumnElement[bool] | None = None
          ) -> dict[str, JobRow]:
    with store.reading() as conn:
        query = sa.select(jobs).where(jobs.c.run_id == run_id).order_by(jobs.c.position)
        rows = conn.execute(query if where is None else query.where(where))
        return {r.key: _row(r) for r in rows}


def be_present(store: Store, run_id: str, *, by: str) -> Claim | None:
    """Say that this process (of the command `by`) takes part in the run, until the claim
    returned is done: between its jobs too, where it holds none. A search's worker is so
    from one trial to the next, while it waits for the lock to start one or finishes the
    search: a worker stopped meanwhile sees the search go on in it."""
    me = this_process()
    key = f"{PRESENCE}{me['host']} pid {me['pid']} started {me['pid_start']}"

    def new_row(existing: dict[str, Any]) -> list[dict[str, Any]]:
        return [] if key in existing else [{"run_id": run_id, "key": key, "label": by,
                                            "position": -1, "status": "pending", "token": 0}]

    store.insert_missing(jobs, run_id, new_row)
    return claim_job(store, run_id, key, by=by)


def claim_job(store: Store, run_id: str, key: str, *, by: str,
              grace: float | None = None) -> Claim | None:
    """Claim the job for this process (on behalf of the command `by`), or None when it is
    done, being claimed at this moment, or held by a live process."""
    grace = claim_grace() if grace is None else grace
    with store.transaction(exclusive=True) as conn:
        row = conn.execute(sa.select(jobs).where((jobs.c.run_id == run_id) & (jobs.c.key == key))
                           .with_for_update(skip_locked=True)).first()
        if row is None:
            return None
        job = _row(row)
        if not job.claimable(grace):
            return None
        conn.execute(jobs.update().where((jobs.c.run_id == run_id) & (jobs.c.key == key))
                     .values(status="claimed", token=job.token + 1, claimed_by=by,
                             heartbeat=time.time(), **this_process()))
    return Claim(store, run_id, key, job.token + 1, job.threads, grace)


class Claim:
    """This process's claim of a job: beats until `done` or `release`."""

    def __init__(self, store: Store, run_id: str, key: str, token: int, threads: int | None,
                 grace: float) -> None:
        self.store, self.run_id, self.key, self.token = store, run_id, key, token
        self.threads = threads
        self._stop = threading.Event()
        if not store.in_memory:  # nobody else could take its jobs over: nothing to beat for
            threading.Thread(target=self._beat, args=(grace / 6,), daemon=True,
                             name=f"fashionlab-claim-{key}").start()

    @property
    def shares_checkpoints(self) -> bool:
        """Whether the job's checkpoints travel through the database (other machines may
        take it over), not only the run directory's files."""
        return self.store.shared

    def _mine(self) -> sa.ColumnElement[bool]:
        return (jobs.c.run_id == self.run_id) & (jobs.c.key == self.key) \
            & (jobs.c.token == self.token) & (jobs.c.status == "claimed")

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            # A failed beat is not fatal: the next stored epoch reports what is wrong.
            with contextlib.suppress(StoreError, sa.exc.SQLAlchemyError), \
                    self.store.transaction() as conn:
                conn.execute(jobs.update().where(self._mine()).values(heartbeat=time.time()))

    def keep(self, conn: sa.Connection, checkpoint: tuple[str, int, bytes] | None) -> None:
        """Inside an epoch's transaction: check that the claim is still this process's (else
        ClaimLost, undoing the transaction), refresh its heartbeat and replace the stack's
        stored checkpoint with (file name, epoch, bytes) when given."""
        held = conn.execute(sa.select(jobs.c.token).where(self._mine())
                            .with_for_update()).first()
        if held is None:
            raise ClaimLost(f"job {self.key} was taken over by another process")
        conn.execute(jobs.update().where(self._mine()).values(heartbeat=time.time()))
        if checkpoint is not None:
            name, epoch, data = checkpoint
            where = (checkpoints.c.run_id == self.run_id) & (checkpoints.c.name == name)
            conn.execute(checkpoints.delete().where(where))
            conn.execute(checkpoints.insert().values(run_id=self.run_id, name=name,
                                                     epoch=epoch, data=data))

    def held(self) -> bool:
        """Whether the claim is still this process's: not done, given back or taken over."""
        with self.store.reading() as conn:
            return conn.execute(sa.select(jobs.c.token).where(self._mine())).first() is not None

    def done(self) -> None:
        """The job is finished: nobody claims it again."""
        self._stop.set()
        with self.store.transaction() as conn:
            conn.execute(jobs.update().where(self._mine()).values(status="done",
                                                                  heartbeat=time.time()))

    def release(self) -> None:
        """Give the job back (pending) unless done: another process may take it at once."""
        self._stop.set()
        with self.store.transaction() as conn:
            conn.execute(jobs.update().where(self._mine()).values(status="pending"))


def held_elsewhere(store: Store, run_id: str) -> bool:
    """Whether a live process other than this one holds a job of the run, or is present in it
    (its claim: on this machine, while that process runs; elsewhere, while its heartbeat is
    fresh)."""
    me = this_process()
    return any(row.status == "claimed" and (row.host, row.pid) != (me["host"], me["pid"])
               and claim_alive(row.host, row.pid, row.pid_start, row.boot_id, row.heartbeat)
               for row in _rows(store, run_id).values())  # presences too


def close_claims(store: Store, run_id: str, *, keep: Collection[str] = ()) -> None:
    """Mark the run's claimed jobs done, but those in `keep`: work that ended without its
    claim's process saying so (a search's trials, failed once their worker was lost)."""
    query = jobs.update().where((jobs.c.run_id == run_id) & (jobs.c.status == "claimed")
                                & _A_JOB)  # a presence is no work of its own
    if keep:
        query = query.where(jobs.c.key.not_in(list(keep)))
    with store.transaction() as conn:
        conn.execute(query.values(status="done"))


def reopen_job(store: Store, run_id: str, key: str) -> None:
    """Make a done job pending again (its work is found undone: a run's outputs, when the run
    did not finish)."""
    with store.transaction() as conn:
        conn.execute(jobs.update().where((jobs.c.run_id == run_id) & (jobs.c.key == key)
                                         & (jobs.c.status == "done")).values(status="pending"))


def release_claims(store: Store, run_id: str, *, by: str | None = None) -> None:
    """Give back the run's claimed jobs: those of the command `by` (which is stopping), or
    all of them (a run resumed on SQLite, which no other process trains)."""
    query = jobs.update().where((jobs.c.run_id == run_id) & (jobs.c.status == "claimed"))
    if by is not None:
        query = query.where(jobs.c.claimed_by == by)
    with store.transaction() as conn:
        conn.execute(query.values(status="pending"))


def fetch_checkpoint(store: Store, run_id: str, name: str) -> bytes | None:
    """The stored checkpoint file (its bytes) of a shared run's stack, or None."""
    with store.reading() as conn:
        return conn.execute(sa.select(checkpoints.c.data).where(
            (checkpoints.c.run_id == run_id) & (checkpoints.c.name == name))).scalar()


def drop_checkpoints(store: Store, run_id: str) -> None:
    """Delete a run's stored checkpoints (once its outputs are written)."""
    with store.transaction() as conn:
        conn.execute(checkpoints.delete().where(checkpoints.c.run_id == run_id))


class ClaimLock:
    """One process at a time, whichever machine it runs on: an advisory lock of the database
    server, or a lock file beside a SQLite database (the `filelock` library: flock on Unix,
    msvcrt on Windows). A search's workers take it to start a trial, a study's processes to
    create or join a run. Re-entrant release: releasing a free lock does nothing."""

    def __init__(self, url: str, name: str, *, kind: str = "search") -> None:
        try:  # the first to open the URL (before the store): a bad one is said in one line
            self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool,
                                           connect_args=connect_args(url))
        except (ImportError, ValueError, sa.exc.SQLAlchemyError) as error:
            raise open_error(url, error) from None
        self.dialect = self.engine.dialect.name
        self.key = derive_seed(0, kind, name)  # 63 bits: a PostgreSQL bigint
        self.name = f"fashionlab-{hashlib.sha256(name.encode()).hexdigest()[:40]}"
        database = self.engine.url.database if self.dialect == "sqlite" else None
        self.path = Path(f"{database}.{kind}-lock") if database else None
        if self.path is not None:
            make_folder(self.path.parent)
        self._conn: sa.Connection | None = None
        self._file: FileLock | None = None

    def acquire(self) -> None:
        if self._conn is not None or self._file is not None:
            return
        if self.dialect in ("postgresql", "mysql"):
            sql = "SELECT pg_advisory_lock(:key)" if self.dialect == "postgresql" \
                else "SELECT GET_LOCK(:name, -1)"
            conn = None
            try:  # a search's first connection to the server: a wrong password is said here
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(sa.text(sql), {"key": self.key, "name": self.name})
            except sa.exc.SQLAlchemyError as error:
                if conn is not None:
                    with contextlib.suppress(sa.exc.SQLAlchemyError):
                        conn.close()
                raise open_error(str(self.engine.url), error) from None
            self._conn = conn
        elif self.path is not None:
            # Not thread-local: whichever thread of this process releases it, it is released.
            lock = FileLock(self.path, timeout=-1, thread_local=False)
            try:
                lock.acquire()
            except OSError as error:  # a read-only run directory, a full disk
                # A read-only copy of a finished search is still read by the commands that
                # only look (a search, even a finished one, takes this lock).
                refused = error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
                hint = "; `fashionlab runs show` and `fashionlab report --out FILE` read a " \
                    "read-only store" if refused else ""
                raise StoreError(f"{self.path}: cannot create the lock file beside the store "
                                 f"({error.strerror or error}){hint}") from None
            self._file = lock

    def release(self) -> None:
        if self._conn is not None:
            sql = "SELECT pg_advisory_unlock(:key)" if self.dialect == "postgresql" \
                else "SELECT RELEASE_LOCK(:name)"
            conn, self._conn = self._conn, None  # released, whatever happens next
            try:
                # A connection the server dropped (it stopped) holds no lock any more: what
                # stopped the work is the error to say, not this one.
                with contextlib.suppress(sa.exc.OperationalError, sa.exc.InterfaceError):
                    conn.execute(sa.text(sql), {"key": self.key, "name": self.name})
            finally:
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    conn.close()
        if self._file is not None:
            self._file.release(force=True)
            self._file = None
        self.engine.dispose()

    def __enter__(self) -> ClaimLock:  # noqa: PYI034 - a final class
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
