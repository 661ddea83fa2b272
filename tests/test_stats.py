"""Tests for fashionlab.stats: reference values worked by hand, scipy cross-checks, edge cases."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from fashionlab.stats import (
    Comparison,
    PairedTest,
    Summary,
    compare_to_best,
    corrected_resampled_ttest,
    holm,
    proportion_ci,
    summarize,
)

# A 5-fold split of Fashion-MNIST's 60000 training images.
N_TRAIN, N_TEST = 48_000, 12_000


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_matches_numpy_and_student_t() -> None:
    values = [0.881, 0.884, 0.879, 0.886, 0.883]
    s = summarize(values)
    x = np.array(values)
    std = float(np.std(x, ddof=1))
    sem = std / math.sqrt(5)
    half = float(sps.t.ppf(0.975, 4)) * sem
    assert s.n == 5
    assert s.mean == pytest.approx(float(np.mean(x)), abs=1e-15)
    assert s.std == pytest.approx(std, rel=1e-12)
    assert s.sem == pytest.approx(sem, rel=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((s.mean - half, s.mean + half), rel=1e-12)
    assert s.confidence == 0.95


def test_summarize_confidence_changes_only_the_interval() -> None:
    values = [1.0, 2.0, 4.0, 7.0]
    wide, narrow = summarize(values, confidence=0.99), summarize(values, confidence=0.8)
    half = float(sps.t.ppf(0.995, 3)) * wide.sem
    assert wide.ci_high - wide.mean == pytest.approx(half, rel=1e-12)
    assert narrow.ci_low > wide.ci_low and narrow.ci_high < wide.ci_high
    assert (wide.mean, wide.std) == (narrow.mean, narrow.std)


def test_summarize_single_value_has_no_interval() -> None:
    s = summarize([0.9])
    assert (s.n, s.mean) == (1, 0.9)
    assert math.isnan(s.std)  # not 0.0: one value says nothing about the spread
    assert math.isnan(s.sem) and math.isnan(s.ci_low) and math.isnan(s.ci_high)


def test_summarize_clips_the_interval_to_the_scores_bounds() -> None:
    # Two folds: t(0.975, 1) = 12.7 stretches the interval past 100% accuracy.
    free, bounded = summarize([0.90, 0.95]), summarize([0.90, 0.95], bounds=(0, 1))
    assert free.ci_high > 1 and free.ci_low > 0
    assert (bounded.ci_low, bounded.ci_high) == (free.ci_low, 1.0)
    assert (bounded.mean, bounded.std, bounded.sem) == (free.mean, free.std, free.sem)
    low = summarize([0.02, 0.10], bounds=(0, 1))
    assert low.ci_low == 0.0 and low.ci_high == summarize([0.02, 0.10]).ci_high


def test_compare_to_best_clips_each_summary_as_summarize_does() -> None:
    scores = {"a": [0.90, 0.97], "b": [0.80, 0.95]}
    for c in compare_to_best(scores, n_train=N_TRAIN, n_test=N_TEST, bounds=(0, 1)):
        assert c.summary == summarize(scores[c.name], bounds=(0, 1))
        assert c.summary.ci_high == 1.0 and isinstance(c.summary.ci_high, float)


def test_summarize_ignores_nan() -> None:
    assert summarize([1.0, math.nan, 3.0]) == summarize([1.0, 3.0])
    assert summarize([math.nan, 2.0]).n == 1


@pytest.mark.parametrize("values", [[math.nan, math.nan], [], np.full(3, np.nan)])
def test_summarize_nothing_gives_nan_without_warnings(values: list[float]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(values)
    assert s.n == 0
    assert all(math.isnan(v) for v in (s.mean, s.std, s.sem, s.ci_low, s.ci_high))


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        summarize([[1.0, 2.0]])


def test_summary_format() -> None:
    s = Summary(n=10, mean=0.8834, std=0.0041, sem=0.0013, ci_low=0.8805, ci_high=0.8863,
                confidence=0.95)
    assert s.format() == "88.3 ± 0.4"
    assert s.format(scale=1.0, digits=3) == "0.883 ± 0.004"
    assert s.format_ci() == "88.3 [88.0, 88.6] (95% CI, n=10)"
    none = summarize([float("nan"), float("nan")])  # a candidate whose every fold diverged
    assert none.format() == "-" and none.format_ci() == "-"  # not "nan ± nan"
    assert summarize([0.9]).format() == "90.0"  # one value: no spread to show


# --- corrected resampled t-test ----------------------------------------------------------------


def _pair(d: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Scores a, b on the same folds with a - b == d (up to rounding)."""
    b = np.array([0.85, 0.86, 0.87, 0.84, 0.855, 0.865, 0.845, 0.875, 0.852, 0.858])[: len(d)]
    return b + np.array(d), b


def test_corrected_ttest_by_hand() -> None:
    d = [0.01, 0.02, 0.0, 0.03, 0.015]
    a, b = _pair(d)
    # mean = 0.075 / 5 = 0.015
    # deviations -0.005, 0.005, -0.015, 0.015, 0 -> squares sum to 500e-6 -> var = 500e-6 / 4
    mean, var, j = 0.015, 125e-6, 5
    correction = 1 / j + N_TEST / N_TRAIN  # 0.2 + 0.25 = 0.45
    t = mean / math.sqrt(correction * var)  # 0.015 / sqrt(56.25e-6) = 0.015 / 0.0075 = 2
    assert t == pytest.approx(2.0, rel=1e-12)
    p = 2 * float(sps.t.sf(t, j - 1))

    result = corrected_resampled_ttest(a, b, n_train=N_TRAIN, n_test=N_TEST)
    assert isinstance(result, PairedTest)
    assert result.n == 5 and result.df == 4
    assert result.mean_difference == pytest.approx(mean, rel=1e-9)
    assert result.t == pytest.approx(t, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    # Independently of scipy: for df = 4, P(|T| >= t) = I_x(2, 1/2) with x = 4 / (4 + t^2) = 1/2,
    # which integrates to 1 - (3/4)(2 sqrt(1 - x) - (2/3)(1 - x)^(3/2)) = 1 - 5 sqrt(2) / 8.
    assert result.p_value == pytest.approx(0.1161165235168, abs=1e-6)


def test_correction_is_more_conservative_than_plain_paired_ttest() -> None:
    a, b = _pair([0.01, 0.02, 0.0, 0.03, 0.015])
    plain = sps.ttest_rel(a, b)  # t = 0.015 / sqrt(125e-6 / 5) = 3
    corrected = corrected_resampled_ttest(a, b, n_train=N_TRAIN, n_test=N_TEST)
    assert float(plain.statistic) == pytest.approx(3.0, rel=1e-9)
    assert abs(corrected.t) < abs(float(plain.statistic))
    assert corrected.p_value > float(plain.pvalue)
    # The only change is the variance factor: t shrinks by sqrt((1/J) / (1/J + n_test/n_train)).
    shrink = math.sqrt((1 / 5) / (1 / 5 + N_TEST / N_TRAIN))
    assert corrected.t == pytest.approx(float(plain.statistic) * shrink, rel=1e-9)


@pytest.mark.parametrize("folds", [2, 3, 5, 10, 30])
def test_intervals_and_p_values_equal_scipy_stats_to_the_bit(folds: int) -> None:
    # The study's tables must not move by a last digit for loading less of scipy.
    rng = np.random.default_rng(folds)
    a, b = 0.88 + 0.01 * rng.standard_normal(folds), 0.88 + 0.01 * rng.standard_normal(folds)
    s = summarize(a)
    half = float(sps.t.ppf(0.975, folds - 1)) * s.sem
    assert (s.ci_low, s.ci_high) == (s.mean - half, s.mean + half)
    test = corrected_resampled_ttest(a, b, n_train=N_TRAIN, n_test=N_TEST)
    assert test.p_value == float(2.0 * sps.t.sf(abs(test.t), folds - 1))


def test_the_statistics_do_not_import_scipy_stats() -> None:
    code = ("import sys; from fashionlab import stats; "
            "stats.summarize([0.8, 0.9]); stats.corrected_resampled_ttest([0.8, 0.9], [0.7, 0.9], "
            "n_train=4, n_test=1); print('scipy.stats' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_corrected_ttest_is_antisymmetric() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.88, 0.01, 10), rng.normal(0.87, 0.01, 10)
    ab = corrected_resampled_ttest(a, b, n_train=54_000, n_test=6_000)
    ba = corrected_resampled_ttest(b, a, n_train=54_000, n_test=6_000)
    assert ba.t == pytest.approx(-ab.t) and ba.p_value == pytest.approx(ab.p_value)
    assert ab.df == 9


def test_identical_scores_give_t_zero_p_one() -> None:
    a = [0.9, 0.8, 0.85]
    r = corrected_resampled_ttest(a, a, n_train=N_TRAIN, n_test=N_TEST)
    assert (r.mean_difference, r.t, r.p_value) == (0.0, 0.0, 1.0)


def test_constant_nonzero_difference_gives_infinite_t() -> None:
    # b + 0.05 - b is not exactly 0.05 in floating point; the rounding spread must not count.
    b = np.array([0.9, 0.8, 0.7, 0.65])
    up = corrected_resampled_ttest(b + 0.05, b, n_train=N_TRAIN, n_test=N_TEST)
    down = corrected_resampled_ttest(b - 0.05, b, n_train=N_TRAIN, n_test=N_TEST)
    assert (up.t, up.p_value) == (math.inf, 0.0)
    assert (down.t, down.p_value) == (-math.inf, 0.0)
    assert up.mean_difference == pytest.approx(0.05)


def test_nan_pairs_are_dropped_pairwise() -> None:
    a, b = _pair([0.01, 0.02, 0.0, 0.03, 0.015, 0.5, 0.7])
    a[5], b[6] = math.nan, math.nan
    with_nan = corrected_resampled_ttest(a, b, n_train=N_TRAIN, n_test=N_TEST)
    clean = corrected_resampled_ttest(a[:5], b[:5], n_train=N_TRAIN, n_test=N_TEST)
    assert with_nan == clean and with_nan.n == 5


def test_corrected_ttest_bad_input() -> None:
    with pytest.raises(ValueError, match=r"got 5 and 4"):
        corrected_resampled_ttest([1.0] * 5, [1.0] * 4, n_train=N_TRAIN, n_test=N_TEST)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        corrected_resampled_ttest([1.0], [0.5], n_train=N_TRAIN, n_test=N_TEST)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        corrected_resampled_ttest([1.0, math.nan], [0.5, 0.4], n_train=N_TRAIN, n_test=N_TEST)
    with pytest.raises(ValueError, match="positive"):
        corrected_resampled_ttest([1.0, 2.0], [0.5, 0.4], n_train=0, n_test=N_TEST)


# --- Holm ---------------------------------------------------------------------------------------


def test_holm_hand_worked_example() -> None:
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)


def _holm_reference(p: np.ndarray) -> np.ndarray:
    """Holm straight from the definition, one hypothesis at a time."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        out[i] = min(1.0, running)
    return out


def test_holm_matches_definition_is_monotone_and_capped() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.uniform(0, 0.5, size=int(rng.integers(1, 12)))
        adjusted = holm(p)
        np.testing.assert_allclose(adjusted, _holm_reference(p), rtol=1e-12)
        order = np.argsort(p)
        assert np.all(np.diff(adjusted[order]) >= 0)
        assert np.all(adjusted >= p) and np.all(adjusted <= 1.0)
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]


def test_holm_edge_cases() -> None:
    assert holm([0.03]).tolist() == [0.03]
    assert holm([]).shape == (0,)
    adjusted = holm([0.01, math.nan, 0.04])  # NaN does not count towards m = 2
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.04])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


# --- compare_to_best ----------------------------------------------------------------------------


def _study() -> dict[str, np.ndarray]:
    """Ten folds (2 x 5-fold): 'cnn' is best, 'cnn_small' within noise, 'dense' clearly worse."""
    rng = np.random.default_rng(2)
    fold_effect = rng.normal(0.0, 0.004, 10)  # shared by all candidates: same folds
    cnn = 0.91 + fold_effect + rng.normal(0, 0.002, 10)
    return {
        "dense": 0.86 + fold_effect + rng.normal(0, 0.002, 10),
        "cnn_small": cnn - 0.0005 + rng.normal(0, 0.002, 10),
        "cnn": cnn,
    }


def test_compare_to_best_separates_worse_from_noise() -> None:
    scores = _study()
    results = compare_to_best(scores, n_train=54_000, n_test=6_000)
    assert all(isinstance(r, Comparison) for r in results)
    assert [r.name for r in results] == ["cnn", "cnn_small", "dense"]
    best, small, dense = results
    assert best.is_best and best.not_worse is True and best.mean_difference == 0.0
    assert math.isnan(best.p_value) and math.isnan(best.p_holm)
    assert best.summary == summarize(scores["cnn"])

    assert not small.is_best and small.not_worse is True and small.p_holm >= 0.05
    assert dense.not_worse is False and dense.p_holm < 1e-4 and dense.t < 0
    assert dense.mean_difference == pytest.approx(np.mean(scores["dense"] - scores["cnn"]))
    for r in (small, dense):
        test = corrected_resampled_ttest(scores[r.name], scores["cnn"], n_train=54_000,
                                         n_test=6_000)
        assert (r.t, r.p_value) == (test.t, test.p_value)
        assert r.reason is None
    np.testing.assert_allclose([small.p_holm, dense.p_holm], holm([small.p_value, dense.p_value]))


def test_compare_to_best_lower_is_better() -> None:
    losses = {name: 1.0 - s for name, s in _study().items()}
    results = compare_to_best(losses, n_train=54_000, n_test=6_000, higher_is_better=False)
    assert [r.name for r in results] == ["cnn", "cnn_small", "dense"]
    assert [r.not_worse for r in results] == [True, True, False]
    assert results[2].t > 0


def test_compare_to_best_marks_unpaired_candidates() -> None:
    scores: dict[str, list[float] | np.ndarray] = dict(_study())
    scores["five_folds"] = [0.5, 0.5, 0.5, 0.5, 0.5]
    scores["one_fold_left"] = [0.7] + [math.nan] * 9
    results = {r.name: r for r in compare_to_best(scores, n_train=54_000, n_test=6_000)}
    for name, phrase in (("five_folds", "5 folds vs 10"), ("one_fold_left", "only 1 of 10 folds")):
        r = results[name]
        assert r.not_worse is None and phrase in (r.reason or "")
        assert math.isnan(r.p_value) and math.isnan(r.p_holm) and math.isnan(r.t)
    # Holm counts only the two comparisons that could run.
    small, dense = results["cnn_small"], results["dense"]
    np.testing.assert_allclose([small.p_holm, dense.p_holm], holm([small.p_value, dense.p_value]))


def test_an_infinite_score_gets_no_verdict_rather_than_not_worse() -> None:
    # A diverged candidate's val_loss (lower is better): the paired test is undefined, so the
    # candidate is neither worse nor "not worse", and Holm does not count it.
    results = {r.name: r for r in compare_to_best(
        {"best": [0.30, 0.31, 0.29], "diverged": [0.5, math.inf, 0.4],
         "close": [0.31, 0.33, 0.30]}, higher_is_better=False, n_train=100, n_test=20)}
    assert results["diverged"].not_worse is None
    assert "undefined: a score is infinite" in (results["diverged"].reason or "")
    close = results["close"]
    assert close.not_worse is not None and close.p_holm == close.p_value  # m = 1


def test_compare_to_best_ties_single_and_bad_input() -> None:
    tied = compare_to_best({"a": [1.0, 2.0], "b": [2.0, 1.0]}, n_train=4, n_test=1)
    assert [r.name for r in tied] == ["a", "b"] and tied[1].not_worse is True
    alone = compare_to_best({"only": [0.9, 0.91]}, n_train=4, n_test=1)
    assert len(alone) == 1 and alone[0].is_best
    nan_last = compare_to_best({"x": [math.nan] * 2, "y": [0.9, 0.8]}, n_train=4, n_test=1)
    assert [r.name for r in nan_last] == ["y", "x"] and nan_last[1].not_worse is None
    with pytest.raises(ValueError, match="at least one"):
        compare_to_best({}, n_train=4, n_test=1)
    with pytest.raises(ValueError, match="no candidate"):
        compare_to_best({"x": [math.nan, math.nan]}, n_train=4, n_test=1)
    with pytest.raises(ValueError, match="alpha"):
        compare_to_best({"x": [1.0, 2.0]}, n_train=4, n_test=1, alpha=0.0)


@pytest.mark.parametrize(("correct", "n"), [(8835, 10000), (9181, 10000), (37, 40), (0, 10),
                                             (10, 10), (1, 1), (0, 1), (5000, 10000)])
def test_the_test_accuracy_interval_is_wilsons_as_scipy_gives_it(correct: int, n: int):
    expected = sps.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    # From the accuracy as a study stores it (float32), not the count.
    low, high = proportion_ci(float(np.float32(correct / n)), n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0.0 <= low <= correct / n <= high <= 1.0


def test_no_accuracy_or_no_image_has_no_interval():
    for accuracy, n in ((math.nan, 100), (0.5, 0), (1.5, 10), (-0.1, 10)):
        assert all(math.isnan(v) for v in proportion_ci(accuracy, n))
