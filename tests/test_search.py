"""The budget search's phases, driven by a stub judge (no passes, no onnxruntime),
and the search over conv channels, attention heads and FFNs on real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import build_mlp, ort_run, random_input
from onnxfold.decide.budget import Budget, BudgetCheck
from onnxfold.find.groups import Group
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.search import RATIO_STEPS, THRESHOLD_STEPS, BudgetSearch, Candidate, Setting, passes_for, sweep_probe

# a stub model of 1000 parameters and five groups: dense chains a and b (ratio and threshold knobs),
# the conv chain c, the gated MLP g (ratio), the attention block h of 12 heads (heads kept per step:
# 12, 11, 10, ...). Each step of a knob saves SAVES parameters; a threshold step of a saves 10.
# The budget holds while each knob is at or below LIMITS and a's threshold at or below step 3.
HEADS_12 = (12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)
GROUPS = [Group("neuron", "a", 64, ["a.p"], ["a.c"], knobs={"ratio": RATIO_STEPS, "threshold": THRESHOLD_STEPS}),
          Group("neuron", "b", 64, ["b.p"], ["b.c"], knobs={"ratio": RATIO_STEPS, "threshold": THRESHOLD_STEPS}),
          Group("channel", "c", 32, ["c.p"], ["c.c"], knobs={"ratio": RATIO_STEPS}),
          Group("gated", "g", 48, ["g.gate", "g.up"], ["g.down"], knobs={"ratio": RATIO_STEPS}),
          Group("head", "h", 12, ["h.q", "h.k", "h.v"], ["h.o"], knobs={"heads": HEADS_12}),
          Group("residual", "r", 16, ["r.p"], ["r.c"])]  # no knob: residual streams fold only when asked
KNOBS = {"a": "ratio", "b": "ratio", "c": "ratio", "g": "ratio", "h": "heads"}
LIMITS = {"a": 5, "b": 2, "c": 4, "g": 3, "h": 4}
SAVES = {"a": 50, "b": 30, "c": 20, "g": 15, "h": 25}


def _stub_search(max_evaluations: int = 100, limits=LIMITS) -> tuple[BudgetSearch, list[Setting]]:
    judged: list[Setting] = []

    def judge(setting: Setting) -> Candidate:
        judged.append(setting)
        steps = {k: setting.step(k, knob) for k, knob in KNOBS.items()}
        ok = all(steps[k] <= v for k, v in limits.items()) and setting.step("a", "threshold") <= 3
        params = 1000 - sum(SAVES[k] * steps[k] for k in SAVES) - 10 * setting.step("a", "threshold")
        spent = sum(steps[k] / (limits[k] + 1) for k in limits)
        check = BudgetCheck(met=ok, spent=spent, failures=[] if ok else ["over"])
        return Candidate(setting, None, params, check, [], [], {})

    search = BudgetSearch(onnx.ModelProto(), Budget(min_agreement=99.0), PassContext(), groups=GROUPS,
                          max_evaluations=max_evaluations, judge=judge)
    search.original_params = 1000
    return search, judged


def test_stub_search_finds_each_groups_largest_step_for_every_kind():
    search, _ = _stub_search()
    res = search.run()
    best = res.best.setting
    assert {k: best.step(k, knob) for k, knob in KNOBS.items()} == LIMITS
    assert best.step("a", "threshold") == 3
    assert res.best.parameters == 1000 - 5 * 50 - 2 * 30 - 4 * 20 - 3 * 15 - 4 * 25 - 3 * 10
    # only dense chains have a linearity threshold; the residual stream has no knob and is never moved
    assert all(g in ("a", "b") for s in search.cache for g, knob, _ in s.steps if knob == "threshold")
    assert all(g != "r" for s in search.cache for g, _, _ in s.steps)
    # the report's description: the values each knob declares, by group
    assert res.chosen["heads_kept"] == {"h": 8}
    assert res.chosen["fold_ratios"] == {"a": 0.6, "b": 0.25, "c": 0.5, "g": 0.4}
    assert res.chosen["linear_thresholds"] == {"a": 0.98}


def test_stub_search_starts_lossless_and_sweeps_every_knob_uniformly():
    search, judged = _stub_search()
    res = search.run()
    assert judged[0] == Setting()  # the lossless step first
    # the uniform phase: one ratio for every group with a ratio knob; 2 is the largest all of them allow
    uniform = res.baseline_uniform.setting
    assert {(g, knob) for g, knob, _ in uniform.steps} == {("a", "ratio"), ("b", "ratio"), ("c", "ratio"),
                                                           ("g", "ratio")}
    assert {s for _, _, s in uniform.steps} == {2}
    # the head count had its own uniform sweep (the only group with it: h alone moved), with both selections
    heads_only = [s for s in search.cache if s.steps and all(knob == "heads" for _, knob, _ in s.steps)]
    assert {s.select for s in heads_only} == {"kmeans", "magnitude", "obs"}
    assert res.best.parameters < res.baseline_uniform.parameters


@pytest.mark.parametrize("steps", [2, 3, 6, 9, 12])
def test_a_sweep_finds_the_largest_meeting_step_wherever_the_budget_breaks(steps):
    """Under a monotone budget (steps up to ``last`` meet), the probe order
    ends on ``last`` for every position of the break, in at most one
    candidate more than bisection needs."""
    for last in range(steps):  # 0: no step off the untouched one meets
        lo, hi, probes = 0, steps, []
        while hi - lo > 1:
            mid = sweep_probe(lo, hi)
            assert lo < mid < hi
            probes.append(mid)
            lo, hi = (mid, hi) if mid <= last else (lo, mid)
        assert lo == last
        assert len(probes) <= int(np.ceil(np.log2(steps))) + 1
        if last == 0:  # nothing meets: settled by its least aggressive step alone
            assert probes == [1]


def test_a_sweep_that_cannot_meet_the_budget_costs_one_candidate():
    # nothing but the lossless step meets: every knob's sweep fails at its first step
    search, judged = _stub_search(limits={k: 0 for k in LIMITS})
    search.run()
    # the ratio and head sweeps' candidates (the greedy phase's moves start from a threshold that met)
    uniform = [s for s in judged if s.steps and all(k != "threshold" for _, k, _ in s.steps)]
    assert all(step == 1 for s in uniform for _, _, step in s.steps)
    # one candidate per (knob, selection) sweep: ratio and heads with each of the three selections
    assert len(uniform) == 6


def test_obs_settings_never_move_a_conv_chain():
    search, judged = _stub_search()
    search.run()
    obs = [s for s in judged if s.select == "obs"]
    assert obs, "the obs selection was swept"
    # it selects from the readers' input covariance, which a conv channel's kernel columns are not
    assert all(g != "c" for s in obs for g, _, _ in s.steps)
    assert any(g == "g" for s in obs for g, _, _ in s.steps) and any(g == "h" for s in obs for g, _, _ in s.steps)


def test_stub_search_stops_at_the_evaluation_limit():
    search, judged = _stub_search(max_evaluations=7)
    res = search.run()
    assert len(judged) <= 7 and res.best is not None and res.best.met


def test_stub_search_with_nothing_allowed_returns_the_lossless_step():
    search, _ = _stub_search(limits={k: 0 for k in LIMITS})
    res = search.run()
    assert all(knob == "threshold" for _, knob, _ in res.best.setting.steps)
    assert res.best.parameters >= 1000 - 30


def test_stub_search_steps_are_each_knobs_grid():
    search, _ = _stub_search()
    search.run()
    sizes = {g.name: g.knobs for g in GROUPS}
    for s in search.cache:
        assert all(0 < step < len(sizes[g][knob]) for g, knob, step in s.steps)


def test_stub_search_over_named_groups_only():
    search, _ = _stub_search()
    res = search.run(["h"])
    assert {g for s in search.cache for g, _, _ in s.steps} == {"h"}
    assert res.best.setting.step("h", "heads") == LIMITS["h"]


def test_passes_for_maps_each_knob_to_its_pass():
    from onnxfold.passes.channel_folding import ChannelFoldingPass
    from onnxfold.passes.folding import FoldingPass
    from onnxfold.passes.head_folding import GatedFoldingPass, HeadFoldingPass
    from onnxfold.passes.linearity import LinearityPass

    groups = {g.name: g for g in GROUPS}
    setting = Setting.of({("a", "ratio"): 4, ("a", "threshold"): 2, ("c", "ratio"): 1, ("g", "ratio"): 3,
                          ("h", "heads"): 4}, select="magnitude")
    passes = passes_for(setting, groups, seed=3)
    assert [type(p) for p in passes] == [LinearityPass, LinearityPass, HeadFoldingPass, GatedFoldingPass,
                                         FoldingPass, ChannelFoldingPass]
    assert passes[0].threshold == 1.0 and passes[1].threshold == 0.99
    assert passes[2].heads == {"h": 8} and passes[2].select == "magnitude"
    assert passes[3].ratio == {"g": 0.4}
    assert passes[4].ratio == {"a": 0.5} and passes[4].seed == 3
    assert passes[5].ratio == {"c": 0.1} and not passes[5].fold_residual


# ---------------------------------------------------------------------------
# the search on real models


def test_search_cache_holds_metrics_and_rebuilds_models_deterministically():
    model = build_mlp([6, 24, 24, 3], seed=2)
    x = random_input(model, batch=120, seed=5)
    ctx = PassContext(calibration=CalibrationSet({"x": x[:60]}), heldout=CalibrationSet({"x": x[60:]}))
    search = BudgetSearch(model, Budget(max_error=10.0), ctx, max_evaluations=8)
    res = search.run()
    assert len(search.cache) >= 3 and all(c.model is None for c in search.cache.values())
    # a candidate that is neither the lead nor the last one is built again from its setting
    other = next(c for s, c in search.cache.items() if s not in (res.best.setting, Setting()))
    again = search.model_for(other)
    fresh = BudgetSearch(model, Budget(max_error=10.0), ctx).evaluate(other.setting)
    assert fresh.parameters == other.parameters
    feed = {"x": random_input(model, batch=7, seed=11)}
    np.testing.assert_array_equal(ort_run(again, feed)[0], ort_run(search.model_for(fresh), feed)[0])


def test_search_folds_duplicate_conv_channels():
    """Every hidden channel has an exact twin: folding half of them changes
    nothing, so the search takes it even where the data cannot resolve a lossy fold."""
    import onnxfold
    from test_channel_folding import chain_model

    model = chain_model(n=8, bn=False, dup=True)
    x = random_input(model, batch=200, seed=4)
    res = onnxfold.optimize(model, {"x": x}, provider="cpu", latency=False, max_evaluations=12)
    chosen = res.report["search"]["chosen"]
    assert chosen is not None and chosen["fold_ratios"], chosen
    # half the channels gone whatever ratio names it: k-means merges every exact twin already at 0.1
    assert res.changed and res.report["ratios"]["parameters"] < 0.55
    fresh = random_input(model, batch=20, seed=9)
    np.testing.assert_allclose(ort_run(res.model, {"x": fresh})[0], ort_run(model, {"x": fresh})[0],
                               rtol=1e-4, atol=1e-4)


def _transformer(seed=0) -> onnx.ModelProto:
    """x → attention (4 heads, heads 1 and 3 copies of 0 and 2) + residual → FFN 16 → 32 → 16 (ReLU,
    neurons 16..31 copies of 0..15) + residual, exported with dynamic batch and sequence axes."""
    torch = pytest.importorskip("torch")
    from test_head_folding import HEAD_DIM, HIDDEN, _Attention, _export

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _Attention()
            self.up, self.down = torch.nn.Linear(HIDDEN, 32), torch.nn.Linear(32, HIDDEN)

        def forward(self, x, mask):
            x = self.attn(x, mask)
            return x + self.down(torch.relu(self.up(x)))

    torch.manual_seed(seed)
    block = Block()
    d = HEAD_DIM
    with torch.no_grad():
        for a, b in ((0, 1), (2, 3)):
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                lin.weight[b * d:(b + 1) * d] = lin.weight[a * d:(a + 1) * d]
                lin.bias[b * d:(b + 1) * d] = lin.bias[a * d:(a + 1) * d]
            block.attn.o.weight[:, b * d:(b + 1) * d] = block.attn.o.weight[:, a * d:(a + 1) * d]
        block.up.weight[16:], block.up.bias[16:] = block.up.weight[:16], block.up.bias[:16]
        block.down.weight[:, 16:] = block.down.weight[:, :16]
    dyn = {0: "batch", 1: "seq"}
    return _export(block, (torch.randn(2, 5, HIDDEN), torch.ones(2, 5)), ["x", "mask"],
                   {"x": dyn, "mask": dyn, "y": dyn})


def _feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    from test_head_folding import HIDDEN

    x = np.random.default_rng(seed).standard_normal((n, 5, HIDDEN)).astype(np.float32)
    return {"x": x, "mask": np.ones((n, 5), np.float32)}


def test_search_folds_attention_heads_and_the_ffn_of_a_transformer():
    """Without explicit settings, the search chooses head counts and FFN fold
    ratios itself; the result meets the budget on fresh data (onnxruntime)."""
    import onnxfold
    from test_head_folding import HEAD_DIM

    model = _transformer()
    max_error = 0.05
    res = onnxfold.optimize(model, _feeds(2000, 1), budget=Budget(max_error=max_error), provider="cpu",
                            latency=False, max_evaluations=30)
    chosen = res.report["search"]["chosen"]
    assert res.report["settings"]["mode"] == "search" and res.changed, res.report["notes"]
    assert chosen["heads_kept"] and chosen["fold_ratios"], chosen
    # the widths the graph now has: 2 distinct heads of 4, 16 distinct FFN neurons of 32
    inits = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    width = {n.name: inits[n.input[1]][1] for n in res.model.graph.node
             if n.op_type == "MatMul" and n.input[1] in inits}
    assert width["/attn/q/MatMul"] <= 2 * HEAD_DIM and width["/up/MatMul"] <= 16, width
    kinds = {lr["kind"] for lr in res.report["layers"] if lr["width_after"] < lr["width_before"]}
    assert kinds == {"head", "neuron"}, res.report["layers"]
    fresh = _feeds(400, 7)
    err = np.abs(ort_run(res.model, fresh)[0] - ort_run(model, fresh)[0]).reshape(400, -1).max(axis=1)
    assert np.quantile(err, 0.99) <= max_error
