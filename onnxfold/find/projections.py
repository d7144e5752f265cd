"""Projections: the constant-weight linear layers of transformer blocks.

A projection is ``MatMul(x, B)`` with a constant 2-D ``B`` and an optional
constant bias ``Add``, or a ``Gemm(x, B, C)`` (alpha = beta = 1, transA = 0).
Its weight is viewed as ``W`` = out × in, as ``DenseOp`` does. A Gemm with
transB = 1 stores ``W`` itself rather than ``Bᵀ``: it is found, and marked
(``stored_out_in``) because the head and gated rewrites write ``Bᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .chains import FLOAT_TYPES
from .graph_index import GraphIndex
from .weights import LazyWeight, constant_loader


class Projection(LazyWeight):
    """A MatMul (or Gemm) with a constant 2-D weight and an optional constant bias.

    ``weight`` is out × in (``Bᵀ``), read on first use and kept in float32
    (float64 for float64 models); ``bias`` float64. ``weight_input`` /
    ``bias_input`` are the tensors the rewrite replaces (input 1 of
    ``node``, input ``bias_slot`` of ``bias_node``: an Add, or the Gemm
    itself with its C at slot 2)."""

    weight_rank = 2

    def __init__(self, node: str, input: str, output: str, weight_input: str, weight: np.ndarray | None = None,
                 dtype=np.float32, bias_node: str | None = None, bias_input: str | None = None, bias_slot: int = 1,
                 bias: np.ndarray | None = None, *, weight_loader: Callable[[], np.ndarray] | None = None,
                 weight_shape: tuple[int, int] | None = None, op_type: str = "MatMul", stored_out_in: bool = False):
        self.node = node
        self.input = input
        self.output = output  # after the bias Add when there is one
        self.weight_input = weight_input
        self.dtype = np.dtype(dtype)
        self.bias_node = bias_node
        self.bias_input = bias_input
        self.bias_slot = bias_slot
        self.bias = bias
        self.op_type = op_type
        self.stored_out_in = stored_out_in  # Gemm transB=1: the constant is W, not Bᵀ
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
        return list(dict.fromkeys([self.node] + ([self.bias_node] if self.bias_node else [])))


def _bias(ix: GraphIndex, name: str, width: int) -> np.ndarray | None:
    """A constant bias of ``width`` elements (checked before reading: a big constant is no bias)."""
    meta = ix.const_meta(name)
    if meta is None or int(np.prod(meta[0])) != width or len(meta[0]) > 1 and meta[0][-1] != width:
        return None
    return np.asarray(ix.const(name)).reshape(-1).astype(np.float64)


def _gemm(ix: GraphIndex, p: onnx.NodeProto, tensor: str) -> Projection | None:
    if ix.is_const(p.input[0]) or not ix.is_const(p.input[1]) or ix.attr(p, "transA", 0) \
            or ix.attr(p, "alpha", 1.0) != 1.0 or ix.attr(p, "beta", 1.0) != 1.0:
        return None
    meta = ix.const_meta(p.input[1])
    if meta is None or len(meta[0]) != 2 or meta[1].type not in FLOAT_TYPES:
        return None
    trans_b = bool(ix.attr(p, "transB", 0))
    shape = tuple(meta[0]) if trans_b else tuple(meta[0][::-1])
    bias, bias_input = None, None
    if len(p.input) > 2 and p.input[2]:
        bias_input = p.input[2]
        bias = _bias(ix, bias_input, shape[0])
        if bias is None:
            return None
    loader = constant_loader(ix, p.input[1], None if trans_b else np.transpose)
    return Projection(node=p.name, input=p.input[0], output=tensor, weight_input=p.input[1], dtype=meta[1],
                      bias_node=p.name if bias_input else None, bias_input=bias_input, bias_slot=2, bias=bias,
                      weight_loader=loader, weight_shape=shape, op_type="Gemm", stored_out_in=trans_b)


def projection_at(ix: GraphIndex, tensor: str) -> Projection | None:
    """The projection whose (biased) output is ``tensor``, else None."""
    p = ix.producer.get(tensor)
    if p is None:
        return None
    if p.op_type == "Gemm":
        return _gemm(ix, p, tensor)
    bias_node, bias_input, bias_slot = None, None, 1
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
    bias = None
    if bias_input is not None:
        bias = _bias(ix, bias_input, shape[0])
        if bias is None:
            return None
    return Projection(node=p.name, input=p.input[0], output=tensor, weight_input=p.input[1], dtype=meta[1],
                      bias_node=bias_node, bias_input=bias_input, bias_slot=bias_slot, bias=bias,
                      weight_loader=constant_loader(ix, p.input[1], np.transpose), weight_shape=shape)
