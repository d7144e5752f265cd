"""Write the edited numpy view back into an ONNX graph.

Only ops marked ``changed`` are rewritten; their old nodes are removed and a
canonical form is emitted under the same output tensor name, so everything
downstream (and the graph's inputs/outputs) is untouched:

    gemm form:    Gemm(x, W, b, transB=1)                      (2-D input)
    matmul form:  MatMul(x, Wᵀ) [+ Add(b)]                     (any rank)
    paths:        … + MatMul(x_k, F0)[·MatMul(F1)…] per path

The main product keeps the original node name, so layer names are stable
across passes. Initializers and Constant nodes nothing reads any more are
dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..find.chains import DenseGraph
from ..find.dense import DenseOp
from ..find.graph_index import node_key
from ..profile import stage
from .graph import FreshNames, drop_value_info, names_read, toposort


class _NewInitializers:
    """New initializers, written straight into the output graph: collecting
    TensorProtos in a list and ``extend``-ing the graph with them would copy
    every edited weight once more (protobuf copies on ``extend``)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names: set[str] = set()

    def add_array(self, name: str, arr: np.ndarray) -> None:
        self.graph.initializer.add().CopyFrom(numpy_helper.from_array(arr, name))
        self.names.add(name)

    def add_weight(self, name: str, get, dtype: np.dtype, drop=None) -> None:
        """The array ``get()`` returns; ``drop()`` is called once its bytes
        exist, before they are copied into the proto, so that a big weight is
        held at most twice (array + bytes, then bytes + proto), never three times."""
        arr = get()
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(arr.shape)
        data = arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()  # C order, also for views
        del arr
        if drop is not None:
            drop()
        t.raw_data = data
        self.names.add(name)


def _emit_op(op: DenseOp, names: FreshNames, inits: _NewInitializers, release: bool = False) -> list[onnx.NodeProto]:
    dt = op.dtype
    base = op.name.replace("/", "_")

    def const(suffix: str, arr: np.ndarray) -> str:
        name = names(f"{base}.onnxfold.{suffix}")
        inits.add_array(name, np.ascontiguousarray(arr.astype(dt, copy=False)))
        return name

    def weight(transposed: bool) -> str:
        name = names(f"{base}.onnxfold.weight")
        get = (lambda: op.weight.T) if transposed else (lambda: op.weight)
        inits.add_weight(name, get, dt, op.discard if release else None)
        return name

    nodes = []
    has_tail = bool(op.paths)
    main_out = names(f"{base}.onnxfold.main") if has_tail else op.output
    if op.form == "gemm":
        ins = [op.input, weight(False)]
        if op.bias is not None:
            ins.append(const("bias", op.bias))
        nodes.append(helper.make_node("Gemm", ins, [main_out], name=op.name, transB=1))
    else:
        mm_out = names(f"{base}.onnxfold.mm") if (op.bias is not None) else main_out
        nodes.append(helper.make_node("MatMul", [op.input, weight(True)], [mm_out], name=op.name))
        if op.bias is not None:
            nodes.append(helper.make_node("Add", [mm_out, const("bias", op.bias)], [main_out],
                                          name=names(f"{op.name}/onnxfold_bias")))
    acc = main_out
    for i, p in enumerate(op.paths):
        t = p.input
        for j, f in enumerate(p.factors):
            out = names(f"{base}.onnxfold.path{i}.{j}")
            nodes.append(helper.make_node("MatMul", [t, const(f"path{i}.f{j}", f)], [out],
                                          name=names(f"{op.name}/onnxfold_path{i}_mm{j}")))
            t = out
        last = i == len(op.paths) - 1
        out = op.output if last else names(f"{base}.onnxfold.sum{i}")
        nodes.append(helper.make_node("Add", [acc, t], [out], name=names(f"{op.name}/onnxfold_path{i}_add")))
        acc = out
    return nodes


def materialize(model: onnx.ModelProto, view: DenseGraph, *, release: bool = False) -> onnx.ModelProto:
    """A new ModelProto with every changed op of ``view`` written back.

    The input ``model`` is not modified (the graph is rebuilt; untouched
    initializers are copied into a fresh proto - cheap for deferred ones).
    ``release``: the view is done with; drop each op's weight as soon as it
    is written, so a big edited model is not held twice.
    """
    with stage("rewrite"):
        return _materialize(model, view, release)


def _materialize(model: onnx.ModelProto, view: DenseGraph, release: bool) -> onnx.ModelProto:
    changed = [op for op in view.ops.values() if op.changed]
    changed_chains = [c for c in view.chains if c.producer.changed]
    changed_acts = [c.activation for c in changed_chains]
    out = onnx.ModelProto()
    # Rebuild rather than CopyFrom: a full copy of a large model doubles memory.
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, fld, getattr(model, fld))
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.doc_string = src.doc_string
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)

    names = FreshNames(src)
    removed = {n for op in changed for n in op.nodes}
    new_inits = _NewInitializers(g)
    emitted: dict[str, list] = {}
    for op in changed:
        emitted[op.name] = _emit_op(op, names, new_inits, release)
        if release:
            op.discard()
    # PRelu slopes of edited layers
    slope_nodes: dict[str, str] = {}
    for c in changed_chains:
        act = c.activation
        if act.kind == "prelu" and act.nodes:
            s = np.asarray(act.slope, dtype=c.producer.dtype)
            name = names(f"{act.nodes[0]}.onnxfold.slope")
            new_inits.add_array(name, s.reshape(-1) if s.size > 1 else s.reshape(1))
            slope_nodes[act.nodes[0]] = name

    nodes = []
    for i, n in enumerate(src.node):
        key = node_key(n, i)  # the name find knew this node by
        if key in emitted:
            nodes.extend(emitted.pop(key))
        if key in removed:
            continue
        if key in slope_nodes or not n.name:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = key  # keep find's names stable across passes
            if key in slope_nodes:
                m.input[1] = slope_nodes[key]
            n = m
        nodes.append(n)
    for rest in emitted.values():  # main node was unnamed/absent: append
        nodes.extend(rest)

    # keep only the constants and initializers something still reads (If/Loop/Scan bodies included);
    # the old weights are filtered while copying, never copied and then deleted
    read = names_read(nodes, src.output)
    nodes = [n for n in nodes if not (n.op_type == "Constant" and not any(o in read for o in n.output))]
    avail = {i.name for i in src.input} | {t.name for t in src.initializer} | new_inits.names
    g.node.extend(toposort(nodes, avail))
    g.initializer.extend(t for t in src.initializer if t.name in read)
    # initializers also listed as graph inputs (old exporters) leave the inputs with them
    dropped = {t.name for t in src.initializer if t.name not in read}
    g.input.extend(i for i in src.input if i.name not in dropped)

    # shape hints of tensors whose width may have changed are no longer true
    stale = set()
    for op in changed:
        stale.add(op.output)
    for act in changed_acts:
        stale.add(act.input)
        stale.add(act.output)
    removed_outputs = set()
    act_nodes = {x for a in changed_acts for x in a.nodes}
    for i, n in enumerate(src.node):
        if node_key(n, i) in removed or node_key(n, i) in act_nodes:
            removed_outputs.update(n.output)
    stale |= removed_outputs
    g.value_info.extend(src.value_info)
    drop_value_info(g, stale)
    return out
