"""rewrite: HiddenEdit → apply_edit → materialize, checked in onnxruntime
against numpy references computed from the builder's parameters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from helpers import (build_bn_mlp, build_mlp, build_passthrough_mlp, build_residual_mlp, np_activation, np_mlp,
                     ort_run, random_input, tensor_info)
from onnxfold.find import LinearPath, find_dense_graph
from onnxfold.rewrite import HiddenEdit, apply_edit, materialize

F32 = np.float32


def _relu(z):
    return np.maximum(z, 0.0)


def _rewrite(model, edits: dict, check=True):
    """find → apply ``edits`` ({chain name: HiddenEdit}) → materialize (+ checker)."""
    dg = find_dense_graph(model)
    for name, edit in edits.items():
        apply_edit(dg.chain(name), edit)
    out = materialize(model, dg)
    if check:
        onnx.checker.check_model(out, full_check=True)
    return out


def _keep_all_edits(model):
    dg = find_dense_graph(model)
    return {c.name: HiddenEdit.keep(c.width, np.arange(c.width)) for c in dg.chains}


def _init_names(model):
    return {t.name for t in model.graph.initializer}


def _assert_no_dead_constants(model):
    read = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    assert all(t.name in read for t in model.graph.initializer), [t.name for t in model.graph.initializer
                                                                  if t.name not in read]
    for n in model.graph.node:
        if n.op_type == "Constant":
            assert any(o in read for o in n.output), n.name


# --------------------------------------------------------------------------
# identity edits


EXACT_FORMS = {
    "gemm": dict(form="gemm"),
    "gemm_no_bias": dict(form="gemm", bias=False),
    "matmul": dict(form="matmul"),
    "matmul_bias_first_1xN": dict(form="matmul", bias_first=True, bias_shape="1n"),
    "matmul_rank3": dict(form="matmul", rank=3),
    "gemm_const_nodes": dict(form="gemm", const_nodes=True),
    "matmul_const_nodes": dict(form="matmul", const_nodes=True),
}


@pytest.mark.parametrize("act", ["relu", "prelu", "gelu_erf", "silu", "clip"])
@pytest.mark.parametrize("case", list(EXACT_FORMS))
def test_identity_edit_is_bit_exact(case, act):
    model = build_mlp([5, 8, 6, 3], act, seed=1, **EXACT_FORMS[case])
    before = model.SerializeToString()
    out = _rewrite(model, _keep_all_edits(model))
    assert model.SerializeToString() == before  # materialize left its input alone
    x = random_input(model, batch=7)
    np.testing.assert_array_equal(ort_run(out, x)[0], ort_run(model, x)[0])
    # every op was rewritten: no old weight or bias is left, activation constants are kept
    old = {t for t in _init_names(model) if t.startswith("fc")} | {
        o for n in model.graph.node if n.op_type == "Constant" and n.name.startswith("fc") for o in n.output}
    assert old and not (old & _init_names(out))
    assert not (old & {o for n in out.graph.node for o in n.output})
    _assert_no_dead_constants(out)


@pytest.mark.parametrize("kw", [dict(form="gemm_transB0"), dict(form="gemm", alpha=0.5, beta=-2.0),
                                dict(form="gemm_transB0", alpha=1.5, beta=0.5, bias_shape="1n")])
def test_identity_edit_other_gemm_forms_is_close(kw):
    model = build_mlp([5, 8, 6, 3], "leaky_relu", seed=4, **kw)
    out = _rewrite(model, _keep_all_edits(model))
    x = random_input(model, batch=7)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], atol=1e-5, rtol=1e-5)


def test_identity_edit_removes_batchnorm():
    model, W_fold, b_fold, W1, b1 = build_bn_mlp(seed=3)
    out = _rewrite(model, _keep_all_edits(model))
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    x = random_input(model, batch=7)
    ref = _relu(x.astype(np.float64) @ W_fold.T + b_fold) @ W1.T + b1
    np.testing.assert_allclose(ort_run(out, x)[0], ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------
# exact removals and merges


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_drop_neuron_with_zero_consumer_column_is_exact(form):
    _, params = build_mlp([5, 8, 3], "relu", seed=2, return_params=True)
    W1 = params[1]["W"].copy()
    W1[:, [2, 6]] = 0.0
    weights = [(params[0]["W"], params[0]["b"]), (W1, params[1]["b"])]
    model = build_mlp([5, 8, 3], "relu", seed=2, form=form, weights=weights)
    keep = np.array([0, 1, 3, 4, 5, 7])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep)})
    dg = find_dense_graph(out)
    assert dg.chain("layer0").width == 6
    for batch in (1, 7):
        x = random_input(model, batch=batch, seed=batch)
        np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], atol=1e-6, rtol=1e-6)


def _duplicate_neuron_model(act, form, src=1, dup=4, seed=3):
    _, params = build_mlp([5, 8, 3], act, seed=seed, return_params=True)
    W0, b0 = params[0]["W"].copy(), params[0]["b"].copy()
    W0[dup], b0[dup] = W0[src], b0[src]
    weights = [(W0, b0), (params[1]["W"], params[1]["b"])]
    return build_mlp([5, 8, 3], act, seed=seed, form=form, weights=weights)


@pytest.mark.parametrize("act", ["relu", "gelu_erf", "gelu", "silu"])
@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_merging_two_duplicate_neurons_is_exact(act, form):
    src, dup, n = 1, 4, 8
    model = _duplicate_neuron_model(act, form, src, dup)
    others = [j for j in range(n) if j != dup]
    k = len(others)
    M = np.zeros((k, n))
    C = np.zeros((n, k))
    for r, j in enumerate(others):
        M[r, j] = 1.0
        C[j, r] = 1.0
    r_src = others.index(src)
    M[r_src, [src, dup]] = 0.5  # cluster mean of two identical rows
    C[dup, r_src] = 1.0  # cluster sum of their columns
    out = _rewrite(model, {"layer0": HiddenEdit(row_map=M, col_map=C)})
    x = random_input(model, batch=9)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], atol=2e-6, rtol=1e-5)
    assert find_dense_graph(out).chain("layer0").width == k


# --------------------------------------------------------------------------
# numeric edits against numpy


def _edit_case(name, n, out_dim, rng):
    keep = np.array([0, 2, 3, 5, 6])
    k = len(keep)
    s = rng.uniform(-1.5, 2.0, k)
    t = rng.standard_normal(k)
    cw = rng.standard_normal((out_dim, k))
    cb = rng.standard_normal(out_dim)
    d = rng.standard_normal(out_dim)
    cases = {
        "row_scale": (dict(row_scale=s), dict(s=s)),
        "row_shift": (dict(row_shift=t), dict(t=t)),
        "row_scale_and_shift": (dict(row_scale=s, row_shift=t), dict(s=s, t=t)),
        "consumer_weight": (dict(consumer_weight=cw), dict(cw=cw)),
        "consumer_bias": (dict(consumer_bias=cb), dict(cb=cb)),
        "consumer_bias_delta": (dict(consumer_bias_delta=d), dict(d=d)),
        "everything": (dict(row_scale=s, row_shift=t, consumer_weight=cw, consumer_bias=cb, consumer_bias_delta=d),
                       dict(s=s, t=t, cw=cw, cb=cb, d=d)),
    }
    kw, ref = cases[name]
    return HiddenEdit.keep(n, keep, **kw), keep, ref


def _edited_reference(params, x, keep, s=None, t=None, cw=None, cb=None, d=None):
    """numpy: y = W1' f(s·z[keep] + t) + b1' for a 2-layer net."""
    p0, p1 = params
    z = x.astype(np.float64) @ p0["W"].T + (0 if p0["b"] is None else p0["b"])
    z = z[..., keep]
    if s is not None:
        z = z * s
    if t is not None:
        z = z + t
    ap = dict(p0["act_params"] or {})
    if "slope" in ap and np.size(ap["slope"]) > 1:
        ap["slope"] = np.asarray(ap["slope"])[keep]
    h = np_activation(p0["act"], z, ap)
    W1 = p1["W"][:, keep] if cw is None else cw
    b1 = np.zeros(W1.shape[0]) if p1["b"] is None else p1["b"]
    if cb is not None:
        b1 = cb
    if d is not None:
        b1 = b1 + d
    return h @ W1.T + b1


EDIT_NAMES = ["row_scale", "row_shift", "row_scale_and_shift", "consumer_weight", "consumer_bias",
              "consumer_bias_delta", "everything"]


@pytest.mark.parametrize("edit_name", EDIT_NAMES)
@pytest.mark.parametrize("kw", [dict(form="gemm"), dict(form="matmul", bias=False),
                                dict(form="matmul", rank=3, bias_first=True),
                                dict(form="gemm_transB0", alpha=0.7, beta=1.3, const_nodes=True)],
                         ids=["gemm", "matmul_nobias", "matmul_rank3", "gemm_transB0_ab_const"])
def test_edit_fields_match_numpy(edit_name, kw):
    model, params = build_mlp([6, 8, 4], "relu", seed=5, return_params=True, **kw)
    edit, keep, ref = _edit_case(edit_name, 8, 4, np.random.default_rng(0))
    out = _rewrite(model, {"layer0": edit})
    for batch in (1, 7):
        x = random_input(model, batch=batch, seed=batch)
        np.testing.assert_allclose(ort_run(out, x)[0], _edited_reference(params, x, keep, **ref),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["prelu", "prelu_scalar", "leaky_relu", "clip", "gelu_erf_half", "tanh"])
@pytest.mark.parametrize("const_nodes", [False, True])
def test_drop_neurons_slices_per_channel_parameters(act, const_nodes):
    model, params = build_mlp([6, 8, 4], act, seed=6, const_nodes=const_nodes, return_params=True)
    keep = np.array([1, 2, 4, 7])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep)})
    x = random_input(model, batch=7)
    np.testing.assert_allclose(ort_run(out, x)[0], _edited_reference(params, x, keep), atol=1e-5, rtol=1e-5)
    if act == "prelu":
        slope_inputs = [n.input[1] for n in out.graph.node if n.op_type == "PRelu"]
        slopes = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        assert slopes[slope_inputs[0]].size == len(keep)
    _assert_no_dead_constants(out)


def test_prelu_slopes_averaged_when_merging():
    """A merged neuron's PRelu slope is the mean of its members' (row_map rows sum to 1)."""
    model, params = build_mlp([5, 4, 3], "prelu", seed=8, return_params=True)
    M = np.array([[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    C = np.array([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    out = _rewrite(model, {"layer0": HiddenEdit(row_map=M, col_map=C)})
    p0, p1 = params
    slope = p0["act_params"]["slope"].astype(np.float64)
    x = random_input(model, batch=6).astype(np.float64)
    z = (x @ p0["W"].T + p0["b"]) @ M.T
    h = np.where(z > 0, z, z * (M @ slope))
    ref = h @ (p1["W"] @ C).T + p1["b"]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], ref, atol=1e-5)


def test_two_consecutive_chains_edited_together():
    model, params = build_mlp([6, 8, 7, 4], "relu", seed=9, form="matmul", return_params=True)
    k0, k1 = np.array([0, 1, 3, 6, 7]), np.array([1, 2, 4, 5])
    s1 = np.linspace(0.5, 1.5, len(k1))
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, k0), "layer1": HiddenEdit.keep(7, k1, row_scale=s1)})
    x = random_input(model, batch=5).astype(np.float64)
    p0, p1, p2 = params
    h0 = _relu(x @ p0["W"].T + p0["b"])[:, k0]
    h1 = _relu((h0 @ p1["W"][:, k0].T + p1["b"])[:, k1] * s1)
    ref = h1 @ p2["W"][:, k1].T + p2["b"]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], ref, atol=1e-5)
    dg = find_dense_graph(out)
    assert dg.ops["fc1"].weight.shape == (4, 5)


def test_edit_validation_errors():
    model = build_mlp([5, 8, 3], "relu")
    c = find_dense_graph(model).chain("layer0")
    with pytest.raises(ValueError):
        apply_edit(c, HiddenEdit(row_map=np.eye(8)[:3], col_map=np.eye(8)[:, :4]))
    c = find_dense_graph(model).chain("layer0")
    with pytest.raises(ValueError):
        apply_edit(c, HiddenEdit(row_map=np.zeros((0, 8)), col_map=np.zeros((8, 0))))
    c = find_dense_graph(model).chain("layer0")
    with pytest.raises(ValueError):
        apply_edit(c, HiddenEdit.keep(8, np.arange(4), consumer_weight=np.zeros((3, 5))))
    c = find_dense_graph(model).chain("layer0")
    with pytest.raises(ValueError):
        apply_edit(c, HiddenEdit.keep(8, np.arange(4), new_paths=[LinearPath("x", [np.zeros((5, 2))])]))


# --------------------------------------------------------------------------
# linear paths


@pytest.mark.parametrize("form", ["gemm", "matmul"])
@pytest.mark.parametrize("factored", [False, True])
def test_new_linear_path_and_refind(form, factored):
    model, params = build_mlp([5, 8, 3], "relu", seed=10, form=form, return_params=True)
    rng = np.random.default_rng(1)
    factors = [rng.standard_normal((5, 2)), rng.standard_normal((2, 3))] if factored else [rng.standard_normal((5, 3))]
    keep = np.array([0, 1, 2, 4, 5, 7])
    edit = HiddenEdit.keep(8, keep, new_paths=[LinearPath("x", [f.copy() for f in factors])])
    out = _rewrite(model, {"layer0": edit})
    x = random_input(model, batch=7)
    P = factors[0] if not factored else factors[0] @ factors[1]
    ref = _edited_reference(params, x, keep) + x.astype(np.float64) @ P
    np.testing.assert_allclose(ort_run(out, x)[0], ref, atol=1e-5, rtol=1e-5)

    dg = find_dense_graph(out)
    assert [(c.name, c.producer.name, c.consumer.name) for c in dg.chains] == [("layer0", "fc0", "fc1")]
    cons = dg.chain("layer0").consumer
    assert len(cons.paths) == 1 and cons.paths[0].input == "x"
    assert len(cons.paths[0].factors) == len(factors)
    for got, want in zip(cons.paths[0].factors, factors):
        np.testing.assert_allclose(got, want.astype(F32), rtol=1e-7)
    np.testing.assert_allclose(cons.weight, params[1]["W"][:, keep], rtol=1e-7)
    # a second identity round trip keeps everything
    out2 = _rewrite(out, _keep_all_edits(out))
    np.testing.assert_array_equal(ort_run(out2, x)[0], ort_run(out, x)[0])


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_path_reading_a_hidden_layer_is_a_path_reader(form):
    """fc2 gets a path reading h0 (layer0's activation): re-find lists it in
    layer0.path_readers, and an edit of layer0 slices that path's first factor."""
    model, params = build_mlp([5, 8, 6, 3], "relu", seed=12, form=form, return_params=True)
    G = np.random.default_rng(2).standard_normal((8, 3))
    edit1 = HiddenEdit.keep(6, np.arange(6), new_paths=[LinearPath("h0", [G.copy()])])
    m1 = _rewrite(model, {"layer1": edit1})
    p0, p1, p2 = params
    x = random_input(model, batch=7).astype(np.float64)
    h0 = _relu(x @ p0["W"].T + p0["b"])
    h1 = _relu(h0 @ p1["W"].T + p1["b"])
    np.testing.assert_allclose(ort_run(m1, x.astype(F32))[0], h1 @ p2["W"].T + p2["b"] + h0 @ G, atol=1e-5)

    dg = find_dense_graph(m1)
    assert [(c.name, c.producer.name, c.consumer.name) for c in dg.chains] == [("layer0", "fc0", "fc1"),
                                                                               ("layer1", "fc1", "fc2")]
    readers = dg.chain("layer0").path_readers
    assert [(op.name, i) for op, i in readers] == [("fc2", 0)]
    assert dg.chain("layer1").path_readers == []

    keep = np.array([0, 2, 3, 6, 7])
    s = np.linspace(0.5, 2.0, len(keep))
    apply_edit(dg.chain("layer0"), HiddenEdit.keep(8, keep, row_scale=s))
    np.testing.assert_allclose(dg.ops["fc2"].paths[0].factors[0], G[keep].astype(F32), rtol=1e-7)
    m2 = materialize(m1, dg)
    onnx.checker.check_model(m2, full_check=True)
    h0k = _relu((x @ p0["W"].T + p0["b"])[:, keep] * s)
    h1 = _relu(h0k @ p1["W"][:, keep].T + p1["b"])
    np.testing.assert_allclose(ort_run(m2, x.astype(F32))[0], h1 @ p2["W"].T + p2["b"] + h0k @ G[keep], atol=1e-5)


def test_producer_paths_follow_row_edits():
    """An op that owns a linear path and is then edited as a producer: the path's
    last factor gets the same row_map and row_scale as the weight rows."""
    model, params = build_mlp([5, 8, 6, 3], "relu", seed=20, form="matmul", return_params=True)
    rng = np.random.default_rng(3)
    F0, F1 = rng.standard_normal((5, 2)), rng.standard_normal((2, 6))
    m1 = _rewrite(model, {"layer0": HiddenEdit.keep(8, np.arange(8), new_paths=[LinearPath("x", [F0, F1])])})
    keep = np.array([0, 2, 5])
    s, t = np.array([0.5, -1.5, 2.0]), np.array([0.1, 0.2, -0.3])
    out = _rewrite(m1, {"layer1": HiddenEdit.keep(6, keep, row_scale=s, row_shift=t)})
    x = random_input(model, batch=7).astype(np.float64)
    p0, p1, p2 = params
    h0 = _relu(x @ p0["W"].T + p0["b"])
    z1 = (h0 @ p1["W"].T + p1["b"] + x @ F0 @ F1)[:, keep] * s + t
    ref = _relu(z1) @ p2["W"][:, keep].T + p2["b"]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], ref, atol=1e-5)


# --------------------------------------------------------------------------
# graph hygiene


def test_materialize_keeps_interface_and_dynamic_batch():
    model = build_mlp([5, 8, 3], "relu", form="gemm", seed=13)
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, np.array([1, 3, 5]))})
    for a, b in ((model.graph.input, out.graph.input), (model.graph.output, out.graph.output)):
        assert [v.name for v in a] == [v.name for v in b]
        assert [v.type.tensor_type.elem_type for v in a] == [v.type.tensor_type.elem_type for v in b]
        for va, vb in zip(a, b):
            assert va.type.tensor_type.shape == vb.type.tensor_type.shape
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    for batch in (1, 7):
        y = ort_run(out, random_input(model, batch=batch))[0]
        assert y.shape == (batch, 3) and y.dtype == np.float32


@pytest.mark.parametrize("const_nodes", [False, True])
@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_unused_constants_are_removed(form, const_nodes):
    model = build_mlp([5, 8, 3], "prelu", form=form, const_nodes=const_nodes, seed=14)
    keep = np.array([0, 1, 5])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep)})
    _assert_no_dead_constants(out)
    old = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    new = _init_names(out) | {o for n in out.graph.node if n.op_type == "Constant" for o in n.output}
    assert not (old & new), old & new  # every old weight, bias and slope is replaced
    # stored parameters: producer 3×5+3, consumer 3×3+3, slope 3
    n_params = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    assert n_params == 3 * 5 + 3 + 3 * 3 + 3 + 3


def test_value_info_of_changed_widths_is_dropped():
    """With shape-inferred value_info on every tensor, the rewritten model still
    passes the strict checker and runs."""
    for act in ("relu", "gelu_erf", "prelu", "silu"):
        model = onnx.shape_inference.infer_shapes(build_mlp([5, 8, 6, 3], act, form="matmul", seed=15))
        assert len(model.graph.value_info) > 0
        out = _rewrite(model, {"layer0": HiddenEdit.keep(8, np.arange(3)), "layer1": HiddenEdit.keep(6, np.arange(2))})
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(out, strict_mode=True), full_check=True)
        ort_run(out, random_input(model, batch=2))


def test_materialize_with_initializers_listed_as_graph_inputs():
    """Old exporters (keep_initializers_as_inputs) list every weight as a graph
    input too; the rewritten model must not ask the user to feed the removed ones."""
    model, params = build_mlp([5, 8, 3], "relu", seed=16, return_params=True)
    for t in model.graph.initializer:
        model.graph.input.append(tensor_info(t.name, F32, list(t.dims)))
    keep = np.array([0, 4, 7])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep)})
    x = random_input(model, batch=3)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], _edited_reference(params, x, keep), atol=1e-5)


def test_shared_constant_node_bias_survives_partial_rewrite():
    """Two layers reading the same Constant-node bias: rewriting one must not
    delete the constant the other still reads."""
    model, params = build_mlp([5, 6, 6, 3], "relu", seed=17, form="matmul", const_nodes=True, return_params=True)
    g = model.graph
    for n in g.node:  # fc1's bias Add reads fc0's bias constant; give both the same values
        if n.name == "fc1.add":
            n.input[1] = "fc0.bias"
    dead = next(n for n in g.node if n.op_type == "Constant" and n.output[0] == "fc1.bias")
    g.node.remove(dead)
    params[1]["b"] = params[0]["b"]
    keep = np.array([0, 2, 5])
    out = _rewrite(model, {"layer1": HiddenEdit.keep(6, keep)})
    x = random_input(model, batch=4).astype(np.float64)
    p0, p1, p2 = params
    h0 = _relu(x @ p0["W"].T + p0["b"])
    h1 = _relu(h0 @ p1["W"].T + p1["b"])[:, keep]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], h1 @ p2["W"][:, keep].T + p2["b"], atol=1e-5)


def test_weight_shared_with_an_unedited_layer_is_kept():
    model, params = build_mlp([6, 6, 6, 3], "relu", seed=22, return_params=True)
    for n in model.graph.node:  # fc1 reuses fc0's weight initializer (tied weights)
        if n.name == "fc1":
            n.input[1] = "fc0.B"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "fc1.B"))
    params[1]["W"] = params[0]["W"]
    keep = np.array([1, 3, 4])
    out = _rewrite(model, {"layer1": HiddenEdit.keep(6, keep)})
    assert "fc0.B" in _init_names(out)
    _assert_no_dead_constants(out)
    x = random_input(model, batch=4).astype(np.float64)
    p0, p1, p2 = params
    h1 = _relu(_relu(x @ p0["W"].T + p0["b"]) @ p1["W"].T + p1["b"])[:, keep]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], h1 @ p2["W"][:, keep].T + p2["b"], atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "prelu", "gelu_erf"])
def test_float16_model(act):
    model, params = build_mlp([6, 8, 4], act, form="matmul", seed=18, dtype=np.float16, return_params=True)
    keep = np.array([0, 3, 4, 6])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep)})
    for t in out.graph.initializer:
        assert t.data_type == onnx.TensorProto.FLOAT16, t.name
    x = random_input(model, batch=5)
    np.testing.assert_allclose(ort_run(out, x)[0].astype(np.float64), _edited_reference(params, x, keep),
                               atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------
# Identity / Dropout in the chain


@pytest.mark.parametrize("kind", ["Identity", "Dropout"])
@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_rewrite_through_identity_and_dropout(kind, form):
    model, params = build_passthrough_mlp(kind, form)
    model = onnx.shape_inference.infer_shapes(model)
    keep = np.array([0, 2, 3, 5])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(6, keep, row_shift=np.full(4, 0.25))})
    x = random_input(model, batch=7).astype(np.float64)
    p0, p1 = params
    h = _relu((x @ p0["W"].T + p0["b"])[:, keep] + 0.25)
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], h @ p1["W"][:, keep].T + p1["b"], atol=1e-5)
    assert find_dense_graph(out).chain("layer0").width == 4


def test_rewrite_of_model_with_unnamed_nodes():
    model, params = build_mlp([5, 8, 3], "prelu", form="matmul", seed=19, return_params=True)
    for n in model.graph.node:
        n.name = ""
    before = model.SerializeToString()
    dg = find_dense_graph(model)
    names = [(c.name, c.producer.name, c.consumer.name) for c in dg.chains]
    keep = np.array([1, 2, 6])
    apply_edit(dg.chain("layer0"), HiddenEdit.keep(8, keep))
    out = materialize(model, dg)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    x = random_input(model, batch=4)
    np.testing.assert_allclose(ort_run(out, x)[0], _edited_reference(params, x, keep), atol=1e-5)
    assert all(n.name for n in out.graph.node)
    dg2 = find_dense_graph(out)
    assert [(c.name, c.producer.name, c.consumer.name) for c in dg2.chains] == names


ACTS_ANY_MAP = ["relu", "leaky_relu", "tanh", "gelu_erf", "clip"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_linear_edits_match_numpy(data):
    """Arbitrary (non-selection) row_map / col_map with scale, shift and bias
    changes: the materialized model computes W1·C·f(s·(M·z) + t) + b1'."""
    act = data.draw(st.sampled_from(ACTS_ANY_MAP))
    form = data.draw(st.sampled_from(["gemm", "gemm_transB0", "matmul"]))
    n = data.draw(st.integers(2, 7))
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    model, params = build_mlp([4, n, 3], act, form=form, seed=seed, return_params=True,
                              bias=data.draw(st.booleans()))
    M, C = rng.standard_normal((k, n)), rng.standard_normal((n, k))
    kw = {}
    if data.draw(st.booleans()):
        kw["row_scale"] = rng.uniform(-2, 2, k)
    if data.draw(st.booleans()):
        kw["row_shift"] = rng.standard_normal(k)
    if data.draw(st.booleans()):
        kw["consumer_bias_delta"] = rng.standard_normal(3)
    out = _rewrite(model, {"layer0": HiddenEdit(row_map=M, col_map=C, **kw)})
    x = random_input(model, batch=6, seed=seed % 7).astype(np.float64)
    p0, p1 = params
    z = (x @ p0["W"].T + (0 if p0["b"] is None else p0["b"])) @ M.T
    z = z * kw.get("row_scale", 1.0) + kw.get("row_shift", 0.0)
    h = np_activation(act, z, p0["act_params"])
    ref = h @ (p1["W"] @ C).T + (0 if p1["b"] is None else p1["b"]) + kw.get("consumer_bias_delta", 0.0)
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], ref, atol=1e-4, rtol=1e-4)


def test_rewrite_residual_block():
    model, params = build_residual_mlp()
    keep = np.array([0, 3, 4, 7])
    out = _rewrite(model, {"layer0": HiddenEdit.keep(8, keep, consumer_bias_delta=np.full(4, 0.5))})
    x = random_input(model, batch=2).astype(np.float64)
    p0, p1 = params
    r = x + x
    block = _relu((r @ p0["W"].T + p0["b"])[..., keep]) @ p1["W"][:, keep].T + 0.5
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], r + block, atol=1e-5)
    # unedited, the block is what np_mlp says
    np.testing.assert_allclose(ort_run(model, x.astype(F32))[0], r + np_mlp(params, r), atol=1e-5)


# ---------------------------------------------------------------------------
# subgraphs read outer names implicitly: a weight only an If branch reads must stay


def _with_if_reading(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """Add an If node (condition a constant True) whose branches output
    Identity(``tensor``), an outer-scope initializer, as a second graph output."""
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(i for i in m.graph.initializer if i.name == tensor)

    def branch(name):
        return helper.make_graph([helper.make_node("Identity", [tensor], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", t.data_type, list(t.dims))])

    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["branch_out"], then_branch=branch("then"),
                                         else_branch=branch("else")))
    m.graph.output.append(helper.make_tensor_value_info("branch_out", t.data_type, list(t.dims)))
    return m


def _first_weight(model: onnx.ModelProto, node_name: str) -> str:
    return next(n for n in model.graph.node if n.name == node_name).input[1]


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_fold_keeps_a_weight_only_a_subgraph_reads(kind):
    """The fold replaces the producer's weight; the old one is then read only by
    the If branches, and must not be dropped: the model stays valid and runs."""
    from onnxfold.measure.data import load_calibration
    from onnxfold.passes.base import PassContext

    if kind == "dense":
        from onnxfold.passes.folding import FoldingPass

        base = build_mlp([6, 16, 3], seed=2)
        model = _with_if_reading(base, _first_weight(base, "fc0"))
        x = random_input(model, batch=64)
        fold = FoldingPass(ratio=0.5, repair="none")
    else:
        from test_channel_folding import chain_model

        from onnxfold.passes.channel_folding import ChannelFoldingPass

        base = chain_model(n=8, bn=False)
        model = _with_if_reading(base, _first_weight(base, "prod"))
        x = random_input(model, batch=16)
        fold = ChannelFoldingPass(ratio=0.5, repair="none")
    name = _first_weight(model, "fc0" if kind == "dense" else "prod")
    res = fold(model, PassContext(calibration=load_calibration({model.graph.input[0].name: x}, model)))
    assert res.changed and _first_weight(res.model, "fc0" if kind == "dense" else "prod") != name
    assert name in {t.name for t in res.model.graph.initializer}
    onnx.checker.check_model(res.model, full_check=True)
    branch = ort_run(res.model, {model.graph.input[0].name: x}, outputs=["branch_out"])[0]
    want = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    np.testing.assert_array_equal(branch, want)
