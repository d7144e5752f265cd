"""The confidence bounds behind every budget, checked against independent
computations (closed forms, a binomial sum solved by bisection) and by
simulation: a 95 % upper bound must cover the true rate in >= 95 % of draws."""

import math

import numpy as np
import pytest

from onnxfold.decide.confidence import (accuracy_drop_upper, mean_upper, rate_lower, rate_upper,
                                        samples_for_accuracy_drop, samples_for_rate)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def _cp_upper_by_bisection(k: int, n: int, confidence: float) -> float:
    """The p at which P(X <= k | n, p) = 1 - confidence (Clopper-Pearson's definition)."""
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _cp_lower_by_bisection(k: int, n: int, confidence: float) -> float:
    """The p at which P(X >= k | n, p) = 1 - confidence."""
    lo, hi = 0.0, k / n
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1 - _binom_cdf(k - 1, n, mid) < 1 - confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 10), (0, 598), (1, 75), (3, 200), (12, 400), (50, 60)])
def test_rate_upper_is_clopper_pearson(k, n):
    assert abs(rate_upper(k, n, 0.95) - _cp_upper_by_bisection(k, n, 0.95)) < 1e-9
    assert abs(rate_upper(k, n, 0.99) - _cp_upper_by_bisection(k, n, 0.99)) < 1e-9


def test_rate_upper_with_no_event_has_a_closed_form():
    for n in (1, 7, 100, 1000):
        assert abs(rate_upper(0, n, 0.95) - (1 - 0.05 ** (1 / n))) < 1e-12
    assert rate_upper(5, 5, 0.95) == 1.0 and rate_upper(0, 0, 0.95) == 1.0


@pytest.mark.parametrize("k,n", [(1, 75), (3, 200), (12, 400)])
def test_rate_lower_is_clopper_pearson(k, n):
    assert abs(rate_lower(k, n, 0.95) - _cp_lower_by_bisection(k, n, 0.95)) < 1e-9
    assert rate_lower(0, n, 0.95) == 0.0


def test_accuracy_drop_bound_is_bonferroni_of_the_paired_counts():
    # 4 newly wrong, 1 newly right in 500 samples, 95 %: each side at 97.5 %
    want = _cp_upper_by_bisection(4, 500, 0.975) - _cp_lower_by_bisection(1, 500, 0.975)
    assert abs(accuracy_drop_upper(4, 1, 500, 0.95) - want) < 1e-9
    # more newly-right samples can only lower the bound
    assert accuracy_drop_upper(4, 3, 500, 0.95) < accuracy_drop_upper(4, 1, 500, 0.95)


def test_mean_upper_is_student_t():
    v = np.array([0.1, 0.3, 0.2, 0.4, 0.0, 0.2, 0.1, 0.3, 0.2, 0.2])
    t_95_9 = 1.8331129326536335  # 95 % quantile of Student's t with 9 degrees of freedom (tables)
    want = v.mean() + t_95_9 * v.std(ddof=1) / math.sqrt(v.size)
    assert abs(mean_upper(v, 0.95) - want) < 1e-9
    assert mean_upper(np.array([1.0]), 0.95) == math.inf
    assert mean_upper(np.array([1.0, np.inf, 2.0]), 0.95) == math.inf


def test_samples_needed_by_hand():
    # smallest n with 0.995^n <= 0.05: ln(0.05) / ln(0.995) = 597.6
    assert samples_for_rate(0.005, 0.95) == 598
    assert samples_for_rate(0.01, 0.95) == 299
    assert samples_for_rate(0.0, 0.95) is None
    # accuracy drop: each side at 97.5 %: ln(0.025) / ln(0.995) = 735.9
    assert samples_for_accuracy_drop(0.005, 0.95) == 736


def test_upper_bounds_cover_the_true_rate():
    """A 95 % bound must be above the true rate with probability >= 95 %,
    summed exactly over the binomial distribution of the event count."""
    for p, n in ((0.005, 600), (0.02, 300), (0.1, 50), (0.3, 20)):
        coverage = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k)
                       for k in range(n + 1) if rate_upper(k, n, 0.95) >= p)
        assert coverage >= 0.95, (p, n, coverage)


def test_accuracy_drop_bound_covers_the_true_drop():
    """Summed over the trinomial distribution of (newly wrong, newly right)."""
    from scipy.stats import multinomial

    n, p_wrong, p_right = 400, 0.012, 0.006  # true drop 0.6 pp
    dist = multinomial(n, [p_wrong, p_right, 1 - p_wrong - p_right])
    coverage = sum(dist.pmf([b, c, n - b - c]) for b in range(40) for c in range(40)
                   if accuracy_drop_upper(b, c, n, 0.95) >= p_wrong - p_right)
    assert coverage >= 0.95, coverage


def test_statistics_doc_table_matches_the_code():
    """docs/statistics.md lists the samples each budget needs: they must be what the code computes."""
    import re
    from pathlib import Path

    from onnxfold.api import HELD_OUT_CAP_WITHOUT_EVAL
    from onnxfold.decide.budget import Budget

    text = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text()
    budgets = {"top-1 agreement ≥ 99.5 % (the default)": Budget.default(),
               "top-1 agreement ≥ 99 %": Budget(min_agreement=99.0),
               "accuracy drop ≤ 0.5 pp": Budget(max_accuracy_drop=0.5),
               "accuracy drop ≤ 1 pp": Budget(max_accuracy_drop=1.0),
               "error quantile 99 %": Budget(max_error=0.1)}
    for label, budget in budgets.items():
        m = re.search(rf"\| {re.escape(label)} \| (\d+) \| (\d+) \|", text)
        assert m, label
        per_part = budget.samples_needed()
        assert int(m.group(1)) == per_part
        assert int(m.group(2)) == math.ceil(per_part / HELD_OUT_CAP_WITHOUT_EVAL)
