"""Calibration data: sources, validation (one-line errors), batching, splitting."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold.errors import CalibrationDataError, OnnxFoldError, UsageError
from onnxfold.measure.data import CalibrationSet, load_calibration, model_inputs
from onnxfold.measure.stream import run_model, stream_tensors

RNG = np.random.default_rng(0)


def _model(inputs, *, nodes=None, outputs=None, initializers=()):
    """inputs: list of (name, elem_type, shape). Default graph: Identity of the first input."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    if nodes is None:
        nodes = [helper.make_node("Identity", [inputs[0][0]], ["out"])]
        outputs = [helper.make_tensor_value_info("out", inputs[0][1], None)]
    g = helper.make_graph(nodes, "g", vis, outputs, list(initializers))
    return helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def _two_input_model():
    return _model(
        [("a", TensorProto.FLOAT, ["N", 4]), ("b", TensorProto.FLOAT, ["N", 4])],
        nodes=[helper.make_node("Add", ["a", "b"], ["out"])],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )


def _x_model(shape=("N", 784), elem=TensorProto.FLOAT):
    return _model([("x", elem, list(shape))])


def _err(source, model, match_words, what="calibration"):
    with pytest.raises(CalibrationDataError) as ei:
        load_calibration(source, model, what=what)
    msg = str(ei.value)
    assert "\n" not in msg
    for w in match_words:
        assert w in msg, (w, msg)
    return msg


# ---------------------------------------------------------------- sources


def test_npz_with_labels(tmp_path):
    m = _two_input_model()
    a, b = RNG.normal(size=(10, 4)).astype(np.float32), RNG.normal(size=(10, 4)).astype(np.float32)
    y = np.arange(10)
    p = tmp_path / "c.npz"
    np.savez(p, a=a, b=b, labels=y)
    cs = load_calibration(p, m)
    assert cs.num_samples == 10 and len(cs) == 10
    assert cs.input_names == ["a", "b"]
    np.testing.assert_array_equal(cs.arrays["a"], a)
    np.testing.assert_array_equal(cs.arrays["b"], b)
    np.testing.assert_array_equal(cs.labels, y)
    assert cs.has_labels and not cs.fixed_batch_one
    cs2 = load_calibration(str(p), m)  # str path too
    np.testing.assert_array_equal(cs2.arrays["b"], b)


def test_directory_of_npy(tmp_path):
    m = _two_input_model()
    a, b = RNG.normal(size=(6, 4)).astype(np.float32), RNG.normal(size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    cs = load_calibration(tmp_path, m)
    assert cs.labels is None and cs.num_samples == 6
    np.testing.assert_array_equal(cs.arrays["b"], b)
    np.save(tmp_path / "labels.npy", np.arange(6))
    assert load_calibration(tmp_path, m).labels.tolist() == list(range(6))


def test_directory_sanitized_names(tmp_path):
    m = _model([("input:0", TensorProto.FLOAT, ["N", 3])])
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    np.save(tmp_path / "input_0.npy", x)
    cs = load_calibration(tmp_path, m)
    assert cs.input_names == ["input:0"]


def test_single_npy_for_one_input_model(tmp_path):
    x = RNG.normal(size=(5, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cs = load_calibration(tmp_path / "x.npy", _x_model())
    np.testing.assert_array_equal(cs.arrays["x"], x)
    cs = load_calibration(x, _x_model())  # a bare array too
    assert cs.num_samples == 5


def test_dict_source_and_labels():
    m = _two_input_model()
    a = RNG.normal(size=(7, 4)).astype(np.float32)
    cs = load_calibration({"a": a, "b": a * 2, "labels": np.ones(7)}, m)
    assert cs.num_samples == 7 and cs.labels.shape == (7,)


def test_list_of_feed_dicts_and_generator():
    m = _two_input_model()
    feeds = [{"a": RNG.normal(size=(k, 4)).astype(np.float32), "b": np.zeros((k, 4), np.float32),
              "labels": np.full(k, k)} for k in (3, 1, 5)]
    cs = load_calibration(feeds, m)
    assert cs.num_samples == 9
    np.testing.assert_array_equal(cs.arrays["a"], np.concatenate([f["a"] for f in feeds]))
    assert cs.labels.tolist() == [3, 3, 3, 1, 5, 5, 5, 5, 5]
    cs2 = load_calibration((f for f in feeds), m)
    np.testing.assert_array_equal(cs2.arrays["a"], cs.arrays["a"])


def test_calibration_data_reader_protocol():
    class Reader:  # onnxruntime.quantization.CalibrationDataReader-like
        def __init__(self):
            self.items = [{"x": RNG.normal(size=(2, 784)).astype(np.float32)} for _ in range(3)]

        def get_next(self):
            return self.items.pop(0) if self.items else None

    cs = load_calibration(Reader(), _x_model())
    assert cs.num_samples == 6 and cs.labels is None


def test_calibration_set_revalidated():
    cs = CalibrationSet({"x": np.zeros((3, 784), np.float64)}, np.arange(3))
    out = load_calibration(cs, _x_model())
    assert out.arrays["x"].dtype == np.float32 and out.labels.tolist() == [0, 1, 2]


def test_model_input_named_labels_is_an_input():
    m = _model([("labels", TensorProto.FLOAT, ["N", 2])])
    cs = load_calibration({"labels": np.zeros((3, 2), np.float32)}, m)
    assert cs.input_names == ["labels"] and cs.labels is None


def test_initializer_inputs_optional():
    w = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    m = _model(
        [("x", TensorProto.FLOAT, ["N", 4]), ("w", TensorProto.FLOAT, [4])],
        nodes=[helper.make_node("Add", ["x", "w"], ["out"])],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers=[w],
    )
    assert model_inputs(m) == ["x"]
    cs = load_calibration({"x": np.zeros((2, 4), np.float32)}, m)
    assert cs.input_names == ["x"]


# ---------------------------------------------------------------- dtype casts


def test_float64_cast_to_float32_silently():
    cs = load_calibration({"x": RNG.normal(size=(3, 784))}, _x_model())
    assert cs.arrays["x"].dtype == np.float32


def test_int32_cast_to_int64():
    cs = load_calibration({"x": np.ones((3, 5), np.int32)}, _x_model(("N", 5), TensorProto.INT64))
    assert cs.arrays["x"].dtype == np.int64


# ---------------------------------------------------------------- validation errors


def test_missing_input():
    msg = _err({"a": np.zeros((2, 4), np.float32)}, _two_input_model(), ["missing", "'b'", "'a'"])
    assert "calibration" in msg


def test_what_in_message():
    _err({"a": np.zeros((2, 4), np.float32)}, _two_input_model(), ["evaluation", "missing"], what="evaluation")


def test_extra_name():
    _err({"x": np.zeros((2, 784), np.float32), "bogus": np.zeros(2)}, _x_model(), ["'bogus'", "not a model input"])


def test_wrong_rank():
    _err({"x": np.zeros((2, 28, 28), np.float32)}, _x_model(), ["'x'", "rank 3", "rank 2"])


def test_fixed_dim_mismatch():
    _err({"x": np.zeros((2, 783), np.float32)}, _x_model(), ["'x'", "783", "784"])


def test_float_for_int_input():
    _err({"x": np.zeros((2, 5), np.float32)}, _x_model(("N", 5), TensorProto.INT64), ["'x'", "float32", "int64"])


def test_int_for_float_input():
    _err({"x": np.zeros((2, 784), np.int64)}, _x_model(), ["'x'", "int64", "float32"])


def test_int_out_of_range():
    _err({"x": np.full((2, 5), 2**40, np.int64)}, _x_model(("N", 5), TensorProto.INT32), ["'x'", "int32"])


def test_nan_and_inf():
    x = np.zeros((4, 784), np.float32)
    x[0, 0] = np.nan
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    _err({"x": x}, _x_model(), ["'x'", "3 non-finite", "2 NaN", "1 Inf"])
    big = np.zeros((2, 784))
    big[0, 0] = 1e300  # overflows float32
    _err({"x": big}, _x_model(), ["'x'", "Inf"])


def test_zero_samples():
    _err({"x": np.zeros((0, 784), np.float32)}, _x_model(), ["zero samples"])
    _err([], _x_model(), ["zero samples"])


def test_mismatched_sample_counts():
    _err({"a": np.zeros((3, 4), np.float32), "b": np.zeros((4, 4), np.float32)}, _two_input_model(),
         ["'a' has 3", "'b' has 4"])


def test_labels_length():
    _err({"x": np.zeros((3, 784), np.float32), "labels": np.zeros(2)}, _x_model(), ["labels", "2 entries", "3 samples"])


def test_missing_file_and_dir(tmp_path):
    _err(tmp_path / "nope.npz", _x_model(), ["does not exist", "nope.npz"])
    (tmp_path / "empty").mkdir()
    _err(tmp_path / "empty", _x_model(), ["no .npy files"])


def test_unreadable_npz(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"this is not a zip file")
    _err(p, _x_model(), ["cannot read", "bad.npz"])


def test_feed_dicts_inconsistent():
    m = _x_model(("N", "F"))
    _err([{"x": np.zeros((1, 3), np.float32)}, {"y": np.zeros((1, 3), np.float32)}], m, ["feed dict 1", "'y'"])
    _err([{"x": np.zeros((1, 3), np.float32)}, {"x": np.zeros((1, 4), np.float32)}], m, ["'x'", "[3]", "[4]"])
    _err([np.zeros(3)], m, ["not a feed dict"])
    _err(12345, m, ["not supported"])


def test_errors_are_onnxfold_errors():
    with pytest.raises(OnnxFoldError):
        load_calibration({"x": np.zeros((2, 3), np.float32)}, _x_model())


# ---------------------------------------------------------------- batching, subsets, splits


def test_batches_are_views_and_cover_all():
    x = RNG.normal(size=(10, 784)).astype(np.float32)
    cs = load_calibration({"x": x, "labels": np.arange(10)}, _x_model())
    bs = list(cs.batches(3))
    assert [b["x"].shape[0] for b in bs] == [3, 3, 3, 1]
    assert all(np.shares_memory(b["x"], cs.arrays["x"]) for b in bs)
    assert all("labels" not in b for b in bs)
    lb = list(cs.labeled_batches(4))
    assert [l.tolist() for _, l in lb] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UsageError):
        list(cs.batches(0))


def test_subset_and_split():
    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    m = _x_model(("N", 1))
    cs = load_calibration({"x": x, "labels": np.arange(20)}, m)
    sub = cs.subset([3, 1])
    assert sub.arrays["x"].ravel().tolist() == [3, 1] and sub.labels.tolist() == [3, 1]
    mask = np.zeros(20, bool)
    mask[5:8] = True
    assert cs.subset(mask).labels.tolist() == [5, 6, 7]
    parts = cs.split([0.7, 0.3], seed=1)
    assert [p.num_samples for p in parts] == [14, 6]
    allv = np.concatenate([p.labels for p in parts])
    assert sorted(allv.tolist()) == list(range(20))
    again = cs.split([0.7, 0.3], seed=1)
    assert all(np.array_equal(p.labels, q.labels) for p, q in zip(parts, again))
    other = cs.split([0.7, 0.3], seed=2)
    assert not np.array_equal(parts[1].labels, other[1].labels)
    for p in parts:  # labels stay aligned with inputs
        np.testing.assert_array_equal(p.arrays["x"].ravel(), p.labels.astype(np.float32))
    three = cs.split([0.5, 0.25, 0.25], seed=0)
    assert [p.num_samples for p in three] == [10, 5, 5]


def test_split_too_few_samples():
    cs = load_calibration({"x": np.zeros((3, 1), np.float32)}, _x_model(("N", 1)))
    with pytest.raises(CalibrationDataError) as ei:
        cs.split([0.9, 0.1], seed=0)
    assert "3 samples" in str(ei.value) and "at least 6" in str(ei.value)
    with pytest.raises(UsageError):
        cs.split([0.5, 0.6], seed=0)


# ---------------------------------------------------------------- fixed batch


def _fixed_batch_model(k):
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    return _model(
        [("x", TensorProto.FLOAT, [k, 4])],
        nodes=[helper.make_node("MatMul", ["x", "w"], ["out"])],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, [k, 3])],
        initializers=[numpy_helper.from_array(w, "w")],
    ), w


def test_fixed_batch_one_batched_by_one():
    m, w = _fixed_batch_model(1)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    cs = load_calibration({"x": x, "labels": np.arange(5)}, m)
    assert cs.fixed_batch_one and cs.fixed_batch == 1
    assert [b["x"].shape[0] for b in cs.batches(256)] == [1] * 5
    got = list(stream_tensors(m, [], cs, batch_size=256))
    assert len(got) == 5 and [l.tolist() for _, l, _ in got] == [[i] for i in range(5)]
    out = run_model(m, cs, batch_size=64)
    np.testing.assert_allclose(out["out"], x @ w, rtol=1e-5, atol=1e-6)
    # subsets keep the flag
    assert cs.split([0.6, 0.4], seed=0)[0].fixed_batch_one


def test_fixed_batch_k():
    m, _ = _fixed_batch_model(2)
    cs = load_calibration({"x": np.zeros((6, 4), np.float32)}, m)
    assert not cs.fixed_batch_one and [b["x"].shape[0] for b in cs.batches(5)] == [2, 2, 2]
    _err({"x": np.zeros((5, 4), np.float32)}, m, ["fixed to 2", "5 samples"])


def test_stream_rejects_data_onnxruntime_refuses():
    # a dynamic dim the data fixes wrongly for a Reshape inside: onnxruntime raises, we report one line
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    m = _model(
        [("x", TensorProto.FLOAT, ["N", "F"])],
        nodes=[helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Identity", ["r"], ["out"])],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers=[shape],
    )
    cs = load_calibration({"x": np.zeros((3, 3), np.float32)}, m)
    with pytest.raises(CalibrationDataError) as ei:
        list(stream_tensors(m, [], cs))
    assert "Reshape" in str(ei.value) and "\n" not in str(ei.value)


def test_model_proto_untouched():
    m = _x_model()
    before = m.SerializeToString()
    load_calibration({"x": np.zeros((2, 784))}, m)
    assert m.SerializeToString() == before
    assert isinstance(m, onnx.ModelProto)


def test_split_parts_share_the_arrays_and_gather_their_rows_per_batch():
    """Subsets hold row indices, not copies (100k samples are not duplicated by
    the fit/select/final split); batches and labels come out as the rows."""
    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    cs = CalibrationSet({"x": x}, np.arange(40))
    parts = cs.split((0.5, 0.25, 0.25), seed=3)
    seen = []
    for part in parts:
        assert part._arrays["x"] is cs._arrays["x"]  # shared, not copied
        feeds = list(part.labeled_batches(4))
        rows = np.concatenate([f["x"] for f, _ in feeds])
        labels = np.concatenate([lab for _, lab in feeds])
        np.testing.assert_array_equal(rows[:, 0] / 3, labels)  # each label travels with its row
        np.testing.assert_array_equal(part.arrays["x"], rows)
        assert len(rows) == part.num_samples and list(np.sort(labels)) == list(labels)
        seen += list(labels)
    assert sorted(seen) == list(range(40))
    nested = parts[0].subset([1, 0])  # a subset of a subset picks rows of the parent's rows
    np.testing.assert_array_equal(nested.labels, parts[0].labels[[1, 0]])


def test_a_subset_batch_gathers_an_input_only_when_it_is_read():
    """A budget search streams the same split many times, mostly replaying
    recorded tensors: a batch that nobody reads must not copy its rows."""
    from onnxfold.measure.data import Batch, batch_samples

    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    cs = CalibrationSet({"x": x, "y": -x})
    part = cs.subset([7, 1, 3, 8])
    batch = next(part.batches(3))
    assert isinstance(batch, Batch)
    assert batch_samples(batch) == 3 and list(batch) == ["x", "y"] and "y" in batch and len(batch) == 2
    assert batch._got == {}  # counted and named without a copy
    np.testing.assert_array_equal(batch["y"], -x[[7, 1, 3]])
    assert list(batch._got) == ["y"]  # only what was read
    assert batch["y"] is batch["y"]  # gathered once
    assert set(dict(batch)) == {"x", "y"}  # a plain dict for onnxruntime
    # the whole set's batches stay views, counted the same way
    whole = next(cs.batches(4))
    assert isinstance(whole, dict) and batch_samples(whole) == 4 and np.shares_memory(whole["x"], x)
