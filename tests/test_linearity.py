"""Linearity folding: decisions (decide/linearity.py) and the pass end to end.

Models are built inline with onnx.helper; outputs of original and rewritten
models are compared with onnxruntime. The neurons that should leave are
engineered: their biases are set from the data so that they are on one piece
for every calibration row (or provably so for every input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from helpers import make_model, ort_run, tensor_info
from onnxfold.decide import linearity as decide
from onnxfold.errors import UsageError
from onnxfold.find import ActivationSpec, find_dense_graph
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.linearity import LinearityPass

F32 = np.float32
MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ("mnist_mlp", "digits_mlp", "digits_seq_mlp", "cancer_mlp_paper", "mnist1d_mlp")


# --------------------------------------------------------------------------
# an MLP builder with per-layer forms and engineered neurons

ACTS = {"relu": {}, "leaky_relu": {"alpha": 0.1}, "prelu": {}, "clip": {"lo": -1.0, "hi": 1.5}}
FORMS = ("gemm", "gemm_t0_ab", "gemm_nobias", "matmul_add", "matmul_nobias")


def np_act(kind, z, p):
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "leaky_relu":
        return np.where(z > 0, z, p["alpha"] * z)
    if kind == "prelu":
        return np.where(z > 0, z, p["slope"] * z)
    return np.clip(z, p["lo"], p["hi"])


def engineer_rows(kind, z, roles, p, W, b):
    """Set biases (and scale rows) so that neuron j plays ``roles[j]`` on the
    pre-activations ``z`` computed with zero bias: "on" (upper linear piece),
    "off" (lower piece: constant for relu/clip, slope α for leaky/prelu),
    "high" (clip above max), "mid" (clip strictly inside), "" (left alone)."""
    for j, role in enumerate(roles):
        lo, hi = z[:, j].min(), z[:, j].max()
        span = hi - lo + 1e-3
        if role == "on" and kind == "clip":  # strictly inside (lo, hi): shrink the row to fit
            width = p["hi"] - p["lo"]
            W[j] *= 0.5 * width / span
            b[j] = p["lo"] + 0.25 * width - lo * 0.5 * width / span
        elif role == "on":
            b[j] = -lo + 0.2 * span
        elif role == "off":
            b[j] = -hi - 0.2 * span + (p["lo"] if kind == "clip" else 0.0)
        elif role == "high":
            b[j] = -lo + 0.2 * span + p["hi"]
    return W, b


def build_net(seed, widths, kind="relu", forms=None, rank=2, const_nodes=False, roles_share=0.4,
              n_samples=96, seq=3, roles=None):
    """(model, x): an MLP ``widths`` with activation ``kind`` and per-layer
    ``forms``; a share of each hidden layer's neurons are engineered (see
    engineer_rows) on data x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    n_hidden = len(widths) - 2
    forms = forms or ["gemm"] * (n_hidden + 1)
    shape = (n_samples, seq, widths[0]) if rank == 3 else (n_samples, widths[0])
    x = rng.standard_normal(shape).astype(F32)
    p = dict(ACTS[kind])
    nodes, inits = [], []

    def const(name, arr):
        t = numpy_helper.from_array(np.asarray(arr, dtype=F32), name)
        if const_nodes:
            nodes.append(helper.make_node("Constant", [], [name], name=f"{name}.c", value=t))
        else:
            inits.append(t)
        return name

    h = x.reshape(-1, widths[0]).astype(np.float64)
    cur = "x"
    for i in range(n_hidden + 1):
        fin, fout = widths[i], widths[i + 1]
        W = rng.standard_normal((fout, fin)) / np.sqrt(fin)
        b = rng.standard_normal(fout) * 0.1
        form = forms[i]
        last = i == n_hidden
        has_bias = form not in ("gemm_nobias", "matmul_nobias")
        if not last:
            choices = ["on", "off", "high"] if kind == "clip" else ["on", "off"]
            layer_roles = roles[i] if roles is not None else \
                [str(rng.choice(choices)) if j == 0 or rng.random() < roles_share else "" for j in range(fout)]
            if has_bias:
                W, b = engineer_rows(kind, h @ W.T, layer_roles, p, W, b)
        if not has_bias:
            b = np.zeros(fout)
        W, b = W.astype(F32), b.astype(F32)
        pre = "y" if last else f"h{i}.pre"
        if form.startswith("gemm"):
            alpha, beta, tB = (1.0, 1.0, 1)
            if form == "gemm_t0_ab":
                alpha, beta, tB = 0.5, 2.0, 0
            B = (W / alpha) if tB else (W / alpha).T
            ins = [cur, const(f"B{i}", B)] + ([const(f"C{i}", b / beta)] if has_bias else [])
            nodes.append(helper.make_node("Gemm", ins, [pre], name=f"fc{i}", transB=tB, alpha=alpha, beta=beta))
        else:
            mm = f"fc{i}.mm" if has_bias else pre
            nodes.append(helper.make_node("MatMul", [cur, const(f"B{i}", np.ascontiguousarray(W.T))], [mm],
                                          name=f"fc{i}"))
            if has_bias:
                nodes.append(helper.make_node("Add", [mm, const(f"b{i}", b)], [pre], name=f"fc{i}.add"))
        z = h @ W.astype(np.float64).T + b
        if last:
            break
        out = f"h{i}"
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"act{i}"))
        elif kind == "leaky_relu":
            nodes.append(helper.make_node("LeakyRelu", [pre], [out], name=f"act{i}", alpha=p["alpha"]))
        elif kind == "prelu":
            p["slope"] = rng.uniform(0.05, 0.5, fout)
            nodes.append(helper.make_node("PRelu", [pre, const(f"slope{i}", p["slope"])], [out], name=f"act{i}"))
        else:
            nodes.append(helper.make_node("Clip", [pre, const(f"lo{i}", p["lo"]), const(f"hi{i}", p["hi"])], [out],
                                          name=f"act{i}"))
        h = np_act(kind, z, p)
        cur = out
    batch = ["N", seq] if rank == 3 else ["N"]
    model = make_model(nodes, [tensor_info("x", F32, batch + [widths[0]])],
                       [tensor_info("y", F32, batch + [widths[-1]])], inits)
    return model, x


def run(model, x):
    return ort_run(model, {"x": x})[0]


def assert_same(a, b, rel=1e-5, scale=None):
    """Equal to float32 rounding: ``rel`` relative to the largest magnitude in
    play (the outputs, or ``scale``: e.g. the hidden pre-activations, since
    composed path weights are rounded to float32 at that magnitude)."""
    err = np.abs(a.astype(np.float64) - b).max()
    ref = max(1.0, float(np.abs(a).max()), 0.0 if scale is None else float(scale))
    assert err <= rel * ref, f"max error {err:g} vs scale {ref:g}"


def hidden_scale(model, x) -> float:
    """Largest |pre-activation| of any hidden layer of ``model`` on ``x``."""
    from onnxfold.find import find_dense_graph
    from onnxfold.measure.stream import expose_outputs

    names = [c.producer.output for c in find_dense_graph(model).chains]
    if not names:
        return 0.0
    outs = ort_run(expose_outputs(model, names), {"x": x})
    return max(float(np.abs(o).max()) for o in outs)


def fold(model, x=None, **kw):
    # node_cost=0: these tests are about the rewrite itself, on nets too small
    # for a path's extra nodes to pay at run time (that rule has its own test)
    kw.setdefault("node_cost", 0)
    ctx = PassContext(calibration=None if x is None else CalibrationSet({"x": x}), batch_size=64)
    return LinearityPass(**kw)(model, ctx)


def layer(result, name):
    return next(lr for lr in result.layers if lr.layer == name)


def path_inputs(model):
    """Tensors read by onnxfold's linear paths (MatMul nodes it added)."""
    return [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and "onnxfold_path" in n.name
            and n.name.endswith("mm0")]


def dense_params(model):
    return sum(op.num_params for op in find_dense_graph(model).ops.values())


# --------------------------------------------------------------------------
# decide: pure functions


def test_interval_matmul_handles_unbounded_inputs_and_zero_weights():
    W = np.array([[1.0, -2.0], [0.0, 3.0], [0.5, 0.0]])  # 3 inputs -> 2 outputs
    lo, hi = decide.interval_matmul([0.0, -np.inf, -1.0], [1.0, 2.0, 1.0], W)
    # output 0: x0*1 + 0*x1 + 0.5*x2 in [0 - 0.5, 1 + 0.5]; output 1 unbounded below through x1*3
    assert lo[0] == -0.5 and hi[0] == 1.5
    assert lo[1] == -np.inf and hi[1] == -2 * 0.0 + 3 * 2.0
    assert not np.any(np.isnan(lo)) and not np.any(np.isnan(hi))


def test_interval_matmul_is_sound_on_random_points():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4))
    lo, hi = -rng.random(5), rng.random(5)
    zlo, zhi = decide.interval_matmul(lo, hi, W)
    x = rng.uniform(lo, hi, size=(2000, 5))
    z = x @ W
    assert np.all(z >= zlo - 1e-12) and np.all(z <= zhi + 1e-12)
    corners = np.where(W > 0, hi[:, None], lo[:, None])  # the maximising corner is attained
    np.testing.assert_allclose(np.einsum("ij,ij->j", corners, W), zhi)


def test_activation_interval_of_prelu_with_negative_slope_is_not_monotone():
    spec = ActivationSpec("prelu", slope=np.array([-0.5, 0.2]))
    pieces = decide.PieceTable.of(spec, 2)
    lo, hi = decide.activation_interval(pieces, np.array([-4.0, -4.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(lo, [0.0, -0.8])  # f(-4) = 2 for slope -0.5: minimum at the breakpoint
    np.testing.assert_allclose(hi, [2.0, 1.0])
    relu = decide.PieceTable.of(ActivationSpec("relu"), 1)
    assert decide.activation_interval(relu, -np.inf, np.inf) == (0.0, np.inf)


def test_classify_uses_rates_bounds_and_prefers_constant_on_ties():
    pieces = decide.PieceTable.of(ActivationSpec("relu"), 4)
    rate = np.array([[0.0, 1.0], [1.0, 0.0], [0.02, 0.98], [1.0, 1.0]])  # (n, P): off-piece, on-piece
    ev = decide.PieceEvidence(rows=100, piece_rate=rate, mean_z=np.array([1.0, -1.0, 0.9, 0.0]),
                              mean_a=np.array([1.0, 0.0, 0.95, 0.0]))
    c = decide.classify_neurons(pieces, 1.0, evidence=ev)
    assert list(c.kind) == [decide.LINEAR, decide.CONSTANT, decide.MIXED, decide.CONSTANT]
    c = decide.classify_neurons(pieces, 0.95, evidence=ev)
    assert c.kind[2] == decide.LINEAR
    assert c.offset[2] == pytest.approx(0.95 - 0.9)  # mean error E[f(z) - z]
    assert c.offset[0] == 0.0  # never left its piece: no correction
    c = decide.classify_neurons(pieces, 0.95, evidence=ev, mean_correction=False, allow_constant=False)
    assert c.offset[2] == 0.0 and c.kind[1] == decide.MIXED
    # bounds alone (data-free) and bounds overriding data
    c = decide.classify_neurons(pieces, 1.0, z_bounds=(np.array([0.5, -3, -1, 0]), np.array([2, -0.1, 1, 0])))
    assert list(c.kind) == [decide.LINEAR, decide.CONSTANT, decide.MIXED, decide.CONSTANT]
    assert list(c.provable) == [True, True, False, True]


def test_clip_pieces_constant_values_and_leaky_negative_piece_is_linear():
    clip = decide.PieceTable.of(ActivationSpec("clip", lo=-1.0, hi=2.0), 3)
    c = decide.classify_neurons(clip, 1.0, z_bounds=(np.array([-5.0, -0.5, 2.0]), np.array([-1.0, 1.5, 9.0])))
    assert list(c.kind) == [decide.CONSTANT, decide.LINEAR, decide.CONSTANT]
    np.testing.assert_allclose(c.offset, [-1.0, 0.0, 2.0])
    leaky = decide.PieceTable.of(ActivationSpec("leaky_relu", alpha=0.2), 1)
    c = decide.classify_neurons(leaky, 1.0, z_bounds=(np.array([-5.0]), np.array([-1.0])))
    assert c.kind[0] == decide.LINEAR and c.slope[0] == pytest.approx(0.2)


def test_evidence_counts_breakpoint_rows_on_both_pieces():
    pieces = decide.PieceTable.of(ActivationSpec("relu"), 2)
    # neuron 0: z in [0, 3] with some exact zeros (streamed counts put them on the off-piece)
    ev = decide.PieceEvidence.from_counts(10, np.array([[3, 10], [7, 0]]), [1.0, -1.0], [1.0, 0.0],
                                          min_z=np.array([0.0, -2.0]), max_z=np.array([3.0, -0.5]), pieces=pieces)
    c = decide.classify_neurons(pieces, 1.0, evidence=ev)
    assert list(c.kind) == [decide.LINEAR, decide.CONSTANT]


def test_removal_mask_keeps_the_least_certain_neuron():
    c = decide.NeuronClasses(kind=np.array([1, 1, 2], np.int8), piece=np.zeros(3, int), slope=np.ones(3),
                             offset=np.zeros(3), rate=np.array([1.0, 0.97, 0.99]), provable=np.zeros(3, bool))
    assert list(decide.removal_mask(c, True, True)) == [True, False, True]
    assert list(decide.removal_mask(c, False, True)) == [False, False, True]


def test_compose_and_path_forms_are_exact_and_cheapest():
    rng = np.random.default_rng(1)
    Wp, Wc = rng.standard_normal((20, 30)), rng.standard_normal((25, 20))  # in 30, n 20, out 25
    L = np.array([1, 4, 7])
    s = np.array([1.0, 0.5, 2.0])
    f = decide.compose_path([Wp.T], L, s, [Wc.T])
    M = Wp[L].T @ np.diag(s) @ Wc[:, L].T
    np.testing.assert_allclose(decide.product(f), M)
    auto = decide.choose_path_form(f)
    assert auto.form == "factored" and auto.rank == 3 and auto.params == 3 * (30 + 25)
    np.testing.assert_allclose(decide.product(auto.factors), M)
    dense = decide.choose_path_form(f, "dense")
    assert dense.params == 30 * 25
    # many neurons: dense is cheaper than factored
    L = np.arange(18)
    f = decide.compose_path([Wp.T], L, np.ones(18), [Wc.T])
    assert decide.choose_path_form(f).form == "dense"
    # chained source (a path x_k @ G0 @ G1 into the producer): split at the narrowest inner dim
    G0, G1 = rng.standard_normal((40, 2)), rng.standard_normal((2, 20))
    f = decide.compose_path([G0, G1], np.arange(10), np.ones(10), [Wc.T])
    c = decide.choose_path_form(f, "factored")
    assert c.rank == 2 and c.factors[0].shape == (40, 2)
    np.testing.assert_allclose(decide.product(c.factors), G0 @ G1[:, :10] @ Wc[:, :10].T)


def test_data_aware_truncation_matches_the_weighted_optimum():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 12))  # data on a 3-dim subspace
    X += 1e-3 * rng.standard_normal(X.shape)
    A, B = rng.standard_normal((12, 6)), rng.standard_normal((6, 9))
    t = decide.data_aware_truncation([A, B], X.T @ X, tolerance=1e-4)
    assert t.rank == 3
    err = np.linalg.norm(X @ (A @ B) - X @ decide.product(t.factors)) ** 2 / np.linalg.norm(X @ A @ B) ** 2
    assert err <= 1e-4 and err == pytest.approx(t.discarded, rel=1e-2)
    # the Eckart-Young optimum of X M at rank 3 has the same error
    s = np.linalg.svd(X @ A @ B, compute_uv=False)
    assert err == pytest.approx((s[3:] ** 2).sum() / (s ** 2).sum(), rel=1e-3)


def test_a_gram_root_is_a_square_root_and_both_roots_truncate_alike():
    """The truncation weighs by a Cholesky root of the ridged Gram; a Gram that
    is not numerically positive definite falls back to a root from its
    eigendecomposition. Either is a square root, and the truncation (rank,
    error, product) does not depend on which one."""
    from onnxfold.measure.stats import GramRoot

    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, 4)) @ rng.standard_normal((4, 10)) + 1e-3 * rng.standard_normal((400, 10))
    G = X.T @ X
    lam = 1e-9 * np.trace(G) / 10
    chol = GramRoot(G, 1e-9)
    assert chol.upper is not None
    R = chol.apply(np.eye(10))
    np.testing.assert_allclose(R.T @ R, G + lam * np.eye(10), rtol=1e-10, atol=1e-9 * np.abs(G).max())
    np.testing.assert_allclose(chol.solve(R), np.eye(10), atol=1e-6)
    # an indefinite "Gram" (rounding gone wrong): the eigen root, negative eigenvalues clipped
    bad = G - 2 * np.linalg.eigvalsh(G)[-1] * np.outer(np.eye(10)[0], np.eye(10)[0])
    eig = GramRoot(bad, 1e-9)
    assert eig.upper is None
    np.testing.assert_allclose(eig.solve(eig.apply(np.eye(10))), np.eye(10), atol=1e-8)
    A, B = rng.standard_normal((10, 6)), rng.standard_normal((6, 7))
    eig_of_G = GramRoot(G, 1e-9, method="eigh")  # the same Gram's eigen root, as the fallback builds it
    assert eig_of_G.upper is None
    by_chol = decide.data_aware_truncation([A, B], G, 1e-4, chol)
    by_eig = decide.data_aware_truncation([A, B], G, 1e-4, eig_of_G)
    assert by_chol.rank == by_eig.rank == 4
    assert by_chol.discarded == pytest.approx(by_eig.discarded, rel=1e-6)
    np.testing.assert_allclose(decide.product(by_chol.factors), decide.product(by_eig.factors), rtol=1e-6,
                               atol=1e-8 * np.abs(A @ B).max())


def test_paper_criterion_and_parameter_prediction_agree():
    for k, d_in, d_out in [(5, 10, 10), (60, 50, 40), (10, 784, 512), (300, 784, 512)]:
        shape = decide.LayerShape(row_cost=d_in + 1, col_cost=d_out, params=10 ** 7)
        pays = decide.params_after(shape, k, d_in * d_out) < shape.params
        assert pays == decide.paper_skip_pays(k, d_in, d_out)


# --------------------------------------------------------------------------
# the pass: exactness at T = 1.0 on random graphs


@st.composite
def nets(draw):
    kind = draw(st.sampled_from(sorted(ACTS)))
    rank = draw(st.sampled_from([2, 2, 3]))
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(2, 9))] + [draw(st.integers(3, 24)) for _ in range(depth)] + [draw(st.integers(1, 6))]
    allowed = FORMS if rank == 2 else ("matmul_add", "matmul_nobias")
    forms = [draw(st.sampled_from(allowed)) for _ in range(depth + 1)]
    # the first layer has a bias (something to engineer) and so has its consumer
    # (moving a single neuron must not have to pay for a new bias)
    forms[0] = draw(st.sampled_from([f for f in allowed if "nobias" not in f]))
    forms[1] = draw(st.sampled_from([f for f in allowed if "nobias" not in f]))
    return dict(seed=draw(st.integers(0, 10 ** 6)), widths=widths, kind=kind, forms=forms, rank=rank,
                const_nodes=draw(st.booleans()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets(), st.sampled_from(["extended", "paper"]))
def test_threshold_one_is_exact_on_random_dense_graphs(net, mode):
    model, x = build_net(**net)
    before = model.SerializeToString()
    res = fold(model, x, mode=mode)
    assert model.SerializeToString() == before  # the input model is never modified
    scale = hidden_scale(model, x)
    assert_same(run(model, x), run(res.model, x), scale=scale)
    onnx.checker.check_model(res.model)
    if mode == "extended":
        assert res.changed, "engineered neurons should have left"
        moved = sum(lr.linear + lr.constant for lr in res.layers)
        assert moved > 0
    for lr in res.layers:
        assert lr.width_after + lr.linear + lr.constant == lr.width_before
        assert lr.width_after >= 1
    if res.changed:
        assert [o.name for o in res.model.graph.output] == ["y"] and [i.name for i in res.model.graph.input] == ["x"]
        for batch in (1, 5):  # dynamic batch still works
            xb = x[:batch]
            assert_same(run(model, xb), run(res.model, xb), scale=scale)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets(), st.sampled_from(["extended", "paper"]), st.floats(0.6, 0.999), st.sampled_from(decide.PATH_FORMS))
def test_lossy_thresholds_give_consistent_reports_and_valid_models(net, mode, threshold, path_form):
    model, x = build_net(**net)
    res = fold(model, x, mode=mode, threshold=threshold, path_form=path_form)  # checks its own size prediction
    onnx.checker.check_model(res.model)
    y = run(res.model, x)
    assert y.shape == run(model, x).shape and np.all(np.isfinite(y))
    for lr in res.layers:
        assert lr.width_after + lr.linear + lr.constant == lr.width_before and lr.width_after >= 1
        assert lr.params_after <= lr.params_before
        if mode == "paper":
            assert lr.constant == 0 and lr.path_form in (None, "dense")
    if res.changed:
        assert dense_params(res.model) < dense_params(model)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets(), st.sampled_from([None, 1.0, 3.0]))
def test_data_free_decisions_are_exact_for_every_input_in_the_bounds(net, bound):
    model, x = build_net(**net)
    bounds = None if bound is None else (-bound, bound)
    res = fold(model, input_bounds=bounds)
    rng = np.random.default_rng(0)
    probe = rng.uniform(-bound, bound, x.shape) if bound else rng.standard_normal(x.shape) * 30
    probe = probe.astype(F32)
    assert_same(run(model, probe), run(res.model, probe))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_are_exact_at_threshold_one(name):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built")
    model = onnx.load(path)
    x = np.load(MODELS / f"{name}.calib.npz")["input"]
    res = LinearityPass()(model, PassContext(calibration=CalibrationSet({"input": x})))
    a, b = ort_run(model, {"input": x})[0], ort_run(res.model, {"input": x})[0]
    assert res.changed and dense_params(res.model) < dense_params(model)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


# --------------------------------------------------------------------------
# provable decisions, no data


def _provable_net():
    """x(5) → fc0(8) → Relu → fc1(6) → Relu → fc2(2). fc1 rows 0-1: non-negative
    weights, positive bias (provably linear on a ReLU output); rows 2-3:
    non-positive weights, negative bias (provably dead)."""
    rng = np.random.default_rng(3)
    W0, b0 = rng.standard_normal((8, 5)), rng.standard_normal(8) * 0.1
    W1, b1 = rng.standard_normal((6, 8)), rng.standard_normal(6) * 0.1
    W1[:2], b1[:2] = np.abs(W1[:2]), [0.3, 0.1]
    W1[2:4], b1[2:4] = -np.abs(W1[2:4]), [-0.2, -0.05]
    W2, b2 = rng.standard_normal((2, 6)), rng.standard_normal(2)
    inits = [numpy_helper.from_array(a.astype(F32), k) for k, a in
             dict(W0=W0, b0=b0, W1=W1, b1=b1, W2=W2, b2=b2).items()]
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["z0"], name="fc0", transB=1),
             helper.make_node("Relu", ["z0"], ["h0"], name="r0"),
             helper.make_node("Gemm", ["h0", "W1", "b1"], ["z1"], name="fc1", transB=1),
             helper.make_node("Relu", ["z1"], ["h1"], name="r1"),
             helper.make_node("Gemm", ["h1", "W2", "b2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [tensor_info("x", F32, ["N", 5])], [tensor_info("y", F32, ["N", 2])], inits)


def test_provably_dead_and_linear_neurons_are_found_without_data():
    model = _provable_net()
    res = fold(model)  # no calibration data
    lr = layer(res, "layer1")
    assert (lr.linear, lr.constant, lr.width_after) == (2, 2, 2)
    assert "provable" in lr.note
    assert layer(res, "layer0").width_after == 8  # nothing provable about an unbounded input
    assert any("no calibration data" in n for n in res.notes)
    x = (np.random.default_rng(4).standard_normal((200, 5)) * 50).astype(F32)  # any input at all
    assert_same(run(model, x), run(res.model, x))


def test_paper_mode_takes_provably_linear_neurons_only():
    res = fold(_provable_net(), mode="paper")
    lr = layer(res, "layer1")
    # the dense skip (8 x 2 = 16) costs less than the two neurons (2 * (8 + 1 + 2))
    assert (lr.constant, lr.linear, lr.path_form) == (0, 2, "dense")
    x = (np.random.default_rng(4).standard_normal((200, 5)) * 50).astype(F32)
    assert_same(run(_provable_net(), x), run(res.model, x))


def test_input_bounds_prove_first_layer_neurons():
    rng = np.random.default_rng(5)
    W0 = rng.uniform(-0.1, 0.1, (6, 4))
    W0[2:4] = [0.1, -0.1, 0.1, -0.1]  # z in [-0.2, 0.2] on [0, 1]^4: neither
    b0 = np.array([5.0, -5.0, 0.0, 0.0, 4.0, -3.0])
    W1, b1 = rng.standard_normal((2, 6)), rng.standard_normal(2)
    inits = [numpy_helper.from_array(a.astype(F32), k) for k, a in dict(W0=W0, b0=b0, W1=W1, b1=b1).items()]
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["z0"], name="fc0", transB=1),
             helper.make_node("Relu", ["z0"], ["h0"], name="r0"),
             helper.make_node("Gemm", ["h0", "W1", "b1"], ["y"], name="fc1", transB=1)]
    model = make_model(nodes, [tensor_info("x", F32, ["N", 4])], [tensor_info("y", F32, ["N", 2])], inits)
    assert not fold(model).changed  # unbounded input: nothing provable
    res = fold(model, input_bounds=(0.0, 1.0))
    lr = layer(res, "layer0")
    assert (lr.linear, lr.constant) == (2, 2)
    x = rng.uniform(0, 1, (300, 4)).astype(F32)
    assert_same(run(model, x), run(res.model, x))
    with pytest.raises(UsageError):
        fold(model, input_bounds=(np.zeros(3), np.ones(3)))  # wrong width


# --------------------------------------------------------------------------
# modes, thresholds, corrections, path forms, chaining


def test_paper_vs_extended_mode():
    roles = [["on"] * 10 + ["off"] * 6 + [""] * 8]
    model, x = build_net(11, [6, 24, 3], roles=roles)
    paper, ext = fold(model, x, mode="paper"), fold(model, x)
    lp, le = layer(paper, "layer0"), layer(ext, "layer0")
    assert (lp.linear, lp.constant, lp.path_form) == (10, 0, "dense")
    assert (le.linear, le.constant) == (10, 6)
    assert le.path_form == "dense" and le.params_after < lp.params_after
    for res in (paper, ext):
        assert_same(run(model, x), run(res.model, x))


def test_a_path_must_save_more_than_its_nodes_cost():
    """Extended mode weighs a new path's graph nodes (a MatMul per factor and
    an Add) at ``node_cost`` parameters each: 10 always-on neurons of a 6-24-3
    net save 10 * (6 + 1 + 3) = 100 parameters for an 18-parameter path, which
    pays for free nodes but not at the default cost; constant neurons need no
    path and leave either way."""
    roles = [["on"] * 10 + ["off"] * 6 + [""] * 8]
    model, x = build_net(11, [6, 24, 3], roles=roles)
    free = layer(fold(model, x, node_cost=0), "layer0")
    assert (free.linear, free.constant, free.path_form) == (10, 6, "dense")
    costly = fold(model, x, node_cost=decide.PATH_NODE_COST_PARAMS)
    lc = layer(costly, "layer0")
    assert (lc.linear, lc.constant, lc.path_form) == (0, 6, None)
    assert len(costly.model.graph.node) == len(model.graph.node)  # no node added
    assert_same(run(model, x), run(costly.model, x))
    # a cost just below what the path saves per node still takes it: 100 - 18 = 82 over 2 nodes
    assert layer(fold(model, x, node_cost=40), "layer0").linear == 10
    assert layer(fold(model, x, node_cost=42), "layer0").linear == 0


def test_threshold_below_one_takes_almost_linear_neurons():
    rng = np.random.default_rng(12)
    model, x = build_net(12, [3, 30, 2], roles=[[""] * 30], n_samples=400)
    # make 20 neurons active on ~97 % of the rows: bias at their 3 % quantile
    init = {t.name: t for t in model.graph.initializer}
    W = numpy_helper.to_array(init["B0"]).astype(np.float64)
    b = numpy_helper.to_array(init["C0"]).astype(np.float64).copy()
    z = x.astype(np.float64) @ W.T
    b[:20] = -np.quantile(z[:, :20], 0.03, axis=0)
    init["C0"].CopyFrom(numpy_helper.from_array(b.astype(F32), "C0"))
    del rng
    strict = fold(model, x, threshold=1.0)
    assert layer(strict, "layer0").linear == 0
    loose = fold(model, x, threshold=0.95)
    assert layer(loose, "layer0").linear == 20
    a, bb = run(model, x), run(loose.model, x)
    # lossy but the mean output is preserved by the mean-error correction (the
    # consumer is the output layer, so the correction is exact in the mean)
    np.testing.assert_allclose(bb.mean(0), a.mean(0), atol=1e-4)
    paper = fold(model, x, threshold=0.95, mode="paper")
    assert layer(paper, "layer0").linear == 20
    mean_err_paper = np.abs(run(paper.model, x).mean(0) - a.mean(0)).max()
    assert mean_err_paper > 100 * np.abs(bb.mean(0) - a.mean(0)).max()
    # removing the mean error lowers the mean squared error (by the squared mean)
    assert ((bb - a) ** 2).mean() < ((run(paper.model, x) - a) ** 2).mean()


def test_svd_picks_a_lower_rank_on_low_dimensional_data():
    rng = np.random.default_rng(13)
    basis = rng.standard_normal((3, 16))
    x = (rng.standard_normal((300, 3)) @ basis).astype(F32)  # 16 features, 3 dimensions
    roles = [["on"] * 30 + [""] * 10]
    model, _ = build_net(13, [16, 40, 12], roles=roles, n_samples=300)
    # rebuild the engineered biases on the low-dimensional data
    model, _ = _rebias(model, x, roles[0])
    exact = fold(model, x, path_form="factored")
    assert layer(exact, "layer0").path_rank == 12  # min(in 16, |L| 30, out 12)
    svd = fold(model, x, path_form="svd", svd_tolerance=1e-6)
    lr = layer(svd, "layer0")
    assert lr.path_form == "svd" and lr.path_rank == 3
    assert_same(run(model, x), run(svd.model, x), rel=1e-4)
    assert dense_params(svd.model) < dense_params(exact.model)
    # auto: truncation only when the threshold allows a loss
    assert layer(fold(model, x, threshold=0.99), "layer0").path_form == "svd"
    assert layer(fold(model, x), "layer0").path_form in ("dense", "factored")
    # a dense path is dense
    assert layer(fold(model, x, path_form="dense"), "layer0").path_form == "dense"


def _rebias(model, x, roles):
    init = {t.name: t for t in model.graph.initializer}
    W = numpy_helper.to_array(init["B0"]).astype(np.float64)
    b = numpy_helper.to_array(init["C0"]).astype(np.float64).copy()
    W, b = engineer_rows("relu", x.astype(np.float64) @ W.T, roles, {}, W, b)
    init["B0"].CopyFrom(numpy_helper.from_array(W.astype(F32), "B0"))
    init["C0"].CopyFrom(numpy_helper.from_array(b.astype(F32), "C0"))
    return model, x


def test_paths_chain_across_consecutive_layers():
    roles = [["on"] * 24 + [""] * 8, ["on"] * 24 + [""] * 8]
    model, x = build_net(14, [4, 32, 32, 3], roles=roles)
    for mode in ("paper", "extended"):
        res = fold(model, x, mode=mode)
        l0, l1 = layer(res, "layer0"), layer(res, "layer1")
        assert l0.linear >= 24 and l1.linear >= 24  # (a few random rows may be always on too)
        assert "chained" in l1.note
        # layer1's consumer reads the graph input through the chained path
        assert path_inputs(res.model).count("x") == 2 and "h0" in path_inputs(res.model)
        assert_same(run(model, x), run(res.model, x))
        assert dense_params(res.model) < dense_params(model)


def test_a_second_run_keeps_paths_that_read_the_hidden_layer_exact():
    roles = [["on"] * 24 + [""] * 8, ["on"] * 24 + [""] * 8]
    model, x = build_net(15, [4, 32, 32, 3], roles=roles)
    once = fold(model, x, layers={"layer1"})  # layer1's path reads h0
    assert layer(once, "layer0").note == "not selected" and not layer(once, "layer0").linear
    twice = fold(once.model, x)  # now layer0's neurons leave while a path reads them
    assert layer(twice, "layer0").linear >= 24
    assert_same(run(model, x), run(twice.model, x))


def test_every_neuron_leaving_keeps_one():
    model, x = build_net(16, [5, 12, 4], roles=[["on"] * 6 + ["off"] * 6])
    res = fold(model, x)
    lr = layer(res, "layer0")
    assert lr.width_after == 1 and lr.linear + lr.constant == 11
    assert_same(run(model, x), run(res.model, x))


def test_layer_selection_and_non_piecewise_activations():
    model, x = build_net(17, [5, 12, 12, 4], roles=[["off"] * 4 + [""] * 8] * 2)
    res = fold(model, x, layers={"layer1"})
    assert layer(res, "layer0").width_after == 12 and layer(res, "layer1").width_after == 8
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "Relu":
            n.op_type = "Sigmoid"
    res = fold(m, x)
    assert not res.changed and "not piecewise linear" in layer(res, "layer0").note


def test_unnamed_nodes_and_the_input_model_is_left_alone():
    model, x = build_net(18, [5, 12, 12, 4], roles=[["on"] * 8 + [""] * 4, ["off"] * 4 + [""] * 8])
    for n in model.graph.node:
        n.name = ""
    before = model.SerializeToString()
    res = fold(model, x)
    assert res.changed and model.SerializeToString() == before
    assert_same(run(model, x), run(res.model, x))


def test_bad_options_are_usage_errors():
    for kw in (dict(threshold=0.0), dict(threshold=1.5), dict(mode="fast"), dict(path_form="sparse"),
               dict(svd_tolerance=-1.0), dict(input_bounds=(1.0, 0.0)), dict(input_bounds=5)):
        with pytest.raises(UsageError):
            LinearityPass(**kw)
