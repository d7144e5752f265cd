"""Tests for onnxfold.runtime: provider choice, sessions, input specs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import io as fio
from onnxfold.io import write as io_write
from onnxfold import runtime as rt
from onnxfold.errors import ModelLoadError, UnsupportedModelError, UsageError

HAS_GPU_DEVICE = os.path.exists("/dev/nvidia0")


def affine(n_out: int = 3) -> onnx.ModelProto:
    """y = x @ W + b with x[batch, 4] float and an int64 second input k[2] (unused by y)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Identity", ["k"], ["k_out"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, n_out])],  # an initializer listed as input
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out]),
         helper.make_tensor_value_info("k_out", TensorProto.INT64, [None])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def expected(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return x @ w["W"] + w["b"]


X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
K = np.array([5, 7], np.int64)


# ---------------------------------------------------------------- providers


def test_resolve_cpu():
    assert rt.resolve_provider("cpu") == (["CPUExecutionProvider"], None)
    assert rt.resolve_provider("CPU") == (["CPUExecutionProvider"], None)


def test_resolve_unknown_provider():
    with pytest.raises(UsageError, match="auto, cpu, cuda"):
        rt.resolve_provider("gpu")


@pytest.mark.skipif(HAS_GPU_DEVICE, reason="this machine has a GPU")
def test_resolve_auto_without_gpu():
    rt._cuda_probe.cache_clear()
    providers, notice = rt.resolve_provider("auto")
    assert providers == ["CPUExecutionProvider"]
    assert notice.startswith("CUDA not available (") and notice.endswith("); running on CPU")
    assert "\n" not in notice
    assert len(notice) < 300
    assert "[ONNXRuntimeError]" not in notice and "\x1b" not in notice


@pytest.mark.skipif(HAS_GPU_DEVICE, reason="this machine has a GPU")
def test_resolve_cuda_without_gpu_raises():
    with pytest.raises(UsageError, match=r"CUDA execution provider requested but not usable here: .+; use --provider cpu"):
        rt.resolve_provider("cuda")


def test_resolve_auto_is_consistent_with_cuda():
    providers, notice = rt.resolve_provider("auto")
    if providers[0] == "CUDAExecutionProvider":
        assert notice is None
        assert rt.resolve_provider("cuda")[0][0] == "CUDAExecutionProvider"
    else:
        assert providers == ["CPUExecutionProvider"] and notice
        with pytest.raises(UsageError):
            rt.resolve_provider("cuda")


def test_auto_probe_is_silent(capfd):
    rt._cuda_probe.cache_clear()
    rt.resolve_provider("auto")
    out, err = capfd.readouterr()
    assert err == ""
    assert out == ""


def test_probe_result_is_cached(monkeypatch):
    rt._cuda_probe.cache_clear()
    first = rt.resolve_provider("auto")
    calls = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: calls.append(a))
    assert rt.resolve_provider("auto") == first
    assert calls == []
    rt._cuda_probe.cache_clear()


def test_build_without_cuda_provider(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    rt._cuda_probe.cache_clear()
    try:
        providers, notice = rt.resolve_provider("auto")
        assert providers == ["CPUExecutionProvider"]
        assert "no CUDA provider" in notice
        with pytest.raises(UsageError, match="no CUDA provider"):
            rt.resolve_provider("cuda")
    finally:
        rt._cuda_probe.cache_clear()


class FakeSession:
    """Stands in for onnxruntime.InferenceSession in the CUDA probe."""

    providers = ["CPUExecutionProvider"]
    log = b""
    error: Exception | None = None
    factor = 2.0

    def __init__(self, *args, **kwargs):
        os.write(2, self.log)
        if self.error is not None:
            raise self.error

    def get_providers(self):
        return self.providers

    def run(self, names, feed):
        return [feed["x"] * self.factor]


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    rt._cuda_probe.cache_clear()
    yield FakeSession
    rt._cuda_probe.cache_clear()


def test_probe_fallback_reason_from_log(fake_cuda, monkeypatch, capfd):
    monkeypatch.setattr(fake_cuda, "log", b"2026-01-01 00:00:00.1 [E:onnxruntime:Default, cuda_call.cc:1 CudaCall] "
                                          b"CUDA failure 100: no CUDA-capable device is detected\n")  # fmt: skip
    assert rt.resolve_provider("auto") == (
        ["CPUExecutionProvider"],
        "CUDA not available (CUDA failure 100: no CUDA-capable device is detected); running on CPU",
    )
    assert capfd.readouterr().err == ""


def test_probe_reason_from_exception(fake_cuda, monkeypatch, capfd):
    monkeypatch.setattr(fake_cuda, "error", RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA driver too old\nmore"))
    with pytest.raises(UsageError, match=r"not usable here: CUDA driver too old; use --provider cpu$"):
        rt.resolve_provider("cuda")
    assert capfd.readouterr().err == ""


def test_probe_wrong_results_is_not_usable(fake_cuda, monkeypatch):
    monkeypatch.setattr(fake_cuda, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(fake_cuda, "factor", 3.0)
    providers, notice = rt.resolve_provider("auto")
    assert providers == ["CPUExecutionProvider"] and "wrong results" in notice


def test_probe_success_uses_cuda(fake_cuda, monkeypatch):
    monkeypatch.setattr(fake_cuda, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert rt.resolve_provider("auto") == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert rt.resolve_provider("cuda") == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert rt.resolve_provider("cpu") == (["CPUExecutionProvider"], None)


def test_capture_fd2_swallows_c_level_writes(capfd):
    with rt._capture_fd2() as log:
        os.write(2, b"\x1b[1;31mnoise from C++\x1b[m\n")
    os.write(2, b"after\n")
    assert "noise from C++" in log[0]
    assert capfd.readouterr().err == "after\n"


def test_reason_from_ort_log():
    log = (
        "\x1b[1;31m2026-11-21 20:07:25.028991900 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
        "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
        "/venv/lib/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open "
        "shared object file: No such file or directory\n\x1b[m\n"
    )
    assert rt._reason_from_log(log) == (
        "cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13: cannot open shared object file: "
        "No such file or directory"
    )
    other = "2026-01-01 00:00:00.1 [E:onnxruntime:Default, cuda_call.cc:123 CudaCall] CUDA failure 100: no CUDA-capable device is detected\n"
    assert rt._reason_from_log(other) == "CUDA failure 100: no CUDA-capable device is detected"
    assert rt._reason_from_log("") is None


def test_ort_message_cleanup():
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
        "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, "
        "const onnxruntime::logging::Logger&) Unsupported model IR version: 14, max supported IR version: 13\nmore"
    )
    assert rt.ort_message(raw) == "Unsupported model IR version: 14, max supported IR version: 13"
    raw2 = "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/x.onnx failed:This is an invalid model."
    assert rt.ort_message(raw2) == "This is an invalid model."
    assert rt.ort_message("plain message") == "plain message"
    assert len(rt.ort_message("x" * 1000, limit=50)) == 50


# ---------------------------------------------------------------- sessions


def test_create_session_from_model():
    model = affine()
    session = rt.create_session(model, ["CPUExecutionProvider"])
    y, k = session.run(None, {"x": X, "k": K})
    np.testing.assert_allclose(y, expected(model, X), rtol=1e-6)
    np.testing.assert_array_equal(k, K)
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_reusing_sessions_keys_by_content():
    """Within reusing_sessions the same model bytes and options give the same
    session (a copy of the model too); another model, another thread count or
    no active cache give a new one."""
    model, other = affine(), affine(n_out=2)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    cpu = ["CPUExecutionProvider"]
    with rt.reusing_sessions() as cache:
        a = rt.create_session(model, cpu)
        assert rt.create_session(copy, cpu) is a
        assert rt.create_session(other, cpu) is not a
        assert rt.create_session(model, cpu, intra_op_threads=1) is not a
        assert (cache.hits, cache.misses) == (1, 3)
        y_reused = a.run(None, {"x": X, "k": K})[0]
        # a kept session frees its buffers after each run: an idle memory arena per kept session added up
        assert a.get_session_options().enable_cpu_mem_arena is False
    assert rt.create_session(model, cpu) is not a  # no cache outside the block
    assert rt.create_session(model, cpu).get_session_options().enable_cpu_mem_arena is True  # not kept: as before
    np.testing.assert_array_equal(y_reused, rt.create_session(model, cpu).run(None, {"x": X, "k": K})[0])
    np.testing.assert_allclose(rt.create_session(other, cpu).run(None, {"x": X, "k": K})[0],
                               expected(other, X), rtol=1e-6)


def test_session_cache_bounds():
    cache = rt.SessionCache(max_sessions=2, max_bytes=400)
    assert cache.keeps(100) and not cache.keeps(101)
    for key in "abc":
        cache.get_or_build(key, 100, object)
    assert list(cache._sessions) == ["b", "c"]  # least recently used dropped first
    cache.get_or_build("b", 100, object)
    cache.get_or_build("d", 100, object)
    assert list(cache._sessions) == ["b", "d"] and cache.bytes == 200
    cache.clear()
    assert not cache._sessions and cache.bytes == 0


def test_create_session_from_path_with_external_data(tmp_path):
    model = affine(n_out=300)  # W is 4.8 KB: goes to the data file
    path = fio.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert fio.model_has_external_data(path)
    session = rt.create_session(str(path), ["CPUExecutionProvider"], intra_op_threads=1)
    np.testing.assert_allclose(session.run(["y"], {"x": X, "k": K})[0], expected(model, X), rtol=1e-6)


def test_create_session_huge_model_goes_through_scratch_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "SESSION_BYTES_LIMIT", 100)  # pretend the model is huge
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    calls = []
    real_write = io_write.write_external
    monkeypatch.setattr(io_write, "write_external", lambda *a, **k: calls.append(a[1]) or real_write(*a, **k))
    model = affine(n_out=300)
    before = model.SerializeToString()
    session = rt.create_session(model, ["CPUExecutionProvider"], scratch_dir=scratch)
    assert len(calls) == 1 and calls[0].parent.parent == scratch
    assert os.listdir(scratch) == []  # cleaned up
    assert model.SerializeToString() == before
    np.testing.assert_allclose(session.run(["y"], {"x": X, "k": K})[0], expected(model, X), rtol=1e-6)


def test_create_session_failure_is_model_load_error():
    model = affine()
    model.graph.node[0].op_type = "NoSuchOp"
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelLoadError, match="onnxruntime cannot create a session") as info:
        rt.create_session(model, ["CPUExecutionProvider"])
    assert "NoSuchOp" in str(info.value) and "[ONNXRuntimeError]" not in str(info.value)


def test_create_session_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        rt.create_session(tmp_path / "nope.onnx", ["CPUExecutionProvider"])


def test_create_session_bad_thread_count():
    with pytest.raises(UsageError):
        rt.create_session(affine(), ["CPUExecutionProvider"], intra_op_threads=-1)


# ---------------------------------------------------------------- input specs


def test_input_specs_from_model_and_session():
    model = affine()
    from_model = rt.input_specs(model)
    assert from_model == [
        ("x", ["batch", 4], np.dtype(np.float32)),
        ("k", [None], np.dtype(np.int64)),
    ]
    session = rt.create_session(model, ["CPUExecutionProvider"])
    from_session = rt.input_specs(session)
    assert from_session == from_model


def test_input_specs_unknown_rank_and_non_tensor():
    model = affine()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    assert rt.input_specs(model)[0] == ("x", None, np.dtype(np.float32))
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model.graph.input.append(seq)
    with pytest.raises(UnsupportedModelError, match="'s'.*tensor inputs only"):
        rt.input_specs(model)
