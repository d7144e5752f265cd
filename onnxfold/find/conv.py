"""Find convolution channel chains and coupled channel groups in an ONNX graph.

The convolutional counterpart of :mod:`onnxfold.find.chains`. A ``ConvOp`` is
one ``Conv`` node with constant kernel (and bias), plus the
``BatchNormalization`` that directly follows it if any, folded in:

    z = BN(Conv(x, W, b))  =  Conv(x, W·s, (b − mean)·s + beta),  s = gamma / sqrt(var + eps)

kernel ``weight`` is ``[out, in/group, *kernel]``, read from the model on first
use (the BN scale applied then) and kept in float32 (float64 for float64
models); see :mod:`onnxfold.find.weights`.

A ``ConvChain`` is one set of hidden channels that can be folded on its own:

    producer Conv(+BN) → activation → [depthwise Conv(+BN) → [activation]] → consumer Conv

The producer and consumer are ordinary convolutions (group 1); a depthwise
convolution in between (group = channels, one kernel per channel) is coupled:
it is folded with the producer's assignment (its per-channel kernels and biases
are averaged within a cluster). Every other shape - grouped convolutions,
hidden channels read by more than one node, a pooling or reshape in between -
is reported as :class:`~onnxfold.find.chains.Skipped` and left alone.

Channels joined by ``Add``/``Sub``/``Mul`` (a residual stream) must share one
assignment across every conv writing or reading them. They are reported as
:class:`ResidualGroup`; the passes do not fold them (as in Wang et al.).

Discovery never changes the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .activations import ActivationSpec
from .chains import FLOAT_TYPES, Skipped
from .graph_index import GraphIndex
from .norms import CHANNEL_NORMS, norm_reason
from .weights import OpsView, LazyWeight, constant_loader

#: Element-wise ops that leave the channel layout as it is (one channel in,
#: the same channel out): channel spaces are traced through them.
CHANNELWISE_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Identity", "Dropout", "BatchNormalization",
                   "MaxPool", "AveragePool", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Neg",
                   "Abs", "Sqrt", "Exp", "Log", "Erf", "Cast", "Pad"}
#: Element-wise binary ops: both (non-constant) inputs and the output share their channels.
COUPLING_OPS = {"Add", "Sub", "Mul"}


class ConvOp(LazyWeight):
    """One Conv (+ folded BN): ``weight`` ``[out, in/group, *kernel]`` (read on
    first use), ``bias`` ``[out]`` float64 or None."""

    def __init__(self, name: str, input: str, output: str, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, group: int = 1, dtype=np.float32, nodes: list[str] | None = None,
                 bn: str | None = None, changed: bool = False, *,
                 weight_loader: Callable[[], np.ndarray] | None = None, weight_shape: tuple[int, ...] | None = None):
        self.name = name  # Conv node name: stable id, kept when written back
        self.input = input  # tensor the Conv reads
        self.output = output  # tensor after the folded BN (or the Conv output)
        self.bias = bias  # [out] float64, BN folded
        self.group = group
        self.dtype = np.dtype(dtype)  # what gets written back
        self.nodes = list(nodes or [])  # Conv (+ BN) node names
        self.bn = bn  # folded BatchNormalization node name
        self.changed = changed
        self._init_weight(weight, weight_loader, weight_shape)

    def __repr__(self) -> str:
        return f"ConvOp({self.name!r}, {self.weight_shape}, group={self.group}, changed={self.changed})"

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.group

    @property
    def is_depthwise(self) -> bool:
        return self.group > 1 and self.weight_shape[1] == 1 and self.group == self.out_channels

    @property
    def num_params(self) -> int:
        return int(np.prod(self.weight_shape) + (0 if self.bias is None else self.bias.size))

    def bias_or_zero(self) -> np.ndarray:
        return np.zeros(self.out_channels) if self.bias is None else self.bias

    def rows(self) -> np.ndarray:
        """Kernel as out × (in/group · prod(kernel)): one row per output channel."""
        return self.weight.reshape(self.out_channels, -1)


@dataclass
class ConvChain:
    """Hidden channels between ``producer`` and ``consumer``.

    ``mids`` are depthwise convolutions coupled to the hidden channels, in
    order, each with the activation after it (or None). ``hidden`` is the
    tensor the consumer reads."""

    name: str
    producer: ConvOp
    activation: ActivationSpec
    consumer: ConvOp
    mids: list[tuple[ConvOp, ActivationSpec | None]] = field(default_factory=list)
    hidden: str = ""

    @property
    def width(self) -> int:
        return self.producer.out_channels

    @property
    def ops(self) -> list[ConvOp]:
        return [self.producer, *(m for m, _ in self.mids), self.consumer]

    @property
    def num_params(self) -> int:
        return int(sum(op.num_params for op in self.ops))

    def tensors(self) -> list[str]:
        """Every tensor whose channel count follows the hidden width."""
        out = [self.producer.output, self.activation.output]
        for m, act in self.mids:
            out.append(m.output)
            if act is not None:
                out.append(act.output)
        return out


class GemmReader(LazyWeight):
    """A ``Gemm`` reading pooled residual-stream channels through
    ``GlobalAveragePool → Flatten``: ``y = W x + b`` with W out × n (alpha
    folded in; read on first use) and b float64 (beta folded in)."""

    weight_rank = 2

    def __init__(self, name: str, input: str, output: str, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, dtype=np.float32, trans_b: int = 0, alpha: float = 1.0,
                 beta: float = 1.0, bias_shape: tuple = (), path: list[str] | None = None,
                 path_tensors: list[str] | None = None, changed: bool = False, *,
                 weight_loader: Callable[[], np.ndarray] | None = None, weight_shape: tuple[int, int] | None = None):
        self.name = name  # Gemm node name
        self.input = input  # the Flatten output it reads
        self.output = output
        self.bias = bias
        self.dtype = np.dtype(dtype)
        self.trans_b = trans_b
        self.alpha = alpha
        self.beta = beta
        self.bias_shape = bias_shape
        self.path = list(path or [])  # GlobalAveragePool, Flatten node names
        self.path_tensors = list(path_tensors or [])  # their outputs (width follows the stream)
        self.changed = changed
        self._init_weight(weight, weight_loader, weight_shape)

    def __repr__(self) -> str:
        return f"GemmReader({self.name!r}, {self.weight_shape}, changed={self.changed})"

    @property
    def num_params(self) -> int:
        return int(np.prod(self.weight_shape) + (0 if self.bias is None else self.bias.size))

    def bias_or_zero(self) -> np.ndarray:
        return np.zeros(self.weight_shape[0]) if self.bias is None else self.bias


@dataclass
class ResidualGroup:
    """Channels coupled by element-wise Add/Sub/Mul: one assignment for all.

    producers: convs whose output channels are these channels;
    readers: nodes that read them (convs, pooling before a Gemm, ...);
    joins: the coupling nodes. ``reason`` is empty when the group can be
    folded (``fold_residual``): every producer a group-1 ConvOp, every reader a
    group-1 ConvOp or ``GlobalAveragePool → Flatten → Gemm``
    (``conv_readers`` / ``gemm_readers``), only parameter-free channel-wise
    ops and joins inside, no graph input or output on the stream."""

    name: str
    width: int | None
    producers: list[str]
    readers: list[str]
    joins: list[str]
    tensors: list[str] = field(default_factory=list)
    conv_readers: list[str] = field(default_factory=list)
    gemm_readers: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def foldable(self) -> bool:
        return not self.reason and self.width is not None


@dataclass
class ConvGraph(OpsView):
    ops: dict[str, ConvOp]
    chains: list[ConvChain]
    residual: list[ResidualGroup]
    skipped: list[Skipped]
    gemms: dict[str, GemmReader] = field(default_factory=dict)

    def release_except(self, group: ConvChain | ResidualGroup | None = None) -> None:
        """Drop the unedited weights of all ops but ``group``'s (a chain or a
        residual group; they are read from the model again on use)."""
        if isinstance(group, ConvChain):
            keep = group.ops
        elif isinstance(group, ResidualGroup):
            keep = [self.ops[n] for n in (*group.producers, *group.conv_readers) if n in self.ops]
            keep += [self.gemms[n] for n in group.gemm_readers if n in self.gemms]
        else:
            keep = []
        kept = {id(op) for op in keep}
        for op in [*self.ops.values(), *self.gemms.values()]:
            if id(op) not in kept:
                op.release()


# --------------------------------------------------------------------------
# conv ops


def _build_conv(ix: GraphIndex, node: onnx.NodeProto, skipped: list[Skipped]) -> ConvOp | None:
    if len(node.input) < 2 or not ix.is_const(node.input[1]) or ix.is_const(node.input[0]):
        skipped.append(Skipped(node.name, "Conv kernel is not a constant"))
        return None
    meta = ix.const_meta(node.input[1])
    if meta is None or meta[1].type not in FLOAT_TYPES or len(meta[0]) < 3:
        skipped.append(Skipped(node.name, "Conv kernel is not a float tensor of rank >= 3"))
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        b = ix.const(node.input[2])
        if b is None:
            skipped.append(Skipped(node.name, "Conv bias is not a constant"))
            return None
        bias = np.asarray(b, dtype=np.float64).reshape(-1)
    group = int(ix.attr(node, "group", 1))
    op = ConvOp(name=node.name, input=node.input[0], output=node.output[0], bias=bias, group=group,
                dtype=meta[1], nodes=[node.name], weight_loader=constant_loader(ix, node.input[1]),
                weight_shape=meta[0])
    c = ix.single_consumer(op.output)
    if c is not None and c.op_type == "BatchNormalization" and c.input[0] == op.output:
        params = [ix.const(t) for t in c.input[1:5]]
        training = int(ix.attr(c, "training_mode", 0))
        extra_outputs = len(c.output) > 1 and any(c.output[1:])
        if any(p is None for p in params) or training or extra_outputs:
            skipped.append(Skipped(c.name, "BatchNormalization with non-constant parameters or in training"
                                           " mode is not folded"))
        else:
            scale, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
            eps = float(ix.attr(c, "epsilon", 1e-5))
            s = scale / np.sqrt(var + eps)
            op.scale_rows(s)  # applied when the kernel is read
            op.bias = (op.bias_or_zero() - mean) * s + beta
            op.nodes.append(c.name)
            op.bn = c.name
            op.output = c.output[0]  # written back (without the BN node) only if the op is edited
    return op


def _channel_activation(ix: GraphIndex, pre: str, width: int) -> tuple[ActivationSpec | None, str]:
    """The per-channel activation reading ``pre`` (its only consumer), looking
    through Identity/Dropout after it."""
    if pre in ix.graph_outputs:
        return None, "its result is a graph output"
    n = ix.single_consumer(pre)
    if n is None:
        readers = ", ".join(sorted(c.op_type for c in ix.consumers.get(pre, []))) or "nothing"
        return None, f"output feeds {readers}, not one activation"
    k = n.op_type
    if k == "Relu":
        spec = ActivationSpec("relu")
    elif k == "LeakyRelu":
        spec = ActivationSpec("leaky_relu", alpha=float(ix.attr(n, "alpha", 0.01)))
    elif k == "Sigmoid":
        spec = ActivationSpec("sigmoid")
    elif k == "Tanh":
        spec = ActivationSpec("tanh")
    elif k == "Clip":
        lo, hi = -np.inf, np.inf
        for i, name in ((1, "lo"), (2, "hi")):
            if len(n.input) > i and n.input[i]:
                v = ix.const(n.input[i])
                if v is None:
                    return None, "Clip bound is not a constant"
                if name == "lo":
                    lo = float(v)
                else:
                    hi = float(v)
        lo = float(ix.attr(n, "min", lo))
        hi = float(ix.attr(n, "max", hi))
        spec = ActivationSpec("clip", lo=lo, hi=hi)
    elif k == "PRelu":
        slope = ix.const(n.input[1])
        if slope is None or np.asarray(slope).size != 1:
            return None, "PRelu with a per-channel slope is not supported for channel folding"
        spec = ActivationSpec("leaky_relu", alpha=float(np.asarray(slope).reshape(-1)[0]))
    elif k in CHANNEL_NORMS:
        return None, norm_reason(k, n.name, "channels")
    else:
        return None, f"{k} after the conv is not a supported per-channel activation"
    spec.nodes = [n.name]
    spec.input, spec.output = pre, n.output[0]
    while (c := ix.single_consumer(spec.output)) is not None and ix.passthrough_output(c) is not None:
        spec.nodes.append(c.name)
        spec.output = c.output[0]
    return spec, ""


# --------------------------------------------------------------------------
# residual groups (union-find over channel spaces)


class _Union:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _kernel_shape(ix: GraphIndex, conv: onnx.NodeProto) -> tuple[int, ...] | None:
    """Shape of a Conv's constant kernel (its data is not read), else None."""
    meta = ix.const_meta(conv.input[1]) if len(conv.input) > 1 else None
    return None if meta is None or len(meta[0]) < 2 else meta[0]


def _residual_groups(ix: GraphIndex, ops: dict[str, ConvOp], gemms: dict[str, GemmReader]) -> list[ResidualGroup]:
    """Tensors whose channels are coupled through element-wise joins.

    Channel spaces are followed through channel-wise ops (activations, BN,
    pooling, depthwise convs); every Add/Sub/Mul with two non-constant inputs
    unites its inputs and output. A space that contains a join is a residual
    group."""
    uf = _Union()
    joins: list[onnx.NodeProto] = []
    conv_out_node = {}
    for op in ops.values():
        conv_out_node[op.output] = op
    for node in ix.nodes:
        if not node.output or not node.input:
            continue
        out = node.output[0]
        if node.op_type in CHANNELWISE_OPS:
            uf.union(node.input[0], out)
        elif node.op_type == "Conv" and int(ix.attr(node, "group", 1)) > 1:
            shape = _kernel_shape(ix, node)
            if shape is not None and shape[1] == 1 and shape[0] == int(ix.attr(node, "group", 1)):
                uf.union(node.input[0], out)  # depthwise: channels pass through
        elif node.op_type in COUPLING_OPS:
            live = [t for t in node.input if t and not ix.is_const(t)]
            if len(live) == 2:
                joins.append(node)
                for t in live:
                    uf.union(t, out)
    for op in ops.values():  # a folded BN joins the conv's raw output and op.output
        uf.union(ix.node_by_name[op.name].output[0], op.output)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for j in joins:
        groups.setdefault(uf.find(j.output[0]), []).append(j)
    out: list[ResidualGroup] = []
    all_tensors = set(ix.producer) | set(ix.consumers)
    for root, js in groups.items():
        tensors = sorted(t for t in all_tensors if uf.find(t) == root)
        tset = set(tensors)
        producers, readers, width = [], [], None
        for node in ix.nodes:
            if node.op_type == "Conv" and node.output[0] in tset and node.input[0] not in tset:
                producers.append(node.name)
                shape = _kernel_shape(ix, node)
                if shape is not None:
                    width = int(shape[0])
            elif node.op_type not in CHANNELWISE_OPS and node.op_type not in COUPLING_OPS \
                    and any(t in tset for t in node.input) and not any(o in tset for o in node.output):
                readers.append(node.name)
        grp = ResidualGroup(name=f"residual{len(out)}", width=width, producers=producers,
                            readers=readers, joins=[j.name for j in js], tensors=tensors)
        _classify(ix, ops, grp, tset, gemms)
        out.append(grp)
    return out


#: Channel-wise ops without per-channel parameters: folding leaves them as they are.
_FREE_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Identity", "Dropout", "MaxPool", "AveragePool"}


def _classify(ix: GraphIndex, ops: dict[str, ConvOp], grp: ResidualGroup, tset: set[str],
              gemms: dict[str, GemmReader]) -> None:
    """Fill in which readers can be folded, or the reason the group cannot."""
    def fail(why: str) -> None:
        if not grp.reason:
            grp.reason = why

    bn_of = {op.bn: op for op in ops.values() if op.bn}
    if tset & ix.graph_inputs:
        fail("a graph input is on the stream")
    if tset & ix.graph_outputs:
        fail("a graph output is on the stream")
    for name in grp.producers:
        op = ops.get(name)
        if op is None or op.group != 1:
            fail(f"producer {name} is not a foldable conv")
        elif op.output not in tset:
            fail(f"producer {name} has a BatchNormalization that is not folded")
    for node in ix.nodes:
        reads = [t for t in node.input if t in tset]
        if not reads:
            continue
        writes = any(o in tset for o in node.output)
        if writes:
            if node.op_type in COUPLING_OPS or node.op_type in _FREE_OPS:
                continue
            if node.op_type == "BatchNormalization" and node.name in bn_of:
                continue
            if node.op_type in CHANNEL_NORMS:
                fail(norm_reason(node.op_type, node.name, "channels of the stream"))
                continue
            fail(f"{node.op_type} {node.name} on the stream has per-channel parameters")
            continue
        if node.op_type == "Conv":
            op = ops.get(node.name)
            if op is None or op.group != 1 or node.input[0] not in tset:
                fail(f"reader {node.name} is not a group-1 conv reading the stream as its input")
            else:
                grp.conv_readers.append(node.name)
            continue
        if node.op_type == "GlobalAveragePool":
            g = _gemm_after_pool(ix, node, grp.width)
            if g is None:
                fail(f"GlobalAveragePool {node.name} is not followed by Flatten → Gemm with a constant weight")
            else:
                gemms[g.name] = g
                grp.gemm_readers.append(g.name)
            continue
        if node.op_type in CHANNEL_NORMS:
            fail(norm_reason(node.op_type, node.name, "channels of the stream"))
            continue
        fail(f"reader {node.op_type} {node.name} is not supported")


def _gemm_after_pool(ix: GraphIndex, pool: onnx.NodeProto, width: int | None) -> GemmReader | None:
    flat = ix.single_consumer(pool.output[0])
    if flat is None or flat.op_type != "Flatten" or int(ix.attr(flat, "axis", 1)) != 1:
        return None
    gemm = ix.single_consumer(flat.output[0])
    if gemm is None or gemm.op_type != "Gemm" or gemm.input[0] != flat.output[0] or ix.attr(gemm, "transA", 0):
        return None
    meta = ix.const_meta(gemm.input[1])
    if meta is None or len(meta[0]) != 2 or meta[1].type not in FLOAT_TYPES:
        return None
    trans_b = int(ix.attr(gemm, "transB", 0))
    alpha, beta = float(ix.attr(gemm, "alpha", 1.0)), float(ix.attr(gemm, "beta", 1.0))
    shape = meta[0] if trans_b else meta[0][::-1]  # W: out × n
    if width is not None and shape[1] != width:
        return None
    bias, bias_shape = None, ()
    if len(gemm.input) > 2 and gemm.input[2]:
        c = ix.const(gemm.input[2])
        if c is None or c.size not in (1, shape[0]):
            return None
        bias_shape = tuple(c.shape)
        bias = np.broadcast_to(np.asarray(c, dtype=np.float64).reshape(-1), (shape[0],)) * beta
    def out_by_n(B: np.ndarray) -> np.ndarray:
        return (B if trans_b else B.T).astype(np.float64) * alpha

    return GemmReader(name=gemm.name, input=flat.output[0], output=gemm.output[0], bias=bias, dtype=meta[1],
                      trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape, path=[pool.name, flat.name],
                      path_tensors=[pool.output[0], flat.output[0]],
                      weight_loader=constant_loader(ix, gemm.input[1], out_by_n), weight_shape=shape)


# --------------------------------------------------------------------------


def find_conv_graph(model: onnx.ModelProto) -> ConvGraph:
    """Conv ops, foldable channel chains, residual groups and skips of ``model``
    (no weight is read; a model without Conv nodes is not even indexed)."""
    if not any(node.op_type == "Conv" for node in model.graph.node):
        return ConvGraph(ops={}, chains=[], residual=[], skipped=[])
    ix = GraphIndex(model)
    skipped: list[Skipped] = []
    ops: dict[str, ConvOp] = {}
    for node in ix.nodes:
        if node.op_type == "Conv":
            op = _build_conv(ix, node, skipped)
            if op is not None:
                ops[op.name] = op
    gemms: dict[str, GemmReader] = {}
    residual = _residual_groups(ix, ops, gemms)
    in_residual = {t: g for g in residual for t in g.tensors}
    by_input: dict[str, list[ConvOp]] = {}
    for op in ops.values():
        by_input.setdefault(op.input, []).append(op)

    chains: list[ConvChain] = []
    for op in ops.values():
        if op.group != 1:
            if not op.is_depthwise:
                skipped.append(Skipped(op.name, f"grouped Conv (group={op.group}) is not folded as a producer"))
            continue
        if op.output in in_residual:
            skipped.append(Skipped(op.name, f"output channels are on a residual stream ({in_residual[op.output].name}):"
                                            " coupled, not folded"))
            continue
        act, why = _channel_activation(ix, op.output, op.out_channels)
        if act is None:
            skipped.append(Skipped(op.name, f"no channel chain: {why}"))
            continue
        hidden = act.output
        mids: list[tuple[ConvOp, ActivationSpec | None]] = []
        consumer, why = None, ""
        while True:
            if hidden in ix.graph_outputs:
                why = "hidden activation is a graph output"
                break
            readers = ix.consumers.get(hidden, [])
            if len(readers) != 1:
                kinds = ", ".join(sorted(c.op_type for c in readers)) or "nothing"
                why = f"hidden activation feeds {kinds}, not one conv"
                break
            r = readers[0]
            nxt = ops.get(r.name)
            if nxt is None or nxt.input != hidden:
                why = f"hidden activation feeds {r.op_type}, not a foldable conv"
                break
            if nxt.group == 1:
                consumer = nxt
                break
            if not nxt.is_depthwise:
                why = (f"hidden channels feed the grouped Conv {nxt.name} (group={nxt.group}); only depthwise"
                       " convs are coupled: unsupported, left untouched")
                break
            if nxt.output in in_residual:
                why = f"depthwise Conv {nxt.name} writes into a residual stream"
                break
            mact = None
            c = ix.single_consumer(nxt.output)
            if c is not None and c.op_type in ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "PRelu"):
                mact, why = _channel_activation(ix, nxt.output, nxt.out_channels)
                if mact is None:
                    break
            mids.append((nxt, mact))
            hidden = mact.output if mact is not None else nxt.output
        if consumer is None:
            skipped.append(Skipped(op.name, f"no channel chain: {why}"))
            continue
        if consumer.in_channels != op.out_channels:
            skipped.append(Skipped(op.name, "consumer input channels differ from producer output channels"))
            continue
        if any(m.out_channels != op.out_channels for m, _ in mids):
            skipped.append(Skipped(op.name, "depthwise conv with a channel multiplier is not supported"))
            continue
        chains.append(ConvChain(name=f"conv{len(chains)}", producer=op, activation=act, consumer=consumer,
                                mids=mids, hidden=hidden))
    return ConvGraph(ops=ops, chains=chains, residual=residual, skipped=skipped, gemms=gemms)
