"""Graph-editing primitives every rewrite shares.

Fresh names, the names a graph reads (the bodies of If / Loop / Scan nodes
read outer names implicitly, so they count), a stable topological order, and
removal of Constant nodes, initializers and initializer-backed inputs that
nothing reads any more. The materializers of dense layers, conv channels and
attention heads all clean up through ``drop_unread``, so a weight that only a
subgraph reads is never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

_GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
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


def node_reads(node: onnx.NodeProto) -> set[str]:
    """What one node reads: its inputs and whatever its subgraphs read from outside."""
    read = {t for t in node.input if t}
    for sub in _subgraphs(node):
        read |= outer_reads(sub)
    return read


def names_read(nodes: Iterable[onnx.NodeProto], outputs: Iterable[onnx.ValueInfoProto]) -> set[str]:
    read = {o.name for o in outputs}
    for n in nodes:
        read |= node_reads(n)
    return read


class FreshNames:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {n.name for n in graph.node}
        for n in graph.node:
            self.used.update(n.input)
            self.used.update(n.output)
        self.used.update(t.name for t in graph.initializer)
        self.used.update(i.name for i in graph.input)
        self.used.update(o.name for o in graph.output)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable topological order (keeps the given order where it is valid).
    A subgraph's outer reads count as inputs of its node."""
    produced_by = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = i
    order, avail = [], set(available)
    reads = [node_reads(n) for n in nodes]
    pending = list(range(len(nodes)))
    while pending:
        progressed, rest = False, []
        for i in pending:
            if all(t in avail or t not in produced_by for t in reads[i]):
                order.append(nodes[i])
                avail.update(nodes[i].output)
                progressed = True
            else:
                rest.append(i)
        if not progressed:
            raise RuntimeError("graph has a cycle after rewrite")
        pending = rest
    return order


def drop_unread(graph: onnx.GraphProto, among: set[str] | None = None) -> set[str]:
    """Remove, in place, Constant nodes, initializers and initializer-backed
    graph inputs that nothing reads (subgraphs included); with ``among``, only
    those names (what a rewrite replaced). Returns the names dropped. Edits
    the repeated fields in place: no copy of the kept weights."""
    read = names_read(graph.node, graph.output)
    if among is not None:
        read |= {n for n in _all_names(graph) if n not in among}
    dead_constants = [i for i, n in enumerate(graph.node)
                      if n.op_type == "Constant" and not any(o in read for o in n.output)]
    dropped = {graph.node[i].output[0] for i in dead_constants}
    for i in reversed(dead_constants):
        del graph.node[i]
    # a Constant's removal frees nothing else (it reads nothing), so one sweep suffices
    dead_inits = [i for i, t in enumerate(graph.initializer) if t.name not in read]
    dropped.update(graph.initializer[i].name for i in dead_inits)
    for i in reversed(dead_inits):
        del graph.initializer[i]
    # initializers also listed as graph inputs (old exporters) leave the inputs with them
    dead_inputs = [i for i, v in enumerate(graph.input) if v.name in dropped]
    for i in reversed(dead_inputs):
        del graph.input[i]
    return dropped


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for n in graph.node:
        names.update(n.output)
    return names


def drop_value_info(graph: onnx.GraphProto, stale: set[str]) -> None:
    """Forget shape hints that are no longer true (a width changed)."""
    keep = [v for v in graph.value_info if v.name not in stale]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
