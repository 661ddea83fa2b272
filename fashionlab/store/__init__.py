"""The experiment store: every run, model and epoch, in SQLite by default or any SQL database.

One database holds many runs (studies and searches). A run records its resolved config, seed,
package versions, code revision and machine; a model (one fold of a candidate, a retrained or
final model, a search trial's fold) records its status and outcome; an epoch row records the
metrics of one finished epoch, committed as soon as the epoch ends. Rows are keyed so that
writing the same epoch twice (after a resume) replaces it: nothing is stored twice.

The tables and their numbered migrations are `fashionlab.schema`'s; `Store` applies the missing
migrations when it opens a database.

    records   what a row reads as (RunRecord, ModelRecord, EpochRecord); whether its process runs
    engine    database URLs (the default SQLite file, a password hidden), SQLite's settings
    store     Store: open a database, write and read runs, models and epochs; the heartbeat
"""

from __future__ import annotations

from fashionlab.store.engine import (
    DB_NAME,
    DEFAULT_RUN_DIR,
    connect_args,
    database_trouble,
    database_url,
    default_url,
    make_folder,
    open_error,
    resolved_url,
    safe_url,
)
from fashionlab.store.records import (
    CLAIM_STALE_AFTER,
    HEARTBEAT_EVERY,
    LEFT_STALE_AFTER,
    STALE_AFTER,
    EpochRecord,
    ModelRecord,
    RunRecord,
    claim_alive,
    claim_grace,
    gone,
    this_process,
)
from fashionlab.store.store import Store, as_store

__all__ = [
    "CLAIM_STALE_AFTER",
    "DB_NAME",
    "DEFAULT_RUN_DIR",
    "HEARTBEAT_EVERY",
    "LEFT_STALE_AFTER",
    "STALE_AFTER",
    "EpochRecord",
    "ModelRecord",
    "RunRecord",
    "Store",
    "as_store",
    "claim_alive",
    "claim_grace",
    "connect_args",
    "database_trouble",
    "database_url",
    "default_url",
    "gone",
    "make_folder",
    "open_error",
    "resolved_url",
    "safe_url",
    "this_process",
]
