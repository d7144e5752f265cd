"""``measure.stream.model_digest``: the content key under which a budget search
shares sessions, streams and judged models. Equal keys must mean equal models:
a key that missed a change would hand one model's statistics to another."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from helpers import build_mlp
from onnxfold.measure import stream
from onnxfold.measure.stream import model_digest


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_equal_models_have_one_key_whatever_the_object():
    model = build_mlp([6, 8, 3], seed=4)
    assert model_digest(model) == model_digest(_copy(model)) == model_digest(build_mlp([6, 8, 3], seed=4))
    assert model_digest(model) != model_digest(build_mlp([6, 8, 3], seed=5))


def test_every_kind_of_change_changes_the_key():
    model = build_mlp([6, 8, 3], seed=4)
    key = model_digest(model)
    changes = []

    flipped = _copy(model)
    raw = bytearray(flipped.graph.initializer[0].raw_data)
    raw[5] ^= 1  # one bit of one weight
    flipped.graph.initializer[0].raw_data = bytes(raw)
    changes.append(flipped)

    renamed_node = _copy(model)
    renamed_node.graph.node[0].name += "_x"
    changes.append(renamed_node)

    renamed_weight = _copy(model)
    renamed_weight.graph.initializer[0].name += "_x"
    changes.append(renamed_weight)

    reshaped = _copy(model)  # the same bytes read as another shape
    t = reshaped.graph.initializer[0]
    t.dims[:] = [int(np.prod(t.dims))]
    changes.append(reshaped)

    reordered = _copy(model)
    first, second = (_copy_tensor(t) for t in reordered.graph.initializer[:2])
    reordered.graph.initializer[0].CopyFrom(second)
    reordered.graph.initializer[1].CopyFrom(first)
    changes.append(reordered)

    as_floats = _copy(model)  # the same values stored in float_data: another protobuf
    t = as_floats.graph.initializer[0]
    values = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(values.ravel().tolist())
    changes.append(as_floats)

    other_opset = _copy(model)
    other_opset.opset_import[0].version += 1
    changes.append(other_opset)

    keys = [model_digest(m) for m in changes]
    assert key not in keys and len(set(keys)) == len(keys)


def test_absent_and_empty_raw_data_are_different_tensors():
    model = build_mlp([6, 8, 3], seed=4)
    absent, empty = _copy(model), _copy(model)
    for m in (absent, empty):
        m.graph.initializer.append(onnx.TensorProto(name="z", data_type=onnx.TensorProto.FLOAT, dims=[0]))
    empty.graph.initializer[-1].raw_data = b""
    assert empty.graph.initializer[-1].HasField("raw_data") and not absent.graph.initializer[-1].HasField("raw_data")
    assert model_digest(absent) != model_digest(empty)


def test_the_model_is_not_changed_and_too_large_models_get_keys_of_their_own(monkeypatch):
    model = build_mlp([6, 8, 3], seed=4)
    before = model.SerializeToString(deterministic=True)
    model_digest(model)
    assert model.SerializeToString(deterministic=True) == before
    monkeypatch.setattr(stream, "DIGEST_LIMIT_BYTES", 16)  # every model is "too large" now
    first, second = model_digest(model), model_digest(model)
    assert first != second and first.startswith("unserializable")


def _copy_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(t)
    return out
