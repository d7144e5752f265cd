"""Channel edits on the conv view, and writing the edited convs back to ONNX.

:class:`ChannelEdit` is the conv counterpart of :class:`~onnxfold.rewrite.HiddenEdit`:
the producer's (and every coupled depthwise conv's) output channels become
``row_map @ old`` (k × n: cluster means or a selection), the consumer's input
channel slices become ``old @ col_map`` (n × k: a cluster's slices summed).

:func:`materialize_convs` writes every ``changed`` :class:`ConvOp` back into
its own ``Conv`` node (name and attributes kept, ``group`` updated for
depthwise convs) with new initializers for kernel and bias, and the folded
``BatchNormalization`` removed; its output keeps the name of the op's last
tensor, so nothing downstream moves. The editor
(:class:`~onnxfold.rewrite.editor.GraphEditor`) drops what nothing reads any
more; value_info of tensors whose channel count changed is removed (it would
be stale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..find.conv import ConvChain, ConvGraph, ConvOp, GemmReader
from .editor import GraphEditor


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


def _write_conv(ed: GraphEditor, op: ConvOp) -> None:
    """The op's Conv node reads the new kernel (and bias) and writes the op's
    output; a folded BatchNormalization node goes."""
    conv = ed.node(op.name)
    base = op.name.replace("/", "_")
    inputs = [ed.tensor(op.input),
              ed.initializer(f"{base}.onnxfold.W", np.ascontiguousarray(op.weight.astype(op.dtype)))]
    if op.bias is not None:
        inputs.append(ed.initializer(f"{base}.onnxfold.B", np.ascontiguousarray(op.bias.astype(op.dtype))))
    for name in op.nodes[1:]:
        ed.remove(ed.node(name))
    ed.set_inputs(conv, inputs)
    ed.set_output(conv, 0, ed.tensor(op.output))
    ed.set_attr(conv, "group", int(op.group))
    if "kernel_shape" in conv.attrs:
        ed.set_attr(conv, "kernel_shape", [int(k) for k in op.weight.shape[2:]])


def _write_gemm(ed: GraphEditor, g: GemmReader) -> None:
    """The Gemm reads its new B (and C) in the layout its attributes expect."""
    node = ed.node(g.name)
    base = g.name.replace("/", "_")
    W = g.weight / g.alpha
    B = W if g.trans_b else W.T
    inputs = [node.inputs[0], ed.initializer(f"{base}.onnxfold.B", np.ascontiguousarray(B.astype(g.dtype)))]
    if g.bias is not None:
        c = g.bias / g.beta
        shape = g.bias_shape if len(g.bias_shape) and int(np.prod(g.bias_shape)) == c.size else (c.size,)
        inputs.append(ed.initializer(f"{base}.onnxfold.C", np.ascontiguousarray(c.reshape(shape).astype(g.dtype))))
    ed.set_inputs(node, inputs)


def materialize_convs(model: onnx.ModelProto, view: ConvGraph, stale: set[str] | None = None) -> onnx.ModelProto:
    """A new model with every changed op of ``view`` written back (the input is not modified).

    ``stale``: further tensor names whose value_info must go (channel count changed)."""
    ed = GraphEditor(model)
    stale = set(stale or ())
    for op in view.ops.values():
        if op.changed:
            raw = ed.node(op.name).outputs[0].name
            if raw != op.output:  # BN folded: the raw conv output is gone
                stale.add(raw)
            _write_conv(ed, op)
    for g in view.gemms.values():
        if g.changed:
            _write_gemm(ed, g)
    ed.forget_shapes(stale | _stale_tensors(view))
    return ed.to_model()


def _stale_tensors(view: ConvGraph) -> set[str]:
    """Tensors whose channel count an edit of ``view`` changed."""
    stale = set()
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
    return stale
