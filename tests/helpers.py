"""Small inline ONNX model builders and runners shared by the tests.

Everything here is independent of onnxfold: models are built with
``onnx.helper`` and their reference numbers come from plain numpy, so tests can
compare what onnxfold extracts or rewrites against these.

Main entry points:

- ``build_mlp(widths, activation=..., form=..., ...)``: a fully connected net,
  optionally with its ground-truth parameters (``return_params=True``).
- ``np_mlp(params, x)``: the reference forward pass of those parameters.
- ``activation_model(kind, n)`` / ``np_activation(kind, z, act_params)``: one
  activation alone, for comparing against onnxruntime.
- ``make_model(...)``: graph + model with the IR version onnxruntime accepts.
- ``attention_graph(w, b, heads, head_dim)``: the nodes and initializers of one
  unfused attention block with constant Reshape shapes.
- ``ort_run(model, feeds)``: run with onnxruntime's CPU provider.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnx.helper's default IR version is newer than onnxruntime accepts
OPSET = 17
OPSET_GELU = 20  # first opset with a native Gelu

# kind -> default parameters (overridable with ``act_params``)
ACTIVATIONS = {
    "relu": {},
    "leaky_relu": {"alpha": 0.1},
    "prelu": {"slope": None},  # None: per-channel, random in [0.05, 0.5]
    "prelu_scalar": {"slope": 0.25},
    "clip": {"lo": -0.5, "hi": 0.5},  # either bound may be None (input left empty)
    "sigmoid": {},
    "tanh": {},
    "gelu": {},  # native Gelu (opset 20)
    "gelu_erf": {},  # torch: Div(x,√2)→Erf→Add(1)→Mul(x,·)→Mul(·,0.5)
    "gelu_erf_half": {},  # Mul(x,0.5) first: Mul(x,0.5)·(1+Erf(x/√2))
    "silu": {},  # x * Sigmoid(x)
    "softplus": {},  # not supported by onnxfold: for skip tests
}

_NP_DTYPE_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
                     np.dtype(np.float64): TensorProto.DOUBLE}


def onnx_dtype(dtype) -> int:
    return _NP_DTYPE_TO_ONNX[np.dtype(dtype)]


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, value_info=(),
               name: str = "g") -> onnx.ModelProto:
    """A ModelProto with ``ir_version=8`` (what onnxruntime accepts)."""
    g = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers),
                          value_info=list(value_info))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                             producer_name="onnxfold-tests")


def tensor_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))


class _Consts:
    """Adds constants to a graph as initializers or as Constant nodes."""

    def __init__(self, as_nodes: bool):
        self.as_nodes = as_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def __call__(self, name: str, arr) -> str:
        t = numpy_helper.from_array(np.asarray(arr), name)
        if self.as_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}.const", value=t))
        else:
            self.inits.append(t)
        return name


def activation_nodes(kind: str, inp: str, out: str, n: int, prefix: str, consts: _Consts, dtype=np.float32,
                     act_params: dict | None = None, rng: np.random.Generator | None = None):
    """Nodes computing ``out = f(inp)``; returns (nodes, resolved params)."""
    if kind not in ACTIVATIONS:
        raise ValueError(kind)
    p = {**ACTIVATIONS[kind], **(act_params or {})}
    rng = rng or np.random.default_rng(0)
    mk = helper.make_node
    c = lambda suffix, v: consts(f"{prefix}.{suffix}", np.asarray(v, dtype=dtype))  # noqa: E731
    if kind == "relu":
        return [mk("Relu", [inp], [out], name=f"{prefix}.relu")], p
    if kind == "leaky_relu":
        return [mk("LeakyRelu", [inp], [out], name=f"{prefix}.leaky", alpha=float(p["alpha"]))], p
    if kind in ("prelu", "prelu_scalar"):
        s = p["slope"]
        if s is None:
            s = rng.uniform(0.05, 0.5, size=n)
        s = np.asarray(s, dtype=dtype)
        if s.ndim == 0:
            s = s.reshape(1)
        p["slope"] = s
        return [mk("PRelu", [inp, c("slope", s)], [out], name=f"{prefix}.prelu")], p
    if kind == "clip":
        lo = "" if p["lo"] is None else c("lo", p["lo"])
        hi = "" if p["hi"] is None else c("hi", p["hi"])
        ins = [inp, lo, hi] if hi else ([inp, lo] if lo else [inp])
        return [mk("Clip", ins, [out], name=f"{prefix}.clip")], p
    if kind == "sigmoid":
        return [mk("Sigmoid", [inp], [out], name=f"{prefix}.sigmoid")], p
    if kind == "tanh":
        return [mk("Tanh", [inp], [out], name=f"{prefix}.tanh")], p
    if kind == "softplus":
        return [mk("Softplus", [inp], [out], name=f"{prefix}.softplus")], p
    if kind == "gelu":
        return [mk("Gelu", [inp], [out], name=f"{prefix}.gelu")], p
    if kind == "silu":
        return [mk("Sigmoid", [inp], [f"{prefix}.sig"], name=f"{prefix}.sigmoid"),
                mk("Mul", [inp, f"{prefix}.sig"], [out], name=f"{prefix}.silu_mul")], p
    if kind in ("gelu_erf", "gelu_erf_half"):
        t = lambda s: f"{prefix}.{s}"  # noqa: E731
        nodes = [mk("Div", [inp, c("sqrt2", math.sqrt(2.0))], [t("div")], name=t("div")),
                 mk("Erf", [t("div")], [t("erf")], name=t("erf")),
                 mk("Add", [t("erf"), c("one", 1.0)], [t("erf1")], name=t("add1"))]
        if kind == "gelu_erf":
            nodes += [mk("Mul", [inp, t("erf1")], [t("mul")], name=t("mul")),
                      mk("Mul", [t("mul"), c("half", 0.5)], [out], name=t("mul_half"))]
        else:
            nodes += [mk("Mul", [inp, c("half", 0.5)], [t("half_x")], name=t("mul_half")),
                      mk("Mul", [t("half_x"), t("erf1")], [out], name=t("mul"))]
        return nodes, p
    raise AssertionError(kind)


def np_activation(kind: str, z: np.ndarray, act_params: dict | None = None) -> np.ndarray:
    """Reference f(z) in float64, independent of onnxfold."""
    p = {**ACTIVATIONS[kind], **(act_params or {})}
    z = np.asarray(z, dtype=np.float64)
    if kind == "relu":
        return np.maximum(z, 0.0)
    if kind == "leaky_relu":
        return np.where(z > 0, z, p["alpha"] * z)
    if kind in ("prelu", "prelu_scalar"):
        return np.where(z > 0, z, np.asarray(p["slope"], dtype=np.float64) * z)
    if kind == "clip":
        lo = -np.inf if p["lo"] is None else p["lo"]
        hi = np.inf if p["hi"] is None else p["hi"]
        return np.clip(z, lo, hi)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if kind == "tanh":
        return np.tanh(z)
    if kind == "softplus":
        return np.log1p(np.exp(z))
    if kind in ("gelu", "gelu_erf", "gelu_erf_half"):
        erf = np.vectorize(math.erf)
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    if kind == "silu":
        return z / (1.0 + np.exp(-z))
    raise AssertionError(kind)


def activation_model(kind: str, n: int, *, act_params: dict | None = None, dtype=np.float32,
                     seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """A model ``y = f(x)`` for x of shape (batch, n); returns (model, resolved params)."""
    consts = _Consts(as_nodes=False)
    nodes, p = activation_nodes(kind, "x", "y", n, "act", consts, dtype, act_params, np.random.default_rng(seed))
    opset = OPSET_GELU if kind == "gelu" else OPSET
    m = make_model(nodes, [tensor_info("x", dtype, ["N", n])], [tensor_info("y", dtype, ["N", n])],
                   consts.inits, opset=opset)
    return m, p


def build_mlp(widths, activation: str = "relu", *, form: str = "gemm", bias: bool = True,
              const_nodes: bool = False, rank: int = 2, seq: int = 3, seed: int = 0, alpha: float = 1.0,
              beta: float = 1.0, bias_shape: str = "n", bias_first: bool = False, dtype=np.float32,
              act_params: dict | None = None, weight_scale: float = 1.0, weights=None,
              return_params: bool = False):
    """A fully connected net ``widths[0] → … → widths[-1]`` with ``activation``
    between consecutive dense layers (not after the last one).

    form: "gemm" (Gemm transB=1), "gemm_transB0" (Gemm transB=0) or "matmul"
        (MatMul, bias as a separate Add; ``bias_first`` writes Add(b, x)).
    bias_shape: "n" ([N]) or "1n" ([1, N]).
    const_nodes: weights/biases/activation constants as Constant nodes.
    rank: 2 (batch, features) or 3 (batch, seq, features; matmul form only).
    alpha, beta: Gemm attributes (gemm forms only).
    weights: optional list of ``(W out × in, b or None)`` per layer to store
        instead of random ones (``widths`` must still match).

    Names: input ``x``, output ``y``; layer i's main node ``fc{i}``, its
    pre-activation ``h{i}.pre``, hidden activation ``h{i}``.
    With ``return_params`` returns ``(model, params)`` where ``params[i]`` holds
    the effective ``W`` (out × in, float64), ``b`` (out, or None), ``act`` and
    ``act_params`` of layer i - what the graph computes, for ``np_mlp``.
    """
    if form not in ("gemm", "gemm_transB0", "matmul"):
        raise ValueError(form)
    if rank == 3 and form != "matmul":
        raise ValueError("3-D input needs form='matmul'")
    rng = np.random.default_rng(seed)
    consts = _Consts(as_nodes=const_nodes)
    nodes: list[onnx.NodeProto] = []
    params = []
    mk = helper.make_node
    cur = "x"
    n_layers = len(widths) - 1
    for i in range(n_layers):
        fin, fout = widths[i], widths[i + 1]
        W = (rng.standard_normal((fout, fin)) * weight_scale / np.sqrt(fin)).astype(dtype)
        b = (rng.standard_normal(fout) * 0.1).astype(dtype) if bias else None
        if weights is not None:
            W = np.asarray(weights[i][0], dtype=dtype).reshape(fout, fin)
            b = None if weights[i][1] is None else np.asarray(weights[i][1], dtype=dtype).reshape(fout)
        bstore = None if b is None else (b.reshape(1, fout) if bias_shape == "1n" else b)
        last = i == n_layers - 1
        pre = "y" if last else f"h{i}.pre"
        if form in ("gemm", "gemm_transB0"):
            transB = 1 if form == "gemm" else 0
            B = W if transB else W.T
            ins = [cur, consts(f"fc{i}.B", B)]
            if b is not None:
                ins.append(consts(f"fc{i}.C", bstore))
            nodes.append(mk("Gemm", ins, [pre], name=f"fc{i}", transB=transB, alpha=float(alpha), beta=float(beta)))
            W_eff = alpha * W.astype(np.float64)
            b_eff = None if b is None else beta * b.astype(np.float64)
        else:
            mm_out = f"fc{i}.mm" if b is not None else pre
            nodes.append(mk("MatMul", [cur, consts(f"fc{i}.B", np.ascontiguousarray(W.T))], [mm_out], name=f"fc{i}"))
            if b is not None:
                bn = consts(f"fc{i}.bias", bstore)
                nodes.append(mk("Add", [bn, mm_out] if bias_first else [mm_out, bn], [pre], name=f"fc{i}.add"))
            W_eff = W.astype(np.float64)
            b_eff = None if b is None else b.astype(np.float64)
        layer = {"W": W_eff, "b": b_eff, "act": None, "act_params": None}
        if not last:
            hid = f"h{i}"
            an, ap = activation_nodes(activation, pre, hid, fout, f"act{i}", consts, dtype, act_params, rng)
            nodes += an
            layer["act"], layer["act_params"] = activation, ap
            cur = hid
        params.append(layer)
    batch = ["N", seq] if rank == 3 else ["N"]
    opset = OPSET_GELU if activation == "gelu" else OPSET
    m = make_model(consts.nodes + nodes, [tensor_info("x", dtype, batch + [widths[0]])],
                   [tensor_info("y", dtype, batch + [widths[-1]])], consts.inits, opset=opset)
    return (m, params) if return_params else m


def build_bn_mlp(seed=0, eps=1e-3, n_in=5, n_hid=6, n_out=3):
    """``x → Gemm fc0 → BatchNormalization bn0 → Relu → Gemm fc1 → y``.

    Returns (model, W_fold, b_fold, W1, b1): fc0 with the BN folded in, and fc1 (float64).
    """
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((n_hid, n_in)).astype(np.float32)
    b0 = rng.standard_normal(n_hid).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, n_hid).astype(np.float32)
    beta = rng.standard_normal(n_hid).astype(np.float32)
    mean = rng.standard_normal(n_hid).astype(np.float32)
    var = rng.uniform(0.2, 3.0, n_hid).astype(np.float32)
    W1 = rng.standard_normal((n_out, n_hid)).astype(np.float32)
    b1 = rng.standard_normal(n_out).astype(np.float32)
    inits = [numpy_helper.from_array(a, k) for k, a in
             dict(W0=W0, b0=b0, gamma=gamma, beta=beta, mean=mean, var=var, W1=W1, b1=b1).items()]
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["g0"], name="fc0", transB=1),
             helper.make_node("BatchNormalization", ["g0", "gamma", "beta", "mean", "var"], ["bn0"], name="bn0",
                              epsilon=eps),
             helper.make_node("Relu", ["bn0"], ["h0"], name="relu0"),
             helper.make_node("Gemm", ["h0", "W1", "b1"], ["y"], name="fc1", transB=1)]
    m = make_model(nodes, [tensor_info("x", np.float32, ["N", n_in])], [tensor_info("y", np.float32, ["N", n_out])],
                   inits)
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    W_fold = W0.astype(np.float64) * s[:, None]
    b_fold = (b0 - mean.astype(np.float64)) * s + beta
    return m, W_fold, b_fold, W1.astype(np.float64), b1.astype(np.float64)


def build_passthrough_mlp(kind: str, form: str):
    """``x → dense fc0 → [P] → (bias Add) → [P] → Relu → [P] → Gemm fc1 → [P] → y`` with
    every P an ``Identity`` or an inference-mode ``Dropout``; form "gemm" or "matmul"
    (MatMul, P, Add, P). Returns (model, params) as ``build_mlp(return_params=True)``."""
    rng = np.random.default_rng(7)
    W0, b0 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    W1, b1 = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    inits = [numpy_helper.from_array(W0, "W0"), numpy_helper.from_array(b0, "b0"),
             numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(np.array(0.3, np.float32), "ratio")]
    nodes: list[onnx.NodeProto] = []

    def passthrough(src: str, out: str | None = None) -> str:
        out = out or f"p{sum(n.op_type == kind for n in nodes) + 1}"
        if kind == "Identity":
            nodes.append(helper.make_node("Identity", [src], [out], name=out))
        elif kind == "Dropout":  # opset 12+: (data, ratio) -> output; inference mode without training_mode
            nodes.append(helper.make_node("Dropout", [src, "ratio"], [out], name=out))
        else:
            raise ValueError(kind)
        return out

    if form == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", "W0", "b0"], ["g0"], name="fc0", transB=1))
        t = passthrough("g0")
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(W0.T), "W0T"))
        nodes.append(helper.make_node("MatMul", ["x", "W0T"], ["m0"], name="fc0"))
        t = passthrough("m0")
        nodes.append(helper.make_node("Add", [t, "b0"], ["a0"], name="fc0.add"))
        t = passthrough("a0")
    nodes.append(helper.make_node("Relu", [t], ["h0"], name="relu0"))
    t = passthrough("h0")
    nodes.append(helper.make_node("Gemm", [t, "W1", "b1"], ["g1"], name="fc1", transB=1))
    passthrough("g1", "y")
    m = make_model(nodes, [tensor_info("x", np.float32, ["N", 4])], [tensor_info("y", np.float32, ["N", 3])], inits)
    params = [dict(W=W0.astype(np.float64), b=b0.astype(np.float64), act="relu", act_params=None),
              dict(W=W1.astype(np.float64), b=b1.astype(np.float64), act=None, act_params=None)]
    return m, params


def build_residual_mlp(d: int = 4, n: int = 8, seq: int = 3, seed: int = 11):
    """Transformer-style MLP block on 3-D input, second layer without bias:
    ``r = x + x;  y = r + W2·relu(W1·r + b1)`` (MatMul fc1 + Add, Relu, MatMul fc2).
    ``r`` feeds both fc1 and the residual Add. Returns (model, params) where
    params describe the block (``y - r``)."""
    rng = np.random.default_rng(seed)
    W1, b1 = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    W2 = rng.standard_normal((d, n)).astype(np.float32)
    inits = [numpy_helper.from_array(np.ascontiguousarray(W1.T), "W1T"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(np.ascontiguousarray(W2.T), "W2T")]
    nodes = [helper.make_node("Add", ["x", "x"], ["r"], name="resid_in"),
             helper.make_node("MatMul", ["r", "W1T"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1.add"),
             helper.make_node("Relu", ["a1"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "W2T"], ["m2"], name="fc2"),
             helper.make_node("Add", ["r", "m2"], ["y"], name="resid_out")]
    m = make_model(nodes, [tensor_info("x", np.float32, ["N", seq, d])], [tensor_info("y", np.float32, ["N", seq, d])],
                   inits)
    params = [dict(W=W1.astype(np.float64), b=b1.astype(np.float64), act="relu", act_params=None),
              dict(W=W2.astype(np.float64), b=None, act=None, act_params=None)]
    return m, params


def attention_graph(w: dict, b: dict, heads: int, head_dim: int, x: str = "x", out: str = "y"):
    """(nodes, initializers) of one attention block reading ``x`` and writing
    ``out``, as exporters write unfused attention: ``w``/``b`` hold the q, k, v,
    o MatMul weights (in × out, as stored) and biases; the Reshape shapes are
    constants with 0 (copy) for batch and sequence."""
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), f"W{n}") for n, v in w.items()]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), f"B{n}") for n, v in b.items()]
    inits += [numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split_shape"),
              numpy_helper.from_array(np.array([0, 0, heads * head_dim], np.int64), "merge_shape"),
              numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", [x, f"W{n}"], [f"{n}_mm"], name=f"{n}_proj"),
                  helper.make_node("Add", [f"{n}_mm", f"B{n}"], [f"{n}_lin"], name=f"{n}_bias"),
                  helper.make_node("Reshape", [f"{n}_lin", "split_shape"], [f"{n}_4d"], name=f"{n}_split")]
    nodes += [helper.make_node("Transpose", ["q_4d"], ["qt"], perm=[0, 2, 1, 3], name="qt"),
              helper.make_node("Transpose", ["k_4d"], ["kt"], perm=[0, 2, 3, 1], name="kt"),
              helper.make_node("Transpose", ["v_4d"], ["vt"], perm=[0, 2, 1, 3], name="vt"),
              helper.make_node("MatMul", ["qt", "kt"], ["sc"], name="scores"),
              helper.make_node("Mul", ["sc", "scale"], ["scs"], name="scale"),
              helper.make_node("Softmax", ["scs"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "vt"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3], name="ctxt"),
              helper.make_node("Reshape", ["ctxt", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "Wo"], ["o_mm"], name="o_proj"),
              helper.make_node("Add", ["o_mm", "Bo"], [out], name="o_bias")]
    return nodes, inits


def np_mlp(params, x: np.ndarray) -> np.ndarray:
    """Reference forward pass (float64) of ``build_mlp`` parameters."""
    h = np.asarray(x, dtype=np.float64)
    for layer in params:
        h = h @ layer["W"].T + (0.0 if layer["b"] is None else layer["b"])
        if layer["act"] is not None:
            h = np_activation(layer["act"], h, layer["act_params"])
    return h



def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto, feeds, outputs=None) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime (CPU). ``feeds``: dict, or one array for the first input."""
    sess = ort_session(model)
    if not isinstance(feeds, dict):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(outputs, feeds)


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    elem = m.graph.input[0].type.tensor_type.elem_type
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, elem, None))
    return m


def random_input(model: onnx.ModelProto, batch: int = 5, seed: int = 1, name: str | None = None) -> np.ndarray:
    """Random data for the first graph input (symbolic dims become ``batch``)."""
    inp = model.graph.input[0] if name is None else next(i for i in model.graph.input if i.name == name)
    tt = inp.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def written_block(write, markers: tuple[str, str], result: dict, tmp_path, json_name: str) -> tuple[str, str]:
    """A benchmark block script's ``write(result, json, markdown, reason)`` into
    a fresh ``BENCHMARKS.md`` under ``tmp_path``: (the whole file, its block
    between ``markers``)."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    write(result, tmp_path / json_name, md, reason=None)
    text = md.read_text()
    return text, text[text.index(markers[0]):text.index(markers[1])]
