"""One graph editor for every materializer, built on onnx-graphsurgeon.

:class:`GraphEditor` imports a model with ``gs.import_onnx`` and lets a
materializer swap node inputs, add initializers and nodes and remove nodes on
the gs graph; :meth:`GraphEditor.to_model` then drops what nothing reads any
more (``Graph.cleanup``), restores a topological order where an edit broke it
(``Graph.toposort``) and exports with ``gs.export_onnx``. The input model is
never modified and never copied as a whole.

Where gs's export alone would be lossy or costly, ``to_model`` patches its
result, each for a measured reason (docs/graph_editor.md):

- Weights. ``export_onnx`` copies every initializer twice (``make_graph``
  extends a list, ``make_model`` copies the graph), and gs would read a new
  weight's array into a second array first. So every Constant is exported as
  a data-less stub, and the data is written once afterwards: an untouched
  initializer is copied from the input model (a deferred one stays an
  external-data stub, its file unread), a new one is converted to bytes and
  its array released before the bytes go into the proto.
- Nodes of the input model. gs rebuilds a node from its attribute dict: doc
  strings and metadata are lost, an empty list attribute cannot be exported,
  and an If/Loop/Scan body gets a copy of every outer initializer it reads.
  So an original node is written as its own NodeProto with the current inputs
  and outputs (and any attribute set through :meth:`set_attr`).
- Subgraph reads. gs counts a Constant read inside a body as the body's own,
  so an outer initializer only a body reads would vanish from the main graph.
  The main graph keeps every initializer its kept bodies read.
- Interface. Graph inputs and outputs, functions and model fields are the
  input model's (initializers old exporters list as inputs leave the inputs
  with the initializer).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from ..find.graph_index import node_key

# what gs's export writes into the GraphProto; every other field is the input's
_EXPORTED_GRAPH_FIELDS = {"node", "initializer", "sparse_initializer", "value_info", "input", "output"}


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (a subgraph) reads that it does not define itself."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        defined.update(n.output)
    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(t for t in n.input if t)
        for sub in _subgraphs(n):
            read |= outer_reads(sub)
    return read - defined


def _body_reads(node: onnx.NodeProto) -> set[str]:
    """Outer names the bodies of one If/Loop/Scan node read."""
    read: set[str] = set()
    for sub in _subgraphs(node):
        read |= outer_reads(sub)
    return read


def _names_in(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor and node name of ``graph`` and of its subgraphs."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        yield v.name
    for t in graph.initializer:
        yield t.name
    for t in graph.sparse_initializer:
        yield t.values.name
    for n in graph.node:
        yield n.name
        yield from n.input
        yield from n.output
        for sub in _subgraphs(n):
            yield from _names_in(sub)


def _silent():
    """gs logs to stdout, its errors too; they reach the user as exceptions."""
    return G_LOGGER.suppress(G_LOGGER.CRITICAL + 1)


def _stub(name: str, data_type: int, dims: Iterable[int]) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(int(d) for d in dims)
    return t


class GraphEditor:
    """Edits of one model's main graph, written out by :meth:`to_model` (once)."""

    def __init__(self, model: onnx.ModelProto):
        self.source = model
        with _silent():
            self.graph = gs.import_onnx(model)
        self.graph.functions = []  # never edited: written back from the input model
        # gs imports nodes in graph order: each original node keeps its NodeProto
        # (the node itself is held too, so its id is never reused by a new node)
        self._origin: dict[int, tuple[gs.Node, onnx.NodeProto]] = {}
        self._attrs_set: dict[int, dict[str, object]] = {}
        self._nodes: dict[str, gs.Node] = {}
        for i, (node, proto) in enumerate(zip(self.graph.nodes, model.graph.node)):
            node.name = node_key(proto, i)  # unnamed nodes keep the name find knew them by
            self._origin[id(node)] = (node, proto)
            self._nodes[node.name] = node
        self._tensors = dict(self.graph.tensors())
        self._source_init = {t.name: t for t in model.graph.initializer}
        self._used = set(_names_in(model.graph)) | set(self._nodes)
        self._new_data: dict[str, tuple[np.ndarray, np.dtype]] = {}
        self._stub_source_constants()
        self._done = False

    def _stub_source_constants(self) -> None:
        """Export stubs instead of the input's initializers (see the module docstring)."""
        for t in self._tensors.values():
            src = self._source_init.get(t.name)
            if isinstance(t, gs.Constant) and src is not None:
                t.values = LazyValues(_stub(src.name, src.data_type, src.dims))

    # ------------------------------------------------------------------ lookups
    def fresh(self, base: str) -> str:
        """A name no tensor or node uses, in the main graph or any subgraph."""
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name

    def node(self, key: str) -> gs.Node:
        """A node by the name find knows it by (see ``find.graph_index.node_key``)."""
        try:
            return self._nodes[key]
        except KeyError:
            raise ValueError(f"node {key!r} is not in the graph") from None

    def has_node(self, key: str) -> bool:
        return key in self._nodes

    def tensor(self, name: str) -> gs.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not in the graph") from None

    def position(self, node: gs.Node) -> int:
        return next(i for i, n in enumerate(self.graph.nodes) if n is node)

    # ------------------------------------------------------------------ edits
    def initializer(self, base: str, values: np.ndarray, dtype=None) -> gs.Constant:
        """A new initializer named after ``base``, holding ``values`` as ``dtype``.
        The array is held, not copied, until :meth:`to_model` writes it."""
        arr = np.asarray(values)
        dt = np.dtype(dtype if dtype is not None else arr.dtype)
        name = self.fresh(base)
        t = gs.Constant(name, LazyValues(_stub(name, helper.np_dtype_to_tensor_dtype(dt), arr.shape)))
        self._new_data[name] = (arr, dt)
        self._tensors[name] = t
        return t

    def variable(self, base: str) -> gs.Variable:
        """A new intermediate tensor named after ``base``."""
        t = gs.Variable(self.fresh(base))
        self._tensors[t.name] = t
        return t

    def add_node(self, op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], *, name: str,
                 attrs: dict | None = None, domain: str | None = None, before: gs.Node | None = None,
                 after: gs.Node | None = None) -> gs.Node:
        """A new node placed before/after an anchor (else last). ``name`` is used as given."""
        node = gs.Node(op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=list(outputs),
                       domain=domain)
        nodes = self.graph.nodes
        if before is not None:
            nodes.insert(self.position(before), node)
        elif after is not None:
            nodes.insert(self.position(after) + 1, node)
        else:
            nodes.append(node)
        self._nodes[name] = node
        self._used.add(name)
        return node

    def remove(self, node: gs.Node) -> None:
        """Take ``node`` out; its outputs lose their producer (a new node may take them)."""
        i = self.position(node)
        node.inputs.clear()
        node.outputs.clear()
        del self.graph.nodes[i]
        if self._nodes.get(node.name) is node:
            del self._nodes[node.name]

    def set_input(self, node: gs.Node, slot: int, tensor: gs.Tensor) -> None:
        node.inputs[slot] = tensor

    def set_inputs(self, node: gs.Node, tensors: list[gs.Tensor]) -> None:
        node.inputs.clear()
        node.inputs.extend(tensors)

    def set_output(self, node: gs.Node, slot: int, tensor: gs.Tensor) -> None:
        node.outputs[slot] = tensor

    def set_attr(self, node: gs.Node, name: str, value) -> None:
        node.attrs[name] = value
        if id(node) in self._origin:
            self._attrs_set.setdefault(id(node), {})[name] = value

    def forget_shapes(self, names: Iterable[str]) -> None:
        """Drop the shape hints (value_info) of tensors whose shape changed."""
        for name in names:
            t = self._tensors.get(name)
            if isinstance(t, gs.Variable):
                t.dtype, t.shape = None, None

    # ------------------------------------------------------------------ output
    def to_model(self) -> onnx.ModelProto:
        """The edited model: unused nodes and initializers dropped, nodes in
        topological order (the input's order where it still holds)."""
        if self._done:
            raise RuntimeError("GraphEditor.to_model can be called once")
        self._done = True
        g = self.graph
        with _silent():
            g.cleanup(recurse_subgraphs=False, recurse_functions=False)
            if not self._in_order():
                self._toposort()
            # an original node is written from its NodeProto: gs need not export its
            # attributes (nor the bodies in them, nor the attribute tensors, whose
            # names gs's export would set on the input model's protos)
            originals = [(node, node.attrs) for node in g.nodes if id(node) in self._origin]
            for node, _ in originals:
                node.attrs = {}
            try:
                out = gs.export_onnx(g, do_type_check=False)
            finally:
                for node, attrs in originals:
                    node.attrs = attrs
        if len(out.graph.node) != len(g.nodes):
            raise RuntimeError("graphsurgeon exported a different number of nodes")
        self._write_original_nodes(out.graph)
        self._write_initializers(out.graph)
        self._copy_interface(out)
        return out

    def _reads(self, node: gs.Node) -> Iterator[str]:
        yield from (t.name for t in node.inputs if t.name)
        origin = self._origin.get(id(node))
        if origin is not None:
            yield from _body_reads(origin[1])

    def _in_order(self) -> bool:
        produced: dict[str, int] = {}
        for i, node in enumerate(self.graph.nodes):
            for t in node.outputs:
                produced.setdefault(t.name, i)
        return all(produced.get(name, -1) < i for i, node in enumerate(self.graph.nodes) for name in self._reads(node))

    def _toposort(self) -> None:
        # gs sorts recursively, one call level per node of the longest path
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * len(self.graph.nodes) + 1000))
        try:
            self.graph.toposort(recurse_subgraphs=False, recurse_functions=False, mode="nodes")
        except gs.OnnxGraphSurgeonException:
            raise RuntimeError("graph has a cycle after rewrite") from None
        finally:
            sys.setrecursionlimit(limit)

    def _write_original_nodes(self, graph: onnx.GraphProto) -> None:
        for node, proto in zip(self.graph.nodes, graph.node):
            origin = self._origin.get(id(node))
            if origin is None:
                continue
            inputs, outputs = list(proto.input), list(proto.output)
            proto.CopyFrom(origin[1])
            proto.name = node.name
            del proto.input[:]
            proto.input.extend(inputs)
            del proto.output[:]
            proto.output.extend(outputs)
            for name, value in self._attrs_set.get(id(node), {}).items():
                attr = helper.make_attribute(name, value)
                at = next((i for i, a in enumerate(proto.attribute) if a.name == name), None)
                if at is None:
                    proto.attribute.append(attr)
                else:
                    proto.attribute[at].CopyFrom(attr)

    def _write_initializers(self, graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            if t.name in self._new_data:
                arr, dt = self._new_data.pop(t.name)
                data = arr.astype(dt.newbyteorder("<"), copy=False).tobytes()  # C order, also for views
                del arr  # held at most twice: array + bytes, then bytes + proto
                t.raw_data = data
                del data
            elif t.name in self._source_init:
                t.CopyFrom(self._source_init[t.name])
        have = {t.name for t in graph.initializer}
        for name in sorted(set().union(*map(_body_reads, graph.node)) - have):
            if name in self._source_init:
                graph.initializer.add().CopyFrom(self._source_init[name])

    def _copy_interface(self, out: onnx.ModelProto) -> None:
        src = self.source
        for fd in onnx.ModelProto.DESCRIPTOR.fields:
            if fd.name != "graph":
                out.ClearField(fd.name)
        for fd, value in src.ListFields():
            if fd.name != "graph":
                _copy_field(out, fd, value)
        g, sg = out.graph, src.graph
        for fd in onnx.GraphProto.DESCRIPTOR.fields:
            if fd.name not in _EXPORTED_GRAPH_FIELDS:
                g.ClearField(fd.name)
        for fd, value in sg.ListFields():
            if fd.name not in _EXPORTED_GRAPH_FIELDS:
                _copy_field(g, fd, value)
        kept = {t.name for t in g.initializer}
        del g.input[:]
        g.input.extend(v for v in sg.input if v.name not in self._source_init or v.name in kept)
        del g.output[:]
        g.output.extend(sg.output)


def _copy_field(dst, fd, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(dst, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)
