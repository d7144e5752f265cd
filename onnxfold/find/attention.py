"""Coupling analysis for transformer blocks: attention heads and gated MLPs.

Neuron folding (``find.chains``) works on ``dense → activation → dense``
chains. Two transformer structures couple several dense layers instead, and
their channels have to be folded together (``docs/methods.md`` §3.3-3.4):

* **Attention heads**, as exporters write unfused multi-head attention::

      q = MatMul(x, Wq)[+bq] → Reshape [B,S,H,D] → Transpose [0,2,1,3]
      k = MatMul(x, Wk)[+bk] → Reshape [B,S,H,D] → Transpose(s) to [B,H,D,S]
      v = MatMul(x, Wv)[+bv] → Reshape [B,S,H,Dv] → Transpose [0,2,1,3]
      scores = MatMul(q, k) (scalar Mul/Div on q, k or scores; mask Adds)
      Softmax(axis=-1) → MatMul(·, v) → Transpose [0,2,1,3] → Reshape [B,S,H·Dv]
      o = MatMul(·, Wo)[+bo]

  Head h owns rows ``h·D…(h+1)·D`` of Wq/Wk (W out×in as in ``DenseOp``),
  rows ``h·Dv…`` of Wv and the same columns of Wo. The number of heads lives
  in the Reshape shape constants (a constant shape, or a Concat of dynamic
  batch/sequence sizes and constants), which a rewrite must update.

* **Gated MLPs**: ``down(act(gate(x)) * up(x))`` (SiLU/GELU/... on the gate):
  neuron j is row j of gate *and* up and column j of down.

Everything else that looks like attention is reported, not matched: fused
``Attention``/``MultiHeadAttention``/``GroupQueryAttention`` nodes
(com.microsoft, or the opset-23 ``Attention``), grouped-query attention
(k/v with fewer heads than q), per-head score biases, and intermediate
tensors read outside the pattern. Discovery never changes the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .activations import ActivationSpec
from .chains import FLOAT_TYPES, Skipped, match_activation
from .graph_index import GraphIndex
from .weights import LazyWeight, constant_loader

FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention")


class Projection(LazyWeight):
    """A MatMul with a constant 2-D weight and an optional constant bias Add.

    ``weight`` is out × in (``Bᵀ``), read on first use and kept in float32
    (float64 for float64 models); ``bias`` float64. ``weight_input`` /
    ``bias_input`` are the tensors the rewrite replaces (input
    ``weight_slot`` of ``node``, input ``bias_slot`` of ``bias_node``)."""

    weight_rank = 2

    def __init__(self, node: str, input: str, output: str, weight_input: str, weight: np.ndarray | None = None,
                 dtype=np.float32, bias_node: str | None = None, bias_input: str | None = None, bias_slot: int = 1,
                 bias: np.ndarray | None = None, *, weight_loader: Callable[[], np.ndarray] | None = None,
                 weight_shape: tuple[int, int] | None = None):
        self.node = node
        self.input = input
        self.output = output  # after the bias Add when there is one
        self.weight_input = weight_input
        self.dtype = np.dtype(dtype)
        self.bias_node = bias_node
        self.bias_input = bias_input
        self.bias_slot = bias_slot
        self.bias = bias
        self.changed = False  # a rewrite writes new weights from ProjectionEdits: the view is never edited
        self._init_weight(weight, weight_loader, weight_shape)

    @property
    def name(self) -> str:
        return self.node

    def __repr__(self) -> str:
        return f"Projection({self.node!r}, {self.weight_shape})"

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def num_params(self) -> int:
        return int(self.weight_shape[0] * self.weight_shape[1] + (0 if self.bias is None else self.bias.size))

    def bias_or_zero(self) -> np.ndarray:
        return np.zeros(self.out_features) if self.bias is None else self.bias

    @property
    def nodes(self) -> list[str]:
        return [self.node] + ([self.bias_node] if self.bias_node else [])


@dataclass
class ShapeRef:
    """One element of a Reshape's target shape that counts heads: element
    ``index`` of ``reshape``'s shape input holds ``value`` = heads × ``per_head``."""

    reshape: str
    index: int
    value: int
    per_head: int


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

    @property
    def projections(self) -> list[Projection]:
        return [self.q, self.k, self.v, self.o]

    @property
    def num_params(self) -> int:
        return sum(p.num_params for p in self.projections)


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


@dataclass
class TransformerView:
    attention: list[AttentionBlock]
    gated: list[GatedMLP]
    skipped: list[Skipped]

    def release_except(self, group: AttentionBlock | GatedMLP | None = None) -> None:
        """Drop the weights of all projections but ``group``'s (they are read
        from the model again on use)."""
        keep = set() if group is None else {id(p) for p in group.projections}
        for g in [*self.attention, *self.gated]:
            for p in g.projections:
                if id(p) not in keep:
                    p.release()


class _NoMatch(Exception):
    pass


# --------------------------------------------------------------------------
# small graph helpers


def projection_at(ix: GraphIndex, tensor: str) -> Projection | None:
    """The projection whose (biased) output is ``tensor``, else None."""
    p = ix.producer.get(tensor)
    if p is None:
        return None
    bias_node, bias_input, bias_slot, bias = None, None, 1, None
    if p.op_type == "Add" and len(p.input) == 2:
        slot = next((s for s in (0, 1) if ix.is_const(p.input[s])), None)
        if slot is None:
            return None
        mm = ix.producer.get(p.input[1 - slot])
        if mm is None or mm.op_type != "MatMul" or ix.single_consumer(mm.output[0]) is not p:
            return None
        bias_node, bias_input, bias_slot = p.name, p.input[slot], slot
        p = mm
    if p.op_type != "MatMul" or ix.is_const(p.input[0]) or not ix.is_const(p.input[1]):
        return None
    meta = ix.const_meta(p.input[1])
    if meta is None or len(meta[0]) != 2 or meta[1].type not in FLOAT_TYPES:
        return None
    shape = meta[0][::-1]  # W = Bᵀ: out × in
    if bias_input is not None:
        bias_meta = ix.const_meta(bias_input)  # checked before reading: a big constant is no bias
        if bias_meta is None or int(np.prod(bias_meta[0])) != shape[0] \
                or len(bias_meta[0]) > 1 and bias_meta[0][-1] != shape[0]:
            return None
        bias = np.asarray(ix.const(bias_input)).reshape(-1).astype(np.float64)
    return Projection(node=p.name, input=p.input[0], output=tensor, weight_input=p.input[1], dtype=meta[1],
                      bias_node=bias_node, bias_input=bias_input, bias_slot=bias_slot, bias=bias,
                      weight_loader=constant_loader(ix, p.input[1], np.transpose), weight_shape=shape)


def shape_elements(ix: GraphIndex, tensor: str) -> list[tuple[int | None, int, int]] | None:
    """The elements of a 1-D shape tensor as ``(value or None, source slot,
    offset)``: slot -1 = ``tensor`` itself is a constant; slot s = element
    ``offset`` of input s of the Concat producing it. Dynamic Concat pieces
    must be Unsqueezes (one element each). None: not understood."""
    val = ix.const(tensor)
    if val is not None:
        return [(int(x), -1, i) for i, x in enumerate(np.asarray(val).reshape(-1))]
    p = ix.producer.get(tensor)
    if p is None or p.op_type != "Concat":
        return None
    out = []
    for s, t in enumerate(p.input):
        v = ix.const(t)
        if v is not None:
            out += [(int(x), s, i) for i, x in enumerate(np.asarray(v).reshape(-1))]
            continue
        q = ix.producer.get(t)
        if q is None or q.op_type != "Unsqueeze":
            return None
        out.append((None, s, 0))
    return out


def _scalar_const(ix: GraphIndex, node: onnx.NodeProto, t: str) -> bool:
    other = node.input[1] if node.input[0] == t else node.input[0]
    meta = ix.const_meta(other)  # the size says it: a big constant is not read
    return meta is not None and int(np.prod(meta[0])) == 1


# --------------------------------------------------------------------------
# attention


class _AttnFinder:
    def __init__(self, ix: GraphIndex):
        self.ix = ix
        self.nodes: list[str] = []

    def _only(self, tensor: str, why: str) -> onnx.NodeProto:
        c = self.ix.single_consumer(tensor)
        if c is None:
            n = len(self.ix.consumers.get(tensor, []))
            raise _NoMatch(f"{why}: tensor {tensor!r} has {n} readers (or is a graph output), expected 1")
        return c

    def _producer(self, tensor: str, why: str) -> onnx.NodeProto:
        p = self.ix.producer.get(tensor)
        if p is None:
            raise _NoMatch(f"{why}: {tensor!r} has no producer")
        return p

    def _skip_scalars(self, tensor: str, side: str) -> str:
        """Walk back over scalar Mul/Div (score scaling applied to q or k)."""
        ix = self.ix
        while True:
            p = ix.producer.get(tensor)
            if p is None or p.op_type not in ("Mul", "Div") or not _scalar_const(ix, p, p.input[0]) \
                    or ix.is_const(p.input[0]):
                return tensor
            self._only(tensor, side)
            self.nodes.append(p.name)
            tensor = p.input[0]

    def _transposes_back(self, tensor: str, side: str) -> tuple[str, list[int]]:
        """Walk back over Transposes; (tensor before them, composed perm)."""
        ix = self.ix
        perm = [0, 1, 2, 3]
        while True:
            p = ix.producer.get(tensor)
            if p is None or p.op_type != "Transpose":
                return tensor, perm
            self._only(tensor, side)
            pp = list(ix.attr(p, "perm", [3, 2, 1, 0]))
            if len(pp) != 4:
                raise _NoMatch(f"{side}: Transpose of rank {len(pp)}")
            perm = [pp[i] for i in perm]
            self.nodes.append(p.name)
            tensor = p.input[0]

    def _side(self, tensor: str, want_perm: list[int], side: str) -> tuple[Projection, str, int | None, int | None]:
        """q / k / v side: (projection, Reshape node name, heads, per-head dim)."""
        ix = self.ix
        tensor = self._skip_scalars(tensor, side)
        tensor, perm = self._transposes_back(tensor, side)
        if perm != want_perm:
            raise _NoMatch(f"{side}: transposes compose to perm {perm}, expected {want_perm}")
        tensor = self._skip_scalars(tensor, side)
        rs = self._producer(tensor, side)
        if rs.op_type != "Reshape":
            raise _NoMatch(f"{side}: expected a Reshape to [B,S,H,D], found {rs.op_type}")
        self._only(tensor, side)
        self._only(rs.input[0], side)
        elems = shape_elements(ix, rs.input[1])
        if elems is None or len(elems) != 4:
            raise _NoMatch(f"{side}: Reshape shape {rs.input[1]!r} is not a 4-element constant/Concat")
        proj = projection_at(ix, rs.input[0])
        if proj is None:
            raise _NoMatch(f"{side}: the Reshape does not read a MatMul(+bias) with a constant weight")
        self.nodes.append(rs.name)
        h, d = elems[2][0], elems[3][0]
        h = h if h is not None and h > 0 else None
        d = d if d is not None and d > 0 else None
        return proj, rs.name, h, d

    def _report_gqa(self, tensor: str, q: Projection, why: str) -> None:
        """k or v did not match: if a few nodes up there is a projection
        narrower than q by an integer factor, this is grouped-query attention
        (k/v heads repeated to q's count, e.g. by Expand/Tile/Concat)."""
        ix = self.ix
        seen, frontier = set(), [tensor]
        for _ in range(12):
            nxt = []
            for t in frontier:
                p = ix.producer.get(t)
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                proj = projection_at(ix, t)
                if proj is not None:
                    if proj.in_features == q.in_features and proj.out_features < q.out_features \
                            and q.out_features % proj.out_features == 0:
                        raise _NoMatch(f"grouped-query attention (k/v projection {proj.out_features} wide, q"
                                       f" {q.out_features}): not supported ({why})")
                    continue
                nxt += [i for i in p.input if i and not ix.is_const(i)]
            frontier = nxt

    def match(self, softmax: onnx.NodeProto) -> AttentionBlock:
        ix = self.ix
        self.nodes = [softmax.name]
        axis = ix.attr(softmax, "axis", -1)
        if axis not in (-1, 3):
            raise _NoMatch(f"Softmax over axis {axis}, expected the last")
        # back from the softmax: mask Adds and scalar scalings, to the scores MatMul
        t = softmax.input[0]
        while True:
            p = self._producer(t, "scores")
            self._only(t, "scores")
            if p.op_type in ("Mul", "Div") and _scalar_const(ix, p, p.input[0]) and not ix.is_const(p.input[0]):
                self.nodes.append(p.name)
                t = p.input[0]
            elif p.op_type == "Add":
                scores_in = next((x for x in p.input if ix.producer.get(x) is not None
                                  and ix.producer[x].op_type in ("MatMul", "Mul", "Div", "Add")
                                  and ix.single_consumer(x) is p and not ix.is_const(x)), None)
                if scores_in is None:
                    raise _NoMatch("scores: Add before Softmax has no scores input")
                mask = p.input[1] if p.input[0] == scores_in else p.input[0]
                mask_meta = ix.const_meta(mask)  # the shape says it all: the values are not read
                if mask_meta is not None and len(mask_meta[0]) == 4 and mask_meta[0][1] > 1:
                    raise _NoMatch("scores: a constant per-head score bias is added (not supported)")
                self.nodes.append(p.name)
                t = scores_in
            elif p.op_type == "MatMul":
                break
            else:
                raise _NoMatch(f"scores: {p.op_type} between the scores MatMul and Softmax")
        scores = p
        self.nodes.append(scores.name)
        if ix.is_const(scores.input[0]) or ix.is_const(scores.input[1]):
            raise _NoMatch("scores MatMul has a constant input")
        q, q_rs, hq, dq = self._side(scores.input[0], [0, 2, 1, 3], "q")
        try:
            k, k_rs, hk, dk = self._side(scores.input[1], [0, 2, 3, 1], "k")
        except _NoMatch as e:
            self._report_gqa(scores.input[1], q, str(e))
            raise
        # forward from the softmax: ·v, merge heads, o-proj
        av = self._only(softmax.output[0], "softmax")
        if av.op_type != "MatMul" or av.input[0] != softmax.output[0]:
            raise _NoMatch(f"softmax output feeds {av.op_type}, not MatMul(probabilities, v)")
        self.nodes.append(av.name)
        try:
            v, v_rs, hv, dv = self._side(av.input[1], [0, 2, 1, 3], "v")
        except _NoMatch as e:
            self._report_gqa(av.input[1], q, str(e))
            raise
        tr = self._only(av.output[0], "context")
        if tr.op_type != "Transpose" or list(ix.attr(tr, "perm", [])) != [0, 2, 1, 3]:
            raise _NoMatch("context: expected Transpose [0,2,1,3] after MatMul(probabilities, v)")
        rs = self._only(tr.output[0], "context")
        if rs.op_type != "Reshape" or rs.input[0] != tr.output[0]:
            raise _NoMatch("context: expected a Reshape merging the heads")
        mm = self._only(rs.output[0], "context")
        self.nodes += [tr.name, rs.name]
        if mm.op_type != "MatMul" or mm.input[0] != rs.output[0]:
            raise _NoMatch("context: the merged heads do not feed a MatMul (output projection)")
        c = ix.single_consumer(mm.output[0])
        o_out = c.output[0] if c is not None and c.op_type == "Add" and projection_at(ix, c.output[0]) is not None \
            else mm.output[0]
        o = projection_at(ix, o_out)
        if o is None:
            raise _NoMatch("output projection has no constant 2-D weight")
        # sizes: heads from the shape constants, else from the weights and head dims
        def heads(h, d, width, side):
            if h is None and d is not None and width % d == 0:
                h = width // d
            if h is None or width % h:
                raise _NoMatch(f"{side}: cannot tell the number of heads from the Reshape shape")
            return h, width // h
        hq, dq = heads(hq, dq, q.out_features, "q")
        hk, dk = heads(hk, dk, k.out_features, "k")
        hv, dv = heads(hv, dv, v.out_features, "v")
        if hk != hq or hv != hq:
            if hk == hv and hq % hk == 0:
                raise _NoMatch(f"grouped-query attention (q {hq} heads, k/v {hk} heads) is not supported")
            raise _NoMatch(f"head counts differ (q {hq}, k {hk}, v {hv})")
        if dk != dq:
            raise _NoMatch(f"q and k head dims differ ({dq}, {dk})")
        if o.in_features != hv * dv:
            raise _NoMatch(f"output projection reads {o.in_features} features, heads give {hv * dv}")
        refs = []
        for name, d in ((q_rs, dq), (k_rs, dk), (v_rs, dv)):
            el = shape_elements(ix, ix.node_by_name[name].input[1])
            if el[2][0] is not None and el[2][0] > 0:
                refs.append(ShapeRef(name, 2, int(el[2][0]), 1))
        el = shape_elements(ix, rs.input[1])
        if el is None:
            raise _NoMatch("context: the head-merging Reshape's shape is not a constant/Concat")
        if el[-1][0] == hv * dv:  # the merged width [B, S, H·Dv]; -1 needs no edit
            refs.append(ShapeRef(rs.name, len(el) - 1, hv * dv, dv))
        if el[-1][0] not in (hv * dv, -1):
            raise _NoMatch(f"context: head-merging Reshape's last size is {el[-1][0]}, expected {hv * dv} or -1")
        return AttentionBlock(name="", q=q, k=k, v=v, o=o, num_heads=hq, head_dim=dq, v_head_dim=dv,
                              shape_refs=refs, nodes=list(dict.fromkeys(self.nodes + q.nodes + k.nodes + v.nodes
                                                                         + o.nodes)))


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
            if down_node is None or down_node.op_type != "MatMul" or down_node.input[0] != mul.output[0]:
                continue
            c = ix.single_consumer(down_node.output[0])
            d_out = c.output[0] if c is not None and c.op_type == "Add" and projection_at(ix, c.output[0]) \
                else down_node.output[0]
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


def find_transformer(model: onnx.ModelProto) -> TransformerView:
    """Attention blocks and gated MLPs of ``model`` (read-only), plus what
    looked like attention but could not be matched, with the reason."""
    ix = GraphIndex(model)
    blocks: list[AttentionBlock] = []
    skipped: list[Skipped] = []
    taken: set[str] = set()
    for node in ix.nodes:
        if node.op_type in FUSED_ATTENTION and (node.domain == "com.microsoft" or node.op_type == "Attention"):
            skipped.append(Skipped(node.name, f"fused {node.domain or 'ai.onnx'} {node.op_type} node: head folding"
                                              " of fused attention is not supported (left untouched)"))
        if node.op_type != "Softmax":
            continue
        f = _AttnFinder(ix)
        try:
            b = f.match(node)
        except _NoMatch as e:
            skipped.append(Skipped(node.name, f"attention not folded: {e}"))
            continue
        if set(b.nodes) & taken:
            skipped.append(Skipped(node.name, "attention not folded: shares nodes with another block"))
            continue
        taken.update(b.nodes)
        b.name = f"attn{len(blocks)}"
        blocks.append(b)
    gated: list[GatedMLP] = []
    for node in ix.nodes:
        if node.op_type == "Mul":
            g = _match_gated(ix, node, taken)
            if g is not None:
                g.name = f"glu{len(gated)}"
                taken.update(g.gate.nodes + g.up.nodes + g.down.nodes + [g.mul])
                gated.append(g)
    return TransformerView(attention=blocks, gated=gated, skipped=skipped)
