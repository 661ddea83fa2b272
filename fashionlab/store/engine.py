"""Where a store's database is and how it is opened: its URL (a PostgreSQL driver that is
installed, the SQLite file of a run directory, a password hidden when shown), SQLite's read-only
mode for a file this user cannot write, and the pragmas of each SQLite connection."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import select
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import sqlalchemy as sa

from fashionlab import stops
from fashionlab.errors import StoreError
from fashionlab.serialize import file_in_the_way
from fashionlab.text import first_line, one_line, shortened

# A Ctrl-C that lands while a finaliser gives a connection back to its pool is logged there
# with its traceback: said once by the command instead. (Each kind of pool logs as its class,
# "sqlalchemy.pool.impl.QueuePool", and a logger's filter sees only its own records.)
for _pool in vars(sa.pool.impl).values():
    if isinstance(_pool, type) and issubclass(_pool, sa.pool.Pool):
        logging.getLogger(f"{_pool.__module__}.{_pool.__name__}").addFilter(
            stops.NoStopTracebacks())

DEFAULT_RUN_DIR = Path("fashionlab-runs")
DB_NAME = "fashionlab.db"


# A PostgreSQL server that does not answer is an error after CONNECT_TIMEOUT seconds, not a
# wait of minutes (libpq's default: none, the system's TCP retries); a connection whose
# server is gone (a network cut) is found dead by TCP keepalives in about 1.5 minutes
# (idle + interval x count) instead of the system's 2 hours. The URL's own settings win.
CONNECT_TIMEOUT = 30
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
               "keepalives_count": 6}
_LIBPQ_DRIVERS = ("psycopg2", "psycopg", "psycopg2cffi")


def connect_args(url: str | sa.URL) -> dict[str, Any]:
    """The driver settings fashionlab adds to a database URL's connections: the timeouts above
    for PostgreSQL through libpq (psycopg), unless the URL sets them; none elsewhere. For
    psycopg2, its waits for the server are made interruptible too (`_wait_for_server`)."""
    url = sa.make_url(url)
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in _LIBPQ_DRIVERS:
        return {}
    if url.get_driver_name() == "psycopg2":
        _interruptible_psycopg2()
    wanted = {"connect_timeout": CONNECT_TIMEOUT, **_KEEPALIVES}
    return {k: v for k, v in wanted.items() if k not in url.query}


def _interruptible_psycopg2() -> None:
    """psycopg2 waits for the server inside libpq, where a stop signal (Ctrl-C, SIGTERM) is
    held until the server answers: a server that is stopped or stalled (a frozen VM, a hung
    disk) keeps the process waiting forever, deaf to Ctrl-C. Its wait callback (psycopg2's
    documented hook, process-wide) makes it wait in Python instead, where the signal raises.
    A callback someone else installed (gevent's, say) is left alone."""
    try:
        from psycopg2 import extensions  # installed with the `postgres` extra
    except ImportError:  # said when the store is opened
        return
    if extensions.get_wait_callback() is None:
        extensions.set_wait_callback(_wait_for_server)


def _wait_for_server(connection: Any) -> None:
    """Until the server has answered, in `select`, so that a signal's handler runs and may
    raise; connecting gives up after the connection's `connect_timeout`, which libpq enforces
    only in its own waits. A stop leaves the connection broken (psycopg2 closes it): no
    cancel request is sent, as one would wait on the same silent server."""
    import psycopg2  # only with a PostgreSQL store
    from psycopg2 import extensions

    deadline = None
    if connection.status == extensions.STATUS_SETUP:
        limit = _connect_timeout(connection.get_dsn_parameters().get("connect_timeout"))
        deadline = None if limit is None else time.monotonic() + limit
    while True:
        state = connection.poll()
        if state == extensions.POLL_OK:
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise psycopg2.OperationalError("timeout expired")
        if state == extensions.POLL_READ:
            select.select([connection.fileno()], [], [], remaining)
        elif state == extensions.POLL_WRITE:
            select.select([], [connection.fileno()], [], remaining)
        else:
            raise psycopg2.OperationalError(f"unexpected state {state} from the driver")


def _connect_timeout(value: str | None) -> float | None:
    """libpq's reading of `connect_timeout`: seconds, at least 2; none (wait forever) when
    unset, zero or negative."""
    try:
        seconds = int(value) if value else 0
    except ValueError:
        return None
    return max(seconds, 2) if seconds > 0 else None


def database_url(url: str) -> str:
    """The URL with a PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, the `postgres` extra installs psycopg2. `postgres://`, the
    scheme libpq and many hosting services write, is PostgreSQL too (SQLAlchemy knows only
    `postgresql://`)."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # said when the store is opened
        return url
    if parsed.drivername == "postgres" or parsed.drivername.startswith("postgres+"):
        parsed = parsed.set(drivername="postgresql" + parsed.drivername[len("postgres"):])
        url = parsed.render_as_string(hide_password=False)
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(
            hide_password=False)
    return url


def resolved_url(url: str | None, run_dir: str | Path = DEFAULT_RUN_DIR) -> str:
    """The URL of the store to use: `url`, else FASHIONLAB_STORE's, else the SQLite file in
    `run_dir` (`default_url`). A blank `url` is refused: `--store "$DB_URL"` with the variable
    unset would otherwise train alone in the local store, not join the shared one."""
    if isinstance(url, str) and not url.strip():
        raise StoreError("the store URL is empty: give a database URL, or none for the run "
                         "directory's SQLite store (an unset shell variable?)")
    return url or os.environ.get("FASHIONLAB_STORE") or default_url(run_dir)


def default_url(run_dir: str | Path = DEFAULT_RUN_DIR) -> str:
    """The SQLite URL of the store in `run_dir`. A URL decodes "%XX" and ends its path at "?"
    or "#": those are escaped, so that a folder named with them holds its own store."""
    path = str(Path(run_dir).resolve() / DB_NAME)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, held by Python as surrogates
        # Refused before anything is made: the store records the run's folder as text, so
        # such a name would fail only once the store's file was there.
        raw = path.encode("utf-8", "surrogateescape")
        shown = raw.decode("utf-8", "backslashreplace")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"{Path(shown).parent}: the run directory's name is not UTF-8 "
                             "text, which the store cannot record; rename it or choose another "
                             "--run-dir") from None
        # UTF-8 bytes that Python did not read as text: an ASCII locale (LC_ALL=C with
        # PYTHONUTF8=0)
        raise StoreError(f"{Path(shown).parent}: the run directory's name is not ASCII, and "
                         "this locale reads only ASCII names as text: run in a UTF-8 locale "
                         "(LANG=C.UTF-8) or with PYTHONUTF8=1") from None
    for char, escaped in (("%", "%25"), ("?", "%3F"), ("#", "%23")):
        path = path.replace(char, escaped)
    return f"sqlite:///{path}"


def make_folder(folder: Path) -> None:
    """Create `folder` (and its parents) for a store's files; a StoreError that says why not,
    e.g. that a file holds the name of the folder (--run-dir given a file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = file_in_the_way(folder) or folder
        raise StoreError(f"{blocking} is a file, not a folder") from None
    except OSError as error:
        raise StoreError(f"{folder}: cannot create the folder ({error.strerror or error})") \
            from None


_PASSWORD = re.compile(r"(://[^:/?#@]*:).*@")  # "://user:PASSWORD@", even unparsable


def safe_url(url: str) -> str:
    """A database URL fit to show: its password hidden (also in a URL that does not parse,
    which an error message shows)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL is shown as given, but its password
        return _PASSWORD.sub(r"\1***@", url)


def open_error(url: str, error: Exception) -> StoreError:
    """Why a store's URL could not be opened, in one line, its password hidden: a URL that
    does not parse (a port that is not a number), a database driver that is not installed,
    an error of the database or of the file system."""
    if isinstance(error, ImportError):
        why = f"its database driver is not installed ({first_line(error)})"
        if url.partition("://")[0] in ("postgresql", "postgres"):  # no driver named: ours
            why += ": pip install 'fashionlab[postgres]'"
    elif isinstance(error, ValueError):  # SQLAlchemy's URL parser on a port like "abc"
        why = "its port is not a number"
    elif isinstance(error, sa.exc.NoSuchModuleError):  # "Can't load plugin: ...dialects:http"
        scheme = url.partition("://")[0] or url
        why = (f"'{one_line(shortened(scheme))}' names no database SQLAlchemy knows (a store is "
               "sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DB, ...)")
    else:
        why = first_line(error)
    return StoreError(f"cannot open the store {safe_url(url)}: {why}")


def database_trouble(error: BaseException, url: str) -> StoreError | None:
    """The StoreError to say in one line when `error` came from the database (a server that
    stopped or dropped the connection), wherever it surfaced: raised through Optuna, which
    wraps it in its own error, or even replaced by another (Optuna's cleanup after a failed
    trial may fail on the dead connection too). None when nothing in its chain is the
    database's, and for a stop (KeyboardInterrupt, SystemExit), whatever it interrupted."""
    if not isinstance(error, Exception):
        return None
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, StoreError):
            return cause
        if isinstance(cause, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            return StoreError(f"cannot use the store {safe_url(url)}: {first_line(cause)}")
        # The exception it was raised from, or during: not one its raiser hid (`from None`).
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


# --------------------------------------------------------------------------------------------
# SQLite

# SQLite's words for a file damaged inside (SQLITE_CORRUPT: a page overwritten, a copy cut
# short) and for one that is no database (SQLITE_NOTADB): its opening check reads only the
# first pages, so the damage may show at any later query.
_DAMAGED = ("database disk image is malformed", "file is not a database")


def refuse_damaged_file(context: sa.engine.ExceptionContext, *, where: str) -> None:
    """A SQLite store's `handle_error` hook: the damage, wherever a query meets it, is a
    StoreError said in one line, not the driver's DatabaseError with a traceback."""
    error = context.original_exception
    if any(words in str(error) for words in _DAMAGED):
        raise StoreError(f"the store {where} is damaged ({first_line(error)}): put back a "
                         "copy of it (sqlite3's .recover may save what it still holds)")



def sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    """The settings of each connection to a SQLite file that is written (an engine's
    "connect" listener)."""
    cursor = dbapi_connection.cursor()
    # The timeout first: switching a database to WAL takes a lock, and without a timeout a
    # process opening it while another does is refused at once ("database is locked").
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (runs list, report) never block a run
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sqlite_read_only_pragmas(dbapi_connection: Any, _: Any) -> None:
    """The settings of each connection to a SQLite file opened read-only (an engine's
    "connect" listener)."""
    cursor = dbapi_connection.cursor()  # the journal mode is the writers' to choose
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def sqlite_file(url: sa.URL) -> Path | None:
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


def read_only_url(url: sa.URL) -> bool:
    """Whether a SQLite URL (`file:` URI form) asks for read-only: `mode=ro` or
    `immutable=1`."""
    return url.drivername.startswith("sqlite") and url.query.get("uri") in ("true", "1") and (
        url.query.get("mode") == "ro" or url.query.get("immutable") == "1")


def writable(path: Path) -> bool:
    """Whether this user can write a SQLite file."""
    # SQLite writes next to the file too (its -wal, -shm or journal): the folder counts.
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def holds_rows(path: Path, table: str) -> bool:
    """Whether a SQLite file has this table with a row in it (a store: its schema version),
    read without writing to it or beside it: SQLite would make a new database of an empty
    file, its settings would change another program's, and even a read-only reader of a WAL
    file leaves its -wal and -shm files behind. A file SQLite cannot read answers True:
    opening it says what is wrong."""
    if path.stat().st_size == 0:
        return False
    # No -wal file: nothing is being written, and the file can be read as it is (immutable:
    # no side files). With one, a writer is at work, and its side files are there already.
    path = path.resolve()  # (a linked file's -wal is beside its target)
    wal = path.with_name(path.name + "-wal")
    engine = sa.create_engine(sqlite_read_only_url(path, immutable=not wal.exists()))
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).has_table(table) and conn.execute(
                sa.select(sa.literal(1)).select_from(sa.table(table)).limit(1)).first() is not None
    except sa.exc.SQLAlchemyError:
        return True
    finally:
        engine.dispose()


def sqlite_read_only_url(path: Path, *, immutable: bool | None = None) -> sa.URL:
    """SQLite's read-only mode for this file. A WAL-mode file needs its -shm index, written
    even by readers: in a folder we cannot write, where none exists (no process has the file
    open), it is read as immutable, a copy that nobody writes (`immutable` decides instead
    where given)."""
    path = path.resolve()
    if immutable is None:
        shm = path.with_name(path.name + "-shm")
        immutable = not os.access(path.parent, os.W_OK) and not shm.exists()
    return sa.URL.create("sqlite", database=f"file:{quote(str(path))}",
                         query={"uri": "true", **({"immutable": "1"} if immutable
                                                  else {"mode": "ro"})})
