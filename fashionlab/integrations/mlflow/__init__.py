"""MLflow: a fashionlab run sent to any MLflow tracking URI, after the fact or live.

Layout in the experiment named after the study: one parent MLflow run per fashionlab run (a
study or a search), tagged `fashionlab.run_id`; under it one nested run per candidate (a
search: per trial), and under that one per model (a fold, the retrained model, a final model)
with its stored epochs as metrics, step = epoch. Every MLflow run says which part of the
fashionlab run it holds (tag `fashionlab.part`).

The store is the truth. An export finds the MLflow runs it made before by those tags and logs
only the metric steps MLflow does not have yet: exporting again, or logging live through a
study that is killed and resumed, never duplicates a run or a value.

    export    after the fact: export_run_to_mlflow, MlflowExport (the MLflow runs of one
              fashionlab run and the steps they hold), the tags, require_mlflow
    live      while it trains: MlflowReporter, a progress reporter; logging_to_mlflow
live imports export.

    export_run_to_mlflow(store, run_id, "sqlite:///mlflow.db")   # after the fact

    with logging_to_mlflow("sqlite:///mlflow.db", spec) as progress:   # while it trains
        run_study(spec, progress=progress)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fashionlab.lazy import lazy_exports

# Names load on first use (PEP 562): `logging_to_mlflow`, which every study and search passes
# through, must not import MLflow when no tracking URI is given.
_EXPORTS = {
    "PARENT": "export",
    "TAG_PART": "export",
    "TAG_RUN": "export",
    "TAG_STARTED": "export",
    "MlflowError": "export",
    "MlflowExport": "export",
    "MlflowReporter": "live",
    "export_run_to_mlflow": "export",
    "flatten": "export",
    "logging_to_mlflow": "live",
    "require_mlflow": "export",
    "without_password": "export",
}

__all__ = [
    "PARENT",
    "TAG_PART",
    "TAG_RUN",
    "TAG_STARTED",
    "MlflowError",
    "MlflowExport",
    "MlflowReporter",
    "export_run_to_mlflow",
    "flatten",
    "logging_to_mlflow",
    "require_mlflow",
    "without_password",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the names directly
    from fashionlab.integrations.mlflow.export import (
        PARENT,
        TAG_PART,
        TAG_RUN,
        TAG_STARTED,
        MlflowError,
        MlflowExport,
        export_run_to_mlflow,
        flatten,
        require_mlflow,
        without_password,
    )
    from fashionlab.integrations.mlflow.live import MlflowReporter, logging_to_mlflow
