"""Live: a study or search logged to MLflow while it trains. `MlflowReporter` is a progress
reporter that exports each stored epoch as training reports it (through `MlflowExport`, so a
resumed run logs nothing twice); `logging_to_mlflow` puts it next to the given progress."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fashionlab import stops
from fashionlab.config import StudySpec
from fashionlab.progress import Reporter, Tee, reporting
from fashionlab.store import DEFAULT_RUN_DIR, Store, safe_url
from fashionlab.text import first_line
from fashionlab.train import EpochMetrics

# MLflow (~80 MB and a second to import) and Optuna load only once a tracking URI is given:
# every `fashionlab study` passes through `logging_to_mlflow`.
if TYPE_CHECKING:
    from fashionlab.integrations.mlflow.export import MlflowExport

__all__ = ["MlflowReporter", "logging_to_mlflow"]


class MlflowReporter:
    """A progress reporter that sends each stored epoch to MLflow as training reports it.

    It exports what the store holds of the reported stack's models, the store being the truth:
    only the steps MLflow does not have are logged, so a study killed and resumed with live
    logging has each epoch once. The run is the newest of its kind and fingerprint in the
    store, found at the first report (the study or search has made it by then). An MLflow
    failure does not stop training: it is told once on `log` and live logging stops (`runs
    export --to mlflow` sends the run later)."""

    def __init__(self, tracking_uri: str, *, kind: Literal["study", "search"], fingerprint: str,
                 run_dir: str | Path = DEFAULT_RUN_DIR, store_url: str | None = None,
                 experiment: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.tracking_uri, self.kind, self.fingerprint = tracking_uri, kind, fingerprint
        self.run_dir, self.store_url, self.experiment = run_dir, store_url, experiment
        self.say = log or (lambda message: print(message, file=sys.stderr))
        self.store: Store | None = None
        self.export: MlflowExport | None = None
        self.stacks: dict[str, set[str]] = {}  # label -> model keys heard of
        self.failed = False

    def start(self, label: str, epochs: int) -> None:
        pass

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        self.stacks.setdefault(label, set()).update(metrics)
        self._safely(lambda export: export.sync_models(metrics))

    def finish(self, label: str) -> None:
        keys = sorted(self.stacks.pop(label, ()))
        self._safely(lambda export: export.sync_models(keys))

    def log(self, message: str) -> None:
        pass

    def complete(self) -> str | None:
        """The full export at the end (summary metrics, artifacts); the parent run's id, or
        None when MLflow failed."""
        return self._safely(lambda export: export.sync(artifacts=True))

    def interrupted(self) -> None:
        """The run stopped: the statuses in MLflow follow the store's. Read from MLflow
        afresh: the stop may have come in the middle of a call that MLflow carried out but
        whose steps the export's memory does not hold (they would be logged twice)."""
        self.export = None
        self._safely(lambda export: export.sync(artifacts=False))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _safely(self, action: Callable[[MlflowExport], Any]) -> Any:
        if self.failed:
            return None
        # MLflow itself: imported once there is something to log
        from fashionlab.integrations.mlflow.export import (
            MlflowExport,
            quiet_mlflow,
            without_password,
        )

        try:
            with quiet_mlflow():
                if self.export is None:
                    self.store = self.store or Store.open(self.run_dir, self.store_url)
                    runs = self.store.runs(kind=self.kind, fingerprint=self.fingerprint)
                    if not runs:
                        return None
                    self.export = MlflowExport(self.store, runs[0].id, self.tracking_uri,
                                               experiment=self.experiment)
                return action(self.export)
        except Exception as error:  # noqa: BLE001 - training goes on whatever MLflow does
            self.failed = True
            why = without_password(first_line(error), self.tracking_uri)
            self.say(f"mlflow: cannot log to {safe_url(self.tracking_uri)} ({why}); "
                     "training goes on, and `fashionlab runs export RUN --to mlflow URI` "
                     "sends the run later")
            return None


@contextlib.contextmanager
def logging_to_mlflow(
    tracking_uri: str | None, spec: StudySpec, *, kind: Literal["study", "search"] = "study",
    run_dir: str | Path = DEFAULT_RUN_DIR, store_url: str | None = None,
    progress: bool | Reporter = True, experiment: str | None = None,
) -> Iterator[bool | Reporter]:
    """The `progress` to give `run_study(spec, ...)` (kind "study") or `run_search` (kind
    "search"), with the same `run_dir` and `store_url`, so that it logs to MLflow live: the
    given progress (bars, silence, your reporter) and an `MlflowReporter`. When the run ends
    the whole run is exported once (summary metrics, artifacts); when it stops, the MLflow
    statuses follow the store's. With no `tracking_uri`, `progress` unchanged."""
    if tracking_uri is None:
        yield progress
        return
    # MLflow and Optuna: only now that a tracking URI is given
    from fashionlab.integrations.mlflow.export import require_mlflow
    from fashionlab.search import search_identity

    require_mlflow(tracking_uri)  # before training, not after it
    fingerprint = spec.fingerprint() if kind == "study" else search_identity(spec)[1]
    with reporting(progress) as display:
        # An MLflow failure is said even when nothing else is shown (`--quiet`): on stderr.
        live = MlflowReporter(tracking_uri, kind=kind, fingerprint=fingerprint, run_dir=run_dir,
                              store_url=store_url, experiment=experiment,
                              log=None if progress is False else display.log)
        try:
            yield Tee(live, display)
            live.complete()
            # A stop during the export that a finaliser swallowed (SQLAlchemy's, MLflow's)
            # is still a stop; one raised in the export leaves it half sent: either way the
            # statuses follow the store's below, and the same command sends the rest.
            stops.raise_if_stopped()
        except BaseException:
            live.interrupted()
            raise
        finally:
            live.close()
