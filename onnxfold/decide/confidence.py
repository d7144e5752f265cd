"""One-sided confidence bounds for budgets judged on held-out samples.

A budget is a claim about data onnxfold has not seen: "on new inputs, at
most 0.5 % of top-1 decisions change". A rate counted on a few hundred
held-out samples is only an estimate of that, so every budget is judged by
an *upper confidence bound*: a number the true rate stays below with
probability ``confidence`` (default 95 %). docs/statistics.md explains each
bound and how many samples a budget needs.

Bounds used:
- a rate (disagreement, decisions, samples over an error limit): the exact
  Clopper-Pearson bound for k events in n samples;
- an accuracy drop: from the paired counts, as in McNemar's test, b samples
  the candidate newly gets wrong and c it newly gets right; the drop is
  P(b) - P(c), bounded by the Clopper-Pearson upper bound of P(b) minus the
  lower bound of P(c), each at (1 - confidence) / 2 (Bonferroni: exact
  coverage, a little conservative);
- a mean error: Student's t upper bound of the per-sample mean.
"""

from __future__ import annotations

import functools
import math

import numpy as np

DEFAULT_CONFIDENCE = 0.95
MIN_SAMPLES_FOR_MEAN = 30  # below this the t bound of a mean is not trusted


def rate_upper(events: int, n: int, confidence: float) -> float:
    """Clopper-Pearson one-sided upper bound of a rate: ``events`` in ``n`` samples."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if events >= n:
        return 1.0
    return float(beta.ppf(confidence, events + 1, n - events))


def rate_lower(events: int, n: int, confidence: float) -> float:
    """Clopper-Pearson one-sided lower bound of a rate."""
    from scipy.stats import beta

    if n <= 0 or events <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, events, n - events + 1))


def accuracy_drop_upper(newly_wrong: int, newly_right: int, n: int, confidence: float) -> float:
    """Upper bound of the accuracy drop (a fraction) from paired counts."""
    half = 1.0 - (1.0 - confidence) / 2.0
    return rate_upper(newly_wrong, n, half) - rate_lower(newly_right, n, half)


def mean_upper(values: np.ndarray, confidence: float) -> float:
    """Student's t one-sided upper bound of the mean of ``values``."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        return math.inf
    if not np.all(np.isfinite(v)):
        return math.inf
    return float(v.mean() + t.ppf(confidence, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def samples_for_rate(allowed: float, confidence: float, *, alpha_share: float = 1.0) -> int | None:
    """Fewest samples at which zero events bound the rate below ``allowed``:
    the smallest n with (1 - allowed)^n <= alpha (Clopper-Pearson, k = 0).
    ``alpha_share`` < 1 when the bound runs at a split level (accuracy drop)."""
    if allowed >= 1.0:
        return 1
    if allowed <= 0.0:
        return None  # no sample count resolves a zero budget: only unchanged candidates pass
    alpha = (1.0 - confidence) * alpha_share
    return int(math.ceil(math.log(alpha) / math.log1p(-allowed)))


def samples_for_accuracy_drop(allowed: float, confidence: float) -> int | None:
    """Fewest labelled samples at which no discordant pair bounds the drop below ``allowed``."""
    return samples_for_rate(allowed, confidence, alpha_share=0.5)


# ---------------------------------------------------------------------------
# means of bounded values: per-sequence rates of sequence outputs
#
# Tokens of one sequence are not independent draws (a fold that breaks one
# position of a window tends to break its neighbours), so a per-token rate of
# a sequence output is bounded with the *sequence* as the unit: each held-out
# sequence gives one value in [0, 1] (its share of changed tokens), and the
# mean of those i.i.d. values is bounded by testing by betting (Waudby-Smith &
# Ramdas, "Estimating means of bounded random variables by betting", JRSS-B
# 2024): for a candidate mean m, the capital prod(1 + lam_i (m - x_i)) is a
# non-negative martingale when the true mean is m, so by Ville's inequality it
# reaches 1/alpha with probability at most alpha. The bets lam_i are
# predictable (from the sequences before i) and adapt to the observed
# variance, so a bound over n sequences of 64 near-independent tokens is
# nearly as tight as one over 64 n independent tokens, while a fold whose
# changes cluster in a few sequences gets the wider bound it deserves. Valid
# at every n, no normal approximation.

#: the largest share of its capital a bet may risk; a constant cap keeps the
#: capital increasing in m, so the bound is found by bisection, exactly
BET_CAP = 0.75
BET_ORDER_SEED = 0


def unit_mean_upper(values: np.ndarray, confidence: float) -> float:
    """One-sided upper confidence bound of the mean of i.i.d. values in [0, 1]
    (testing by betting, predictable plug-in bets capped at BET_CAP)."""
    x = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), 0.0, 1.0)
    n = x.size
    if n == 0:
        return 1.0
    # the bets learn from the values before them, so the order matters: a fixed
    # random order (independent of the values) keeps the bound valid and stops a
    # sorted input (all changed sequences first, say) from steering it
    x = x[np.random.default_rng(BET_ORDER_SEED).permutation(n)]
    log_target = math.log(1.0 / (1.0 - confidence))
    t = np.arange(1, n + 1)
    mean_after = (0.5 + np.cumsum(x)) / (t + 1)  # running mean with a prior of 1/2
    var_after = (0.25 + np.cumsum((x - mean_after) ** 2)) / (t + 1)  # running variance with a prior of 1/4
    var_before = np.concatenate([[0.25], var_after[:-1]])  # what bet i may know
    bets = np.minimum(np.sqrt(2.0 * log_target / (n * var_before)), BET_CAP)

    def rejected(m: float) -> bool:  # the capital betting that the mean is below m reaches 1/alpha
        return float(np.cumsum(np.log1p(bets * (m - x))).max()) >= log_target

    lo, hi = float(x.mean()), 1.0
    if not rejected(hi - 1e-12):
        return 1.0
    for _ in range(60):  # the capital grows with m: bisection finds the smallest rejected m
        mid = (lo + hi) / 2
        if rejected(mid):
            hi = mid
        else:
            lo = mid
    return hi


def unit_mean_lower(values: np.ndarray, confidence: float) -> float:
    """One-sided lower confidence bound of the mean of i.i.d. values in [0, 1]."""
    return 1.0 - unit_mean_upper(1.0 - np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), confidence)


def paired_drop_upper(worse: np.ndarray, better: np.ndarray, confidence: float) -> float:
    """Upper bound of mean(worse) - mean(better) for per-sequence shares in
    [0, 1] (a per-token accuracy drop), each side at 1 - (1 - confidence) / 2."""
    half = 1.0 - (1.0 - confidence) / 2.0
    return unit_mean_upper(worse, half) - unit_mean_lower(better, half)


@functools.lru_cache(maxsize=64)
def sequences_for_unit_mean(allowed: float, confidence: float) -> int | None:
    """Fewest sequences at which sequences with no change at all bound the
    mean below ``allowed`` (the betting bound's counterpart of
    :func:`samples_for_rate`; a little more than Clopper-Pearson needs)."""
    if allowed >= 1.0:
        return 1
    if allowed <= 0.0:
        return None
    lo, hi = 1, 2
    while unit_mean_upper(np.zeros(hi), confidence) > allowed:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if unit_mean_upper(np.zeros(mid), confidence) > allowed:
            lo = mid
        else:
            hi = mid
    return hi


def sequences_for_paired_drop(allowed: float, confidence: float) -> int | None:
    """Fewest sequences with no change that bound a per-token accuracy drop below ``allowed``."""
    return sequences_for_unit_mean(allowed, 1.0 - (1.0 - confidence) / 2.0)
