"""Tests for onnxfold.io: loading, atomic saving, version clamping, sizes."""

from __future__ import annotations

import os
import tempfile

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import io as fio
from onnxfold.io import checks as io_checks, sizes as io_sizes, versions as io_versions, wire as io_wire, write as io_write
from onnxfold.errors import ModelLoadError, ModelSaveError, UnsupportedModelError

RNG = np.random.default_rng(0)


def mlp(hidden: int = 8, *, ir: int = 8, opset: int = 17, small_first: bool = False) -> onnx.ModelProto:
    """x[N,4] -> MatMul W1[4,h] -> Add b1 -> Relu -> MatMul W2[h,3] -> y."""
    w1 = RNG.standard_normal((4, hidden)).astype(np.float32)
    b1 = RNG.standard_normal(hidden).astype(np.float32)
    w2 = RNG.standard_normal((hidden, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "W2")]  # fmt: skip
    if small_first:  # a small tensor before the big ones: exercises data-file alignment
        inits.insert(0, numpy_helper.from_array(np.ones(300, np.float32), "pad"))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def run(model_or_path, x: np.ndarray) -> np.ndarray:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_only(directory, names: set[str]) -> None:
    assert set(os.listdir(directory)) == names


X = RNG.standard_normal((5, 4)).astype(np.float32)


# ---------------------------------------------------------------- round trips


def test_round_trip_small(tmp_path):
    model = mlp()
    before = model.SerializeToString()
    out = fio.save_model(model, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx"
    assert model.SerializeToString() == before  # caller's model untouched
    assert_only(tmp_path, {"m.onnx"})
    assert not fio.model_has_external_data(out)
    loaded = fio.load_model(out)
    assert loaded.ir_version == 8
    assert [(o.domain, o.version) for o in loaded.opset_import] == [("", 17)]
    for name, arr in weights(model).items():
        np.testing.assert_array_equal(weights(loaded)[name], arr)
    np.testing.assert_allclose(run(loaded, X), run(model, X), rtol=1e-6)


def test_external_data_round_trip(tmp_path):
    model = mlp(hidden=128, small_first=True)  # W1 2 KiB, W2 1.5 KiB, b1 512 B (stays inline)
    before = model.SerializeToString()
    out = fio.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before  # weights were not moved out of the caller's model
    assert_only(tmp_path, {"m.onnx", "m.onnx.data"})
    assert fio.model_has_external_data(out)
    stored = onnx.load(str(out), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data}
                for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL}  # fmt: skip
    assert set(external) == {"pad", "W1", "W2"}  # b1 (512 B) is under the 1 KiB threshold
    assert {e["location"] for e in external.values()} == {"m.onnx.data"}  # the final name, not a temp name
    assert os.path.getsize(out) < 1024 < os.path.getsize(tmp_path / "m.onnx.data")

    loaded = fio.load_model(out)
    assert not fio.model_has_external_data(loaded)
    for name, arr in weights(model).items():
        np.testing.assert_array_equal(weights(loaded)[name], arr)
    np.testing.assert_allclose(run(out, X), run(model, X), rtol=1e-6)


def test_deferred_external_data_stays_on_disk_and_saves_both_ways(tmp_path):
    """load_model(defer_external=True) holds stubs, not weights; every writer
    turns them back into data: external (copied from the source file in
    chunks), single file, and the scratch copy a session is built from."""
    from onnxfold.runtime import create_session
    from onnxfold.tensors import has_deferred, is_deferred, load_deferred, tensor_array

    model = mlp(hidden=128, small_first=True)
    src = fio.save_model(model, tmp_path / "src.onnx", external_data=True)
    lazy = fio.load_model(src, defer_external=True)
    deferred = {t.name for t in lazy.graph.initializer if is_deferred(t)}
    assert deferred == {"pad", "W1", "W2"} and has_deferred(lazy)
    assert all(not t.HasField("raw_data") for t in lazy.graph.initializer if t.name in deferred)
    for name, arr in weights(model).items():  # read on demand, same values
        t = next(t for t in lazy.graph.initializer if t.name == name)
        np.testing.assert_array_equal(tensor_array(t), arr)
    (tmp_path / "ext").mkdir()
    ext = fio.save_model(lazy, tmp_path / "ext" / "m.onnx", external_data=True)
    single = fio.save_model(lazy, tmp_path / "one.onnx", external_data=False)
    assert not fio.model_has_external_data(single)
    for path in (ext, single):
        np.testing.assert_allclose(run(path, X), run(model, X), rtol=1e-6)
        assert "basepath" not in path.read_bytes().decode("latin-1")  # the onnxfold-only key never leaks
    got = create_session(lazy, ["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_allclose(got, run(model, X), rtol=1e-6)
    assert {t.name for t in lazy.graph.initializer if is_deferred(t)} == deferred  # saving never loads them in
    full = load_deferred(lazy)
    assert not has_deferred(full)
    np.testing.assert_allclose(run(full, X), run(model, X), rtol=1e-6)


def test_optimizing_a_model_with_external_data_matches_the_inline_model(tmp_path):
    """The CLI/API path keeps external weights on disk until read: the result
    must be exactly what the same model held in memory gives."""
    import onnxfold

    model = mlp(hidden=64)
    inline = fio.save_model(model, tmp_path / "inline.onnx", external_data=False)
    (tmp_path / "ext").mkdir()
    ext = fio.save_model(model, tmp_path / "ext" / "m.onnx", external_data=True)
    a = onnxfold.optimize(inline, fold_ratio=0.5)
    b = onnxfold.optimize(ext, fold_ratio=0.5)
    assert a.changed and b.changed
    out = fio.save_model(b.model, tmp_path / "out.onnx", external_data=True)
    np.testing.assert_array_equal(run(out, X), run(a.model, X))
    assert b.report["after"]["parameters"] == a.report["after"]["parameters"]


def test_large_tensors_are_aligned_in_data_file(tmp_path):
    model = mlp(small_first=True)
    model.graph.initializer.append(numpy_helper.from_array(np.arange(20000, dtype=np.float32), "big"))
    out = fio.save_model(model, tmp_path / "m.onnx", external_data=True)
    stored = onnx.load(str(out), load_external_data=False)
    info = {t.name: {e.key: e.value for e in t.external_data} for t in stored.graph.initializer}
    assert int(info["pad"]["offset"]) == 0
    assert int(info["big"]["offset"]) % 65536 == 0 and int(info["big"]["offset"]) > 0
    np.testing.assert_array_equal(weights(fio.load_model(out))["big"], np.arange(20000, dtype=np.float32))


def test_typed_field_tensor_goes_external(tmp_path):
    model = mlp()
    vals = np.linspace(-1, 1, 600, dtype=np.float32)
    t = helper.make_tensor("typed", TensorProto.FLOAT, [600], vals.tolist())  # float_data, not raw_data
    assert not t.HasField("raw_data")
    model.graph.initializer.append(t)
    out = fio.save_model(model, tmp_path / "m.onnx", external_data=True)
    stored = onnx.load(str(out), load_external_data=False)
    assert [x.data_location for x in stored.graph.initializer if x.name == "typed"] == [TensorProto.EXTERNAL]
    np.testing.assert_array_equal(weights(fio.load_model(out))["typed"], vals)


def test_automatic_external_data_above_threshold(tmp_path, monkeypatch):
    model = mlp(hidden=128)
    fio.save_model(model, tmp_path / "small.onnx")
    assert_only(tmp_path, {"small.onnx"})
    monkeypatch.setattr(io_sizes, "EXTERNAL_THRESHOLD", 1000)  # pretend 1000 bytes is "over 2 GB"
    out = fio.save_model(model, tmp_path / "big.onnx")
    assert fio.model_has_external_data(out)
    assert (tmp_path / "big.onnx.data").is_file()
    with pytest.raises(ModelSaveError, match="2 GB"):
        fio.save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx").exists()


def test_resave_over_existing_output(tmp_path):
    out = tmp_path / "m.onnx"
    fio.save_model(mlp(), out, external_data=True)
    model2 = mlp()
    fio.save_model(model2, out, external_data=True)
    assert_only(tmp_path, {"m.onnx", "m.onnx.data"})
    np.testing.assert_array_equal(weights(fio.load_model(out))["W1"], weights(model2)["W1"])


# ---------------------------------------------------------------- versions


def test_runtime_limits_are_real():
    max_ir, max_opset = fio.runtime_limits()
    assert 7 <= max_ir and 13 <= max_opset
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ort.InferenceSession(io_versions.identity_model(max_ir, max_opset).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])  # fmt: skip
    with pytest.raises(Exception):
        ort.InferenceSession(io_versions.identity_model(max_ir + 1, 13).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])  # fmt: skip
    with pytest.raises(Exception):
        ort.InferenceSession(io_versions.identity_model(max_ir, max_opset + 1).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])  # fmt: skip
    assert fio.runtime_limits() == (max_ir, max_opset)


def test_ir_version_is_clamped_on_save(tmp_path):
    max_ir, _ = fio.runtime_limits()
    model = mlp(ir=onnx.IR_VERSION)
    if onnx.IR_VERSION > max_ir:  # this onnxruntime rejects the newest IR as is
        with pytest.raises(Exception):
            run(model, X)
    out = fio.save_model(model, tmp_path / "m.onnx")
    assert model.ir_version == onnx.IR_VERSION  # caller's model untouched
    saved = onnx.load(str(out))
    assert saved.ir_version == min(onnx.IR_VERSION, max_ir)
    np.testing.assert_allclose(run(out, X), run(mlp_with_weights(model, ir=8), X), rtol=1e-6)


def mlp_with_weights(model: onnx.ModelProto, ir: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = ir
    return copy


def test_ir_version_never_raised(tmp_path):
    out = fio.save_model(mlp(ir=7, opset=13), tmp_path / "m.onnx")
    assert onnx.load(str(out)).ir_version == 7
    model = mlp(ir=7)
    assert fio.clamp_versions(model).ir_version == 7


def test_clamp_versions_lowers_in_place():
    model = mlp(ir=fio.runtime_limits()[0] + 1)
    assert fio.clamp_versions(model) is model
    assert model.ir_version == fio.runtime_limits()[0]


def test_opset_newer_than_runtime_is_rejected(tmp_path):
    model = mlp(opset=fio.runtime_limits()[1] + 1)
    with pytest.raises(UnsupportedModelError, match=r"opset .* onnxruntime supports at most"):
        fio.clamp_versions(model)
    with pytest.raises(UnsupportedModelError):
        fio.save_model(model, tmp_path / "m.onnx")
    assert_only(tmp_path, set())


# ---------------------------------------------------------------- input untouched


def test_input_files_untouched(tmp_path):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = fio.save_model(mlp(hidden=128), src_dir / "m.onnx", external_data=True)
    files = [src, src_dir / "m.onnx.data"]
    past = 1_000_000_000
    for f in files:
        os.utime(f, ns=(past, past))
    snapshot = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    model = fio.load_model(src)
    fio.save_model(model, out_dir / "m.fold.onnx")
    fio.save_model(model, out_dir / "m2.onnx", external_data=True)
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == snapshot
    assert_only(src_dir, {"m.onnx", "m.onnx.data"})


# ---------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    return fio.save_model(mlp(), tmp_path / "m.onnx")


def test_load_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        fio.load_model(tmp_path / "nope.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        fio.load_model(tmp_path)


def test_load_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        fio.load_model(tmp_path / "e.onnx")


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9, 0.99])
def test_load_truncated_model(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"not (a valid ONNX|an ONNX)|checker"):
        fio.load_model(saved)


def test_load_corrupt_bytes(tmp_path):
    p = tmp_path / "c.onnx"
    p.write_bytes(bytes([0xFF] * 64) + RNG.integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        fio.load_model(p)


def test_load_text_file(tmp_path):
    p = tmp_path / "t.onnx"
    p.write_text("this is not a model\njust some text\n")
    with pytest.raises(ModelLoadError, match="text file"):
        fio.load_model(p)


def test_load_npz_file(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, a=np.arange(10))
    with pytest.raises(ModelLoadError, match="zip archive"):
        fio.load_model(p)


def test_load_missing_external_file(tmp_path):
    out = fio.save_model(mlp(hidden=128), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"external data file 'm.onnx.data' .* is missing"):
        fio.load_model(out)


def test_load_truncated_external_file(tmp_path):
    out = fio.save_model(mlp(hidden=128), tmp_path / "m.onnx", external_data=True)
    data_file = tmp_path / "m.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"'m.onnx.data' .* is truncated"):
        fio.load_model(out)


def test_load_checker_failure(tmp_path):
    model = mlp()
    model.graph.node[1].input[0] = "undefined_tensor"  # uses a tensor nothing produces
    p = tmp_path / "bad.onnx"
    p.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="checker"):
        fio.load_model(p)


def test_load_error_is_one_line(tmp_path):
    model = mlp()
    model.graph.node[1].input[0] = "undefined_tensor"
    p = tmp_path / "bad.onnx"
    p.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        fio.load_model(p)
    assert "\n" not in str(info.value)
    assert str(p) in str(info.value)


# ---------------------------------------------------------------- save errors


def test_save_into_missing_dir(tmp_path):
    with pytest.raises(ModelSaveError, match="does not exist"):
        fio.save_model(mlp(), tmp_path / "missing" / "m.onnx")
    assert_only(tmp_path, set())


def test_save_parent_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ModelSaveError, match="not a directory"):
        fio.save_model(mlp(), tmp_path / "afile" / "m.onnx")
    assert_only(tmp_path, {"afile"})


def test_save_to_directory_path(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelSaveError, match="is a directory"):
        fio.save_model(mlp(), tmp_path / "d")


def test_save_into_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        with pytest.raises(ModelSaveError, match="not writable"):
            fio.save_model(mlp(), ro / "m.onnx")
        assert_only(ro, set())
    finally:
        ro.chmod(0o755)


def test_save_when_temp_dir_cannot_be_created(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ModelSaveError, match="Permission denied"):
        fio.save_model(mlp(), tmp_path / "m.onnx")
    assert_only(tmp_path, set())


def test_save_write_failure_cleans_up(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_write.os, "fsync", full)
    (tmp_path / "m.onnx").write_bytes(b"previous output")
    with pytest.raises(ModelSaveError, match="No space left"):
        fio.save_model(mlp(hidden=128), tmp_path / "m.onnx", external_data=True)
    assert_only(tmp_path, {"m.onnx"})
    assert (tmp_path / "m.onnx").read_bytes() == b"previous output"  # old output survives


def custom_op_model() -> onnx.ModelProto:
    """Passes the ONNX checker (unknown domains are not checked) but onnxruntime rejects it."""
    model = mlp(hidden=128)
    model.graph.node[2].op_type = "NoSuchOp"
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("external", [False, True])
def test_save_fails_runtime_check_leaves_nothing(tmp_path, external):
    (tmp_path / "m.onnx").write_bytes(b"previous output")
    with pytest.raises(ModelSaveError, match="onnxruntime cannot load") as info:
        fio.save_model(custom_op_model(), tmp_path / "m.onnx", external_data=external)
    assert "NoSuchOp" in str(info.value)
    assert "[ONNXRuntimeError]" not in str(info.value)
    assert_only(tmp_path, {"m.onnx"})
    assert (tmp_path / "m.onnx").read_bytes() == b"previous output"


def test_save_fails_runtime_check_no_output(tmp_path):
    with pytest.raises(ModelSaveError):
        fio.save_model(custom_op_model(), tmp_path / "new.onnx", external_data=True)
    assert_only(tmp_path, set())


def test_save_fails_checker_leaves_nothing(tmp_path):
    model = mlp()
    model.graph.node[2].op_type = "NoSuchOp"  # default domain: the checker rejects it
    with pytest.raises(ModelSaveError, match="checker"):
        fio.save_model(model, tmp_path / "m.onnx")
    assert_only(tmp_path, set())


def test_save_without_check_writes_anyway(tmp_path):
    out = fio.save_model(custom_op_model(), tmp_path / "m.onnx", check=False)
    assert onnx.load(str(out)).graph.node[2].op_type == "NoSuchOp"
    assert_only(tmp_path, {"m.onnx"})


def test_save_rejects_unloaded_external_refs(tmp_path):
    src = fio.save_model(mlp(hidden=128), tmp_path / "m.onnx", external_data=True)
    lazy = onnx.load(str(src), load_external_data=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelSaveError, match="load_model"):
        fio.save_model(lazy, tmp_path / "out" / "x.onnx")
    assert_only(tmp_path / "out", set())


# ---------------------------------------------------------------- small helpers


def test_default_output_path(tmp_path):
    assert fio.default_output_path("/a/b/model.onnx") == Path("/a/b/model.fold.onnx")
    assert fio.default_output_path("model") == Path("model.fold.onnx")
    assert fio.default_output_path("x/m.v2.ONNX") == Path("x/m.v2.fold.onnx")


def test_count_parameters():
    model = mlp(hidden=8)  # 4*8 + 8 + 8*3 = 64 float parameters
    assert fio.count_parameters(model) == 64
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 5), np.float16), "half"))
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((3, 3), np.float32)))
    model.graph.node.insert(0, const)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["s"], value_float=1.0))
    assert fio.count_parameters(model) == 64 + 10 + 9 + 1


def test_model_bytes():
    model = mlp(hidden=128)
    assert fio.model_bytes(model) == model.ByteSize()
    big = mlp(hidden=4096)
    estimate = io_sizes.estimate_serialized_size(big)
    assert abs(estimate - big.ByteSize()) < 0.01 * big.ByteSize()
    assert estimate >= 4 * (4 * 4096 + 4096 + 4096 * 3)


def test_model_bytes_counts_external_tensors(tmp_path):
    model = mlp(hidden=128)
    out = fio.save_model(model, tmp_path / "m.onnx", external_data=True)
    lazy = onnx.load(str(out), load_external_data=False)
    assert abs(fio.model_bytes(lazy) - model.ByteSize()) < 0.05 * model.ByteSize()


# ---------------------------------------------------------------- streaming I/O of big models


def rich_model() -> onnx.ModelProto:
    """Every kind of field the streaming writer/reader must carry through."""
    model = mlp(hidden=64, small_first=True)
    model.producer_name, model.producer_version, model.doc_string = "test", "1.0", "doc"
    model.metadata_props.add(key="k", value="v")
    g = model.graph
    g.doc_string = "graph doc"
    g.value_info.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["N", 64]))
    g.initializer.append(helper.make_tensor("typed", TensorProto.FLOAT, [300], np.arange(300.0).tolist()))
    g.initializer.append(helper.make_tensor("names", TensorProto.STRING, [2], [b"a", b"b"]))
    g.initializer.append(numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3), "ints"))
    g.initializer.append(numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty"))
    const = numpy_helper.from_array(RNG.standard_normal((40, 40)).astype(np.float32))
    g.node.insert(0, helper.make_node("Constant", [], ["c"], value=const, name="const"))
    then_g = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [40, 40])])  # fmt: skip
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [40, 40])])  # fmt: skip
    g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    g.node.append(helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g))
    g.output.append(helper.make_tensor_value_info("branch", TensorProto.FLOAT, [40, 40]))
    onnx.checker.check_model(model)
    return model


def test_write_inline_is_byte_identical(tmp_path):
    model = rich_model()
    n = fio.write_inline(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert n == model.ByteSize()
    fio.write_inline(model, tmp_path / "m9.onnx", ir_version=7)
    expected = mlp_with_weights(model, ir=7).SerializeToString()
    assert (tmp_path / "m9.onnx").read_bytes() == expected


def test_write_inline_rejects_corrupt_tensor(tmp_path):
    model = mlp()
    model.graph.initializer[0].raw_data = b"\0" * 12  # W1 is 4x8 float: needs 128 bytes
    with pytest.raises(ModelSaveError, match="corrupt tensor"):
        fio.save_model(model, tmp_path / "m.onnx")
    assert_only(tmp_path, set())


def test_chunked_parse_equals_plain_parse(tmp_path, monkeypatch):
    model = rich_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    monkeypatch.setattr(io_wire, "MERGE_CHUNK", 700)  # force many chunks
    with open(path, "rb") as f:
        parsed = io_wire.parse_in_chunks(f, path.stat().st_size)
    assert parsed.SerializeToString() == model.SerializeToString()


def test_chunked_parse_skips_big_fields(tmp_path):
    model = rich_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with open(path, "rb") as f:
        parsed = io_wire.parse_in_chunks(f, path.stat().st_size, skip_fields_over=1000)
    # over 1000 bytes: pad (1200 B), W1 (1 KiB), typed (1200 B) and the 40x40 Constant node
    assert {t.name for t in parsed.graph.initializer} == {"b1", "W2", "names", "ints", "empty", "cond"}
    assert [n.op_type for n in parsed.graph.node] == [n.op_type for n in model.graph.node][1:]
    assert [n.op_type for n in model.graph.node][0] == "Constant"
    assert parsed.graph.output == model.graph.output and parsed.opset_import == model.opset_import


@pytest.fixture
def big_mode(monkeypatch):
    """Treat every file and model as 'big': chunked parsing, checks on the sparse twin."""
    monkeypatch.setattr(io_sizes, "DIRECT_LIMIT", 0)
    monkeypatch.setattr(io_wire, "MERGE_CHUNK", 4096)
    monkeypatch.setattr(io_sizes, "ALIGN_MIN_BYTES", 1024)  # twin externalizes tensors >= 1 KiB
    twins: list[str] = []
    real = io_checks.check_twin
    monkeypatch.setattr(io_checks, "check_twin", lambda model, d, what, *a, **k: twins.append(what) or real(model, d, what, *a, **k))
    return twins


def test_big_mode_round_trip(tmp_path, big_mode):
    model = rich_model()
    out = fio.save_model(model, tmp_path / "m.onnx")
    assert_only(tmp_path, {"m.onnx"})
    assert out.read_bytes() == model.SerializeToString()
    loaded = fio.load_model(out)
    assert big_mode == ["the saved model", f"model {out}"]  # both checks went through the twin
    assert loaded.SerializeToString() == model.SerializeToString()
    assert not fio.model_has_external_data(out)
    ext = fio.save_model(model, tmp_path / "e.onnx", external_data=True)
    assert fio.model_has_external_data(ext)
    assert fio.load_model(ext).graph.initializer[1].raw_data == model.graph.initializer[1].raw_data


def test_big_mode_save_checks_still_fail(tmp_path, big_mode):
    with pytest.raises(ModelSaveError, match="onnxruntime cannot load.*NoSuchOp"):
        fio.save_model(custom_op_model(), tmp_path / "m.onnx")
    model = mlp(hidden=128)
    model.graph.node[2].op_type = "NoSuchOp"
    with pytest.raises(ModelSaveError, match="checker"):
        fio.save_model(model, tmp_path / "m.onnx")
    assert_only(tmp_path, set())
    assert len(big_mode) == 2


def test_big_mode_load_errors(tmp_path, big_mode):
    model = mlp(hidden=128)
    model.graph.node[1].input[0] = "undefined_tensor"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="checker.*undefined_tensor"):
        fio.load_model(bad)
    good = mlp(hidden=128).SerializeToString()
    for keep in (0.3, 0.7, 0.999):
        bad.write_bytes(good[: int(len(good) * keep)])
        with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
            fio.load_model(bad)
    np.savez(tmp_path / "w.npz", a=np.arange(10))
    with pytest.raises(ModelLoadError, match="zip archive"):
        fio.load_model(tmp_path / "w.npz")
    assert_only(tmp_path, {"bad.onnx", "w.npz"})


def test_sparse_twin_takes_no_data(tmp_path):
    model = mlp(hidden=4096)  # W1, W2: 64 KiB and 48 KiB
    fio.write_external(model, tmp_path / "t.onnx", "t.data", sparse=True)
    twin = onnx.load(str(tmp_path / "t.onnx"), load_external_data=False)
    external = [t.name for t in twin.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external == ["W1"]  # only tensors >= 64 KiB; b1 and W2 stay real
    assert (tmp_path / "t.data").stat().st_size == 4 * 4 * 4096
    onnx.checker.check_model(str(tmp_path / "t.onnx"))
    np.testing.assert_array_equal(weights(fio.load_model(tmp_path / "t.onnx"))["W1"], 0)
