"""Run a model batch by batch and expose intermediate tensors.

Nothing here accumulates across batches: :func:`stream_tensors` yields each
batch's tensors and forgets them, so memory stays bounded by one batch whatever
the number of samples. Accumulate statistics on top of it (see
:mod:`onnxfold.measure.stats`). :func:`run_model` is the exception: it
concatenates the model outputs and is meant for verification on small sets.

The library never prints; pass ``progress=callable(done_samples, total_samples)``
to follow long runs.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import onnx

from onnxfold.errors import CalibrationDataError
from onnxfold.io.sizes import data_nbytes, uses_external
from onnxfold.io.write import without_initializers
from onnxfold.measure.data import CalibrationSet, batch_samples
from onnxfold.profile import stage
from onnxfold.runtime import quiet_run_options, run_error_message, run_error_types
from onnxfold.tensors import tensor_array

__all__ = ["expose_outputs", "stream_tensors", "run_model"]

# Above this size shape inference (a full serialize/parse round trip) is not
# worth it just to learn output element types: exposed outputs stay untyped.
_INFER_LIMIT_BYTES = 256 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


#: model runs inside these stages belong to them, not to "calibration"
MEASURING_STAGES = ("verify", "latency")


def known_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types: dict[str, int] = {}
    for t in g.initializer:
        types[t.name] = t.data_type
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _produced(model: onnx.ModelProto) -> set[str]:
    return {o for node in model.graph.node for o in node.output if o}


def _check_names(model: onnx.ModelProto, tensor_names: Sequence[str]) -> None:
    g = model.graph
    known = _produced(model) | {vi.name for vi in g.input} | {t.name for t in g.initializer}
    missing = [n for n in tensor_names if n not in known]
    if missing:
        raise ValueError(f"tensor(s) {missing} are not produced by any top-level node of the graph")


def expose_outputs(model: onnx.ModelProto, tensor_names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensor_names``.

    Original outputs come first, then the new names in the given order (names
    that already are graph outputs are not repeated). Each new output gets the
    element type recorded in the model's value_info / inputs / outputs /
    initializers, else the one found by ONNX shape inference (models up to
    256 MiB), else no type at all: onnxruntime infers it, whereas a wrong
    guess such as FLOAT would make session creation fail on float16 models.
    Shapes are left unspecified.

    Cost: the copy is a protobuf ``CopyFrom`` of the whole model (one extra
    copy of every initializer held in the proto, done in C, about as fast as
    memcpy). For models over 2 GB, whose weights live in external data and are
    not loaded into the proto, the copy only covers the graph structure.
    The caller's model is never modified.
    """
    names = list(dict.fromkeys(tensor_names))
    _check_names(model, names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    new = [n for n in names if n not in existing]
    if not new:
        return out
    types = known_types(model)
    if any(n not in types for n in new):
        types.update({k: v for k, v in _inferred_types(model).items() if k not in types})
    for n in new:
        elem = types.get(n)
        if elem:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None))
        else:
            out.graph.output.append(onnx.ValueInfoProto(name=n))
    return out


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        if model.ByteSize() > _INFER_LIMIT_BYTES:
            return {}
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - custom ops, odd models: fall back to untyped outputs
        return {}
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in inferred.graph.value_info
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }


def _make_session(model: onnx.ModelProto, providers: list[str] | None, intra_op_threads: int | None = None):
    from onnxfold.runtime import create_session, resolve_provider

    if providers is None:
        providers, _notice = resolve_provider("auto")
    return create_session(model, providers, intra_op_threads=intra_op_threads)


def needed_nodes(model: onnx.ModelProto, outputs: Sequence[str], given: Collection[str] = ()) -> list[onnx.NodeProto]:
    """The nodes that compute ``outputs`` from the graph inputs, the
    initializers and the tensors ``given``, in graph order."""
    given = set(given)
    need, keep = {o for o in outputs if o not in given}, []
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i and i not in given)
    keep.reverse()
    return keep


def empty_part(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with ``model``'s versions, opsets, functions and graph name, and
    an empty graph: what a part of it is built into."""
    out = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, fld, getattr(model, fld))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = model.graph.name
    return out


def needed_part(model: onnx.ModelProto, outputs: Mapping[str, np.dtype]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (name → dtype), with
    exactly those as its typed graph outputs. Layer i of a deep model is then
    measured without running the layers after it (about half the work over a
    whole pass), and ``stream_tensors`` needs neither a copy to expose them
    nor shape inference to type them. Graphs with subgraphs (If, Loop, Scan:
    they read outer names implicitly) are returned whole."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model
    keep = needed_nodes(model, list(outputs))
    need = set(outputs) | {i for n in keep for i in n.input if i}
    out = empty_part(model)
    out.graph.input.extend(i for i in g.input if i.name in need)
    out.graph.initializer.extend(t for t in g.initializer if t.name in need)
    out.graph.node.extend(keep)
    out.graph.value_info.extend(v for v in g.value_info if v.name in need and v.name not in outputs)
    out.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)), None)
                            for name, dt in outputs.items())
    return out


_UNIQUE = itertools.count()


#: above this many bytes of weights held in memory a model is not digested
#: (hashing them would cost seconds per key, and protobuf cannot serialize the
#: model anyway): it gets a key of its own, equal to no other
DIGEST_LIMIT_BYTES = 2**31


def model_digest(model: onnx.ModelProto) -> str:
    """Content key of a model (or model part): a hash of its deterministic
    serialization taken in pieces - the model without its initializers, then
    each initializer, each piece with its length - so equal keys mean equal
    protobufs. Serializing the whole model first built one string of all its
    weights for nothing: this takes about half the time on a 90 MB encoder. A
    model with more than :data:`DIGEST_LIMIT_BYTES` of weights in memory, or
    one protobuf cannot serialize, gets a key of its own, equal to no other:
    nothing is shared, nothing is wrong."""
    inits = model.graph.initializer
    # counted from the tensors' shapes: reading raw_data would copy it
    if sum(data_nbytes(t) for t in inits if not uses_external(t)) > DIGEST_LIMIT_BYTES:
        return f"unserializable {next(_UNIQUE)}"
    h = hashlib.sha1()
    try:
        _hash_piece(h, without_initializers(model).SerializeToString(deterministic=True))
        for t in inits:
            _hash_piece(h, t.SerializeToString(deterministic=True))
    except Exception:  # noqa: BLE001 - protobuf's size limit (ValueError / EncodeError)
        return f"unserializable {next(_UNIQUE)}"
    return h.hexdigest()


def _hash_piece(h, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def stream_tensors(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    data: CalibrationSet,
    *,
    batch_size: int = 256,
    providers: list[str] | None = None,
    progress: ProgressFn | None = None,
    intra_op_threads: int | None = None,
    extra_feeds: Sequence[dict[str, np.ndarray]] | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]]:
    """Run ``model`` on ``data`` batch by batch, yielding ``(feed, labels, tensors)``.

    ``tensors`` maps every original graph output and every name in
    ``tensor_names`` to that batch's value (names that are graph inputs are
    taken from the feed, initializers are returned as constants). ``labels``
    is the batch's labels or ``None``. One onnxruntime session is built for
    the whole run on the model with the tensors exposed; ``providers=None``
    means ``onnxfold.runtime.resolve_provider("auto")`` (its notice is
    dropped - resolve providers yourself to show it). Batches follow
    :meth:`CalibrationSet.labeled_batches`, so a model with a fixed batch axis
    of 1 is run one sample at a time. Nothing is kept between batches.
    ``progress(done_samples, total_samples)`` is called after every batch.
    ``intra_op_threads``: onnxruntime's thread count (default: its own, all
    cores); a Ray worker sets the CPUs it reserved. ``extra_feeds``: per
    batch, more graph inputs than the data has (a suffix run's recorded
    tensors: :mod:`onnxfold.measure.suffix`); the yielded feed is the data's.
    """
    if not isinstance(data, CalibrationSet):
        raise TypeError("stream_tensors needs a CalibrationSet (use load_calibration)")
    names = list(dict.fromkeys(tensor_names))
    _check_names(model, names)
    g = model.graph
    input_names = {vi.name for vi in g.input}
    inits = {t.name: t for t in g.initializer}
    fed_names = set(data.input_names) | set(extra_feeds[0] if extra_feeds else ())
    from_feed = [n for n in names if n in input_names and (n not in inits or n in fed_names)]
    constants = {n: tensor_array(inits[n]) for n in names if n in inits and n not in from_feed}
    run_names = [n for n in names if n not in from_feed and n not in constants]

    existing = [o.name for o in g.output]
    exposed_model = model if all(n in existing for n in run_names) else expose_outputs(model, run_names)
    with stage("calibration", unless_in=MEASURING_STAGES):
        session = _make_session(exposed_model, providers, intra_op_threads)
    del exposed_model  # the session holds its own copy
    sess_inputs = {i.name for i in session.get_inputs()}
    missing = sorted(sess_inputs - fed_names)
    if missing:  # onnxruntime would raise a bare ValueError per batch; say which names do not match
        raise CalibrationDataError(
            f"the {data.what} data has no input {', '.join(repr(m) for m in missing)} (has: "
            f"{', '.join(repr(n) for n in data.input_names)}); name the arrays after the model's inputs")
    output_names = list(dict.fromkeys(existing + run_names))
    run_errors = run_error_types()
    run_options = quiet_run_options()

    total, done = data.num_samples, 0
    for i, (feed, labels) in enumerate(data.labeled_batches(batch_size)):
        extra = {} if extra_feeds is None else extra_feeds[i]
        # only the inputs this run reads: a subset's batch gathers its rows on reading
        run_feed = {k: extra[k] if k in extra else feed[k] for k in (*feed, *extra) if k in sess_inputs}
        try:
            with stage("calibration", unless_in=MEASURING_STAGES):
                values = session.run(output_names, run_feed, run_options)
        except run_errors as e:  # inputs rejected, or a node failing on them: the data does not fit
            raise CalibrationDataError(
                f"onnxruntime failed on the {data.what} data ({run_error_message(e)}); make the data match what the model expects"
            ) from None
        tensors = dict(zip(output_names, values))
        for n in from_feed:
            tensors[n] = extra[n] if n in extra else feed[n]
        tensors.update(constants)
        done += batch_samples(feed)
        if progress is not None:
            progress(done, total)
        yield feed, labels, tensors


def run_model(
    model: onnx.ModelProto,
    data: CalibrationSet,
    *,
    batch_size: int = 256,
    providers: list[str] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, np.ndarray]:
    """All graph outputs of ``model`` on ``data``, concatenated along axis 0.

    Memory grows with the number of samples: meant for verification on small
    sets (and for outputs whose first axis is the batch axis).
    """
    parts: dict[str, list[np.ndarray]] = {}
    for _feed, _labels, tensors in stream_tensors(
        model, [], data, batch_size=batch_size, providers=providers, progress=progress
    ):
        for k, v in tensors.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: (v[0] if len(v) == 1 else np.concatenate(v, axis=0)) for k, v in parts.items()}
