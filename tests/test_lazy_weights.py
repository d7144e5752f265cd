"""Lazy weights: the finders read shapes, never weight data; ops read their
weight on first use and drop it again on ``release()``.

Models are built inline with onnx.helper (ir_version 8, opset 17) and saved
with external data, then loaded with ``defer_external=True`` so that every
initializer stays on disk. Reads are counted where the index reads a tensor
(``GraphIndex`` calls ``tensor_array``); expected weights come from numpy on
the initializers written here, fold results from onnxruntime."""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx
import pytest
from helpers import attention_graph, build_bn_mlp, make_model, ort_run, tensor_info
from onnx import helper, numpy_helper

import onnxfold.find.graph_index as graph_index
from onnxfold.find import find_dense_graph
from onnxfold.find.attention import find_transformer
from onnxfold.find.conv import find_conv_graph
from onnxfold.io import load_model
from onnxfold.passes.base import PassContext
from onnxfold.passes.channel_folding import ChannelFoldingPass
from onnxfold.passes.folding import FoldingPass
from onnxfold.passes.head_folding import GatedFoldingPass, HeadFoldingPass
from onnxfold.tensors import is_deferred, load_deferred

H = W = 7
HID, HEADS, HEAD_DIM, INNER = 8, 2, 4, 6


def _init(inits, name, arr):
    inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
    return name


def _conv_model(seed=0):
    """stem Conv(3→6)-Relu = s; c1 Conv(6→8)+BN → Relu → c2 Conv(8→6) = r;
    Relu(r + s) → GlobalAveragePool → Flatten → Gemm(6→4) = y. Channels 4-7 of
    c1 copy channels 0-3 (kernel, bias and BN statistics), so folding c1's
    chain to 4 channels is lossless."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    src = np.r_[np.arange(4), np.arange(4)]

    def conv(name, inp, w, b, **attrs):
        nodes.append(helper.make_node("Conv", [inp, _init(inits, f"{name}.W", w), _init(inits, f"{name}.B", b)],
                                      [f"{name}.out"], name=name, pads=[1, 1, 1, 1], kernel_shape=[3, 3], **attrs))
        return f"{name}.out"

    def op(kind, name, *ins, **attrs):
        nodes.append(helper.make_node(kind, list(ins), [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    s = op("Relu", "stem_relu", conv("stem", "x", rng.standard_normal((6, 3, 3, 3)), rng.normal(0, .3, 6)))
    c1 = conv("c1", s, rng.standard_normal((4, 6, 3, 3))[src], rng.normal(0, .3, 4)[src])
    bn = [rng.uniform(.5, 2, 4)[src], rng.normal(0, .5, 4)[src], rng.normal(0, .5, 4)[src], rng.uniform(.3, 2, 4)[src]]
    nodes.append(helper.make_node("BatchNormalization", [c1] + [_init(inits, f"bn.{i}", v) for i, v in enumerate(bn)],
                                  ["bn.out"], name="bn", epsilon=1e-3))
    r = conv("c2", op("Relu", "c1_relu", "bn.out"), rng.standard_normal((6, 8, 3, 3)) * .3, rng.normal(0, .3, 6))
    f = op("Flatten", "flat", op("GlobalAveragePool", "gap", op("Relu", "post", op("Add", "join", r, s))), axis=1)
    nodes.append(helper.make_node("Gemm", [f, _init(inits, "fc.W", rng.standard_normal((4, 6))),
                                           _init(inits, "fc.b", rng.normal(0, .3, 4))], ["y"], name="fc", transB=1))
    model = make_model(nodes, [tensor_info("x", np.float32, ["N", 3, H, W])], [tensor_info("y", np.float32, ["N", 4])],
                       inits)
    return model, bn


def _transformer_model(seed=3):
    """One attention block (2 heads; head 1 copies head 0) with constant
    Reshape shapes, then a residual gated MLP down(silu(gate(a)) * up(a))."""
    rng = np.random.default_rng(seed)
    d = HEAD_DIM
    w = {n: rng.standard_normal((HID, HID)).astype(np.float32) * .3 for n in "qkvo"}
    b = {n: rng.standard_normal(HID).astype(np.float32) * .1 for n in "qkvo"}
    for n in "qkv":
        w[n][:, d:] = w[n][:, :d]
        b[n][d:] = b[n][:d]
    w["o"][d:] = w["o"][:d]
    nodes, inits = attention_graph(w, b, HEADS, d, out="a")
    for n, shape in (("gate", (HID, INNER)), ("up", (HID, INNER)), ("down", (INNER, HID))):
        _init(inits, f"W{n}", rng.standard_normal(shape) * .3)
    nodes += [helper.make_node("MatMul", ["a", "Wgate"], ["g"], name="gate"),
              helper.make_node("Sigmoid", ["g"], ["gs"], name="gate_sig"),
              helper.make_node("Mul", ["g", "gs"], ["ga"], name="gate_silu"),
              helper.make_node("MatMul", ["a", "Wup"], ["u"], name="up"),
              helper.make_node("Mul", ["ga", "u"], ["gu"], name="glu"),
              helper.make_node("MatMul", ["gu", "Wdown"], ["dn"], name="down"),
              helper.make_node("Add", ["a", "dn"], ["y"], name="resid")]
    return make_model(nodes, [tensor_info("x", np.float32, ["B", "S", HID])],
                      [tensor_info("y", np.float32, ["B", "S", HID])], inits)


def _deferred(model, tmp_path, name):
    """``model`` saved with every initializer in an external file, loaded back
    with the data left on disk."""
    path = tmp_path / f"{name}.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the data of the model it is given out to the file
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.bin", size_threshold=0)
    lazy = load_model(path, defer_external=True)
    assert all(is_deferred(t) for t in lazy.graph.initializer)
    return lazy


def _weight_names(model):
    return {t.name for t in model.graph.initializer if len(t.dims) >= 2}


class _Reads:
    """Names of the tensors the graph index reads, while active."""

    def __init__(self):
        self.names: list[str] = []
        real = graph_index.tensor_array

        def counted(t):
            self.names.append(t.name)
            return real(t)

        self.patch = mock.patch.object(graph_index, "tensor_array", counted)

    def __enter__(self):
        self.patch.__enter__()
        return self

    def __exit__(self, *exc):
        self.patch.__exit__(*exc)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------ finders


@pytest.mark.parametrize("kind", ["conv", "dense", "transformer"])
def test_finders_read_no_weight_data(kind, tmp_path):
    model = {"conv": lambda: _conv_model()[0], "dense": lambda: build_bn_mlp()[0],
             "transformer": _transformer_model}[kind]()
    lazy = _deferred(model, tmp_path, kind)
    with _Reads() as reads:
        if kind == "conv":
            view = find_conv_graph(lazy)
            ops = [*view.ops.values(), *view.gemms.values()]
            assert view.chains and view.residual[0].foldable and view.gemms
        elif kind == "dense":
            ops = list(find_dense_graph(lazy).ops.values())
        else:
            view = find_transformer(lazy)
            assert len(view.attention) == 1 and len(view.gated) == 1
            ops = [p for g in [*view.attention, *view.gated] for p in g.projections]
    assert ops and not any(op.weight_loaded for op in ops)
    assert not set(reads.names) & _weight_names(model), reads.names
    # sizes come from the shapes alone
    assert sum(op.num_params for op in ops) > 0


def test_conv_finder_on_a_model_without_conv_does_not_index_it():
    model = build_bn_mlp()[0]
    with mock.patch("onnxfold.find.conv.GraphIndex", side_effect=AssertionError("indexed")):
        view = find_conv_graph(model)
    assert not view.ops and not view.chains and not view.residual and not view.skipped


# ------------------------------------------------------------------ ops


def test_conv_weights_load_on_first_use_and_reload_identically_after_release(tmp_path):
    model, (gamma, beta, mean, var) = _conv_model()
    view = find_conv_graph(_deferred(model, tmp_path, "conv"))
    inits = _inits(model)
    c1, c2, fc = view.ops["c1"], view.ops["c2"], view.gemms["fc"]
    with _Reads() as reads:
        w1 = c1.weight.copy()
    assert reads.names == ["c1.W"] and c1.weight_loaded and not c2.weight_loaded
    s = gamma / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(w1, inits["c1.W"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(c1.bias, (inits["c1.B"] - mean) * s + beta, rtol=1e-6)
    assert w1.dtype == np.float32
    np.testing.assert_array_equal(fc.weight, inits["fc.W"])  # transB=1: W is out × n as stored
    for op in (c1, fc):
        first = op.weight.copy()
        op.release()
        assert not op.weight_loaded
        np.testing.assert_array_equal(op.weight, first)


def test_edited_weights_are_kept_and_release_except_keeps_the_group(tmp_path):
    model, _ = _conv_model()
    view = find_conv_graph(_deferred(model, tmp_path, "conv"))
    chain = view.chains[0]
    for op in [*view.ops.values(), *view.gemms.values()]:
        op.weight  # noqa: B018 - load every weight
    view.release_except(chain)
    assert [op.weight_loaded for op in chain.ops] == [True, True]
    assert not view.ops["stem"].weight_loaded and not view.gemms["fc"].weight_loaded
    stem = view.ops["stem"]
    stem.weight = np.zeros(stem.weight_shape)
    stem.changed = True
    view.release_except(None)
    assert stem.weight_loaded and not np.any(stem.weight)
    assert not any(op.weight_loaded for op in chain.ops)


def test_projections_load_lazily_and_release(tmp_path):
    model = _transformer_model()
    view = find_transformer(_deferred(model, tmp_path, "tf"))
    inits = _inits(model)
    block, glu = view.attention[0], view.gated[0]
    np.testing.assert_array_equal(block.q.weight, inits["Wq"].T)  # W = Bᵀ: out × in
    np.testing.assert_array_equal(glu.down.weight, inits["Wdown"].T)
    view.release_except(block)
    assert block.q.weight_loaded and not glu.down.weight_loaded
    first = block.q.weight.copy()
    view.release_except(None)
    assert not block.q.weight_loaded
    np.testing.assert_array_equal(block.q.weight, first)


def test_dense_bn_fold_is_applied_when_the_weight_is_read(tmp_path):
    model, w_fold, b_fold, _, _ = build_bn_mlp()
    view = find_dense_graph(_deferred(model, tmp_path, "bn"))
    op = view.ops["fc0"]
    assert op.changed and not op.weight_loaded  # the BN node goes when written back; its weight is not read yet
    np.testing.assert_allclose(op.weight, w_fold, rtol=1e-6)
    np.testing.assert_allclose(op.bias, b_fold, rtol=1e-6)


# ------------------------------------------------------------------ passes on deferred weights


def _ort(model, feed):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return ort_run(load_deferred(m), feed)[0]


def test_channel_fold_of_a_deferred_model_matches_the_in_memory_one_and_is_lossless(tmp_path):
    model, _ = _conv_model()
    x = np.random.default_rng(1).standard_normal((4, 3, H, W)).astype(np.float32)
    fold = ChannelFoldingPass({"conv0": 0.5}, repair="none")
    inline = fold(model, PassContext())
    lazy = fold(_deferred(model, tmp_path, "conv"), PassContext())
    assert [r.width_after for r in lazy.layers] == [4]
    np.testing.assert_allclose(_ort(lazy.model, {"x": x}), ort_run(inline.model, {"x": x})[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_ort(lazy.model, {"x": x}), ort_run(model, {"x": x})[0], rtol=0, atol=1e-4)


def test_head_and_gated_folds_of_a_deferred_model_match_the_in_memory_ones(tmp_path):
    model = _transformer_model()
    x = np.random.default_rng(2).standard_normal((2, 5, HID)).astype(np.float32)
    ref = ort_run(model, {"x": x})[0]
    for fold in (HeadFoldingPass(1, repair="none"), GatedFoldingPass(0.5, repair="none")):
        inline = fold(model, PassContext())
        lazy = fold(_deferred(model, tmp_path, "tf"), PassContext())
        assert lazy.changed
        np.testing.assert_allclose(_ort(lazy.model, {"x": x}), ort_run(inline.model, {"x": x})[0], rtol=0, atol=1e-6)
    # the duplicated head folds losslessly
    heads = HeadFoldingPass(1, repair="none")(_deferred(model, tmp_path, "tf2"), PassContext())
    np.testing.assert_allclose(_ort(heads.model, {"x": x}), ref, rtol=0, atol=2e-5)


def test_dense_fold_of_a_deferred_model_matches_the_in_memory_one(tmp_path):
    model = build_bn_mlp()[0]
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    fold = FoldingPass(0.5, repair="ar")
    inline = fold(model, PassContext())
    lazy = fold(_deferred(model, tmp_path, "mlp"), PassContext())
    np.testing.assert_allclose(_ort(lazy.model, {"x": x}), ort_run(inline.model, {"x": x})[0], rtol=0, atol=1e-6)
