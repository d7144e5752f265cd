"""Write folded attention blocks and gated MLPs back into an ONNX graph.

Unlike ``materialize`` (which re-emits changed dense ops), a head or gated
fold keeps every node and only swaps *inputs*: each projection's weight (and
bias) becomes a new initializer, and the constants that count heads get new
constants: Reshape and Expand shapes, Tile repeats, the Concat that legacy
exporters flatten in front of an Expand, a scalar Mul by the group size
(each a :class:`~onnxfold.find.shapes.ShapeRef`: node, input slot, element).
So node names, tensor names and the graph's structure are unchanged;
dynamic batch/sequence sizes keep flowing through the Shape → Gather →
Unsqueeze → Concat parts exactly as before. A shape constant or Concat read
by other nodes too is not edited in place: the node gets its own copy. The editor
(:class:`~onnxfold.rewrite.editor.GraphEditor`) drops what nothing reads any
more; value_info of the edited blocks' tensors (their head counts are stale)
is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..find.attention import Projection, ShapeRef, shape_elements
from ..find.graph_index import GraphIndex
from .editor import GraphEditor


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
    ix = GraphIndex(model)  # read-only: the shape elements find understood
    ed = GraphEditor(model)
    values: dict[str, np.ndarray] = {}  # new initializers, for a second edit of the same constant
    stale: set[str] = set()

    def init(base: str, arr: np.ndarray) -> gs.Constant:
        # np.ascontiguousarray makes a scalar 1-D: a scalar Mul by the group size must stay a scalar
        t = ed.initializer(f"{base}.onnxfold", np.ascontiguousarray(arr).reshape(np.shape(arr)))
        values[t.name] = arr
        return t

    def edited(const: gs.Tensor, offset: int, value: int) -> gs.Constant:
        val = np.array(values[const.name] if const.name in values else ix.const(const.name), copy=True)
        val.reshape(-1)[offset] = value
        return init(const.name, val)

    for e in projections:
        p = e.proj
        mm = ed.node(p.node)
        ed.set_input(mm, 1, init(p.weight_input, np.asarray(e.weight, dtype=np.float64).T.astype(p.dtype)))
        if e.bias is None:
            continue
        b = np.asarray(e.bias, dtype=np.float64).astype(p.dtype)
        if p.bias_node is not None:
            ed.set_input(ed.node(p.bias_node), p.bias_slot, init(p.bias_input, b))
        elif np.any(b != 0):  # a new bias Add takes over the projection's output
            out = mm.outputs[0]
            ed.set_output(mm, 0, ed.variable(f"{p.output}.onnxfold.mm"))
            ed.add_node("Add", [mm.outputs[0], init(f"{p.node}.bias", b)], [out],
                        name=ed.fresh(f"{p.node}/onnxfold_bias"), after=mm)
            stale.add(out.name)

    outputs = {t.name for t in ed.graph.outputs}
    for e in shapes:
        holder, slot = ed.node(e.ref.reshape), e.ref.slot
        elems = shape_elements(ix, ix.node_by_name[e.ref.reshape].input[slot])
        if elems is None:
            raise ValueError(f"input {slot} of {e.ref.reshape} is not a shape understood")
        _, piece, offset = elems[e.ref.index]
        if piece < 0:  # a constant: this node gets its own edited copy
            ed.set_input(holder, slot, edited(holder.inputs[slot], offset, e.value))
            continue
        shape = holder.inputs[slot]
        concat = shape.inputs[0]
        if len(shape.outputs) > 1 or shape.name in outputs:  # shared: this node gets its own Concat
            concat = ed.add_node("Concat", list(concat.inputs), [ed.variable(f"{shape.name}.onnxfold")],
                                 name=ed.fresh(f"{concat.name}/onnxfold_{e.ref.reshape.rsplit('/', 1)[-1]}"),
                                 attrs=dict(concat.attrs), domain=concat.domain, after=concat)
            ed.set_input(holder, slot, concat.outputs[0])
        ed.set_input(concat, piece, edited(concat.inputs[piece], offset, e.value))

    stale.update(t.name for key in stale_nodes if ed.has_node(key) for t in ed.node(key).outputs)
    ed.forget_shapes(stale)
    return ed.to_model()
