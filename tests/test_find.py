"""find: dense ops, activations, chains and skips on small inline models.

Every extracted number is checked against numbers computed independently:
the builder's own parameters (numpy) and onnxruntime's intermediate tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import (activation_model, build_bn_mlp, build_mlp, build_passthrough_mlp, build_residual_mlp,
                     np_activation, np_mlp, ort_run, random_input, tensor_info, with_outputs)
from onnxfold.find import find_dense_graph

F32 = np.float32


def _chain_summary(dg):
    return [(c.name, c.producer.name, c.activation.kind, c.consumer.name) for c in dg.chains]


def _check_ops_against_ort(model, dg, x, atol=2e-5):
    """Every DenseOp's forward() reproduces the pre-activation onnxruntime computes
    from the tensor the op reads."""
    graph_outs = [o.name for o in model.graph.output]
    extra = sorted({t for op in dg.ops.values() for t in (op.input, op.output)} - set(graph_outs) - {"x"})
    got = dict(zip(graph_outs + extra, ort_run(with_outputs(model, extra), x)))
    got["x"] = x
    for op in dg.ops.values():
        z = op.forward(got[op.input].astype(np.float64))
        np.testing.assert_allclose(z, got[op.output], atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------
# dense forms

FORMS = {
    "gemm_transB1": dict(form="gemm"),
    "gemm_transB0": dict(form="gemm_transB0"),
    "gemm_alpha_beta": dict(form="gemm", alpha=0.5, beta=-1.75),
    "gemm_transB0_alpha_beta": dict(form="gemm_transB0", alpha=2.5, beta=0.25),
    "gemm_bias_1xN": dict(form="gemm", bias_shape="1n"),
    "gemm_no_bias": dict(form="gemm", bias=False),
    "gemm_const_nodes": dict(form="gemm", const_nodes=True),
    "matmul_add": dict(form="matmul"),
    "matmul_add_bias_first": dict(form="matmul", bias_first=True),
    "matmul_add_bias_1xN": dict(form="matmul", bias_shape="1n", bias_first=True),
    "matmul_no_bias": dict(form="matmul", bias=False),
    "matmul_const_nodes": dict(form="matmul", const_nodes=True),
    "matmul_rank3": dict(form="matmul", rank=3),
    "matmul_rank3_bias_first_const": dict(form="matmul", rank=3, bias_first=True, const_nodes=True),
}


@pytest.mark.parametrize("case", list(FORMS))
def test_dense_forms_extract_what_the_graph_computes(case):
    kw = FORMS[case]
    model, params = build_mlp([5, 7, 6, 3], "relu", seed=3, return_params=True, **kw)
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "fc0", "relu", "fc1"), ("layer1", "fc1", "relu", "fc2")]
    assert list(dg.ops) == ["fc0", "fc1", "fc2"]
    for i, p in enumerate(params):
        op = dg.ops[f"fc{i}"]
        assert op.weight.shape == p["W"].shape
        # weights are held in float32 (the model's precision): alpha scaling rounds once
        np.testing.assert_allclose(op.weight, p["W"], rtol=1e-6, atol=0)
        if p["b"] is None:
            assert op.bias is None or not np.any(op.bias)
        else:
            np.testing.assert_allclose(op.bias, p["b"], rtol=1e-12, atol=0)
        assert op.dtype == np.float32
        assert op.form == ("matmul" if kw["form"] == "matmul" else "gemm")
    assert dg.ops["fc0"].input == "x" and dg.ops["fc2"].output == "y"
    c0 = dg.chain("layer0")
    assert c0.activation.input == "h0.pre" == c0.producer.output
    assert c0.activation.output == "h0" == c0.consumer.input
    # the extracted ops reproduce the graph's pre-activations in onnxruntime
    x = random_input(model, batch=4)
    _check_ops_against_ort(model, dg, x)
    # and the whole net, evaluated from the view, equals the model's output
    h = x.astype(np.float64)
    for c in dg.chains:
        h = c.activation.apply(c.producer.forward(h))
    out = dg.chains[-1].consumer.forward(h)
    np.testing.assert_allclose(out, ort_run(model, x)[0], atol=2e-5)
    np.testing.assert_allclose(out, np_mlp(params, x), atol=2e-5)


@pytest.mark.parametrize("first", ["gemm", "matmul"])
def test_extra_constant_add_is_summed_into_bias(first):
    """Gemm(x, W, C) + c2 and MatMul + b + c2: the bias is the sum of both."""
    model, params = build_mlp([4, 6, 3], "tanh", form=first, seed=21, return_params=True)
    g = model.graph
    c2 = np.linspace(-1, 1, 6).astype(F32)
    g.initializer.append(numpy_helper.from_array(c2, "c2"))
    act = next(n for n in g.node if n.op_type == "Tanh")
    act.input[0] = "h0.pre2"
    g.node.insert(list(g.node).index(act), helper.make_node("Add", ["c2", "h0.pre"], ["h0.pre2"], name="extra"))
    dg = find_dense_graph(model)
    op = dg.ops["fc0"]
    assert op.output == "h0.pre2" and "extra" in op.nodes
    np.testing.assert_allclose(op.bias, params[0]["b"] + c2, rtol=1e-7)
    _check_ops_against_ort(model, dg, random_input(model, batch=3))


def test_find_does_not_modify_model():
    model = build_mlp([4, 6, 3], "gelu_erf", form="matmul", const_nodes=True)
    before = model.SerializeToString()
    find_dense_graph(model)
    assert model.SerializeToString() == before


def test_find_does_not_modify_model_with_unnamed_nodes():
    model = build_mlp([4, 6, 3], "relu", form="matmul")
    for n in model.graph.node:
        n.name = ""
    before = model.SerializeToString()
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "MatMul_0", "relu", "MatMul_3")]  # positional names
    assert model.SerializeToString() == before


def test_batchnorm_after_gemm_is_folded():
    model, W_fold, b_fold, W1, b1 = build_bn_mlp()
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "fc0", "relu", "fc1")]
    op = dg.ops["fc0"]
    np.testing.assert_allclose(op.weight, W_fold, rtol=1e-6)
    np.testing.assert_allclose(op.bias, b_fold, rtol=1e-6, atol=1e-6)
    assert "bn0" in op.nodes and op.output == "bn0"
    x = random_input(model, batch=6)
    bn = ort_run(with_outputs(model, ["bn0"]), x)[1]
    np.testing.assert_allclose(op.forward(x.astype(np.float64)), bn, atol=1e-5)


@pytest.mark.parametrize("kind", ["Identity", "Dropout"])
@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_identity_and_dropout_between_pieces_are_looked_through(kind, form):
    model, params = build_passthrough_mlp(kind, form)
    onnx.checker.check_model(model, full_check=True)
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "fc0", "relu", "fc1")]
    c = dg.chains[0]
    np.testing.assert_allclose(c.producer.weight, params[0]["W"], rtol=1e-12)
    np.testing.assert_allclose(c.producer.bias, params[0]["b"], rtol=1e-12)
    np.testing.assert_allclose(c.consumer.weight, params[1]["W"], rtol=1e-12)
    # the view's tensors line up: producer output feeds the activation, activation output the consumer
    assert c.activation.input == c.producer.output
    assert c.activation.output == c.consumer.input
    pieces = set(c.producer.nodes) | set(c.activation.nodes) | set(c.consumer.nodes)
    assert {n.name for n in model.graph.node if n.op_type == kind} <= pieces
    x = random_input(model, batch=5)
    h = c.activation.apply(c.producer.forward(x.astype(np.float64)))
    np.testing.assert_allclose(c.consumer.forward(h), ort_run(model, x)[0], atol=2e-5)


@pytest.mark.parametrize("variant", ["training_mode", "mask_read"])
def test_dropout_that_is_not_a_no_op_is_not_looked_through(variant):
    model = build_mlp([4, 6, 3], "relu")
    g = model.graph
    relu = next(n for n in g.node if n.op_type == "Relu")
    relu.input[0] = "d0"
    if variant == "training_mode":
        g.initializer.append(numpy_helper.from_array(np.array(True), "train"))
        drop = helper.make_node("Dropout", ["h0.pre", "", "train"], ["d0"], name="drop")
    else:
        drop = helper.make_node("Dropout", ["h0.pre"], ["d0", "mask"], name="drop")
        g.output.append(helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, ["N", 6]))
    g.node.insert(list(g.node).index(relu), drop)
    onnx.checker.check_model(model)
    dg = find_dense_graph(model)
    assert dg.chains == []
    assert "drop" not in dg.ops["fc0"].nodes and dg.ops["fc0"].output == "h0.pre"
    assert any("Dropout" in r for r in _skip_reasons(dg, "fc0"))


def test_residual_mlp_without_second_bias_is_a_chain():
    """y = r + W2·relu(W1·r + b1) with r read by the block and the residual Add:
    the bias-free second MatMul is a layer, not a linear path of something else."""
    model, params = build_residual_mlp()
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "fc1", "relu", "fc2")]
    np.testing.assert_allclose(dg.ops["fc1"].weight, params[0]["W"], rtol=1e-12)
    np.testing.assert_allclose(dg.ops["fc1"].bias, params[0]["b"], rtol=1e-12)
    np.testing.assert_allclose(dg.ops["fc2"].weight, params[1]["W"], rtol=1e-12)
    assert dg.ops["fc2"].bias is None and dg.ops["fc2"].output == "m2"
    assert dg.ops["fc2"].paths == []
    _check_ops_against_ort(model, dg, random_input(model, batch=2))


# --------------------------------------------------------------------------
# activations

ACT_CASES = {
    "relu": ("relu", {}),
    "leaky_relu": ("leaky_relu", {"alpha": 0.23}),
    "prelu_per_channel": ("prelu", {}),
    "prelu_scalar": ("prelu_scalar", {"slope": 0.3}),
    "clip_both": ("clip", {"lo": -0.4, "hi": 0.9}),
    "clip_min_only": ("clip", {"lo": -0.25, "hi": None}),
    "clip_max_only": ("clip", {"lo": None, "hi": 0.6}),
    "sigmoid": ("sigmoid", {}),
    "tanh": ("tanh", {}),
    "gelu_native": ("gelu", {}),
    "gelu_erf_div_first": ("gelu_erf", {}),
    "gelu_erf_half_first": ("gelu_erf_half", {}),
    "silu": ("silu", {}),
}
KIND_NAMES = {"relu": "relu", "leaky_relu": "leaky_relu", "prelu": "prelu", "prelu_scalar": "prelu", "clip": "clip",
              "sigmoid": "sigmoid", "tanh": "tanh", "gelu": "gelu", "gelu_erf": "gelu", "gelu_erf_half": "gelu",
              "silu": "silu"}


@pytest.mark.parametrize("case", list(ACT_CASES))
@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_activation_is_recognised_and_apply_matches_onnxruntime(case, form):
    kind, ap = ACT_CASES[case]
    n = 8
    model, params = build_mlp([5, n, 3], kind, form=form, act_params=ap, seed=2, return_params=True)
    dg = find_dense_graph(model)
    assert _chain_summary(dg) == [("layer0", "fc0", KIND_NAMES[kind], "fc1")]
    act = dg.chains[0].activation
    resolved = params[0]["act_params"]
    assert act.input == "h0.pre" and act.output == "h0"
    # every node of the activation is listed
    act_node_names = {nd.name for nd in model.graph.node if nd.name.startswith("act0.")}
    assert act_node_names <= set(act.nodes)
    if kind == "leaky_relu":
        assert act.alpha == pytest.approx(0.23)
    if kind.startswith("prelu"):
        np.testing.assert_allclose(np.broadcast_to(act.slope, (n,)),
                                   np.broadcast_to(resolved["slope"].astype(np.float64), (n,)), rtol=1e-7)
    if kind == "clip":
        lo, hi = ap["lo"], ap["hi"]
        assert act.lo == (-np.inf if lo is None else pytest.approx(lo))
        assert act.hi == (np.inf if hi is None else pytest.approx(hi))

    # apply() equals onnxruntime running the same activation alone
    am, _ = activation_model(kind, n, act_params=resolved)
    z = (np.random.default_rng(5).standard_normal((64, n)) * 2.5).astype(F32)
    z[0, :] = 0.0  # the kink
    if kind == "clip":
        z[1, :] = [-0.4, 0.9, -0.25, 0.6, -1, 1, 0, 0.5]
    ref = ort_run(am, z)[0]
    np.testing.assert_allclose(act.apply(z), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(act.apply(z.astype(np.float64)), np_activation(kind, z, resolved), atol=1e-12)

    # piecewise kinds: f(z) = slope*z + intercept of the piece piece_index() names
    if act.is_piecewise_linear:
        pieces, idx = act.pieces(n), act.piece_index(z)
        recon = np.zeros_like(ref, dtype=np.float64)
        for k, pc in enumerate(pieces):
            slope = np.broadcast_to(np.asarray(pc.slope, dtype=np.float64), (n,))
            val = slope * z + pc.intercept
            recon = np.where(idx == k, val, recon)
        np.testing.assert_allclose(recon, ref, atol=1e-6)


# --------------------------------------------------------------------------
# skips


def _skip_reasons(dg, where):
    return [s.reason for s in dg.skipped if s.where == where]


def test_skip_hidden_activation_is_graph_output():
    model = build_mlp([4, 6, 5, 3], "relu")
    model.graph.output.append(tensor_info("h0", F32, ["N", 6]))
    dg = find_dense_graph(model)
    assert [c.producer.name for c in dg.chains] == ["fc1"]
    assert any("graph output" in r for r in _skip_reasons(dg, "fc0"))


def test_skip_pre_activation_is_graph_output():
    model = build_mlp([4, 6, 3], "relu")
    model.graph.output.append(tensor_info("h0.pre", F32, ["N", 6]))
    dg = find_dense_graph(model)
    assert dg.chains == []
    assert any("graph output" in r for r in _skip_reasons(dg, "fc0"))


def test_skip_hidden_activation_with_two_consumers():
    model = build_mlp([4, 6, 3], "relu")
    W = numpy_helper.from_array(np.ones((2, 6), F32), "Wside")
    model.graph.initializer.append(W)
    model.graph.node.append(helper.make_node("Gemm", ["h0", "Wside"], ["side"], name="side", transB=1))
    model.graph.output.append(tensor_info("side", F32, ["N", 2]))
    dg = find_dense_graph(model)
    assert dg.chains == []
    reasons = _skip_reasons(dg, "fc0")
    assert reasons and "feeds" in reasons[0] and "Gemm, Gemm" in reasons[0]


def test_skip_reshape_after_activation():
    model = build_mlp([4, 6, 3], "relu")
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([-1, 6], np.int64), "shape"))
    fc1 = next(n for n in g.node if n.name == "fc1")
    fc1.input[0] = "h0r"
    g.node.insert(list(g.node).index(fc1), helper.make_node("Reshape", ["h0", "shape"], ["h0r"], name="reshape"))
    onnx.checker.check_model(model)
    dg = find_dense_graph(model)
    assert dg.chains == []
    assert any("Reshape" in r for r in _skip_reasons(dg, "fc0"))


def test_skip_non_constant_weight():
    model = build_mlp([4, 6, 3], "relu")
    g = model.graph
    W1 = next(t for t in g.initializer if t.name == "fc1.B")
    g.input.append(tensor_info("fc1.B", F32, list(W1.dims)))
    g.initializer.remove(W1)
    dg = find_dense_graph(model)
    assert dg.chains == [] and "fc1" not in dg.ops
    assert any("constant" in r for r in _skip_reasons(dg, "fc1")), dg.skipped
    assert _skip_reasons(dg, "fc0")  # its chain is reported too


def test_skip_unsupported_activation():
    model = build_mlp([4, 6, 3], "softplus")
    dg = find_dense_graph(model)
    assert dg.chains == []
    assert any("Softplus" in r and "not a supported activation" in r for r in _skip_reasons(dg, "fc0"))


def test_skip_gemm_transA():
    model = build_mlp([4, 6, 3], "relu")
    fc0 = next(n for n in model.graph.node if n.name == "fc0")
    fc0.attribute.append(helper.make_attribute("transA", 1))
    dg = find_dense_graph(model)
    assert "fc0" not in dg.ops
    assert any("transA" in r for r in _skip_reasons(dg, "fc0"))


def test_pre_activation_with_two_readers_is_not_a_chain():
    model = build_mlp([4, 6, 3], "relu")
    model.graph.node.append(helper.make_node("Sigmoid", ["h0.pre"], ["s"], name="side"))
    model.graph.output.append(tensor_info("s", F32, ["N", 6]))
    dg = find_dense_graph(model)
    assert dg.chains == []
    assert any("feeds 2 nodes" in r for r in _skip_reasons(dg, "fc0"))
