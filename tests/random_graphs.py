"""Random dense graphs and the properties every exact pass must keep on them.

Used by ``tests/test_property.py`` (hypothesis) and ``tools/fuzz.py`` (thousands
of graphs). Every graph comes from ``random_graph(seed)``: 2-4 dense layers of
random widths, Gemm (transB 0/1, random alpha/beta) or MatMul+Add form, 2-D or
3-D input (MatMul form), a random activation, a random bias per layer, weights
as initializers or Constant nodes. Some hidden rows get a large positive or
negative bias (always / never active on the data), some a zero weight row
(provably constant for every input), so the rewrites really happen.
``check_graph`` checks the properties listed in tools/fuzz.py's docstring.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from helpers import build_mlp

PIECEWISE = ("relu", "leaky_relu", "prelu", "clip")
SMOOTH = ("gelu", "gelu_erf", "silu", "tanh", "sigmoid")
ACTIVATIONS = PIECEWISE + SMOOTH
FORMS = ("gemm", "gemm_transB0", "matmul")
RTOL = 1e-5


class Graph:
    """A generated model with its calibration input and a description."""

    def __init__(self, model, x, desc):
        self.model, self.x, self.desc = model, x, desc


def random_graph(seed: int, *, form: str | None = None, rank: int | None = None, activation: str | None = None,
                 const_nodes: bool | None = None, max_width: int = 12, samples: int = 48) -> Graph:
    """A random dense graph (see the module docstring); arguments fix a choice."""
    rng = np.random.default_rng(seed)
    form = form or str(rng.choice(FORMS))
    rank = rank or (int(rng.choice([2, 3])) if form == "matmul" else 2)
    if form != "matmul":
        rank = 2
    activation = activation or str(rng.choice(ACTIVATIONS))
    const_nodes = bool(rng.integers(2)) if const_nodes is None else const_nodes
    depth = int(rng.integers(2, 5))  # dense layers
    widths = [int(rng.integers(2, 9))] + [int(rng.integers(3, max_width + 1)) for _ in range(depth - 1)] \
        + [int(rng.integers(1, 6))]
    widths = widths[:depth + 1]
    weights = []
    for i in range(depth):
        fin, fout = widths[i], widths[i + 1]
        W = rng.standard_normal((fout, fin)) / np.sqrt(fin)
        b = rng.standard_normal(fout) * 0.2 if rng.random() < 0.75 else None
        if i < depth - 1:  # hidden layer: plant always-on / never-on / provably constant rows
            kinds = rng.choice(["plain", "on", "off", "zero_on", "zero_off"], size=fout,
                               p=[0.5, 0.15, 0.15, 0.1, 0.1])
            if np.all(kinds == "plain"):  # at least one planted row per hidden layer
                kinds[int(rng.integers(fout))] = str(rng.choice(["on", "off", "zero_on", "zero_off"]))
            if b is None and np.any(kinds != "plain"):
                b = np.zeros(fout)
            for r, k in enumerate(kinds):
                if k in ("on", "off"):
                    W[r] *= 0.05
                    b[r] = 8.0 if k == "on" else -8.0
                elif k in ("zero_on", "zero_off"):
                    W[r] = 0.0
                    b[r] = 1.5 if k == "zero_on" else -1.5
        weights.append((W, b))
    alpha = float(rng.choice([1.0, 0.5, 2.0])) if form != "matmul" else 1.0
    beta = float(rng.choice([1.0, 0.5])) if form != "matmul" else 1.0
    act_params = None
    if activation == "clip":
        act_params = {"lo": float(rng.choice([-1.0, 0.0])), "hi": [None, 1.0, 3.0][int(rng.integers(3))]}
    seq = int(rng.integers(1, 4))
    model = build_mlp(widths, activation, form=form, rank=rank, seq=seq, const_nodes=const_nodes, weights=weights,
                      alpha=alpha, beta=beta, act_params=act_params, seed=seed,
                      bias_first=bool(rng.integers(2)), bias_shape=str(rng.choice(["n", "1n"])))
    shape = (samples, seq, widths[0]) if rank == 3 else (samples, widths[0])
    x = rng.standard_normal(shape).astype(np.float32)
    desc = (f"seed={seed} form={form} rank={rank} act={activation} widths={widths} const_nodes={const_nodes} "
            f"alpha={alpha} beta={beta} biases={[w[1] is not None for w in weights]}")
    return Graph(model, x, desc)


# --------------------------------------------------------------------------
# the properties


def _run(model, x):
    from helpers import ort_run

    return ort_run(model, {"x": x})[0].astype(np.float64)


def _close(ref: np.ndarray, got: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ref - got).max()) if ref.size else 0.0
    if not np.all(np.isfinite(got)) or err > RTOL * scale:
        raise AssertionError(f"{what}: max abs error {err:.3g} > {RTOL:g} x {scale:.3g}")


def _valid(model, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what}: onnx.checker: {str(e).splitlines()[0]}") from None


def check_graph(g: Graph, *, determinism: bool = True, tmpdir: str | Path | None = None) -> dict:
    """Check every property on ``g``; raises AssertionError naming the first
    one that fails. Returns what happened (which passes changed the model)."""
    from onnxfold.measure.data import load_calibration
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.folding import FoldingPass
    from onnxfold.passes.linearity import LinearityPass

    model, x = g.model, g.x
    before = model.SerializeToString()
    ref = _run(model, x)
    x_big = (x * 10).astype(np.float32)
    ref_big = _run(model, x_big)
    calib = load_calibration({"x": x}, model)
    with_data = PassContext(calibration=calib, providers=["CPUExecutionProvider"])
    no_data = PassContext(providers=["CPUExecutionProvider"])
    changed = {}
    runs = [("linearity T=1.0 (data)", LinearityPass(threshold=1.0), with_data, False),
            ("linearity (data-free)", LinearityPass(threshold=1.0), no_data, True),
            ("folding r=0 (data-free)", FoldingPass(ratio=0.0), no_data, True),
            ("folding r=0 drop-constant (data)", FoldingPass(ratio=0.0, drop_constant=True, repair="none"),
             with_data, False)]
    for name, p, ctx, any_input in runs:
        res = p(model, ctx)
        changed[name] = bool(res.changed)
        _valid(res.model, name)
        _close(ref, _run(res.model, x), name)  # also: it loads and runs in onnxruntime
        if any_input:
            _close(ref_big, _run(res.model, x_big), name + " on 10x inputs")
    if model.SerializeToString() != before:
        raise AssertionError("a pass modified its input model")
    if determinism:
        import onnxfold

        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            files = []
            for i in range(2):
                r = onnxfold.optimize(model, {"x": x}, fold_ratio=0.5, seed=7, provider="cpu")
                files.append(Path(r.save(Path(tmp) / f"run{i}.onnx")).read_bytes())
            if files[0] != files[1]:
                raise AssertionError("optimize twice with the same seed: the saved files differ")
    return changed
