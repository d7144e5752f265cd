"""Conv channel folding: coupling analysis, rewrite and the pass end to end.

Models are built inline with onnx.helper (ir_version 8, opset 17); every
expectation comes from onnxruntime runs of the original model or from plain
numpy written here, never from the code under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, tensor_info, with_outputs
from onnx import helper, numpy_helper

from onnxfold.decide import channels as dch
from onnxfold.errors import UsageError
from onnxfold.find.conv import find_conv_graph
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.channel_folding import ChannelFoldingPass
from onnxfold.rewrite.conv import ChannelEdit, apply_channel_edit, materialize_convs

MODELS = Path(__file__).resolve().parents[1] / "models"
H = W = 9


def _x(batch, c=3, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, c, H, W)).astype(np.float32)


def _ctx(x=None):
    return PassContext(calibration=None if x is None else CalibrationSet({"x": x}), batch_size=16)


class _G:
    """Tiny graph builder: nodes + float32 initializers."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def conv(self, name, inp, w, b=None, group=1, pads=(1, 1, 1, 1), strides=(1, 1)):
        ins = [inp, self.const(f"{name}.W", w)] + ([self.const(f"{name}.B", b)] if b is not None else [])
        self.nodes.append(helper.make_node("Conv", ins, [f"{name}.out"], name=name, group=group,
                                           kernel_shape=list(np.shape(w)[2:]), pads=list(pads),
                                           strides=list(strides)))
        return f"{name}.out"

    def bn(self, name, inp, gamma, beta, mean, var, eps=1e-5):
        ins = [inp] + [self.const(f"{name}.{k}", v) for k, v in
                       (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        self.nodes.append(helper.make_node("BatchNormalization", ins, [f"{name}.out"], name=name, epsilon=eps))
        return f"{name}.out"

    def op(self, kind, name, *ins, **attrs):
        self.nodes.append(helper.make_node(kind, list(ins), [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def model(self, out, c_in=3, c_out=None):
        self.nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
        return make_model(self.nodes, [tensor_info("x", np.float32, ["N", c_in, H, W])],
                          [tensor_info("y", np.float32, ["N", c_out, H, W])], self.inits)


def _rand_bn(rng, n):
    return (rng.uniform(0.5, 2.0, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n), rng.uniform(0.3, 2.0, n))


def chain_model(n=8, *, bn=True, depthwise=False, dup=False, seed=0, c_in=3, c_out=5, grouped=False):
    """x → Conv(c_in→n)[→BN] → Relu [→ depthwise Conv(n)→BN→Relu | grouped Conv] → Conv(n→c_out) → y.

    dup: every hidden channel j has an exact twin j + n/2 (kernel, bias, BN
    statistics and depthwise kernel duplicated)."""
    rng = np.random.default_rng(seed)
    half = n // 2 if dup else n
    src = np.r_[np.arange(half), np.arange(half)] if dup else np.arange(n)
    wp, bp = rng.standard_normal((half, c_in, 3, 3))[src], rng.normal(0, 0.3, half)[src]
    g = _G()
    t = g.conv("prod", "x", wp, bp)
    if bn:
        t = g.bn("prod_bn", t, *(p[src] for p in _rand_bn(rng, half)), eps=1e-3)
    t = g.op("Relu", "relu1", t)
    if depthwise:
        t = g.conv("dw", t, rng.standard_normal((half, 1, 3, 3))[src], rng.normal(0, 0.3, half)[src], group=n)
        t = g.bn("dw_bn", t, *(p[src] for p in _rand_bn(rng, half)))
        t = g.op("Relu", "relu2", t)
    if grouped:
        t = g.conv("grp", t, rng.standard_normal((n, n // 2, 3, 3)), group=2)
        t = g.op("Relu", "relu3", t)
    t = g.conv("cons", t, rng.standard_normal((c_out, n, 3, 3)) * 0.5, rng.normal(0, 0.3, c_out))
    return g.model(t, c_in, c_out)


def residual_model(seed=3, c=6, n=10, dup=False, pooled=False):
    """stem Conv(3→c)-Relu = s; s + Conv(n→c)(Relu(Conv(c→n)(s))) → Relu → head Conv(c→4)
    (pooled: GlobalAveragePool → Flatten → Gemm(c→4) instead).

    dup: the stream's channel j and j + c/2 are exact twins (stem and b_conv2
    rows, biases and BN statistics duplicated)."""
    rng = np.random.default_rng(seed)
    half = c // 2 if dup else c
    src = np.r_[np.arange(half), np.arange(half)] if dup else np.arange(c)
    g = _G()
    s = g.op("Relu", "stem_relu", g.conv("stem", "x", rng.standard_normal((half, 3, 3, 3))[src],
                                         rng.normal(0, .3, half)[src]))
    h = g.op("Relu", "b_relu", g.bn("b_bn", g.conv("b_conv1", s, rng.standard_normal((n, c, 3, 3))),
                                    *_rand_bn(rng, n)))
    r = g.bn("b_bn2", g.conv("b_conv2", h, rng.standard_normal((half, n, 3, 3))[src] * 0.3),
             *(p[src] for p in _rand_bn(rng, half)))
    a = g.op("Relu", "post", g.op("Add", "join", r, s))
    if pooled:
        f = g.op("Flatten", "flat", g.op("GlobalAveragePool", "gap", a), axis=1)
        out = g.op("Gemm", "fc", f, g.const("fc.W", rng.standard_normal((4, c))), g.const("fc.b", rng.normal(0, .3, 4)),
                   transB=1)
        g.nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
        return make_model(g.nodes, [tensor_info("x", np.float32, ["N", 3, H, W])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], g.inits)
    out = g.conv("head", a, rng.standard_normal((4, c, 3, 3)), rng.normal(0, .3, 4))
    return g.model(out, 3, 4)


def _run(model, x):
    return ort_run(model, {"x": x})[0]


def _op_types(model):
    return [n.op_type for n in model.graph.node]


def _kernel(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    init = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(init[node.input[1]])


# ------------------------------------------------------------------ decide/


def test_im2col_matches_onnxruntime_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    pads, strides, dil = (1, 0, 2, 1), (2, 1), (2, 1)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=list(pads), strides=list(strides),
                            dilations=list(dil), kernel_shape=[3, 2])
    m = make_model([node], [tensor_info("x", np.float32, ["N", 3, 11, 10])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    ref = _run(m, x)
    cols = dch.im2col(x.astype(np.float64), (3, 2), strides, pads, dil)
    got = cols @ w.reshape(4, -1).T.astype(np.float64) + b
    np.testing.assert_allclose(got, dch.nchw_rows(ref), rtol=1e-4, atol=1e-4)
    # the rows a refit draws, copied out alone, against onnxruntime's outputs at those positions
    lazy = dch.PatchRows(x, (3, 2), strides, pads, dil)
    assert lazy.shape == cols.shape
    idx = np.sort(rng.choice(cols.shape[0], 17, replace=False))
    picked = lazy[idx].astype(np.float64) @ w.reshape(4, -1).T.astype(np.float64) + b
    np.testing.assert_allclose(picked, dch.nchw_rows(ref)[idx], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(lazy[np.arange(cols.shape[0])], cols.astype(np.float32))
    with pytest.raises(TypeError):
        lazy[idx > 3]


def test_channel_labels_merge_exact_duplicates_whatever_their_readers():
    rng = np.random.default_rng(1)
    own = rng.standard_normal((4, 5))[[0, 1, 2, 3, 0, 1, 2, 3]]  # channel j and j+4 compute the same values
    readers = rng.standard_normal((8, 30)) * 100  # ... but are read very differently
    labels = dch.channel_labels(own, readers, 4, seed=0)
    assert np.array_equal(labels, [0, 1, 2, 3, 0, 1, 2, 3])
    # fewer clusters than distinct channels: twins still share one, clusters numbered by first member
    labels = dch.channel_labels(own, readers, 2, seed=0)
    assert np.array_equal(labels[:4], labels[4:]) and labels[0] == 0 and labels.max() == 1


def test_ratio_for_sparsity_reaches_target():
    # three chains of width 32, 100 params per channel, 10 fixed
    r, share = dch.ratio_for_sparsity(0.5, [32] * 3, [100] * 3, [10] * 3)
    assert abs(share - 0.5) < 0.02
    assert r == pytest.approx(0.5, abs=0.01)
    r0, share0 = dch.ratio_for_sparsity(0.0, [32], [100], [10])
    assert (r0, share0) == (0.0, 0.0)


# ------------------------------------------------------------------ find


def test_bn_is_folded_into_the_conv_view():
    m = chain_model(bn=True, seed=4)
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    gamma, beta, mean, var = (init[f"prod_bn.{k}"] for k in ("gamma", "beta", "mean", "var"))
    s = gamma / np.sqrt(var + 1e-3)  # the model's epsilon
    view = find_conv_graph(m)
    (chain,) = view.chains
    assert chain.producer.bn == "prod_bn"
    np.testing.assert_allclose(chain.producer.weight, init["prod.W"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(chain.producer.bias, (init["prod.B"] - mean) * s + beta, rtol=1e-6)


def test_identity_edit_folds_bn_and_keeps_outputs():
    """The coupled group (producer, depthwise, consumer) rewritten with an
    identity assignment (r = 0) computes the same function, without BN nodes."""
    m = chain_model(bn=True, depthwise=True, seed=5)
    view = find_conv_graph(m)
    (chain,) = view.chains
    assert [op.name for op, _ in chain.mids] == ["dw"]
    eye = np.eye(chain.width)
    apply_channel_edit(chain, ChannelEdit(row_map=eye, col_map=eye))
    out = materialize_convs(m, view)
    onnx.checker.check_model(out, full_check=True)
    assert "BatchNormalization" not in _op_types(out)
    assert [n.name for n in out.graph.node if n.op_type == "Conv"] == ["prod", "dw", "cons"]
    x = _x(6)
    np.testing.assert_allclose(_run(out, x), _run(m, x), rtol=1e-4, atol=1e-4)


def test_pass_with_ratio_zero_is_identity():
    m = chain_model(bn=True, depthwise=True, seed=6)
    res = ChannelFoldingPass(0.0, repair="none")(m, _ctx())
    assert not res.changed
    x = _x(4)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
    assert res.layers[0].width_after == res.layers[0].width_before == 8


# ------------------------------------------------------------------ folding


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_duplicate_channels_fold_losslessly(depthwise, repair):
    m = chain_model(n=8, bn=True, depthwise=depthwise, dup=True, seed=7)
    res = ChannelFoldingPass(0.5, repair=repair)(m, _ctx())
    assert res.changed
    onnx.checker.check_model(res.model, full_check=True)
    assert _kernel(res.model, "prod").shape[0] == 4
    assert _kernel(res.model, "cons").shape[1] == 4
    if depthwise:
        dw = next(n for n in res.model.graph.node if n.name == "dw")
        assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4
        assert _kernel(res.model, "dw").shape == (4, 1, 3, 3)
    x = _x(5)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    rep = res.layers[0]
    assert (rep.width_before, rep.width_after, rep.merged) == (8, 4, 4)
    assert rep.params_after < rep.params_before


def test_non_duplicate_fold_is_lossy_and_ls_recovers():
    """A fold of distinct channels changes the output (the test can fail); the
    least-squares refit of the consumer brings it closer to the original."""
    m = chain_model(n=12, bn=True, seed=8)
    calib, test = _x(48, seed=2), _x(16, seed=3)
    ref = _run(m, test)

    def err(model):
        return float(((_run(model, test) - ref) ** 2).sum() / ((ref - ref.mean()) ** 2).sum())

    plain = ChannelFoldingPass(0.5, repair="none")(m, _ctx())
    ls = ChannelFoldingPass(0.5, repair="ls")(m, _ctx(calib))
    assert err(plain.model) > 1e-3
    assert err(ls.model) < 0.75 * err(plain.model)
    assert ls.layers[0].note.startswith("ls:")


def test_repair_matches_cluster_moments():
    """REPAIR: each merged channel's pre-activation has the mean/std of the
    mean over its cluster of the original channels' mean/std (on the data)."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal((4, 3, 3, 3)) * 3
    # pairs (j, j+4): similar enough to be clustered together, different enough
    # that their average has a smaller spread (so REPAIR must scale and shift)
    wp = np.concatenate([base, base + 2.5 * rng.standard_normal(base.shape)])
    b = rng.normal(2.0, .3, 4)
    bp = np.r_[b, b + 0.3]
    g = _G()
    t = g.op("Relu", "relu", g.conv("prod", "x", wp, bp))
    t = g.conv("cons", t, 0.05 * rng.standard_normal((5, 8, 3, 3)))
    m = g.model(t, 3, 5)
    x = _x(40, seed=11)
    res = ChannelFoldingPass(0.5, repair="repair")(m, _ctx(x))
    pre_orig = ort_run(with_outputs(m, ["prod.out"]), {"x": x})[1]
    pre_new = ort_run(with_outputs(res.model, ["prod.out"]), {"x": x})[1]
    assert pre_new.shape[1] == 4
    mo, so = pre_orig.mean(axis=(0, 2, 3)), pre_orig.std(axis=(0, 2, 3))
    want_mean = (mo[:4] + mo[4:]) / 2
    want_std = (so[:4] + so[4:]) / 2
    plain = ChannelFoldingPass(0.5, repair="none")(m, _ctx(x))
    pre_plain = ort_run(with_outputs(plain.model, ["prod.out"]), {"x": x})[1]
    assert np.all(pre_plain.std(axis=(0, 2, 3)) < 0.97 * want_std)  # the plain fold does lose spread
    np.testing.assert_allclose(pre_new.mean(axis=(0, 2, 3)), want_mean, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pre_new.std(axis=(0, 2, 3)), want_std, rtol=1e-3, atol=1e-3)


def test_magnitude_keeps_largest_kernels():
    rng = np.random.default_rng(12)
    m = chain_model(n=8, bn=False, seed=12)
    # rescale channels so the kept ones are known: norms grow with the index
    for t in m.graph.initializer:
        if t.name == "prod.W":
            w = numpy_helper.to_array(t) * (1.0 + np.arange(8))[:, None, None, None]
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    w_orig = _kernel(m, "prod")
    res = ChannelFoldingPass(0.5, select="magnitude", repair="none")(m, _ctx())
    np.testing.assert_allclose(_kernel(res.model, "prod"), w_orig[4:], rtol=1e-6)
    np.testing.assert_allclose(_kernel(res.model, "cons"), _kernel(m, "cons")[:, 4:], rtol=1e-6)
    assert res.layers[0].pruned == 4
    del rng


# ------------------------------------------------------------------ coupling


def test_residual_stream_is_reported_and_left_alone():
    m = residual_model()
    view = find_conv_graph(m)
    assert [(c.producer.name, c.consumer.name) for c in view.chains] == [("b_conv1", "b_conv2")]
    (grp,) = view.residual
    assert set(grp.producers) == {"stem", "b_conv2"}
    assert set(grp.readers) == {"b_conv1", "head"}
    assert grp.joins == ["join"] and grp.width == 6
    x = _x(8, seed=4)
    res = ChannelFoldingPass(0.5, repair="ls")(m, _ctx(x))
    assert res.changed
    assert any("residual" in n and "join" in n for n in res.notes)
    # stream channels untouched: stem/head kernels identical, b_conv2 still writes 6 channels
    for name in ("stem", "head"):
        np.testing.assert_array_equal(_kernel(res.model, name), _kernel(m, name))
    assert _kernel(res.model, "b_conv2").shape[:2] == (6, 5)
    assert _kernel(res.model, "b_conv1").shape[0] == 5
    with pytest.raises(UsageError, match="residual7"):
        ChannelFoldingPass({"residual7": 0.5}, fold_residual=True)(m, _ctx())


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_fold_residual_duplicates_is_lossless(pooled, repair):
    """fold_residual: the stream's twin channels merge with one assignment in
    every writer (stem, b_conv2) and every reader (b_conv1, head / Gemm)."""
    m = residual_model(dup=True, pooled=pooled, seed=15)
    view = find_conv_graph(m)
    (grp,) = view.residual
    assert grp.foldable, grp.reason
    res = ChannelFoldingPass({"residual0": 0.5}, repair=repair, fold_residual=True)(m, _ctx())
    assert res.changed
    onnx.checker.check_model(res.model, full_check=True)
    assert _kernel(res.model, "stem").shape[0] == 3 and _kernel(res.model, "b_conv2").shape[0] == 3
    assert _kernel(res.model, "b_conv1").shape[1] == 3
    if pooled:
        assert _kernel(res.model, "fc").shape == (4, 3)
    else:
        assert _kernel(res.model, "head").shape[1] == 3
    x = _x(5, seed=16)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert any("residual0" in n and "shared assignment" in n for n in res.notes)


def test_fold_residual_ls_refits_stream_readers():
    m = residual_model(seed=18, c=8, pooled=True)
    calib, test = _x(48, seed=19), _x(16, seed=20)
    ref = _run(m, test)

    def err(model):
        return float(((_run(model, test) - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())

    plain = ChannelFoldingPass({"residual0": 0.5}, repair="none", fold_residual=True)(m, _ctx())
    ls = ChannelFoldingPass({"residual0": 0.5}, repair="ls", fold_residual=True)(m, _ctx(calib))
    assert _kernel(ls.model, "fc").shape == (4, 4)
    assert err(plain.model) > 1e-3
    assert err(ls.model) < 0.75 * err(plain.model)
    assert "fc: ls:" in ls.layers[0].note and "b_conv1: ls:" in ls.layers[0].note


def test_fold_residual_not_done_by_default_and_unsupported_stream_reported():
    m = residual_model(dup=True, seed=17)
    res = ChannelFoldingPass(0.5, repair="none")(m, _ctx())
    assert _kernel(res.model, "stem").shape[0] == 6  # twins, yet left alone: not asked for
    # a stream that is also a graph output cannot be folded: reported, untouched
    m.graph.output.append(helper.make_tensor_value_info("post.out", onnx.TensorProto.FLOAT, None))
    (grp,) = find_conv_graph(m).residual
    assert not grp.foldable and "graph output" in grp.reason
    res = ChannelFoldingPass({"residual0": 0.5}, repair="none", fold_residual=True)(m, _ctx())
    assert not res.changed
    assert any("residual0" in n and "graph output" in n for n in res.notes)


def test_dynamic_batch_shapes():
    m = residual_model(seed=5)
    res = ChannelFoldingPass(0.5, repair="ls")(m, _ctx(_x(12, seed=6)))
    onnx.checker.check_model(res.model, full_check=True)
    onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    x7 = _x(7, seed=7)
    y7 = _run(res.model, x7)
    y1 = _run(res.model, x7[3:4])
    assert y7.shape == (7, 4, H, W) and y1.shape == (1, 4, H, W)
    np.testing.assert_allclose(y1[0], y7[3], rtol=1e-5, atol=1e-5)
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_unsupported_grouped_conv_left_untouched_and_reported():
    m = chain_model(n=8, bn=True, grouped=True, seed=13)
    res = ChannelFoldingPass(0.5, repair="ar")(m, _ctx())
    assert not res.changed
    assert res.model.SerializeToString() == m.SerializeToString()
    assert any("prod" in n and "grouped" in n for n in res.notes)
    # the grouped conv's own output feeds the consumer: not a producer either
    assert any("grp" in n and "group=2" in n for n in res.notes)


def test_hidden_read_twice_is_not_folded():
    m = chain_model(n=8, bn=False, seed=14)
    # also expose the hidden activation as a second reader (a graph output)
    m.graph.output.append(helper.make_tensor_value_info("relu1.out", onnx.TensorProto.FLOAT, None))
    res = ChannelFoldingPass(0.5, repair="none")(m, _ctx())
    assert not res.changed
    assert any("graph output" in n for n in res.notes)


# ------------------------------------------------------------------ shipped CNN


@pytest.mark.skipif(not (MODELS / "mnist_resnet.onnx").exists(), reason="mnist_resnet not built")
def test_shipped_cnn_folded_half_keeps_accuracy():
    m = onnx.load(str(MODELS / "mnist_resnet.onnx"))
    with np.load(MODELS / "mnist_resnet.calib.npz") as f:
        calib = CalibrationSet({"input": f["input"]})
    with np.load(MODELS / "mnist_resnet.test.npz") as f:
        xt, yt = f["input"], f["labels"]
    assert "BatchNormalization" in _op_types(m)
    res = ChannelFoldingPass(0.5, repair="ls")(m, PassContext(calibration=calib, batch_size=250))
    onnx.checker.check_model(res.model, full_check=True)
    assert len(res.layers) == 3 and all(r.width_after == r.width_before // 2 for r in res.layers)
    assert sum(r.params_after for r in res.layers) < 0.52 * sum(r.params_before for r in res.layers)
    acc_orig = float((ort_run(m, {"input": xt})[0].argmax(1) == yt).mean())
    acc = float((ort_run(res.model, {"input": xt})[0].argmax(1) == yt).mean())
    assert acc_orig > 0.93
    assert acc > 0.8  # chance is 0.1; plain folding without repair falls to ~chance here


def test_channel_refits_are_shared_through_the_search_cache():
    """Candidates that fold the same chains the same way up to a refit share
    it (the dense folding pass's key); another fold upstream is refit again;
    either way the model is the one a run without the cache gives, up to the
    rounding of the cache's suffix runs (docs/methods.md section 3)."""
    from onnxfold.passes.cache import SearchCache

    m = onnx.load(str(MODELS / "mnist_resnet.onnx"))
    with np.load(MODELS / "mnist_resnet.calib.npz") as f:
        x = f["input"][:200]
    with np.load(MODELS / "mnist_resnet.test.npz") as f:
        xt = f["input"][:50]
    cache = SearchCache()
    ctx = PassContext(calibration=CalibrationSet({"input": x}), batch_size=100, cache=cache)

    def fresh(ratios):
        return ChannelFoldingPass(ratios, repair="ls")(m, PassContext(calibration=CalibrationSet({"input": x}),
                                                                      batch_size=100)).model

    ChannelFoldingPass({"conv0": 0.25}, repair="ls")(m, ctx)
    for ratios, shared in (({"conv0": 0.25, "conv1": 0.25}, 1), ({"conv0": 0.5, "conv1": 0.25}, 0)):
        hits, misses = cache.hits, cache.misses
        got = ChannelFoldingPass(ratios, repair="ls")(m, ctx).model
        assert (cache.hits - hits, cache.misses - misses) == (shared, 2 - shared)
        want = ort_run(fresh(ratios), {"input": xt})[0]
        np.testing.assert_allclose(ort_run(got, {"input": xt})[0], want, rtol=0, atol=1e-5 * np.abs(want).max())


def _copy_shipped_cnn(tmp_path: Path) -> Path:
    import shutil

    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"mnist_resnet{suffix}", tmp_path / f"mnist_resnet{suffix}")
    return tmp_path / "mnist_resnet.onnx"


def _conv_params(model: onnx.ModelProto) -> int:
    """Elements of the initializers Conv and BatchNormalization nodes read."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(i, 0) for n in model.graph.node if n.op_type in ("Conv", "BatchNormalization")
               for i in n.input[1:])


def _test_accuracy(model: onnx.ModelProto, data) -> float:
    return float(np.mean(ort_run(model, {"input": data["input"]})[0].argmax(1) == data["labels"]))


@pytest.mark.skipif(not (MODELS / "mnist_resnet.onnx").exists(), reason="mnist_resnet not built")
def test_cli_folds_conv_channels_with_an_explicit_ratio(tmp_path):
    """`onnxfold optimize cnn.onnx --fold-ratio R` folds the conv chains (the
    same pass as above, reached through the CLI)."""
    import json

    from onnxfold.cli import main

    src = _copy_shipped_cnn(tmp_path)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), "-o", str(out), "--fold-ratio", "0.5", "--report", str(rep), "--quiet",
                 "--no-latency", "--provider", "cpu"]) == 0
    r = json.loads(rep.read_text())
    conv_rows = [lr for lr in r["layers"] if lr["width_after"] < lr["width_before"]]
    assert len(conv_rows) == len(find_conv_graph(onnx.load(src)).chains) == 3
    assert 0.4 < r["ratios"]["parameters"] < 0.6
    acc = _test_accuracy(onnx.load(out), np.load(tmp_path / "mnist_resnet.test.npz"))
    assert acc > 0.8 and abs(acc - r["verification"]["outputs"]["logits"]["accuracy_candidate"]) < 1e-9


@pytest.mark.skipif(not (MODELS / "mnist_resnet.onnx").exists(), reason="mnist_resnet not built")
def test_cli_budget_search_folds_conv_channels_within_an_accuracy_drop(tmp_path):
    """Issue #14's done-when: `onnxfold optimize mnist_resnet.onnx
    --max-accuracy-drop 1` with no other settings folds conv channels (conv
    parameters at most 0.75 of the original) and meets the budget on the test
    split (found next to the model and used as --eval). Its 1,500 calibration
    samples give the select part 600, enough to resolve 1 pp at 95 % (368)."""
    import json

    from onnxfold.cli import main

    src = _copy_shipped_cnn(tmp_path)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), "--max-accuracy-drop", "1", "-o", str(out), "--report", str(rep),
                 "--quiet", "--no-latency", "--provider", "cpu", "--check"]) == 0
    r = json.loads(rep.read_text())
    assert r["status"] == "optimized" and r["budget"]["met"]
    chains = {c.name for c in find_conv_graph(onnx.load(src)).chains}
    assert set(r["search"]["chosen"]["fold_ratios"]) & chains
    original, folded = onnx.load(src), onnx.load(out)
    assert _conv_params(folded) <= 0.75 * _conv_params(original)
    test = np.load(tmp_path / "mnist_resnet.test.npz")
    assert 100 * (_test_accuracy(original, test) - _test_accuracy(folded, test)) <= 1.0
