"""After the fact: a stored run sent to an MLflow tracking URI, or what was sent before brought
up to date (`export_run_to_mlflow`); `MlflowExport` keeps, for one run and one URI, the MLflow
run ids of its parts and the metric steps each holds, so that each sync logs only what is new.
The layout it makes in MLflow is described in `fashionlab.integrations.mlflow`."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial
from sqlalchemy.exc import SQLAlchemyError

try:  # an optional extra: `pip install 'fashionlab[mlflow]'`; checked where it is used
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
except ImportError:
    MlflowClient = None  # type: ignore[assignment,misc]

    class MlflowException(Exception):  # type: ignore[no-redef]
        """Stands for MLflow's own, which nothing raises without MLflow."""

from fashionlab.errors import FashionlabError
from fashionlab.process import pid_exists
from fashionlab.schema import METRICS
from fashionlab.search.storage import open_storage
from fashionlab.serialize import cannot_write_in
from fashionlab.serialize import flatten as flatten_config
from fashionlab.store import ModelRecord, RunRecord, Store, as_store, database_url, safe_url
from fashionlab.text import first_line
from fashionlab.trials import study_name

__all__ = ["PARENT", "TAG_PART", "TAG_RUN", "TAG_STARTED", "MlflowError", "MlflowExport",
           "export_run_to_mlflow", "flatten", "quiet_mlflow", "require_mlflow",
           "without_password"]

TAG_RUN = "fashionlab.run_id"  # on every MLflow run of a fashionlab run
TAG_PART = "fashionlab.part"  # "run", "candidate:<name>" or "model:<key>"
# When the run started: run ids name the second, so a run deleted and started again within it
# gets the same id; its MLflow runs are told apart from the deleted one's by this.
TAG_STARTED = "fashionlab.run_started"
PARENT = "mlflow.parentRunId"
MAX_PARAM = 6000  # characters of a parameter value (MLflow's limit)
MAX_METRICS, MAX_TAGS = 1000, 100  # per log_batch call (MLflow's limits)

RUN_STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED",
              "interrupted": "KILLED"}
MODEL_STATUS = {"pending": "SCHEDULED", "running": "RUNNING", "finished": "FINISHED",
                "stopped": "FINISHED", "failed": "FAILED"}
TRIAL_STATUS = {"waiting": "SCHEDULED", "running": "RUNNING", "complete": "FINISHED",
                "pruned": "FINISHED", "fail": "FAILED"}
ENDED = {"FINISHED", "FAILED", "KILLED"}


class MlflowError(FashionlabError):
    """MLflow is not installed, or its tracking server or store refused or was unreachable."""


# A tracking server that does not answer fails a command (or live logging) within a minute or
# so, not after MLflow's default of 7 retries with exponential backoff and 120-s time-outs
# (~4 minutes of silence for a server that is down). Your own settings of these win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


# Database servers MLflow stores runs in; a URI of one is opened once before MLflow is called:
# MLflow retries a database it cannot open 9 times over ~100 s, a warning paragraph each time.
SERVER_DATABASES = ("postgresql", "postgres", "mysql", "mssql")
CONNECT_TIMEOUT = 10  # seconds to wait for a database server that does not answer
# A password shorter than this is hidden only where the URI is quoted (me:pw@host): hidden
# everywhere, one of a few letters would mask those letters in every word of the message.
MIN_MASKED = 4


def without_password(text: str, tracking_uri: str) -> str:
    """`text` (an error of MLflow or of its database driver, which may quote the URI) with
    the URI's password hidden."""
    try:
        password = urllib.parse.urlsplit(tracking_uri).password
    except ValueError:
        return text
    for form in sorted({password, urllib.parse.unquote(password or "")} - {None, ""},
                       key=len, reverse=True):
        text = text.replace(f":{form}@", ":***@")  # in a quoted URI, whatever its length
        if len(form) >= MIN_MASKED:  # elsewhere only as a whole word, and not "a" in "cannot"
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", "***", text)
    return text


def _refused(tracking_uri: str, why: str) -> MlflowError:
    return MlflowError(f"mlflow {safe_url(tracking_uri)}: {without_password(why, tracking_uri)}")


def require_mlflow(tracking_uri: str | None = None) -> None:
    """MlflowError unless MLflow is installed and `tracking_uri`, when given, can be used: not
    empty, not a folder, a SQLite file's folder there, a database server that answers."""
    if MlflowClient is None:
        raise MlflowError("MLflow is not installed: pip install 'fashionlab[mlflow]'")
    if tracking_uri is not None and not tracking_uri.strip():
        raise MlflowError("the MLflow tracking URI is empty (e.g. sqlite:///mlflow.db or "
                          "http://host:5000)")
    if tracking_uri is not None and (scheme := _unknown_scheme(tracking_uri)) is not None:
        raise _refused(tracking_uri, f"MLflow stores no runs at a {scheme}:// URI (e.g. "
                       "sqlite:///mlflow.db, http://host:5000 or postgresql://host/db)")
    if tracking_uri is not None and _file_store(tracking_uri) and not _file_store_allowed():
        # MLflow 3 refuses it only at the first call, in a paragraph: after training.
        raise _refused(tracking_uri, "a folder (MLflow's file store), which MLflow no longer "
                       "writes unless MLFLOW_ALLOW_FILE_STORE=true; use a database such as "
                       "sqlite:///mlflow.db, or a server http://host:5000")
    if tracking_uri is not None and (database := sqlite_file(tracking_uri)) is not None:
        # MLflow would create every missing folder of the path: a typo would log elsewhere.
        if not database.parent.is_dir():
            raise _refused(tracking_uri, f"the folder {database.parent} does not exist "
                           "(create it, or correct the path)")
        if database.is_dir():
            raise _refused(tracking_uri, f"{database} is a folder, not a database file (name "
                           "a file in it, such as sqlite:///mlflow.db)")
        # SQLite writes its journal beside the database: MLflow would retry for ~100 s, then
        # fail, where the folder is read-only.
        if (why := cannot_write_in(database.parent)) is not None:
            raise _refused(tracking_uri, f"cannot write in the folder {database.parent} ({why})")
    dialect = (tracking_uri or "").partition("+")[0].partition("://")[0]  # postgresql+psycopg2
    if tracking_uri is not None and dialect in SERVER_DATABASES:
        _check_database(tracking_uri, dialect)
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").partition("?")[0])


DRAFT = ".initializing"  # the suffix of a database whose tables are being made


def create_sqlite_whole(tracking_uri: str) -> None:
    """Make the SQLite database of a sqlite:/// URI that names no file yet, with all of MLflow's
    tables, in one step: a process killed while MLflow creates its tables in place (some
    seconds: dozens of migrations) leaves a file that every later call refuses ("table already
    exists", "out-of-date database schema"). So the tables are made in a file beside it, which
    is then linked under the database's name, where another process's finished one wins."""
    database = sqlite_file(tracking_uri)
    if database is None or database.name in ("", ":memory:") or database.exists():
        return
    try:  # private to MLflow: its own choice of store class and artifact root for this URI
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store
    except ImportError:  # where it moved, MLflow makes the tables in place, as it always did
        return
    _remove_abandoned_drafts(database)
    draft = database.with_name(f".{database.name}.{os.getpid()}{DRAFT}")
    _remove_draft(draft)  # a reused pid's, or this process's own failed attempt
    _, question, query = tracking_uri.partition("?")
    draft_uri = f"sqlite:///{draft}{question}{query}"
    try:
        _get_sqlalchemy_store(draft_uri, None)
        try:
            os.link(draft, database)
        except FileExistsError:  # another process's, finished: it stays
            pass
        except OSError:  # a file system without hard links: moved, unless one came meanwhile
            if not database.exists():
                os.replace(draft, database)
    finally:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(draft_uri, None)
        if engine is not None:
            engine.dispose()  # every connection closed, and SQLite's journal with them
        _remove_draft(draft)


def _remove_abandoned_drafts(database: Path) -> None:
    """The drafts of processes that were killed while making the tables (their pid is gone)."""
    for draft in database.parent.glob(f".{glob.escape(database.name)}.*{DRAFT}"):
        pid = draft.name.removesuffix(DRAFT).rpartition(".")[2]
        if pid.isdigit() and not pid_exists(int(pid)):
            _remove_draft(draft)


def _remove_draft(draft: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):  # SQLite's files beside a database
        draft.with_name(draft.name + suffix).unlink(missing_ok=True)


def _check_database(tracking_uri: str, dialect: str) -> None:
    """Open a database server's URI once, in one line when it fails: its driver missing,
    the server down or refusing."""
    try:
        engine = sa.create_engine(database_url(tracking_uri), connect_args=(
            {"connect_timeout": CONNECT_TIMEOUT} if dialect != "mssql" else {}))
    except ImportError as error:
        hint = ": pip install 'fashionlab[postgres]'" if dialect.startswith("postgres") else ""
        raise _refused(tracking_uri, f"its database driver is not installed "
                       f"({first_line(error)}){hint}") from None
    except (SQLAlchemyError, ValueError) as error:
        raise _refused(tracking_uri, f"not a database URL ({first_line(error)})") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        raise _refused(tracking_uri, f"cannot open the database "
                       f"({first_line(getattr(error, 'orig', None) or error)})") from None
    finally:
        engine.dispose()


def _unknown_scheme(tracking_uri: str) -> str | None:
    """The URI's scheme where MLflow has no tracking store for it (its own error names the
    model registry instead), else None. The schemes are MLflow's registry's, plugins' too."""
    try:  # private to MLflow; where it moved, MLflow's own error stands
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        known = set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return None
    scheme = urllib.parse.urlparse(tracking_uri).scheme.partition("+")[0]
    if scheme in known or scheme in SERVER_DATABASES or len(scheme) == 1:  # C:\ on Windows
        return None
    return scheme


def _file_store(tracking_uri: str) -> bool:
    """Whether MLflow reads the URI as its file store: a path, or file:// ("databricks", a
    bare word too, is not: MLflow's own rule decides)."""
    try:
        from mlflow.utils.uri import is_local_uri  # MLflow is optional: see the top
    except ImportError:
        return urllib.parse.urlparse(tracking_uri).scheme in ("", "file")
    return is_local_uri(tracking_uri, is_tracking_or_registry_uri=True)


def _file_store_allowed() -> bool:
    """MLflow's own switch for its file store; an MLflow without it writes one anyway."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE  # MLflow 3.x only
    except ImportError:
        return True
    return bool(MLFLOW_ALLOW_FILE_STORE.get())


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO lines ("Creating initial MLflow database tables...") held back while
    fashionlab calls it: they are not the caller's output; its warnings and errors still
    show. A level chosen with MLFLOW_LOGGING_LEVEL, or set on the "mlflow" logger below
    INFO (DEBUG), is left as it is."""
    logger = logging.getLogger("mlflow")
    before = logger.level
    if "MLFLOW_LOGGING_LEVEL" in os.environ or logging.NOTSET < before < logging.INFO:
        yield
        return
    logger.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(before)


def export_run_to_mlflow(store: Store, run_id: str, tracking_uri: str, *,
                         experiment: str | None = None, artifacts: bool = True) -> str:
    """Send a stored run to MLflow, or bring what was sent before up to date; returns the
    parent MLflow run's id.

    `experiment`: the MLflow experiment (default: the study's name; created when missing).
    `artifacts`: also upload the run's files (report.html, results.*, figures/, models/).
    MlflowError (one line) when MLflow refuses, cannot be reached (its server, or the database
    file of a database URI) or is not installed."""
    store = as_store(store)
    require_mlflow(tracking_uri)
    try:
        with quiet_mlflow():
            return MlflowExport(store, run_id, tracking_uri, experiment=experiment).sync(
                artifacts=artifacts)
    except FashionlabError:  # the store's own: already one line, and not MLflow's fault
        raise
    except (MlflowException, SQLAlchemyError, OSError) as error:  # OSError: requests' too
        raise _refused(tracking_uri, first_line(error)) from None


def revision_tags(revision: object) -> dict[str, str]:
    """The code revision as tags: fashionlab's own, and MLflow's commit tag where the revision
    names a commit ("SHA", "SHA+dirty", "fashionlab 0.1.0 from commit SHA"; an installed
    wheel's "fashionlab 0.1.0" names none, and MLflow would show it as one)."""
    if not isinstance(revision, str) or not revision:
        return {}
    commit = re.search(r"\b[0-9a-f]{40}\b", revision)
    return {"fashionlab.revision": revision,
            **({"mlflow.source.git.commit": commit.group()} if commit else {})}


class MlflowExport:
    """One fashionlab run as sent to one tracking URI by this process: the MLflow run ids of its
    parts and the metric steps each holds, read from MLflow once, so that each `sync` logs
    only what is new."""

    def __init__(self, store: Store, run_id: str, tracking_uri: str, *,
                 experiment: str | None = None) -> None:
        self.store = store
        # A bare postgresql:// means psycopg 3 to SQLAlchemy; the postgres extra has psycopg2.
        create_sqlite_whole(tracking_uri)
        self.client = MlflowClient(tracking_uri=database_url(tracking_uri))
        self.record = store.seen_run(run_id)  # a copied run directory: its files
        self.experiment_id = self._experiment(experiment or self.record.name)
        self.ids: dict[str, str] = {}  # part -> MLflow run id
        self.params: dict[str, set[str]] = {}  # MLflow run id -> parameter names logged
        self.status: dict[str, str] = {}  # MLflow run id -> its status
        self.steps: dict[tuple[str, str], set[int]] = {}  # (MLflow run id, metric) -> steps
        self.created: set[str] = set()  # MLflow runs this object created: no history to read
        self.models: dict[str, ModelRecord] = {}
        self._find_existing()

    # ---- whole run -------------------------------------------------------------------------

    def sync(self, *, artifacts: bool = True) -> str:
        """Everything the store holds of the run; returns the parent MLflow run's id."""
        record = self.record = self.store.seen_run(self.record.id)
        parent = self.parent()
        self.sync_models(m.key for m in self.store.models(record.id))
        summary = record.summary or {}
        if record.kind == "search":
            for candidate, trial in self._trials().items():
                self._log_trial(self.group(candidate), trial)
        else:
            rows = {row["model"]: row for row in summary.get("table") or []}
            for c in [*(summary.get("candidates") or []), *(summary.get("final") or [])]:
                self._log_candidate(self.group(c["name"]), c, rows.get(c["name"]))
        self._log(parent, _run_metrics(record))
        if artifacts and record.output_dir and Path(record.output_dir).is_dir():
            self._upload(parent, Path(record.output_dir))
        if record.state != "running":  # a candidate with no result (an interrupted run's)
            for part, run_id in self.ids.items():
                if part.startswith("candidate:") and self.status.get(run_id) == "RUNNING":
                    self._set_status(run_id, "KILLED", record.finished)
        self._set_status(parent, RUN_STATUS.get(record.state, "RUNNING"),
                         record.finished if record.state != "running" else None)
        return parent

    def sync_models(self, keys: Iterable[str]) -> None:
        """These models' stored epochs, parameters and outcome (a key the store does not have
        is skipped)."""
        keys = list(keys)
        if keys:
            self.models = {m.key: m for m in self.store.models(self.record.id)}
        for key in keys:
            if key in self.models:
                self._sync_model(self.models[key])

    def _sync_model(self, model: ModelRecord) -> None:
        key = model.key
        run_id = self.model(model)
        if self.record.state == "running":  # training (again, when resumed): so are its
            # parent (its status tag too) and candidate, left KILLED by the interruption
            if self.status.get(self.ids["run"]) != "RUNNING":
                self._set_status(self.parent(), "RUNNING", None)
            self._set_status(self.group(model.candidate), "RUNNING", None)
        values = [(metric, e.epoch, getattr(e, metric))
                  for e in self.store.epochs(self.record.id, key) for metric in METRICS]
        values += [("test_loss", 0, model.test_loss), ("test_accuracy", 0, model.test_accuracy)]
        self._log(run_id, values, params={
            "key": model.key, "role": model.role, "repeat": model.repeat, "fold": model.fold,
            "seed": model.seed, "epochs_planned": model.epochs_planned,
            "n_train": model.n_train, "n_val": model.n_val},
            tags={"fashionlab.status": model.status, "fashionlab.role": model.role,
                  **({"fashionlab.message": model.message} if model.message else {})})
        status = MODEL_STATUS.get(model.status, "RUNNING")
        if status in ("RUNNING", "SCHEDULED") and self.record.state != "running":
            status = "KILLED"  # the run stopped while this model trained
        self._set_status(run_id, status, None)

    # ---- the MLflow runs ---------------------------------------------------------------------

    def parent(self) -> str:
        """The parent MLflow run (made when missing), its tags and parameters up to date."""
        r = self.record
        config = {k: v for k, v in r.config.items()
                  if r.kind == "search" or k not in ("candidates", "final")}  # those: nested
        run_id = self._ensure("run", r.id, None, start=r.started)
        environment = r.environment
        revision = environment.get("revision")
        machine = environment.get("machine") or {}
        versions = environment.get("versions") or {}
        data = environment.get("data") or {}
        self._log(run_id, [], params=flatten(config), tags={
            "fashionlab.kind": r.kind, "fashionlab.study": r.name, "fashionlab.seed": r.seed,
            "fashionlab.fingerprint": r.fingerprint, "fashionlab.status": r.state,
            **revision_tags(revision),
            **{f"fashionlab.machine.{k}": v for k, v in machine.items() if v is not None},
            **{f"fashionlab.version.{k}": v for k, v in versions.items() if v is not None},
            **{f"fashionlab.data.{k}": v for k, v in data.items() if v is not None},
            **({"fashionlab.output_dir": r.output_dir} if r.output_dir else {})})
        return run_id

    def group(self, candidate: str) -> str:
        """The nested run of a candidate (a search: of a trial), under the parent."""
        part = f"candidate:{candidate}"
        if part in self.ids:
            return self.ids[part]
        run_id = self._ensure(part, candidate, self.parent())
        config = next((c for c in [*self.record.config.get("candidates", []),
                                   *self.record.config.get("final", [])]
                       if c.get("name") == candidate), None)
        if self.record.kind == "study" and config is not None:
            self._log(run_id, [], params=flatten({k: v for k, v in config.items()
                                                  if k != "name"}))
        return run_id

    def model(self, model: ModelRecord) -> str:
        """The nested run of one model, under its candidate's."""
        return self._ensure(f"model:{model.key}", model.key, self.group(model.candidate))

    # ---- what a run holds ----------------------------------------------------------------------

    def _log_candidate(self, run_id: str, c: Mapping[str, Any],
                       row: Mapping[str, Any] | None) -> None:
        values = [(metric, epoch, value)
                  for metric, curve in (c.get("mean_curves") or {}).items()
                  for epoch, value in enumerate(curve, start=1)]
        tags = {"fashionlab.role": c.get("role")}
        if row is not None:
            values += [(name, 0, row.get(name)) for name in (
                "val_accuracy_mean", "val_accuracy_std", "val_loss_mean", "test_accuracy")]
            values += [("val_accuracy_ci_low", 0, row.get("ci_low")),
                       ("val_accuracy_ci_high", 0, row.get("ci_high"))]
            tags.update({"fashionlab.verdict": row.get("vs_best") or "",
                         "fashionlab.epoch": row.get("epoch")})
            if row.get("note"):
                tags["fashionlab.note"] = row["note"]
        values += [("warning_epoch", 0, c.get("warning_epoch")),
                   ("best_epoch", 0, c.get("best_epoch"))]
        self._log(run_id, values, tags=tags)
        self._set_status(run_id, "FAILED" if c.get("failures") else "FINISHED", None)

    def _trials(self) -> dict[str, FrozenTrial]:
        """A search's Optuna trials by the candidate name of their models (a retried trial
        shares its models with the trial it retries: the later one counts)."""
        r = self.record
        storage = open_storage(self.store.url)
        try:
            study = optuna.load_study(study_name=study_name(r.name, r.fingerprint),
                                      storage=storage)
            trials = study.get_trials(deepcopy=False)
        except KeyError:  # no Optuna study (deleted): the models alone are exported
            return {}
        finally:
            storage.engine.dispose()
        return {str(t.user_attrs.get("models") or f"trial-{t.number}"): t for t in trials}

    def _log_trial(self, run_id: str, trial: FrozenTrial) -> None:
        state = trial.state.name.lower()
        values = [("intermediate_value", step, value)
                  for step, value in trial.intermediate_values.items()]
        values.append(("value", 0, trial.value))
        self._log(run_id, values, params=trial.params, tags={
            "fashionlab.trial": trial.number, "fashionlab.state": state,
            **({"fashionlab.base": trial.user_attrs["base"]} if "base" in trial.user_attrs
               else {})})
        status = TRIAL_STATUS.get(state, "RUNNING")
        if status in ("RUNNING", "SCHEDULED") and self.record.state != "running":
            status = "KILLED"
        end = trial.datetime_complete.timestamp() if trial.datetime_complete else None
        self._set_status(run_id, status, end)

    def _upload(self, run_id: str, out: Path) -> None:
        for path in sorted(out.iterdir()):
            if path.is_file() and (path.name.startswith("results.")
                                   or path.name in ("report.html", "study.toml")):
                self.client.log_artifact(run_id, str(path))
        if (out / "figures").is_dir():
            self.client.log_artifacts(run_id, str(out / "figures"), "figures")
        if (out / "models").is_dir():
            for model_dir in sorted(p for p in (out / "models").iterdir() if p.is_dir()):
                self.client.log_artifacts(run_id, str(model_dir), f"models/{model_dir.name}")

    # ---- MLflow calls --------------------------------------------------------------------------

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    @property
    def _started(self) -> str:
        return f"{self.record.started:.6f}"

    def _find_existing(self, part: str | None = None) -> None:
        """The MLflow runs an earlier export or process made of this run (or of this part of
        it): the oldest of each part, should two processes have raced to make one."""
        token = None
        wanted = f"tags.`{TAG_RUN}` = '{self.record.id}'"
        if part is not None:
            wanted += f" and tags.`{TAG_PART}` = '{_quoted(part)}'"
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=wanted,
                max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
            for run in page:
                part = run.data.tags.get(TAG_PART)
                started = run.data.tags.get(TAG_STARTED)
                if started is not None and started != self._started:
                    continue  # a deleted run's, which had the same id
                if part is not None and part not in self.ids:
                    self.ids[part] = run.info.run_id
                    self.params[run.info.run_id] = set(run.data.params)
                    self.status[run.info.run_id] = run.info.status
            token = page.token
            if not token:
                return

    def _ensure(self, part: str, name: str, parent: str | None, *,
                start: float | None = None) -> str:
        if part in self.ids:
            return self.ids[part]
        self._find_existing(part)  # another process (a live study, an export) made it since?
        if part in self.ids:
            return self.ids[part]
        tags = {TAG_RUN: self.record.id, TAG_STARTED: self._started, TAG_PART: part,
                **({PARENT: parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags,
                                     start_time=int((start or time.time()) * 1000))
        run_id = self.ids[part] = run.info.run_id
        self.params[run_id] = set()
        self.status[run_id] = run.info.status
        self.created.add(run_id)
        return run_id

    def _steps(self, run_id: str, metric: str) -> set[int]:
        steps = self.steps.get((run_id, metric))
        if steps is None:
            steps = set() if run_id in self.created else {
                m.step for m in self.client.get_metric_history(run_id, metric)}
            self.steps[(run_id, metric)] = steps
        return steps

    def _log(self, run_id: str, values: Iterable[tuple[str, int, Any]], *,
             params: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None) -> None:
        """Log the metric steps MLflow does not have (NaN and None are left out), the
        parameters not logged yet (MLflow's are immutable) and the tags."""
        now = int(time.time() * 1000)
        metrics, seen = [], set()
        for metric, step, value in values:
            if value is None or not math.isfinite(float(value)) or (metric, step) in seen \
                    or step in self._steps(run_id, metric):
                continue
            seen.add((metric, step))
            metrics.append(Metric(metric, float(value), now, int(step)))
        known = self.params[run_id]
        new_params = [Param(k, _text(v)) for k, v in (params or {}).items() if k not in known]
        run_tags = [RunTag(k, _text(v)) for k, v in (tags or {}).items() if v is not None]
        for i in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS])
        entries: list[Param | RunTag] = [*new_params, *run_tags]
        for i in range(0, len(entries), MAX_TAGS):
            batch = entries[i:i + MAX_TAGS]
            self.client.log_batch(run_id, params=[e for e in batch if isinstance(e, Param)],
                                  tags=[e for e in batch if isinstance(e, RunTag)])
        for metric in metrics:
            self.steps[(run_id, metric.key)].add(metric.step)
        known.update(p.key for p in new_params)

    def _set_status(self, run_id: str, status: str, end: float | None) -> None:
        if self.status.get(run_id) == status:
            return
        if status in ENDED:
            self.client.set_terminated(run_id, status,
                                       int((end or time.time()) * 1000))
        else:
            self.client.update_run(run_id, status=status)
        self.status[run_id] = status


def _quoted(text: str) -> str:
    """Text inside single quotes of an MLflow search filter."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _run_metrics(record: RunRecord) -> list[tuple[str, int, Any]]:
    """The parent run's summary metrics (none before the run has a summary)."""
    s = record.summary or {}
    retrain = s.get("retrain") or {}
    values: list[tuple[str, int, Any]] = [("wall_seconds", 0, s.get("wall_seconds")),
                                          ("retrain_test_accuracy", 0,
                                           retrain.get("test_accuracy"))]
    if record.kind == "search":
        values.append(("best_value", 0, s.get("best_value")))
    else:
        best = next((row for row in s.get("table") or [] if row.get("model") == s.get("best")),
                    None)
        if best is not None:
            values.append(("best_val_accuracy_mean", 0, best.get("val_accuracy_mean")))
    return values


def flatten(value: Any) -> dict[str, str]:
    """A config as MLflow parameters: `serialize.flatten`'s dotted names, values as text."""
    return {name: _text(leaf) for name, leaf in flatten_config(value).items()}


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM]
