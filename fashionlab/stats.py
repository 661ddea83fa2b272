"""Statistics for cross-validated comparisons: summaries with uncertainty, paired tests, Holm.

A study scores every candidate on identical folds (k-fold, possibly repeated r times with
different seeded shuffles), so each candidate has J = r * k per-fold scores and fold j means the
same train/test split for all of them. Pure numpy/scipy.

    summarize(values)                       n, mean, std, sem and a Student-t confidence interval
    corrected_resampled_ttest(a, b, ...)    Nadeau & Bengio (2003) paired test on per-fold scores
    holm(p_values)                          Holm's step-down adjusted p-values
    compare_to_best(scores, ...)            every candidate against the best, Holm across them
    proportion_ci(accuracy, n)              Wilson's interval of an accuracy on n test images
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACCURACY_BOUNDS",
    "LOSS_BOUNDS",
    "Comparison",
    "PairedTest",
    "Summary",
    "compare_to_best",
    "corrected_resampled_ttest",
    "holm",
    "proportion_ci",
    "summarize",
]

# Spreads this many ulps of the scores' magnitude or less are rounding noise from `a - b`, not
# variation between folds; treating them as variation would turn a constant difference into an
# arbitrary, huge but finite t.
_ROUNDING_ULPS = 8.0


ACCURACY_BOUNDS = (0.0, 1.0)  # what an accuracy (a fraction) can be: `summarize`'s bounds
LOSS_BOUNDS = (0.0, math.inf)  # a cross-entropy loss


def _t_quantile(q: float, df: int) -> float:
    """Student's t quantile, as scipy.stats.t.ppf computes it (scipy.special's stdtrit, to the
    bit): scipy.special alone imports in half the time of scipy.stats, which every study, search
    and `runs` command would otherwise load (~0.5 s each)."""
    from scipy.special import stdtrit  # on first use: the worker processes never need it

    return float(stdtrit(df, q))


def _t_survival(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom, as scipy.stats.t.sf computes it."""
    from scipy.special import stdtr  # on first use, as in _t_quantile

    return float(stdtr(df, -t))


def proportion_ci(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of an accuracy measured on `n` images: how far the test set's
    own sampling moves it (88.35% on 10,000 images: [87.71, 88.96]). Wilson (1927); Brown, Cai
    & DasGupta (2001) recommend it over the normal approximation, which leaves [0, 1] near its
    ends and covers too little. Computed as scipy.stats.binomtest(...).proportion_ci(
    method="wilson") does (the same numbers), without importing scipy.stats (see
    `_t_quantile`). (NaN, NaN) when there is no accuracy or no image."""
    if not (n >= 1 and math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        return math.nan, math.nan
    from scipy.special import ndtri  # on first use, as in _t_quantile

    z = float(ndtri((1.0 + confidence) / 2.0))
    p = round(accuracy * n) / n  # a count of images: an accuracy stored in float32 is near one
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # (the ends exactly where every image, or none, was right: rounding would miss them)
    return (0.0 if p == 0.0 else centre - half), (1.0 if p == 1.0 else centre + half)


def _as_1d(values: Sequence[float] | np.ndarray, *, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_sizes(*, n_train: float, n_test: float) -> None:
    if not (math.isfinite(n_train) and math.isfinite(n_test) and n_train > 0 and n_test > 0):
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")


@dataclass(frozen=True)
class Summary:
    """Location and uncertainty of a set of scores (NaNs ignored).

    n            number of non-NaN values
    mean         sum(x) / n
    std          sample standard deviation sqrt(sum((x - mean)^2) / (n - 1)); NaN when n == 1
    sem          standard error of the mean std / sqrt(n); NaN when n == 1 (no spread is known)
    ci_low/high  mean -/+ t_{(1 + confidence) / 2, n - 1} * sem, clipped to the scores' `bounds`
                 when given; NaN when n < 2, because one value says nothing about uncertainty
                 and a zero-width interval would claim certainty
    confidence   coverage of the interval, e.g. 0.95
    When n == 0 every float field is NaN.
    """

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float
    confidence: float

    def format(self, *, scale: float = 100.0, digits: int = 1) -> str:
        """Mean ± std for tables, e.g. ``"88.3 ± 0.4"`` for accuracies 0.883 with ``scale=100``;
        the mean alone of one value, "-" of none."""
        if not math.isfinite(self.mean):
            return "-"
        if self.n <= 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"

    def format_ci(self, *, scale: float = 100.0, digits: int = 1) -> str:
        """Mean and confidence interval, e.g. ``"88.3 [87.8, 88.8] (95% CI, n=10)"``; "-" of no
        value."""
        if not math.isfinite(self.mean):
            return "-"
        return (
            f"{self.mean * scale:.{digits}f} "
            f"[{self.ci_low * scale:.{digits}f}, {self.ci_high * scale:.{digits}f}] "
            f"({self.confidence * 100:g}% CI, n={self.n})"
        )


def summarize(values: Sequence[float] | np.ndarray, *, confidence: float = 0.95,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Summarize `values`, ignoring NaNs (a fold that failed to produce a score is skipped).

    The interval is mean ± t_{(1 + confidence) / 2, n - 1} * std / sqrt(n) (Student's t, which
    is exact for normal scores and honest for the small n of cross-validation). `bounds` is the
    range the scores can take, (0, 1) for accuracies: the interval is clipped to it, since with
    few folds t's wide quantiles (12.7 for 2 folds) reach past it ("[71.0, 107.0]" would claim
    accuracies no model can have).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if bounds is not None and not float(bounds[0]) <= float(bounds[1]):
        raise ValueError(f"bounds: (low, high) with low <= high, got {tuple(bounds)!r}")
    array = _as_1d(values, name="values")
    array = array[~np.isnan(array)]
    n = int(array.size)
    nan = math.nan
    if n == 0:
        # Built by hand: np.mean of an empty array warns, and an all-NaN column is a normal
        # state for a study whose runs all failed.
        return Summary(n=0, mean=nan, std=nan, sem=nan, ci_low=nan, ci_high=nan,
                       confidence=confidence)
    mean = float(np.mean(array))
    if n == 1:  # one value has no spread to estimate: its sample std is undefined, not 0
        return Summary(n=1, mean=mean, std=nan, sem=nan, ci_low=nan, ci_high=nan,
                       confidence=confidence)
    with np.errstate(invalid="ignore"):  # an infinite score (a diverged model): std is NaN
        std = float(np.std(array, ddof=1))
    sem = std / math.sqrt(n)
    half_width = _t_quantile((1.0 + confidence) / 2.0, n - 1) * sem
    low, high = mean - half_width, mean + half_width
    if bounds is not None:
        low, high = max(low, float(bounds[0])), min(high, float(bounds[1]))
    return Summary(n=n, mean=mean, std=std, sem=sem, ci_low=low, ci_high=high,
                   confidence=confidence)


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired test on per-fold differences d_j = a_j - b_j.

    mean_difference  mean(d), positive when `a` scores higher
    t                test statistic; ±inf for a nonzero constant difference
    df               degrees of freedom, n - 1
    p_value          two-sided, 2 * P(T_df >= |t|)
    n                number of pairs used (NaN pairs dropped)
    """

    mean_difference: float
    t: float
    df: int
    p_value: float
    n: int


def corrected_resampled_ttest(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_train: float,
    n_test: float,
) -> PairedTest:
    """Nadeau & Bengio's (2003) corrected resampled t-test for scores on identical folds.

    With J pairs of per-fold scores and d_j = a_j - b_j,

        t = mean(d) / sqrt((1/J + n_test/n_train) * var(d, ddof=1)),   df = J - 1,

    and p = 2 * sf_t(|t|, df). The plain paired t-test uses 1/J alone and assumes the J
    differences independent; folds share training data, so their differences are positively
    correlated and the plain test rejects far too often. The n_test/n_train term inflates the
    variance for that correlation. `n_train` and `n_test` are the (average) numbers of samples a
    model trained and was scored on in one fold.

    A pair where either score is NaN is dropped (pairwise deletion). Zero variance: t = 0, p = 1
    when the mean difference is 0 too; t = ±inf, p = 0 for a nonzero constant difference.
    """
    _check_sizes(n_train=n_train, n_test=n_test)
    a_arr, b_arr = _as_1d(a, name="a"), _as_1d(b, name="b")
    if a_arr.size != b_arr.size:
        raise ValueError(
            f"paired scores need equal lengths (same folds), got {a_arr.size} and {b_arr.size}"
        )
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    n = int(a_arr.size)
    if n < 2:
        raise ValueError(f"the paired test needs at least 2 pairs without NaN, got {n}")
    d = a_arr - b_arr  # (J,)
    mean = float(np.mean(d))
    with np.errstate(invalid="ignore"):  # an infinite score (a diverged loss): NaN, said so
        var = float(np.var(d, ddof=1))
    df = n - 1
    scale = float(np.max(np.abs(np.concatenate([a_arr, b_arr]))))
    if math.sqrt(var) <= _ROUNDING_ULPS * np.finfo(float).eps * scale:
        if abs(mean) <= _ROUNDING_ULPS * np.finfo(float).eps * scale:
            return PairedTest(mean_difference=mean, t=0.0, df=df, p_value=1.0, n=n)
        return PairedTest(mean_difference=mean, t=math.copysign(math.inf, mean), df=df,
                          p_value=0.0, n=n)
    t = mean / math.sqrt((1.0 / n + n_test / n_train) * var)
    p_value = 2.0 * _t_survival(abs(t), df)
    return PairedTest(mean_difference=mean, t=t, df=df, p_value=p_value, n=n)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, as statsmodels' multipletests(method='holm').

    With the m p-values sorted p_(1) <= ... <= p_(m), the adjusted values are

        q_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j)),

    returned in the input order. Rejecting where q < alpha controls the family-wise error rate at
    alpha. NaN entries (tests that could not run) stay NaN and do not count towards m.
    """
    p = _as_1d(p_values, name="p_values")
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0.0) | (p[finite] > 1.0)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    adjusted = np.full(p.shape, np.nan)
    valid = p[finite]
    m = valid.size
    order = np.argsort(valid, kind="stable")
    stepped = (m - np.arange(m)) * valid[order]  # (m,), multiplier m, m-1, ..., 1
    # The running max keeps adjusted p-values in the order of the raw ones.
    stepped = np.minimum(np.maximum.accumulate(stepped), 1.0)
    unsorted = np.empty(m)
    unsorted[order] = stepped
    adjusted[finite] = unsorted
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """One candidate measured against the best one on the same folds.

    name             the candidate's key in `scores`
    summary          summarize() of its per-fold scores
    is_best          True for the candidate with the best mean
    mean_difference  mean over paired folds of (candidate - best); 0.0 for the best
    t, p_value       corrected resampled t-test of candidate vs best; NaN for the best or unpaired
    p_holm           p_value after Holm across all paired comparisons; NaN where p_value is NaN
    not_worse        True when the best is not significantly better at alpha after Holm (True
                     for the best itself); None when no test was possible
    reason           why no test was possible (e.g. differing fold counts), else None
    """

    name: str
    summary: Summary
    is_best: bool
    mean_difference: float
    t: float
    p_value: float
    p_holm: float
    not_worse: bool | None
    reason: str | None = None


def compare_to_best(
    scores: Mapping[str, Sequence[float] | np.ndarray],
    *,
    n_train: float,
    n_test: float,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    confidence: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> list[Comparison]:
    """Test every candidate against the best by mean score, with Holm across the comparisons.

    `scores` maps a candidate's name to its J per-fold scores, fold j identical for all. The best
    has the highest mean (lowest with `higher_is_better=False`; ties go to the first in `scores`).
    Each other candidate gets corrected_resampled_ttest(candidate, best), and Holm adjusts the
    resulting p-values together, so "not worse" holds at family-wise level alpha. A candidate that
    cannot be paired (fold count differs from the best's, or < 2 pairs without NaN) gets NaN
    statistics, not_worse=None and a reason, and does not count towards Holm's m.

    Returns one Comparison per candidate, best first, then by mean from best to worst (candidates
    with no finite score last); `bounds` clips each summary's interval as `summarize` does.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if not scores:
        raise ValueError("compare_to_best needs at least one candidate")
    _check_sizes(n_train=n_train, n_test=n_test)
    names = list(scores)
    arrays = {name: _as_1d(scores[name], name=f"scores[{name!r}]") for name in names}
    summaries = {name: summarize(arrays[name], confidence=confidence, bounds=bounds)
                 for name in names}
    sign = 1.0 if higher_is_better else -1.0
    # sorted() is stable, so ties keep the order of `scores`.
    ranked = sorted(names, key=lambda name: _rank_key(sign * summaries[name].mean))
    best = ranked[0]
    if summaries[best].n == 0:
        raise ValueError("no candidate has a finite score to compare")

    tests: dict[str, PairedTest] = {}
    reasons: dict[str, str] = {}
    for name in ranked[1:]:
        if arrays[name].size != arrays[best].size:
            reasons[name] = (f"{arrays[name].size} folds vs {arrays[best].size} for best "
                             f"{best!r}: scores must come from identical folds to be paired")
            continue
        pairs = int(np.sum(~(np.isnan(arrays[name]) | np.isnan(arrays[best]))))
        if pairs < 2:
            reasons[name] = (f"only {pairs} of {arrays[best].size} folds have a score for both it "
                             f"and best {best!r}; the paired test needs 2")
            continue
        test = corrected_resampled_ttest(arrays[name], arrays[best], n_train=n_train,
                                         n_test=n_test)
        if math.isnan(test.p_value):  # an infinite score (a diverged loss): no verdict, not
            # "not worse" for want of a p-value
            reasons[name] = (f"the paired test against best {best!r} is undefined: a score "
                             "is infinite")
            continue
        tests[name] = test
    tested = list(tests)
    adjusted = dict(zip(tested, holm([tests[name].p_value for name in tested]).tolist()))

    nan = math.nan
    results = [Comparison(name=best, summary=summaries[best], is_best=True, mean_difference=0.0,
                          t=nan, p_value=nan, p_holm=nan, not_worse=True)]
    for name in ranked[1:]:
        if name in reasons:
            results.append(Comparison(name=name, summary=summaries[name], is_best=False,
                                      mean_difference=nan, t=nan, p_value=nan, p_holm=nan,
                                      not_worse=None, reason=reasons[name]))
            continue
        test = tests[name]
        # Worse means significantly on the wrong side of the best; a candidate significantly
        # better on the paired folds (possible after NaN pairs are dropped) is not worse.
        worse = adjusted[name] < alpha and sign * test.mean_difference < 0.0
        results.append(Comparison(name=name, summary=summaries[name], is_best=False,
                                  mean_difference=test.mean_difference, t=test.t,
                                  p_value=test.p_value, p_holm=adjusted[name],
                                  not_worse=not worse))
    return results


def _rank_key(signed_mean: float) -> tuple[bool, float]:
    """Sort key putting the largest `signed_mean` first and NaN means (no scores) last."""
    return (math.isnan(signed_mean), 0.0 if math.isnan(signed_mean) else -signed_mean)
