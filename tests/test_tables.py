"""The results tables as text (fashionlab.tables): rows, cells, Markdown, CSV, a search's."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from html import escape

import pytest

from fashionlab.tables import (
    HEADERS,
    Row,
    display_rows,
    markdown_table,
    params_text,
    reference_lines,
    retrain_line,
    rows_from_summary,
    rows_to_csv,
    search_legend,
    search_markdown,
    spent_line,
    spent_note,
    split_epoch,
    split_trained,
    trial_cells,
)

ROW = Row("dense(64)", "cv", "18 (warning)", 0.3291, 0.0112, 0.8834, 0.0041, 0.878, 0.888, 5,
          "not worse (p=0.106)", math.nan, "200/200", "")


def test_cells_show_mean_std_and_ci_in_percent():
    (cells,) = display_rows([ROW])
    assert len(cells) == len(HEADERS)
    assert cells == ("dense(64)", "18 (warning)", "0.329 ± 0.011", "88.3 ± 0.4",
                     "[87.8, 88.8]", "not worse (p=0.106)", "-", "200/200")


def test_rows_survive_the_stored_summary():
    stored = {"table": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in dataclasses.asdict(ROW).items()}]}
    (row,) = rows_from_summary(stored)
    assert display_rows([row]) == display_rows([ROW])
    assert rows_from_summary({}) == []


def test_markdown_escapes_pipes_and_csv_keeps_every_field():
    lines = markdown_table(["a", "b"], [["x|y", "z"]])
    assert lines == ["| a | b |", "|---|---|", "| x\\|y | z |"]
    (parsed,) = csv.DictReader(io.StringIO(rows_to_csv([ROW])))
    assert parsed["model"] == "dense(64)" and float(parsed["val_accuracy_mean"]) == 0.8834


SEARCH = {
    "search": "s", "run_id": "r", "study_name": "s-abc", "objective": "val_accuracy",
    "counts": {"complete": 2, "pruned": 1, "fail": 0}, "fold_epochs": 30, "budget": 60,
    "stopped_by": "n_trials", "wall_seconds": 90.0,
    "top": [{"trial": 3, "base": None, "mean": 0.9, "std": 0.01, "ci_low": 0.88,
             "ci_high": 0.92, "verdict": "best", "consensus_epoch": 7, "fold_epochs": 15,
             "params": {"units_0": 402, "dropout": 0.2251}}],
    "reference": [{"reference": "published", "kind": "one-sample", "score": 0.895,
                   "difference": 0.005, "t": 1.2, "p_value": 0.3, "verdict":
                   "not significantly different", "test": "corrected t-test"},
                  {"reference": "seed", "missing": "no run"}],
    "retrain": {"trial": 3, "epochs": 7, "test_accuracy": 0.8985, "model_dir": "m/trial-3"},
}


def test_a_search_table_and_its_lines():
    headers, (cells,) = trial_cells(SEARCH)
    assert headers[1] == "val_accuracy"
    assert cells[:4] == ["3", "90.00 ± 1.00", "[88.00, 92.00]", "best"]
    assert cells[-1] == "units_0=402, dropout=0.225"
    first, missing = reference_lines(SEARCH)
    assert first.startswith("vs published (89.50): +0.50 points, t=1.20, p=0.3")
    assert missing == "vs seed: not tested (no run)"
    assert "retrained for 7 epochs" in retrain_line(SEARCH)
    assert "retrained for 1 epoch on" in retrain_line({"retrain": {**SEARCH["retrain"],
                                                                   "epochs": 1}})
    assert "test accuracy 89.85%" in retrain_line(SEARCH)
    assert "the best (trial 3) retrained" in retrain_line(SEARCH)
    # A retry keeps its first attempt's models' name: the line says whose retry it is.
    retried = {**SEARCH, "trials": [{"number": 1, "state": "fail", "retry_of": None},
                                    {"number": 3, "state": "complete", "retry_of": 1}]}
    assert "the best (trial 3, a retry of trial 1) retrained" in retrain_line(retried)
    assert "wall time 90.0 s" in search_markdown(SEARCH)
    assert "30/60 fold-epochs" in search_markdown(SEARCH)  # a summary without compute counts
    assert "read at the CV-consensus epoch" in search_markdown(SEARCH)
    loss = {**SEARCH, "objective": "val_loss"}
    assert trial_cells(loss)[1][0][1] == "0.9000 ± 0.0100"


def test_what_a_search_spent_is_shown_against_its_budgets():
    spent = {"fold_epochs": 412, "budget": 1200, "train_seconds": 366.0, "budget_seconds": None,
             "tflop": 3.21, "budget_tflop": 50.0}
    assert spent_line(spent) == "412/1200 fold-epochs, 6.1 min of training, 3.21/50 TFLOP"
    assert spent_line({"fold_epochs": 7}) == "7 fold-epochs"
    assert spent_note({**spent, "stopped_by": "budget_tflop"}).endswith(
        "3.21/50 TFLOP; stopped by budget_tflop")
    headers, (cells,) = trial_cells({**SEARCH, "top": [{**SEARCH["top"][0], "tflop": 0.0123}]})
    assert cells[headers.index("TFLOP")] == "0.0123"


def test_a_trial_scored_on_one_fold_shows_no_spread():
    one = {**SEARCH["top"][0], "std": math.nan, "n": 1, "ci_low": math.nan, "ci_high": math.nan}
    _, (cells,) = trial_cells({**SEARCH, "top": [one]})
    assert cells[1:3] == ["90.00", "-"]
    stored = {**one, "std": None, "ci_low": None, "ci_high": None}  # NaN as the JSON holds it
    assert trial_cells({**SEARCH, "top": [stored]})[1][0][1:3] == ["90.00", "-"]
    older = {**stored, "std": 0.0}  # stored when one value's std was 0.0
    assert trial_cells({**SEARCH, "top": [older]})[1][0][1:3] == ["90.00", "-"]


def test_params_text_is_cut_to_a_width():
    assert params_text({"a": 1, "b": 0.123456}) == "a=1, b=0.123"
    assert params_text({"a": "x" * 100}, width=10) == "a=xxxxxxx…"


def test_a_search_results_md_shows_the_names_it_holds_as_written():
    from markdown_it import MarkdownIt  # rich's Markdown parser

    base, reference, folder = "1. *wide*", "~~seed~~: dense_(256)_", "runs/<x>/trial-3"
    summary = {**SEARCH, "top": [{**SEARCH["top"][0], "base": base}],
               "reference": [{**SEARCH["reference"][0], "reference": reference}],
               "retrain": {**SEARCH["retrain"], "model_dir": folder}}
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(
        search_markdown(summary))
    for name in (base, reference, folder):
        assert escape(name, quote=False) in html, name
    assert not re.search(r"<(em|s|del|ol)\b", html)


@pytest.mark.parametrize(("label", "epoch", "trained"), [
    ("18 (warning)", (18, "warning"), None), ("20", (20, ""), None), ("-", (None, ""), None),
    ("5.5 (ES median)", (5.5, "ES median"), None), ("6 (ES median)", (6, "ES median"), None),
    ("200/200", None, (200, 200)), ("120/200 (40% saved)", None, (120, 200)),
    ("-", None, (None, None))])
def test_labels_split_into_numbers(label: str, epoch: tuple | None, trained: tuple | None):
    if epoch is not None:
        assert split_epoch(label) == epoch
    if trained is not None:
        assert split_trained(label) == trained


def test_the_search_legend_speaks_of_a_reference_only_where_there_is_one():
    assert "reference" not in search_legend({"reference": None})
    assert "reference" not in search_legend({"reference": []})
    with_one = search_legend({"reference": [{"reference": "seed: dense(256) dropout"}]})
    assert "the retraining length), the reference study's candidate too. Mean" in with_one
