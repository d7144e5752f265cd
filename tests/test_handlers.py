"""The fold handlers (one per op kind) and the folding core they serve.

Every model is built inline; every expectation is an onnxruntime run of an
original model (or of a model the test writes by hand), or weights the test
itself wrote - never a value computed by the code under test. Duplicated
units make a merge exact, so a handler that merges the wrong rows, scales
them or sums the wrong columns changes the output.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import build_mlp, make_model, ort_run, tensor_info, with_outputs
from onnx import helper, numpy_helper
from test_channel_folding import chain_model, residual_model

from onnxfold.find.activations import ActivationSpec
from onnxfold.find.attention import Projection
from onnxfold.find.chains import find_dense_graph
from onnxfold.find.dense import LinearPath
from onnxfold.find.conv import find_conv_graph
from onnxfold.find.graph_index import GraphIndex
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.foldcore import FoldCore
from onnxfold.passes.handlers import HANDLERS, OpHandler, OutputRows, RowSource, handler_for
from onnxfold.passes.refit import FoldState
from onnxfold.passes.units import Member, UnitGroup, conv_chain_group, dense_group, residual_group
from onnxfold.rewrite import HiddenEdit, apply_edit, materialize
from onnxfold.rewrite.attention import ProjectionEdit, rewrite_projections
from onnxfold.rewrite.conv import materialize_convs


def _maps(labels):
    """Row map (cluster means) and column map (membership), written here."""
    labels = np.asarray(labels)
    k = labels.max() + 1
    member = np.zeros((labels.size, k))
    member[np.flatnonzero(labels >= 0), labels[labels >= 0]] = 1.0
    return member.T / np.maximum(member.sum(0), 1)[:, None], member


def _merge(group: UnitGroup, labels) -> None:
    R, C = _maps(labels)
    for m in group.producers + group.followers:
        m.handler.merge_rows(m.op, R, unit=m.unit)
    for m in group.consumers:
        m.handler.sum_columns(m.op, C, m.unit)


def _close(a, b, tol=1e-4):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ dense


def _dup_mlp(seed=0):
    """5 → 6 → 3, Relu; hidden neuron 4 is a copy of neuron 1 (row and bias)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((6, 5)), rng.standard_normal(6) * 0.1
    w1[4], b1[4] = w1[1], b1[1]
    w2, b2 = rng.standard_normal((3, 6)), rng.standard_normal(3) * 0.1
    return [(w1, b1), (w2, b2)]


def test_dense_handler_reads_merges_and_slices_like_onnxruntime():
    weights = _dup_mlp()
    model = build_mlp([5, 6, 3], weights=weights)
    view = find_dense_graph(model)
    group = dense_group(view.chains[0])
    own, readers = group.own_blocks(), group.reader_blocks()
    _close(own[0], weights[0][0], 1e-6)
    _close(own[1][:, 0], weights[0][1], 1e-6)
    _close(readers[0], weights[1][0].T, 1e-6)
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)

    _merge(group, [0, 1, 2, 3, 1, 4])  # the twins merge: exact
    folded = materialize(model, view)
    assert view.chains[0].producer.out_features == 5
    _close(ort_run(folded, x)[0], ort_run(model, x)[0])

    # a selection (neuron 2 pruned) equals the original with that neuron's outgoing column zeroed
    view = find_dense_graph(model)
    _merge(dense_group(view.chains[0]), [0, 1, -1, 2, 3, 4])
    w2 = weights[1][0].copy()
    w2[:, 2] = 0
    reference = build_mlp([5, 6, 3], weights=[weights[0], (w2, weights[1][1])])
    _close(ort_run(materialize(model, view), x)[0], ort_run(reference, x)[0])


def test_activation_slopes_and_path_reads_follow_the_merge():
    """PReLU slopes (a follower) and a linear path reading the hidden layer
    (a consumer through its first factor) merge with the dense neurons."""
    weights = _dup_mlp(seed=2)
    rng = np.random.default_rng(3)
    w2, b2 = rng.standard_normal((6, 6)), rng.standard_normal(6) * 0.1
    w3, b3 = rng.standard_normal((3, 6)), rng.standard_normal(3) * 0.1
    slope = rng.uniform(0.05, 0.5, 6)
    slope[4] = slope[1]
    base = build_mlp([5, 6, 6, 3], "prelu", act_params={"slope": slope}, weights=[*weights[:1], (w2, b2), (w3, b3)])
    # fc2 also reads h0 through a linear path: a reader of layer0's units
    view = find_dense_graph(base)
    apply_edit(view.chain("layer1"), HiddenEdit.keep(6, np.arange(6), new_paths=[
        LinearPath("h0", [rng.standard_normal((6, 3))])]))
    model = materialize(base, view)
    view = find_dense_graph(model)
    group = dense_group(view.chain("layer0"))
    assert [type(m.op).__name__ for m in group.consumers] == ["DenseOp", "PathRead"]
    _merge(group, [0, 1, 2, 3, 1, 4])
    folded = materialize(model, view)
    assert view.ops["fc2"].paths[0].factors[0].shape == (5, 3)
    x = np.random.default_rng(4).standard_normal((7, 5)).astype(np.float32)
    _close(ort_run(folded, x)[0], ort_run(model, x)[0])


def test_unit_group_keep_slices_every_member_by_its_handler():
    """``UnitGroup.keep`` (how linearity folding drops neurons): the producer's
    rows and bias, the PReLU slopes, the consumer's columns and a reading
    path's first-factor rows are the kept ones the test wrote, in order."""
    weights = _dup_mlp(seed=5)
    rng = np.random.default_rng(6)
    w2, b2 = rng.standard_normal((6, 6)), rng.standard_normal(6) * 0.1
    w3, b3 = rng.standard_normal((3, 6)), rng.standard_normal(3) * 0.1
    slope = rng.uniform(0.05, 0.5, 6)
    f0 = rng.standard_normal((6, 3))
    base = build_mlp([5, 6, 6, 3], "prelu", act_params={"slope": slope}, weights=[*weights[:1], (w2, b2), (w3, b3)])
    view = find_dense_graph(base)
    apply_edit(view.chain("layer1"), HiddenEdit.keep(6, np.arange(6), new_paths=[LinearPath("h0", [f0])]))
    view = find_dense_graph(materialize(base, view))
    chain = view.chain("layer0")
    keep = np.array([0, 2, 3, 5])
    dense_group(chain).keep(keep)
    (w1, b1) = weights[0]
    _close(chain.producer.weight, w1[keep], 1e-6)
    _close(chain.producer.bias, b1[keep], 1e-6)
    _close(chain.activation.slope, slope[keep], 1e-6)
    _close(chain.consumer.weight, w2[:, keep], 1e-6)
    _close(view.ops["fc2"].paths[0].factors[0], f0[keep], 1e-6)
    with pytest.raises(ValueError):
        dense_group(chain).keep(np.array([], dtype=np.int64))


def test_unit_groups_are_bound_to_the_find_side_description():
    """One description per group (find.groups.Group): the fold side's unit group
    holds it and takes its members from it by name; a name the finder's object
    does not have, or an op the description leaves out, is an error."""
    from dataclasses import replace

    from onnxfold.find.groups import describe_chain, find_groups
    from onnxfold.passes.units import bind_dense

    weights = _dup_mlp(seed=7)
    rng = np.random.default_rng(8)
    w2, b2 = rng.standard_normal((6, 6)), rng.standard_normal(6) * 0.1
    w3, b3 = rng.standard_normal((3, 6)), rng.standard_normal(3) * 0.1
    base = build_mlp([5, 6, 6, 3], weights=[*weights[:1], (w2, b2), (w3, b3)])
    view = find_dense_graph(base)
    apply_edit(view.chain("layer1"), HiddenEdit.keep(6, np.arange(6), new_paths=[
        LinearPath("h0", [rng.standard_normal((6, 3))])]))
    model = materialize(base, view)
    chain = find_dense_graph(model).chain("layer0")
    unit = dense_group(chain)
    listed = {g.name: g for g in find_groups(model).groups}["layer0"]
    # the same description find_groups lists for the search and the report
    assert unit.group == listed and listed.path_readers == [("fc2", 0)]
    assert [m.op.name for m in unit.producers] == listed.producers == ["fc0"]
    assert [m.handler.owner(m.op).name for m in unit.consumers] == ["fc1", "fc2"]
    with pytest.raises(ValueError, match="not in the finder's view"):
        bind_dense(replace(describe_chain(chain), producers=["fc9"]), chain)
    with pytest.raises(ValueError, match="path readers"):
        bind_dense(replace(describe_chain(chain), path_readers=[]), chain)


# ------------------------------------------------------------------ conv


def test_conv_handler_merges_channels_and_depthwise_followers_like_onnxruntime():
    model = chain_model(n=8, bn=True, depthwise=True, dup=True, seed=3)  # channel j + 4 twins channel j
    view = find_conv_graph(model)
    (chain,) = view.chains
    group = conv_chain_group(chain, GraphIndex(model))
    assert [m.op.name for m in group.followers] == ["dw"]
    _merge(group, np.r_[np.arange(4), np.arange(4)])
    folded = materialize_convs(model, view)
    onnx.checker.check_model(folded, full_check=True)
    dw = next(n for n in folded.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4
    x = np.random.default_rng(2).standard_normal((3, 3, 9, 9)).astype(np.float32)
    _close(ort_run(folded, x)[0], ort_run(model, x)[0])


def test_gemm_reader_and_residual_writers_merge_like_onnxruntime():
    model = residual_model(dup=True, pooled=True, seed=15)  # stream channel j + 3 twins channel j
    view = find_conv_graph(model)
    (grp,) = view.residual
    group = residual_group(grp, view, GraphIndex(model))
    assert {m.op.name for m in group.producers} == {"stem", "b_conv2"}
    assert [m.op.name for m in group.consumers] == ["b_conv1", "fc"]
    fc_w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.W"))
    _close(group.reader_blocks()[1], fc_w.T, 1e-6)  # a Gemm reads channel j through its column j
    _merge(group, np.r_[np.arange(3), np.arange(3)])
    folded = materialize_convs(model, view)
    x = np.random.default_rng(4).standard_normal((5, 3, 9, 9)).astype(np.float32)
    _close(ort_run(folded, x)[0], ort_run(model, x)[0])


# ------------------------------------------------------------------ projections


def _projection_model(unit=2, units=4, d_in=6, d_out=5, seed=0):
    """x [N, S, d_in] → MatMul(Bv) + bv → MatMul(Bo) → y; the rows of unit 3
    of v (and its columns of o) are copies of unit 1's."""
    rng = np.random.default_rng(seed)
    wv, bv, wo = rng.standard_normal((unit * units, d_in)), rng.standard_normal(unit * units), \
        rng.standard_normal((d_out, unit * units))
    wv[3 * unit:4 * unit], bv[3 * unit:4 * unit] = wv[unit:2 * unit], bv[unit:2 * unit]
    wo[:, 3 * unit:4 * unit] = wo[:, unit:2 * unit]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((wv.T, "Bv"), (bv, "bv"), (wo.T, "Bo"))]
    nodes = [helper.make_node("MatMul", ["x", "Bv"], ["v.mm"], name="v"),
             helper.make_node("Add", ["v.mm", "bv"], ["v.out"], name="v.add"),
             helper.make_node("MatMul", ["v.out", "Bo"], ["y"], name="o")]
    model = make_model(nodes, [tensor_info("x", np.float32, ["N", "S", d_in])],
                       [tensor_info("y", np.float32, ["N", "S", d_out])], inits)
    v = Projection("v", "x", "v.out", "Bv", wv.astype(np.float32).astype(np.float64), np.dtype(np.float32),
                   bias_node="v.add", bias_input="bv", bias_slot=1, bias=bv.astype(np.float32).astype(np.float64))
    o = Projection("o", "v.out", "y", "Bo", wo.astype(np.float32).astype(np.float64), np.dtype(np.float32))
    return model, v, o, (wv, bv, wo)


@pytest.mark.parametrize("unit", [1, 2])
def test_projection_handler_merges_unit_blocks_like_onnxruntime(unit):
    model, v, o, (wv, bv, wo) = _projection_model(unit=unit)
    h = handler_for(v)
    _close(h.weight_rows(v, unit)[3], wv[3 * unit:4 * unit].reshape(-1), 1e-6)
    _close(h.reader_block(o, unit)[3], wo[:, 3 * unit:4 * unit].T.reshape(-1), 1e-6)
    group = UnitGroup("blk", 4, producers=[Member(v, h, unit)], consumers=[Member(o, h, unit)])
    _merge(group, [0, 1, 2, 1])
    assert v.weight.shape == (3 * unit, 6) and o.weight.shape == (5, 3 * unit)
    folded = rewrite_projections(model, [ProjectionEdit(v, v.weight, v.bias), ProjectionEdit(o, o.weight, None)], [])
    x = np.random.default_rng(5).standard_normal((2, 3, 6)).astype(np.float32)
    _close(ort_run(folded, x)[0], ort_run(model, x)[0])


# ------------------------------------------------------------------ refit rows


def _streamed(model, names, x):
    outs = ort_run(with_outputs(model, names), x)
    return dict(zip(["y", *names], outs))


def test_refit_rows_of_each_op_kind_reproduce_its_output():
    """The rows a handler builds for the least-squares refit, times the op's
    own weights, give the op's output as onnxruntime computes it (so Y, what
    the refit must add to the fold, is 0 on an unchanged model)."""
    # dense: X = relu(pre-activation)
    model = build_mlp([5, 6, 3], weights=_dup_mlp())
    chain = find_dense_graph(model).chains[0]
    cons = dense_group(chain).consumers[0]
    # conv consumer: im2col patches; residual Gemm reader: pooled features
    conv_model = residual_model(seed=18, c=8, pooled=True)
    view = find_conv_graph(conv_model)
    conv_consumers = residual_group(view.residual[0], view, GraphIndex(conv_model)).consumers
    proj_model, _, o, _ = _projection_model()
    cases = [(model, cons, np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32))]
    cases += [(conv_model, m, np.random.default_rng(2).standard_normal((4, 3, 9, 9)).astype(np.float32))
              for m in conv_consumers]
    cases.append((proj_model, Member(o, handler_for(o), source=RowSource("v.out", np.float32)),
                  np.random.default_rng(3).standard_normal((2, 3, 6)).astype(np.float32)))
    for mdl, m, x in cases:
        w, b = m.handler.prior(m.op)
        rows, why = m.handler.refit_rows(m.op, m.source, b)
        assert not why
        tensors = _streamed(mdl, sorted(set(rows.current) | set(rows.original)), x)
        first_axis, [(X, Y, target)] = rows.rows(tensors, tensors)
        assert first_axis == x.shape[0]
        X = X[np.arange(X.shape[0])]  # every row (conv patches are taken by index: the refit draws some)
        _close(X @ w.T + b, target, 2e-4)
        _close(Y, np.broadcast_to(b, Y.shape) if isinstance(rows, OutputRows) else np.zeros_like(Y), 2e-4)


# ------------------------------------------------------------------ a new op kind


class TransposedDense:
    """A new op kind for the test: a MatMul whose weight is stored as the
    MatMul's own B (in × out), plus a bias - not a view onnxfold knows."""

    def __init__(self, model, node, bias_name, output):
        self.node = next(n for n in model.graph.node if n.name == node)
        inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        self.b_name, self.bias_name, self.output = self.node.input[1], bias_name, output
        self.B, self.bias, self.dtype = inits[self.b_name], inits[bias_name], np.dtype(np.float32)

    def bias_or_zero(self):
        return self.bias


class TransposedDenseHandler(OpHandler):
    """All it takes to fold, repair and refit the new kind."""

    def weight_rows(self, op, unit=1, units=None):
        return op.B.T

    def reader_block(self, op, unit=1, units=None):
        return op.B

    def merge_rows(self, op, row_map, scale=None, shift=None, unit=1):
        op.B, op.bias = op.B @ row_map.T, row_map @ op.bias
        if scale is not None:
            op.B, op.bias = op.B * scale, op.bias * scale
        if shift is not None:
            op.bias = op.bias + shift

    def sum_columns(self, op, col_map, unit=1):
        op.B = col_map.T @ op.B

    def prior(self, op):
        return op.B.T.copy(), op.bias.copy()

    def set_refit(self, op, weight, bias):
        op.B, op.bias = weight.T, bias

    def refit_rows(self, op, source, b_prior, out_map=None):
        return OutputRows(source.tensor, source.dtype, op.output, op.dtype, b_prior, source.activation), ""


def _write(model, ops):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    new = {name: arr for op in ops for name, arr in ((op.b_name, op.B), (op.bias_name, op.bias))}
    for t in out.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    return out


@pytest.mark.parametrize("repair", ["none", "ar", "ls"])
def test_a_new_op_kind_is_one_handler(repair):
    weights = _dup_mlp(seed=6) if repair != "ls" else [(np.random.default_rng(6).standard_normal((12, 5)),
                                                        np.zeros(12)), (np.random.default_rng(7).standard_normal((3, 12)),
                                                                        np.full(3, 0.5))]
    width = weights[0][0].shape[0]
    model = build_mlp([5, width, 3], form="matmul", weights=weights)
    prod, cons = TransposedDense(model, "fc0", "fc0.bias", "h0.pre"), TransposedDense(model, "fc1", "fc1.bias", "y")
    HANDLERS[TransposedDense] = TransposedDenseHandler()
    try:
        h = handler_for(prod)
        group = UnitGroup("layer0", width, producers=[Member(prod, h)],
                          consumers=[Member(cons, h, source=RowSource("h0.pre", np.float32, ActivationSpec("relu")))])
        rng = np.random.default_rng(8)
        calib = CalibrationSet({"x": rng.standard_normal((64, 5)).astype(np.float32)})
        state = FoldState(model, lambda release: _write(model, [prod, cons]))
        core = FoldCore(state, PassContext(calibration=calib, batch_size=16), select="kmeans",
                        repair=repair, seed=0)
        k = width - 1 if repair != "ls" else width // 2
        plan = core.plan(group, k)
        core.rewrite(group, plan)
        x = rng.standard_normal((9, 5)).astype(np.float32)
        ref = ort_run(model, x)[0]
        plain = ort_run(state.current_model(), x)[0]
        assert prod.B.shape == (5, k) and cons.B.shape == (k, 3)
        if repair != "ls":  # the twins merged: exact (Fold-AR's factor is 1 for identical rows)
            _close(plain, ref)
            return
        outcome, why = core.refit(group.consumers[0], "refit")
        assert not why and outcome.refit.lam is not None
        refit = ort_run(state.current_model(), x)[0]
        assert ((refit - ref) ** 2).mean() < 0.8 * ((plain - ref) ** 2).mean()
    finally:
        del HANDLERS[TransposedDense]
