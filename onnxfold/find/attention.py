"""Coupling analysis for transformer blocks: attention heads and gated MLPs.

Neuron folding (``find.chains``) works on ``dense → activation → dense``
chains. Two transformer structures couple several dense layers instead, and
their channels have to be folded together (``docs/methods.md`` §3.3-3.4):

* **Attention heads**, as exporters write unfused multi-head attention::

      q = MatMul(x, Wq)[+bq] → Reshape [B,S,H,D] → Transpose [0,2,1,3] (→ rotary)
      k = MatMul(x, Wk)[+bk] → Reshape [B,S,Hkv,D] → ... → [B,H,D,S]
      v = MatMul(x, Wv)[+bv] → Reshape [B,S,Hkv,Dv] → ... → [B,H,S,Dv]
      scores = MatMul(q, k) (scalar Mul/Div on q, k or scores; mask Add/Where)
      Softmax(axis=-1) (→ IsNaN/Where) → MatMul(·, v) → Transpose [0,2,1,3]
      → Reshape [B,S,H·Dv] → o = MatMul(·, Wo)[+bo]

  What lies between a projection and the attention MatMuls (transposes,
  rotary embeddings, the grouped-query repeat of k and v, dynamo's 3-D
  transposes) is walked by :mod:`.head_streams`. Head h owns rows
  ``h·D…(h+1)·D`` of Wq/Wk (W out×in as in ``DenseOp``), rows ``h·Dv…`` of
  Wv and the same columns of Wo. With grouped-query attention (``Hkv`` key/
  value heads, ``H = Hkv·n``) query heads ``g·n…(g+1)·n`` share key/value
  head g. Head counts that are constants in the graph (Reshape/Expand shapes,
  the group size) are listed as ``ShapeRef``s, which a rewrite must update.

* **Gated MLPs**: ``down(act(gate(x)) * up(x))`` (SiLU/GELU/... on the gate):
  neuron j is row j of gate *and* up and column j of down.

Every block found is in ``TransformerView.attention``, multi-head and
grouped-query alike (``TransformerView.grouped`` lists the grouped-query
ones: ``passes/units`` couples their query heads to their key/value head).
Everything else that looks like attention is reported, not matched: fused
``Attention``/``MultiHeadAttention``/``GroupQueryAttention`` nodes
(com.microsoft, or the opset-23 ``Attention``), onnxruntime's other fusions
(``SkipLayerNormalization``, ``FastGelu``, ...), per-head score biases,
fused q/k/v projections, and intermediate tensors read outside the pattern.
Discovery never changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx

from .activations import ActivationSpec
from .chains import Skipped, match_activation
from .graph_index import GraphIndex
from .head_streams import NoMatch, StreamWalker, scalar_operand
from .projections import Projection, projection_at
from .shapes import ShapeRef, shape_elements

__all__ = ["AttentionBlock", "FUSED_ATTENTION", "GatedMLP", "Projection", "ShapeRef", "TransformerView",
           "find_transformer", "projection_at", "shape_elements"]

FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention")
#: onnxruntime's other transformer fusions (com.microsoft): reported once per op type, left alone
FUSED_TRANSFORMER_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
                         "RotaryEmbedding", "FastGelu", "BiasGelu", "QuickGelu",
                         "GemmFastGelu", "BiasSplitGelu")


@dataclass
class AttentionBlock:
    name: str  # attn0, attn1, ... in graph order
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    head_dim: int  # q/k
    v_head_dim: int
    shape_refs: list[ShapeRef] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    num_kv_heads: int = 0  # key/value heads: num_heads unless grouped-query (0: num_heads)
    rotary: bool = False  # q and k pass a rotary embedding

    def __post_init__(self):
        if not self.num_kv_heads:
            self.num_kv_heads = self.num_heads

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: fewer key/value heads than query heads."""
        return self.num_kv_heads < self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def projections(self) -> list[Projection]:
        return [self.q, self.k, self.v, self.o]

    @property
    def num_params(self) -> int:
        return sum(p.num_params for p in self.projections)

    def summary(self) -> dict:
        """What ``inspect`` lists for the block (JSON-ready)."""
        return {"block": self.name, "q": self.q.node, "k": self.k.node, "v": self.v.node, "o": self.o.node,
                "hidden": self.q.in_features, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "v_head_dim": self.v_head_dim, "rotary": self.rotary,
                "params": self.num_params}


@dataclass
class GatedMLP:
    name: str  # glu0, glu1, ...
    gate: Projection
    up: Projection
    down: Projection
    activation: ActivationSpec
    mul: str  # the Mul node act(gate) * up
    hidden: str  # its output: the down projection's input

    @property
    def width(self) -> int:
        return self.gate.out_features

    @property
    def projections(self) -> list[Projection]:
        return [self.gate, self.up, self.down]

    @property
    def num_params(self) -> int:
        return sum(p.num_params for p in self.projections)

    def summary(self) -> dict:
        """What ``inspect`` lists for the gated MLP (JSON-ready)."""
        return {"block": self.name, "gate": self.gate.node, "up": self.up.node, "down": self.down.node,
                "activation": self.activation.describe(), "in": self.gate.in_features, "neurons": self.width,
                "out": self.down.out_features, "params": self.num_params}


@dataclass
class TransformerView:
    attention: list[AttentionBlock]  # every block head folding folds, multi-head and grouped-query, in graph order
    gated: list[GatedMLP]
    skipped: list[Skipped]

    @property
    def grouped(self) -> list[AttentionBlock]:
        """The grouped-query blocks among them (fewer key/value heads than query heads)."""
        return [b for b in self.attention if b.grouped]

    @property
    def blocks(self) -> list[AttentionBlock]:
        """Every attention block found, in graph order (find numbers them
        attn0, attn1, ... in one sequence)."""
        return list(self.attention)

    def release_except(self, group: AttentionBlock | GatedMLP | None = None) -> None:
        """Drop the weights of all projections but ``group``'s (they are read
        from the model again on use)."""
        keep = set() if group is None else {id(p) for p in group.projections}
        for g in [*self.attention, *self.gated]:
            for p in g.projections:
                if id(p) not in keep:
                    p.release()


# --------------------------------------------------------------------------
# attention

_Q, _K, _V = ("B", "H", "S", "D"), ("B", "H", "D", "S"), ("B", "H", "S", "D")
_SCORE_OPS = ("MatMul", "Mul", "Div", "Add", "Where", "Cast", "Identity")


class _AttnFinder:
    def __init__(self, ix: GraphIndex):
        self.ix = ix
        self.walker = StreamWalker(ix)
        self.nodes: list[str] = []

    def _scaling(self, p: onnx.NodeProto) -> str | None:
        """The scores input of a scalar Mul/Div ``p``, else None."""
        ix = self.ix
        if p.op_type in ("Mul", "Div") and not ix.is_const(p.input[0]) and scalar_operand(ix, p, p.input[0]):
            return p.input[0]
        if p.op_type == "Mul" and not ix.is_const(p.input[1]) and scalar_operand(ix, p, p.input[1]):
            return p.input[1]
        return None

    def _reaches_scores(self, tensor: str, hops: int = 8) -> bool:
        """Does ``tensor`` come from a MatMul of two computed tensors through score ops?"""
        p = self.ix.producer.get(tensor)
        if p is None or hops == 0 or p.op_type not in _SCORE_OPS:
            return False
        if p.op_type == "MatMul":
            return not any(self.ix.is_const(t) for t in p.input)
        return any(self._reaches_scores(t, hops - 1) for t in p.input if t and not self.ix.is_const(t))

    def _scores(self, softmax: onnx.NodeProto) -> onnx.NodeProto:
        """Back from the Softmax over scaling, masks and casts to the scores MatMul."""
        ix, w = self.ix, self.walker
        t = softmax.input[0]
        while True:
            p = w.producer(t, "scores")
            w.only(t, "scores")
            if p.op_type == "MatMul":
                if ix.is_const(p.input[0]) or ix.is_const(p.input[1]):
                    raise NoMatch("scores MatMul has a constant input")
                return p
            self.nodes.append(p.name)
            scaled = self._scaling(p)
            if scaled is not None:
                t = scaled
            elif p.op_type in ("Cast", "Identity"):
                t = p.input[0]
            elif p.op_type in ("Add", "Where"):  # a mask: added, or filled in
                data = list(p.input) if p.op_type == "Add" else list(p.input[1:])
                ins = [x for x in data if not ix.is_const(x) and self._reaches_scores(x)]
                if len(ins) != 1:
                    raise NoMatch(f"scores: {p.op_type} {p.name} before Softmax has {len(ins)} scores inputs")
                mask = next((x for x in data if x != ins[0]), None)
                mask_meta = None if mask is None else ix.const_meta(mask)  # the shape says it: values not read
                if mask_meta is not None and len(mask_meta[0]) == 4 and mask_meta[0][1] > 1:
                    raise NoMatch("scores: a constant per-head score bias is added (not supported)")
                t = ins[0]
            else:
                raise NoMatch(f"scores: {p.op_type} between the scores MatMul and Softmax")

    def _probabilities(self, softmax: onnx.NodeProto) -> onnx.NodeProto:
        """Forward from the Softmax (over NaN guards and casts) to MatMul(probabilities, v)."""
        ix, w = self.ix, self.walker
        t = softmax.output[0]
        while True:
            cs = w.readers(t)
            if t in ix.graph_outputs:
                raise NoMatch(f"softmax: {t!r} is a graph output")
            if sorted(c.op_type for c in cs) == ["IsNaN", "Where"]:  # Where(IsNaN(p), 0, p): fully masked rows
                isnan, where = sorted(cs, key=lambda c: c.op_type)
                if where.input[0] != isnan.output[0] or where.input[2] != t or w.readers(isnan.output[0]) != [where]:
                    raise NoMatch("softmax: IsNaN/Where after it is not a NaN guard")
                self.nodes += [isnan.name, where.name]
                t = where.output[0]
                continue
            if len(cs) != 1:
                raise NoMatch(f"softmax: its output is read by {len(cs)} nodes, expected 1")
            c = cs[0]
            if c.input[0] == t and (c.op_type in ("Cast", "Identity") or ix.passthrough_output(c) == c.output[0]):
                self.nodes.append(c.name)
                t = c.output[0]
            elif c.op_type == "MatMul" and c.input[0] == t and c.input[1] != t:
                return c
            else:
                raise NoMatch(f"softmax output feeds {c.op_type}, not MatMul(probabilities, v)")

    def _context(self, av: onnx.NodeProto, heads: int, dv: int) -> tuple[Projection, list[ShapeRef]]:
        """Forward from MatMul(probabilities, v): merge the heads, find the output projection."""
        ix, w = self.ix, self.walker
        refs = []
        c = w.only(av.output[0], "context")
        if c.op_type == "Reshape" and c.input[0] == av.output[0]:  # legacy SDPA: a no-op [B, -1, S, Dv]
            el = shape_elements(ix, c.input[1])
            if el is None or len(el) != 4 or el[1][0] not in (-1, heads) or -1 in [e[0] for e in el[2:]]:
                raise NoMatch(f"context: Reshape {c.name} after MatMul(probabilities, v) is not [B, H, S, Dv]")
            if el[1][0] == heads:
                refs.append(ShapeRef(c.name, 1, heads, 1))
            self.nodes.append(c.name)
            c = w.only(c.output[0], "context")
        if c.op_type != "Transpose" or list(ix.attr(c, "perm", [])) != [0, 2, 1, 3]:
            raise NoMatch("context: expected Transpose [0,2,1,3] after MatMul(probabilities, v)")
        rs = w.only(c.output[0], "context")
        if rs.op_type != "Reshape" or rs.input[0] != c.output[0]:
            raise NoMatch("context: expected a Reshape merging the heads")
        self.nodes += [c.name, rs.name]
        el = shape_elements(ix, rs.input[1])
        if el is None or len(el) not in (2, 3):
            raise NoMatch("context: the head-merging Reshape's shape is not a constant/Concat of rank 2 or 3")
        if el[-1][0] == heads * dv:  # the merged width [B, S, H·Dv]; -1 needs no edit
            refs.append(ShapeRef(rs.name, len(el) - 1, heads * dv, dv))
        elif el[-1][0] != -1:
            raise NoMatch(f"context: head-merging Reshape's last size is {el[-1][0]}, expected {heads * dv} or -1")
        mm = w.only(rs.output[0], "context")
        if mm.op_type not in ("MatMul", "Gemm") or mm.input[0] != rs.output[0]:
            raise NoMatch("context: the merged heads do not feed a MatMul (output projection)")
        c = ix.single_consumer(mm.output[0])
        o_out = c.output[0] if mm.op_type == "MatMul" and c is not None and c.op_type == "Add" \
            and projection_at(ix, c.output[0]) is not None else mm.output[0]
        o = projection_at(ix, o_out)
        if o is None:
            raise NoMatch("output projection has no constant 2-D weight")
        return o, refs

    def _upstream(self, tensor: str, depth: int, stop):
        """(tensor, producer) pairs up to ``depth`` nodes before ``tensor``,
        breadth first through computed inputs, not past those where ``stop``."""
        ix, frontier, seen = self.ix, [tensor], set()
        for _ in range(depth):
            nxt = []
            for t in frontier:
                p = ix.producer.get(t)
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                yield t, p
                if not stop(t, p):
                    nxt += [i for i in p.input if i and not ix.is_const(i)]
            frontier = nxt

    def _report_gqa(self, tensor: str, q: Projection, why: str) -> None:
        """k or v did not match: if a few nodes up there is a projection
        narrower than q by an integer factor, say it is grouped-query attention."""
        ix = self.ix
        for t, _p in self._upstream(tensor, 12, lambda t, _p: projection_at(ix, t) is not None):
            proj = projection_at(ix, t)
            if proj is not None and proj.in_features == q.in_features and proj.out_features < q.out_features \
                    and q.out_features % proj.out_features == 0:
                raise NoMatch(f"grouped-query attention (k/v projection {proj.out_features} wide, q"
                              f" {q.out_features}) in a form not understood ({why})")

    def looks_like_attention(self, softmax: onnx.NodeProto) -> bool:
        """Does a MatMul of two computed tensors (scores) lie a few nodes
        before ``softmax``, short of any projection? A classifier's Softmax is
        no attention block that failed to match, and is not reported."""
        ix = self.ix
        for _t, p in self._upstream(softmax.input[0], 6, lambda _t, p: p.op_type in ("MatMul", "Gemm")):
            if p.op_type == "MatMul" and not any(ix.is_const(i) for i in p.input):
                return True
        return False

    def match(self, softmax: onnx.NodeProto) -> AttentionBlock:
        ix = self.ix
        self.nodes = [softmax.name]
        if ix.attr(softmax, "axis", -1) not in (-1, 3):
            raise NoMatch(f"Softmax over axis {ix.attr(softmax, 'axis')}, expected the last")
        scores = self._scores(softmax)
        av = self._probabilities(softmax)
        self.nodes += [scores.name, av.name]
        q = self.walker.walk(scores.input[0], "q")
        streams = {}
        for side, tensor in (("k", scores.input[1]), ("v", av.input[1])):
            try:
                streams[side] = self.walker.walk(tensor, side)
            except NoMatch as e:
                self._report_gqa(tensor, q.proj, str(e))
                raise
        k, v = streams["k"], streams["v"]
        for s, want in ((q, _Q), (k, _K), (v, _V)):
            side = "q" if s is q else "k" if s is k else "v"
            if s.layout != want:
                raise NoMatch(f"{side}: reaches the attention MatMul as [{','.join(s.layout)}], expected"
                              f" [{','.join(want)}] (B batch, S sequence, H heads, D head dim)")
        if q.group != 1:
            raise NoMatch("q: its heads are repeated")
        if len({q.proj.node, k.proj.node, v.proj.node}) != 3:
            raise NoMatch("q, k and v do not come from three projections")
        if k.head_dim != q.head_dim:
            raise NoMatch(f"q and k head dims differ ({q.head_dim}, {k.head_dim})")
        if (k.heads, k.group) != (v.heads, v.group) or k.heads * k.group != q.heads:
            raise NoMatch(f"head counts differ (q {q.heads}, k {k.heads}×{k.group}, v {v.heads}×{v.group})")
        o, context_refs = self._context(av, q.heads, v.head_dim)
        if o.in_features != q.heads * v.head_dim:
            raise NoMatch(f"output projection reads {o.in_features} features, heads give {q.heads * v.head_dim}")
        grouped = k.heads < q.heads
        kv_refs = [replace(r, counts="kv_heads") if r.reshape in (k.split, v.split) and grouped else r
                   for r in k.refs + v.refs]
        if not grouped:  # a repeat by 1: its key/value head counts are the head count, its group size stays 1
            kv_refs = [replace(r, counts="heads") for r in kv_refs if r.counts != "group"]
        refs = list({(r.reshape, r.slot, r.index): r for r in q.refs + kv_refs + context_refs}.values())
        nodes = self.nodes + q.nodes + k.nodes + v.nodes + o.nodes
        return AttentionBlock(name="", q=q.proj, k=k.proj, v=v.proj, o=o, num_heads=q.heads, head_dim=q.head_dim,
                              v_head_dim=v.head_dim, shape_refs=refs, nodes=list(dict.fromkeys(nodes)),
                              num_kv_heads=k.heads, rotary=q.rotary or k.rotary)


def _describe(b: AttentionBlock) -> str:
    kv = f", {b.num_kv_heads} key/value heads" if b.grouped else ""
    return f"{b.num_heads} heads × {b.head_dim}{kv}"


# --------------------------------------------------------------------------
# gated MLPs


def _match_gated(ix: GraphIndex, mul: onnx.NodeProto, taken: set[str]) -> GatedMLP | None:
    """``down(act(gate) * up)`` at this Mul, else None (quietly: most Muls are no GLU)."""
    if len(mul.input) != 2 or any(ix.is_const(t) for t in mul.input):
        return None
    for a_slot in (0, 1):
        act_out, up_out = mul.input[a_slot], mul.input[1 - a_slot]
        up = projection_at(ix, up_out)
        if up is None or ix.single_consumer(up_out) is not mul:
            continue
        # find a gate projection whose activation output is act_out
        p = ix.producer.get(act_out)
        if p is None:
            continue
        for cand in list(p.input):
            gate = projection_at(ix, cand)
            if gate is None or gate.node == up.node:
                continue
            spec, _ = match_activation(ix, cand)
            if spec is None or spec.output != act_out or ix.single_consumer(act_out) is not mul:
                continue
            if gate.out_features != up.out_features or gate.input != up.input:
                continue
            down_node = ix.single_consumer(mul.output[0])
            if down_node is None or down_node.op_type not in ("MatMul", "Gemm") or down_node.input[0] != mul.output[0]:
                continue
            c = ix.single_consumer(down_node.output[0])
            d_out = c.output[0] if down_node.op_type == "MatMul" and c is not None and c.op_type == "Add" \
                and projection_at(ix, c.output[0]) else down_node.output[0]
            down = projection_at(ix, d_out)
            if down is None or down.in_features != gate.out_features:
                continue
            if {gate.node, up.node, down.node} & taken:
                continue
            if spec.kind == "prelu":
                continue  # per-channel slopes would need folding too
            return GatedMLP(name="", gate=gate, up=up, down=down, activation=spec, mul=mul.name,
                            hidden=mul.output[0])
    return None


# --------------------------------------------------------------------------


def _stored_out_in(group: AttentionBlock | GatedMLP) -> str | None:
    """Why ``group`` cannot be rewritten yet, if one of its projections is a Gemm with transB=1."""
    bad = [p.node for p in group.projections if p.stored_out_in]
    return None if not bad else (f"{', '.join(bad)}: Gemm with transB=1, whose weight the head and gated rewrites"
                                 " do not write yet (left untouched)")


def find_transformer(model: onnx.ModelProto) -> TransformerView:
    """Attention blocks and gated MLPs of ``model`` (read-only), plus what
    looked like attention but could not be matched or cannot be folded, with the reason."""
    ix = GraphIndex(model)
    view = TransformerView(attention=[], gated=[], skipped=[])
    taken: set[str] = set()
    found = 0
    fused: dict[str, list[str]] = {}
    for node in ix.nodes:
        if node.op_type in FUSED_ATTENTION and (node.domain == "com.microsoft" or node.op_type == "Attention"):
            view.skipped.append(Skipped(node.name, f"fused {node.domain or 'ai.onnx'} {node.op_type} node: head"
                                                   " folding of fused attention is not supported (left untouched)"))
        if node.op_type in FUSED_TRANSFORMER_OPS and node.domain == "com.microsoft":
            fused.setdefault(node.op_type, []).append(node.name)
        if node.op_type != "Softmax":
            continue
        finder = _AttnFinder(ix)
        if not finder.looks_like_attention(node):
            continue
        try:
            b = finder.match(node)
        except NoMatch as e:
            view.skipped.append(Skipped(node.name, f"attention not folded: {e}"))
            continue
        if set(b.nodes) & taken:
            view.skipped.append(Skipped(node.name, "attention not folded: shares nodes with another block"))
            continue
        taken.update(b.nodes)
        b.name = f"attn{found}"  # one numbering for every block found, in graph order
        found += 1
        why = _stored_out_in(b)
        if why is not None:
            view.skipped.append(Skipped(node.name, f"attention {b.name} ({_describe(b)}) not folded: {why}"))
        else:
            view.attention.append(b)
    view.skipped += [Skipped(names[0], f"{len(names)} fused com.microsoft {op} node(s) (onnxruntime's transformer"
                                       " fusions): left untouched; folding only sees unfused ops")
                     for op, names in fused.items()]
    for node in ix.nodes:
        if node.op_type == "Mul":
            g = _match_gated(ix, node, taken)
            if g is None:
                continue
            taken.update(g.gate.nodes + g.up.nodes + g.down.nodes + [g.mul])
            why = _stored_out_in(g)
            if why is not None:
                view.skipped.append(Skipped(g.mul, f"gated MLP not folded: {why}"))
                continue
            g.name = f"glu{len(view.gated)}"
            view.gated.append(g)
    return view
