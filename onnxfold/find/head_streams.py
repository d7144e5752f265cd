"""The q, k and v streams of an attention block: from the attention MatMuls
back to the projections, with the axis that carries the heads tracked.

A stream starts at a projection, whose output a Reshape splits into
``[batch, seq, heads, head_dim]``, and ends at an operand of the scores
MatMul (q: ``[B, H, S, D]``; k: ``[B, H, D, S]``) or of the
probabilities·v MatMul (v: ``[B, H, S, D]``). In between, exporters write
(each one a step here, recognised walking back from the MatMul):

* ``Transpose``s;
* scalar ``Mul``/``Div`` (scores scaled on q and/or k), ``Cast``, ``Identity``;
* rotary embeddings ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) =
  Concat(-x[..., D/2:], x[..., :D/2])`` (LLaMA-style ``Slice``/``Neg``/``Concat``);
* the grouped-query repeat of k and v, ``Reshape(Expand(Unsqueeze(x, 2),
  [B, Hkv, n, S, D]), [B, Hkv·n, S, D])`` (transformers' ``repeat_kv``);
* dynamo's transpose of the last two axes through 3-D:
  ``Reshape(x, [-1, S, D])`` → ``Transpose [0, 2, 1]`` → ``Reshape`` back
  to ``dims(x)[:-2] + [D, S]``, with every size read from ``Shape(x)``.

The steps are then replayed forward on axis labels, so that a stream is only
accepted if its head axis ends where the attention MatMuls batch over it.
Intermediate tensors may be read by ``Shape`` nodes (legacy exports size
their reshapes that way) but by nothing else: a tensor read outside the
block (a key/value cache output, say) would see its heads change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph_index import GraphIndex
from .projections import Projection, projection_at
from .shapes import ShapeRef, shape_dims, shape_elements, shape_source


class NoMatch(Exception):
    """The structure is not (supported) attention; the message says why."""


@dataclass
class Stream:
    """One of q, k, v: its projection and what lies between it and the attention MatMul."""

    proj: Projection
    split: str  # the Reshape splitting heads
    heads: int  # at the split (key/value heads for k and v of grouped-query attention)
    head_dim: int
    group: int = 1  # query heads per head of this stream, after a grouped-query repeat
    rotary: bool = False
    layout: tuple[str, ...] = ()  # axes at the attention MatMul: B, S, H (heads), D (head dim)
    nodes: list[str] = field(default_factory=list)
    refs: list[ShapeRef] = field(default_factory=list)


def scalar_operand(ix: GraphIndex, node: onnx.NodeProto, t: str) -> bool:
    """The other input of binary ``node`` (reading ``t``) is a one-element constant."""
    other = node.input[1] if node.input[0] == t else node.input[0]
    meta = ix.const_meta(other)  # the size says it: a big constant is not read
    return meta is not None and int(np.prod(meta[0])) == 1


def _const_ints(ix: GraphIndex, node: onnx.NodeProto, slot: int, attr: str) -> list[int] | None:
    """Integer list given as input ``slot`` (newer opsets) or attribute ``attr``."""
    if len(node.input) > slot and node.input[slot]:
        v = ix.const(node.input[slot])
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    v = ix.attr(node, attr)
    return None if v is None else [int(x) for x in v]


class StreamWalker:
    def __init__(self, ix: GraphIndex):
        self.ix = ix

    # helpers ---------------------------------------------------------------
    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """Readers of ``tensor`` other than Shape nodes (sizes are read anywhere)."""
        return [c for c in self.ix.consumers.get(tensor, []) if c.op_type != "Shape"]

    def only(self, tensor: str, side: str) -> onnx.NodeProto:
        cs = self.readers(tensor)
        if len(cs) != 1 or tensor in self.ix.graph_outputs:
            where = " and is a graph output" if tensor in self.ix.graph_outputs else ""
            raise NoMatch(f"{side}: tensor {tensor!r} is read by {len(cs)} nodes{where}, expected 1 inside the block")
        return cs[0]

    def producer(self, tensor: str, side: str) -> onnx.NodeProto:
        p = self.ix.producer.get(tensor)
        if p is None:
            raise NoMatch(f"{side}: {tensor!r} is not computed from a projection (it has no producer)")
        return p

    # the walk --------------------------------------------------------------
    def walk(self, tensor: str, side: str) -> Stream:
        """The stream ending at ``tensor`` (an attention MatMul operand)."""
        ix = self.ix
        steps: list[tuple] = []  # walking back: last step first
        nodes: list[str] = []
        refs: list[ShapeRef] = []
        group, rotary = 1, False
        t, readers_checked = tensor, False
        for _ in range(64):
            p = self.producer(t, side)
            if not readers_checked:
                self.only(t, side)
            readers_checked = False
            op = p.op_type
            if op == "Transpose":
                steps.append(("perm", list(ix.attr(p, "perm", []))))
                t = p.input[0]
            elif op in ("Mul", "Div") and not ix.is_const(p.input[0]) and scalar_operand(ix, p, p.input[0]):
                t = p.input[0]
            elif op == "Mul" and not ix.is_const(p.input[1]) and scalar_operand(ix, p, p.input[1]):
                t = p.input[1]
            elif op in ("Cast", "Identity") or ix.passthrough_output(p) == t:
                t = p.input[0]
            elif op == "Add":
                t, rot_nodes, axes = self._rotary(p, side)
                steps.append(("rotary", axes))
                nodes += rot_nodes
                rotary = readers_checked = True  # the rotary input is read by its three nodes, checked there
                continue
            elif op == "Reshape":
                proj = projection_at(ix, p.input[0])
                if proj is not None:
                    nodes.append(p.name)
                    return self._split(p, proj, steps, nodes, refs, group, rotary, side)
                src = ix.producer.get(p.input[0])
                if src is not None and src.op_type in ("Expand", "Tile"):
                    t, g, rep_nodes, rep_refs, axis = self._repeat(p, side)
                    steps.append(("repeat", axis))
                    nodes += rep_nodes
                    refs += rep_refs
                    group *= g
                    continue
                x0, swap_nodes = self._swap_last(p, side)
                steps.append(("swap",))
                nodes += swap_nodes
                t = x0
                continue
            elif op in ("Split", "Slice", "Gather") and projection_at(ix, p.input[0]) is not None:
                raise NoMatch(f"{side}: fused q/k/v projection ({op} {p.name} of one MatMul): not supported")
            else:
                raise NoMatch(f"{side}: {op} {p.name} between the projection and the attention MatMul")
            nodes.append(p.name)
        raise NoMatch(f"{side}: more than 64 steps between the projection and the attention MatMul")

    def _split(self, rs: onnx.NodeProto, proj: Projection, steps, nodes, refs, group, rotary, side) -> Stream:
        ix = self.ix
        self.only(proj.output, side)
        elems = shape_elements(ix, rs.input[1])
        if elems is None or len(elems) != 4:
            raise NoMatch(f"{side}: Reshape {rs.name} does not split into [batch, seq, heads, head_dim]")
        h, d = (v if v is not None and v > 0 else None for v, _s, _o in elems[2:])
        width = proj.out_features
        if h is None and d is not None and width % d == 0:
            h = width // d
        if d is None and h is not None and width % h == 0:
            d = width // h
        if h is None or d is None or h * d != width:
            raise NoMatch(f"{side}: cannot tell heads × head_dim from Reshape {rs.name} of a {width}-wide projection")
        if elems[2][0] is not None and elems[2][0] > 0:
            refs = [ShapeRef(rs.name, 2, h, 1)] + refs
        layout = ["B", "S", "H", "D"]
        for step in reversed(steps):
            if step[0] == "perm":
                if sorted(step[1]) != list(range(len(layout))):
                    raise NoMatch(f"{side}: Transpose perm {step[1]} on a rank-{len(layout)} tensor")
                layout = [layout[i] for i in step[1]]
            elif step[0] == "swap":
                layout[-2], layout[-1] = layout[-1], layout[-2]
            elif step[0] == "rotary":
                if layout[-1] != "D" or any(a not in (-1, len(layout) - 1) for a in step[1]):
                    raise NoMatch(f"{side}: rotary embedding not over the head dimension")
            elif step[0] == "repeat":
                a = step[1] if step[1] >= 0 else step[1] + len(layout) + 1
                if a < 1 or layout[a - 1] != "H":
                    raise NoMatch(f"{side}: grouped-query repeat not next to the head axis")
        return Stream(proj=proj, split=rs.name, heads=h, head_dim=d, group=group, rotary=rotary,
                      layout=tuple(layout), nodes=list(dict.fromkeys(nodes + proj.nodes)), refs=refs)

    # steps -----------------------------------------------------------------
    def _rotary(self, add: onnx.NodeProto, side: str) -> tuple[str, list[str], list[int]]:
        """``x·cos + rotate_half(x)·sin`` at ``add``: (x, nodes, axes of the
        Slices and the Concat)."""
        ix = self.ix
        why = f"{side}: Add {add.name} is not a rotary embedding (x·cos + rotate_half(x)·sin)"
        muls = [ix.producer.get(i) for i in add.input]
        if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
            raise NoMatch(why)
        for direct, rot in ((muls[0], muls[1]), (muls[1], muls[0])):
            cat = next((ix.producer[i] for i in rot.input if i in ix.producer and ix.producer[i].op_type == "Concat"),
                       None)
            if cat is None or len(cat.input) != 2:
                continue
            neg, lo = ix.producer.get(cat.input[0]), ix.producer.get(cat.input[1])
            if neg is None or neg.op_type != "Neg" or lo is None or lo.op_type != "Slice":
                continue
            hi = ix.producer.get(neg.input[0])
            if hi is None or hi.op_type != "Slice" or hi.input[0] != lo.input[0] or lo.input[0] not in direct.input:
                continue
            x = lo.input[0]
            if sorted(n.name for n in self.readers(x)) != sorted([direct.name, hi.name, lo.name]):
                raise NoMatch(f"{side}: the rotary embedding's input {x!r} is read outside it")
            for tensor in (direct.output[0], rot.output[0], cat.output[0], neg.output[0], hi.output[0],
                           lo.output[0]):
                self.only(tensor, side)
            axes = [ix.attr(cat, "axis", 0)]
            for s in (hi, lo):
                a = _const_ints(ix, s, 3, "axes")
                if a is None or len(a) != 1:
                    raise NoMatch(f"{side}: rotary Slice {s.name} has no constant single axis")
                axes += a
            return x, [add.name, direct.name, rot.name, cat.name, neg.name, hi.name, lo.name], axes
        raise NoMatch(why)

    def _repeat(self, merge: onnx.NodeProto, side: str):
        """The grouped-query repeat ending at Reshape ``merge`` (``Expand`` to
        ``[B, Hkv, n, S, D]``, or ``Tile`` by n as torch's ``repeat_interleave``
        exports): (x, group size n, nodes, shape refs, Unsqueeze axis)."""
        ix = self.ix
        rep = ix.producer[merge.input[0]]
        self.only(rep.output[0], side)
        uns = ix.producer.get(rep.input[0])
        if uns is None or uns.op_type != "Unsqueeze":
            raise NoMatch(f"{side}: {rep.op_type} {rep.name} is not a grouped-query repeat (no Unsqueeze before it)")
        self.only(uns.output[0], side)
        axes = _const_ints(ix, uns, 1, "axes")
        if axes is None or len(axes) != 1 or not -4 <= axes[0] <= 4 or axes[0] in (0, -5):
            raise NoMatch(f"{side}: Unsqueeze {uns.name} before the repeat is not on one inner axis")
        a = axes[0] if axes[0] >= 0 else axes[0] + 5
        m_node, m_slot, m_tensor = shape_source(ix, merge.name, 1)
        m_el = shape_elements(ix, m_tensor)
        if m_el is None or len(m_el) != 4:
            raise NoMatch(f"{side}: Reshape {merge.name} after the repeat is not [B, Hkv·n, S, D]")
        refs, group = [], None
        if rep.op_type == "Tile":
            reps = ix.const(rep.input[1])
            reps = None if reps is None else [int(r) for r in np.asarray(reps).reshape(-1)]
            if reps is None or len(reps) != 5 or [r for i, r in enumerate(reps) if i != a] != [1] * 4:
                raise NoMatch(f"{side}: Tile {rep.name} does not repeat the Unsqueezed axis only")
            group = reps[a]
            refs.append(ShapeRef(rep.name, a, group, 1, "group", 1))
        else:
            e_node, e_slot, e_tensor = shape_source(ix, rep.name, 1)
            e_el = shape_elements(ix, e_tensor)
            if e_el is None or len(e_el) != 5:
                raise NoMatch(f"{side}: Expand {rep.name} shape is not [B, Hkv, n, S, D]")
            kv, n = e_el[a - 1][0], e_el[a][0]
            if kv is not None and kv > 0:
                refs.append(ShapeRef(e_node, a - 1, kv, 1, "kv_heads", e_slot))
            if n is not None and n > 0:
                refs.append(ShapeRef(e_node, a, n, 1, "group", e_slot))
                group = n
        heads = m_el[a - 1][0]
        if heads is not None and heads > 0:
            refs.append(ShapeRef(m_node, a - 1, heads, 1, "heads", m_slot))
        elif heads is None:  # legacy: Unsqueeze(Mul(kv heads read at run time, n)) in a Concat
            mul_ref = self._group_mul(m_tensor, m_el[a - 1][1])
            if mul_ref is not None:
                refs.append(mul_ref)
                group = group or mul_ref.value
        if group is None:
            raise NoMatch(f"{side}: cannot tell the group size of the grouped-query repeat at {rep.name}")
        return uns.input[0], group, [uns.name, rep.name, merge.name], refs, axes[0]

    def _group_mul(self, concat_out: str, slot: int) -> ShapeRef | None:
        ix = self.ix
        concat = ix.producer.get(concat_out)
        u = ix.producer.get(concat.input[slot]) if concat is not None else None
        m = ix.producer.get(u.input[0]) if u is not None and u.op_type == "Unsqueeze" else None
        if m is None or m.op_type != "Mul":
            return None
        for s in (0, 1):
            v = ix.const(m.input[s])
            if v is not None and np.size(v) == 1 and int(np.reshape(v, -1)[0]) > 0:
                return ShapeRef(m.name, 0, int(np.reshape(v, -1)[0]), 1, "group", s)
        return None

    def _swap_last(self, r2: onnx.NodeProto, side: str) -> tuple[str, list[str]]:
        """dynamo's transpose of the last two axes through a 3-D Transpose,
        ending at Reshape ``r2``: (the tensor before it, nodes)."""
        ix = self.ix
        why = f"{side}: Reshape {r2.name} is not a head split, a grouped-query repeat or a transpose of the last two axes"
        tr = ix.producer.get(r2.input[0])
        if tr is None or tr.op_type != "Transpose" or list(ix.attr(tr, "perm", [])) != [0, 2, 1]:
            raise NoMatch(why)
        self.only(tr.output[0], side)
        r1 = ix.producer.get(tr.input[0])
        if r1 is None or r1.op_type != "Reshape":
            raise NoMatch(why)
        self.only(r1.output[0], side)
        x0 = r1.input[0]

        def pieces(shape: str) -> list | None:
            concat = ix.producer.get(shape)
            if concat is None or concat.op_type != "Concat":
                return None
            out = []
            for t in concat.input:
                v = ix.const(t)
                out.append(("const", np.asarray(v).reshape(-1).tolist()) if v is not None else shape_dims(ix, t))
            return out

        flat, back = pieces(r1.input[1]), pieces(r2.input[1])
        if flat != [("const", [-1]), (x0, -2, -1), (x0, -1, None)] or back != [(x0, 0, -2), (x0, -1, None),
                                                                                 (x0, -2, -1)]:
            raise NoMatch(why)
        return x0, [r1.name, tr.name, r2.name]
