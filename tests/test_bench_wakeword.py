"""tools/bench_wakeword.py: the detectors it builds have issue 16's shapes, and
its BENCHMARKS block reports what its result holds (no benchmark run)."""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from helpers import written_block  # noqa: E402
from bench_wakeword import BEGIN, END, FEATURES, HIDDEN, detector, main, windows, write  # noqa: E402


def test_the_detector_has_the_issue_shape_and_a_fixed_batch_of_one():
    rng = np.random.default_rng(0)
    widths = [16 * FEATURES, HIDDEN, HIDDEN, 1]
    coefs = [(rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32) for a, b in zip(widths, widths[1:])]
    intercepts = [rng.normal(size=b).astype(np.float32) for b in widths[1:]]
    model = detector(16, coefs, intercepts)
    # 1536 -> 128 -> 128 -> 1: issue 16's 213 k parameters
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == 213377
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 16, FEATURES]
    x, labels = windows(3, 16, rng)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x[:1]})[0]
    h = x[:1].reshape(1, -1)
    for i, (w, b) in enumerate(zip(coefs, intercepts)):  # what MLPClassifier computes with these weights
        h = h @ w + b
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-h)), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception):  # the batch is fixed at 1
        sess.run(None, {"x": x[:2]})
    assert x.dtype == np.float32 and x.shape == (3, 16, FEATURES) and set(labels) <= {0, 1}


def _after(wall, calibration, decide, chosen):
    return {"wall_s": wall, "calibration_s": calibration, "decide_s": decide, "ratio": decide / calibration,
            "candidates": 20, "chosen": chosen, "parameters_ratio": 0.25, "status": "optimized"}


def test_block_reports_before_and_after_per_detector(tmp_path):
    same = {"lossless_linearity": True, "fold_ratios": {"layer0": 0.5}, "heads_kept": {}}
    older = {"lossless_linearity": True, "fold_ratios": {"layer0": 0.5}}  # an older onnxfold names fewer knobs
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "before_commit": "abc1234",
              "load_average_1min_after": 0.5, "previous": None,
              "rows": [{"input_width": 1536, "parameters": 213377, "test_accuracy": 0.9,
                        "before": _after(50.0, 10.0, 40.0, older), "after": _after(5.0, 1.0, 2.0, same)},
                       {"input_width": 3264, "parameters": 434561, "test_accuracy": 0.91,
                        "before": _after(200.0, 20.0, 160.0, same),
                        "after": {**_after(8.0, 2.0, 3.0, {**same, "fold_ratios": {"layer0": 0.3}}),
                                  "status": "final_check_failed", "failures": ["prob: bound 1.06% > 1% allowed"]}}]}
    _text, block = written_block(write, (BEGIN, END), result, tmp_path, "wakeword.json")
    assert "| 1536 | 213,377 | 0.900 | 50.0 | 5.0 | 10.0 x | 4.00 | 1.00 | 2.00 | 2.00 | 20 | 0.250 |" in block
    assert "| 3264 | 434,561 | 0.910 | 200.0 | 8.0 | 25.0 x | 8.00 | 2.00 | 3.00 | 1.50 | 20 |" in block
    assert block.count("| optimized | yes | optimized |") == 1  # the first chose the same setting
    assert block.count("| final_check_failed | no | optimized |") == 1  # the second another, which then failed
    assert "the original was written instead (said on stderr; `--check` exits 1) - input 3264: prob: bound 1.06%" in block
    assert "abc1234" in block and "heads_kept" not in block  # empty knobs left out
    assert "decide / calibration: 1.50-2.00, was 4.00-8.00: both stages got faster together (input 1536: " \
        "calibration 10.0 -> 1.00 s, decide 40.0 -> 2.00 s; input 3264: calibration 20.0 -> 2.00 s" in block


def test_before_must_be_an_onnxfold_checkout(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--before", str(tmp_path)])
    assert exc.value.code == 2
