"""Find ``producer → activation → consumer`` chains in any ONNX graph.

Only the shapes listed here are recognised; everything else is left alone and
reported as a ``Skipped`` entry with the reason, so a user can see why a layer
was not compressed. Discovery never changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .activations import ActivationSpec
from .dense import DenseOp, LinearPath
from .graph_index import GraphIndex
from .norms import CHANNEL_NORMS, decomposed_norm_at, norm_reason
from .weights import OpsView, constant_loader

FLOAT_TYPES = (np.float32, np.float64, np.float16)


@dataclass
class Skipped:
    where: str  # node or tensor name
    reason: str


@dataclass
class Chain:
    """One hidden layer: the neurons between ``producer`` and ``consumer``.

    ``path_readers`` are linear paths (of any op) that read the hidden
    activation too; neuron edits must update their first factor as well.
    """

    name: str
    producer: DenseOp
    activation: ActivationSpec
    consumer: DenseOp
    path_readers: list[tuple[DenseOp, int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.producer.out_features


@dataclass
class DenseGraph(OpsView):
    """What ``find`` returns: dense ops (topological order), chains, skips."""

    ops: dict[str, DenseOp]
    chains: list[Chain]
    skipped: list[Skipped]
    activations: dict[str, ActivationSpec]  # by pre-activation tensor

    def release_except(self, chain: Chain | None = None) -> None:
        """Drop the unedited weights of all ops but ``chain``'s (they are read
        from the model again on use): a pass walking a multi-GB model then
        holds only the layers it works on plus what it has edited."""
        keep = () if chain is None else (chain.producer, chain.consumer)
        for op in self.ops.values():
            if op not in keep:
                op.release()


# --------------------------------------------------------------------------
# dense ops


def _as_vector(b: np.ndarray, n: int) -> np.ndarray | None:
    """Bias of shape [n], [1,n], [1,1,n] or scalar as a length-n vector."""
    b = np.asarray(b)
    if b.size == 1:
        return np.full(n, float(b.reshape(-1)[0]))
    if b.shape[-1] == n and b.size == n:
        return b.reshape(n).astype(np.float64)
    return None


def _weight_loader(ix: GraphIndex, name: str, trans_b: bool, alpha: float):
    """Reads the out × in weight of a Gemm/MatMul when first needed: a find
    over a multi-GB model reads no weight until a pass asks for it."""

    def out_by_in(B: np.ndarray) -> np.ndarray:
        W = B if trans_b else B.T  # a view: no copy before the storage cast
        if alpha != 1.0:
            W = W.astype(np.float64) * alpha
        return W

    return constant_loader(ix, name, out_by_in)


def _factors_loader(ix: GraphIndex, names: list[str]):
    """Reads a linear path's factors when first needed."""
    return lambda: [ix.const(n) for n in names]


class _OpFinder:
    def __init__(self, ix: GraphIndex):
        self.ix = ix
        self.skipped: list[Skipped] = []
        self.claimed: set[str] = set()

    def _main_weight(self, node: onnx.NodeProto):
        """(W out×in, bias or None, form) for a Gemm/MatMul with constant weight."""
        ix = self.ix
        if len(node.input) >= 2 and not ix.is_const(node.input[0]) and not ix.is_const(node.input[1]):
            self.skipped.append(Skipped(node.name, f"{node.op_type} weight (input B) is not a constant"))
            return None
        if node.op_type == "Gemm":
            if len(node.input) < 2 or not ix.is_const(node.input[1]):
                return None
            if ix.attr(node, "transA", 0):
                self.skipped.append(Skipped(node.name, "Gemm with transA=1 is not supported"))
                return None
            if ix.is_const(node.input[0]):
                return None
            meta = ix.const_meta(node.input[1])
            if meta is None or len(meta[0]) != 2 or meta[1].type not in FLOAT_TYPES:
                return None
            trans_b = bool(ix.attr(node, "transB", 0))
            alpha = float(ix.attr(node, "alpha", 1.0))
            beta = float(ix.attr(node, "beta", 1.0))
            shape = meta[0] if trans_b else meta[0][::-1]
            bias = None
            if len(node.input) > 2 and node.input[2]:
                if not ix.is_const(node.input[2]):
                    self.skipped.append(Skipped(node.name, "Gemm bias C is not a constant"))
                    return None
                bias = _as_vector(ix.const(node.input[2]), shape[0])
                if bias is None:
                    self.skipped.append(Skipped(node.name, "Gemm bias C is not of shape [N] or [1,N]"))
                    return None
                bias = bias * beta
            return _weight_loader(ix, node.input[1], trans_b, alpha), shape, bias, "gemm", meta[1]
        if node.op_type == "MatMul":
            if not ix.is_const(node.input[1]) or ix.is_const(node.input[0]):
                return None
            meta = ix.const_meta(node.input[1])
            if meta is None or len(meta[0]) != 2 or meta[1].type not in FLOAT_TYPES:
                return None
            return _weight_loader(ix, node.input[1], False, 1.0), meta[0][::-1], None, "matmul", meta[1]
        return None

    def _path_from(self, tensor: str, out_features: int) -> LinearPath | None:
        """A bias-free chain of constant MatMuls ending in ``tensor``."""
        ix = self.ix
        names, shapes, nodes = [], [], []
        t = tensor
        while True:
            p = ix.producer.get(t)
            if p is None or p.op_type != "MatMul" or not ix.is_const(p.input[1]) or p.name in self.claimed:
                break
            if ix.single_consumer(t) is None:
                break
            meta = ix.const_meta(p.input[1])
            if meta is None or len(meta[0]) != 2:
                break
            names.insert(0, p.input[1])
            shapes.insert(0, meta[0])
            nodes.insert(0, p.name)
            t = p.input[0]
        if not shapes or shapes[-1][1] != out_features:
            return None
        return LinearPath(input=t, nodes=nodes, factor_loader=_factors_loader(ix, names), factor_shapes=shapes)

    def _is_path_head(self, node: onnx.NodeProto) -> bool:
        """A const-weight MatMul feeding input 1 of an Add whose input 0 is a
        dense result: that MatMul is a linear path, not a layer of its own."""
        ix = self.ix
        t = node.output[0]
        for _ in range(8):
            c = ix.single_consumer(t)
            if c is None:
                return False
            if c.op_type == "MatMul" and c.input[0] == t and ix.is_const(c.input[1]):
                t = c.output[0]
                continue
            if c.op_type == "Add" and len(c.input) == 2 and c.input[1] == t:
                # input 0 must be a dense result this Add alone reads (an op's tail);
                # a residual stream read elsewhere too makes this MatMul a layer
                p0 = ix.producer.get(c.input[0])
                return p0 is not None and p0.op_type in ("MatMul", "Gemm", "Add", "BatchNormalization") \
                    and ix.single_consumer(c.input[0]) is c
            return False
        return False

    def build(self, node: onnx.NodeProto) -> DenseOp | None:
        ix = self.ix
        if node.name in self.claimed:
            return None
        main = self._main_weight(node)
        if main is None:
            return None
        if node.op_type == "MatMul" and self._is_path_head(node):
            return None
        loader, shape, bias, form, dtype = main
        op = DenseOp(name=node.name, input=node.input[0], output=node.output[0], bias=bias, form=form,
                     dtype=np.dtype(dtype), nodes=[node.name], weight_loader=loader, weight_shape=tuple(shape))
        # absorb the tail: bias Add, BatchNormalization, linear-path Adds
        while True:
            c = ix.single_consumer(op.output)
            if c is None:
                break
            if ix.passthrough_output(c) is not None and c.input[0] == op.output:  # Identity/Dropout
                op.nodes.append(c.name)
                op.output = c.output[0]
                continue
            if c.op_type == "Add" and len(c.input) == 2:
                other = c.input[1] if c.input[0] == op.output else c.input[0]
                if ix.is_const(other):
                    meta = ix.const_meta(other)  # a big constant is no bias: never read it
                    if meta is None or len(meta[0]) > 3 or int(np.prod(meta[0])) not in (1, op.out_features):
                        break
                    vec = _as_vector(ix.const(other), op.out_features)
                    if vec is None:
                        break
                    op.bias = op.bias_or_zero() + vec
                    op.nodes += [c.name] + ix.const_source_nodes(other)
                    op.output = c.output[0]
                    continue
                if c.input[0] == op.output:
                    path = self._path_from(other, op.out_features)
                    if path is not None:
                        op.paths.append(path)
                        self.claimed.update(path.nodes)
                        op.nodes += path.nodes + [c.name]
                        op.output = c.output[0]
                        continue
                break
            if c.op_type == "BatchNormalization" and c.input[0] == op.output:
                if op.paths or ix.tensor_rank(op.output) not in (None, 2) or op.form != "gemm":
                    self.skipped.append(Skipped(c.name, "BatchNormalization after a non-2-D dense output is not folded"))
                    break
                params = [ix.const(t) for t in c.input[1:5]]
                if any(p is None for p in params) or len(c.output) > 1 and any(c.output[1:]):
                    break
                scale, b, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
                eps = float(ix.attr(c, "epsilon", 1e-5))
                s = scale / np.sqrt(var + eps)
                op.scale_rows(s)  # applied when the weight is read
                op.bias = (op.bias_or_zero() - mean) * s + b
                op.nodes.append(c.name)
                op.output = c.output[0]
                op.changed = True  # BN is gone once written back
                continue
            break
        self.claimed.update(op.nodes)
        return op


# --------------------------------------------------------------------------
# activations


def _float_attr(ix: GraphIndex, node, name, default):
    v = ix.attr(node, name, default)
    return float(v) if v is not None else default


def match_activation(ix: GraphIndex, pre: str) -> tuple[ActivationSpec | None, str]:
    """The activation reading pre-activation ``pre`` (dense chains here, gate
    activations of gated MLPs in :mod:`.attention`); (None, reason) if none."""
    if pre in ix.graph_outputs:
        return None, "output layer: its result is a graph output (nothing after it to fold into)"
    cs = ix.consumers.get(pre, [])
    if not cs:
        return None, "pre-activation has no consumer"
    types = sorted(c.op_type for c in cs)
    if len(cs) == 1:
        n = cs[0]
        k = n.op_type
        spec = None
        if k == "Relu":
            spec = ActivationSpec("relu")
        elif k == "LeakyRelu":
            spec = ActivationSpec("leaky_relu", alpha=_float_attr(ix, n, "alpha", 0.01))
        elif k == "PRelu":
            slope = ix.const(n.input[1])
            if slope is None:
                return None, "PRelu slope is not a constant"
            spec = ActivationSpec("prelu", slope=np.asarray(slope, dtype=np.float64).reshape(-1))
        elif k == "Clip":
            lo, hi = -np.inf, np.inf
            if len(n.input) > 1 and n.input[1]:
                v = ix.const(n.input[1])
                if v is None:
                    return None, "Clip min is not a constant"
                lo = float(v)
            if len(n.input) > 2 and n.input[2]:
                v = ix.const(n.input[2])
                if v is None:
                    return None, "Clip max is not a constant"
                hi = float(v)
            lo = _float_attr(ix, n, "min", lo)
            hi = _float_attr(ix, n, "max", hi)
            spec = ActivationSpec("clip", lo=lo, hi=hi)
        elif k == "Sigmoid":
            spec = ActivationSpec("sigmoid")
        elif k == "Tanh":
            spec = ActivationSpec("tanh")
        elif k == "Swish" and _float_attr(ix, n, "alpha", 1.0) == 1.0:  # opset 24: x·sigmoid(αx), SiLU at α = 1
            spec = ActivationSpec("silu")
        elif k == "Gelu":
            approx = ix.attr(n, "approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            spec = ActivationSpec("gelu_tanh" if approx == "tanh" else "gelu")
        elif k in ("Div", "Mul"):
            return _match_erf_gelu(ix, pre)
        if spec is None and k in CHANNEL_NORMS:
            return None, norm_reason(k, n.name, "neurons")
        if spec is None:
            return None, f"{k} after the dense layer is not a supported activation"
        spec.nodes = [n.name] + ([ix.producer[n.input[1]].name] if k == "PRelu" and ix.producer.get(n.input[1]) else [])
        spec.input, spec.output = pre, n.output[0]
        return spec, ""
    if types == ["Mul", "Sigmoid"]:  # SiLU: x * Sigmoid(x)
        sig = next(c for c in cs if c.op_type == "Sigmoid")
        mul = next(c for c in cs if c.op_type == "Mul")
        if ix.single_consumer(sig.output[0]) is mul and set(mul.input) == {pre, sig.output[0]}:
            return ActivationSpec("silu", nodes=[sig.name, mul.name], input=pre, output=mul.output[0]), ""
    if types in (["Div", "Mul"], ["Mul", "Mul"]):
        return _match_erf_gelu(ix, pre)
    norm = decomposed_norm_at(ix, pre) if "ReduceMean" in types or "Pow" in types else None
    if norm is not None:
        return None, norm_reason(norm.kind, norm.name, "neurons")
    return None, f"pre-activation feeds {len(cs)} nodes ({', '.join(types)})"


def _match_erf_gelu(ix: GraphIndex, pre: str) -> tuple[ActivationSpec | None, str]:
    """Gelu as exporters decompose it: x*0.5*(1+Erf(x/√2)) in its usual orders
    (legacy torch: (x·(1+erf))·0.5 or (x·0.5)·(1+erf); dynamo: x·(0.5·(1+erf)))."""
    cs = ix.consumers.get(pre, [])
    nodes = []
    scale = next((c for c in cs if c.op_type in ("Div", "Mul") and _erf_follows(ix, c)), None)
    if scale is None:
        return None, "Div/Mul after the dense layer is not a recognised Gelu"
    c = ix.const(scale.input[1]) if scale.input[0] == pre else None
    if c is None or not (np.isclose(float(c), np.sqrt(2), rtol=1e-3) if scale.op_type == "Div"
                         else np.isclose(float(c), 1 / np.sqrt(2), rtol=1e-3)):
        return None, "Div/Mul after the dense layer is not a recognised Gelu"
    erf = ix.single_consumer(scale.output[0])
    add = ix.single_consumer(erf.output[0])
    if add is None or add.op_type != "Add":
        return None, "Erf not followed by Add(1)"
    one = ix.const(add.input[1] if add.input[0] == erf.output[0] else add.input[0])
    if one is None or not np.isclose(float(one), 1.0):
        return None, "Erf not followed by Add(1)"
    nodes = [scale.name, erf.name, add.name]
    # remaining: Mul(pre, add) then Mul(·, 0.5) ; or Mul(pre, 0.5) then Mul(·, add)
    m1 = ix.single_consumer(add.output[0])
    if m1 is None or m1.op_type != "Mul":
        return None, "Gelu pattern incomplete"
    others = [c for c in cs if c is not scale]
    if len(others) != 1 or others[0].op_type != "Mul":
        return None, "Gelu pattern incomplete"
    half_of_sum = ix.const(m1.input[1] if m1.input[0] == add.output[0] else m1.input[0])
    if others[0] is m1:  # Mul(pre, 1+erf) -> Mul(·, 0.5)
        m2 = ix.single_consumer(m1.output[0])
        if m2 is None or m2.op_type != "Mul":
            return None, "Gelu pattern incomplete"
        half = ix.const(m2.input[1] if m2.input[0] == m1.output[0] else m2.input[0])
        out = m2.output[0]
        nodes += [m1.name, m2.name]
    elif half_of_sum is not None:  # Mul(0.5, 1+erf) -> Mul(pre, ·), as torch.onnx dynamo writes it
        m2 = others[0]
        if ix.single_consumer(m1.output[0]) is not m2 or sorted(m2.input) != sorted([pre, m1.output[0]]):
            return None, "Gelu pattern incomplete"
        half, out = half_of_sum, m2.output[0]
        nodes += [m1.name, m2.name]
    else:  # Mul(pre, 0.5) -> Mul(·, 1+erf)
        h = others[0]
        half = ix.const(h.input[1] if h.input[0] == pre else h.input[0])
        if ix.single_consumer(h.output[0]) is not m1:
            return None, "Gelu pattern incomplete"
        out = m1.output[0]
        nodes += [h.name, m1.name]
    if half is None or not np.isclose(float(half), 0.5):
        return None, "Gelu pattern incomplete"
    return ActivationSpec("gelu", nodes=nodes, input=pre, output=out), ""


def _erf_follows(ix: GraphIndex, node) -> bool:
    c = ix.single_consumer(node.output[0])
    return c is not None and c.op_type == "Erf"


# --------------------------------------------------------------------------


def find_dense_graph(model: onnx.ModelProto) -> DenseGraph:
    """Dense ops and chains of ``model`` (read-only; the view owns copies)."""
    ix = GraphIndex(model)
    finder = _OpFinder(ix)
    ops: dict[str, DenseOp] = {}
    for node in ix.nodes:
        if node.op_type in ("Gemm", "MatMul"):
            op = finder.build(node)
            if op is not None:
                ops[op.name] = op
    skipped = finder.skipped
    by_input: dict[str, list[DenseOp]] = {}
    for op in ops.values():
        by_input.setdefault(op.input, []).append(op)
    path_readers: dict[str, list[tuple[DenseOp, int]]] = {}
    path_nodes: set[str] = set()
    for op in ops.values():
        for k, p in enumerate(op.paths):
            path_readers.setdefault(p.input, []).append((op, k))
            path_nodes.add(p.nodes[0])

    chains: list[Chain] = []
    activations: dict[str, ActivationSpec] = {}
    for op in ops.values():
        act, why = match_activation(ix, op.output)
        if act is None:
            skipped.append(Skipped(op.name, f"no chain: {why}"))
            continue
        while (c := ix.single_consumer(act.output)) is not None and ix.passthrough_output(c) is not None:
            act.nodes.append(c.name)  # Identity/Dropout after the activation: looked through
            act.output = c.output[0]
        if act.kind == "prelu" and act.slope.size not in (1, op.out_features):
            skipped.append(Skipped(op.name, "PRelu slope shape does not match the layer width"))
            continue
        readers = [c for c in ix.consumers.get(act.output, [])]
        mains = [c for c in readers if c.name in ops and ops[c.name].input == act.output]
        others = [c for c in readers if c.name not in ops and c.name not in path_nodes]
        if act.output in ix.graph_outputs:
            skipped.append(Skipped(op.name, "hidden activation is a graph output"))
            continue
        if len(mains) != 1 or others:
            kinds = ", ".join(sorted(c.op_type for c in readers)) or "nothing"
            skipped.append(Skipped(op.name, f"hidden activation feeds {kinds}, not one dense layer"))
            continue
        consumer = ops[mains[0].name]
        if consumer.in_features != op.out_features:
            skipped.append(Skipped(op.name, "consumer input width differs from producer width"))
            continue
        activations[op.output] = act
        chains.append(Chain(name=f"layer{len(chains)}", producer=op, activation=act,
                            consumer=consumer, path_readers=path_readers.get(act.output, [])))
    return DenseGraph(ops=ops, chains=chains, skipped=skipped, activations=activations)
