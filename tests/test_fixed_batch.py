"""Models whose batch axis is fixed at 1: optimized in batches on a symbolic copy."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, ort_run
from onnxfold.api import optimize
from onnxfold.measure.batching import batchable_copy, restore_fixed_batch, symbolic_batch
from onnxfold.measure.data import load_calibration

MODELS = Path(__file__).resolve().parent.parent / "models"


def _fix_batch_at_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have a batch axis of exactly 1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in [*out.graph.input, *out.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    return out


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_fixed_batch_model_optimizes_like_its_symbolic_copy(monkeypatch):
    import onnxruntime

    symbolic = onnx.load(MODELS / "digits_mlp.onnx")
    fixed = _fix_batch_at_one(symbolic)
    data = dict(np.load(MODELS / "digits_mlp.calib.npz"))
    test = dict(np.load(MODELS / "digits_mlp.test.npz"))
    runs = []
    plain_run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: runs.append(1) or plain_run(self, *a, **k))
    a = optimize(symbolic, data, eval_data=test)
    runs_symbolic = len(runs)
    b = optimize(fixed, data, eval_data=test)
    # in batches: about as many onnxruntime calls as the symbolic model (plus the probe),
    # not one per sample (hundreds of times more)
    assert len(runs) - runs_symbolic <= runs_symbolic + 2 * 8
    assert a.report["search"]["chosen"] is not None
    assert b.report["search"]["chosen"] == a.report["search"]["chosen"]
    assert not any("one sample at a time" in n for n in b.report["notes"])
    # the output keeps the input's fixed shapes
    assert [_dims(vi) for vi in b.model.graph.input] == [_dims(vi) for vi in fixed.graph.input]
    assert [_dims(vi) for vi in b.model.graph.output] == [_dims(vi) for vi in fixed.graph.output]
    x = test["input"][:5]
    want = ort_run(a.model, {"input": x})[0]
    got = np.concatenate([ort_run(b.model, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _reshape_model(batch_mixing: bool) -> onnx.ModelProto:
    """[1, 2, 3] -> Reshape to a literal [1, 6] -> (minus its mean over the batch axis) -> Relu."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    shape = numpy_helper.from_array(np.array([1, 6], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"])]
    if batch_mixing:  # a batch of 1 has mean = itself; a batch of several does not
        nodes += [helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[0], keepdims=1),
                  helper.make_node("Sub", ["flat", "mean"], ["centred"])]
    nodes.append(helper.make_node("Relu", ["centred" if batch_mixing else "flat"], ["y"]))
    return make_model(nodes, [x], [y], [shape], opset=13)


def test_symbolic_copy_batches_a_literal_reshape_and_restores_it():
    model = _reshape_model(batch_mixing=False)
    data = load_calibration({"x": np.random.default_rng(0).standard_normal((10, 2, 3)).astype(np.float32)}, model)
    assert data.fixed_batch == 1
    copy, note = batchable_copy(model, data, ["CPUExecutionProvider"])
    assert note is None and copy is not None
    x = next(iter(data.batches(256)))["x"]
    (many,) = ort_run(copy.model, {"x": np.concatenate([x] * 4)})
    assert many.shape == (4, 6)
    restored = restore_fixed_batch(copy.model, model, copy)
    assert restored.graph.initializer[0] == model.graph.initializer[0]
    assert [_dims(vi) for vi in restored.graph.input] == [[1, 2, 3]]


def test_batch_mixing_model_runs_per_sample_and_says_so():
    model = _reshape_model(batch_mixing=True)
    data = load_calibration({"x": np.random.default_rng(0).standard_normal((10, 2, 3)).astype(np.float32)}, model)
    copy, note = batchable_copy(model, data, ["CPUExecutionProvider"])
    assert copy is None
    assert "one sample at a time" in note
    # the copy itself is well formed: it runs, it just computes something else
    assert symbolic_batch(model).model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
