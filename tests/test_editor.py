"""The graph editor every materializer writes through (rewrite/editor.py, on
onnx-graphsurgeon), and the three materializers on models with subgraphs.

Every model is built inline; reference numbers come from numpy or from a
model edited by hand with numpy slicing, and are compared with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import IR_VERSION, OPSET, build_mlp, make_model, ort_run, random_input, tensor_info
from onnx import TensorProto, helper, numpy_helper

from onnxfold.find import find_dense_graph
from onnxfold.find.attention import Projection, ShapeRef
from onnxfold.find.conv import find_conv_graph
from onnxfold.rewrite import HiddenEdit, apply_edit, materialize
from onnxfold.rewrite.attention import ProjectionEdit, ShapeEdit, rewrite_projections
from onnxfold.rewrite.conv import ChannelEdit, apply_channel_edit, materialize_convs
from onnxfold.rewrite.editor import GraphEditor
from onnxfold.tensors import defer_initializers, is_deferred, load_deferred

F32 = np.float32


def _linear(seed=0, n_in=4, n_out=3):
    """x[N, n_in] → MatMul(W) → Add(b) → y; returns (model, W, b)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm", doc_string="the product"),
             helper.make_node("Add", ["xw", "b"], ["y"], name="add")]
    model = make_model(nodes, [tensor_info("x", F32, ["N", n_in])], [tensor_info("y", F32, ["N", n_out])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    return model, W, b


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _valid(model):
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------
# editor operations


def test_input_swap_replaces_the_weight_and_drops_the_old_one():
    model, W, b = _linear()
    before = model.SerializeToString()
    W2 = np.arange(12, dtype=F32).reshape(4, 3) / 10
    ed = GraphEditor(model)
    ed.set_input(ed.node("mm"), 1, ed.initializer("W", W2))
    out = _valid(ed.to_model())
    assert model.SerializeToString() == before
    inits = _inits(out)
    assert "W" not in inits and set(inits) == {"b", "W_1"}  # fresh: "W" was taken
    x = random_input(model, batch=3)
    np.testing.assert_allclose(ort_run(out, x)[0], x @ W2 + b, rtol=1e-6, atol=1e-6)
    # the untouched node keeps its NodeProto (doc string); interface and model fields are the input's
    assert next(n for n in out.graph.node if n.name == "mm").doc_string == "the product"
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert out.producer_name == model.producer_name and out.opset_import == model.opset_import


def test_new_node_after_an_anchor_keeps_the_order():
    model, W, b = _linear(seed=1)
    ed = GraphEditor(model)
    mm = ed.node("mm")
    xw = mm.outputs[0]
    ed.set_output(mm, 0, ed.variable("xw"))
    ed.add_node("Relu", [mm.outputs[0]], [xw], name=ed.fresh("relu"), after=mm)
    out = _valid(ed.to_model())
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "Add"]
    x = random_input(model, batch=4)
    np.testing.assert_allclose(ort_run(out, x)[0], np.maximum(x @ W, 0) + b, rtol=1e-6, atol=1e-6)


def _two_branches():
    """y = Neg(Relu(x)) + Sigmoid(x), nodes listed branch by branch (not by depth)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), helper.make_node("Neg", ["a"], ["b"], name="neg"),
             helper.make_node("Sigmoid", ["x"], ["c"], name="sig"), helper.make_node("Add", ["b", "c"], ["y"], name="add")]
    return make_model(nodes, [tensor_info("x", F32, ["N", 3])], [tensor_info("y", F32, ["N", 3])])


def test_a_valid_order_is_kept_and_a_broken_one_is_sorted():
    model = _two_branches()
    out = _valid(GraphEditor(model).to_model())
    assert [n.name for n in out.graph.node] == ["relu", "neg", "sig", "add"]  # not by depth (sig first)
    ed = GraphEditor(model)
    sig = ed.node("sig")
    c = sig.outputs[0]
    ed.set_output(sig, 0, ed.variable("c_raw"))
    ed.add_node("Abs", [sig.outputs[0]], [c], name="abs")  # appended last, read by "add" before it
    out = _valid(ed.to_model())
    order = [n.name for n in out.graph.node]
    assert order.index("abs") < order.index("add")
    x = random_input(model, batch=2)
    np.testing.assert_allclose(ort_run(out, x)[0], -np.maximum(x, 0) + np.abs(1 / (1 + np.exp(-x))), rtol=1e-5)


def test_removed_node_takes_what_only_it_read_along():
    """Removing the bias Add frees its initializer and the Shape → Cast chain
    and Constant node that fed only it; the weight still read stays."""
    model, W, b = _linear(seed=2)
    g = model.graph
    g.node.extend([helper.make_node("Shape", ["x"], ["sx"], name="shape"),
                   helper.make_node("Cast", ["sx"], ["sxf"], name="cast", to=TensorProto.FLOAT),
                   helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(F32(1), "k")),
                   helper.make_node("Mul", ["xw", "k"], ["xk"], name="mul"),
                   helper.make_node("Sum", ["xk", "sxf"], ["unused"], name="sum")])
    ed = GraphEditor(model)
    add = ed.node("add")
    y = add.outputs[0]
    ed.remove(add)
    ed.set_output(ed.node("mm"), 0, y)
    out = _valid(ed.to_model())
    assert [n.name for n in out.graph.node] == ["mm"]
    assert set(_inits(out)) == {"W"}
    x = random_input(model, batch=2)
    np.testing.assert_allclose(ort_run(out, x)[0], x @ W, rtol=1e-6, atol=1e-6)


def test_attribute_set_on_an_original_node_keeps_its_other_fields():
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[0, 1], doc_string="keep me")],
                       [tensor_info("x", F32, [2, 3])], [tensor_info("y", F32, [3, 2])])
    ed = GraphEditor(model)
    ed.set_attr(ed.node("t"), "perm", [1, 0])
    out = _valid(ed.to_model())
    node = out.graph.node[0]
    assert node.doc_string == "keep me" and list(helper.get_attribute_value(node.attribute[0])) == [1, 0]
    x = random_input(model)
    np.testing.assert_array_equal(ort_run(out, x)[0], x.T)


def test_unnamed_nodes_get_the_names_find_uses():
    model, W, b = _linear(seed=3)
    for n in model.graph.node:
        n.name = ""
    out = GraphEditor(model).to_model()
    assert [n.name for n in out.graph.node] == ["MatMul_0", "Add_1"]
    assert all(not n.name for n in model.graph.node)


def _with_if(model: onnx.ModelProto, reads: str, inner: str = "inner") -> onnx.ModelProto:
    """``model`` plus an If (condition a constant True) whose two branches
    output Identity(``reads``), an outer initializer, through a branch-local
    tensor named ``inner``; the If's output becomes a second graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(i for i in m.graph.initializer if i.name == reads)

    def branch(name):
        return helper.make_graph([helper.make_node("Identity", [reads], [f"{inner}_{name}"], name=f"{inner}_node")],
                                 name, [], [helper.make_tensor_value_info(f"{inner}_{name}", t.data_type,
                                                                          list(t.dims))])

    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["branch_out"], name="if",
                                         then_branch=branch("then"), else_branch=branch("else")))
    m.graph.output.append(helper.make_tensor_value_info("branch_out", t.data_type, list(t.dims)))
    return m


def _assert_branch_reads_original(out, model, name, feeds):
    """The branch output is the original initializer, which is stored once, in the main graph."""
    want = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    np.testing.assert_array_equal(ort_run(out, feeds, outputs=["branch_out"])[0], want)
    assert [t.name for t in out.graph.initializer].count(name) == 1
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    assert all(len(a.g.initializer) == 0 for a in if_node.attribute)


def test_fresh_names_avoid_names_only_a_subgraph_uses():
    model, W, b = _linear(seed=4)
    model = _with_if(model, "b", inner="W_1")  # branch tensors W_1_then / W_1_else, branch nodes W_1_node
    ed = GraphEditor(model)
    taken = {"W_1_then", "W_1_else", "W_1_node", "W", "b", "x", "y", "mm", "if"}
    names = [ed.fresh(n) for n in sorted(taken)]
    assert not set(names) & taken and len(set(names)) == len(names)


def test_deferred_initializers_stay_unloaded(tmp_path):
    model, W, b = _linear(seed=5, n_in=64, n_out=32)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    loaded = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    assert defer_initializers(loaded, tmp_path) == 2
    before = loaded.SerializeToString()
    b2 = np.full(32, 0.5, F32)
    ed = GraphEditor(loaded)
    ed.set_input(ed.node("add"), 1, ed.initializer("b", b2))
    out = ed.to_model()
    assert loaded.SerializeToString() == before
    w = next(t for t in out.graph.initializer if t.name == "W")
    assert is_deferred(w) and not w.raw_data  # still the stub: its file was not read into the proto
    x = random_input(model, batch=3)
    np.testing.assert_allclose(ort_run(_valid(load_deferred(out)), x)[0], x @ W + b2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# the three materializers: a weight only an If branch still reads is kept


def test_materialize_keeps_a_weight_only_a_subgraph_reads():
    base, params = build_mlp([5, 8, 3], "relu", form="gemm", seed=6, return_params=True)
    weight = next(n for n in base.graph.node if n.name == "fc0").input[1]
    model = _with_if(base, weight, inner="fc0.onnxfold.weight")  # also: the new weight's name is taken inside
    before = model.SerializeToString()
    keep = np.array([0, 2, 3, 7])
    dg = find_dense_graph(model)
    apply_edit(dg.chain("layer0"), HiddenEdit.keep(8, keep))
    out = _valid(materialize(model, dg))
    assert model.SerializeToString() == before
    assert next(n for n in out.graph.node if n.name == "fc0").input[1] != weight
    x = random_input(model, batch=4).astype(np.float64)
    p0, p1 = params
    h = np.maximum(x @ p0["W"].T + p0["b"], 0)[:, keep]
    np.testing.assert_allclose(ort_run(out, x.astype(F32))[0], h @ p1["W"][:, keep].T + p1["b"], atol=1e-5)
    _assert_branch_reads_original(out, model, weight, {"x": x.astype(F32)})


def _conv_chain(seed=7, n=6):
    """x → Conv(3→n) → Relu → Conv(n→2) → y; returns (model, initializer arrays)."""
    rng = np.random.default_rng(seed)
    arrays = {"p.W": rng.standard_normal((n, 3, 3, 3)).astype(F32), "p.B": rng.standard_normal(n).astype(F32),
              "c.W": rng.standard_normal((2, n, 3, 3)).astype(F32), "c.B": rng.standard_normal(2).astype(F32)}
    nodes = [helper.make_node("Conv", ["x", "p.W", "p.B"], ["h"], name="prod", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c.W", "c.B"], ["y"], name="cons", kernel_shape=[3, 3], pads=[1] * 4)]
    model = make_model(nodes, [tensor_info("x", F32, ["N", 3, 5, 5])], [tensor_info("y", F32, ["N", 2, 5, 5])],
                       [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return model, arrays


def test_materialize_convs_keeps_a_weight_only_a_subgraph_reads():
    base, arrays = _conv_chain()
    model = _with_if(base, "p.W")
    before = model.SerializeToString()
    keep = np.array([1, 2, 4])
    sel = np.eye(6)[keep]
    view = find_conv_graph(model)
    apply_channel_edit(view.chains[0], ChannelEdit(row_map=sel, col_map=sel.T))
    out = _valid(materialize_convs(model, view))
    assert model.SerializeToString() == before
    sliced = dict(arrays, **{"p.W": arrays["p.W"][keep], "p.B": arrays["p.B"][keep], "c.W": arrays["c.W"][:, keep]})
    ref, _ = _conv_chain()
    for t in ref.graph.initializer:  # the same graph, its channels dropped by hand
        t.CopyFrom(numpy_helper.from_array(sliced[t.name], t.name))
    x = random_input(model, batch=2)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(ref, x)[0], rtol=1e-5, atol=1e-5)
    _assert_branch_reads_original(out, model, "p.W", {"x": x})


def _projection_reshape(seed=8, shape=(0, 2, 3)):
    """x[N, 6] → MatMul(W) → Add(B) → Reshape(shape) → y."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((6, 6)).astype(F32)
    B = rng.standard_normal(6).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "B"], ["lin"], name="bias"),
             helper.make_node("Reshape", ["lin", "shape"], ["y"], name="split")]
    model = make_model(nodes, [tensor_info("x", F32, ["N", 6])], [tensor_info("y", F32, ["N", "h", "d"])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"),
                        numpy_helper.from_array(np.array(shape, np.int64), "shape")])
    return model, W, B


@pytest.mark.parametrize("read_by_branch", ["W", "shape"])
def test_rewrite_projections_keeps_a_tensor_only_a_subgraph_reads(read_by_branch):
    base, W, B = _projection_reshape()
    model = _with_if(base, read_by_branch)
    before = model.SerializeToString()
    proj = Projection(node="proj", input="x", output="lin", weight_input="W", weight=W.T.astype(np.float64),
                      dtype=np.dtype(F32), bias_node="bias", bias_input="B", bias_slot=1, bias=B.astype(np.float64))
    rng = np.random.default_rng(9)
    W2, B2 = rng.standard_normal((4, 6)), rng.standard_normal(4)  # out × in: two heads of 2
    out = _valid(rewrite_projections(model, [ProjectionEdit(proj, W2, B2)],
                                     [ShapeEdit(ShapeRef("split", 2, 3, 1), 2)], {"proj", "bias", "split"}))
    assert model.SerializeToString() == before
    x = random_input(model, batch=3)
    want = (x.astype(np.float64) @ W2.T + B2).reshape(3, 2, 2)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    _assert_branch_reads_original(out, model, read_by_branch, {"x": x})


def test_rewrite_projections_adds_a_bias_where_there_was_none():
    model, W, _ = _projection_reshape(seed=10)
    g = model.graph
    g.node.remove(next(n for n in g.node if n.name == "bias"))
    next(n for n in g.node if n.name == "split").input[0] = "mm"
    g.initializer.remove(next(t for t in g.initializer if t.name == "B"))
    g.value_info.append(tensor_info("mm", F32, ["N", 6]))  # a shape hint the rewrite must drop (width 6 → 4)
    proj = Projection(node="proj", input="x", output="mm", weight_input="W", weight=W.T.astype(np.float64),
                      dtype=np.dtype(F32))
    W2, B2 = np.ones((4, 6)), np.arange(4.0)
    out = _valid(rewrite_projections(model, [ProjectionEdit(proj, W2, B2)],
                                     [ShapeEdit(ShapeRef("split", 2, 3, 1), 2)], {"proj", "split"}))
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Reshape"]
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(out, strict_mode=True), full_check=True)
    x = random_input(model, batch=2)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], (x @ W2.T + B2).reshape(2, 2, 2), rtol=1e-5, atol=1e-5)


def test_two_shape_edits_of_one_constant_compose():
    model, W, B = _projection_reshape(seed=11, shape=(0, 6, 1))
    proj = Projection(node="proj", input="x", output="lin", weight_input="W", weight=W.T.astype(np.float64),
                      dtype=np.dtype(F32), bias_node="bias", bias_input="B", bias_slot=1, bias=B.astype(np.float64))
    W2, B2 = np.full((4, 6), 0.5), np.arange(4.0)
    out = _valid(rewrite_projections(model, [ProjectionEdit(proj, W2, B2)],
                                     [ShapeEdit(ShapeRef("split", 1, 6, 1), 2), ShapeEdit(ShapeRef("split", 2, 1, 1), 2)],
                                     {"proj", "bias", "split"}))
    x = random_input(model, batch=3)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], (x @ W2.T + B2).reshape(3, 2, 2), rtol=1e-5, atol=1e-5)
