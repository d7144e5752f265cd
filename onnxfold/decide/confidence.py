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
