"""Streamed statistics and streamed model runs against direct numpy computations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold.find.activations import ActivationSpec
from onnxfold.measure.data import load_calibration
from onnxfold.measure.stats import (
    DEFAULT_RIDGE_LAMS,
    ColumnMoments,
    GramAccumulator,
    NeuronStats,
    collect_neuron_stats,
    ridge_path,
)
from onnxfold.measure.stream import expose_outputs, run_model, stream_tensors

RTOL = 1e-9


def _specs(n):
    rng = np.random.default_rng(5)
    return {
        "relu": ActivationSpec("relu"),
        "leaky": ActivationSpec("leaky_relu", alpha=0.1),
        "prelu": ActivationSpec("prelu", slope=rng.uniform(0.0, 0.5, size=n).astype(np.float32)),
        "clip": ActivationSpec("clip", lo=0.0, hi=1.5),
        "clip_hi": ActivationSpec("clip", hi=1.0),
        "gelu": ActivationSpec("gelu"),
    }


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    n = shape[-1]
    z = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=n) + rng.normal(size=n)
    z[..., 0] = np.abs(z[..., 0]) + 0.1  # always on
    z[..., 1] = -np.abs(z[..., 1]) - 0.1  # never on
    z[..., 2] += 1000.0  # large mean vs spread: variance must not cancel
    return z.astype(np.float32)


def _check_stats(st: NeuronStats, spec: ActivationSpec, z: np.ndarray):
    n = z.shape[-1]
    rows = z.reshape(-1, n)
    a = spec.apply(rows).astype(np.float64)
    z64 = rows.astype(np.float64)
    assert st.count == rows.shape[0]
    np.testing.assert_allclose(st.sum_z, z64.sum(0), rtol=RTOL)
    np.testing.assert_allclose(st.sum_z2, (z64**2).sum(0), rtol=RTOL)
    np.testing.assert_allclose(st.sum_a, a.sum(0), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(st.sum_a2, (a**2).sum(0), rtol=RTOL, atol=1e-12)
    np.testing.assert_array_equal(st.min_z, z64.min(0))
    np.testing.assert_array_equal(st.max_z, z64.max(0))
    np.testing.assert_allclose(st.mean_z, z64.mean(0), rtol=RTOL)
    np.testing.assert_allclose(st.var_z, z64.var(0), rtol=1e-8)
    np.testing.assert_allclose(st.std_z, z64.std(0), rtol=1e-8)
    np.testing.assert_allclose(st.mean_a, a.mean(0), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(st.var_a, a.var(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(st.active_rate, (rows > 0).mean(0), rtol=RTOL)
    assert st.always_on()[0] and not st.always_on()[1]
    assert st.never_on()[1] and not st.never_on()[0]
    np.testing.assert_array_equal(st.always_on(), (rows > 0).all(0))
    np.testing.assert_array_equal(st.never_on(), ~(rows > 0).any(0))
    if spec.is_piecewise_linear:
        pieces = spec.pieces(n)
        idx = spec.piece_index(rows)
        assert st.n_pieces == len(pieces)
        rates = np.stack([(idx == p).mean(0) for p in range(len(pieces))])
        for p in range(len(pieces)):
            np.testing.assert_allclose(st.piece_rate(p), rates[p], rtol=RTOL)
            slope = np.broadcast_to(np.asarray(pieces[p].slope, np.float64), (n,))
            direct = (a - (slope * z64 + pieces[p].intercept)).mean(0)
            np.testing.assert_allclose(st.mean_error_vs_piece(p), direct, rtol=1e-7, atol=1e-9)
            # zero error (up to f's float32 rounding) for neurons always on that piece
            on = (idx == p).all(0)
            tol = 1e-6 * (1.0 + np.abs(z64).max(0))
            assert np.all(np.abs(st.mean_error_vs_piece(p)[on]) <= tol[on])
        best, rate = st.on_one_piece_rate()
        np.testing.assert_array_equal(best, rates.argmax(0))
        np.testing.assert_allclose(rate, rates.max(0), rtol=RTOL)
    else:
        with pytest.raises(ValueError):
            st.piece_rate(0)


@pytest.mark.parametrize("kind", ["relu", "leaky", "prelu", "clip", "clip_hi", "gelu"])
@pytest.mark.parametrize("shape", [(103, 9), (37, 5, 9)])
@pytest.mark.parametrize("batch", [1, 16, 50, 1000])
def test_neuron_stats_match_numpy(kind, shape, batch):
    z = _data(shape, seed=len(shape) + batch)
    spec = _specs(shape[-1])[kind]
    st = NeuronStats(spec, shape[-1])
    for s in range(0, shape[0], batch):
        st.update(z[s:s + batch])
    _check_stats(st, spec, z)


def test_neuron_stats_merge_equals_one_shot():
    z = _data((200, 7))
    spec = ActivationSpec("leaky_relu", alpha=0.2)
    one = NeuronStats(spec, 7)
    one.update(z)
    a, b = NeuronStats(spec, 7), NeuronStats(spec, 7)
    a.update(z[:61])
    b.update(z[61:])
    a.merge(b)
    _check_stats(a, spec, z)
    empty = NeuronStats(spec, 7)
    empty.merge(one)
    np.testing.assert_allclose(empty.var_z, one.var_z, rtol=1e-12)
    with pytest.raises(ValueError):
        a.merge(NeuronStats(spec, 6))


@pytest.mark.parametrize("shape", [(), (3,)])
def test_column_moments_match_numpy_and_the_neuron_stats_bit_for_bit(shape):
    """A refit's target spread: the moments NeuronStats keeps of a pre-activation, nothing else."""
    rng = np.random.default_rng(11)
    batches = [(rng.standard_normal((m, *shape, 7)) * 4 + 2).astype(np.float32) for m in (5, 1, 40, 13)]
    moments, neurons = ColumnMoments(7), NeuronStats(ActivationSpec("identity"), 7)
    for b in batches[:2]:
        moments.update(b)
        neurons.update(b)
    rest = ColumnMoments(7)
    for b in batches[2:]:
        rest.update(b)
        neurons.update(b)
    moments.merge(rest)
    X = np.concatenate([b.reshape(-1, 7) for b in batches]).astype(np.float64)
    assert moments.count == neurons.count == len(X)
    np.testing.assert_allclose(moments.sum, X.sum(axis=0), rtol=RTOL)
    np.testing.assert_allclose(moments.m2, ((X - X.mean(axis=0)) ** 2).sum(axis=0), rtol=RTOL)
    # updated in the same order, the same arithmetic: the same bits
    seq = ColumnMoments(7)
    for b in batches:
        seq.update(b)
    np.testing.assert_array_equal(seq.sum, neurons.sum_z)
    np.testing.assert_array_equal(seq.m2, neurons.m2_z)
    with pytest.raises(ValueError, match="columns"):
        seq.update(np.zeros((2, 6)))


def test_neuron_stats_wrong_width():
    st = NeuronStats(ActivationSpec("relu"), 4)
    with pytest.raises(ValueError):
        st.update(np.zeros((3, 5), np.float32))
    assert np.isnan(st.mean_z).all()  # nothing seen yet


# ---------------------------------------------------------------- GramAccumulator


def _regression(m=300, p=6, q=3, seed=0, noise=0.1, offset=5.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, p)) + offset
    W = rng.normal(size=(q, p))
    b = rng.normal(size=q)
    Y = X @ W.T + b + noise * rng.normal(size=(m, q))
    return X.astype(np.float32), Y.astype(np.float32)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_gram_lstsq_and_streaming(with_bias, batch):
    X, Y = _regression()
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    g = GramAccumulator(with_bias=with_bias)
    for s in range(0, len(X), batch):
        g.update(X[s:s + batch], Y[s:s + batch])
    assert g.count == len(X) and (g.p, g.q) == (6, 3)
    np.testing.assert_allclose(g.XtX, X64.T @ X64, rtol=RTOL)
    np.testing.assert_allclose(g.XtY, X64.T @ Y64, rtol=RTOL)
    np.testing.assert_allclose(g.sum_x, X64.sum(0), rtol=RTOL)
    np.testing.assert_allclose(g.sum_y, Y64.sum(0), rtol=RTOL)
    np.testing.assert_allclose(g.YtY_diag, (Y64**2).sum(0), rtol=RTOL)
    A = np.hstack([X64, np.ones((len(X), 1))]) if with_bias else X64
    sol = np.linalg.lstsq(A, Y64, rcond=None)[0]
    W, b = g.solve_ridge(0.0)
    assert W.shape == (3, 6) and b.shape == (3,)
    np.testing.assert_allclose(W, sol[:6].T, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(b, sol[6] if with_bias else 0.0, rtol=1e-7, atol=1e-7)
    W2, b2 = g.solve_ridge(1e-12)
    np.testing.assert_allclose(W2, W, rtol=1e-6, atol=1e-8)
    # residual from statistics equals the direct one, for the solution and arbitrary W, b
    direct = ((Y64 - X64 @ W.T - b) ** 2).sum()
    assert g.residual(W, b) == pytest.approx(direct, rel=1e-5)
    rng = np.random.default_rng(1)
    Wr, br = rng.normal(size=(3, 6)), rng.normal(size=3)
    per = ((Y64 - X64 @ Wr.T - br) ** 2).sum(0)
    np.testing.assert_allclose(g.residual(Wr, br, per_output=True), per, rtol=1e-9)
    one = GramAccumulator(with_bias=with_bias)
    one.update(X, Y)
    Wo, bo = one.solve_ridge(1e-3)
    Ws, bs = g.solve_ridge(1e-3)
    np.testing.assert_allclose(Ws, Wo, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bs, bo, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
def test_ridge_closed_form_and_scale(with_bias):
    X, Y = _regression(m=80, p=5, q=2, noise=1.0)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    g = GramAccumulator(with_bias=with_bias)
    g.update(X, Y)
    lam = 1e-1
    if with_bias:
        Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
        lam_abs = lam * np.trace(Xc.T @ Xc) / 5
        Wt = np.linalg.solve(Xc.T @ Xc + lam_abs * np.eye(5), Xc.T @ Yc)
        b = Y64.mean(0) - Wt.T @ X64.mean(0)
    else:
        lam_abs = lam * np.trace(X64.T @ X64) / 5
        Wt = np.linalg.solve(X64.T @ X64 + lam_abs * np.eye(5), X64.T @ Y64)
        b = np.zeros(2)
    W_got, b_got = g.solve_ridge(lam)
    np.testing.assert_allclose(W_got, Wt.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b_got, b, rtol=1e-8, atol=1e-10)
    # lam is relative: scaling X leaves predictions unchanged
    g2 = GramAccumulator(with_bias=with_bias)
    g2.update(X64 * 1000.0, Y64)
    W2, b2 = g2.solve_ridge(lam)
    np.testing.assert_allclose((X64 * 1000.0) @ W2.T + b2, X64 @ W_got.T + b_got, rtol=1e-7, atol=1e-7)


def test_gram_merge_and_singular():
    X, Y = _regression(m=120)
    a, b, one = GramAccumulator(), GramAccumulator(), GramAccumulator()
    a.update(X[:50], Y[:50])
    b.update(X[50:], Y[50:])
    one.update(X, Y)
    a.merge(b)
    np.testing.assert_allclose(a.XtX, one.XtX, rtol=RTOL)
    np.testing.assert_allclose(a.solve_ridge(1e-4)[0], one.solve_ridge(1e-4)[0], rtol=1e-8)
    # duplicated column: lam=0 gives the minimum-norm solution, like lstsq
    Xd = np.hstack([X, X[:, :1]]).astype(np.float64)
    g = GramAccumulator(with_bias=False)
    g.update(Xd, Y)
    sol = np.linalg.lstsq(Xd, Y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(g.solve_ridge(0.0)[0], sol.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        GramAccumulator().update(X, Y[:5])
    gx = GramAccumulator()
    gx.update(X)
    with pytest.raises(ValueError):
        gx.solve_ridge(1e-3)


@pytest.mark.parametrize("q", [2, 30])  # few outputs: residual per solution; many: in the eigenbasis
def test_ridge_path_picks_heldout_best(q):
    rng = np.random.default_rng(3)
    p = 40
    Xtr, Xte = rng.normal(size=(45, p)), rng.normal(size=(200, p))
    Wtrue = rng.normal(size=(q, p)) * 0.1
    Ytr = Xtr @ Wtrue.T + rng.normal(size=(45, q))
    Yte = Xte @ Wtrue.T + rng.normal(size=(200, q))
    tr, te = GramAccumulator(), GramAccumulator()
    tr.update(Xtr, Ytr)
    te.update(Xte, Yte)
    lams = [1e-6, 1e-3, 1e-1, 1.0, 10.0]
    best, res = ridge_path(tr, te, lams, return_residuals=True)
    direct = []
    for lam in lams:
        W, b = tr.solve_ridge(lam)
        direct.append(((Yte - Xte @ W.T - b) ** 2).sum())
    np.testing.assert_allclose(res, direct, rtol=1e-8)
    assert best == lams[int(np.argmin(direct))]
    assert best > 1e-6  # noisy, nearly square problem: regularisation helps
    assert ridge_path(tr, te) in DEFAULT_RIDGE_LAMS


# ---------------------------------------------------------------- streaming through onnxruntime


def _mlp(seed=0, seq=False):
    """x -> MatMul(W1) -> Add(b1) = z -> Relu = h -> MatMul(W2) = y."""
    rng = np.random.default_rng(seed)
    W1 = rng.normal(size=(6, 8)).astype(np.float32)
    b1 = rng.normal(size=8).astype(np.float32)
    W2 = rng.normal(size=(8, 3)).astype(np.float32)
    shape = ["N", 4, 6] if seq else ["N", 6]
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["mm"]),
            helper.make_node("Add", ["mm", "b1"], ["z"]),
            helper.make_node("Relu", ["z"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(W2, "W2")],
    )
    m = helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    return m, W1, b1, W2


@pytest.mark.parametrize("seq", [False, True])
def test_stream_tensors_match_numpy(seq):
    m, W1, b1, W2 = _mlp(seq=seq)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(23, 4, 6) if seq else (23, 6)).astype(np.float32)
    cs = load_calibration({"x": x, "labels": np.arange(23)}, m)
    calls = []
    got = list(stream_tensors(m, ["z", "h", "x"], cs, batch_size=10, progress=lambda d, t: calls.append((d, t))))
    assert calls == [(10, 23), (20, 23), (23, 23)]
    assert [len(l) for _, l, _ in got] == [10, 10, 3]
    z = np.concatenate([t["z"] for _, _, t in got])
    h = np.concatenate([t["h"] for _, _, t in got])
    y = np.concatenate([t["y"] for _, _, t in got])
    assert set(got[0][2]) == {"y", "z", "h", "x"}
    np.testing.assert_array_equal(np.concatenate([t["x"] for _, _, t in got]), x)
    zref = x @ W1 + b1
    np.testing.assert_allclose(z, zref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, np.maximum(zref, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.maximum(zref, 0) @ W2, rtol=1e-4, atol=1e-4)
    out = run_model(m, cs, batch_size=7)
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], y, rtol=1e-6, atol=1e-6)


def test_expose_outputs_copy():
    m, *_ = _mlp()
    before = m.SerializeToString()
    e = expose_outputs(m, ["h", "z", "y", "h"])
    assert m.SerializeToString() == before
    assert [o.name for o in e.graph.output] == ["y", "h", "z"]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in e.graph.output)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(e))
    e.graph.node[0].name = "changed"  # shares nothing with the caller
    assert m.graph.node[0].name == ""
    with pytest.raises(ValueError):
        expose_outputs(m, ["nope"])


def test_expose_outputs_float16_types():
    # elem types come from shape inference, so a float16 hidden tensor is not declared FLOAT
    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT16), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    e = expose_outputs(m, ["c"])
    assert e.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT16
    cs = load_calibration({"x": np.ones((2, 3), np.float32)}, m)
    (_, _, t), = list(stream_tensors(m, ["c"], cs))
    assert t["c"].dtype == np.float16


@pytest.mark.parametrize("seq", [False, True])
def test_collect_neuron_stats_matches_direct(seq):
    m, W1, b1, _ = _mlp(seed=2, seq=seq)
    x = np.random.default_rng(4).normal(size=(57, 4, 6) if seq else (57, 6)).astype(np.float32)
    cs = load_calibration({"x": x}, m)
    spec = ActivationSpec("relu")
    stats = collect_neuron_stats(m, {"z": spec}, cs, batch_size=16)
    z = np.concatenate([t["z"] for _, _, t in stream_tensors(m, ["z"], cs, batch_size=57)])
    _direct = NeuronStats(spec, 8)
    _direct.update(z)
    st = stats["z"]
    assert st.count == (57 * 4 if seq else 57)
    np.testing.assert_allclose(st.sum_z, _direct.sum_z, rtol=1e-9)
    np.testing.assert_allclose(st.var_a, _direct.var_a, rtol=1e-9)
    np.testing.assert_array_equal(st.piece_counts, _direct.piece_counts)
    np.testing.assert_allclose(st.mean_z, (x @ W1 + b1).reshape(-1, 8).mean(0), rtol=1e-5, atol=1e-5)


def test_ridge_single_lam_solve_equals_the_eigen_path():
    """A lam solved alone on a fresh accumulator (Cholesky) gives what the
    eigendecomposition path gives, for a well- and an ill-conditioned X."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((400, 30))
    ill = base @ np.diag(np.logspace(0, -7, 30))  # condition number ~1e7
    for X in (base, ill):
        Y = X @ rng.standard_normal((30, 4)) + 0.01 * rng.standard_normal((400, 4))
        for lam in (1e-6, 1e-2, 10.0):
            alone, path = GramAccumulator(), GramAccumulator()
            alone.update(X, Y)
            path.update(X, Y)
            W_path, b_path = path.solve_ridge_path([lam])[0]
            assert alone._eig is None
            W, b = alone.solve_ridge(lam)
            assert alone._eig is None  # no eigendecomposition was needed
            np.testing.assert_allclose(W, W_path, rtol=1e-6, atol=1e-9 * np.abs(W_path).max())
            np.testing.assert_allclose(b, b_path, rtol=1e-6, atol=1e-9)


def test_update_never_modifies_the_callers_rows():
    """Centring happens in place only on the float64 copy of float32 rows."""
    rng = np.random.default_rng(4)
    for dtype in (np.float64, np.float32):
        X, Y = rng.standard_normal((50, 3)).astype(dtype), rng.standard_normal((50, 2)).astype(dtype)
        X0, Y0 = X.copy(), Y.copy()
        g = GramAccumulator()
        g.update(X, Y)
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(Y, Y0)
        X64, Y64 = X0.astype(np.float64), Y0.astype(np.float64)
        Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
        np.testing.assert_allclose(g.sxx, Xc.T @ Xc, rtol=1e-12)
        np.testing.assert_allclose(g.sxy, Xc.T @ Yc, rtol=1e-12)


def test_update_overwrite_gives_the_same_statistics_bit_for_bit():
    """``overwrite=True`` centres the caller's scratch copy in place: the same
    statistics to the last bit as a fresh copy, over several batches and with
    weights; a read-only array is never written, whatever the flag says."""
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((40, 5)), rng.standard_normal((40, 3)), rng.uniform(0.5, 2.0, 40))
               for _ in range(3)]
    for weighted in (False, True):
        plain, scratch = GramAccumulator(), GramAccumulator()
        for X, Y, w in batches:
            plain.update(X, Y, w if weighted else None)
            Xs, Ys = X.copy(), Y.copy()
            scratch.update(Xs, Ys, w if weighted else None, overwrite=True)
            assert not np.array_equal(Xs, X)  # centred in place: it was the scratch copy
        for k in ("sxx", "sxy", "syy", "mean_x", "mean_y"):
            np.testing.assert_array_equal(getattr(scratch, k), getattr(plain, k))
        assert (scratch.count, scratch.weight) == (plain.count, plain.weight)
    X, Y = batches[0][0].copy(), batches[0][1].copy()
    X.flags.writeable = False
    g = GramAccumulator()
    g.update(X, Y[:, :1].copy(), overwrite=True)
    np.testing.assert_array_equal(X, batches[0][0])
    Xc = X - X.mean(0)
    np.testing.assert_allclose(g.sxx, Xc.T @ Xc, rtol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
def test_weighted_rows_solve_weighted_least_squares(with_bias):
    """Streamed weighted rows (in batches, some merged) give numpy's weighted
    least squares: lstsq on the rows (and the intercept column) scaled by the
    square root of their weights."""
    X, Y = _regression(m=300)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    w = np.random.default_rng(7).uniform(0.05, 20.0, len(X))
    g, other = GramAccumulator(with_bias=with_bias), GramAccumulator(with_bias=with_bias)
    for s in range(0, 200, 64):
        g.update(X[s:min(s + 64, 200)], Y[s:min(s + 64, 200)], w[s:min(s + 64, 200)])
    other.update(X[200:], Y[200:], w[200:])
    g.merge(other)
    assert g.count == len(X) and g.weight == pytest.approx(w.sum())
    r = np.sqrt(w)[:, None]
    A = np.hstack([X64, np.ones((len(X), 1))]) if with_bias else X64
    sol = np.linalg.lstsq(A * r, Y64 * r, rcond=None)[0]
    W, b = g.solve_ridge(0.0)
    np.testing.assert_allclose(W, sol[:6].T, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(b, sol[6] if with_bias else 0.0, rtol=1e-7, atol=1e-7)
    # the residual from the statistics is the weighted one, for any W and b
    Wr, br = np.random.default_rng(1).normal(size=(3, 6)), np.random.default_rng(2).normal(size=3)
    assert g.residual(Wr, br) == pytest.approx(float((w[:, None] * (Y64 - X64 @ Wr.T - br) ** 2).sum()), rel=1e-9)
    # weights of 1 are the unweighted accumulator
    plain, ones = GramAccumulator(with_bias=with_bias), GramAccumulator(with_bias=with_bias)
    plain.update(X, Y)
    ones.update(X, Y, np.ones(len(X)))
    np.testing.assert_allclose(ones.solve_ridge(1e-3)[0], plain.solve_ridge(1e-3)[0], rtol=1e-10)
    with pytest.raises(ValueError, match="non-negative"):
        GramAccumulator().update(X, Y, -w)
    with pytest.raises(ValueError, match="one per row"):
        GramAccumulator().update(X, Y, w[:5])
