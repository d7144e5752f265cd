"""The hidden width of a transformer: its residual stream as one coupled group.

Every block of a transformer reads the stream through a norm and adds its
output back onto it, so hidden channel j is one unit of all of them at once
(the rule Torch-Pruning's dependency graph applies: a residual add unites
the channels of its inputs and output, a norm's input, scale, bias and
output channels are one index). From the blocks ``find.attention``
recognises, the stream is followed tensor by tensor:

* writers (*producers*, whose output rows are the units): embedding
  ``Gather``s (a constant table's columns) and projections onto the stream
  (attention o, FFN down / output dense);
* readers (*consumers*, whose input columns the units feed): projections off
  the stream (q, k, v, gate/up or FFN in, the LM head, a pooler);
* through: residual ``Add``s of two computed tensors (*joins*), ``Cast``,
  ``Identity``, inference ``Dropout``, and norms (:mod:`.norms`), whose
  scale and bias vectors are indexed by the same units;
* ``Shape`` readers read sizes only and are passed over.

Anything else that writes or reads the stream stops the analysis: the
transformer's hidden width is reported as skipped, with that node as the
reason, and no group is listed. A norm normalises over the whole hidden
dimension, so removing or merging hidden channels changes every channel's
output through it; no fold of the hidden width exists yet, so a stream
found is listed with its reasons and no knobs. Discovery never changes the
model and reads no weight data (bias vectors of projections aside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .chains import Skipped
from .graph_index import GraphIndex
from .norms import Norm, find_norms
from .projections import Projection, projection_at


@dataclass
class HiddenStream:
    """One residual stream: ``width`` channels shared by every member.

    ``producers`` / ``consumers``: node names (a projection's MatMul or Gemm,
    an embedding's Gather) in graph order; ``joins``: the residual Adds;
    ``inputs`` / ``outputs``: graph inputs and outputs on the stream (the
    model's interface fixes its width); ``reasons``: why its width is not
    folded."""

    name: str
    width: int | None
    producers: list[str]
    consumers: list[str]
    norms: list[Norm]
    joins: list[str]
    tables: dict[str, str] = field(default_factory=dict)  # embedding Gather → its table
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def norm_names(self) -> list[str]:
        return [n.name for n in self.norms]

    def coupling(self) -> list[str]:
        """What ties the channels together, in words."""
        w = self.width if self.width is not None else "?"
        out = [f"embedding {g}: columns of table {t}" for g, t in self.tables.items()]
        out += [f"residual join {j}" for j in self.joins]
        out += [f"norm {n.name} ({n.describe()}): normalises over all {w} channels" for n in self.norms]
        shared: dict[str, list[str]] = {}
        for n in self.norms:
            for v in (n.scale, n.bias):
                if v:
                    shared.setdefault(v, []).append(n.name)
        out += [f"{v} shared by norms {', '.join(ns)}" for v, ns in shared.items() if len(ns) > 1]
        out += [f"graph input {t}" for t in self.inputs] + [f"graph output {t}" for t in self.outputs]
        return out

    def summary(self) -> dict:
        """What ``inspect`` lists for the stream (JSON-ready)."""
        return {"stream": self.name, "width": self.width, "producers": list(self.producers),
                "consumers": list(self.consumers), "norms": self.norm_names, "joins": len(self.joins),
                "foldable": False, "reason": "; ".join(self.reasons)}


class _Unknown(Exception):
    def __init__(self, where: str, why: str):
        super().__init__(why)
        self.where = where


_THROUGH = ("Cast", "Identity")


def _projection_reading(ix: GraphIndex, node: onnx.NodeProto, tensor: str) -> Projection | None:
    """The projection ``node`` (a MatMul or Gemm reading ``tensor`` as its input) is, else None."""
    if node.input[0] != tensor or (node.op_type == "MatMul" and ix.is_const(node.input[0])):
        return None
    if node.op_type == "MatMul":
        nxt = ix.single_consumer(node.output[0])
        if nxt is not None and nxt.op_type == "Add":
            p = projection_at(ix, nxt.output[0])
            if p is not None and p.node == node.name:
                return p
    p = projection_at(ix, node.output[0])
    return p if p is not None and p.node == node.name else None


def _embedding_width(ix: GraphIndex, node: onnx.NodeProto) -> int | None:
    """Columns of the table an embedding Gather(table, ids) reads rows of, else None."""
    if node.op_type != "Gather" or int(ix.attr(node, "axis", 0)) != 0 or ix.is_const(node.input[1]):
        return None
    meta = ix.const_meta(node.input[0])
    return None if meta is None or len(meta[0]) != 2 else int(meta[0][1])


class _Walk:
    def __init__(self, ix: GraphIndex, norms: list[Norm]):
        self.ix = ix
        self.norm_in = {t: n for n in norms for t in n.inputs}
        self.norm_out = {t: n for n in norms for t in n.outputs}
        self.norm_nodes = {name: n for n in norms for name in n.nodes}
        self.tensors: set[str] = set()

    def stream(self, seed: str) -> HiddenStream:
        ix = self.ix
        self.tensors = tensors = {seed}  # kept on failure: the caller marks them done
        todo = [seed]
        prods: dict[str, int | None] = {}
        cons: dict[str, int] = {}
        norms: dict[str, Norm] = {}
        joins, tables, inputs, outputs = set(), {}, [], []

        def add(t: str) -> None:
            if t and t not in tensors:
                tensors.add(t)
                todo.append(t)

        def via_norm(n: Norm) -> None:
            read = [o for o in n.side_outputs if ix.consumers.get(o) or o in ix.graph_outputs]
            if read:
                raise _Unknown(n.name, f"{n.kind} {n.name}'s statistics output {read[0]} is read")
            norms[n.name] = n
            for t in n.inputs + n.outputs:
                add(t)

        def join(node: onnx.NodeProto) -> bool:
            if node.op_type != "Add" or len(node.input) != 2 or any(ix.is_const(t) for t in node.input):
                return False
            joins.add(node.name)
            for t in (*node.input, node.output[0]):
                add(t)
            return True

        while todo:
            t = todo.pop()
            # who writes t
            p = ix.producer.get(t)
            if t in self.norm_out:
                via_norm(self.norm_out[t])
            elif t in ix.graph_inputs:
                inputs.append(t)
            elif p is None:
                raise _Unknown(t, f"the constant {t} is on the stream")
            elif (proj := projection_at(ix, t)) is not None:
                prods[proj.node] = proj.out_features
            elif (w := _embedding_width(ix, p)) is not None:
                prods[p.name] = w
                tables[p.name] = p.input[0]
            elif p.op_type in _THROUGH or ix.passthrough_output(p) == t:
                add(p.input[0])
            elif not join(p):
                raise _Unknown(p.name, f"the stream is written by {p.op_type} {p.name}, which is not modelled")
            # who reads t
            if t in ix.graph_outputs:
                outputs.append(t)
            for c in ix.consumers.get(t, []):
                if c.name in self.norm_nodes and t in self.norm_nodes[c.name].inputs:
                    via_norm(self.norm_nodes[c.name])
                elif c.op_type == "Shape" or join(c):
                    continue
                elif c.op_type in _THROUGH or (ix.passthrough_output(c) is not None and c.input[0] == t):
                    add(c.output[0])
                elif c.op_type in ("MatMul", "Gemm") and (proj := _projection_reading(ix, c, t)) is not None:
                    cons[proj.node] = proj.in_features
                else:
                    what = f"{c.op_type} {c.name}"
                    if c.op_type in ("MatMul", "Gemm"):
                        what += " (not a projection with a constant weight: a tied embedding?)"
                    raise _Unknown(c.name, f"the stream is read by {what}, which is not modelled")
        order = {n.name: i for i, n in enumerate(ix.nodes)}
        widths = {w for w in [*prods.values(), *cons.values()] if w is not None}
        for n in norms.values():
            if n.scale and (meta := ix.const_meta(n.scale)) is not None and meta[0]:
                widths.add(int(meta[0][-1]))
        if len(widths) > 1:
            raise _Unknown(seed, f"members disagree on the hidden width ({sorted(widths)})")
        stream = HiddenStream(name="", width=next(iter(widths), None),
                              producers=sorted(prods, key=order.get), consumers=sorted(cons, key=order.get),
                              norms=sorted(norms.values(), key=lambda n: order[n.name]),
                              joins=sorted(joins, key=order.get),
                              tables={g: tables[g] for g in sorted(tables, key=order.get)},
                              inputs=sorted(inputs), outputs=sorted(outputs), tensors=sorted(tensors))
        if stream.norms:
            kinds = ", ".join(sorted({n.kind for n in stream.norms}))
            stream.reasons.append(f"{len(stream.norms)} norm(s) ({kinds}) normalise over the whole hidden dimension:"
                                  " removing or merging hidden channels is not exact through them")
        if stream.inputs or stream.outputs:
            ends = ", ".join(stream.inputs + stream.outputs)
            stream.reasons.append(f"the model's interface ({ends}) has the hidden width")
        stream.reasons.append("no fold of a transformer's hidden width is implemented")
        return stream


def find_hidden_streams(ix: GraphIndex, seeds: list[str]) -> tuple[list[HiddenStream], list[Skipped]]:
    """The residual streams that reach ``seeds`` (the tensors a transformer's
    blocks read: their q/k/v and gate/up inputs), one per connected stream,
    named hidden0, hidden1, ... in the seeds' order; a stream written or read
    by a node not modelled is a ``Skipped`` entry at that node instead."""
    walk = _Walk(ix, find_norms(ix))
    streams: list[HiddenStream] = []
    skipped: list[Skipped] = []
    done: set[str] = set()
    for seed in seeds:
        if seed in done:
            continue
        try:
            s = walk.stream(seed)
        except _Unknown as e:
            skipped.append(Skipped(e.where, f"hidden width (residual stream) not analysed: {e}"))
            done.update(walk.tensors)
            continue
        done.update(s.tensors)
        s.name = f"hidden{len(streams)}"
        streams.append(s)
    return streams, skipped


def transformer_streams(model: onnx.ModelProto, view) -> tuple[list[HiddenStream], list[Skipped]]:
    """The residual streams of the transformers whose blocks ``view``
    (``find_transformer(model)``) found: seeded at every attention block's
    q/k/v inputs and every gated MLP's gate/up inputs."""
    seeds = [p.input for b in view.attention for p in (b.q, b.k, b.v)]
    seeds += [p.input for g in view.gated for p in (g.gate, g.up)]
    if not seeds:
        return [], []
    return find_hidden_streams(GraphIndex(model), seeds)
