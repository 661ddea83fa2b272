"""A study's results: what `run_study` returns, its table rows, the summary stored with the
run, the files it leaves (the table as Markdown, CSV and JSON, the figures), and how it shows
itself in a notebook (`notebook`)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fashionlab import notebook, plots, text
from fashionlab.config import StudySpec, study_to_toml
from fashionlab.data import Dataset
from fashionlab.errors import OutputError
from fashionlab.serialize import jsonable, write_text_atomic
from fashionlab.stats import (
    ACCURACY_BOUNDS,
    LOSS_BOUNDS,
    Comparison,
    proportion_ci,
    summarize,
)
from fashionlab.steps import CandidateResult, RetrainResult
from fashionlab.store import RunRecord
from fashionlab.tables import HEADERS, LEGEND, Row, display_rows, markdown_table, rows_to_csv
from fashionlab.twins import TwinComparison

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

__all__ = ["RESULTS_FILE", "RESULT_FILES", "SAMPLES_PER_CLASS", "StudyResult", "peak_rss_mb",
           "summary", "table_rows", "to_csv", "to_markdown", "write_outputs"]

SAMPLES_PER_CLASS = 1  # training images of each class in the run's figures/samples.png
RESULTS_FILE = "results.json"  # of the files in a run's folder: the whole result
RESULT_FILES = ("results.md", "results.csv", RESULTS_FILE, "study.toml")  # the tables, the study


@dataclass(eq=False)  # its candidates hold arrays: == compares identity, as for them
class StudyResult:
    run: RunRecord
    spec: StudySpec
    output_dir: Path
    n_train: int  # training samples in a CV fold (for the corrected t-test)
    n_val: int  # validation samples in a CV fold
    candidates: list[CandidateResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    best: str | None = None
    retrain: RetrainResult | None = None
    final: list[CandidateResult] = field(default_factory=list)
    twins: dict[str, TwinComparison] = field(default_factory=dict)  # early stopping vs full
    wall_seconds: float = 0.0  # of the process that finished it
    resumed: bool = False  # an interrupted run continued: wall_seconds leaves out the earlier
    # A run that had finished before, read back from the store: nothing was trained (its
    # wall_seconds are those of the process that finished it).
    already_finished: bool = False
    workers: int = 1  # processes that trained it
    threads: int = 0  # CPU threads each job trained with (0: not recorded)
    # A run trained by several processes (README: Many machines): the jobs this one trained,
    # and who writes the results when it is not this one (then the fields above stay empty).
    trained_here: list[str] = field(default_factory=list)
    results_by: str | None = None  # "<host> pid <pid>"
    notes: list[str] = field(default_factory=list)  # said while it ran (`note_unresumed_run`)

    def __repr__(self) -> str:
        """One line, not the whole dataclass (its config alone is ~20 KB): the run, its best
        candidate's validation accuracy (mean ± std over its models, in %), the retrained
        best's test accuracy, where the files are."""
        rows = table_rows(self) if self.candidates or self.final else []
        best = next((r for r in rows if r.kind == "cv" and r.model == self.best), None)
        retrained = next((r for r in rows if r.kind == "retrain"), None)
        parts = [f"run={self.run.id!r}", f"study={self.spec.name!r}",
                 f"status={self.run.state!r}", f"candidates={len(self.candidates)}"]
        if best is not None:
            accuracy = text.plus_minus(best.val_accuracy_mean, best.val_accuracy_std, best.n,
                                       digits=2)
            parts.append(f"best={best.model!r} val_accuracy={accuracy}%")
        if retrained is not None:
            parts.append(f"retrained_test_accuracy={text.percent(retrained.test_accuracy)}%")
        if self.results_by is not None:
            parts.append(f"results_by={self.results_by!r}")
        return f"StudyResult({', '.join(parts)}, output_dir='{self.output_dir}')"

    def _repr_html_(self) -> str:
        """Jupyter shows the results table and every model's learning curves."""
        return notebook.study_html(title=f"{self.spec.name}: results", overview=_overview(self),
                                   rows=table_rows(self), best=self.best,
                                   models=_curve_models(self), repeats=self.spec.cv.repeats)

    def figure(self, name: str) -> Figure:
        """The learning curves of a candidate, a final model or the retrained best, by the
        name its table row has ("cnn", "dense(64) (retrained)"); ValueError listing the names
        when there is none."""
        return notebook.curves_figure(_curve_models(self), name, repeats=self.spec.cv.repeats)

    def to_frame(self) -> pandas.DataFrame:
        """The results table as a pandas DataFrame (`table_rows`: one row per line, numbers as
        fractions); ImportError when pandas is not installed (`pip install pandas`)."""
        return notebook.rows_frame(table_rows(self))


def _curve_models(result: StudyResult) -> list[notebook.Curves]:
    models: list[notebook.Curves] = list(result.candidates)
    if result.retrain is not None:
        models.append(notebook.retrain_curves(_retrained_name(result.retrain),
                                              result.retrain.history))
    return models + list(result.final)


def _retrained_name(retrain: RetrainResult) -> str:
    return f"{retrain.candidate} (retrained)"


def _epoch_label(result: CandidateResult) -> str:
    if result.candidate.train.early_stopping is not None:
        e = result.result_epochs[result.result_epochs > 0]  # 0: a model with no score
        if len(e) == 0:
            return "-"
        # (the median of an even count may fall between two epochs: 10.5)
        return f"{np.median(e):g} (ES median)" if len(result.result_epochs) > 1 \
            else f"{e[0]} (ES best)"
    if result.schedule_end is not None:
        return f"{result.schedule_end} (schedule end)"
    if len(result.result_epochs) and not (result.result_epochs > 0).any():
        return "-"  # every model diverged: read at no epoch (the warning may have fired on
        # the epochs before, and would read as the epoch of numbers the row has not)
    if result.warning.fired:
        return f"{result.warning.epoch} (warning)"
    if result.warning.best_epoch is None:
        return "-"
    return f"{result.warning.best_epoch} (no warning)"


def _verdict(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    return text.verdict(is_best=comparison.is_best, not_worse=comparison.not_worse,
                        p_holm=comparison.p_holm, reason=comparison.reason)


def table_rows(result: StudyResult) -> list[Row]:
    n_classes = result.spec.candidates[0].model.n_classes if result.spec.candidates else 10
    rows = [Row("random guess", "baseline", "-", math.log(n_classes), 0.0, 1 / n_classes, 0.0,
                math.nan, math.nan, 0, "", math.nan, "-", "the starting point: 1 in 10")]
    comparisons = {c.name: c for c in result.comparisons}
    for candidate in result.candidates:
        rows.append(_candidate_row(candidate, comparisons.get(candidate.name),
                                   result.twins.get(candidate.name), result.run.id))
    tested = ((result.run.environment or {}).get("data") or {}).get("test")
    tested = tested if isinstance(tested, int) else 0  # test images (0: not recorded)
    # What the study tested on: the test set, or its first N images where `[data] test_limit`
    # (every --quick run) cut it.
    limit = result.spec.data.test_limit
    test_images = "the test set" if limit is None or not tested or limit > tested \
        else f"the first {tested:,} test images"
    if result.retrain is not None:
        r = result.retrain
        rows.append(Row(_retrained_name(r), "retrain", str(r.epochs), math.nan, math.nan,
                        math.nan, math.nan, math.nan, math.nan, 1, "", r.test_accuracy,
                        f"{len(r.history)}/{r.epochs}",
                        f"best candidate, trained on all {result.n_train + result.n_val}, "
                        f"tested on {test_images}"))
    for final in result.final:
        rows.append(_candidate_row(final, None, test_images=test_images))
    return [_with_test_interval(row, tested) for row in rows]


def _with_test_interval(row: Row, tested: int) -> Row:
    low, high = proportion_ci(row.test_accuracy, tested)
    return replace(row, test_ci_low=low, test_ci_high=high)


def _candidate_row(candidate: CandidateResult, comparison: Comparison | None,
                   twin: TwinComparison | None = None, run_id: str = "", *,
                   test_images: str = "the test set") -> Row:
    loss = summarize(candidate.val_loss, bounds=LOSS_BOUNDS)
    accuracy = summarize(candidate.val_accuracy, bounds=ACCURACY_BOUNDS)
    notes = list(candidate.failures)
    if candidate.role == "final":
        stopping = candidate.candidate.train.early_stopping
        best = int(candidate.result_epochs[0]) if len(candidate.result_epochs) else 0
        # (no best epoch: its monitored value was never finite, and its last weights are kept)
        kept = f"of epoch {best}'s weights (early stopping's best)" \
            if stopping is not None and stopping.restore_best and best > 0 \
            else "after the last epoch"
        notes = notes or [f"validated on {test_images}; test accuracy {kept}"]
    trained = f"{candidate.trained_epochs}/{candidate.planned_epochs}"
    if candidate.candidate.train.early_stopping is not None:
        saved = 1 - candidate.trained_epochs / max(candidate.planned_epochs, 1)
        trained += f" ({saved:.0%} saved)"
        notes.append(_twin_note(candidate, twin, run_id))
    return Row(
        candidate.name, candidate.role, _epoch_label(candidate), loss.mean, loss.std,
        accuracy.mean, accuracy.std, accuracy.ci_low, accuracy.ci_high, accuracy.n,
        _verdict(comparison), candidate.test_accuracy, trained, "; ".join(notes),
    )


def _twin_note(candidate: CandidateResult, twin: TwinComparison | None, run_id: str) -> str:
    """What early stopping cost against training every fold for all its epochs."""
    if twin is None:
        return ("early stopping: no full-length run of this candidate with the same folds and "
                "seed in the store to compare with")
    difference = summarize(twin.accuracy_difference)
    where = "this run" if twin.twin_run == run_id else f"run {twin.twin_run}"
    note = (f"early stopping vs all {text.counted(twin.twin_epochs, 'epoch')} ({where}): "
            f"{text.plus_minus(difference.mean, difference.std, difference.n, digits=2)} "
            "points of val accuracy")
    if twin.test is not None:
        note += f" (paired p={twin.test.p_value:.2g})"
    return note + f", {twin.epochs_saved:.0%} of the fold-epochs saved"


def _overview(result: StudyResult) -> str:
    cv = result.spec.cv
    protocol = (f"{cv.n_splits}-fold CV ({cv.strategy}"
                + (f", {cv.repeats} repeats)" if cv.repeats > 1 else ")")
                if result.spec.candidates else "no cross-validation (final models only)")
    return (f"Run `{result.run.id}`, seed {result.spec.seed}, {protocol}, "
            f"wall time {text.wall_time(result.wall_seconds, result.resumed)}"
            + (f" ({result.workers} worker processes)." if result.workers > 1 else "."))


def to_markdown(result: StudyResult) -> str:
    rows = table_rows(result)
    cells = [(text.markdown_text(model), *rest) for model, *rest in display_rows(rows)]
    lines = [f"# {text.markdown_text(result.spec.name)}: results", "", _overview(result), "",
             *markdown_table(HEADERS, cells), "", LEGEND]
    notes = [f"- {text.markdown_text(r.model)}: {text.markdown_text(r.note)}" for r in rows
             if r.note and r.kind != "baseline"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def to_csv(result: StudyResult) -> str:
    return rows_to_csv(table_rows(result))


def peak_rss_mb(who: str = "self") -> float | None:
    """Peak resident memory so far, in MB, of this process ("self") or of its largest finished
    child ("children": the worker processes); None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    usage = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    peak = resource.getrusage(usage).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS counts bytes


def summary(result: StudyResult) -> dict[str, Any]:
    """Everything the table shows plus per-fold values: stored with the run, written as JSON."""
    def candidate(c: CandidateResult) -> dict[str, Any]:
        return {
            "name": c.name, "role": c.role, "keys": c.keys,
            "warning_epoch": c.warning.epoch, "best_epoch": c.warning.best_epoch,
            "schedule_end": c.schedule_end,
            "result_epochs": c.result_epochs, "val_loss": c.val_loss,
            "val_accuracy": c.val_accuracy, "trained_epochs": c.trained_epochs,
            "planned_epochs": c.planned_epochs, "failures": c.failures,
            "test_loss": c.test_loss, "test_accuracy": c.test_accuracy,
            "mean_curves": c.mean_curves,
            **({"model_dir": c.model_dir} if c.model_dir is not None else {}),
        }

    retrain = result.retrain
    return jsonable({
        "study": result.spec.name, "run_id": result.run.id, "seed": result.spec.seed,
        "wall_seconds": result.wall_seconds, "resumed": result.resumed,
        "workers": result.workers,
        "threads": result.threads,
        "peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": peak_rss_mb("children") if result.workers > 1 else None,
        "n_train": result.n_train, "n_val": result.n_val,
        "best": result.best,
        "candidates": [candidate(c) for c in result.candidates],
        "comparisons": result.comparisons,
        "retrain": None if retrain is None else {
            "candidate": retrain.candidate, "epochs": retrain.epochs,
            "test_loss": retrain.test_loss, "test_accuracy": retrain.test_accuracy,
            "model_dir": retrain.model_dir},
        "final": [candidate(c) for c in result.final],
        "table": table_rows(result),
    })


# What a summary measured about the process that trained (not recomputable from the store).
PROCESS_MEASURES = ("wall_seconds", "resumed", "workers", "threads", "peak_rss_mb",
                    "worker_peak_rss_mb")


def write_outputs(result: StudyResult, dataset: Dataset,
                  stored: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the table (md, csv, json), the resolved study file and the figures, each file
    whole or not at all. `stored`, the summary the store keeps, gives the json its process
    measures (wall time, peak memory); everything else is computed from `result`, as the
    csv is, so that the files agree even for a run stored by an older version. OutputError
    (one line) when the disk is full or not writable: the results stay in the store, and the
    same command writes them once it can."""
    out = result.output_dir
    figures = out / "figures"
    written = {kind: out / name for kind, name in zip(("markdown", "csv", "json", "study"),
                                                      RESULT_FILES, strict=True)}
    as_json = summary(result)
    as_json.update({k: stored[k] for k in PROCESS_MEASURES if stored and k in stored})
    contents = {"markdown": to_markdown(result), "csv": to_csv(result),
                "json": json.dumps(as_json, indent=2) + "\n",
                "study": study_to_toml(result.spec)}
    try:
        figures.mkdir(parents=True, exist_ok=True)
        for name, content in contents.items():
            write_text_atomic(written[name], content)
        for c in result.candidates + result.final:
            figure = plots.learning_curves(c.curves, title=c.name, warning=c.warning,
                                           schedule_end=c.schedule_end,
                                           repeats=result.spec.cv.repeats)
            path = figures / plots.curves_file(c.name)
            _save_figure(figure, path)
            written[f"curves:{c.name}"] = path
        grid = plots.sample_grid(dataset.train.images, dataset.train.labels,
                                 class_names=dataset.class_names, per_class=SAMPLES_PER_CLASS)
        _save_figure(grid, figures / "samples.png")
        written["samples"] = figures / "samples.png"
    except OSError as error:
        where = error.filename or out
        raise OutputError(f"{where}: cannot write the run's results ({error.strerror or error}); "
                          "free some space or fix the permissions and run the same command "
                          "again: the results are kept in the store") from None
    return written


def _save_figure(figure: Any, path: Path) -> None:
    plots.save_figure(figure, path, dpi=110)
