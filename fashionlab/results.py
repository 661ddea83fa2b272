"""A study's results as a table (terminal, Markdown, CSV, JSON) and figures on disk."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fashionlab import plots
from fashionlab.config import study_to_toml
from fashionlab.data import Dataset
from fashionlab.serialize import jsonable
from fashionlab.stats import Comparison, summarize
from fashionlab.study import CandidateResult, StudyResult
from fashionlab.twins import TwinComparison


@dataclass(frozen=True)
class Row:
    """One line of the results table; numbers are fractions (accuracy 0.883), NaN if absent."""

    model: str
    kind: str  # baseline | cv | retrain | final
    epoch: str  # where the result is read: "15 (warning)", "23 (lowest val_loss)", "20"
    val_loss_mean: float
    val_loss_std: float
    val_accuracy_mean: float
    val_accuracy_std: float
    ci_low: float  # 95% confidence interval of the mean val accuracy
    ci_high: float
    n: int  # models behind the numbers (folds)
    vs_best: str  # "best", "not worse (p=0.41)", "worse (p=0.003)", ""
    test_accuracy: float
    epochs_trained: str  # "200/200", or fewer with early stopping
    note: str


def _epoch_label(result: CandidateResult) -> str:
    if result.candidate.train.early_stopping is not None:
        e = result.result_epochs
        return f"{int(np.median(e))} (ES median)" if len(e) > 1 else f"{e[0]} (ES best)"
    if result.warning.fired:
        return f"{result.warning.epoch} (warning)"
    if result.warning.best_epoch is None:
        return "-"
    return f"{result.warning.best_epoch} (no warning)"


def _verdict(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    if comparison.is_best:
        return "best"
    if comparison.not_worse is None:
        return f"not compared ({comparison.reason})"
    word = "not worse" if comparison.not_worse else "worse"
    return f"{word} (p={comparison.p_holm:.3g})"


def table_rows(result: StudyResult) -> list[Row]:
    n_classes = result.spec.candidates[0].model.n_classes if result.spec.candidates else 10
    rows = [Row("random guess", "baseline", "-", math.log(n_classes), 0.0, 1 / n_classes, 0.0,
                math.nan, math.nan, 0, "", math.nan, "-", "the starting point: 1 in 10")]
    comparisons = {c.name: c for c in result.comparisons}
    for candidate in result.candidates:
        rows.append(_candidate_row(candidate, comparisons.get(candidate.name),
                                   result.twins.get(candidate.name), result.run.id))
    if result.retrain is not None:
        r = result.retrain
        rows.append(Row(f"{r.candidate} (retrained)", "retrain", str(r.epochs), math.nan, math.nan,
                        math.nan, math.nan, math.nan, math.nan, 1, "", r.test_accuracy,
                        f"{len(r.history)}/{r.epochs}",
                        f"best candidate, trained on all {result.n_train + result.n_val}, "
                        "tested on the test set"))
    for final in result.final:
        rows.append(_candidate_row(final, None))
    return rows


def _candidate_row(candidate: CandidateResult, comparison: Comparison | None,
                   twin: TwinComparison | None = None, run_id: str = "") -> Row:
    loss, accuracy = summarize(candidate.val_loss), summarize(candidate.val_accuracy)
    notes = list(candidate.failures)
    if candidate.role == "final":
        notes = notes or ["validated on the test set; test accuracy after the last epoch"]
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
    text = (f"early stopping vs all {twin.twin_epochs} epochs ({where}): "
            f"{_pm(difference.mean, difference.std, difference.n, digits=2)} points of val "
            f"accuracy")
    if twin.test is not None:
        text += f" (paired p={twin.test.p_value:.2g})"
    return text + f", {twin.epochs_saved:.0%} of the fold-epochs saved"


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "-"
    if n <= 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _ci(row: Row) -> str:
    if not math.isfinite(row.ci_low):
        return "-"
    return f"[{row.ci_low * 100:.1f}, {row.ci_high * 100:.1f}]"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value * 100:.2f}"


LEGEND = ("epoch: where each result is read: the overfitting warning's epoch; with no warning, "
          "the epoch of the lowest mean val_loss; with early stopping (ES), each fold's best "
          "epoch. val_loss and val accuracy: mean ± std across folds at that epoch; "
          "95% CI of the mean from Student's t. vs best: corrected resampled t-test "
          "(Nadeau & Bengio) on the paired folds, Holm-adjusted p.")

HEADERS = ("model", "epoch", "val_loss", "val acc %", "95% CI", "vs best", "test acc %",
           "epochs trained")


def display_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    """The table's cells as text: mean ± std across folds, accuracies in percent."""
    return [
        (r.model, r.epoch, _pm(r.val_loss_mean, r.val_loss_std, r.n, 1.0, 3),
         _pm(r.val_accuracy_mean, r.val_accuracy_std, r.n), _ci(r), r.vs_best,
         _pct(r.test_accuracy), r.epochs_trained)
        for r in rows
    ]


def to_markdown(result: StudyResult) -> str:
    rows = table_rows(result)
    lines = [f"# {result.spec.name}: results", "",
             f"Run `{result.run.id}`, seed {result.spec.seed}, "
             f"{result.spec.cv.n_splits}-fold CV ({result.spec.cv.strategy}"
             + (f", {result.spec.cv.repeats} repeats" if result.spec.cv.repeats > 1 else "")
             + f"), wall time {result.wall_seconds / 60:.1f} min"
             + (f" ({result.workers} worker processes)." if result.workers > 1 else "."), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
              for cells in display_rows(rows)]
    lines += ["", LEGEND]
    notes = [f"- {r.model}: {r.note}" for r in rows if r.note and r.kind != "baseline"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def to_csv(result: StudyResult) -> str:
    buffer = io.StringIO()
    fields = list(Row.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in table_rows(result):
        writer.writerow({f: getattr(row, f) for f in fields})
    return buffer.getvalue()


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
            "result_epochs": c.result_epochs, "val_loss": c.val_loss,
            "val_accuracy": c.val_accuracy, "trained_epochs": c.trained_epochs,
            "planned_epochs": c.planned_epochs, "failures": c.failures,
            "test_loss": c.test_loss, "test_accuracy": c.test_accuracy,
            "mean_curves": c.mean_curves,
        }

    retrain = result.retrain
    return jsonable({
        "study": result.spec.name, "run_id": result.run.id, "seed": result.spec.seed,
        "wall_seconds": result.wall_seconds, "workers": result.workers,
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


def write_outputs(result: StudyResult, dataset: Dataset) -> dict[str, Path]:
    """Write the table (md, csv, json), the resolved study file and the figures."""
    out = result.output_dir
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": out / "results.md", "csv": out / "results.csv",
        "json": out / "results.json", "study": out / "study.toml",
    }
    written["markdown"].write_text(to_markdown(result))
    written["csv"].write_text(to_csv(result))
    written["json"].write_text(json.dumps(summary(result), indent=2) + "\n")
    written["study"].write_text(study_to_toml(result.spec))
    for c in result.candidates + result.final:
        figure = plots.learning_curves(c.curves, title=c.name, warning=c.warning)
        path = figures / f"curves-{_file_name(c.name)}.png"
        figure.savefig(path, dpi=110)
        written[f"curves:{c.name}"] = path
    grid = plots.sample_grid(dataset.train.images, dataset.train.labels,
                             class_names=dataset.class_names, per_class=1)
    grid.savefig(figures / "samples.png", dpi=110)
    written["samples"] = figures / "samples.png"
    return written


def _file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")
