"""The comparison engine against numbers worked out by hand."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxfold.measure.data import CalibrationSet
from onnxfold.verify import compare_models


def _affine_model(W: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    g = h.make_graph([h.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", W.shape[1]])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", W.shape[0]])],
                     [nh.from_array(W.astype(np.float32), "W"), nh.from_array(b.astype(np.float32), "b")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_agreement_errors_and_accuracy_by_hand():
    # y = x (identity, 2 classes); candidate adds 0.5 to class 1.
    eye = np.eye(2)
    ref = _affine_model(eye, np.zeros(2))
    cand = _affine_model(eye, np.array([0.0, 0.5]))
    x = np.array([[1.0, 0.0], [1.0, 0.7], [0.0, 1.0], [0.2, 0.1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 0])
    # reference argmax: 0, 0, 1, 0 -> accuracy 4/4
    # candidate outputs: [1,.5] [1,1.2] [0,1.5] [.2,.6] -> argmax 0, 1, 1, 1 -> accuracy 2/4
    # agreement: samples 0 and 2 agree -> 2/4; abs error 0.5 on one of two entries
    data = CalibrationSet({"x": x}, labels)
    comp = compare_models(ref, cand, data, batch_size=3)
    o = comp.outputs["y"]
    assert comp.samples == 4
    assert o.kind == "classifier"
    assert o.agreement == 0.5
    assert o.accuracy_original == 1.0 and o.accuracy_candidate == 0.5
    assert abs(o.accuracy_drop_pp - 50.0) < 1e-9
    assert abs(o.max_abs_error - 0.5) < 1e-6
    assert abs(o.mean_abs_error - 0.25) < 1e-6
    assert abs(o.max_abs_reference - 1.0) < 1e-6


def test_detector_decisions_and_positive_agreement():
    # single-score detector: y = x; candidate subtracts 0.3
    ref = _affine_model(np.eye(1), np.zeros(1))
    cand = _affine_model(np.eye(1), np.array([-0.3]))
    x = np.array([[0.9], [0.6], [0.55], [0.1], [0.2], [0.7]], dtype=np.float32)
    # threshold 0.5: original positives 0.9, 0.6, 0.55, 0.7 (4); candidate keeps 0.9 only (0.6 < 0.5+0.3... )
    # candidate scores 0.6, 0.3, 0.25, -0.2, -0.1, 0.4 -> positive only the first
    comp = compare_models(ref, cand, CalibrationSet({"x": x}), positive_threshold=0.5)
    o = comp.outputs["y"]
    assert o.kind == "values"
    assert o.positive_count == 4
    assert o.positive_agreement == 0.25
    # decisions agree on the kept positive and the two negatives: 3 of 6
    assert o.decision_agreement == 0.5


def test_softmax_detector_any_non_first_class():
    ref = _affine_model(np.eye(3), np.zeros(3))
    cand = _affine_model(np.eye(3), np.zeros(3))
    x = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6]], dtype=np.float32)
    o = compare_models(ref, cand, CalibrationSet({"x": x}), positive_threshold=0.5).outputs["y"]
    assert o.positive_count == 2 and o.positive_agreement == 1.0 and o.max_abs_error == 0.0


def _sequence_model(W: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """x [N, S, D] -> logits [N, S, V] = x W + b."""
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["z"]), h.make_node("Add", ["z", "b"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", "S", W.shape[0]])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", "S", W.shape[1]])],
                     [nh.from_array(W.astype(np.float32), "W"), nh.from_array(b.astype(np.float32), "b")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _same(a: dict, b: dict) -> bool:
    """Equal, NaN included (a NaN is not equal to itself)."""
    import json

    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def test_a_reference_memo_gives_what_recomputing_the_reference_gives(monkeypatch):
    """The search judges many candidates against one reference: what the
    reference gives per batch is computed once (predictions, the perplexity of
    the labels under it) and every comparison is the same as without it."""
    from onnxfold import verify

    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6))
    ref = _sequence_model(W, np.zeros(6))
    cands = [_sequence_model(W + rng.normal(scale=s, size=W.shape), rng.normal(scale=s, size=6)) for s in (0.2, 0.5)]
    nan = _sequence_model(W, np.array([np.nan, 0, 0, 0, 0, 0]))
    x = rng.normal(size=(20, 5, 4)).astype(np.float32)
    data = CalibrationSet({"x": x}, rng.integers(0, 6, size=(20, 5)))
    reference = verify.reference_outputs(ref, data, batch_size=8)
    nll_calls = []
    real_nll = verify._nll
    monkeypatch.setattr(verify, "_nll", lambda logits, labels: nll_calls.append(1) or real_nll(logits, labels))
    memo: dict = {}
    for cand in [*cands, nan]:
        fresh = compare_models(ref, cand, data, batch_size=8, original_outputs=reference).to_dict()
        calls = len(nll_calls)
        got = compare_models(ref, cand, data, batch_size=8, original_outputs=reference, reference_memo=memo)
        assert _same(got.to_dict(), fresh), cand
        # 3 batches: the reference's perplexity computed for the first candidate only
        assert len(nll_calls) - calls == (6 if cand is cands[0] else 3)
    assert got.outputs["y"].max_abs_error == np.inf  # a NaN output is still an infinite error
    assert memo and all("nll" in v and "pred" in v for v in memo.values())
