"""Pipeline neighbours: onnxsim before and after, onnxruntime quantization after,
calibration from onnxruntime CalibrationDataReaders and Polygraphy-style data
loader scripts, the --plot pictures, and the README's Python API example."""

from __future__ import annotations

import builtins
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxfold
from onnxfold.cli import main
from onnxfold.find import find_dense_graph

from helpers import build_mlp, ort_run

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def _data(name: str, what: str):
    with np.load(MODELS / f"{name}.{what}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def digits_fold():
    """digits_mlp folded with fixed settings (fast, deterministic)."""
    res = onnxfold.optimize(str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.calib.npz"),
                            eval_data=str(MODELS / "digits_mlp.test.npz"), fold_ratio=0.5, provider="cpu")
    assert res.changed
    return res


# ---------------------------------------------------------------------------
# onnxsim


def test_onnxsim_before_onnxfold():
    onnxsim = pytest.importorskip("onnxsim")
    # the first weight as Transpose(initializer): a constant subgraph that onnxsim folds
    model = build_mlp([12, 32, 16, 4], "relu", form="matmul", seed=3)
    init = next(t for t in model.graph.initializer if t.name == "fc0.B")
    model.graph.initializer.remove(init)
    model.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init).T.copy(), "fc0.Bt"))
    model.graph.node.insert(0, onnx.helper.make_node("Transpose", ["fc0.Bt"], ["fc0.B"], name="fc0.T"))
    onnx.checker.check_model(model)
    simplified, ok = onnxsim.simplify(model)
    assert ok
    assert "Transpose" not in {n.op_type for n in simplified.graph.node}
    assert len(find_dense_graph(simplified).chains) == 2
    x = np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32)
    res = onnxfold.optimize(simplified, {"x": x[:400]}, eval_data={"x": x[400:]}, fold_ratio=0.25, provider="cpu")
    assert res.changed and res.report["ratios"]["parameters"] < 1
    assert res.report["verification"]["outputs"]["y"]["agreement"] >= 0.8


def test_onnxsim_after_onnxfold_keeps_function(digits_fold):
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(digits_fold.model)
    assert ok
    onnx.checker.check_model(simplified)
    x = _data("digits_mlp", "test")["input"]
    np.testing.assert_allclose(ort_run(simplified, x)[0], ort_run(digits_fold.model, x)[0], rtol=1e-5, atol=1e-5)
    # still an onnxfold-readable graph: same chains
    assert [c.width for c in find_dense_graph(simplified).chains] == \
        [c.width for c in find_dense_graph(digits_fold.model).chains]


# ---------------------------------------------------------------------------
# onnxruntime quantization of onnxfold's output


class _NpzReader:
    """A real onnxruntime CalibrationDataReader over feed batches."""

    def __new__(cls, feeds, batch=32):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                name, arr = next(iter(feeds.items()))
                self._it = iter([{name: arr[i:i + batch]} for i in range(0, len(arr), batch)])

            def get_next(self):
                return next(self._it, None)

        return Reader()


def test_fold_output_quantizes_static_qdq_per_channel(digits_fold, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = tmp_path / "fold.onnx"
    digits_fold.save(src)
    calib = _data("digits_mlp", "calib")
    dst = tmp_path / "fold.int8.onnx"
    quantize_static(str(src), str(dst), _NpzReader({"input": calib["input"]}), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    q = onnx.load(str(dst))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    test = _data("digits_mlp", "test")
    orig = ort_run(onnx.load(str(MODELS / "digits_mlp.onnx")), test["input"])[0].argmax(1)
    got = ort_run(q, test["input"])[0].argmax(1)
    assert np.mean(got == orig) >= 0.95  # int8 on top of folding stays close to the original
    assert np.mean(got == test["labels"]) >= 0.9


# ---------------------------------------------------------------------------
# calibration sources


def test_api_accepts_onnxruntime_calibration_data_reader():
    calib = _data("digits_mlp", "calib")
    reader = _NpzReader({"input": calib["input"]}, batch=50)
    res = onnxfold.optimize(str(MODELS / "digits_mlp.onnx"), reader, eval_data=str(MODELS / "digits_mlp.test.npz"),
                            fold_ratio=0.5, provider="cpu")
    ref = onnxfold.optimize(str(MODELS / "digits_mlp.onnx"), {"input": calib["input"]},
                            eval_data=str(MODELS / "digits_mlp.test.npz"), fold_ratio=0.5, provider="cpu")
    assert res.report["settings"]["calibration_samples"] == len(calib["input"])
    assert res.report["after"] == ref.report["after"]  # the reader gives the same data as the arrays


LOADER = """
import numpy as np

def load_data():
    with np.load({calib!r}) as z:
        x = z["input"]
    for i in range(0, len(x), 64):
        yield {{"input": x[i:i + 64]}}

def broken():
    raise RuntimeError("no data today")
"""


@pytest.fixture()
def loader_script(tmp_path):
    p = tmp_path / "loader.py"
    p.write_text(LOADER.format(calib=str(MODELS / "digits_mlp.calib.npz")))
    return p


def test_cli_data_loader_script(tmp_path, loader_script):
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    args = ["optimize", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--report", str(rep), "--fold-ratio",
            "0.5", "--quiet", "--provider", "cpu", "--no-latency"]
    assert main(args + ["--data-loader-script", f"{loader_script}:load_data"]) == 0
    import json

    r = json.loads(rep.read_text())
    assert r["settings"]["calibration_samples"] == len(_data("digits_mlp", "calib")["input"])
    # the fold asked for is returned (397 test samples cannot show the default budget for it, so the
    # report says so rather than "optimized")
    assert r["status"] == "budget_not_met_on_evaluation" and r["ratios"]["parameters"] < 0.6
    # default function name, like Polygraphy
    assert main(args + ["--data-loader-script", str(loader_script)]) == 0


@pytest.mark.parametrize("spec, message", [
    ("{script}:broken", "broken() failed: RuntimeError: no data today"),
    ("{script}:missing", "has no function 'missing'"),
    ("{dir}/nope.py:load_data", "no such file"),
])
def test_cli_data_loader_script_errors(tmp_path, loader_script, capsys, spec, message):
    spec = spec.format(script=loader_script, dir=tmp_path)
    rc = main(["inspect", str(MODELS / "digits_mlp.onnx"), "--data-loader-script", spec, "--provider", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_calib_and_loader_script_conflict(loader_script, capsys):
    rc = main(["inspect", str(MODELS / "digits_mlp.onnx"), "--calib", str(MODELS / "digits_mlp.calib.npz"),
               "--data-loader-script", str(loader_script)])
    assert rc == 2 and "not both" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# pictures


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_inspect_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "inspect.png"
    assert main(["inspect", str(MODELS / "digits_mlp.onnx"), "--plot", str(png), "--quiet", "--provider", "cpu"]) == 0
    assert _is_png(png)


def test_inspect_plot_classes_match_inspect():
    from onnxfold.plot import neuron_rates

    layers = neuron_rates(str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.calib.npz"), provider="cpu")
    info = onnxfold.inspect(str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.calib.npz"), provider="cpu")
    for layer, row in zip(layers, info["chains"]):
        assert int(np.sum(layer["cls"] == "linear")) == row["always_one_linear_piece"]
        assert int(np.sum(layer["cls"] == "constant")) == row["always_constant"]
        assert np.all((layer["rate"] >= 0) & (layer["rate"] <= 1))
        assert np.all(layer["rate"][layer["cls"] == "linear"] == 1.0)  # ReLU: linear = always on


def test_optimize_plot(tmp_path):
    pytest.importorskip("matplotlib")
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    png = tmp_path / "search.png"
    assert main(["optimize", str(tmp_path / "digits_mlp.onnx"), "--plot", str(png), "--quiet", "--provider", "cpu",
                 "--no-latency", "--max-evaluations", "8"]) == 0
    assert _is_png(png)


def test_plot_without_matplotlib_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    out = tmp_path / "never.onnx"
    for argv in (["inspect", str(MODELS / "digits_mlp.onnx"), "--plot", str(tmp_path / "a.png")],
                 ["optimize", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--plot", str(tmp_path / "b.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'onnxfold[plot]'" in err
    assert not out.exists()  # checked before any work


def test_optimize_plot_needs_a_search(tmp_path, capsys):
    rc = main(["optimize", str(MODELS / "digits_mlp.onnx"), "-o", str(tmp_path / "o.onnx"), "--fold-ratio", "0.5",
               "--plot", str(tmp_path / "p.png")])
    assert rc == 2 and "search" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# README


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" block, run as written (from the repo root)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(MODELS)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert (tmp_path / "digits_mlp.small.onnx").exists()


def test_readme_ci_section_uses_check_and_report():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it in CI", 1)[1].split("\n## ", 1)[0]
    assert "onnxfold optimize" in section and "--check" in section and "--report" in section
