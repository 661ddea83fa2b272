"""The end of a search: the best trial retrained on all training images and tested, the table
of the top trials with the paired test against the best, the best against a reference score,
the search plots, and the summary that the store, `runs list` and the report read.

Every trial of a search is cross-validated on the same folds with the same seeds (seeds come
from the fold, as in a study), so the per-fold scores of two trials are paired: the top trials
are compared with the best by the corrected resampled t-test (Nadeau & Bengio), Holm-adjusted
across the table. The best trial's score is read after choosing it among many: the table's
mean is optimistic by the selection, and the retrained model's test accuracy is the number to
quote as an estimate of performance on new images.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fashionlab import stats
from fashionlab.config import study_to_toml
from fashionlab.cv import MemberResult
from fashionlab.search_space import FixedParams, suggest
from fashionlab.serialize import jsonable
from fashionlab.store import RunRecord, Store
from fashionlab.study import summarize_models
from fashionlab.train import EpochMetrics, Tensors

if TYPE_CHECKING:
    from fashionlab.search import _Searcher

ALPHA = 0.05
TABLE_LEGEND = ("Mean ± std across folds at each fold's result epoch, 95% CI from Student's t; "
                "vs best: corrected resampled t-test on the paired folds, Holm-adjusted p. "
                "epoch: the CV-consensus epoch (the retraining length).")


def finish_search(searcher: _Searcher, stopped_by: str, seconds: float) -> dict[str, Any]:
    """Write the search's results and store them with its run; returns the summary. A search
    already finished with the same trials is read back, not retrained."""
    s = searcher
    store, run, study = s.store, s.store.run(s.run.id), s.study
    trials = study.get_trials(deepcopy=False)
    finished = sorted(t.number for t in trials if t.state in (TrialState.COMPLETE,
                                                               TrialState.PRUNED))
    if run.status == "finished" and run.summary and run.summary.get("finished_trials") == finished:
        return run.summary
    direction = "maximize" if s.maximize else "minimize"
    scored = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(
        "fold_scores") and t.value is not None and math.isfinite(t.value)]
    ranked = sorted(scored, key=lambda t: t.value or 0.0, reverse=s.maximize)
    n_train, n_val = len(s.folds[0].train_index), len(s.folds[0].val_index)
    summary: dict[str, Any] = {
        "search": s.spec.name, "run_id": run.id, "study_name": study.study_name,
        "objective": s.search.objective, "direction": direction, "seed": s.spec.seed,
        "n_train": n_train, "n_val": n_val, "stopped_by": stopped_by,
        "finished_trials": finished,
        "counts": {state.name.lower(): sum(t.state == state for t in trials)
                   for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
        "fold_epochs": _fold_epochs(trials), "budget": s.search.budget,
        "wall_seconds": _span(trials) or seconds,
        "trials": [_trial_row(t) for t in trials],
        "history": [t.value if t.state == TrialState.COMPLETE else None for t in trials],
        "importances": importances(study),
        "top": [], "reference": [], "retrain": None, "best": None, "best_value": None,
    }
    if ranked:
        best = ranked[0]
        summary.update(best=_label(best), best_trial=best.number, best_value=best.value,
                       best_params=best.params, best_fold_scores=best.user_attrs["fold_scores"])
        # The base candidate (trial 0) stays in the table: the search's gain over it, paired.
        shown = ranked[: s.search.top] + [t for t in ranked[s.search.top:]
                                          if t.user_attrs.get("base")]
        summary["top"] = top_table(shown, n_train=n_train, n_val=n_val, maximize=s.maximize)
        summary["reference"] = reference_tests(store, run, s, best, n_train=n_train,
                                               n_val=n_val)
        if s.spec.retrain.enabled:
            summary["retrain"] = retrain_best(s, best)
    output = s.output_dir
    figures = output / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    summary["figures"] = [str(p) for p in save_plots(study, figures, has_importances=bool(
        summary["importances"]))]
    summary = jsonable(summary)
    (output / "results.md").write_text(to_markdown(summary))
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "study.toml").write_text(study_to_toml(s.spec))
    store.end_run(run.id, "finished", summary)
    from fashionlab.report import write_report  # the report reads the finished run back

    write_report(store, run.id, device=s.device)
    return summary


def _label(trial: FrozenTrial) -> str:
    return f"trial {trial.number}"


def _fold_epochs(trials: Sequence[FrozenTrial]) -> int:
    from fashionlab.search import fold_epochs

    return fold_epochs(trials)


def _span(trials: Sequence[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def _trial_row(trial: FrozenTrial) -> dict[str, Any]:
    retry_of = trial.system_attrs.get("failed_trial")
    return {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
            "params": trial.params, "models": trial.user_attrs.get("models"),
            "fold_epochs": trial.user_attrs.get("fold_epochs"),
            "stopped": trial.user_attrs.get("stopped"), "retry_of": retry_of,
            "seconds": trial.duration.total_seconds() if trial.duration else None}


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
    comparisons = {c.name: c for c in stats.compare_to_best(
        scores, n_train=n_train, n_test=n_val, higher_is_better=maximize, alpha=ALPHA)} \
        if len(next(iter(scores.values()))) >= 2 else {}
    rows = []
    for trial in trials:
        name = _label(trial)
        summary = stats.summarize(scores[name])
        comparison = comparisons.get(name)
        rows.append({
            "trial": trial.number, "base": trial.user_attrs.get("base"),
            "params": trial.params, "mean": summary.mean,
            "std": summary.std, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
            "n": summary.n, "fold_scores": scores[name],
            "consensus_epoch": trial.user_attrs.get("consensus_epoch"),
            "fold_epochs": trial.user_attrs.get("fold_epochs"),
            "difference": None if comparison is None else comparison.mean_difference,
            "p_value": None if comparison is None else comparison.p_value,
            "p_holm": None if comparison is None else comparison.p_holm,
            "verdict": _verdict(comparison),
        })
    return rows


def _verdict(comparison: stats.Comparison | None) -> str:
    if comparison is None:
        return ""
    if comparison.is_best:
        return "best"
    if comparison.not_worse is None:
        return "not compared"
    return ("not worse" if comparison.not_worse else "worse") + f" (p={comparison.p_holm:.3g})"


def reference_tests(store: Store, run: RunRecord, searcher: _Searcher, best: FrozenTrial, *,
                    n_train: int, n_val: int) -> list[dict[str, Any]]:
    """The best trial against the study's reference: a published score (one-sample), and a
    candidate of a finished study in the store with identical folds (paired)."""
    reference = searcher.search.reference
    if reference is None:
        return []
    scores = np.asarray(best.user_attrs["fold_scores"], dtype=float)
    metric, out = searcher.search.objective, []
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
        theirs = np.array([math.nan if v is None else v for v in candidate[metric]], dtype=float)
        test = stats.corrected_resampled_ttest(scores, theirs, n_train=n_train, n_test=n_val)
        out.append(_test_row(f"{name} (run {other.id})", "paired", float(np.nanmean(theirs)),
                             test, searcher.maximize, note=(
                                 "corrected resampled t-test (Nadeau & Bengio) on the paired "
                                 "folds: same images, same seeds")))
    return out


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


def retrain_best(searcher: _Searcher, best: FrozenTrial) -> dict[str, Any]:
    """The best trial's candidate trained on all training images for its CV-consensus epoch
    (the study's [retrain] rule on its mean val_loss curve) and tested, by the study's own
    retraining; its model is saved under models/<trial>."""
    from fashionlab.data import to_tensors
    from fashionlab.study import _Runner  # a study's retraining, reused as it is

    s = searcher
    name = str(best.user_attrs.get("models") or _label(best))
    candidate = suggest(FixedParams(best.params), s.search, s.base, name)
    keys = [f"{name}/{fold.name}" for fold in s.folds]
    results = [_stored_result(s.store, s.run.id, key) for key in keys]
    result = summarize_models(candidate, results, "cv", s.spec.warning)
    runner = _Runner(s.store, s.run, s.spec, s.output_dir, s.device, False, None)
    runner.progress = s.progress
    x_test, y_test = to_tensors(s.dataset.test, s.device)
    data = Tensors(s.data.x_train, s.data.y_train, x_test, y_test)
    retrained = runner.retrain(result, data, s.dataset.class_names)
    return {"trial": best.number, "candidate": name, "epochs": retrained.epochs,
            "test_loss": retrained.test_loss, "test_accuracy": retrained.test_accuracy,
            "model_dir": str(retrained.model_dir)}


def _stored_result(store: Store, run_id: str, key: str) -> MemberResult:
    record = next(m for m in store.models(run_id) if m.key == key)
    history = [EpochMetrics(e.loss, e.accuracy, e.val_loss, e.val_accuracy, e.seconds)
               for e in store.epochs(run_id, key)]
    status = record.status if record.status in ("finished", "stopped", "failed") else None
    return MemberResult(key, history, status, record.best_epoch,  # type: ignore[arg-type]
                        record.message)


def save_plots(study: optuna.Study, folder: Path, *, has_importances: bool) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates."""
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = plot(study)
        figure = np.ravel(axes)[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The table as text


def _pct(value: Any, digits: int = 2) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) \
        else f"{value * 100:.{digits}f}"


def _fmt(value: Any, spec: str) -> str:
    """A stored number (None where JSON had no finite value: an infinite t) as text."""
    return "-" if value is None else format(value, spec)


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def table_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the top-trials table (accuracies in percent, losses as they are)."""
    scale = summary.get("objective") != "val_loss"
    number = (lambda v: _pct(v)) if scale else (lambda v: "-" if v is None else f"{v:.4f}")
    headers = ["trial", summary.get("objective", "score"), "95% CI", "vs best", "epoch",
               "fold-epochs", "parameters"]
    rows = []
    for row in summary.get("top") or []:
        trial = str(row["trial"]) + (f" (base: {row['base']})" if row.get("base") else "")
        rows.append([trial, f"{number(row['mean'])} ± {number(row['std'])}",
                     f"[{number(row['ci_low'])}, {number(row['ci_high'])}]", row["verdict"],
                     str(row.get("consensus_epoch") or "-"), str(row.get("fold_epochs") or "-"),
                     _params(row["params"])])
    return headers, rows


def reference_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    scale = summary.get("objective") != "val_loss"
    for ref in summary.get("reference") or []:
        if ref.get("missing"):
            lines.append(f"vs {ref['reference']}: not tested ({ref['missing']})")
            continue
        score = _pct(ref["score"]) if scale else f"{ref['score']:.4f}"
        diff = f"{ref['difference'] * (100 if scale else 1):+.2f}{' points' if scale else ''}"
        lines.append(f"vs {ref['reference']} ({score}): {diff}, t={_fmt(ref['t'], '.2f')}, "
                     f"p={_fmt(ref['p_value'], '.3g')} ({ref['kind']}): {ref['verdict']} "
                     f"at alpha {ALPHA}. Test: {ref['test']}.")
    return lines


def retrain_line(summary: Mapping[str, Any]) -> str:
    retrain = summary.get("retrain")
    if not retrain:
        return ""
    return (f"the best (trial {retrain['trial']}) retrained for {retrain['epochs']} epochs on "
            f"all training images: test accuracy {_pct(retrain['test_accuracy'])}% "
            f"({retrain['model_dir']})")


def to_markdown(summary: Mapping[str, Any]) -> str:
    counts = summary.get("counts") or {}
    budget = f" of {summary['budget']}" if summary.get("budget") else ""
    overview = (f"Run `{summary['run_id']}`, Optuna study `{summary['study_name']}`: "
                f"{counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
                f"{counts.get('fail', 0)} failed trials; {summary['fold_epochs']}{budget} "
                f"fold-epochs; stopped by {summary['stopped_by']}; wall time "
                f"{(summary.get('wall_seconds') or 0) / 60:.1f} min.")
    lines = [f"# {summary['search']}: search results", "", overview, ""]
    headers, rows = table_cells(summary)
    if rows:
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", TABLE_LEGEND, ""]
    lines += [f"- {line}" for line in reference_lines(summary)]
    if retrain_line(summary):
        lines.append(f"- {retrain_line(summary)}")
    if summary.get("importances"):
        lines.append("- parameter importances (PED-ANOVA): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    return "\n".join(lines) + "\n"
