"""The steps a study and a search share (fashionlab.steps), on the tiny dataset."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from helpers import Recorder, tiny_study_toml

from fashionlab.config import load_study
from fashionlab.config.specs import EarlyStopping
from fashionlab.cv import MemberResult, make_folds
from fashionlab.steps import (
    RunContext,
    checkpoint_path,
    cv_members,
    finished_models,
    load_study_data,
    model_dir,
    plan_stacks,
    register_models,
    stack_label,
    stored_result,
    summarize_models,
    train_or_reuse,
)
from fashionlab.store import Store
from fashionlab.train import EpochMetrics, Member, Tensors


def _context(tiny_idx_dir: Path, tmp_path: Path) -> tuple[RunContext, list, Tensors]:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=3, final=False))
    spec = load_study(path)
    store = Store("sqlite://")
    run = store.create_run(kind="study", name=spec.name, fingerprint="f", seed=spec.seed,
                           config=spec.to_dict(), environment={}, output_root=tmp_path)
    dataset = load_study_data(spec)
    folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed)
    x = torch.as_tensor(dataset.train.images, dtype=torch.float32) / 255
    y = torch.as_tensor(dataset.train.labels, dtype=torch.int64)
    ctx = RunContext(store, run, spec, tmp_path / run.id, torch.device("cpu"), Recorder())
    return ctx, folds, Tensors(x, y, x, y)


def test_a_stack_is_trained_once_then_read_back(tiny_idx_dir: Path, tmp_path: Path):
    ctx, folds, data = _context(tiny_idx_dir, tmp_path)
    members, owner, fold_of = cv_members(ctx.spec, folds)
    register_models(ctx, list(members.values()), owner, "cv", fold_of)
    register_models(ctx, list(members.values()), owner, "cv", fold_of)  # nothing twice
    assert len(ctx.store.models(ctx.run.id)) == len(members)
    stack = plan_stacks(list(members.values()), owner)[0]
    label = stack_label(stack, owner)
    trained = train_or_reuse(ctx, stack, owner[stack[0].key], data, label)
    assert set(finished_models(ctx.store, ctx.run.id)) == {m.key for m in stack}
    calls = len(ctx.reporter.calls)
    again = train_or_reuse(ctx, stack, owner[stack[0].key], data, label)
    assert len(ctx.reporter.calls) == calls  # read back from the store: nothing trained
    for member in stack:
        assert [m.val_loss for m in again[member.key].history] == \
            [m.val_loss for m in trained[member.key].history]
    # The reporter heard of the stack: started, 3 epochs with every member's metrics, done.
    assert ctx.reporter.calls[0] == ("start", label, 3)
    epochs = [c for c in ctx.reporter.calls if c[0] == "epoch"]
    assert [c[2] for c in epochs] == [1, 2, 3]
    assert all(c[3] == sorted(m.key for m in stack) for c in epochs)
    summary = summarize_models(owner[stack[0].key], [again[m.key] for m in stack[:len(folds)]],
                               "cv", ctx.spec.warning)
    assert summary.val_accuracy.shape == (len(folds),)
    assert np.isfinite(summary.val_accuracy).all()


def test_a_model_the_store_does_not_know_reads_back_empty(tiny_idx_dir: Path, tmp_path: Path):
    ctx, _, _ = _context(tiny_idx_dir, tmp_path)
    result = stored_result(ctx.store, ctx.run.id, "nobody/fold-0")
    assert result.history == [] and result.status is None


def test_file_names_of_a_run(tmp_path: Path):
    member = Member("dense(64)/fold-0", None, np.arange(2), None, 0)  # type: ignore[arg-type]
    assert checkpoint_path(tmp_path, [member]).parent == tmp_path / "checkpoints"
    assert checkpoint_path(tmp_path, [member]) != checkpoint_path(tmp_path, [member], {"a": 1})
    assert checkpoint_path(tmp_path, [member], {"a": 1}) == \
        checkpoint_path(tmp_path, [member], {"a": 1})
    assert model_dir(tmp_path, "dense(256)x2 dropout") == \
        tmp_path / "models" / "dense_256_x2_dropout"


def test_an_early_stopped_model_that_diverged_at_once_has_no_score(tiny_idx_dir: Path,
                                                                     tmp_path: Path):
    ctx, _, _ = _context(tiny_idx_dir, tmp_path)
    candidate = ctx.spec.candidates[0]
    candidate = dataclasses.replace(candidate, train=dataclasses.replace(
        candidate.train, epochs=3, early_stopping=EarlyStopping(patience=2)))
    healthy = [EpochMetrics(0.5, 0.8, 0.6, 0.75, 1.0), EpochMetrics(0.4, 0.85, 0.5, 0.8, 1.0)]
    diverged = [EpochMetrics(math.nan, 0.1, math.nan, 0.1, 1.0)]  # accuracy still a number
    results = [MemberResult("a/fold-0", healthy, "stopped", best_epoch=2),
               MemberResult("a/fold-1", diverged, "failed", best_epoch=None, message="diverged")]
    summary = summarize_models(candidate, results, "cv", ctx.spec.warning)
    assert summary.result_epochs.tolist() == [2, 0]
    assert summary.val_accuracy[0] == 0.8
    assert math.isnan(summary.val_accuracy[1]) and math.isnan(summary.val_loss[1])


def _history(val_losses: list[float], val_accuracy: float = 0.8) -> list[EpochMetrics]:
    return [EpochMetrics(v, 0.5, v, val_accuracy, 0.1) for v in val_losses]


def _folds_with_one_diverged() -> list[MemberResult]:
    """Two folds that trained 40 epochs, falling then rising from epoch 12, and one that
    diverged at its third epoch (its loss NaN from there)."""
    falling = [1.0 - 0.03 * e if e < 12 else 0.67 + 0.01 * (e - 12) for e in range(40)]
    return [MemberResult("c/fold-0", _history(falling, 0.80), "finished"),
            MemberResult("c/fold-1", _history(falling, 0.81), "finished"),
            MemberResult("c/fold-2", _history([1.0, 0.9, math.nan], 0.1), "failed",
                         message="diverged")]


def test_a_diverged_fold_has_no_score_and_does_not_shorten_the_others(tmp_path: Path):
    from fashionlab.config import Candidate, DenseLayer, ModelSpec, TrainSpec, WarningRule
    from fashionlab.search.finish import consensus_scores  # (the search's reading rule)

    results = _folds_with_one_diverged()
    rule = WarningRule(patience=10, min_delta=0.02)
    for schedule, epoch in (("constant", 12), ("onecycle", 40)):
        train = TrainSpec(epochs=40, schedule=schedule)
        candidate = Candidate("c", ModelSpec(layers=(DenseLayer(8),)), train)
        summary = summarize_models(candidate, results, "cv", rule)
        # The healthy folds are read where their own curves say (the warning's epoch 12, or
        # the schedule's end), not at the diverged fold's last epoch.
        assert summary.result_epochs.tolist() == [epoch, epoch, 0], schedule
        np.testing.assert_allclose(summary.val_accuracy[:2], [0.80, 0.81])
        assert math.isnan(summary.val_accuracy[2]) and math.isnan(summary.val_loss[2])
        read = consensus_scores(results, train, rule)
        assert read.epoch == epoch
        assert read.val_accuracy[:2].tolist() == [0.80, 0.81] and math.isnan(read.val_accuracy[2])
        # Whichever fold diverged, the schedule's end is where the others are read.
        first = summarize_models(candidate, results[::-1], "cv", rule)
        assert first.schedule_end == (40 if schedule == "onecycle" else None)


def test_the_early_stopping_median_epoch_is_not_truncated():
    from fashionlab.config import Candidate, DenseLayer, ModelSpec, TrainSpec, WarningRule
    from fashionlab.results import _epoch_label  # (the table's epoch column)

    train = TrainSpec(epochs=40, early_stopping=EarlyStopping(patience=2))
    candidate = Candidate("c", ModelSpec(layers=(DenseLayer(8),)), train)
    falling = [1.0 - 0.01 * e for e in range(20)]
    results = [MemberResult(f"c/fold-{i}", _history(falling), "stopped", best_epoch=best)
               for i, best in enumerate((10, 14, 7, 11))]
    summary = summarize_models(candidate, results, "cv", WarningRule())
    assert _epoch_label(summary) == "10.5 (ES median)"
    results[1] = MemberResult("c/fold-1", _history([math.nan]), "failed", message="diverged")
    summary = summarize_models(candidate, results, "cv", WarningRule())
    assert summary.result_epochs.tolist() == [10, 0, 7, 11]  # no score, and not in the median
    assert _epoch_label(summary) == "10 (ES median)"


def test_the_best_candidate_is_the_one_the_comparisons_rank_first(monkeypatch):
    # A candidate that did not fail but has no finite score ranks last, as in
    # `compare_to_best`: it is not the one retrained.
    import types

    from fashionlab.study import selection

    candidates = [types.SimpleNamespace(name="unscored", val_accuracy=np.array([np.nan] * 2),
                                        failed=False),
                  types.SimpleNamespace(name="scored", val_accuracy=np.array([0.9, 0.8]),
                                        failed=False)]
    monkeypatch.setattr(selection, "cross_validate", lambda *args: candidates)
    _, comparisons, best = selection.cross_validated(None, [None, None], None, 200, 100)
    assert best == comparisons[0].name == "scored"
