"""Shape tensors as exporters write them, read without running the graph.

A Reshape or Expand target is a constant, or a Concat of constants and of
sizes read at run time (``Shape`` → ``Gather``/``Slice`` → ``Unsqueeze``;
dynamo writes ``Shape(x, start, end)`` pieces directly). Legacy exports wrap
an Expand target in ``Where(Equal(s, -1), 1, s)`` after a ``Reshape(s, [-1])``.
This module says which element of such a target is which constant, so that a
head count found in one can be rewritten, and which tensor's dimensions a
run-time piece copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph_index import GraphIndex

#: what the element of a ShapeRef counts
COUNTS = ("heads", "kv_heads", "group")


@dataclass
class ShapeRef:
    """One element of a shape tensor that counts heads: element ``index`` of
    input ``slot`` of node ``reshape`` holds ``value`` = count × ``per_head``.

    ``reshape`` is usually a Reshape (slot 1, its target shape); it can also
    be an Expand (slot 1), the ``Reshape(s, [-1])`` legacy exporters put
    before an Expand target (slot 0: the Concat it flattens), or a scalar
    ``Mul`` by the group size (slot of the constant). ``counts`` says what
    the count is: ``"heads"`` (query heads; in multi-head attention also
    key/value heads), ``"kv_heads"`` (key/value heads of grouped-query
    attention) or ``"group"`` (query heads per key/value head)."""

    reshape: str
    index: int
    value: int
    per_head: int
    counts: str = "heads"
    slot: int = 1


def _piece_length(ix: GraphIndex, tensor: str) -> int | None:
    """Number of elements of a 1-D run-time shape piece, else None."""
    shape = ix.tensor_shape(tensor)
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    p = ix.producer.get(tensor)
    if p is None:
        return None
    if p.op_type == "Unsqueeze":  # of a scalar size, as every exporter writes it
        return 1
    if p.op_type == "Shape":
        start, end = ix.attr(p, "start", 0), ix.attr(p, "end", None)
        if end is not None and (start >= 0) == (end >= 0):
            return max(0, end - start)
        return None
    if p.op_type == "Gather":
        idx = ix.const(p.input[1])
        return None if idx is None or np.ndim(idx) != 1 else int(np.size(idx))
    if p.op_type == "Slice" and ix.producer.get(p.input[0]) is not None \
            and ix.producer[p.input[0]].op_type == "Shape" and len(p.input) >= 3:
        starts, ends = ix.const(p.input[1]), ix.const(p.input[2])
        if starts is None or ends is None or np.size(starts) != 1 or np.size(ends) != 1:
            return None
        s, e = int(np.reshape(starts, -1)[0]), int(np.reshape(ends, -1)[0])
        if (s >= 0) == (e >= 0) and abs(e) < 2**31:
            return max(0, e - s)
    return None


def shape_elements(ix: GraphIndex, tensor: str) -> list[tuple[int | None, int, int]] | None:
    """The elements of a 1-D shape tensor as ``(value or None, source slot,
    offset)``: slot -1 = ``tensor`` itself is a constant; slot s = element
    ``offset`` of input s of the Concat producing it. None: not understood
    (a run-time piece whose length cannot be told)."""
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
        n = _piece_length(ix, t)
        if n is None:
            return None
        out += [(None, s, i) for i in range(n)]
    return out


def shape_source(ix: GraphIndex, node: str, slot: int) -> tuple[str, int, str]:
    """Where the elements of input ``slot`` of ``node`` are written:
    ``(holder node, holder slot, tensor)``, looking through the plumbing
    legacy exporters put around an Expand target (``Where(Equal(s, ·), ·, s)``,
    ``Reshape(s, [-1])``, ``Cast``)."""
    n = ix.node_by_name[node]
    tensor = n.input[slot]
    while True:
        p = ix.producer.get(tensor)
        if p is None:
            return n.name, slot, tensor
        if p.op_type == "Where" and len(p.input) == 3:
            cond = ix.producer.get(p.input[0])
            if cond is None or cond.op_type != "Equal" or p.input[2] not in cond.input:
                return n.name, slot, tensor
            n, slot, tensor = p, 2, p.input[2]
        elif p.op_type == "Reshape":
            flat = ix.const(p.input[1])
            if flat is None or np.asarray(flat).reshape(-1).tolist() != [-1]:
                return n.name, slot, tensor
            n, slot, tensor = p, 0, p.input[0]
        elif p.op_type == "Cast":
            n, slot, tensor = p, 0, p.input[0]
        else:
            return n.name, slot, tensor


def shape_dims(ix: GraphIndex, tensor: str) -> tuple[str, int, int | None] | None:
    """``(x, start, end)`` if ``tensor`` is dimensions ``start:end`` of
    tensor ``x``, read as ``Shape(x, start, end)`` or ``Slice(Shape(x), start,
    end)`` (end None: to the last), else None."""
    p = ix.producer.get(tensor)
    if p is None:
        return None
    if p.op_type == "Shape":
        return p.input[0], ix.attr(p, "start", 0), ix.attr(p, "end", None)
    if p.op_type != "Slice" or len(p.input) < 3:
        return None
    src = ix.producer.get(p.input[0])
    if src is None or src.op_type != "Shape" or ix.attr(src, "start", 0) != 0 or ix.attr(src, "end") is not None:
        return None
    starts, ends = ix.const(p.input[1]), ix.const(p.input[2])
    if starts is None or ends is None or np.size(starts) != 1 or np.size(ends) != 1:
        return None
    for slot, want in ((3, [0]), (4, [1])):  # axes 0, steps 1 (the defaults)
        if len(p.input) > slot and p.input[slot]:
            v = ix.const(p.input[slot])
            if v is None or np.reshape(v, -1).tolist() != want:
                return None
    start, end = int(np.reshape(starts, -1)[0]), int(np.reshape(ends, -1)[0])
    # INT64_MIN / INT64_MAX, as torch writes "from the first" / "to the last"
    return src.input[0], 0 if start <= -(2**62) else start, None if end >= 2**62 else end
