"""Exporter matrix: tiny models trained here, exported by real exporters.

For each exporter, onnxfold must find every dense chain, optimize under the
default budget, and the optimized model must match the *framework's own*
predictions (not only the exported ONNX) within that budget: top-1
agreement >= 99.5 % for classifiers, max error <= 1e-3 relative to the output
range (plus float32 export noise) for regressors.

| exporter | graph shape |
|---|---|
| torch.onnx.export(dynamo=False), 2-D / 3-D input | Gemm / MatMul+Add |
| torch.onnx.export(dynamo=True, onnxscript), 2-D / 3-D | Gemm / MatMul+Add |
| skl2onnx MLPClassifier (ZipMap on and off), MLPRegressor | Cast, MatMul+Add, Softmax, ArgMax, ZipMap |
| jax2onnx flax.nnx MLP, plain jax function | Gemm (+Add) |
| tf2onnx/Keras shape (inline): MatMul → Relu, no bias Add | MatMul |

Each exporter's package is optional: missing ones skip with the reason
(``-ra`` lists them). ``.ci/run`` installs all of them.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest

import onnxfold
from onnxfold.decide.budget import Budget, DEFAULT_MAX_RELATIVE_ERROR, DEFAULT_MIN_AGREEMENT
from onnxfold.find import find_dense_graph

from helpers import build_mlp, ort_run

# rows [0, N_TRAIN) train; [N_TRAIN, N_CALIB) calibrate; [N_CALIB, end) evaluate. Calibrating on the
# training rows would underestimate flips: a model is most confident on what it was trained on.
N_TRAIN, N_CALIB = 600, 1400


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    p = np.random.default_rng(0).permutation(len(X))
    return (X[p] / 16.0).astype(np.float32), y[p].astype(np.int64)


def _single_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)  # sklearn/BLAS oversubscribe 2 cores badly


def _check(model: onnx.ModelProto, X: np.ndarray, reference: np.ndarray, *, chains: int, kind: str,
           output: int = 0, input_name: str | None = None, max_error: float | None = None):
    """Find ``chains`` chains, optimize (default budget, or ``--max-error
    max_error``), and compare the optimized model's output ``output`` with the
    framework's ``reference``."""
    view = find_dense_graph(model)
    assert len(view.chains) == chains, [(s.where, s.reason) for s in view.skipped]
    name = input_name or model.graph.input[0].name
    budget = None if max_error is None else Budget(max_error=max_error)
    result = onnxfold.optimize(model, {name: X[N_TRAIN:N_CALIB]}, eval_data={name: X[N_CALIB:]}, provider="cpu",
                               max_evaluations=10, budget=budget)
    rep = result.report
    assert rep["status"] == "optimized", (rep["status"], rep["notes"], rep["budget"])
    assert rep["ratios"]["parameters"] < 1.0
    got = ort_run(result.model, {name: X[N_CALIB:]})[output]
    ref = reference[N_CALIB:]
    if kind == "classifier":
        pred = got if got.ndim == 1 else got.reshape(len(got), -1).argmax(1)
        want = ref if ref.ndim == 1 else ref.reshape(len(ref), -1).argmax(1)
        assert 100.0 * np.mean(pred == want) >= DEFAULT_MIN_AGREEMENT
    else:
        err = np.abs(got.astype(np.float64).reshape(ref.shape) - ref).max()
        limit = DEFAULT_MAX_RELATIVE_ERROR * np.abs(ref).max() if max_error is None else max_error
        # + what the export alone costs (float32 vs the framework's float64)
        assert err <= limit + 1e-4 * max(1.0, np.abs(ref).max())
    return result


# ---------------------------------------------------------------------------
# PyTorch


def _train_torch(X, y, rank: int, bias: bool = True):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    nn = torch.nn
    if rank == 2:
        net = nn.Sequential(nn.Linear(64, 64, bias=bias), nn.ReLU(), nn.Linear(64, 32, bias=bias), nn.ReLU(),
                            nn.Linear(32, 10, bias=bias))
        xt = torch.from_numpy(X)
    else:  # per-row MLP on (batch, 8, 8), then flatten + classifier
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8),
                            nn.Flatten(), nn.Linear(64, 10))
        xt = torch.from_numpy(X.reshape(-1, 8, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    yt = torch.from_numpy(y[:N_TRAIN])
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[:N_TRAIN]), yt).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ref = net(xt).numpy().astype(np.float64)
    return net, xt, ref


def _export_torch(net, xt, dynamo: bool, tmp_path) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    if dynamo:
        pytest.importorskip("onnxscript")
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (xt[:4],), str(path), input_names=["x"], output_names=["logits"], dynamo=True,
                              opset_version=18, dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
                              verbose=False)
        else:
            torch.onnx.export(net, (xt[:4],), str(path), input_names=["x"], output_names=["logits"], dynamo=False,
                              opset_version=17, dynamic_axes={"x": {0: "batch"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("rank", [2, 3], ids=["2d_gemm", "3d_matmul"])
def test_torch_export(digits, tmp_path, rank, dynamo):
    X, y = digits
    net, xt, ref = _train_torch(X, y, rank)
    model = _export_torch(net, xt, dynamo, tmp_path)
    ops = {n.op_type for n in model.graph.node}
    if rank == 2:
        assert "Gemm" in ops or "MatMul" in ops
    else:
        assert "MatMul" in ops
    _check(model, xt.numpy(), ref, chains=2, kind="classifier")


# ---------------------------------------------------------------------------
# scikit-learn via skl2onnx


SK_TRAIN, SK_CALIB, SK_ALL = 1500, 4500, 6500  # train / calibrate / evaluate row ranges


@pytest.fixture(scope="module")
def tabular():
    """Synthetic tabular data (scikit-learn's usual habitat), large enough that
    held-out choices and the final evaluation agree."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=SK_ALL, n_features=20, n_informative=10, n_classes=4,
                               n_clusters_per_class=1, class_sep=1.5, random_state=0)
    return X.astype(np.float32), y


def _check_sk(model, X, reference, *, chains, kind, output=0, max_error=None):
    global N_TRAIN, N_CALIB
    saved = N_TRAIN, N_CALIB
    N_TRAIN, N_CALIB = SK_TRAIN, SK_CALIB
    try:
        return _check(model, X, reference, chains=chains, kind=kind, output=output, max_error=max_error)
    finally:
        N_TRAIN, N_CALIB = saved


@pytest.fixture(scope="module")
def sk_classifier(tabular):
    from sklearn.neural_network import MLPClassifier

    X, y = tabular
    with _single_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        # big enough that compressing it pays at run time: a 20-64-32-4 net (3.5k parameters) has
        # nothing whose removal saves more than the graph nodes a linear path would add
        return MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=100, random_state=0).fit(X[:SK_TRAIN],
                                                                                           y[:SK_TRAIN])


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "no_zipmap"])
def test_skl2onnx_classifier(tabular, sk_classifier, zipmap):
    skl2onnx = pytest.importorskip("skl2onnx")
    X, _ = tabular
    options = None if zipmap else {id(sk_classifier): {"zipmap": False}}
    model = skl2onnx.to_onnx(sk_classifier, X[:1], options=options, target_opset=17)
    if zipmap:
        assert "ZipMap" in {n.op_type for n in model.graph.node}
    with _single_thread():
        labels = sk_classifier.predict(X)
        proba = sk_classifier.predict_proba(X)
    res = _check_sk(model, X, labels, chains=2, kind="classifier", output=0)  # output 0: the label
    if not zipmap:  # probabilities are a tensor: compare them too
        got = ort_run(res.model, {"X": X[SK_CALIB:]})[1]
        assert 100.0 * np.mean(got.argmax(1) == proba[SK_CALIB:].argmax(1)) >= DEFAULT_MIN_AGREEMENT


def test_skl2onnx_regressor(tabular):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPRegressor

    X, _ = tabular
    target = np.tanh(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] - X[:, 3]  # smooth, learnable
    with _single_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = MLPRegressor(hidden_layer_sizes=(128, 64), max_iter=100, random_state=0).fit(X[:SK_TRAIN],
                                                                                       target[:SK_TRAIN])
        ref = reg.predict(X).astype(np.float64)
    model = skl2onnx.to_onnx(reg, X[:1], target_opset=17)
    # a regressor's default budget (max error 1e-3 of the range) leaves nothing to remove here;
    # a user budget of 0.05 absolute (0.5 % of the target range) does
    _check_sk(model, X, ref.reshape(-1, 1), chains=2, kind="values", max_error=0.05)


# ---------------------------------------------------------------------------
# JAX via jax2onnx (installed with --no-deps: it hard-requires the CPU
# onnxruntime package, which must not sit beside onnxruntime-gpu)


def _jax():
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    try:
        import jax2onnx  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing or broken optional install
        pytest.skip(f"jax2onnx not importable ({type(e).__name__}: {e}); see .ci/run")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import logging

    logging.getLogger("jax2onnx").setLevel(logging.ERROR)


def test_jax2onnx_flax_nnx_mlp(digits):
    _jax()
    import jax
    import optax
    from flax import nnx
    from jax2onnx import to_onnx

    X, y = digits

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 64, rngs=rngs)
            self.l2 = nnx.Linear(64, 32, rngs=rngs)
            self.l3 = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        grads = nnx.grad(loss)(model)
        opt.update(model, grads)

    for _ in range(150):
        step(model, opt, X[:N_TRAIN], y[:N_TRAIN])
    ref = np.asarray(jax.device_get(model(X)), dtype=np.float64)
    onx = to_onnx(model, [("B", 64)], opset=17)
    _check(onx, X, ref, chains=2, kind="classifier")


def test_jax2onnx_plain_function(digits):
    _jax()
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    X, y = digits
    rng = np.random.default_rng(0)
    params = {"W1": (rng.standard_normal((64, 48)) / 8).astype(np.float32), "b1": np.zeros(48, np.float32),
              "W2": (rng.standard_normal((48, 10)) / 7).astype(np.float32), "b2": np.zeros(10, np.float32)}

    def forward(p, x):
        return jax.nn.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def loss(p, x, t):
        logits = forward(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1))

    g = jax.jit(jax.grad(loss))
    for _ in range(200):
        grads = g(params, X[:N_TRAIN], y[:N_TRAIN])
        params = {k: params[k] - 0.5 * grads[k] for k in params}
    trained = {k: np.asarray(v) for k, v in params.items()}

    def fn(x):  # weights are closed over: the exporter stores them as constants
        return forward(trained, x)

    ref = np.asarray(fn(X), dtype=np.float64)
    onx = to_onnx(fn, [("B", 64)], opset=17)
    _check(onx, X, ref, chains=1, kind="classifier")


# ---------------------------------------------------------------------------
# Keras/tf2onnx graph shape, built inline: tf2onnx emits MatMul → Relu with no
# bias Add when a Dense layer's bias is all zeros.


def test_tf2onnx_shape_matmul_relu_without_bias(digits):
    X, y = digits
    net, xt, ref = _train_torch(X, y, 2, bias=False)
    weights = [(layer.weight.detach().numpy(), None) for layer in net if hasattr(layer, "weight")]
    model = build_mlp([64, 64, 32, 10], "relu", form="matmul", bias=False, weights=weights)
    ops = [n.op_type for n in model.graph.node]
    assert "Add" not in ops and "Gemm" not in ops
    _check(model, X, ref, chains=2, kind="classifier", input_name="x")
