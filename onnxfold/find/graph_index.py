"""Read-only lookups over one ONNX graph: who produces / consumes a tensor,
which tensors are constants. Everything in ``find`` is built on this."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..tensors import numpy_dtype, tensor_array, tensor_shape

#: constants up to this size are cached; bigger ones (weights) are read on
#: each call, so that an index never holds a model's weights
CACHE_MAX_BYTES = 2**20


def node_key(node: onnx.NodeProto, index: int) -> str:
    """The name find and materialize use for the ``index``-th node of a graph:
    its own, or a positional one when it has none."""
    return node.name or f"{node.op_type}_{index}"


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.graph = g
        self.nodes = list(g.node)
        self.node_by_name: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            if not n.name:  # index a named copy: the caller's model is never modified
                named = onnx.NodeProto()
                named.CopyFrom(n)
                named.name = node_key(n, i)
                n = self.nodes[i] = named
            self.node_by_name[n.name] = n
            for o in n.output:
                if o:
                    self.producer[o] = n
            for t in n.input:
                if t:
                    self.consumers[t].append(n)
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input} - set(self.initializers)
        self.graph_outputs = {o.name for o in g.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._const_cache: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple] | None = None  # declared shapes, read on first use

    # constants -----------------------------------------------------------
    def is_const(self, name: str) -> bool:
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None."""
        if name in self._const_cache:
            return self._const_cache[name]
        val = None
        if name in self.initializers:
            val = tensor_array(self.initializers[name])
        else:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant":
                for a in p.attribute:
                    if a.name == "value":
                        val = numpy_helper.to_array(a.t)
                    elif a.name == "value_float":
                        val = np.array(a.f, dtype=np.float32)
                    elif a.name == "value_floats":
                        val = np.array(list(a.floats), dtype=np.float32)
                    elif a.name == "value_int":
                        val = np.array(a.i, dtype=np.int64)
                    elif a.name == "value_ints":
                        val = np.array(list(a.ints), dtype=np.int64)
        if val is not None and val.nbytes <= CACHE_MAX_BYTES:
            self._const_cache[name] = val
        return val

    def const_meta(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """(shape, dtype) of a constant without reading its data, else None."""
        t = self.initializers.get(name)
        if t is None:
            p = self.producer.get(name)
            if p is None or p.op_type != "Constant":
                return None
            t = next((a.t for a in p.attribute if a.name == "value" and a.HasField("t")), None)
            if t is None:  # value_float(s)/value_int(s): tiny
                v = self.const(name)
                return None if v is None else (v.shape, v.dtype)
        try:
            return tensor_shape(t), numpy_dtype(t)
        except (KeyError, ValueError, TypeError):
            return None

    def const_source_nodes(self, name: str) -> list[str]:
        """Nodes to delete with a constant if nothing else uses it."""
        p = self.producer.get(name)
        if p is None or p.op_type != "Constant" or len(self.consumers.get(name, [])) != 1 \
                or name in self.graph_outputs:
            return []
        return [p.name]

    # structure -----------------------------------------------------------
    def single_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The only consumer of ``tensor`` if it has exactly one and is not a graph output."""
        cs = self.consumers.get(tensor, [])
        if len(cs) != 1 or tensor in self.graph_outputs:
            return None
        return cs[0]

    def passthrough_output(self, node: onnx.NodeProto) -> str | None:
        """The output of ``node`` if it is a no-op at inference - Identity, or
        Dropout not in training mode whose mask nobody reads - else None."""
        if node.op_type == "Identity":
            return node.output[0]
        if node.op_type != "Dropout":
            return None
        if len(node.input) > 2 and node.input[2]:
            training = self.const(node.input[2])
            if training is None or np.asarray(training).reshape(-1)[:1].any():
                return None
        if len(node.output) > 1 and node.output[1] and (
                self.consumers.get(node.output[1]) or node.output[1] in self.graph_outputs):
            return None
        return node.output[0]

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def tensor_rank(self, name: str) -> int | None:
        shape = self.tensor_shape(name)
        return None if shape is None else len(shape)

    def tensor_shape(self, name: str) -> tuple[int | str | None, ...] | None:
        """The shape the model declares for ``name`` (graph inputs, outputs,
        value_info): a size, a symbolic name or None per axis; None if not declared."""
        if self._shapes is None:
            self._shapes = {}
            for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    self._shapes[vi.name] = tuple(
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in vi.type.tensor_type.shape.dim)
        return self._shapes.get(name)
