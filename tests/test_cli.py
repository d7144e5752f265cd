"""The command line as a user (and a CI job) runs it, on a shipped model."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxfold.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture()
def digits(tmp_path):
    """digits_mlp with its data, copied so the test never writes into models/."""
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    return tmp_path / "digits_mlp.onnx"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_optimize_default_output_report_and_input_untouched(digits, capsys):
    before = _sha(digits)
    mtime = digits.stat().st_mtime_ns
    report = digits.with_name("report.json")
    assert main(["optimize", str(digits), "--report", str(report), "--provider", "cpu"]) == 0
    out = digits.with_name("digits_mlp.fold.onnx")
    assert out.exists()
    assert _sha(digits) == before and digits.stat().st_mtime_ns == mtime
    rep = json.loads(report.read_text())
    for key in ("schema_version", "status", "before", "after", "ratios", "layers", "verification", "timings_s"):
        assert key in rep
    assert rep["output"] == str(out)
    assert rep["before"]["parameters"] == 64 * 256 + 256 + 2 * (256 * 256 + 256) + 256 * 10 + 10
    assert rep["after"]["parameters"] <= rep["before"]["parameters"]
    # the output runs and, at the default exact threshold, agrees on the evaluation data
    test = np.load(digits.with_name("digits_mlp.test.npz"))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(digits), providers=["CPUExecutionProvider"])
    a = sess.run(None, {"input": test["input"]})[0]
    b = ref.run(None, {"input": test["input"]})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    text = capsys.readouterr().out
    assert "parameters" in text and "wrote" in text


def test_output_equal_to_input_is_refused(digits, capsys):
    before = _sha(digits)
    assert main(["optimize", str(digits), "-o", str(digits)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "equals the input" in err
    assert _sha(digits) == before


def test_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nope.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["digits_mlp", "mnist_mlp"])
def test_inspect_counts_match_numpy(name, capsys, tmp_path):
    for suffix in (".onnx", ".calib.npz"):
        shutil.copy(MODELS / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    model = tmp_path / f"{name}.onnx"
    js = tmp_path / "inspect.json"
    assert main(["inspect", str(model), "--json", str(js), "--provider", "cpu"]) == 0  # finds NAME.calib.npz
    info = json.loads(js.read_text())
    # independent count: forward pass in numpy from the Gemm weights
    m = onnx.load(str(model))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    x = np.load(tmp_path / f"{name}.calib.npz")["input"].astype(np.float64)
    for layer, node in zip(info["chains"], gemms):
        W, b = inits[node.input[1]].astype(np.float64), inits[node.input[2]].astype(np.float64)
        z = x @ W.T + b
        assert layer["never_on"] == int((z <= 0).all(axis=0).sum())
        assert layer["always_on"] == int((z > 0).all(axis=0).sum())
        assert layer["mixed"] == W.shape[0] - layer["never_on"] - layer["always_on"]
        x = np.maximum(z, 0)
    assert len(info["chains"]) == 3
    assert "never on" in capsys.readouterr().out


def test_per_layer_fold_ratio_data_free(digits, tmp_path):
    rep = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(digits), "-o", str(out), "--no-auto-data", "--fold-ratio", "layer0=0.5,layer2=0.25",
                 "--select", "magnitude", "--report", str(rep), "--quiet", "--provider", "cpu"]) == 0
    r = json.loads(rep.read_text())
    assert r["settings"]["mode"] == "exact"
    assert r["after"]["hidden_widths"] == {"layer0": 128, "layer1": 256, "layer2": 192}
    layers = {lr["layer"]: lr for lr in r["layers"]}
    assert layers["layer0"]["pruned"] == 128 and layers["layer1"]["pruned"] == 0
    # the pruned model still runs on the test data and keeps most predictions
    test = np.load(digits.with_name("digits_mlp.test.npz"))
    a = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": test["input"]})[0]
    assert a.shape == (len(test["input"]), 10)


def test_bad_fold_ratio_is_a_usage_error(digits, capsys):
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(digits), "--fold-ratio", "1.5"])
    assert e.value.code == 2
    assert "fold ratio must be in [0, 1)" in capsys.readouterr().err
