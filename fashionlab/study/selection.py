"""A study's cross-validation read back: every candidate over the folds, their paired
comparisons with the best, and the best. Read by the run (its results) and by the retrain job
(which candidate to retrain)."""

from __future__ import annotations

import math

import numpy as np

from fashionlab import stats
from fashionlab.cv import Fold
from fashionlab.steps import (
    CandidateResult,
    RunContext,
    cv_members,
    plan_stacks,
    register_models,
    stack_label,
    summarize_models,
    train_or_reuse,
)
from fashionlab.train import Tensors

__all__ = ["cross_validate", "cross_validated"]


def cross_validated(ctx: RunContext, folds: list[Fold], cv_data: Tensors, n_train: int,
                    n_val: int) -> tuple[list[CandidateResult], list[stats.Comparison],
                                         str | None]:
    """The candidates' cross-validation (read back once trained), their paired comparisons
    with the best, and the best (None when every candidate failed)."""
    candidates = cross_validate(ctx, folds, cv_data)
    scored = {c.name: c.val_accuracy for c in candidates if not c.failed}
    comparisons = stats.compare_to_best(scored, n_train=n_train, n_test=n_val,
                                        bounds=stats.ACCURACY_BOUNDS) \
        if scored and len(candidates) >= 2 and len(folds) >= 2 else []
    if comparisons:  # one whose folds diverged is neither the best nor tested: says why
        comparisons += [_not_compared(c) for c in candidates if c.failed]
    # Ranked as `compare_to_best` ranks them: a candidate without a finite score last.
    best = max(scored, key=lambda name: _mean_or_least(scored[name])) if scored else None
    return candidates, comparisons, best


def _not_compared(candidate: CandidateResult) -> stats.Comparison:
    """A candidate with a diverged fold: its other folds' mean stands in the table, but a test
    on the folds it kept would compare it at its best; its row says so instead of nothing."""
    nan = math.nan
    diverged = len(candidate.failures)
    return stats.Comparison(
        name=candidate.name, summary=stats.summarize(candidate.val_accuracy,
                                                     bounds=stats.ACCURACY_BOUNDS),
        is_best=False, mean_difference=nan, t=nan, p_value=nan, p_holm=nan, not_worse=None,
        reason=f"{diverged} of {len(candidate.keys)} folds diverged")


def _mean_or_least(scores: np.ndarray) -> float:
    finite = scores[np.isfinite(scores)]
    return float(finite.mean()) if finite.size else -math.inf


def cross_validate(ctx: RunContext, folds: list[Fold], data: Tensors) -> list[CandidateResult]:
    """Every candidate of the study over the folds (stacks trained here, or read back when
    they finished earlier), summarised in study order."""
    members, owner, fold_of = cv_members(ctx.spec, folds)
    register_models(ctx, list(members.values()), owner, "cv", fold_of)
    results = {}
    for stack in plan_stacks(list(members.values()), owner):
        results.update(train_or_reuse(ctx, stack, owner[stack[0].key], data,
                                      stack_label(stack, owner)))
    return [summarize_models(c, [results[f"{c.name}/{f.name}"] for f in folds], "cv",
                             ctx.spec.warning) for c in ctx.spec.candidates]
