"""Early stopping inside cross-validation against full-length training of the same folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import tiny_study_toml

from fashionlab.config import load_study
from fashionlab.store import Store
from fashionlab.study import run_study
from fashionlab.twins import find_twins

CANDIDATES = """
[[candidates]]
name = "full"
layers = [{ units = 16 }]

[[candidates]]
name = "early"
layers = [{ units = 16 }]
train = { early_stopping = { patience = 1, min_delta = 0.1 } }
"""


def test_early_stopping_reports_what_it_saved_and_cost(tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "es.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, candidates=CANDIDATES, final=False,
                                    epochs=12))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    early = next(c for c in result.candidates if c.name == "early")
    assert early.trained_epochs < early.planned_epochs  # some fold stopped before 12 epochs

    # An early-stopped fold trains exactly the first epochs of the full-length fold.
    histories = Store.open(tmp_path / "runs").histories(result.run.id)
    for fold in range(3):
        stopped, full = histories[f"early/fold-{fold}"], histories[f"full/fold-{fold}"]
        assert [e.val_loss for e in stopped] == [e.val_loss for e in full[: len(stopped)]]

    twin = result.twins["early"]
    assert twin.twin_run == result.run.id and twin.twin_epochs == 12
    last = np.array([histories[f"full/fold-{f}"][-1].val_accuracy for f in range(3)])
    np.testing.assert_allclose(twin.accuracy_difference, early.val_accuracy - last)
    assert twin.epochs_saved == 1 - early.trained_epochs / 36
    assert twin.test is not None and 0 <= twin.test.p_value <= 1
    table = (result.output_dir / "results.md").read_text()
    assert "saved)" in table and "early stopping vs all 12 epochs (this run)" in table


def test_a_full_length_twin_is_found_in_an_earlier_run(tiny_idx_dir: Path, tmp_path: Path):
    full_only = CANDIDATES.split("[[candidates]]")[1]
    early_only = CANDIDATES.split("[[candidates]]")[2].replace('"early"', '"full"')
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(tiny_study_toml(tiny_idx_dir, name="a", final=False, epochs=6,
                                     candidates="[[candidates]]" + full_only))
    second.write_text(tiny_study_toml(tiny_idx_dir, name="b", final=False, epochs=6,
                                      candidates="[[candidates]]" + early_only))
    a = run_study(load_study(first), run_dir=tmp_path / "runs", progress=False)
    b = run_study(load_study(second), run_dir=tmp_path / "runs", progress=False)
    assert b.twins["full"].twin_run == a.run.id
    assert f"(run {a.run.id})" in (b.output_dir / "results.md").read_text()


def test_without_a_twin_the_table_says_so(tiny_idx_dir: Path, tmp_path: Path):
    early_only = CANDIDATES.split("[[candidates]]")[2]
    path = tmp_path / "es.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, final=False, epochs=6,
                                    candidates="[[candidates]]" + early_only))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert result.twins == {}
    assert "no full-length run" in (result.output_dir / "results.md").read_text()


def test_a_twin_with_fewer_than_two_scored_folds_gets_no_test(tiny_idx_dir: Path,
                                                             tmp_path: Path):
    # Two of three early-stopped folds without a score (diverged): one pair is no test, and
    # the results are still written.
    path = tmp_path / "es.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, candidates=CANDIDATES, final=False,
                                    epochs=4))
    spec = load_study(path)
    result = run_study(spec, run_dir=tmp_path / "runs", progress=False)
    early = next(c for c in spec.candidates if c.name == "early")
    store = Store.open(tmp_path / "runs")
    try:
        twins = find_twins(store, spec, result.run.id,
                           [(early, np.array([np.nan, 0.9, np.nan]), 8)],
                           fold_names=["fold-0", "fold-1", "fold-2"], n_train=200, n_val=100)
    finally:
        store.close()
    assert twins["early"].test is None
    assert np.isnan(twins["early"].accuracy_difference).sum() == 2
