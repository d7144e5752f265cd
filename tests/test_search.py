"""The budget search's phases, driven by a stub judge (no passes, no onnxruntime),
and the search over conv channels on a real model."""

from __future__ import annotations

import numpy as np
import onnx

from helpers import ort_run, random_input
from onnxfold.decide.budget import Budget, BudgetCheck
from onnxfold.passes.base import PassContext
from onnxfold.search import RATIO_STEPS, THRESHOLD_STEPS, BudgetSearch, Candidate, Setting

# a stub model: 1000 parameters; each ratio step of layer a saves 50, of b 30, of the conv chain c 20;
# a threshold step of a saves 10. The budget holds while a <= 5, b <= 2, c <= 4 and a's threshold <= 3.
LIMITS = {"a": 5, "b": 2, "c": 4}
SAVES = {"a": 50, "b": 30, "c": 20}


def _stub_search(max_evaluations: int = 60, limits=LIMITS) -> tuple[BudgetSearch, list[Setting]]:
    judged: list[Setting] = []

    def judge(setting: Setting) -> Candidate:
        judged.append(setting)
        ok = all(setting.ratio_of(k) <= v for k, v in limits.items()) and setting.threshold_of("a") <= 3
        params = 1000 - sum(SAVES[k] * setting.ratio_of(k) for k in SAVES) - 10 * setting.threshold_of("a")
        spent = sum(setting.ratio_of(k) / (limits[k] + 1) for k in limits)
        check = BudgetCheck(met=ok, spent=spent, failures=[] if ok else ["over"])
        return Candidate(setting, None, params, check, [], [], {})

    search = BudgetSearch(onnx.ModelProto(), Budget(min_agreement=99.0), PassContext(),
                          max_evaluations=max_evaluations, judge=judge)
    search.original_params = 1000
    return search, judged


def test_stub_search_finds_each_layers_largest_step():
    search, _ = _stub_search()
    res = search.run(["a", "b"], conv_layers=["c"])
    best = res.best.setting
    assert {k: best.ratio_of(k) for k in "abc"} == LIMITS
    assert best.threshold_of("a") == 3
    # a conv chain gets no linearity threshold: the search never set one
    assert all(s.threshold_of("c") == 0 for s in search.cache)
    assert res.best.parameters == 1000 - 5 * 50 - 2 * 30 - 4 * 20 - 3 * 10


def test_stub_search_starts_lossless_and_keeps_the_uniform_baseline():
    search, judged = _stub_search()
    res = search.run(["a", "b"], conv_layers=["c"])
    assert judged[0] == Setting()  # the lossless step first
    # the uniform phase: one ratio for every layer; 2 is the largest every layer allows
    uniform = res.baseline_uniform.setting
    assert {uniform.ratio_of(k) for k in "abc"} == {2}
    assert res.best.parameters < res.baseline_uniform.parameters


def test_stub_search_stops_at_the_evaluation_limit():
    search, judged = _stub_search(max_evaluations=7)
    res = search.run(["a", "b"], conv_layers=["c"])
    assert len(judged) <= 7 and res.best is not None and res.best.met


def test_stub_search_with_nothing_allowed_returns_the_lossless_step():
    search, _ = _stub_search(limits={"a": 0, "b": 0, "c": 0})
    res = search.run(["a", "b"], conv_layers=["c"])
    assert res.best.setting.ratios == () and res.best.parameters >= 1000 - 30


def test_stub_search_steps_are_the_published_grid():
    # the search only proposes steps from the two grids (a regression guard for the report's settings)
    search, _ = _stub_search()
    search.run(["a", "b"], conv_layers=["c"])
    for s in search.cache:
        assert all(0 <= v < len(RATIO_STEPS) for _, v in s.ratios)
        assert all(0 <= v < len(THRESHOLD_STEPS) for _, v in s.thresholds)


# ---------------------------------------------------------------------------
# conv channels in the search, on a real model


def test_search_folds_duplicate_conv_channels():
    """Every hidden channel has an exact twin: folding half of them changes
    nothing, so the search takes it even where the data cannot resolve a lossy fold."""
    import onnxfold
    from test_channel_folding import chain_model

    model = chain_model(n=8, bn=False, dup=True)
    x = random_input(model, batch=200, seed=4)
    res = onnxfold.optimize(model, {"x": x}, provider="cpu", latency=False, max_evaluations=12)
    chosen = res.report["search"]["chosen"]
    assert chosen is not None and max(chosen["fold_ratios"].values()) >= 0.5, chosen
    assert res.changed and res.report["ratios"]["parameters"] < 0.75
    fresh = random_input(model, batch=20, seed=9)
    np.testing.assert_allclose(ort_run(res.model, {"x": fresh})[0], ort_run(model, {"x": fresh})[0],
                               rtol=1e-4, atol=1e-4)

