"""Suffix runs: a model streamed from tensors an earlier run already computed.

A pass refits its layers one after another, and each refit streams the
calibration data through the model as the refits before it left it: layer i
of a deep model is measured by running layers 0..i again, so the runs of one
pass cost the square of the depth. Yet the model measured for layer i differs
from the one measured for layer i-1 only in what the refit of layer i-1
changed. A tensor computed the same way in both models - by equal nodes, from
equal weights, from tensors computed the same way, back to the graph inputs -
has the same value on the same data (:func:`same_tensors`). So a run records
its *frontier* (the tensors it computed that nodes it did not run read: the
residual stream, the layer's input, a mask every block reads), and the next
run of the same data starts from the recorded tensors it shares, running only
the nodes after them (:func:`suffix_part`).

:class:`TensorMemo` holds a few such recordings (least recently used dropped
first, bounded in bytes) and plans each stream: the recording that leaves the
fewest nodes to run, or none. It is keyed like :class:`~.jobs.StreamMemo`: the
same data object, batch size, providers and first sample, so a recorded batch
is exactly the batch a fresh run would see.

The values are those of a full run up to floating-point rounding:
onnxruntime fuses some nodes across a tensor that is a graph output in one
run and internal in another (an Add into the LayerNormalization after it, say),
and a fused kernel may round differently.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..io.sizes import data_nbytes
from .stream import empty_part, needed_nodes, needed_part

__all__ = ["same_tensors", "cut_tensors", "suffix_part", "SuffixPlan", "TensorMemo", "TENSOR_MEMO_BYTES"]

#: what a :class:`TensorMemo` holds by default, all recordings together
TENSOR_MEMO_BYTES = 1 << 30
#: recordings a :class:`TensorMemo` keeps (each holds the part of the model it was recorded from)
TENSOR_MEMO_RECORDINGS = 8


#: ops whose output differs from run to run: never taken from a recording
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "Dropout"}


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def same_tensors(model: onnx.ModelProto, reference: onnx.ModelProto) -> set[str]:
    """Names of the tensors ``model`` computes exactly as ``reference`` does:
    graph inputs of both; initializers equal in both; outputs of a node equal
    in both (op, attributes, names, inputs) whose inputs are all such tensors,
    unless the op is random (Dropout included: training mode is an input).
    Their values are the same on the same data. Graphs with subgraphs (If,
    Loop, Scan read outer names implicitly) share nothing."""
    same, equal_initializer = _computed_alike(model, reference)
    same.update(t.name for t in model.graph.initializer if equal_initializer(t.name))
    return same


def _computed_alike(model: onnx.ModelProto, reference: onnx.ModelProto):
    """(:func:`same_tensors` less the initializers, the initializer test it
    used). An initializer is compared only when a node equal to the
    reference's reads it: the tensors downstream of the first change, often
    most of a model's weights, are never compared (what a suffix plan asks)."""
    if _has_subgraphs(model) or _has_subgraphs(reference):
        return set(), lambda _name: False
    rg, g = reference.graph, model.graph
    ref_inits = {t.name: t for t in rg.initializer}
    ref_inputs = {i.name for i in rg.input if i.name not in ref_inits}
    inits = {t.name: t for t in g.initializer}
    same = {i.name for i in g.input if i.name not in inits and i.name in ref_inputs}
    overridable: set[str] = set()
    if any(i.name in inits for i in g.input):  # an initializer a caller may override: not a constant
        overridable = {i.name for i in g.input}
        same.difference_update(overridable)
    compared: dict[str, bool] = {}

    def equal_initializer(name: str) -> bool:
        if name not in compared:
            compared[name] = (name in inits and name not in overridable and name in ref_inits
                              and inits[name] == ref_inits[name])
        return compared[name]

    ref_nodes = {tuple(n.output): n for n in rg.node}
    for node in g.node:
        ref = ref_nodes.get(tuple(node.output))
        if ref is not None and node.op_type not in _RANDOM_OPS and node == ref \
                and all(not i or i in same or equal_initializer(i) for i in node.input):
            same.update(o for o in node.output if o)
    same.discard("")
    return same, equal_initializer


def cut_tensors(model: onnx.ModelProto, reference: onnx.ModelProto) -> list[str]:
    """The tensors ``model`` computes as ``reference`` does (:func:`same_tensors`)
    that a node computing something else reads, or that are graph outputs:
    where ``model`` starts to differ. Graph inputs and initializers are not
    among them (every run has them)."""
    same = same_tensors(model, reference)
    computed = {o for n in model.graph.node for o in n.output if o in same}
    cut = [i for n in model.graph.node if not all(o in same for o in n.output if o) for i in n.input if i in computed]
    cut += [o.name for o in model.graph.output if o.name in computed]
    return list(dict.fromkeys(cut))


def suffix_part(model: onnx.ModelProto, outputs: Sequence[str], leaves: Mapping[str, np.dtype]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` when the tensors
    ``leaves`` (name → dtype) are given: those it reads, or that are asked
    for, become graph inputs (of unknown shape), and the nodes upstream of
    them are left out. Outputs are untyped (onnxruntime infers them); an
    output that is a leaf is a graph input already and not repeated."""
    g = model.graph
    nodes = needed_nodes(model, list(outputs), set(leaves))
    read = {i for n in nodes for i in n.input if i}
    out = empty_part(model)
    wanted = read | set(outputs)
    fed = {n: dt for n, dt in leaves.items() if n in wanted}
    out.graph.input.extend(i for i in g.input if i.name in wanted and i.name not in fed)
    out.graph.input.extend(onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)), None)
                           for n, dt in fed.items())
    out.graph.initializer.extend(t for t in g.initializer if t.name in wanted and t.name not in fed)
    out.graph.node.extend(nodes)
    produced = {o for n in nodes for o in n.output}
    out.graph.value_info.extend(v for v in g.value_info if v.name in produced and v.name not in outputs)
    given = set(fed) | {i.name for i in out.graph.input} | {t.name for t in out.graph.initializer}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(outputs) if n not in given)
    return out


@dataclass
class _Recording:
    """The recorded batches of some tensors of one run, and the part of the
    model that computed them (a copy: later edits of the model cannot change it)."""

    part: onnx.ModelProto
    batches: list[dict[str, np.ndarray]]
    dtypes: dict[str, np.dtype]
    nbytes: int


@dataclass
class SuffixPlan:
    """How to stream a model: run the nodes ``ran``, starting from ``leaves``
    (tensor names) of ``recording`` (None: a full run, of ``full_nodes`` nodes)."""

    recording: _Recording | None
    leaves: dict[str, np.dtype]
    ran: list[onnx.NodeProto]
    full_nodes: int

    @property
    def nodes(self) -> int:
        return len(self.ran)

    def leaf_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in ([] if self.recording is None else self.recording.batches):
            yield {n: batch[n] for n in self.leaves}


class TensorMemo:
    """Recorded frontiers of the runs of a search (module docstring)."""

    def __init__(self, max_bytes: int | None = None, max_recordings: int = TENSOR_MEMO_RECORDINGS):
        self.max_bytes = TENSOR_MEMO_BYTES if max_bytes is None else max_bytes
        self.max_recordings = max_recordings
        self.bytes = 0
        self.suffix_runs = 0  # streams that started from recorded tensors
        self.nodes_skipped = 0  # nodes those streams did not run
        self._recordings: list[tuple[Hashable, _Recording]] = []  # least recently used first
        self._data: dict[int, object] = {}  # keeps each keyed data object alive, so its id is not reused

    @staticmethod
    def usable(model: onnx.ModelProto, names: Sequence[str], part: bool = False) -> bool:
        """Whether a stream of ``names`` of ``model`` can be planned here: no
        subgraphs, and every graph output asked for (a suffix run yields only
        the tensors asked for, a full run the graph outputs too) unless the
        stream is of the part of ``model`` that computes ``names``."""
        return not _has_subgraphs(model) and (part or {o.name for o in model.graph.output} <= set(names))

    def key(self, data, batch_size: int, providers, first_sample: int) -> Hashable:
        self._data[id(data)] = data
        return id(data), batch_size, tuple(providers or ()), first_sample

    def plan(self, key: Hashable, model: onnx.ModelProto, names: Sequence[str]) -> SuffixPlan:
        """The cheapest way to stream ``names`` of ``model`` over the keyed data:
        from the recording that leaves the fewest nodes to run, or a full run."""
        ran = needed_nodes(model, names)
        best = full = SuffixPlan(None, {}, ran, len(ran))
        if _has_subgraphs(model):
            return best
        for k, rec in reversed(self._recordings):
            if k != key:
                continue
            shared, _ = _computed_alike(model, rec.part)  # recordings hold node outputs only
            leaves = {n: dt for n, dt in rec.dtypes.items() if n in shared}
            if not leaves:
                continue
            nodes = needed_nodes(model, names, set(leaves))
            # only the leaves the remaining nodes read (or that were asked for) are fed
            read = {i for n in nodes for i in n.input} | set(names)
            leaves = {n: dt for n, dt in leaves.items() if n in read}
            if len(nodes) < best.nodes:
                best = SuffixPlan(rec, leaves, nodes, full.full_nodes)
        if best.recording is not None:
            entry = next(e for e in self._recordings if e[1] is best.recording)
            self._recordings.remove(entry)
            self._recordings.append(entry)
            self.suffix_runs += 1
            self.nodes_skipped += best.full_nodes - best.nodes
        return best

    @staticmethod
    def frontier(model: onnx.ModelProto, names: Sequence[str], plan: SuffixPlan) -> list[str]:
        """What a run planned by ``plan`` should record: the tensors it asks
        for, and those it has (leaves, or outputs of the nodes it runs) that
        nodes it does not run read. Graph inputs and initializers are not
        recorded (every run has them)."""
        ran_ids = {id(n) for n in plan.ran}
        have = set(plan.leaves) | {o for n in plan.ran for o in n.output if o}
        read_later = {i for n in model.graph.node if id(n) not in ran_ids for i in n.input if i}
        return list(dict.fromkeys([*(n for n in names if n in have), *sorted(have & read_later)]))

    def record(self, key: Hashable, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> None:
        """Keep ``batches`` (per batch: tensor name → value) of a run of ``model``,
        with a copy of the part of ``model`` that computes them: both count
        against ``max_bytes``, and a recording over half of it is not kept."""
        if not batches or not batches[0]:
            return
        nbytes = sum(np.asarray(v).nbytes for b in batches for v in b.values())
        read = {i for n in needed_nodes(model, list(batches[0])) for i in n.input}
        # the weights copied, counted from their shapes: ByteSize would serialize each tensor again
        nbytes += sum(data_nbytes(t) for t in model.graph.initializer if t.name in read)
        if nbytes > self.max_bytes // 2:
            return
        dtypes = {n: np.asarray(v).dtype for n, v in batches[0].items()}
        for b in batches:
            for v in b.values():
                if isinstance(v, np.ndarray):
                    v.flags.writeable = False  # replayed later: an update must not change it in place
        self._recordings.append((key, _Recording(needed_part(model, dtypes), batches, dtypes, nbytes)))
        self.bytes += nbytes
        while len(self._recordings) > self.max_recordings or self.bytes > self.max_bytes:
            self.bytes -= self._recordings.pop(0)[1].nbytes
