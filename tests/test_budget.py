"""Budgets, the disagreement estimate, and the budget search through the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxfold.cli import main
from onnxfold.decide.budget import Budget, parse_max_error
from onnxfold.verify import Comparison, OutputComparison, predicted_disagreement, top1_margins

MODELS = Path(__file__).resolve().parent.parent / "models"


def _comp(**kw) -> Comparison:
    o = OutputComparison(name="y", kind=kw.pop("kind", "classifier"), count=100)
    for k, v in kw.items():
        setattr(o, k, v)
    return Comparison(samples=100, outputs={"y": o})


def test_agreement_budget_met_and_spent():
    b = Budget(min_agreement=99.0)
    met, spent, fail = b.check(_comp(agreement=0.995))
    assert met and abs(spent - 0.5) < 1e-9 and not fail  # 0.5 % used of 1 % allowed
    met, spent, fail = b.check(_comp(agreement=0.98))
    assert not met and abs(spent - 2.0) < 1e-9 and "top-1 agreement 98.00%" in fail[0]


def test_predicted_disagreement_counts_against_agreement():
    b = Budget(min_agreement=99.5)
    c = _comp(agreement=1.0)
    c.predicted_disagreement = {"y": 0.01}
    met, spent, fail = b.check(c)
    # 1 % predicted, doubled for safety, against 0.5 % allowed
    assert not met and abs(spent - 4.0) < 1e-9 and "predicted" in fail[0]
    c.predicted_disagreement = {"y": 0.002}
    met, spent, _ = b.check(c)
    assert met and abs(spent - 0.8) < 1e-9


def test_accuracy_drop_and_error_budgets():
    b = Budget(max_accuracy_drop=1.0)
    assert b.check(_comp(accuracy_original=0.9, accuracy_candidate=0.895))[0]
    assert not b.check(_comp(accuracy_original=0.9, accuracy_candidate=0.88))[0]
    b = Budget(max_error={"y": 0.1}, error_metric="mean")
    assert b.check(_comp(kind="values", max_abs_error=5.0, mean_abs_error=0.05))[0]
    assert not b.check(_comp(kind="values", max_abs_error=5.0, mean_abs_error=0.2))[0]
    assert parse_max_error("0.5") == 0.5
    assert parse_max_error("a=1,b=0.25") == {"a": 1.0, "b": 0.25}


def test_detector_budget_needs_positives_too():
    b = Budget(min_agreement=99.0, positive_threshold=0.5)
    # 99.9 % of decisions agree overall, but only 90 % of the original's positives survive
    met, _, fail = b.check(_comp(kind="values", decision_agreement=0.999, positive_agreement=0.9))
    assert not met and "positives" in fail[0]
    assert b.check(_comp(kind="values", decision_agreement=0.999, positive_agreement=0.995))[0]


def test_default_budget_relative_error_for_regressors():
    b = Budget.default()
    assert b.check(_comp(kind="values", max_abs_error=1e-4, max_abs_reference=1.0))[0]
    assert not b.check(_comp(kind="values", max_abs_error=1e-2, max_abs_reference=1.0))[0]


def test_top1_margins_and_disagreement_estimate_by_hand():
    out = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    assert np.allclose(top1_margins(out), [2.0, 1.5])
    # reference margins 0.1 .. 1.0; the candidate loses 0.55 margin on sample 0 and none on sample 1
    ref_margins = np.linspace(0.1, 1.0, 10)
    cand = out.copy()
    cand[0, 0] -= 0.55
    # loss 0.55 exceeds the 5 margins 0.1..0.5; loss 0 exceeds none -> (5 + 0) / (2 * 10)
    assert abs(predicted_disagreement(ref_margins, out, cand) - 0.25) < 1e-12


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


def test_observed_flips_veto_only_when_significant():
    b = Budget(min_agreement=99.5)
    # 1 flip in 75 with a 0.5 % predicted rate: P(X >= 1) = 31 %, not evidence against the budget
    c = _comp(agreement=74 / 75, count=75)
    c.predicted_disagreement = {"y": 0.002}
    met, spent, _ = b.check(c)
    assert met and abs(spent - 0.8) < 1e-9
    # 4 flips in 75: P(X >= 4 | p = 0.005) is about 0.06 %: vetoed although the estimate is fine
    c = _comp(agreement=71 / 75, count=75)
    c.predicted_disagreement = {"y": 0.002}
    met, _, fail = b.check(c)
    assert not met and "significantly" in fail[0]


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


def test_unresolvable_budget_demands_no_flip_risk():
    b = Budget(min_agreement=99.5)
    c = _comp(agreement=1.0, count=30)
    # 114 calibration margins cannot resolve 0.5 % (0.57 expected flips): any predicted risk fails
    c.predicted_disagreement, c.margin_samples = {"y": 0.001}, {"y": 114}
    met, spent, fail = b.check(c)
    assert not met and spent == 1000.0 and "cannot resolve" in fail[0]
    c.predicted_disagreement = {"y": 0.0}
    assert b.check(c)[0]
    # with 1,000 margins (5 expected flips) the estimate itself is trusted
    c.predicted_disagreement, c.margin_samples = {"y": 0.001}, {"y": 1000}
    assert b.check(c)[0]
