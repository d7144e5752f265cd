"""Write the edited numpy view back into an ONNX graph.

Only ops marked ``changed`` are rewritten; their old nodes are removed and a
canonical form is emitted under the same output tensor name, so everything
downstream (and the graph's inputs/outputs) is untouched:

    gemm form:    Gemm(x, W, b, transB=1)                      (2-D input)
    matmul form:  MatMul(x, Wᵀ) [+ Add(b)]                     (any rank)
    paths:        … + MatMul(x_k, F0)[·MatMul(F1)…] per path

The main product keeps the original node name, so layer names are stable
across passes. The graph edit itself (fresh names, cleanup of what nothing
reads any more, order) is :class:`~onnxfold.rewrite.editor.GraphEditor`'s.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..find.chains import DenseGraph
from ..find.dense import DenseOp
from ..profile import stage
from .editor import GraphEditor


def _emit_op(op: DenseOp, ed: GraphEditor, anchor: gs.Node | None) -> None:
    """Add the nodes computing ``op`` before ``anchor`` (its old main node: inputs are ready there)."""
    dt = op.dtype
    base = op.name.replace("/", "_")

    def const(suffix: str, arr: np.ndarray) -> gs.Constant:
        return ed.initializer(f"{base}.onnxfold.{suffix}", np.ascontiguousarray(arr.astype(dt, copy=False)))

    def weight(transposed: bool) -> gs.Constant:
        # held as is (a transposed view is not copied) until the editor writes its bytes
        return ed.initializer(f"{base}.onnxfold.weight", op.weight.T if transposed else op.weight, dtype=dt)

    def node(kind: str, inputs: list, output: gs.Tensor, name: str, **attrs) -> None:
        ed.add_node(kind, inputs, [output], name=name, attrs=attrs, before=anchor)

    x, y = ed.tensor(op.input), ed.tensor(op.output)
    main_out = ed.variable(f"{base}.onnxfold.main") if op.paths else y
    if op.form == "gemm":
        ins = [x, weight(False)]
        if op.bias is not None:
            ins.append(const("bias", op.bias))
        node("Gemm", ins, main_out, op.name, transB=1)
    else:
        mm_out = ed.variable(f"{base}.onnxfold.mm") if op.bias is not None else main_out
        node("MatMul", [x, weight(True)], mm_out, op.name)
        if op.bias is not None:
            node("Add", [mm_out, const("bias", op.bias)], main_out, ed.fresh(f"{op.name}/onnxfold_bias"))
    acc = main_out
    for i, p in enumerate(op.paths):
        t = ed.tensor(p.input)
        for j, f in enumerate(p.factors):
            out = ed.variable(f"{base}.onnxfold.path{i}.{j}")
            node("MatMul", [t, const(f"path{i}.f{j}", f)], out, ed.fresh(f"{op.name}/onnxfold_path{i}_mm{j}"))
            t = out
        last = i == len(op.paths) - 1
        out = y if last else ed.variable(f"{base}.onnxfold.sum{i}")
        node("Add", [acc, t], out, ed.fresh(f"{op.name}/onnxfold_path{i}_add"))
        acc = out


def materialize(model: onnx.ModelProto, view: DenseGraph, *, release: bool = False) -> onnx.ModelProto:
    """A new ModelProto with every changed op of ``view`` written back.

    The input ``model`` is not modified (nor copied: untouched initializers are
    copied into the new proto, which is cheap for deferred ones).
    ``release``: the view is done with; drop each op's weight once it is
    handed to the editor, so a big edited model is not held twice.
    """
    with stage("rewrite"):
        return _materialize(model, view, release)


def _materialize(model: onnx.ModelProto, view: DenseGraph, release: bool) -> onnx.ModelProto:
    ed = GraphEditor(model)
    stale: set[str] = set()  # tensors whose width may have changed: their shape hints go
    for op in (op for op in view.ops.values() if op.changed):
        old = [ed.node(n) for n in op.nodes if ed.has_node(n)]
        anchor = ed.node(op.name) if ed.has_node(op.name) else (old[0] if old else None)
        _emit_op(op, ed, anchor)
        if release:
            op.discard()
        stale.add(op.output)
        for n in old:
            stale.update(t.name for t in n.outputs)
            ed.remove(n)
    for chain in view.chains:
        act = chain.activation
        if not chain.producer.changed:
            continue
        stale.update((act.input, act.output))
        stale.update(t.name for n in act.nodes if ed.has_node(n) for t in ed.node(n).outputs)
        if act.kind == "prelu" and act.nodes:  # per-channel slopes follow the kept rows
            s = np.asarray(act.slope, dtype=chain.producer.dtype)
            slope = ed.initializer(f"{act.nodes[0]}.onnxfold.slope", s.reshape(-1) if s.size > 1 else s.reshape(1))
            ed.set_input(ed.node(act.nodes[0]), 1, slope)
    ed.forget_shapes(stale)
    return ed.to_model()
