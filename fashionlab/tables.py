"""The results tables as text: one definition of their rows, headers, legends and cells, used
by the terminal, Markdown, CSV, the HTML report and `fashionlab runs`.

A study's table is a list of `Row`s (built from a finished study by `fashionlab.results`, or
read back from a stored summary by `rows_from_summary`); a search's table is read from its
stored summary. Torch-free: `runs show` and the report format tables without a training stack.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fashionlab import text

__all__ = [
    "HEADERS",
    "LEGEND",
    "SPENT_KEYS",
    "Row",
    "counts_text",
    "display_rows",
    "markdown_table",
    "params_text",
    "reference_lines",
    "retrain_line",
    "rows_from_summary",
    "rows_to_csv",
    "search_legend",
    "search_markdown",
    "search_overview",
    "so_far_note",
    "spent_line",
    "spent_note",
    "split_epoch",
    "split_trained",
    "trial_cells",
]

# --------------------------------------------------------------------------------------------
# A study


@dataclass(frozen=True)
class Row:
    """One line of the results table; numbers are fractions (accuracy 0.883), NaN if absent."""

    model: str
    kind: str  # baseline | cv | retrain | final
    epoch: str  # where the result is read: "15 (warning)", "23 (no warning)", "12 (ES median)"
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
    # 95% interval of the test accuracy from the test set's size (`stats.proportion_ci`); NaN
    # where nothing was tested (and in tables stored before it was given)
    test_ci_low: float = math.nan
    test_ci_high: float = math.nan


def split_epoch(label: str) -> tuple[int | float | None, str]:
    """A row's epoch label as (epoch, rule): "12 (warning)" -> (12, "warning"), "20" -> (20, ""),
    "5.5 (ES median)" -> (5.5, "ES median"): the median of an even count of folds' epochs may
    fall between two; "-" -> (None, "")."""
    number, _, rule = label.partition(" (")
    rule = rule.removesuffix(")")
    if number.isdigit():
        return int(number), rule
    try:
        return float(number), rule
    except ValueError:
        return None, rule


def split_trained(label: str) -> tuple[int | None, int | None]:
    """A row's "epochs trained" label as (trained, planned): "200/200" -> (200, 200),
    "120/200 (40% saved)" -> (120, 200), "-" -> (None, None)."""
    trained, _, planned = label.partition(" (")[0].partition("/")
    return ((int(trained) if trained.isdigit() else None),
            (int(planned) if planned.isdigit() else None))


LEGEND = ("epoch: where each result is read: the overfitting warning's epoch; with no warning, "
          "the epoch of the lowest mean val_loss; with a one-cycle schedule, its last epoch "
          "(schedule end); with early stopping (ES), each fold's best epoch. val_loss and val "
          "accuracy: mean ± std across folds at that epoch; 95% CI of the mean from Student's "
          "t. vs best: corrected resampled t-test (Nadeau & Bengio) on the paired folds, "
          "Holm-adjusted p. test acc: [95% interval] from the number of test images (Wilson), "
          "the test set's own noise.")

HEADERS = ("model", "epoch", "val_loss", "val acc %", "95% CI", "vs best", "test acc %",
           "epochs trained")


def _ci(row: Row) -> str:
    if not text.finite(row.ci_low):
        return "-"
    return f"[{row.ci_low * 100:.1f}, {row.ci_high * 100:.1f}]"


def _test(row: Row) -> str:
    """The test accuracy, with its interval where the row has one: "88.35 [87.7, 89.0]"."""
    return text.percent_in(row.test_accuracy, row.test_ci_low, row.test_ci_high)


def display_rows(rows: Iterable[Row]) -> list[tuple[str, ...]]:
    """The table's cells as text: mean ± std across folds, accuracies in percent."""
    return [
        (r.model, r.epoch, text.plus_minus(r.val_loss_mean, r.val_loss_std, r.n, 1.0, 3),
         text.plus_minus(r.val_accuracy_mean, r.val_accuracy_std, r.n), _ci(r), r.vs_best,
         _test(r), r.epochs_trained)
        for r in rows
    ]


def rows_from_summary(summary: Mapping[str, Any]) -> list[Row]:
    """The results table stored in a study's summary, as rows (NaN where the JSON has null)."""
    fields = set(Row.__dataclass_fields__)
    return [Row(**{k: math.nan if v is None else v for k, v in row.items() if k in fields})
            for row in summary.get("table") or []]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines (pipes inside cells escaped)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    return lines


def rows_to_csv(rows: Iterable[Row]) -> str:
    """Every field of every row, numbers unformatted (a spreadsheet formats them)."""
    buffer = io.StringIO()
    fields = list(Row.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: getattr(row, f) for f in fields})
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# A search (its stored summary: "top", "reference", "retrain", "objective", ...)

def search_legend(summary: Mapping[str, Any]) -> str:
    """The legend under a search's table of trials (the reference's reading said only where
    the search has a reference)."""
    reference = ", the reference study's candidate too" if summary.get("reference") else ""
    return ("Every fold read at the CV-consensus epoch (epoch: one epoch for all folds, the "
            "[warning] rule on the mean val_loss curve over the epochs every fold reached; the "
            f"retraining length){reference}. Mean ± std across folds, 95% CI from Student's t; "
            "vs best: corrected resampled t-test on the paired folds, Holm-adjusted p. TFLOP: "
            "estimated training arithmetic.")


def params_text(params: Mapping[str, Any], width: int | None = None) -> str:
    """A trial's parameters on one line ("units_0=402, dropout=0.225"), cut to `width`."""
    line = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())
    return line if width is None or len(line) <= width else line[: width - 1] + "…"


def _score(summary: Mapping[str, Any]) -> Any:
    """How the search's objective is shown: accuracies in percent, losses as they are."""
    if summary.get("objective") == "val_loss":
        return lambda v: text.number(v, ".4f")
    return text.percent


def trial_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the top-trials table."""
    score = _score(summary)
    headers = ["trial", summary.get("objective", "score"), "95% CI", "vs best", "epoch",
               "fold-epochs", "TFLOP", "parameters"]
    rows = []
    for row in summary.get("top") or []:
        trial = str(row["trial"]) + (f" (base: {row['base']})" if row.get("base") else "")
        if row.get("retry_of") is not None:  # its models and epochs are the retried trial's
            trial += f" (retry of {row['retry_of']})"
        # One fold scored (the others failed): a mean without a spread, as in a study's table
        # (a search stored before one value's std became NaN holds 0.0 there).
        one = row.get("n") == 1 or not text.finite(row.get("std"))
        spread = "" if one else f" ± {score(row['std'])}"
        interval = (f"[{score(row['ci_low'])}, {score(row['ci_high'])}]"
                    if text.finite(row.get("ci_low")) else "-")
        rows.append([trial, f"{score(row['mean'])}{spread}", interval, row["verdict"],
                     str(row.get("consensus_epoch") or "-"), str(row.get("fold_epochs") or "-"),
                     text.number(row.get("tflop"), ".3g"), params_text(row["params"])])
    return headers, rows


def reference_lines(summary: Mapping[str, Any], alpha: float = 0.05) -> list[str]:
    """The best trial against the search's references, one sentence each."""
    lines = []
    as_percent = summary.get("objective") != "val_loss"
    score = _score(summary)
    for ref in summary.get("reference") or []:
        if ref.get("missing"):
            lines.append(f"vs {ref['reference']}: not tested ({ref['missing']})")
            continue
        diff = text.number(ref["difference"], "+.2f", 100 if as_percent else 1)
        read = f" at its CV-consensus epoch {ref['epoch']}" if ref.get("epoch") else ""
        lines.append(f"vs {ref['reference']} ({score(ref['score'])}{read}): {diff}"
                     f"{' points' if as_percent else ''}, t={text.number(ref['t'], '.2f')}, "
                     f"p={text.number(ref['p_value'], '.3g')} ({ref['kind']}): "
                     f"{ref['verdict']} at alpha {alpha}. Test: {ref['test']}.")
    return lines


def nothing_ranked_line(summary: Mapping[str, Any]) -> str:
    """Why a finished search has no table, or ""."""
    if summary.get("top"):
        return ""
    counts = summary.get("counts") or {}
    return (f"no trial completed ({counts.get('pruned', 0)} pruned, {counts.get('fail', 0)} "
            "failed): nothing to rank, test against the references or retrain")


def retrain_line(summary: Mapping[str, Any]) -> str:
    retrain = summary.get("retrain")
    if not retrain:
        return ""
    low, high = retrain.get("test_ci_low"), retrain.get("test_ci_high")  # (absent: older runs)
    interval = f" [95% interval {low * 100:.1f}, {high * 100:.1f}]" \
        if text.finite(low) and text.finite(high) else ""
    # A retry runs under a new number and keeps its first attempt's models' name (trial-N).
    retry_of = next((t.get("retry_of") for t in summary.get("trials") or []
                     if isinstance(t, Mapping) and t.get("number") == retrain["trial"]), None)
    again = f", a retry of trial {retry_of}" if retry_of is not None else ""
    return (f"the best (trial {retrain['trial']}{again}) retrained for "
            f"{text.counted(retrain['epochs'], 'epoch')} on "
            f"all training images: test accuracy {text.percent(retrain['test_accuracy'])}%"
            f"{interval} ({retrain['model_dir']})")


# The keys of a search's summary that say what it spent and its budgets (`spent_line` reads
# them; `trials.spent_summary` writes them).
SPENT_KEYS = ("fold_epochs", "budget", "train_seconds", "budget_seconds", "tflop",
              "budget_tflop")


def spent_line(spent: Mapping[str, Any]) -> str:
    """What a search's trials spent, each against its budget where it has one:
    "412/1200 fold-epochs, 6.1 min of training, 3.2/50 TFLOP" (`spent` holds fold_epochs,
    train_seconds, tflop and budget, budget_seconds, budget_tflop, as its summary does)."""
    def of(key: str, form: Any) -> str:
        limit = spent.get(key)
        return f"/{form(limit)}" if limit else ""

    parts = [f"{spent.get('fold_epochs', 0)}{of('budget', str)} fold-epochs"]
    if spent.get("train_seconds") is not None:
        parts.append(f"{text.duration(spent['train_seconds'])}"
                     f"{of('budget_seconds', text.duration)} of training")
    if spent.get("tflop") is not None:
        parts.append(f"{text.number(spent['tflop'], '.3g')}"
                     f"{of('budget_tflop', lambda v: text.number(v, '.3g'))} TFLOP")
    return ", ".join(parts)


def spent_note(summary: Mapping[str, Any]) -> str:
    """A finished search's cost and why it stopped, on one line (the command, the report)."""
    return f"spent: {spent_line(summary)}; stopped by {summary.get('stopped_by', '-')}"


def counts_text(counts: Mapping[str, Any]) -> str:
    """A search's trials by how they ended (`trials.trial_counts`): "3 complete, 0 pruned, 0
    failed trials (1 stopped or lost and run again; 1 waiting to run again; 2 running)"."""
    # ("retried", "waiting", "running" are stored since counts said them: absent before.)
    again = [f"{counts[key]} {what}" for key, what in (
        ("retried", "stopped or lost and run again"), ("waiting", "waiting to run again"),
        ("lost", "lost with its process, run again when the search goes on"),
        ("running", "running")) if counts.get(key)]
    return (f"{counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
            f"{counts.get('fail', 0)} failed trials"
            + (f" ({'; '.join(again)})" if again else ""))


def so_far_note(trials: Mapping[str, Any]) -> str:
    """An unfinished search's trials and cost so far (`runs.describe_run`'s "trials"), on one
    line; "" when they are not known."""
    if not trials.get("counts"):
        return ""
    return f"so far: {counts_text(trials['counts'])}; spent: {spent_line(trials)}"


def search_overview(summary: Mapping[str, Any]) -> str:
    """A finished search in one sentence (Markdown: the run and Optuna study as `code`)."""
    return (f"Run `{summary['run_id']}`, Optuna study `{summary['study_name']}`: "
            f"{counts_text(summary.get('counts') or {})}; {spent_line(summary)}; stopped by "
            f"{summary['stopped_by']}; wall time "
            f"{text.duration(summary.get('wall_seconds') or 0)}.")


def search_markdown(summary: Mapping[str, Any]) -> str:
    """A finished search's results.md."""
    lines = [f"# {text.markdown_text(summary['search'])}: search results", "",
             search_overview(summary), ""]
    headers, rows = trial_cells(summary)
    if rows:
        rows = [[text.markdown_text(trial), *rest] for trial, *rest in rows]  # "(base: NAME)"
        lines += [*markdown_table(headers, rows), "", search_legend(summary), ""]
    else:
        lines += [nothing_ranked_line(summary), ""]
    # Plain sentences holding names (the references', the model folder's): literal text.
    lines += [f"- {text.markdown_text(line)}" for line in reference_lines(summary)]
    if retrain_line(summary):
        lines.append(f"- {text.markdown_text(retrain_line(summary))}")
    if summary.get("importances"):
        lines.append("- parameter importances (PED-ANOVA): " + ", ".join(
            f"{text.markdown_text(k)} {v:.2f}" for k, v in summary["importances"].items()))
    return "\n".join(lines) + "\n"
