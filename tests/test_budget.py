"""Budgets judged by confidence bounds, their resolution rules, and the budget search through the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxfold.cli import main
from onnxfold.decide.budget import Budget, parse_max_error
from onnxfold.verify import Comparison, OutputComparison

MODELS = Path(__file__).resolve().parent.parent / "models"


def _comp(kind="classifier", count=1000, max_abs_error=0.0, max_abs_reference=1.0, errors=None, **counts):
    """A comparison of one output 'y' from counts (as verify._Acc produces them)."""
    o = OutputComparison(name="y", kind=kind, count=count, max_abs_error=max_abs_error,
                         max_abs_reference=max_abs_reference)
    for k, v in counts.items():
        setattr(o, k, v)
    if kind in ("classifier", "label") and o.flips is None:
        o.flips = 0
    if o.flips is not None:
        o.agreement = 1 - o.flips / count
    errs = np.full(count, max_abs_error) if errors is None else np.asarray(errors, dtype=np.float64)
    o.sample_max_abs_error, o.sample_mean_abs_error = errs, errs / 2
    o.max_abs_error = float(errs.max()) if errs.size else 0.0
    return Comparison(samples=count, outputs={"y": o})


def _bound0(n, confidence=0.95):
    """Clopper-Pearson upper bound for zero events, in closed form."""
    return 1 - (1 - confidence) ** (1 / n)


def test_agreement_budget_is_judged_by_its_upper_bound():
    b = Budget(min_agreement=99.5)
    # no flip in 1000: bound 1 - 0.05^(1/1000) = 0.2991 %, 0.598 of the 0.5 % allowed
    c = b.check(_comp(flips=0, count=1000, max_abs_error=0.5))
    assert c.met and abs(c.spent - _bound0(1000) / 0.005) < 1e-9
    # 2 flips in 1000 (0.2 % observed, below the budget) do not prove <= 0.5 %: the bound is 0.63 %
    c = b.check(_comp(flips=2, count=1000, max_abs_error=0.5))
    assert not c.met and "upper 95% bound" in c.failures[0] and "0.2% observed" in c.failures[0]
    assert 0.0062 < c.limits[0].bound < 0.0064


def test_accuracy_drop_bound_uses_newly_wrong_and_newly_right():
    b = Budget(max_accuracy_drop=1.0)
    # 3 newly wrong, 3 newly right in 2000: no drop observed, and the paired bound is well below 1 pp
    c = b.check(_comp(count=2000, flips=6, labeled=2000, newly_wrong=3, newly_right=3,
                      accuracy_original=0.9, accuracy_candidate=0.9))
    lc = [x for x in c.limits if x.kind == "accuracy_drop"][0]
    assert lc.met and lc.observed == 0.0 and 0 < lc.bound < 0.01
    # the same 3 newly wrong without the 3 newly right: bound grows
    c2 = b.check(_comp(count=2000, flips=3, labeled=2000, newly_wrong=3, newly_right=0))
    lc2 = [x for x in c2.limits if x.kind == "accuracy_drop"][0]
    assert lc2.bound > lc.bound
    # 30 newly wrong in 2000 = 1.5 pp observed: fails
    c3 = b.check(_comp(count=2000, flips=30, labeled=2000, newly_wrong=30, newly_right=0))
    assert not c3.met and "accuracy drop" in c3.failures[0]


def test_error_budgets_bound_a_quantile_or_the_mean():
    # max metric: the share of samples over the limit, against 1 - error_quantile (1 %)
    b = Budget(max_error={"y": 0.1})
    errs = np.zeros(1000)
    assert b.check(_comp(kind="values", errors=errs)).met  # bound 0.30 % <= 1 %
    errs[:2] = 5.0  # 2 of 1000 over the limit: bound 0.63 % <= 1 %: a quantile, not the max
    assert b.check(_comp(kind="values", errors=errs)).met
    errs[:20] = 5.0  # 20 of 1000: fails
    assert not b.check(_comp(kind="values", errors=errs)).met
    # mean metric: t bound of the per-sample mean error (the helper sets mean = max / 2)
    b = Budget(max_error={"y": 0.1}, error_metric="mean")
    assert b.check(_comp(kind="values", errors=np.full(100, 0.1))).met  # mean 0.05, no spread
    assert not b.check(_comp(kind="values", errors=np.full(100, 0.3))).met
    assert parse_max_error("0.5") == 0.5
    assert parse_max_error("a=1,b=0.25") == {"a": 1.0, "b": 0.25}


def test_detector_budget_needs_positives_too():
    b = Budget(min_agreement=99.0, positive_threshold=0.5)
    # 1 of 2000 decisions flips overall, but 10 of the original's 400 positives are lost
    c = b.check(_comp(kind="values", count=2000, decision_flips=1, positive_count=400, positive_flips=10,
                      max_abs_error=0.2))
    assert not c.met and "positives" in c.failures[0]
    assert b.check(_comp(kind="values", count=2000, decision_flips=1, positive_count=400, positive_flips=0,
                         max_abs_error=0.2)).met


def test_default_budget_relative_error_for_regressors():
    b = Budget.default()
    assert b.check(_comp(kind="values", errors=np.full(1000, 1e-4))).met
    assert not b.check(_comp(kind="values", errors=np.full(1000, 1e-2))).met


# ---------------------------------------------------------------------------
# resolution rules: one per budget kind. Too few samples: only a candidate with
# no observed change passes, and the message says how many samples are needed.

RESOLUTION_CASES = {
    # kind: (budget, comparison changed, comparison unchanged, samples needed)
    "agreement": (Budget(min_agreement=99.5), dict(flips=0, count=200, max_abs_error=0.5),
                  dict(flips=0, count=200, max_abs_error=1e-5), 598),
    "decision_agreement": (Budget(min_agreement=99.0, positive_threshold=0.5),
                           dict(kind="values", count=100, decision_flips=0, max_abs_error=0.2),
                           dict(kind="values", count=100, decision_flips=0, max_abs_error=1e-6), 299),
    "positive_agreement": (Budget(min_agreement=99.0, positive_threshold=0.5),
                           dict(kind="values", count=5000, decision_flips=0, positive_count=50, positive_flips=0,
                                max_abs_error=0.2),
                           dict(kind="values", count=5000, decision_flips=0, positive_count=50, positive_flips=0,
                                max_abs_error=1e-6), 299),
    "accuracy_drop": (Budget(max_accuracy_drop=0.5), dict(count=300, labeled=300, max_abs_error=0.5),
                      dict(count=300, labeled=300, max_abs_error=1e-6), 736),
    "error_quantile": (Budget(max_error=0.1), dict(kind="values", count=100, max_abs_error=0.05),
                       dict(kind="values", count=100, max_abs_error=1e-6), 299),
    "mean_error": (Budget(max_error=0.1, error_metric="mean"), dict(kind="values", count=20, max_abs_error=0.05),
                   dict(kind="values", count=20, max_abs_error=1e-6), 30),
}


@pytest.mark.parametrize("kind", sorted(RESOLUTION_CASES))
def test_each_budget_kind_has_a_resolution_rule(kind):
    budget, changed, unchanged, needed = RESOLUTION_CASES[kind]
    c = budget.check(_comp(**changed))
    lc = [x for x in c.limits if x.kind == kind][0]
    assert not lc.resolved and lc.needed == needed
    # the change is within the budget's point criteria, yet it cannot be shown to meet it
    assert not c.met and not lc.met and "cannot resolve" in lc.message and f"needs at least {needed}" in lc.message
    note = [n for n in c.resolution_notes if kind.split("_")[0] in n or "error" in n]
    assert note and f"needs at least {needed}" in note[0] and "no observed change" in note[0]
    assert budget.check(_comp(**unchanged)).met


def test_resolution_needs_follow_the_confidence():
    assert Budget(min_agreement=99.5).samples_needed() == 598
    assert Budget(min_agreement=99.5, confidence=0.99).samples_needed() == 919
    assert Budget(max_accuracy_drop=0.5).samples_needed() == 736
    assert Budget.default().samples_needed() == 598  # agreement 0.5 % and the 99 % error quantile
    # exactly at the needed count the zero-change bound meets the limit, one sample less it does not
    assert _bound0(598) <= 0.005 < _bound0(597)


def test_accuracy_budget_needs_labelled_outputs():
    c = Budget(max_accuracy_drop=1.0).check(_comp(count=1000))
    assert not c.met and "no labelled classifier output" in c.failures[0]


@pytest.fixture()
def digits(tmp_path):
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    return tmp_path / "digits_mlp.onnx"


def test_check_exit_code_budget_met(digits):
    rep = digits.with_name("r.json")
    code = main(["optimize", str(digits), "--min-agreement", "95", "--max-evaluations", "6", "--check",
                 "--report", str(rep), "--no-latency", "--quiet", "--provider", "cpu"])
    assert code == 0
    r = json.loads(rep.read_text())
    assert r["budget"]["met"] is True and r["status"] == "optimized"
    assert r["verification"]["outputs"]["logits"]["agreement"] >= 0.95
    assert r["after"]["parameters"] < r["before"]["parameters"]
    assert r["search"]["evaluated"] and len(r["search"]["evaluated"]) <= 6


def test_check_exit_code_budget_not_met_returns_original(digits, capsys):
    out = digits.with_name("out.onnx")
    rep = digits.with_name("r.json")
    # a 20x smaller model cannot keep the logits within 1e-12 (dropping dead
    # neurons alone could: it is bit-exact on the data it was measured on)
    code = main(["optimize", str(digits), "-o", str(out), "--max-error", "1e-12", "--target-ratio", "0.05",
                 "--max-evaluations", "8", "--check", "--report", str(rep), "--no-latency", "--quiet",
                 "--provider", "cpu"])
    assert code == 1
    assert "budget not met" in capsys.readouterr().err
    r = json.loads(rep.read_text())
    assert r["status"] == "budget_not_met" and r["budget"]["met"] is False
    assert out.read_bytes() and r["after"]["parameters"] == r["before"]["parameters"]


def test_check_exit_code_bad_input(digits, capsys):
    code = main(["optimize", str(digits), "--calib", str(digits.with_name("missing.npz")), "--check", "--quiet"])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_accuracy_budget_without_labels_is_a_usage_error(digits, tmp_path, capsys):
    d = np.load(digits.with_name("digits_mlp.calib.npz"))
    np.savez(tmp_path / "nolabels.npz", input=d["input"])
    code = main(["optimize", str(digits), "--calib", str(tmp_path / "nolabels.npz"), "--no-auto-data",
                 "--max-accuracy-drop", "1", "--quiet"])
    assert code == 2 and "labels" in capsys.readouterr().err


def _detector_batch1(tmp_path):
    """A ReLU MLP with a fixed batch dimension of 1 and a sigmoid score output,
    trained-looking by construction: dead and duplicated neurons to remove."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    W1 = rng.normal(size=(16, 48)).astype(np.float32)
    b1 = rng.normal(size=48).astype(np.float32)
    b1[:12] = -50.0  # never active: removable exactly
    W2 = rng.normal(size=(48, 1)).astype(np.float32) / 4
    nodes = [h.make_node("Gemm", ["x", "W1", "b1"], ["z1"]), h.make_node("Relu", ["z1"], ["a1"]),
             h.make_node("Gemm", ["a1", "W2"], ["z2"]), h.make_node("Sigmoid", ["z2"], ["score"])]
    g = h.make_graph(nodes, "det", [h.make_tensor_value_info("x", T.FLOAT, [1, 16])],
                     [h.make_tensor_value_info("score", T.FLOAT, [1, 1])],
                     [nh.from_array(W1, "W1"), nh.from_array(b1, "b1"), nh.from_array(W2, "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "det.onnx"
    onnx.save(m, path)
    x = rng.normal(size=(240, 16)).astype(np.float32)
    np.savez(tmp_path / "det.calib.npz", x=x[:160])
    np.savez(tmp_path / "det.test.npz", x=x[160:])
    return path


def test_fixed_batch_one_detector_keeps_signature(tmp_path):
    import onnxruntime as ort

    path = _detector_batch1(tmp_path)
    rep = tmp_path / "r.json"
    code = main(["optimize", str(path), "--min-agreement", "99", "--positive-threshold", "0.5",
                 "--max-evaluations", "6", "--report", str(rep), "--quiet", "--provider", "cpu", "--check"])
    assert code == 0
    r = json.loads(rep.read_text())
    out = onnx.load(str(tmp_path / "det.fold.onnx"))
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [1, 16]
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 1]
    v = r["verification"]["outputs"]["score"]
    assert v["positive_count"] > 0 and v["positive_agreement"] >= 0.99 and v["decision_agreement"] >= 0.99
    assert r["after"]["hidden_widths"]["layer0"] <= 48 - 12  # at least the dead neurons went
    assert list(r["latency"]) == ["batch 1"]
    # the model still runs one sample at a time, as exported
    sess = ort.InferenceSession(str(tmp_path / "det.fold.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((1, 16), np.float32)})[0].shape == (1, 1)


def test_search_is_deterministic_for_a_seed(digits):
    outs = []
    for k in range(2):
        out = digits.with_name(f"run{k}.onnx")
        assert main(["optimize", str(digits), "-o", str(out), "--max-evaluations", "5", "--seed", "3",
                     "--no-latency", "--quiet", "--provider", "cpu"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------------
# the final check: a model that missed it is never the result


def _predictions(model_path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def test_failed_final_check_returns_the_lossless_model(digits, capsys):
    """Explicit fold + the user's budget: the 60 % fold changes test predictions,
    and 397 test samples cannot resolve 0.5 %: the output is the lossless model."""
    out, rep = digits.with_name("out.onnx"), digits.with_name("r.json")
    code = main(["optimize", str(digits), "-o", str(out), "--fold-ratio", "0.6", "--min-agreement", "99.5",
                 "--check", "--report", str(rep), "--no-latency", "--quiet", "--provider", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "failed the final check" in err and "wrote the lossless model" in err
    r = json.loads(rep.read_text())
    assert r["status"] == "final_check_failed" and r["budget"]["fallback"]["returned"] == "lossless"
    assert r["budget"]["met"] is True and r["budget"]["fallback"]["chosen_parameter_ratio"] < 0.5
    # the written model is not the 60 % fold: it is larger, and agrees with the original on every test sample
    assert 0.5 < r["ratios"]["parameters"] < 1.0
    test = np.load(digits.with_name("digits_mlp.test.npz"))["input"]
    assert np.array_equal(_predictions(out, test), _predictions(digits, test))


def test_failed_final_check_without_check_still_warns(digits, capsys):
    out = digits.with_name("out.onnx")
    code = main(["optimize", str(digits), "-o", str(out), "--fold-ratio", "0.6", "--min-agreement", "99.5",
                 "--no-latency", "--provider", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "warning: the chosen model" in captured.err
    # the console report shows each limit with its bound, here for the lossless model returned
    assert "Budget on the final check (95% one-sided bounds)" in captured.out and "unresolved" in captured.out
    # said once, before the run, not repeated among the report's notes
    assert captured.out.count("too little held-out data") == 1
    assert captured.out.index("too little held-out data") < captured.out.index("Hidden layers")


def test_search_result_failing_on_unseen_data_is_never_written(digits, tmp_path):
    """The search chooses on calibration data; the final check runs on inputs
    far outside it, where even the lossless model changes: the original is returned."""
    import onnxfold

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "far.npz", input=rng.normal(0, 4, size=(400, 64)).astype(np.float32))
    res = onnxfold.optimize(str(digits), str(digits.with_name("digits_mlp.calib.npz")),
                            eval_data=str(tmp_path / "far.npz"), max_evaluations=6, provider="cpu")
    r = res.report
    assert r["search"]["chosen"] is not None  # the search did choose a smaller model
    assert r["status"] == "final_check_failed" and r["budget"]["fallback"]["returned"] == "original"
    assert not res.changed and r["after"]["parameters"] == r["before"]["parameters"]
    assert res.model.graph == onnx.load(str(digits)).graph


def test_held_out_parts_are_sized_for_the_budget():
    from onnxfold.api import held_out_size

    # 10,000 samples, 598 needed: twice that per part, the fit part takes the rest
    assert held_out_size(10_000, 598, 0.3, 0.2) == 2000  # the 20 % floor is larger
    assert held_out_size(3000, 598, 0.3, 0.2) == 900  # capped at 30 %: resolvable, fit keeps 40 %
    assert held_out_size(100_000, 598, 0.3, 0.2) == 20_000
    # too little data to resolve it at any share: keep the floor and starve the fit part no further
    assert held_out_size(500, 598, 0.3, 0.2) == 100
    # a share of millions is capped at 50,000 samples per part, unless the budget needs more
    assert held_out_size(1_000_000, 598, 0.3, 0.2) == 50_000
    assert held_out_size(1_000_000, 40_000, 0.3, 0.2) == 80_000


class _Counted:
    """A stand-in data set: how many samples, and the part sizes it was split into."""

    def __init__(self, n):
        self.num_samples, self.sizes = n, None

    def split(self, fractions, seed):
        from onnxfold.measure.data import split_indices

        self.sizes = [len(p) for p in split_indices(self.num_samples, fractions, seed)]
        return [None] * len(fractions)


@pytest.mark.parametrize("n, with_eval, needed, sizes", [
    (10_000, False, None, [6000, 2000, 2000]),  # fixed fractions below the cap: as always
    (1_000_000, False, None, [900_000, 50_000, 50_000]),
    (1_000_000, True, None, [950_000, 50_000]),
    (1_000_000, False, 598, [900_000, 50_000, 50_000]),
])
def test_held_out_parts_stay_bounded_in_the_number_of_samples(n, with_eval, needed, sizes):
    from onnxfold.api import split_data

    calib = _Counted(n)
    split_data(calib, object() if with_eval else None, 0, needed)
    assert calib.sizes == sizes


def test_little_data_is_said_up_front(digits):
    import onnxfold

    heard = []
    res = onnxfold.optimize(str(digits), str(digits.with_name("digits_mlp.calib.npz")), max_evaluations=3,
                            provider="cpu", notify=heard.append)
    assert len(heard) == 1 and "needs 598 samples per held-out part" in heard[0]
    assert heard[0] in res.report["notes"]


def test_confidence_option_sets_the_bounds_level(digits, capsys):
    rep = digits.with_name("r.json")
    # at 50 % confidence 0.5 % needs 139 samples per part, not 598
    assert main(["optimize", str(digits), "--min-agreement", "99.5", "--confidence", "0.5", "--max-evaluations", "3",
                 "--report", str(rep), "--no-latency", "--quiet", "--provider", "cpu"]) in (0, 1)
    r = json.loads(rep.read_text())
    assert r["budget"]["spec"]["confidence"] == 0.5
    agreement = [lc for lc in r["budget"]["limits"] if lc["kind"] == "agreement"]
    assert agreement and all(lc["needed"] == 139 for lc in agreement)
    capsys.readouterr()
    assert main(["optimize", str(digits), "--confidence", "1.5", "--quiet", "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--confidence" in err
