"""Neuron folding: the decide/ math on hand cases, and the pass end to end
(onnxruntime outputs of the folded model against the original)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from helpers import build_mlp, build_residual_mlp, make_model, ort_run, tensor_info, with_outputs
from onnxfold.decide import folding as decide
from onnxfold.errors import UsageError
from onnxfold.find import find_dense_graph
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.stats import GramAccumulator
from onnxfold.passes.base import PassContext
from onnxfold.passes.folding import FoldingPass


def _data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ctx(x=None, heldout=None):
    return PassContext(calibration=None if x is None else CalibrationSet({"x": x}),
                       heldout=None if heldout is None else CalibrationSet({"x": heldout}), batch_size=64)


def _widths(model):
    return [c.width for c in find_dense_graph(model).chains]


def _rel_err(out, ref):
    return float(((out - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())


# ---------------------------------------------------------------- decide/


def test_target_width_rounds_and_keeps_one():
    assert decide.target_width(512, 0.7) == 154
    assert decide.target_width(10, 0.0) == 10
    assert decide.target_width(3, 0.99) == 1
    assert decide.target_width(4, 0.5) == 2


def test_kmeans_groups_duplicates_and_is_deterministic():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 7)) * 10
    src = np.array([3, 0, 3, 1, 4, 2, 0, 3])
    labels = decide.kmeans_labels(base[src], 5, seed=1)
    # duplicates share a cluster, distinct rows do not; clusters numbered by first member
    assert np.array_equal(labels, [0, 1, 0, 2, 3, 4, 1, 0])
    feats = rng.standard_normal((60, 4))
    a = decide.kmeans_labels(feats, 9, seed=3)
    assert np.array_equal(a, decide.kmeans_labels(feats, 9, seed=3))
    assert sorted(set(a)) == list(range(9)) and a[0] == 0
    assert np.array_equal(decide.kmeans_labels(feats, 1), np.zeros(60))
    # near-duplicates go through k-means proper and still come out grouped
    src = rng.permutation(np.repeat(np.arange(8), 3))
    jittered = rng.standard_normal((8, 20))[src] + 1e-6 * rng.standard_normal((24, 20))
    labels = decide.kmeans_labels(jittered, 8)
    assert len(set(zip(src, labels))) == 8


@pytest.mark.parametrize("weighted", [False, True])
def test_gram_seeding_draws_scikit_learns_plain_kmeans_plusplus_centres(weighted):
    """Big problems seed with one trial per centre; from the Gram of the points
    the centres are scikit-learn's ``kmeans_plusplus(n_local_trials=1)``."""
    from sklearn.cluster import kmeans_plusplus
    from sklearn.utils import check_random_state

    rng = np.random.default_rng(4)
    X = rng.standard_normal((400, 30)) * rng.uniform(0.1, 3.0, size=30) + 5.0
    w = rng.integers(1, 4, size=400) if weighted else np.ones(400, dtype=np.intp)
    expected, _ = kmeans_plusplus(X, 300, sample_weight=w, random_state=11, n_local_trials=1)
    got = decide._gram_kmeans_plusplus(w, trials=1)(X, 300, check_random_state(11))
    np.testing.assert_array_equal(got, expected)


def test_big_kmeans_labels_do_not_depend_on_where_the_seeding_takes_its_products(monkeypatch):
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((300, 12))
    monkeypatch.setattr(decide, "BIG_KMEANS", 1)  # every problem takes the big path
    decide._KMEANS_CACHE.clear()
    from_gram = decide.kmeans_labels(feats, 200, seed=2)
    monkeypatch.setattr(decide, "GRAM_SEEDING_MAX_POINTS", 0)  # scikit-learn's product per step
    decide._KMEANS_CACHE.clear()
    np.testing.assert_array_equal(decide.kmeans_labels(feats, 200, seed=2), from_gram)
    decide._KMEANS_CACHE.clear()


def test_cluster_maps_means_sums_and_removed_neurons():
    row_map, col_map = decide.cluster_maps(np.array([0, 1, 0, -1, 1, 1]))
    np.testing.assert_allclose(row_map, [[.5, 0, .5, 0, 0, 0], [0, 1 / 3, 0, 0, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(col_map, [[1, 0], [0, 1], [1, 0], [0, 0], [0, 1], [0, 1]])


def test_fold_ar_scale_matches_the_formula_by_hand():
    rows = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [5.0, 5.0]])
    labels = np.array([0, 0, 1, 2, 1, 3, 3])  # the last two make an anti-aligned pair
    s = decide.fold_ar_scale(rows, labels)
    c01 = 1 / math.sqrt(2)  # cos between [1,0] and [1,1]
    assert s[0] == pytest.approx(math.sqrt(2 / (1 + c01)))
    assert s[1] == pytest.approx(1.0)  # [0,3] and [0,1] point the same way: no variance lost
    assert s[2] == pytest.approx(1.0)  # singleton
    # mean cosine of [-1,0],[5,5] is -0.707 < 0: floored at 0, i.e. sqrt(N)
    assert s[3] == pytest.approx(math.sqrt(2))
    # three orthogonal rows: sqrt(3), and removed neurons (-1) are ignored
    s3 = decide.fold_ar_scale(np.eye(4)[:, :3], np.array([0, 0, 0, -1]))
    assert s3[0] == pytest.approx(math.sqrt(3))


def test_repair_affine_and_merged_moments():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4000, 4)) @ rng.standard_normal((4, 4)) + [1, -2, 3, 0]
    row_map, _ = decide.cluster_maps(np.array([0, 0, 1, 1]))
    mean, std = decide.merged_moments(row_map, z.mean(0), np.cov(z.T, bias=True))
    merged = z @ row_map.T
    np.testing.assert_allclose(mean, merged.mean(0))
    np.testing.assert_allclose(std, merged.std(0))
    target_mean, target_std = row_map @ z.mean(0), row_map @ z.std(0)
    scale, shift = decide.repair_affine(target_mean, target_std, mean, std)
    fixed = merged * scale + shift
    np.testing.assert_allclose(fixed.mean(0), target_mean)
    np.testing.assert_allclose(fixed.std(0), target_std)
    scale, shift = decide.repair_affine(np.array([2.0]), np.array([3.0]), np.array([5.0]), np.array([0.0]))
    assert scale[0] == 1.0 and shift[0] == -3.0  # nothing to stretch: only the mean moves


def test_magnitude_keep_largest_rows():
    w = np.array([[3.0, 0], [0.1, 0.1], [0, -5], [1, 1], [2, 2]])
    assert list(decide.magnitude_keep(w, 3)) == [0, 2, 4]


def test_refit_consumer_recovers_exact_weights_and_keeps_a_better_prior():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6))
    w_true, b_true = rng.standard_normal((3, 6)), rng.standard_normal(3)
    w_prior, b_prior = np.zeros((3, 6)), np.zeros(3)
    fit, held = GramAccumulator(), GramAccumulator()
    fit.update(x[:400], x[:400] @ w_true.T + b_true)
    held.update(x[400:], x[400:] @ w_true.T + b_true)
    res = decide.refit_consumer(fit, held, w_prior, b_prior)
    np.testing.assert_allclose(res.weight, w_true, atol=1e-3)
    np.testing.assert_allclose(res.bias, b_true, atol=1e-3)
    assert res.heldout_error < 1e-6 < res.kept_error
    # the plain fold already reproduces the target up to noise (Y = its bias): it is kept
    fit, held = GramAccumulator(), GramAccumulator()
    fit.update(x[:20], b_true + rng.standard_normal((20, 3)) * 1e-3)
    held.update(x[400:], b_true + rng.standard_normal((100, 3)) * 1e-3)
    res = decide.refit_consumer(fit, held, w_true, b_true)
    assert res.lam is None and np.array_equal(res.weight, w_true)


# ---------------------------------------------------------------- models with duplicated neurons


def _duplicated_mlp(distinct, copies, activation, form, rank, seed):
    """An MLP whose hidden layer i has ``distinct[i]`` different neurons, each
    repeated; returns (model, widths). Neuron j of layer i copies neuron
    src[i][j] of a smaller random net, incoming rows, biases and outgoing
    columns alike."""
    rng = np.random.default_rng(seed)
    srcs = [np.concatenate([np.arange(m), rng.integers(0, m, size=c)]) for m, c in zip(distinct, copies)]
    srcs = [rng.permutation(s) for s in srcs]
    d_in, d_out = 5, 3
    widths = [d_in, *[s.size for s in srcs], d_out]
    model, params = build_mlp(widths, activation, form=form, rank=rank, seed=seed, return_params=True)
    _, small = build_mlp([d_in, *distinct, d_out], activation, form=form, rank=rank, seed=seed + 1,
                         return_params=True)
    maps = [np.arange(d_in), *srcs, np.arange(d_out)]
    inits = {t.name: t for t in model.graph.initializer}
    for i, layer in enumerate(small):
        W = layer["W"][np.ix_(maps[i + 1], maps[i])].astype(np.float32)
        b = layer["b"][maps[i + 1]].astype(np.float32)
        B = W if form == "gemm" else np.ascontiguousarray(W.T)
        inits[f"fc{i}.B"].CopyFrom(numpy_helper.from_array(B, f"fc{i}.B"))
        bname = f"fc{i}.C" if form == "gemm" else f"fc{i}.bias"
        inits[bname].CopyFrom(numpy_helper.from_array(b, bname))
    return model, widths


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(distinct=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       extra=st.data(),
       activation=st.sampled_from(["relu", "leaky_relu", "gelu", "gelu_erf", "silu", "tanh", "sigmoid"]),
       shape=st.sampled_from([("gemm", 2), ("matmul", 2), ("matmul", 3)]),
       repair=st.sampled_from(["none", "ar"]),
       seed=st.integers(0, 10_000))
def test_folding_exact_duplicates_is_lossless(distinct, extra, activation, shape, repair, seed):
    copies = [extra.draw(st.integers(0, 2 * m), label="copies") for m in distinct]
    form, rank = shape
    model, widths = _duplicated_mlp(distinct, copies, activation, form, rank, seed)
    # a ratio per layer that removes exactly the copies: round(n * m/n) == m
    ratios = {f"layer{i}": 1 - m / n for i, (m, n) in enumerate(zip(distinct, widths[1:-1]))}
    res = FoldingPass(ratios, repair=repair, seed=seed)(model, _ctx())
    assert _widths(res.model) == list(distinct)
    assert [r.merged for r in res.layers] == copies
    x = _data((7, 3, 5) if rank == 3 else (7, 5), seed)
    np.testing.assert_allclose(ort_run(res.model, x)[0], ort_run(model, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("repair", ["none", "ar", "repair", "ls"])
@pytest.mark.parametrize("select", ["kmeans", "magnitude"])
def test_ratio_zero_is_the_identity(select, repair):
    model = build_mlp([6, 10, 8, 3], "relu", seed=3)
    x = _data((50, 6))
    res = FoldingPass(0.0, select=select, repair=repair)(model, _ctx(x))
    assert not res.changed and res.model is model
    assert all(r.width_after == r.width_before and r.note == "nothing to fold" for r in res.layers)
    np.testing.assert_array_equal(ort_run(res.model, x)[0], ort_run(model, x)[0])


# ---------------------------------------------------------------- each repair does what it says


def _pre_activations(model, x, names):
    return ort_run(with_outputs(model, names), x, names)


def test_repair_matches_members_mean_and_std():
    model = build_mlp([6, 12, 4], "relu", seed=5)
    x = _data((400, 6), 1)
    res = FoldingPass(0.5, repair="repair", seed=2)(model, _ctx(x))
    chain = find_dense_graph(model).chains[0]
    labels = decide.kmeans_labels(decide.neuron_features(chain.producer.weight, chain.producer.bias,
                                                         chain.consumer.weight), 6, seed=2)
    row_map, _ = decide.cluster_maps(labels)
    (z,) = _pre_activations(model, x, ["h0.pre"])
    (z_folded,) = _pre_activations(res.model, x, ["h0.pre"])
    z, z_folded = z.astype(np.float64), z_folded.astype(np.float64)
    np.testing.assert_allclose(z_folded.mean(0), row_map @ z.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z_folded.std(0), row_map @ z.std(0), rtol=1e-4, atol=1e-4)
    # without the repair the merged neurons lose variance
    (z_plain,) = _pre_activations(FoldingPass(0.5, repair="none", seed=2)(model, _ctx()).model, x, ["h0.pre"])
    assert np.all(z_plain.std(0) <= row_map @ z.std(0) + 1e-5)
    assert np.any(z_plain.std(0) < 0.95 * row_map @ z.std(0))


def test_ar_scales_rows_by_the_formula():
    # three neurons; 0 and 2 are close (one cluster at r=1/3), 1 stays alone
    W1 = np.array([[1.0, 0.0], [-4.0, 9.0], [1.0, 0.4]], np.float32)
    b1 = np.array([0.1, 0.2, 0.3], np.float32)
    W2 = np.array([[1.0, 2.0, 1.5]], np.float32)
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(W2, "W2")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z"], name="fc0", transB=1),
             helper.make_node("Relu", ["z"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "W2"], ["y"], name="fc1", transB=1)]
    model = make_model(nodes, [tensor_info("x", np.float32, ["N", 2])], [tensor_info("y", np.float32, ["N", 1])],
                       inits)
    res = FoldingPass(1 / 3, repair="ar")(model, _ctx())
    chain = find_dense_graph(res.model).chains[0]
    cos = float(W1[0] @ W1[2] / np.linalg.norm(W1[0]) / np.linalg.norm(W1[2]))
    s = math.sqrt(2 / (1 + cos))
    np.testing.assert_allclose(chain.producer.weight, [(W1[0] + W1[2]) / 2 * s, W1[1]], rtol=1e-6)
    np.testing.assert_allclose(chain.producer.bias, [(b1[0] + b1[2]) / 2 * s, b1[1]], rtol=1e-6)
    np.testing.assert_allclose(chain.consumer.weight, [[W2[0, 0] + W2[0, 2], W2[0, 1]]], rtol=1e-6)


@pytest.mark.parametrize("select", ["kmeans", "magnitude"])
def test_ls_beats_no_repair_on_unseen_data(select):
    model = build_mlp([8, 40, 40, 4], "gelu_erf", seed=7)
    x, x_test = _data((1500, 8), 1), _data((500, 8), 2)
    (ref,) = ort_run(model, x_test)
    errs = {}
    for repair in ("none", "ls"):
        res = FoldingPass(0.6, select=select, repair=repair)(model, _ctx(x))
        errs[repair] = _rel_err(ort_run(res.model, x_test)[0], ref)
        if repair == "ls":
            assert all(r.note.startswith("ls: ridge") for r in res.layers)
    assert errs["ls"] < 0.5 * errs["none"], errs


def test_ls_on_a_3d_residual_block_and_with_a_given_heldout_set():
    model, _ = build_residual_mlp(d=6, n=32, seq=5)
    x, held, x_test = _data((300, 5, 6), 1), _data((100, 5, 6), 2), _data((200, 5, 6), 3)
    (ref,) = ort_run(model, x_test)
    errs = {}
    for repair, ctx in (("none", _ctx()), ("ls", _ctx(x, heldout=held))):
        res = FoldingPass(0.5, repair=repair)(model, ctx)
        assert _widths(res.model) == [16]
        errs[repair] = _rel_err(ort_run(res.model, x_test)[0], ref)
    assert errs["ls"] < 0.5 * errs["none"], errs


def test_auto_repair_is_ls_with_data_and_ar_without():
    model = build_mlp([5, 12, 3], "tanh", seed=1)
    x = _data((200, 5))
    with_data = FoldingPass(0.5)(model, _ctx(x))
    assert with_data.layers[0].note.startswith("ls:")
    ar = FoldingPass(0.5, repair="ar")(model, _ctx()).model
    assert FoldingPass(0.5)(model, _ctx()).model.SerializeToString() == ar.SerializeToString()


def test_data_repairs_without_data_are_usage_errors():
    model = build_mlp([5, 12, 3], seed=1)
    for kw in (dict(repair="ls"), dict(repair="repair"), dict(repair="none", drop_constant=True)):
        with pytest.raises(UsageError, match="needs calibration data"):
            FoldingPass(0.5, **kw)(model, _ctx())


# ---------------------------------------------------------------- options


def test_same_seed_same_model_and_reports():
    model = build_mlp([6, 30, 20, 3], "silu", seed=2)
    x = _data((300, 6))
    a = FoldingPass(0.5, repair="ls", seed=4)(model, _ctx(x))
    b = FoldingPass(0.5, repair="ls", seed=4)(model, _ctx(x))
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert [r.to_dict() for r in a.layers] == [r.to_dict() for r in b.layers]


def test_per_layer_ratios_and_layer_filter():
    model = build_mlp([6, 20, 20, 20, 3], seed=2)
    res = FoldingPass({"layer1": 0.5, "layer2": 0.25})(model, _ctx())
    assert _widths(res.model) == [20, 10, 15]
    assert [r.width_after for r in res.layers] == [20, 10, 15]
    assert res.layers[0].note == "not selected for folding" and res.layers[1].merged == 10
    res = FoldingPass(0.5, layers=["layer2"])(model, _ctx())
    assert _widths(res.model) == [20, 20, 10]
    with pytest.raises(UsageError, match="layer7"):
        FoldingPass({"layer7": 0.5})(model, _ctx())
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(UsageError):
            FoldingPass(bad)
    with pytest.raises(UsageError):
        FoldingPass(0.5, select="random")
    with pytest.raises(UsageError):
        FoldingPass(0.5, repair="magic")


def test_magnitude_keeps_the_largest_rows_and_their_columns():
    model = build_mlp([6, 10, 3], seed=4, form="matmul")
    chain = find_dense_graph(model).chains[0]
    keep = np.sort(np.argsort(-np.linalg.norm(chain.producer.weight, axis=1))[:4])
    res = FoldingPass(0.6, select="magnitude", repair="none")(model, _ctx())
    folded = find_dense_graph(res.model).chains[0]
    np.testing.assert_allclose(folded.producer.weight, chain.producer.weight[keep], rtol=1e-6)
    np.testing.assert_allclose(folded.consumer.weight, chain.consumer.weight[:, keep], rtol=1e-6)
    assert res.layers[0].pruned == 6 and res.layers[0].merged == 0


def test_reports_count_parameters():
    model = build_mlp([6, 20, 20, 3], seed=2)
    res = FoldingPass(0.5, repair="none")(model, _ctx())
    l0, l1 = res.layers
    assert (l0.width_before, l0.width_after, l0.merged) == (20, 10, 10)
    assert l0.params_before == (6 * 20 + 20) + (20 * 20 + 20)
    assert l0.params_after == (6 * 10 + 10) + (10 * 10 + 10)
    assert l1.params_after == (10 * 10 + 10) + (10 * 3 + 3)


def test_drop_constant_removes_dead_neurons_exactly():
    model, params = build_mlp([4, 10, 3], "relu", seed=6, return_params=True)
    dead = [1, 4, 7]
    b = params[0]["b"].astype(np.float32).copy()
    b[dead] = -100.0  # never active on the data
    init = next(t for t in model.graph.initializer if t.name == "fc0.C")
    init.CopyFrom(numpy_helper.from_array(b, "fc0.C"))
    x = _data((200, 4))
    res = FoldingPass(0.0, repair="none", drop_constant=True)(model, _ctx(x))
    assert res.layers[0].constant == 3 and _widths(res.model) == [7]
    np.testing.assert_allclose(ort_run(res.model, x)[0], ort_run(model, x)[0], rtol=1e-5, atol=1e-5)
    # with a ratio the budget is the width: 10 -> 5 = 3 constant + 2 merged
    res = FoldingPass(0.5, repair="ls", drop_constant=True)(model, _ctx(x))
    assert (res.layers[0].constant, res.layers[0].merged, res.layers[0].width_after) == (3, 2, 5)


# ---------------------------------------------------------------- linear paths


def _mlp_with_paths(consumer_reads_hidden: bool):
    """x → fc0 → relu → h0 → fc1 (+ path from x) → relu → h1 → fc2 (+ path from h0).

    Hidden layer 0 repeats each of its 4 distinct neurons (8 wide). With
    ``consumer_reads_hidden`` fc1 also reads h0 through a path (instead of x)."""
    rng = np.random.default_rng(0)
    src = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    W0, b0 = rng.standard_normal((4, 5))[src], rng.standard_normal(4)[src]
    W1, b1 = rng.standard_normal((6, 4))[:, src] / 2, rng.standard_normal(6)
    W2, b2 = rng.standard_normal((3, 6)), rng.standard_normal(3)
    F1 = rng.standard_normal((8 if consumer_reads_hidden else 5, 6))
    G = rng.standard_normal((4, 3))[src]
    f = lambda a: numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    inits = []
    for name, arr in dict(W0=W0, b0=b0, W1T=W1.T, b1=b1, W2=W2, b2=b2, F1=F1, G=G).items():
        t = f(arr)
        t.name = name
        inits.append(t)
    mk = helper.make_node
    nodes = [mk("Gemm", ["x", "W0", "b0"], ["z0"], name="fc0", transB=1),
             mk("Relu", ["z0"], ["h0"], name="relu0"),
             mk("MatMul", ["h0", "W1T"], ["m1"], name="fc1"),
             mk("Add", ["m1", "b1"], ["m1b"], name="fc1.bias"),
             mk("MatMul", ["h0" if consumer_reads_hidden else "x", "F1"], ["p1"], name="fc1.path"),
             mk("Add", ["m1b", "p1"], ["z1"], name="fc1.path_add"),
             mk("Relu", ["z1"], ["h1"], name="relu1"),
             mk("Gemm", ["h1", "W2", "b2"], ["g2"], name="fc2", transB=1),
             mk("MatMul", ["h0", "G"], ["p2"], name="fc2.path"),
             mk("Add", ["g2", "p2"], ["y"], name="fc2.path_add")]
    return make_model(nodes, [tensor_info("x", np.float32, ["N", 5])], [tensor_info("y", np.float32, ["N", 3])],
                      inits)


def test_path_readers_of_the_hidden_layer_are_folded_too():
    model = _mlp_with_paths(consumer_reads_hidden=False)
    view = find_dense_graph(model)
    assert [c.name for c in view.chains] == ["layer0", "layer1"]
    assert view.chains[0].path_readers and view.chains[0].consumer.paths
    x, x_test = _data((400, 5), 1), _data((100, 5), 2)
    (ref,) = ort_run(model, x_test)
    lossless = FoldingPass({"layer0": 0.5}, repair="none")(model, _ctx())
    np.testing.assert_allclose(ort_run(lossless.model, x_test)[0], ref, rtol=1e-4, atol=1e-4)
    # lossy on both layers: the refit handles the consumer's own path from x
    errs = {r: _rel_err(ort_run(FoldingPass(0.5, repair=r)(model, _ctx(x)).model, x_test)[0], ref)
            for r in ("none", "ls")}
    assert errs["ls"] < 0.5 * errs["none"], errs


def test_consumer_reading_the_hidden_layer_by_a_path_falls_back_to_plain_fold():
    model = _mlp_with_paths(consumer_reads_hidden=True)
    x = _data((100, 5), 1)
    res = FoldingPass({"layer0": 0.5}, repair="ls")(model, _ctx(x))
    assert "kept the plain fold" in res.layers[0].note
    np.testing.assert_allclose(ort_run(res.model, x)[0], ort_run(model, x)[0], rtol=1e-4, atol=1e-4)


def test_held_out_rows_follow_samples_even_when_the_first_axis_is_not_the_batch():
    from onnxfold.passes.refit import _held_rows

    held = np.array([True, False, True])
    assert np.array_equal(_held_rows(held, 3), held)
    assert _held_rows(np.ones(3, bool), 7).all() and not _held_rows(np.zeros(3, bool), 7).any()
    assert _held_rows(held, 10).sum() == 2
