"""The experiment store's tables and their numbered migrations.

Tables are prefixed `fl_` so that Optuna's tables can live in the same database. Schema changes
go through the migrations at the bottom, appended and never edited; `migrate` applies the
missing ones when a `Store` opens the database.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import sqlalchemy as sa

from fashionlab.errors import StoreError

__all__ = ["EPOCH_FIELDS", "METRICS", "MIGRATIONS", "MODEL_FIELDS", "checkpoints", "epochs",
           "jobs", "metadata", "migrate", "migrate_once", "models", "runs", "schema"]

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
    sa.Column("host", sa.String(200)),  # the machine that trained it (its last epoch)
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

# The jobs of a study (a cross-validation stack, a final model, the retrain, the writing of the
# outputs), claimed one at a time by the processes that train the run, on any machine.
jobs = sa.Table(
    "fl_jobs", metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fl_runs.id"), primary_key=True),
    sa.Column("key", sa.String(320), primary_key=True),  # "cv:<first member>", "final:<name>"
    sa.Column("label", sa.Text, nullable=False),  # as progress names it
    sa.Column("position", sa.Integer, nullable=False),  # claimed in this order: longest first
    sa.Column("threads", sa.Integer),  # CPU threads it trains with, whoever trains it
    sa.Column("status", sa.String(16), nullable=False),  # pending | claimed | done
    sa.Column("token", sa.Integer, nullable=False),  # claims so far: a stale claim's is lower
    sa.Column("claimed_by", sa.String(300)),  # "<host> pid <pid>" of the fashionlab command
    sa.Column("host", sa.String(200)),  # the process holding the claim (a worker's own pid)
    sa.Column("pid", sa.Integer),
    sa.Column("pid_start", sa.BigInteger),
    sa.Column("boot_id", sa.String(36)),
    sa.Column("heartbeat", sa.Float),  # last sign of life of the claim
)

# The newest checkpoint of a stack trained by a shared run, replaced with every epoch in the
# transaction that stores the epoch, so that any machine can continue the stack.
checkpoints = sa.Table(
    "fl_checkpoints", metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fl_runs.id"), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),  # the checkpoint file's name
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),  # the file's bytes, header included
)

MODEL_FIELDS = ("candidate", "role", "repeat", "fold", "status", "message", "epochs_planned",
                "best_epoch", "n_train", "n_val", "seed", "test_loss", "test_accuracy", "seconds",
                "host")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # of an epoch, as training reports
EPOCH_FIELDS = (*METRICS, "seconds")


# --------------------------------------------------------------------------------------------
# Migrations: append, never edit. Each takes a connection inside a transaction.


def _migration_1(conn: sa.Connection) -> None:
    for table in (runs, models, epochs):
        table.create(conn, checkfirst=True)


def _migration_2(conn: sa.Connection) -> None:
    # The identity of a run's process. Migration 1 creates the tables as defined today, so a
    # new database has the columns already: add only the missing ones.
    _add_columns(conn, runs, "pid_start", "boot_id")


def _migration_3(conn: sa.Connection) -> None:
    # Jobs claimed by the processes (on any machine) that train one study together, the
    # checkpoints they share, and which machine trained each model.
    _add_columns(conn, models, "host")
    for table in (jobs, checkpoints):
        table.create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        # Stored as is: weights do not compress, and trying (pglz) halved the write speed of
        # a 16 MB checkpoint (benchmarks/bench_shared_checkpoints.py: 0.52 s -> 0.35 s).
        conn.execute(sa.text("ALTER TABLE fl_checkpoints ALTER COLUMN data SET STORAGE EXTERNAL"))


MIGRATIONS = [_migration_1, _migration_2, _migration_3]


def migrate(engine: sa.Engine, attempts: int = 5, *, read_only: bool = False,
            create: bool = True, where: str = "") -> int:
    """Apply the missing migrations; returns the schema version.

    A store whose schema is current is only read, so a read-only one opens; a read-only one
    that needs a migration is a StoreError. `create=False` (a command that only looks) makes
    no store in a database that holds none (another program's database, an empty one on a
    server): a StoreError, as for a file that is not there.

    Workers on several machines may open a new store at the same moment: on PostgreSQL the
    migration holds an advisory lock, on SQLite the write lock from its first statement;
    elsewhere a migration that lost the race is retried (it then finds the work done).
    `where` names the store in errors."""
    for attempt in range(attempts):
        try:
            conn = engine.connect()
        except sa.exc.OperationalError:
            # A server that cannot be reached is said at once (each try may wait for the
            # connect timeout); a SQLite file held by a concurrent open is tried again.
            if engine.dialect.name != "sqlite" or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
            continue
        try:
            with conn:
                current = _schema_version(conn)
            if current == len(MIGRATIONS):
                return current
            if current > len(MIGRATIONS):
                raise _newer_schema(current)
            if current == 0 and not create:
                raise no_store(where)
            if read_only:
                raise StoreError(f"the store {where} needs an upgrade (schema version "
                                 f"{current} -> {len(MIGRATIONS)}) but is read-only: open it "
                                 "once where it can be written")
            return migrate_once(engine)
        except sa.exc.OperationalError:  # a concurrent open holds the database: try again
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


def no_store(where: str) -> StoreError:
    """What a command that only looks says of a place with no store in it."""
    return StoreError(f"no store at {where}: nothing has run there yet (`fashionlab study` "
                      "or `search` starts a run; --run-dir or --store names another store)")


def _newer_schema(current: int) -> StoreError:
    return StoreError(f"the store's schema (version {current}) is newer than this "
                      f"fashionlab (version {len(MIGRATIONS)}); upgrade fashionlab")


def _add_columns(conn: sa.Connection, table: sa.Table, *names: str) -> None:
    present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name not in present:
            kind = table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))
