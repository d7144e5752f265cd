"""Channel edits on the conv view, and writing the edited convs back to ONNX.

:class:`ChannelEdit` is the conv counterpart of :class:`~onnxfold.rewrite.HiddenEdit`:
the producer's (and every coupled depthwise conv's) output channels become
``row_map @ old`` (k × n: cluster means or a selection), the consumer's input
channel slices become ``old @ col_map`` (n × k: a cluster's slices summed).

:func:`materialize_convs` writes every ``changed`` :class:`ConvOp` back as one
``Conv`` node with the original node's name and attributes (``group`` updated
for depthwise convs), new initializers for kernel and bias, and the folded
``BatchNormalization`` removed; its output keeps the name of the op's last
tensor, so nothing downstream moves. Initializers nothing reads any more are
dropped, and value_info of tensors whose channel count changed is removed (it
would be stale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..find.conv import ConvChain, ConvGraph, ConvOp, GemmReader
from ..find.graph_index import node_key
from .graph import FreshNames, drop_unread, drop_value_info


@dataclass
class ChannelEdit:
    row_map: np.ndarray  # k × n
    col_map: np.ndarray  # n × k
    row_scale: np.ndarray | None = None  # k: merged producer channels scaled (Fold-AR / REPAIR)
    row_shift: np.ndarray | None = None  # k: added to the merged producer bias (REPAIR)
    consumer_weight: np.ndarray | None = None  # [out, k, *kernel]: replaces the summed consumer (LS refit)
    consumer_bias: np.ndarray | None = None


def merge_output_channels(op: ConvOp, row_map: np.ndarray, scale: np.ndarray | None = None,
                          shift: np.ndarray | None = None) -> None:
    """Output channels of ``op`` become ``row_map @ old`` (then ``·scale + shift``)."""
    R = np.asarray(row_map, dtype=np.float64)
    k = R.shape[0]
    w = (R @ op.rows()).reshape((k,) + op.weight.shape[1:])
    b = R @ op.bias_or_zero()
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b = b * s
    if shift is not None:
        b = b + np.asarray(shift, dtype=np.float64)
    op.weight, op.bias, op.changed = w, b, True


def merge_depthwise_channels(op: ConvOp, row_map: np.ndarray) -> None:
    """A depthwise conv's per-channel kernels and biases become ``row_map @ old``
    and its group count the new width (a bias-less one stays bias-less)."""
    R = np.asarray(row_map, dtype=np.float64)
    k = R.shape[0]
    op.weight = (R @ op.rows()).reshape((k,) + op.weight.shape[1:])
    op.bias = None if op.bias is None else R @ op.bias
    op.group = k
    op.changed = True


def sum_input_channels(op: ConvOp | GemmReader, col_map: np.ndarray) -> None:
    """Input channels (conv) or input features (Gemm) of ``op`` become ``old @ col_map``."""
    C = np.asarray(col_map, dtype=np.float64)
    if isinstance(op, GemmReader):
        op.weight = op.weight @ C
    else:
        op.weight = np.einsum("oi...,ik->ok...", op.weight, C)
    op.changed = True


def apply_channel_edit(chain: ConvChain, edit: ChannelEdit) -> None:
    """Edit the chain's ops in place (float64 view); marks them changed."""
    prod, cons = chain.producer, chain.consumer
    R, C = np.asarray(edit.row_map, dtype=np.float64), np.asarray(edit.col_map, dtype=np.float64)
    k = R.shape[0]
    if R.shape[1] != chain.width or C.shape != (chain.width, k):
        raise ValueError("row_map / col_map do not match the chain's width")
    merge_output_channels(prod, R, edit.row_scale, edit.row_shift)
    for m, _act in chain.mids:  # depthwise: same assignment on its per-channel kernels and biases
        merge_depthwise_channels(m, R)
    if edit.consumer_weight is not None:
        cons.weight = np.asarray(edit.consumer_weight, dtype=np.float64)
    else:  # sum the input-channel slices of each cluster: W[:, j] -> Σ_j W[:, j] C[j, c]
        sum_input_channels(cons, C)
    if edit.consumer_bias is not None:
        cons.bias = np.asarray(edit.consumer_bias, dtype=np.float64)
    cons.changed = True


def _emit(node: onnx.NodeProto, op: ConvOp, used: FreshNames, inits: list) -> onnx.NodeProto:
    base = op.name.replace("/", "_")
    w_name = used(f"{base}.onnxfold.W")
    inits.append(numpy_helper.from_array(np.ascontiguousarray(op.weight.astype(op.dtype)), w_name))
    inputs = [op.input, w_name]
    if op.bias is not None:
        b_name = used(f"{base}.onnxfold.B")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(op.bias.astype(op.dtype)), b_name))
        inputs.append(b_name)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs["group"] = int(op.group)
    if "kernel_shape" in attrs:
        attrs["kernel_shape"] = list(op.weight.shape[2:])
    out = helper.make_node("Conv", inputs, [op.output], name=node.name, domain=node.domain or None, **attrs)
    if node.doc_string:
        out.doc_string = node.doc_string
    return out


def _emit_gemm(node: onnx.NodeProto, g: GemmReader, used: FreshNames, inits: list) -> onnx.NodeProto:
    base = g.name.replace("/", "_")
    W = g.weight / g.alpha
    B = W if g.trans_b else W.T
    b_name = used(f"{base}.onnxfold.B")
    inits.append(numpy_helper.from_array(np.ascontiguousarray(B.astype(g.dtype)), b_name))
    inputs = [node.input[0], b_name]
    if g.bias is not None:
        c_name = used(f"{base}.onnxfold.C")
        c = g.bias / g.beta
        shape = g.bias_shape if len(g.bias_shape) and int(np.prod(g.bias_shape)) == c.size else (c.size,)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(c.reshape(shape).astype(g.dtype)), c_name))
        inputs.append(c_name)
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.input[:]
    out.input.extend(inputs)
    return out


def materialize_convs(model: onnx.ModelProto, view: ConvGraph, stale: set[str] | None = None) -> onnx.ModelProto:
    """A new model with every changed op of ``view`` written back (the input is not modified).

    ``stale``: further tensor names whose value_info must go (channel count changed)."""
    changed = {name: op for name, op in view.ops.items() if op.changed}
    gemms = {name: g for name, g in view.gemms.items() if g.changed}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not changed and not gemms:
        return out
    g = out.graph
    used = FreshNames(g)
    drop_nodes = {n for op in changed.values() for n in op.nodes[1:]}
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    old_inputs: set[str] = set()
    for i, node in enumerate(g.node):
        key = node_key(node, i)
        if key in drop_nodes:
            old_inputs.update(t for t in node.input if t)
            continue
        if key in changed:
            old_inputs.update(t for t in node.input if t)
            if node.output[0] != changed[key].output:  # BN folded: the raw conv output is gone
                stale = set(stale or ()) | {node.output[0]}
            nodes.append(_emit(node, changed[key], used, inits))
            continue
        if key in gemms:
            old_inputs.update(t for t in node.input if t)
            nodes.append(_emit_gemm(node, gemms[key], used, inits))
            continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    drop_unread(g, among=old_inputs)  # what the replaced nodes read and nothing else does (subgraphs too)
    return _finish(out, view, stale)


def _finish(out: onnx.ModelProto, view: ConvGraph, stale: set[str] | None) -> onnx.ModelProto:
    g = out.graph
    stale = set(stale or ())
    for chain in view.chains:
        if chain.producer.changed:
            stale.update(chain.tensors())
    for op in view.ops.values():
        if op.changed:
            stale.add(op.output)
    for grp in view.residual:  # a folded stream: every tensor on it, and the pooled features
        if any(view.ops[p].changed for p in grp.producers if p in view.ops) and grp.foldable:
            stale.update(grp.tensors)
    for gemm in view.gemms.values():
        if gemm.changed:
            stale.update(gemm.path_tensors)
    drop_value_info(g, stale)
    return out
