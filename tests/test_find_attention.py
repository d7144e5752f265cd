"""find_transformer on small inline graphs: forms real exports rarely show,
and what must not be matched.

Models are built with onnx.helper; folds are checked against onnxruntime on
the original model. Real exports (LLaMA, Qwen2, Mistral, BERT) are in
tests/test_transformer_exports.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import attention_graph, ort_run
from onnx import TensorProto, helper, numpy_helper

from onnxfold.find.attention import find_transformer
from onnxfold.passes.base import PassContext
from onnxfold.passes.head_folding import GatedFoldingPass

D, N = 6, 8  # hidden size, gated width


def _model(nodes, inits, x_shape, y_shape, opset=17, ir=8, outputs=("y",)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    ys = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if o == "y" else None) for o in outputs]
    g = helper.make_graph(nodes, "g", [x], ys, inits)
    return helper.make_model(g, ir_version=ir, opset_imports=[helper.make_opsetid("", opset)])


def _glu_weights(seed=0):
    """gate, up (N × D) and down (D × N) as W out × in, neurons 6, 7 copying 1, 2."""
    rng = np.random.default_rng(seed)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((N, D), (N, D), (D, N)))
    for w in (wg, wu):
        w[6:8] = w[1:3]
    wd[:, 6:8] = wd[:, 1:3]
    return wg, wu, wd


def _swish_glu(alpha: float) -> onnx.ModelProto:
    wg, wu, wd = _glu_weights()
    inits = [numpy_helper.from_array(w.T.copy(), n) for w, n in ((wg, "Wg"), (wu, "Wu"), (wd, "Wd"))]
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
             helper.make_node("Swish", ["g"], ["a"], alpha=alpha, name="act"),
             helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
             helper.make_node("Mul", ["a", "u"], ["h"], name="gated"),
             helper.make_node("MatMul", ["h", "Wd"], ["y"], name="down")]
    return _model(nodes, inits, ["batch", "seq", D], ["batch", "seq", D], opset=24, ir=10)


def test_swish_gate_is_a_silu_gated_mlp():
    model = _swish_glu(1.0)
    view = find_transformer(model)
    assert [(g.activation.kind, g.width, g.gate.node, g.up.node, g.down.node) for g in view.gated] == \
        [("silu", N, "gate", "up", "down")]
    x = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32)
    res = GatedFoldingPass(0.25, repair="none")(model, PassContext())
    assert [(r.width_before, r.width_after) for r in res.layers] == [(N, N - 2)]
    np.testing.assert_allclose(ort_run(res.model, {"x": x})[0], ort_run(model, {"x": x})[0], atol=1e-5, rtol=0)
    # Swish with another slope is no SiLU: not a gated MLP onnxfold can describe
    assert find_transformer(_swish_glu(2.0)).gated == []


def _gemm_glu(trans_b: int) -> onnx.ModelProto:
    """A gated MLP on 2-D rows with Gemm projections (biases as Gemm C)."""
    wg, wu, wd = _glu_weights(1)
    rng = np.random.default_rng(2)
    bg, bu = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    bg[6:8], bu[6:8] = bg[1:3], bu[1:3]
    stored = (lambda w: w.copy()) if trans_b else (lambda w: w.T.copy())
    inits = [numpy_helper.from_array(stored(w), n) for w, n in ((wg, "Wg"), (wu, "Wu"), (wd, "Wd"))]
    inits += [numpy_helper.from_array(b, n) for b, n in ((bg, "Bg"), (bu, "Bu"))]
    nodes = [helper.make_node("Gemm", ["x", "Wg", "Bg"], ["g"], transB=trans_b, name="gate"),
             helper.make_node("Sigmoid", ["g"], ["s"], name="sig"),
             helper.make_node("Mul", ["g", "s"], ["a"], name="silu"),
             helper.make_node("Gemm", ["x", "Wu", "Bu"], ["u"], transB=trans_b, name="up"),
             helper.make_node("Mul", ["a", "u"], ["h"], name="gated"),
             helper.make_node("Gemm", ["h", "Wd"], ["y"], transB=trans_b, name="down")]
    return _model(nodes, inits, ["batch", D], ["batch", D])


def test_gemm_projections_are_found():
    model = _gemm_glu(0)
    (g,) = find_transformer(model).gated
    wg, _, wd = _glu_weights(1)
    np.testing.assert_array_equal(g.gate.weight, wg)
    np.testing.assert_array_equal(g.down.weight, wd)
    assert g.gate.bias is not None and g.down.bias is None
    res = GatedFoldingPass(0.25, repair="none")(model, PassContext())
    assert [(r.width_before, r.width_after) for r in res.layers] == [(N, N - 2)]
    x = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
    np.testing.assert_allclose(ort_run(res.model, {"x": x})[0], ort_run(model, {"x": x})[0], atol=1e-5, rtol=0)


def test_gemm_with_transposed_weights_is_reported_and_left_alone():
    model = _gemm_glu(1)
    view = find_transformer(model)
    assert view.gated == []
    assert any("transB=1" in s.reason for s in view.skipped), view.skipped
    before = model.SerializeToString()
    res = GatedFoldingPass(0.25)(model, PassContext())
    assert not res.changed and model.SerializeToString() == before


def _attention(extra_outputs=()):
    rng = np.random.default_rng(4)
    h, d, hid = 2, 3, D
    w = {n: rng.standard_normal((hid, hid)).astype(np.float32) * 0.3 for n in "qkvo"}
    b = {n: rng.standard_normal(hid).astype(np.float32) * 0.1 for n in "qkvo"}
    nodes, inits = attention_graph(w, b, h, d)
    return _model(nodes, inits, ["batch", "seq", hid], ["batch", "seq", hid], outputs=("y", *extra_outputs))


def test_tensor_read_outside_the_block_is_reported():
    """A key read outside the block (a key/value cache output, say) would
    change shape if heads were folded: the block is reported, not matched."""
    assert len(find_transformer(_attention()).attention) == 1
    view = find_transformer(_attention(extra_outputs=("kt",)))
    assert view.attention == [] and view.grouped == []
    assert any("graph output" in s.reason and "'kt'" in s.reason for s in view.skipped), view.skipped


def test_classifier_softmax_is_no_attention():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((D, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="fc"),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1, name="softmax")]
    view = find_transformer(_model(nodes, inits, ["batch", D], ["batch", 3]))
    assert view.attention == [] and view.gated == [] and view.skipped == []


@pytest.mark.parametrize("mask_op", ["Add", "Where"])
def test_attention_with_a_mask_before_the_softmax(mask_op):
    """Scores masked by an additive mask or by Where(mask, scores, -inf) are found."""
    model = _attention()
    g = model.graph
    sm = next(n for n in g.node if n.op_type == "Softmax")
    if mask_op == "Add":
        g.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "mask"))
        node = helper.make_node("Add", ["mask", sm.input[0]], ["masked"], name="mask_add")
    else:
        g.initializer.extend([numpy_helper.from_array(np.ones((1, 1, 1, 1), bool), "keep"),
                              numpy_helper.from_array(np.array(-1e9, np.float32), "fill")])
        node = helper.make_node("Where", ["keep", sm.input[0], "fill"], ["masked"], name="mask_where")
    idx = list(g.node).index(sm)
    g.node.insert(idx, node)
    sm.input[0] = "masked"
    (b,) = find_transformer(model).attention
    assert node.name in b.nodes and (b.num_heads, b.head_dim) == (2, 3)


def test_fused_onnxruntime_ops_are_reported_once_per_type():
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), n) for n in ("gamma", "beta")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "x", "gamma", "beta"], [f"n{i}"], domain="com.microsoft",
                              name=f"sln{i}") for i in range(2)]
    nodes.append(helper.make_node("Add", ["n0", "n1"], ["y"], name="add"))
    model = _model(nodes, inits, ["batch", "seq", D], ["batch", "seq", D])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    before = model.SerializeToString()
    view = find_transformer(model)
    assert [(s.where, "2 fused com.microsoft SkipLayerNormalization" in s.reason) for s in view.skipped] == \
        [("sln0", True)]
    assert model.SerializeToString() == before


# the shipped byte-level decoders, where this checkout has them (models/README.md: 4 layers, hidden 128,
# 4 query heads of 32 dims, SwiGLU MLP 344; llama_gqa has 2 key/value heads)
@pytest.mark.parametrize("name,kv_heads", [("llama_mha", 4), ("llama_gqa", 2)])
def test_shipped_decoders_when_present(name, kv_heads):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "models" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"models/{name}.onnx is not in this checkout")
    view = find_transformer(onnx.load(str(path)))
    assert [(b.num_heads, b.num_kv_heads, b.head_dim, b.rotary, b.q.in_features) for b in view.blocks] == \
        [(4, kv_heads, 32, True, 128)] * 4
    assert (len(view.attention), len(view.grouped)) == ((4, 0) if kv_heads == 4 else (4, 4))
    assert [(g.width, g.activation.kind) for g in view.gated] == [(344, "silu")] * 4
