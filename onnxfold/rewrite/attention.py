"""Write folded attention blocks and gated MLPs back into an ONNX graph.

Unlike ``materialize`` (which re-emits changed dense ops), a head or gated
fold keeps every node and only swaps *inputs*: each projection's weight (and
bias) becomes a new initializer, and the Reshape shape constants that count
heads get new constants. So node names, tensor names and the graph's
structure are unchanged; dynamic batch/sequence sizes keep flowing through
the Shape → Gather → Unsqueeze → Concat parts exactly as before. A shape
constant or Concat read by other nodes too is not edited in place: the
Reshape gets its own copy. Initializers and Constant nodes nothing reads any
more are dropped, and value_info of the edited blocks' tensors (their head
counts are stale) is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..find.attention import Projection, ShapeRef, shape_elements
from ..find.graph_index import GraphIndex, node_key
from .graph import FreshNames as _Names, drop_unread, drop_value_info


@dataclass
class ProjectionEdit:
    proj: Projection
    weight: np.ndarray  # out' × in' (W, not the MatMul's B)
    bias: np.ndarray | None  # None: leave the bias as it is / none


@dataclass
class ShapeEdit:
    ref: ShapeRef
    value: int


def rewrite_projections(model: onnx.ModelProto, projections: list[ProjectionEdit], shapes: list[ShapeEdit],
                        stale_nodes: set[str] = frozenset()) -> onnx.ModelProto:
    """A copy of ``model`` with the given weights / biases / shape elements.

    ``stale_nodes``: nodes whose outputs' value_info is dropped (their shapes
    change). The input model is not modified."""
    ix = GraphIndex(model)  # read-only lookups on the original structure
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = _Names(g)
    nodes = {node_key(n, i): n for i, n in enumerate(g.node)}
    for key, n in nodes.items():
        if not n.name:
            n.name = key
    new_inits: list[onnx.TensorProto] = []
    inserted: list[tuple[str, onnx.NodeProto]] = []  # (insert after node, node)

    def init(base: str, arr: np.ndarray) -> str:
        name = names(f"{base}.onnxfold")
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    for e in projections:
        p = e.proj
        mm = nodes[p.node]
        mm.input[1] = init(p.weight_input, np.asarray(e.weight, dtype=np.float64).T.astype(p.dtype))
        if e.bias is None:
            continue
        b = np.asarray(e.bias, dtype=np.float64).astype(p.dtype)
        if p.bias_node is not None:
            add = nodes[p.bias_node]
            add.input[p.bias_slot] = init(p.bias_input, b)
        elif np.any(b != 0):
            mm_out = names(f"{p.output}.onnxfold.mm")
            mm.output[0] = mm_out
            inserted.append((p.node, helper.make_node("Add", [mm_out, init(f"{p.node}.bias", b)], [p.output],
                                                      name=names(f"{p.node}/onnxfold_bias"))))
            stale_nodes = set(stale_nodes) | {p.node}

    for e in shapes:
        rs = nodes[e.ref.reshape]
        elems = shape_elements(ix, ix.node_by_name[e.ref.reshape].input[1])
        if elems is None:
            raise ValueError(f"shape of {e.ref.reshape} is not understood")
        _, slot, offset = elems[e.ref.index]
        if slot < 0:
            val = np.array(ix.const(ix.node_by_name[e.ref.reshape].input[1]), copy=True)
            val.reshape(-1)[offset] = e.value
            rs.input[1] = init(rs.input[1], val)
            continue
        concat_out = rs.input[1]
        concat = nodes[ix.producer[ix.node_by_name[e.ref.reshape].input[1]].name]
        if len(ix.consumers.get(concat_out, [])) > 1 or concat_out in ix.graph_outputs:
            clone = onnx.NodeProto()
            clone.CopyFrom(concat)
            clone.name = names(f"{concat.name}/onnxfold_{e.ref.reshape.rsplit('/', 1)[-1]}")
            clone.output[0] = names(f"{concat_out}.onnxfold")
            rs.input[1] = clone.output[0]
            inserted.append((concat.name, clone))
            concat = clone
            nodes[clone.name] = clone
        piece = concat.input[slot]
        fresh = {t.name: t for t in new_inits}
        src = numpy_helper.to_array(fresh[piece]) if piece in fresh else ix.const(piece)
        val = np.array(src, copy=True)
        val.reshape(-1)[offset] = e.value
        concat.input[slot] = init(piece, val)

    # node list: insert the new nodes after their anchors
    order = list(g.node)
    for anchor, node in inserted:
        i = next(j for j, n in enumerate(order) if n.name == anchor)
        order.insert(i + 1, node)
    stale = {o for n in order if n.name in stale_nodes for o in n.output}
    del g.node[:]
    g.node.extend(order)
    g.initializer.extend(new_inits)
    drop_unread(g)  # constants and weights nothing reads any more (If/Loop/Scan bodies included)
    drop_value_info(g, stale)
    return out
