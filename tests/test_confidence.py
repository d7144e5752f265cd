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


# ---------------------------------------------------------------------------
# the betting bound of a mean of values in [0, 1] (per-sequence token rates)

from onnxfold.decide.confidence import (paired_drop_upper, sequences_for_unit_mean,  # noqa: E402
                                        unit_mean_lower, unit_mean_upper)

_SCENARIOS = {
    # name: (draw n values, true mean)
    "whole windows flip (Bernoulli 2 %)": (lambda rng, n: (rng.random(n) < 0.02).astype(float), 0.02),
    "independent tokens (binomial 64, 1 %)": (lambda rng, n: rng.binomial(64, 0.01, n) / 64, 0.01),
    "skewed (beta 0.5, 20)": (lambda rng, n: rng.beta(0.5, 20, n), 0.5 / 20.5),
    "rare bursts (3 % of windows, uniform 0.2-1)": (
        lambda rng, n: np.where(rng.random(n) < 0.03, rng.uniform(0.2, 1.0, n), 0.0), 0.03 * 0.6),
}


@pytest.mark.parametrize("name", sorted(_SCENARIOS))
def test_unit_mean_upper_covers_the_true_mean(name):
    draw, mean = _SCENARIOS[name]
    rng = np.random.default_rng(11)
    covered = [unit_mean_upper(draw(rng, 200), 0.95) >= mean for _ in range(300)]
    assert np.mean(covered) >= 0.95


def test_unit_mean_upper_is_not_trivially_wide():
    # near-independent tokens: within 2 x the mean plus the zero-event floor
    x = np.random.default_rng(3).binomial(64, 0.01, 2000) / 64
    assert x.mean() < unit_mean_upper(x, 0.95) < x.mean() + 2 * unit_mean_upper(np.zeros(2000), 0.95)


def test_no_valid_bound_beats_clopper_pearson_with_no_events():
    # Bernoulli data are values in [0, 1] too: at zero events the exact binomial bound is a floor
    for n in (10, 100, 406, 1000):
        cp = 1 - 0.05 ** (1 / n)
        assert cp <= unit_mean_upper(np.zeros(n), 0.95) < 2 * cp  # about 1.36 x from 100 on


def test_sequences_needed_is_the_smallest_resolving_count():
    for allowed in (0.01, 0.005, 0.05):
        n = sequences_for_unit_mean(allowed, 0.95)
        assert unit_mean_upper(np.zeros(n), 0.95) <= allowed < unit_mean_upper(np.zeros(n - 1), 0.95)
        assert n >= samples_for_rate(allowed, 0.95)  # never fewer than the exact binomial needs
    assert sequences_for_unit_mean(0.0, 0.95) is None and sequences_for_unit_mean(1.0, 0.95) == 1


def test_lower_bound_and_paired_drop():
    x = np.random.default_rng(4).beta(2, 5, 300)
    assert unit_mean_lower(x, 0.95) == pytest.approx(1 - unit_mean_upper(1 - x, 0.95))
    assert unit_mean_lower(x, 0.95) < x.mean() < unit_mean_upper(x, 0.95)
    zeros = np.zeros(500)
    drop = paired_drop_upper(zeros, zeros, 0.95)
    assert drop == pytest.approx(unit_mean_upper(zeros, 0.975)) and drop > 0
