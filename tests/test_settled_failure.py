"""A candidate whose failure the first batches of the select split settle is not
judged on the rest: ``Budget.settled_failure`` against the full check of the
best completion, ``compare_models``' stop, and the search's decisions with and
without it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from helpers import build_mlp, random_input
from onnxfold.decide.budget import UNRESOLVED_SPENT, Budget
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.search import BudgetSearch
from onnxfold.verify import Comparison, OutputComparison, compare_models


def _classifier(count: int, flips: int, **counts) -> Comparison:
    o = OutputComparison(name="y", kind="classifier", count=count, max_abs_error=0.5, max_abs_reference=1.0,
                         flips=flips, agreement=1 - flips / count)
    for k, v in counts.items():
        setattr(o, k, v)
    o.sample_max_abs_error = o.sample_mean_abs_error = np.full(count, 0.5)
    return Comparison(samples=count, outputs={"y": o})


def _sequences(rates: np.ndarray, tokens: int = 10) -> Comparison:
    """A sequence output whose i-th sequence has ``rates[i] * tokens`` of its tokens flipped."""
    n = len(rates)
    flips = np.round(np.asarray(rates) * tokens)
    o = OutputComparison(name="y", kind="sequence", count=n, max_abs_error=0.5, max_abs_reference=1.0,
                         tokens=n * tokens, flips=int(flips.sum()))
    o.sample_tokens, o.sample_token_flips = np.full(n, float(tokens)), flips
    o.sample_max_abs_error = o.sample_mean_abs_error = np.full(n, 0.5)
    return Comparison(samples=n, outputs={"y": o})


def test_a_rate_is_settled_when_its_bound_over_every_sample_exceeds_the_limit():
    b = Budget(min_agreement=99.5)  # 0.5 % allowed; 1000 samples resolve it (598 needed)
    # 5 flips in the first 200 of 1000: even with no flip in the other 800, the Clopper-Pearson
    # bound of 5 in 1000 is 1.05 % (scipy's beta quantile, worked out here, not by onnxfold)
    settled = b.settled_failure(_classifier(200, 5), 1000)
    assert settled is not None and not settled.met
    assert abs(settled.spent - beta.ppf(0.95, 6, 995) / 0.005) < 1e-9
    assert "after 200 of 1000 samples" in settled.failures[0]
    # the whole comparison's check with the best completion fails as well: the early verdict is its verdict
    assert not b.check(_classifier(1000, 5)).met
    # 1 flip: the best completion (1 in 1000, bound 0.47 %) still meets the budget, so nothing is settled
    assert b.check(_classifier(1000, 1)).met
    assert b.settled_failure(_classifier(200, 1), 1000) is None


def test_an_unresolvable_limit_is_settled_by_the_first_change_only():
    b = Budget(min_agreement=99.5)  # 300 samples cannot resolve 0.5 %: only unchanged candidates pass
    settled = b.settled_failure(_classifier(100, 1), 300)
    assert settled is not None and settled.spent == UNRESOLVED_SPENT
    assert not b.check(_classifier(300, 1)).met
    # no decision changed yet: an output error alone may still be inside the range the rest sets
    assert b.settled_failure(_classifier(100, 0), 300) is None


def test_per_token_disagreement_is_settled_from_the_rates_summed_over_every_sequence():
    b = Budget(min_agreement=99.5)
    # 200 of 1000 sequences with 1 token in 10 flipped: whatever the other 800 give, the mean of the
    # per-sequence rates is at least 200 * 0.1 / 1000 = 2 %, four times the 0.5 % allowed
    settled = b.settled_failure(_sequences(np.full(200, 0.1)), 1000)
    assert settled is not None and abs(settled.spent - 4.0) < 1e-9
    best = np.concatenate([np.full(200, 0.1), np.zeros(800)])
    assert not b.check(_sequences(best)).met
    # 2 flipped sequences of 200 (0.02 % summed over 1000): the rest could still bring it under
    few = np.zeros(200)
    few[:2] = 0.1
    assert b.settled_failure(_sequences(few), 1000) is None


def test_the_betting_bound_never_falls_below_the_mean():
    """What the per-token rule rests on: the final bound is at least the final mean."""
    from onnxfold.decide.confidence import unit_mean_upper

    rng = np.random.default_rng(0)
    for n in (2, 10, 100, 1000):
        for share in (0.01, 0.3, 1.0):  # mostly unchanged sequences, a few changed, all changed
            x = np.where(rng.random(n) < share, rng.random(n), 0.0)
            assert unit_mean_upper(x, 0.95) >= x.mean(), (n, share)


@pytest.mark.parametrize("budget", [Budget(max_accuracy_drop=1.0), Budget(target_ratio=0.5)],
                         ids=["accuracy drop", "target ratio only"])
def test_limits_whose_value_can_still_fall_never_settle(budget):
    # 50 newly wrong in 200 could be offset by newly right ones later; a pure target ratio judges size
    comp = _classifier(200, 50, labeled=200, newly_wrong=50, newly_right=0)
    assert budget.settled_failure(comp, 1000) is None


def _values(errors: np.ndarray) -> Comparison:
    n = len(errors)
    o = OutputComparison(name="y", kind="values", count=n, max_abs_error=float(errors.max()), max_abs_reference=10.0)
    o.sample_max_abs_error = o.sample_mean_abs_error = np.asarray(errors, dtype=np.float64)
    return Comparison(samples=n, outputs={"y": o})


def test_an_absolute_error_limit_is_settled_from_the_samples_over_it():
    # --max-error 0.1 on the 99th percentile: 1 % of samples may exceed 0.1
    b = Budget(max_error=0.1)
    errors = np.zeros(200)
    errors[:30] = 0.5
    settled = b.settled_failure(_values(errors), 1000)  # 30 over in 1000 at best: bound about 4 %
    assert settled is not None and abs(settled.spent - beta.ppf(0.95, 31, 970) / 0.01) < 1e-9
    assert not b.check(_values(np.concatenate([errors, np.zeros(800)]))).met
    errors[1:] = 0.0  # 1 over: the best completion (1 in 1000) meets it
    assert b.check(_values(np.concatenate([errors, np.zeros(800)]))).met
    assert b.settled_failure(_values(errors), 1000) is None
    # the mean metric: errors of 1.0 on 200 samples are at least 0.2 on average over 1000, twice 0.1
    mean = Budget(max_error=0.1, error_metric="mean")
    settled = mean.settled_failure(_values(np.ones(200)), 1000)
    assert settled is not None and abs(settled.spent - 2.0) < 1e-9
    assert not mean.check(_values(np.concatenate([np.ones(200), np.zeros(800)]))).met
    # a relative limit waits: the other samples may raise the reference scale it is judged against
    assert Budget(max_relative_error=1e-3).settled_failure(_values(np.ones(200)), 1000) is None


def test_a_relative_error_limit_is_settled_once_the_whole_splits_scale_is_known():
    b = Budget(max_relative_error=1e-3)  # 1 % of samples may move by more than 1e-3 of the scale
    errors = np.zeros(200)
    errors[:30] = 0.5  # 0.05 of the scale 10: over the limit
    settled = b.settled_failure(_values(errors), 1000, scales={"y": 10.0})
    assert settled is not None and abs(settled.spent - beta.ppf(0.95, 31, 970) / 0.01) < 1e-9
    assert not b.check(_values(np.concatenate([errors, np.zeros(800)]))).met  # its scale is 10 too
    # a larger scale (1000): 0.5 is 5e-4 of it, under the limit, and nothing is settled
    assert b.settled_failure(_values(errors), 1000, scales={"y": 1000.0}) is None
    # 100 samples cannot resolve it: one output moved by more than 0.1 % of the scale settles it
    one = np.zeros(40)
    one[0] = 0.5
    assert b.settled_failure(_values(one), 100, scales={"y": 10.0}).spent == UNRESOLVED_SPENT
    assert b.settled_failure(_values(one), 100) is None  # no scale, no flip: not yet
    assert not b.check(_values(np.concatenate([one, np.zeros(60)]))).met


def test_an_accuracy_drop_over_more_labels_than_samples_is_not_taken_for_unresolvable():
    # a per-pixel classifier: 100 samples but 10,000 labelled predictions resolve a 1 pp drop,
    # so a changed prediction alone settles nothing
    b = Budget(max_accuracy_drop=1.0)
    comp = _classifier(40, 1, labeled=4000, newly_wrong=1, newly_right=1)
    assert b.settled_failure(comp, 100) is None
    assert b.check(_classifier(100, 1, labeled=10_000, newly_wrong=1, newly_right=1)).met


def test_a_complete_comparison_is_never_settled_early():
    assert Budget(min_agreement=99.5).settled_failure(_classifier(1000, 50), 1000) is None


def test_compare_models_stops_where_told_and_never_after_the_last_batch():
    ref = build_mlp([4, 8, 3], seed=0)
    cand = build_mlp([4, 8, 3], seed=1)
    x = random_input(ref, batch=50, seed=2)
    data = CalibrationSet({"x": x})
    seen = []
    comp = compare_models(ref, cand, data, batch_size=20, stop=lambda partial: seen.append(partial.samples) or
                          partial.samples >= 40)
    assert seen == [20, 40] and comp.samples == 40 and comp.outputs["y"].count == 40
    seen.clear()
    full = compare_models(ref, cand, data, batch_size=20, stop=lambda partial: seen.append(partial.samples) or False)
    assert seen == [20, 40] and full.samples == 50  # not asked after the third (last) batch
    # the samples judged are the ones a run without a stop judges first
    first = compare_models(ref, cand, CalibrationSet({"x": x[:40]}), batch_size=20)
    assert comp.outputs["y"].flips == first.outputs["y"].flips


@pytest.mark.parametrize("outputs, budget", [(3, Budget(min_agreement=99.0)), (1, Budget.default())],
                         ids=["classifier, agreement", "regressor, default relative error"])
def test_the_search_decides_the_same_with_and_without_early_stops(monkeypatch, outputs, budget):
    model = build_mlp([6, 24, 24, outputs], seed=2)
    x = random_input(model, batch=1000, seed=5)
    ctx = PassContext(calibration=CalibrationSet({"x": x[:400]}), heldout=CalibrationSet({"x": x[400:]}),
                      batch_size=50)

    def run():
        search = BudgetSearch(model, budget, ctx, max_evaluations=20)
        res = search.run()
        return res, {s: c for s, c in search.cache.items()}

    stopped_res, stopped = run()
    monkeypatch.setattr(Budget, "settled_failure", lambda self, partial, total, scales=None: None)
    full_res, full = run()
    assert list(stopped) == list(full)  # the same candidates, in the same order
    assert stopped_res.chosen == full_res.chosen
    for s, c in full.items():
        assert stopped[s].met == c.met, s
        # a stopped candidate's spent is a lower bound of what the whole split gives
        assert stopped[s].spent <= c.spent + 1e-9, s
    early = [s for s, c in stopped.items() if c.comparison["samples"] < 600]
    assert early, "no candidate was stopped early: the test does not exercise the stop"
    assert all(not stopped[s].met for s in early)
    # the report says which candidates were judged on part of the split only
    judged = [e["judged_samples"] for e in stopped_res.evaluated]
    assert sorted(judged) == sorted(c.comparison["samples"] for c in stopped.values())
    assert min(judged) < 600 and all(e["judged_samples"] == 600 for e in full_res.evaluated)
