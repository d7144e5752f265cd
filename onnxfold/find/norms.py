"""Norms over the last axis: fused nodes and the decompositions exporters write.

A norm reads a tensor x of width H and computes, per row,
``(x − mean(x)) / sqrt(var(x) + eps) · scale + bias`` (LayerNorm) or
``x / sqrt(mean(x²) + eps) · scale`` (RMSNorm). Found here:

* fused: ``LayerNormalization`` (opset 17), ``RMSNormalization`` (opset 23),
  onnxruntime's ``SimplifiedLayerNormalization`` and (com.microsoft)
  ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``, which
  also add a skip input: their inputs 0 and 1 and their sum output (3) are
  the stream;
* decomposed, as torch.onnx writes LLaMA's RMSNorm and an unfused LayerNorm::

      RMSNorm:   Pow(x, 2) | Mul(x, x) → ReduceMean(-1) → Add(eps) → Sqrt
                 → Reciprocal | Div(1, ·) → Mul(x, ·)          (or Div(x, Sqrt))
      LayerNorm: d = Sub(x, ReduceMean(x, -1)), then the RMSNorm chain on d

  followed by Casts and an optional affine ``Mul(·, scale)`` → ``Add(·, bias)``
  with constant vectors.

Discovery only: nothing here reads weight data beyond scalar constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph_index import GraphIndex

#: fused norm op → (stream input slots, scale slot, bias slot or None)
FUSED_NORMS = {
    "LayerNormalization": ((0,), 1, 2),
    "RMSNormalization": ((0,), 1, None),
    "SimplifiedLayerNormalization": ((0,), 1, None),
    "SkipLayerNormalization": ((0, 1), 2, 3),
    "SkipSimplifiedLayerNormalization": ((0, 1), 2, None),
}
#: norms that normalise across the units (neurons, channels) they read, GroupNormalization over groups of channels
CHANNEL_NORMS = (*FUSED_NORMS, "GroupNormalization")
#: outputs of the Skip* norms: 0 the normalised sum, 3 the sum itself (what the next block adds to)
_SKIP_SUM_OUTPUT = 3


@dataclass
class Norm:
    """One norm over the last (hidden) axis.

    ``name``: the fused node, or for a decomposed norm the node applying the
    scale (the normalising node when there is no affine part); ``inputs``:
    the tensors normalised (two for the Skip* norms); ``outputs``: what it
    writes of the same width (the normalised tensor; the sum for Skip*);
    ``side_outputs``: outputs that are statistics (mean, inverse std), which
    must stay unread for the norm to be a plain stream op."""

    name: str
    kind: str  # "LayerNormalization", ..., "RMSNorm (decomposed)", "LayerNorm (decomposed)"
    inputs: list[str]
    outputs: list[str]
    scale: str | None = None
    bias: str | None = None
    nodes: list[str] = field(default_factory=list)
    side_outputs: list[str] = field(default_factory=list)
    axis: int = -1

    def describe(self) -> str:
        parts = [self.kind]
        if self.scale:
            parts.append(f"scale {self.scale}")
        if self.bias:
            parts.append(f"bias {self.bias}")
        return ", ".join(parts)


def _reduces_last_axis(ix: GraphIndex, node: onnx.NodeProto) -> bool:
    """A ReduceMean over the last axis only, keeping it (axes as attribute or input)."""
    if node.op_type != "ReduceMean" or not int(ix.attr(node, "keepdims", 1)):
        return False
    axes = ix.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = ix.const(node.input[1])
        axes = None if v is None else np.asarray(v).reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    rank = ix.tensor_rank(node.input[0])
    return int(axes[0]) == -1 or (rank is not None and int(axes[0]) == rank - 1)


def _scalar(ix: GraphIndex, name: str) -> float | None:
    meta = ix.const_meta(name)
    if meta is None or int(np.prod(meta[0], dtype=np.int64)) != 1:
        return None
    return float(np.asarray(ix.const(name)).reshape(-1)[0])


def _squared(ix: GraphIndex, node: onnx.NodeProto | None) -> str | None:
    """x if ``node`` is Pow(x, 2) or Mul(x, x), else None."""
    if node is None:
        return None
    if node.op_type == "Pow" and len(node.input) == 2 and _scalar(ix, node.input[1]) == 2.0:
        return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    return None


def constant_source(ix: GraphIndex, name: str) -> str:
    """The constant behind ``name`` through Identity nodes (the legacy exporter
    writes a shared weight as an Identity of another initializer), else ``name``."""
    seen = 0
    while not ix.is_const(name) and (p := ix.producer.get(name)) is not None and p.op_type == "Identity" \
            and seen < 8:
        name, seen = p.input[0], seen + 1
    return name


def _vector(ix: GraphIndex, name: str) -> int | None:
    """Width of a constant that broadcasts along the last axis only ([H], [1, 1, H]), else None."""
    meta = ix.const_meta(constant_source(ix, name))
    if meta is None or not meta[0] or any(int(d) != 1 for d in meta[0][:-1]):
        return None
    return int(meta[0][-1])


class _Decomposed:
    def __init__(self, ix: GraphIndex):
        self.ix = ix
        self.nodes: list[str] = []

    def only(self, tensor: str, *ops: str) -> onnx.NodeProto | None:
        c = self.ix.single_consumer(tensor)
        if c is None or c.op_type not in ops:
            return None
        self.nodes.append(c.name)
        return c

    def match(self, reduce: onnx.NodeProto) -> Norm | None:
        ix = self.ix
        src = reduce.input[0]
        readers = ix.consumers.get(reduce.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Sub" and list(readers[0].input) == [src, reduce.output[0]]:
            # LayerNorm: reduce is the mean, d = x − mean; the variance follows on d
            x, sub = src, readers[0]
            centered = sub.output[0]
            # Mul(d, d) reads d twice, so it is listed twice among d's consumers
            sq = list({c.name: c for c in ix.consumers.get(centered, []) if _squared(ix, c) == centered}.values())
            if len(sq) != 1:
                return None
            var = ix.single_consumer(sq[0].output[0])
            if var is None or not _reduces_last_axis(ix, var):
                return None
            self.nodes = [reduce.name, sub.name, sq[0].name, var.name]
            kind = "LayerNorm (decomposed)"
        else:
            sq = ix.producer.get(src)
            x = _squared(ix, sq)
            if x is None:
                return None
            mean_src = ix.producer.get(x)
            if mean_src is not None and mean_src.op_type == "Sub":  # the variance of a LayerNorm: matched at its mean
                return None
            centered, var = x, reduce
            self.nodes = [sq.name, reduce.name]
            kind = "RMSNorm (decomposed)"
        t = var.output[0]
        eps = ix.single_consumer(t)
        if eps is not None and eps.op_type == "Add" and any(_scalar(ix, i) is not None for i in eps.input):
            self.nodes.append(eps.name)
            t = eps.output[0]
        sqrt = self.only(t, "Sqrt")
        if sqrt is None:
            return None
        inv = self.only(sqrt.output[0], "Reciprocal", "Div")
        if inv is None:
            return None
        if inv.op_type == "Div" and list(inv.input) == [centered, sqrt.output[0]]:
            normed = inv  # x / sqrt(...)
        elif inv.op_type == "Reciprocal" or (inv.input[1] == sqrt.output[0] and _scalar(ix, inv.input[0]) == 1.0):
            normed = self.only(inv.output[0], "Mul")
            if normed is None or set(normed.input) != {centered, inv.output[0]}:
                return None
        else:
            return None
        name, t = normed.name, normed.output[0]
        scale = bias = None
        while (c := ix.single_consumer(t)) is not None and c.op_type in ("Cast", "Mul", "Add"):
            if c.op_type == "Cast":
                pass
            elif c.op_type == "Mul" and scale is None and bias is None:
                other = c.input[1] if c.input[0] == t else c.input[0]
                if _vector(ix, other) is None:
                    break
                scale, name = constant_source(ix, other), c.name
            elif c.op_type == "Add" and bias is None:
                other = c.input[1] if c.input[0] == t else c.input[0]
                if _vector(ix, other) is None:
                    break
                bias = constant_source(ix, other)
            else:
                break
            self.nodes.append(c.name)
            t = c.output[0]
        # every tensor inside the norm is read only inside it: else it is no plain stream op
        inside = set(self.nodes)
        for n in self.nodes:
            for o in ix.node_by_name[n].output:
                if o != t and (o in ix.graph_outputs or any(r.name not in inside for r in ix.consumers.get(o, []))):
                    return None
        return Norm(name=name, kind=kind, inputs=[x], outputs=[t], scale=scale, bias=bias,
                    nodes=list(dict.fromkeys(self.nodes)))


def _fused(ix: GraphIndex, node: onnx.NodeProto) -> Norm:
    streams, scale_slot, bias_slot = FUSED_NORMS[node.op_type]
    ins = [node.input[s] for s in streams if s < len(node.input) and node.input[s]]

    def slot(s):
        ok = s is not None and s < len(node.input) and node.input[s]
        return constant_source(ix, node.input[s]) if ok else None

    skip = node.op_type.startswith("Skip")
    outs = [node.output[0]]
    if skip and len(node.output) > _SKIP_SUM_OUTPUT and node.output[_SKIP_SUM_OUTPUT]:
        outs.append(node.output[_SKIP_SUM_OUTPUT])
    side = [o for i, o in enumerate(node.output) if o and i not in (0, _SKIP_SUM_OUTPUT if skip else 0)]
    return Norm(name=node.name, kind=node.op_type, inputs=ins, outputs=outs, scale=slot(scale_slot),
                bias=slot(bias_slot), nodes=[node.name], side_outputs=side, axis=int(ix.attr(node, "axis", -1)))


def find_norms(ix: GraphIndex) -> list[Norm]:
    """Every norm of the graph (fused and decomposed), in graph order."""
    found: list[Norm] = []
    taken: set[str] = set()
    for node in ix.nodes:
        if node.op_type in FUSED_NORMS:
            found.append(_fused(ix, node))
        elif _reduces_last_axis(ix, node) and node.name not in taken:
            n = _Decomposed(ix).match(node)
            if n is not None and not set(n.nodes) & taken:
                taken.update(n.nodes)
                found.append(n)
    order = {n.name: i for i, n in enumerate(ix.nodes)}
    return sorted(found, key=lambda n: order[n.name])


def norm_reason(op: str, name: str, units: str) -> str:
    """Why units read by a norm are not folded (dense chains, conv chains and streams say the same)."""
    return (f"{op} {name} normalises over all the {units} it reads: removing or merging {units} is not exact"
            " through it (not folded)")


def decomposed_norm_at(ix: GraphIndex, tensor: str) -> Norm | None:
    """The decomposed norm (LayerNorm or RMSNorm) normalising ``tensor``, else None."""
    for r in ix.consumers.get(tensor, []):
        reduce = r if r.op_type == "ReduceMean" else ix.single_consumer(r.output[0]) \
            if _squared(ix, r) == tensor else None
        if reduce is not None and _reduces_last_axis(ix, reduce):
            n = _Decomposed(ix).match(reduce)
            if n is not None and tensor in n.inputs:
                return n
    return None
