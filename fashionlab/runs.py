"""The stored runs: list, describe, compare, export and delete them.

    list_runs(store)                 one RunOverview per run, newest first
    describe_run(store, run_id)      everything about one run, JSON-ready
    compare_runs(store, a, b)        side by side; a paired test where the folds match
    epoch_rows(store, run_id)        every stored epoch as a flat row; export_run as CSV or JSON
    delete_run(store, run_id)        its rows in the store, then its output directory

A run id may be given as a unique prefix; an unknown one raises StoreError.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from fashionlab import stats
from fashionlab.errors import FashionlabError, StoreError
from fashionlab.schema import EPOCH_FIELDS
from fashionlab.serialize import jsonable, why_not_written, write_text_atomic
from fashionlab.store import ModelRecord, RunRecord, Store, as_store, safe_url
from fashionlab.tables import SPENT_KEYS, rows_from_summary
from fashionlab.text import first_line

__all__ = [
    "CandidateComparison",
    "RunComparison",
    "RunError",
    "RunOverview",
    "compare_runs",
    "delete_run",
    "describe_run",
    "epoch_rows",
    "export_run",
    "leftover_folder",
    "list_runs",
    "overview",
    "remove_folder",
    "write_export",
]

EXPORT_FIELDS = ("run", "key", "candidate", "role", "repeat", "fold", "epoch", *EPOCH_FIELDS)

RUN_KINDS = ("study", "search")  # what `fashionlab study` and `fashionlab search` store


class RunError(FashionlabError):
    """A run cannot be compared or deleted in its present state."""


@dataclass(frozen=True)
class RunOverview:
    """One line of `runs list`."""

    id: str
    kind: str  # study | search
    study: str  # the study's (or search's) name
    started: float  # unix seconds
    status: str  # running | finished | failed | interrupted
    best: str | None  # the best candidate (or trial)
    best_score: float | None  # its mean validation score across folds, of `best_metric`
    duration: float  # seconds, up to now for a run that has not ended
    output_dir: str | None
    best_metric: str = "val_accuracy"  # a search's objective: val_accuracy or val_loss

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self)) | {"started_utc": _utc(self.started)}


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _mean(values: Any) -> float:
    array = np.array([math.nan if v is None else v for v in values or []], dtype=np.float64)
    if not np.isfinite(array).any():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(array))


def overview(run: RunRecord) -> RunOverview:
    summary = run.summary or {}
    best, score = summary.get("best"), None
    if run.kind == "study":
        for candidate in summary.get("candidates") or []:
            if candidate.get("name") == best:
                score = _mean(candidate.get("val_accuracy"))
    elif isinstance(summary.get("best_value"), (int, float)):
        score = float(summary["best_value"])
    return RunOverview(
        id=run.id, kind=run.kind, study=run.name, started=run.started, status=run.state,
        best=None if best is None else str(best),
        best_score=None if score is None or math.isnan(score) else score,
        duration=run.duration if run.state != "running" else time.time() - run.started,
        output_dir=run.output_dir,
        best_metric=str(summary.get("objective") or "val_accuracy"),
    )


def list_runs(store: Store, *, kind: str | None = None, name: str | None = None
              ) -> list[RunOverview]:
    """Every run (or those of a kind, study or search, or of a name), newest first, with its
    files where they are (`Store.seen_run`: a run directory copied or moved)."""
    store = as_store(store)
    if kind not in (None, *RUN_KINDS):
        raise FashionlabError(f"kind: expected {' or '.join(RUN_KINDS)} (got {kind!r})")
    run_dir = store.run_dir
    return [overview(run.seen_from(run_dir)) for run in store.runs(kind=kind, name=name)]


# What `describe_run` shows of a finished search's summary: its table, and what it spent.
SEARCH_SHOWN = ("objective", "top", "reference", "retrain", "stopped_by", "counts", *SPENT_KEYS)


def describe_run(store: Store, run_id: str, *, run_dir: str | Path | None = None
                 ) -> dict[str, Any]:
    """A run's overview, config, environment, model progress, results table (a search's: its
    top trials, its reference tests and its retrained best) and files (in `<run_dir>/<run
    id>` where that folder is, a run directory moved or copied; else where recorded).
    `run_dir` defaults to the store's own (`Store.run_dir`)."""
    store = as_store(store)
    run = store.seen_run(run_id, run_dir)
    models = store.models(run.id)
    output = Path(run.output_dir) if run.output_dir else None
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*")
                   if p.is_file()) if output and output.is_dir() else []
    summary = run.summary or {}
    trials = None
    if run.kind == "search":
        trials = {k: summary.get(k) for k in SEARCH_SHOWN}
        if run.summary is None:  # not finished: what its trials did and spent so far
            from fashionlab.trials import trials_so_far  # Optuna: off start-up

            trials.update(trials_so_far(store.url, run) or {})
    tests = _test_accuracies(summary)
    return jsonable({
        **overview(run).to_dict(),
        "seed": run.seed, "fingerprint": run.fingerprint, "host": run.host, "pid": run.pid,
        "finished": run.finished,
        "models": {"total": len(models), "by_status": dict(Counter(
            # A model left "running" by a run that no longer runs is not training.
            "interrupted" if m.status == "running" and run.state != "running" else m.status
            for m in models)),
                   "epochs_stored": len(store.epochs(run.id))},
        # Which machine trained which model (a run shared by several: README, Many machines).
        "hosts": _by_host(models),
        "table": [asdict(row) for row in rows_from_summary(summary)],
        "trials": trials,
        "tests": tests,
        # Wilson's 95% interval from the number of test images (NaN: not recorded)
        "test_intervals": {name: list(stats.proportion_ci(
            math.nan if accuracy is None else accuracy, run.data.get("test") or 0))
            for name, accuracy in tests.items()},
        "files": files,
        "config": run.config, "environment": run.environment,
    })


def _by_host(models: Sequence[ModelRecord]) -> dict[str, list[str]]:
    """The keys of the models each machine trained ("?" where it was not recorded)."""
    hosts: dict[str, list[str]] = {}
    for model in models:
        if model.status != "pending":
            hosts.setdefault(model.host or "?", []).append(model.key)
    return hosts


def _test_accuracies(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """Test accuracy of the retrained best and of each final model."""
    out: dict[str, float | None] = {}
    retrain = summary.get("retrain")
    if retrain:
        out[f"{retrain.get('candidate')} (retrained)"] = retrain.get("test_accuracy")
    for final in summary.get("final") or []:
        out[final.get("name")] = final.get("test_accuracy")
    return out


def _paired_tests(summary_a: Mapping[str, Any], summary_b: Mapping[str, Any],
                  ) -> dict[str, tuple[float | None, float | None]]:
    """The test accuracies of two runs by model, a retrained best beside the other's one even
    where they retrained different candidates (rather than two half-empty rows)."""
    tests_a, tests_b = _test_accuracies(summary_a), _test_accuracies(summary_b)
    best_a = (summary_a.get("retrain") or {}).get("candidate")
    best_b = (summary_b.get("retrain") or {}).get("candidate")
    paired = {}
    if summary_a.get("retrain") and summary_b.get("retrain") and best_a != best_b:
        paired[f"retrained best ({best_a} in a, {best_b} in b)"] = (
            tests_a.pop(f"{best_a} (retrained)"), tests_b.pop(f"{best_b} (retrained)"))
    return {**paired, **{k: (tests_a.get(k), tests_b.get(k))
                         for k in dict.fromkeys([*tests_a, *tests_b])}}


# --------------------------------------------------------------------------------------------
# Comparing two runs


@dataclass(frozen=True)
class CandidateComparison:
    """One candidate's mean validation accuracy in run a and run b, and b - a, paired."""

    name: str
    a: stats.Summary | None  # None: not in run a
    b: stats.Summary | None
    difference: float  # mean over folds of b - a (NaN when not in both)
    t: float  # corrected resampled t-test of b against a; NaN when not paired
    p_value: float
    p_holm: float  # Holm-adjusted across the candidates tested
    verdict: str  # "a better (p=...)", "b better (p=...)", "no significant difference (p=...)",
    #               "folds differ", "only in a", "only in b", or why no test ran


@dataclass(frozen=True)
class RunComparison:
    a: RunOverview
    b: RunOverview
    folds_match: bool  # same cv, data and seed: fold j is the same split in both runs
    reason: str | None  # why the folds do not match
    candidates: list[CandidateComparison]
    # Test accuracy of a model in a and b. The retrained bests share one row, "retrained
    # best (X in a, Y in b)", where the two runs retrained different candidates.
    tests: dict[str, tuple[float | None, float | None]]
    test_images: tuple[int | None, int | None] = (None, None)  # how many each run tested on

    def test_intervals(self, name: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """Wilson's 95% interval of a model's test accuracy in a and in b (NaN where it has
        none): how far each run's test set alone moves it."""
        return tuple(stats.proportion_ci(math.nan if accuracy is None else accuracy, n or 0)
                     for accuracy, n in zip(self.tests[name], self.test_images))

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"a": self.a.to_dict(), "b": self.b.to_dict(),
                         "folds_match": self.folds_match, "reason": self.reason,
                         "candidates": [asdict(c) for c in self.candidates],
                         "tests": {k: list(v) for k, v in self.tests.items()},
                         "test_images": list(self.test_images),
                         "test_intervals": {k: [list(i) for i in self.test_intervals(k)]
                                            for k in self.tests}})


def _folds_differ(a: RunRecord, b: RunRecord) -> str | None:
    """Why fold j of `a` may not hold the images fold j of `b` holds, or None: their folds
    come from the same training images (the same `[data]` but for `test_limit`, which no fold
    sees, and the same recorded data where both test on the same images), the same `[cv]`, and
    the same seed unless the folds are contiguous blocks, which no seed shuffles."""
    if a.config.get("cv") != b.config.get("cv"):
        return "folds differ ([cv] is not the same)"
    data_a, data_b = a.config.get("data") or {}, b.config.get("data") or {}
    if {**data_a, "test_limit": None} != {**data_b, "test_limit": None}:
        return "folds differ ([data] is not the same)"
    if data_a.get("test_limit") == data_b.get("test_limit") and None not in (
            a.data_sha256, b.data_sha256) and a.data_sha256 != b.data_sha256:
        return "folds differ (the runs trained on other data: another SHA-256)"
    if a.seed != b.seed and (a.config.get("cv") or {}).get("strategy", "contiguous") != \
            "contiguous":
        return f"folds differ (seed {a.seed} vs {b.seed})"
    return None


def compare_runs(store: Store, a: str, b: str, *, alpha: float = 0.05) -> RunComparison:
    """Compare the candidates of two finished studies by their per-fold validation accuracy.

    Where the folds match (the same training images, [cv], and seed unless the folds are
    contiguous, so fold j holds the same images in both), a candidate present in both gets the
    corrected resampled t-test of its b scores against its a scores, Holm-adjusted across the
    candidates; elsewhere 'folds differ'.
    """
    store = as_store(store)
    run_a, run_b = store.seen_run(a), store.seen_run(b)
    if run_a.id == run_b.id:
        raise RunError(f"run {run_a.id} twice: name two runs to compare")
    for run in (run_a, run_b):
        if run.summary is None or run.kind != "study":
            raise RunError(f"run {run.id} is {run.state if run.summary is None else 'a search'}"
                           ": only finished studies can be compared")
    reason = _folds_differ(run_a, run_b)
    summary_a, summary_b = run_a.summary or {}, run_b.summary or {}
    scores_a = {c["name"]: c for c in summary_a.get("candidates") or []}
    scores_b = {c["name"]: c for c in summary_b.get("candidates") or []}
    names = list(dict.fromkeys([*scores_a, *scores_b]))
    n_train, n_val = summary_a.get("n_train"), summary_a.get("n_val")

    def values(candidate: Mapping[str, Any] | None) -> np.ndarray | None:
        if candidate is None:
            return None
        return np.array([math.nan if v is None else v for v in candidate["val_accuracy"]],
                        dtype=np.float64)

    tests: dict[str, stats.PairedTest] = {}
    untested: dict[str, str] = {}
    for name in names:
        va, vb = values(scores_a.get(name)), values(scores_b.get(name))
        if va is None or vb is None:
            untested[name] = "only in a" if vb is None else "only in b"
        elif reason is not None:
            untested[name] = "folds differ"
        elif not n_train or not n_val:
            untested[name] = "fold sizes unknown"
        else:
            try:
                tests[name] = stats.corrected_resampled_ttest(vb, va, n_train=n_train,
                                                              n_test=n_val)
            except ValueError as error:
                untested[name] = str(error)
    adjusted = dict(zip(tests, stats.holm([t.p_value for t in tests.values()]).tolist()))
    rows = []
    for name in names:
        va, vb = values(scores_a.get(name)), values(scores_b.get(name))
        in_a = None if va is None else stats.summarize(va, bounds=stats.ACCURACY_BOUNDS)
        in_b = None if vb is None else stats.summarize(vb, bounds=stats.ACCURACY_BOUNDS)
        difference = math.nan if in_a is None or in_b is None else in_b.mean - in_a.mean
        test = tests.get(name)
        if test is None:
            rows.append(CandidateComparison(name, in_a, in_b, difference, math.nan,
                                            math.nan, math.nan, untested[name]))
            continue
        p = adjusted[name]
        if p < alpha:
            verdict = f"{'b' if test.mean_difference > 0 else 'a'} better (p={p:.3g})"
        else:
            verdict = f"no significant difference (p={p:.3g})"
        rows.append(CandidateComparison(name, in_a, in_b, test.mean_difference,
                                        test.t, test.p_value, p, verdict))
    return RunComparison(
        a=overview(run_a), b=overview(run_b), folds_match=reason is None, reason=reason,
        candidates=rows, tests=_paired_tests(summary_a, summary_b),
        test_images=(run_a.data.get("test"), run_b.data.get("test")),
    )


# --------------------------------------------------------------------------------------------
# Export and delete


def epoch_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every stored epoch of a run: run, key, candidate, role, repeat, fold, epoch, metrics."""
    run = store.run(run_id)
    models = {m.key: m for m in store.models(run.id)}
    rows = []
    for record in store.epochs(run.id):
        model = models.get(record.key)
        rows.append({
            "run": run.id, "key": record.key,
            "candidate": model.candidate if model else None,
            "role": model.role if model else None,
            "repeat": model.repeat if model else None, "fold": model.fold if model else None,
            "epoch": record.epoch, **{f: getattr(record, f) for f in EPOCH_FIELDS},
        })
    return rows


def export_run(store: Store, run_id: str, format: str = "csv") -> str:
    """A run's epochs as CSV (one row each; empty cells for missing values) or JSON (a list)."""
    store = as_store(store)
    rows = epoch_rows(store, run_id)
    if format == "json":
        return json.dumps(jsonable(rows), indent=2, allow_nan=False) + "\n"
    if format != "csv":
        raise ValueError(f"format must be csv or json, got {format!r}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for k, v in row.items()})
    return buffer.getvalue()


def write_export(store: Store, run_id: str, path: str | Path,
                 format: str | None = None) -> Path:
    """Write `export_run` to a file, whole or not at all; the format is the file's suffix's
    (.csv or .json) unless given, and a suffix that is not the format's is refused, so that
    no other file (a study file, a model) is written over by a slip of the command line."""
    store = as_store(store)
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    format = format or (suffix if suffix in ("csv", "json") else "csv")
    if suffix != format:
        raise RunError(f"{path}: the {format.upper()} export must be written to a "
                       f".{format} file")
    text = export_run(store, run_id, format)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as error:
        raise RunError(f"{path}: cannot write ({why_not_written(path, error)})") from None
    return path


def run_output_dir(run: RunRecord, run_dir: str | Path | None = None) -> Path | None:
    """The folder of a run's files: `run_dir/<run id>` when a run directory is given, else the
    one the store recorded (None when it recorded none)."""
    if run_dir is not None:
        return Path(run_dir) / run.id
    return Path(run.output_dir) if run.output_dir else None


# How `Store.create_run` names a run: its start (UTC), its name, its fingerprint's start.
_RUN_ID = re.compile(r"\d{8}-\d{6}-.+-[0-9a-f]{6}(-\d+)?")


def leftover_folder(store: Store, run_id: str, run_dir: str | Path) -> Path | None:
    """`<run_dir>/<run_id>`, the folder of a run the store no longer holds (its deletion was
    stopped after the rows, before the files), or None: there is no such folder, `run_id` is
    no whole run id, or the store still holds the run."""
    folder = Path(run_dir) / run_id
    if not _RUN_ID.fullmatch(run_id) or not folder.is_dir() or \
            any(run.id == run_id for run in store.runs()):
        return None
    return folder


def remove_folder(folder: Path) -> None:
    """Remove a run's folder (a RunError saying why it could not)."""
    try:
        shutil.rmtree(folder)
    except OSError as error:
        raise RunError(f"{folder}: cannot remove it ({error.strerror or error})") from None


def deletable_run(store: Store, run_id: str) -> RunRecord:
    """The run `delete_run` would delete, or the error it would raise before touching
    anything (a running run, a read-only store): what to check before asking a person. A run
    whose stored JSON was damaged by hand can be deleted: it needs none of it."""
    run = store.run(run_id, damaged_ok=True)
    if run.state == "running":
        raise RunError(f"run {run.id} is running ({run.holder}); "
                       "stop it before deleting it")
    if store.read_only:
        raise StoreError(f"cannot write to the store {safe_url(store.url)}: it is read-only "
                         "(nothing deleted)")
    return run


def delete_run(store: Store, run_id: str, *,
               run_dir: str | Path | None = None) -> RunRecord | None:
    """Delete a run's rows in the store and its output directory; returns what was deleted,
    or None where the run had left the store already and this removed the folder its
    stopped deletion left (`leftover_folder`: only for a whole run id).

    A running run is refused. The database goes first: a store that cannot be written
    (read-only, unreachable) fails before any file is touched. A search's Optuna study (its
    trials, in the same database) goes before the run's rows: a process killed in between
    leaves the run, which the same deletion finishes, not trials without a run. A process
    killed after the rows leaves files without a run, never a run without its files. The
    directory is removed only when it is the run's own (named after the run id), so a store
    pointing elsewhere never deletes unrelated files; with `run_dir` it is
    `run_dir/<run id>`, whatever path the store recorded (a copied run directory's store
    still names the original's folder). `run_dir` defaults to the store's own
    (`Store.run_dir`), so that deleting from a copy never touches the original's files.
    """
    store = as_store(store)
    try:
        run = deletable_run(store, run_id)
    except StoreError:
        seen_from = store.run_dir if run_dir is None else run_dir
        left = None if seen_from is None else leftover_folder(store, run_id, seen_from)
        if left is None:
            raise
        remove_folder(left)
        return None
    run_dir = store.run_dir_holding(run.id) if run_dir is None else run_dir
    if run.kind == "search":
        from fashionlab.trials import delete_study, study_name  # Optuna: off start-up

        try:
            delete_study(store.url, study_name(run.name, run.fingerprint))
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to the store {safe_url(store.url)}: "
                             f"{first_line(error)}") from None
    store.delete_run(run.id)
    directory = run_output_dir(run, run_dir)
    if directory is not None and directory.name == run.id and directory.is_dir():
        try:
            shutil.rmtree(directory)
        except OSError as error:
            raise RunError(f"{directory}: the run is deleted from the store, but its "
                           f"files are not ({error.strerror or error}); `fashionlab runs "
                           f"delete {run.id}` again removes them") from None
    return run
