"""The end of a search: the best trial retrained on all training images and tested, the table
of the top trials with the paired test against the best, the best against a reference score,
the search plots, and the summary that the store, `runs list` and the report read.

Every trial of a search is cross-validated on the same folds with the same seeds (seeds come
from the fold, as in a study), so the per-fold scores of two trials are paired: the top trials
are compared with the best by the corrected resampled t-test (Nadeau & Bengio), Holm-adjusted
across the table. The best trial's score is read after choosing it among many: the table's
mean is optimistic by the selection, and the retrained model's test accuracy is the number to
quote as an estimate of performance on new images.

One scoring rule for every side of a comparison (`consensus_scores`): a candidate's folds are
all read at its CV-consensus epoch, the study's [warning] rule on the mean val_loss curve over
the epochs every fold reached (the epoch the best is retrained for), or the end of its
learning-rate schedule when the schedule is planned over its epochs. That is how a study reads
a candidate without early stopping, and how the search reads its trials and re-reads the
reference study's candidate from its stored epochs. Each fold's own lowest-val_loss epoch
(early stopping's result) would choose the epoch on the very fold it scores, a reading that
favours early-stopped trials over a reference read at one epoch. No fold is read past its
last epoch: the consensus epoch lies within the epochs every fold trained.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from pydantic import TypeAdapter, ValidationError

from fashionlab import stats
from fashionlab.config import (
    StudySpec,
    TrainSpec,
    WarningRule,
    base_candidate,
    study_to_toml,
)
from fashionlab.cv import Fold, MemberResult, consensus_epoch, consensus_warning, mean_curves
from fashionlab.data import Dataset, to_tensors
from fashionlab.errors import OutputError
from fashionlab.plots import save_figure
from fashionlab.report import REPORT_NAME, write_report
from fashionlab.search.space import FixedParams, suggest
from fashionlab.serialize import jsonable, write_text_atomic
from fashionlab.steps import RunContext, retrain, stored_result, summarize_models
from fashionlab.store import RunRecord, Store
from fashionlab.tables import search_markdown
from fashionlab.text import verdict
from fashionlab.train import Tensors
from fashionlab.trials import (
    retried_trial,
    spent,
    spent_summary,
    trial_counts,
    trial_history,
    trial_row,
)

__all__ = ["FINISHED", "SCORE_RULE", "ConsensusScores", "SearchContext", "consensus_scores",
           "finish_search", "importances", "ranked_trials", "reference_tests", "retrain_best",
           "save_plots", "top_table"]

ALPHA = 0.05
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SCORE_RULE = "cv-consensus epoch"  # the stored name of the rule scores are read by


@dataclass(frozen=True)
class SearchContext:
    """What finishing a search needs from the worker that finishes it."""

    run: RunContext  # the store, the search's run, the study file, its output directory
    study: optuna.Study
    folds: list[Fold]  # every trial's folds
    train: Tensors  # the training images, validated on themselves (the folds)
    dataset: Dataset  # for the test split and the class names

    @property
    def maximize(self) -> bool:
        return self.run.spec.search is None or self.run.spec.search.objective == "val_accuracy"


@dataclass(frozen=True, eq=False)  # arrays: == compares identity
class ConsensusScores:
    """A candidate's folds read at one epoch, its CV-consensus epoch."""

    epoch: int | None  # 1-based; None when no fold has a finite val_loss
    val_loss: np.ndarray  # (n_folds,)
    val_accuracy: np.ndarray  # (n_folds,)

    def of(self, metric: str) -> np.ndarray:
        return self.val_accuracy if metric == "val_accuracy" else self.val_loss


def consensus_scores(results: Sequence[MemberResult], train: TrainSpec,
                     rule: WarningRule) -> ConsensusScores:
    """Every fold read at the CV-consensus epoch (`cv.consensus_epoch`: `rule` on the mean
    val_loss curve over the epochs every fold reached, or the end of a learning-rate schedule
    planned over `train.epochs`), the rule a search scores its trials and its reference by.
    NaN where a fold's value there is not finite, and for a fold that diverged (the others
    are read without it: `cv.healthy`)."""
    epoch = consensus_epoch(results, train, consensus_warning(results, rule))
    if epoch is None:
        nan = np.full(len(results), np.nan)
        return ConsensusScores(None, nan, nan.copy())
    diverged = np.array([r.failed for r in results], dtype=bool)
    val_loss, val_accuracy = (mean_curves(results, metric, epoch)[:, -1]
                              for metric in ("val_loss", "val_accuracy"))
    val_loss[diverged] = val_accuracy[diverged] = np.nan
    return ConsensusScores(epoch, val_loss, val_accuracy)


def ranked_trials(trials: Sequence[FrozenTrial], *, maximize: bool) -> list[FrozenTrial]:
    """The completed trials with a finite score and their fold scores, best first: the order
    of a search's top table."""
    scored = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(
        "fold_scores") and t.value is not None and math.isfinite(t.value)]
    return sorted(scored, key=lambda t: t.value or 0.0, reverse=maximize)


def finish_search(s: SearchContext, stopped_by: str, seconds: float) -> dict[str, Any]:
    """Write the search's results and store them with its run; returns the summary. A search
    already finished with the same trials is read back, not retrained."""
    store, study, spec = s.run.store, s.study, s.run.spec
    search = spec.search
    assert search is not None
    run = store.run(s.run.run.id)
    trials = study.get_trials(deepcopy=False)
    finished = sorted(t.number for t in trials if t.state in FINISHED)
    ranked = ranked_trials(trials, maximize=s.maximize)
    n_train, n_val = len(s.folds[0].train_index), len(s.folds[0].val_index)
    if run.status == "finished" and run.summary and run.summary.get("finished_trials") == finished:
        # The same trials: nothing retrains. Only what reads the table is made again when it
        # changed: `top` or `[search.reference]` edited (neither makes another search), or a
        # reference study run since.
        tables = jsonable(_tables(s, run, ranked, n_train=n_train, n_val=n_val))
        if all(run.summary.get(key) == value for key, value in tables.items()):
            if not (s.run.output_dir / REPORT_NAME).exists():  # killed before it was written
                write_report(store, run.id, device=s.run.device)
            return run.summary
        summary = {**run.summary, **tables}
        _write_results(s, run, summary, finished=run.finished)  # as long a run as before
        return summary
    direction = "maximize" if s.maximize else "minimize"
    used = spent(trials)
    summary: dict[str, Any] = {
        "search": spec.name, "run_id": run.id, "study_name": study.study_name,
        "objective": search.objective, "direction": direction, "seed": spec.seed,
        "n_train": n_train, "n_val": n_val, "stopped_by": stopped_by,
        "finished_trials": finished, "score_rule": SCORE_RULE,
        "counts": trial_counts(trials),
        **spent_summary(search, used),
        "wall_seconds": _span(trials) or seconds,
        "trials": [trial_row(t) for t in trials],
        "history": trial_history(trials),
        "importances": importances(study),
        "top": [], "reference": [], "retrain": None, "best": None, "best_value": None,
    }
    if ranked:
        best = ranked[0]
        summary.update(best=_label(best), best_trial=best.number, best_value=best.value,
                       best_params=best.params, best_fold_scores=best.user_attrs["fold_scores"])
        summary.update(_tables(s, run, ranked, n_train=n_train, n_val=n_val))
        if spec.retrain.enabled:
            summary["retrain"] = retrain_best(s, best)
    figures = s.run.output_dir / "figures"
    try:
        figures.mkdir(parents=True, exist_ok=True)
        summary["figures"] = [str(p) for p in save_plots(study, figures, has_importances=bool(
            summary["importances"]))]
    except OSError as error:  # a full disk, a read-only folder: which file, and what then
        raise _unwritten(error.filename or figures, "figures", error) from None
    summary = jsonable(summary)
    _write_results(s, run, summary)
    return summary


def _tables(s: SearchContext, run: RunRecord, ranked: Sequence[FrozenTrial], *, n_train: int,
            n_val: int) -> dict[str, Any]:
    """The top trials' table and the best against the reference: what `top` and
    `[search.reference]` set, and what a reference study run later changes."""
    search = s.run.spec.search
    assert search is not None
    if not ranked:
        return {"top": [], "reference": []}
    # The base candidate (trial 0) stays in the table: the search's gain over it, paired.
    shown = [*ranked[: search.top], *(t for t in ranked[search.top:] if t.user_attrs.get("base"))]
    return {"top": top_table(shown, n_train=n_train, n_val=n_val, maximize=s.maximize),
            "reference": reference_tests(s.run.store, run, s, ranked[0], n_train=n_train,
                                         n_val=n_val)}


def _write_results(s: SearchContext, run: RunRecord, summary: dict[str, Any], *,
                   finished: float | None = None) -> None:
    """The results files, the finished run's summary in the store (`finished`: when it
    ended, if not now), then the report."""
    output = s.run.output_dir
    for name, text in (("results.md", search_markdown(summary)),
                       ("results.json", json.dumps(summary, indent=2) + "\n"),
                       ("study.toml", study_to_toml(s.run.spec))):
        try:
            write_text_atomic(output / name, text)
        except OSError as error:  # named as the file it is, not as its staging name
            raise _unwritten(output / name, "results", error) from None
    s.run.store.end_run(run.id, "finished", summary, output_dir=output,  # where it is now
                        finished=finished)
    write_report(s.run.store, run.id, device=s.run.device)  # it reads the finished run back


def _unwritten(path: str | Path, what: str, error: OSError) -> OutputError:
    """A search's file the disk refused (full, read-only), named, with what to do."""
    return OutputError(f"{path}: cannot write the search's {what} ({error.strerror or error}); "
                       "free some space or fix the permissions and run the same command "
                       "again: the trials are kept in the store")


def _label(trial: FrozenTrial) -> str:
    """"trial 5", or "trial 5 (retry of 1)": a retry keeps its first trial's models and
    epochs (`models/trial-1`, `trial-1/fold-0` in exports)."""
    first = retried_trial(trial)
    return f"trial {trial.number}" + ("" if first is None else f" (retry of {first})")


def _span(trials: Sequence[FrozenTrial]) -> float | None:
    """The wall time during which some trial ran: the union of the trials' intervals, so that
    workers in parallel count once and the hours between a stop and a resume not at all."""
    intervals = sorted((t.datetime_start, t.datetime_complete) for t in trials
                       if t.datetime_start is not None and t.datetime_complete is not None)
    if not intervals:
        return None
    total, (start, end) = 0.0, intervals[0]
    for next_start, next_end in intervals[1:]:
        if next_start > end:  # a gap: nothing ran
            total += (end - start).total_seconds()
            start = next_start
        end = max(end, next_end)
    return total + (end - start).total_seconds()


def importances(study: optuna.Study) -> dict[str, float]:
    """PED-ANOVA importances of the parameters (fANOVA would need scikit-learn); empty with
    fewer than two completed trials or nothing varied."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError, ZeroDivisionError):
            return {}
    return {name: float(value) for name, value in values.items()}


def top_table(trials: Sequence[FrozenTrial], *, n_train: int, n_val: int,
              maximize: bool) -> list[dict[str, Any]]:
    """The top trials, best first: per-fold scores summarised (mean, std, 95% CI) and each
    tested against the best on the paired folds, Holm-adjusted across the table."""
    scores = {_label(t): np.asarray(t.user_attrs["fold_scores"], dtype=float) for t in trials}
    bounds = stats.ACCURACY_BOUNDS if maximize else stats.LOSS_BOUNDS  # the objective's
    comparisons = {c.name: c for c in stats.compare_to_best(
        scores, n_train=n_train, n_test=n_val, higher_is_better=maximize, alpha=ALPHA,
        bounds=bounds)} if len(next(iter(scores.values()))) >= 2 else {}
    rows = []
    for trial in trials:
        name = _label(trial)
        summary = stats.summarize(scores[name], bounds=bounds)
        comparison = comparisons.get(name)
        rows.append({
            "trial": trial.number, "retry_of": retried_trial(trial),
            "base": trial.user_attrs.get("base"), "params": trial.params, "mean": summary.mean,
            "std": summary.std, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
            "n": summary.n, "fold_scores": scores[name],
            "consensus_epoch": trial.user_attrs.get("consensus_epoch"),
            "fold_epochs": trial.user_attrs.get("fold_epochs"),
            "tflop": trial.user_attrs.get("tflop"),
            "difference": None if comparison is None else comparison.mean_difference,
            "p_value": None if comparison is None else comparison.p_value,
            "p_holm": None if comparison is None else comparison.p_holm,
            "verdict": _verdict(comparison),
        })
    return rows


def _verdict(comparison: stats.Comparison | None) -> str:
    if comparison is None:
        return ""
    return verdict(is_best=comparison.is_best, not_worse=comparison.not_worse,
                   p_holm=comparison.p_holm, reason=comparison.reason)


def reference_tests(store: Store, run: RunRecord, searcher: SearchContext, best: FrozenTrial,
                    *, n_train: int, n_val: int) -> list[dict[str, Any]]:
    """The best trial against the study's reference: a published score (one-sample), and a
    candidate of a finished study in the store with identical folds (paired)."""
    search = searcher.run.spec.search
    reference = None if search is None else search.reference
    if search is None or reference is None:
        return []
    scores = np.asarray(best.user_attrs["fold_scores"], dtype=float)
    metric, out = search.objective, []
    if reference.score is not None:
        test = stats.corrected_resampled_ttest(scores, np.full(len(scores), reference.score),
                                               n_train=n_train, n_test=n_val)
        out.append(_test_row(reference.label, "one-sample", reference.score, test,
                             searcher.maximize, note=(
                                 "corrected resampled t-test (Nadeau & Bengio) of the best's "
                                 "per-fold scores against the fixed published value")))
    if reference.study is not None:
        other = _reference_run(store, run, reference.study)
        if isinstance(other, str):
            out.append({"reference": reference.study, "kind": "paired", "missing": other})
            return out
        summary = other.summary or {}
        name = reference.candidate or summary.get("best")
        candidate = next((c for c in summary.get("candidates") or [] if c["name"] == name),
                         None)
        if candidate is None:
            out.append({"reference": f"{reference.study}: {name}", "kind": "paired",
                        "missing": f"run {other.id} has no candidate {name!r}"})
            return out
        keys = list(candidate.get("keys") or [])
        if len(keys) != len(scores):
            out.append({"reference": f"{reference.study}: {name}", "kind": "paired",
                        "missing": f"run {other.id} stores {len(keys)} fold model(s) of {name!r}"
                                   f", the search has {len(scores)} folds"})
            return out
        # Re-read from its stored epochs by the rule the trials are scored by, not taken
        # from its summary (which its own study's rule, e.g. early stopping's, produced).
        read = consensus_scores([stored_result(store, other.id, key) for key in keys],
                                _candidate_train(other, name), searcher.run.spec.warning)
        theirs = read.of(metric)
        test = stats.corrected_resampled_ttest(scores, theirs, n_train=n_train, n_test=n_val)
        row = _test_row(f"{name} (run {other.id})", "paired", float(np.nanmean(theirs)), test,
                        searcher.maximize, note=(
                            "corrected resampled t-test (Nadeau & Bengio) on the paired folds: "
                            "same images, same seeds, both read at their CV-consensus epoch"))
        out.append({**row, "epoch": read.epoch, "fold_scores": theirs})
    return out


def _candidate_train(run: RunRecord, name: str) -> TrainSpec:
    """How the candidate `name` of a stored study run was trained (its resolved config); the
    defaults (a constant learning rate) for a run written by another version of the config."""
    try:
        spec = TypeAdapter(StudySpec).validate_python(run.config)
    except ValidationError:
        return TrainSpec()
    return next((c.train for c in spec.candidates if c.name == name), TrainSpec())


def _reference_run(store: Store, run: RunRecord, name: str) -> RunRecord | str:
    for other in store.runs(kind="study", name=name):
        if other.state != "finished" or not other.summary:
            continue
        same = all(other.config.get(k) == run.config.get(k) for k in ("cv",)) \
            and other.seed == run.seed and (other.config.get("data") or {}).get("train_limit") \
            == (run.config.get("data") or {}).get("train_limit")
        if same:
            return other
    return (f"no finished run of study {name!r} with the same folds ([cv], data size, seed) "
            "in the store: run it first")


def _test_row(label: str, kind: str, score: float, test: stats.PairedTest, maximize: bool,
              *, note: str) -> dict[str, Any]:
    better = test.mean_difference > 0 if maximize else test.mean_difference < 0
    significant = test.p_value < ALPHA
    verdict = ("better" if better else "worse") if significant else "not significantly different"
    return {"reference": label, "kind": kind, "score": score,
            "difference": test.mean_difference, "t": test.t, "p_value": test.p_value,
            "n": test.n, "significant": significant, "verdict": verdict, "test": note}


def retrain_best(s: SearchContext, best: FrozenTrial) -> dict[str, Any]:
    """The best trial's candidate trained on all training images for its CV-consensus epoch
    (the study's [retrain] rule on its mean val_loss curve) and tested, by the study's own
    retraining step; its model is saved under models/<trial>."""
    spec, ctx = s.run.spec, s.run
    assert spec.search is not None
    name = str(best.user_attrs.get("models") or _label(best))
    candidate = suggest(FixedParams(best.params), spec.search, base_candidate(spec), name)
    results = [stored_result(ctx.store, ctx.run.id, f"{name}/{fold.name}") for fold in s.folds]
    result = summarize_models(candidate, results, "cv", spec.warning)
    x_test, y_test = to_tensors(s.dataset.test, ctx.device, torch.uint8)
    data = Tensors(s.train.x_train, s.train.y_train, x_test, y_test)
    retrained = retrain(ctx, result, data, s.dataset.class_names)
    low, high = stats.proportion_ci(retrained.test_accuracy, len(s.dataset.test))
    return {"trial": best.number, "candidate": name, "epochs": retrained.epochs,
            "test_loss": retrained.test_loss, "test_accuracy": retrained.test_accuracy,
            "test_ci_low": low, "test_ci_high": high, "model_dir": str(retrained.model_dir)}


def save_plots(study: optuna.Study, folder: Path, *, has_importances: bool) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates."""
    # matplotlib: only where a search writes its results
    import matplotlib
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as views

    paths = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots: list[tuple[str, Any]] = [("search-history", views.plot_optimization_history)]
    if has_importances:
        plots.append(("search-importances", lambda s: views.plot_param_importances(
            s, evaluator=optuna.importance.PedAnovaImportanceEvaluator())))
    if len(complete) >= 2 and any(t.params for t in complete):
        plots.append(("search-parallel", views.plot_parallel_coordinate))
    for name, plot in plots:
        # Optuna's plots switch matplotlib to its "ggplot" style for the whole process: every
        # later figure (the caller's in a notebook, ours) would turn grey. Its settings are
        # put back once the file is written.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")
            axes = plot(study)
            figure = np.ravel(axes)[0].figure
            path = folder / f"{name}.png"
            try:
                save_figure(figure, path, dpi=110, bbox_inches="tight")
            finally:  # Optuna draws with pyplot: a figure not written stays open otherwise
                plt.close(figure)
        paths.append(path)
    return paths
