"""Writing a model field by field: one tensor serialized at a time, inline or into a data file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import onnx
from onnx import TensorProto

from onnxfold.errors import ModelSaveError, first_line
from onnxfold.tensors import deferred_chunks, is_deferred
from onnxfold.tensors import iter_graph_tensors as _iter_graph_tensors

from . import sizes, wire


def _copy_fields(src, dst, keep: Callable[[object], bool]) -> None:
    """Copy the set fields of protobuf message ``src`` for which ``keep(field
    descriptor)`` holds into ``dst``. Other fields are never read (reading
    ``raw_data`` would copy it: upb makes a new bytes object per access)."""
    for fd in src.DESCRIPTOR.fields:
        if not keep(fd):
            continue
        name = fd.name
        if _is_repeated(fd):
            values = getattr(src, name)
            if len(values):
                getattr(dst, name).extend(values)
        elif src.HasField(name):
            if fd.message_type is not None:
                getattr(dst, name).CopyFrom(getattr(src, name))
            else:
                setattr(dst, name, getattr(src, name))


def _is_repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _copy_fields_except(src, dst, skip: set[str]) -> None:
    _copy_fields(src, dst, lambda fd: fd.name not in skip)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with everything but its graph's initializers,
    made without reading (copying) any of them."""
    skeleton = onnx.ModelProto()
    _copy_fields_except(model, skeleton, {"graph"})
    _copy_fields_except(model.graph, skeleton.graph, {"initializer"})
    return skeleton


_DATA_FIELDS = {
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
    "uint64_data", "external_data", "data_location",
}  # fmt: skip


def _tensor_bytes(t: TensorProto) -> bytes:
    """The tensor's data in raw_data layout (one transient copy)."""
    if t.HasField("raw_data"):
        return t.raw_data
    if is_deferred(t):
        return b"".join(deferred_chunks(t))
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _inlined(t: TensorProto) -> TensorProto:
    """A copy of deferred tensor ``t`` with its data read into ``raw_data``."""
    out = TensorProto()
    _copy_fields_except(t, out, _DATA_FIELDS)
    out.raw_data = _tensor_bytes(t)
    return out


def check_no_unloaded_external(model: onnx.ModelProto) -> None:
    for t in _iter_graph_tensors(model.graph):
        if sizes.uses_external(t) and not is_deferred(t):
            raise ModelSaveError(
                f"tensor '{t.name}' still references external data that was never loaded; "
                "load the model with onnxfold.io.load_model before saving it"
            )


def _finish(f, durable: bool = True) -> None:
    f.flush()
    if durable:
        os.fsync(f.fileno())


def write_external(
    model: onnx.ModelProto,
    model_path: Path,
    data_name: str,
    ir_version: int | None = None,
    *,
    sparse: bool = False,
    durable: bool = True,
) -> None:
    """Write ``model`` as ``model_path`` + ``model_path.parent/data_name``
    (main-graph initializers of >= 1 KiB in the data file), without modifying
    ``model`` and without copying more than one tensor at a time. No checks,
    no atomicity: :func:`onnxfold.io.save_model` and the runtime build on this.

    ``sparse=True`` writes a *twin* for checks: only initializers of >= 64 KiB
    go external and their data is left as holes (zeros) in a sparse file;
    tensors still referencing unloaded external data are fine then.
    ``durable=False`` skips the fsync (scratch files).
    """
    g = model.graph
    skeleton = without_initializers(model)
    if ir_version is not None:
        skeleton.ir_version = ir_version
    sg = skeleton.graph
    min_bytes = sizes.ALIGN_MIN_BYTES if sparse else sizes.EXTERNAL_MIN_BYTES
    with open(model_path.parent / data_name, "wb") as f:
        offset = 0
        for t in g.initializer:
            nbytes = sizes.data_nbytes(t) if t.data_type != TensorProto.STRING else 0
            unloaded = sizes.uses_external(t) and not is_deferred(t)
            if t.data_type == TensorProto.STRING or nbytes < min_bytes or (unloaded and not sparse):
                if is_deferred(t):  # small: inline it (a basepath stub means nothing outside onnxfold)
                    sg.initializer.add().CopyFrom(_inlined(t))
                else:
                    sg.initializer.add().CopyFrom(t)  # small, or unloaded external (save_model refuses those)
                continue
            if nbytes >= sizes.ALIGN_MIN_BYTES and offset % sizes.ALIGNMENT:
                pad = sizes.ALIGNMENT - offset % sizes.ALIGNMENT
                if not sparse:
                    f.write(b"\0" * pad)
                offset += pad
            if sparse:
                length = nbytes
            elif is_deferred(t):  # copied from the source file, a chunk at a time
                length = 0
                for chunk in deferred_chunks(t):
                    f.write(chunk)
                    length += len(chunk)
            else:
                data = _tensor_bytes(t)
                f.write(data)
                length = len(data)
                del data
            stub = sg.initializer.add()
            _copy_fields_except(t, stub, _DATA_FIELDS)
            stub.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            offset += length
        if sparse:
            f.truncate(offset)  # holes: no disk space, reads as zeros
        _finish(f, durable and not sparse)
    try:
        data = skeleton.SerializeToString()
    except Exception as e:  # noqa: BLE001
        raise ModelSaveError(
            f"cannot serialize the model's graph ({first_line(e)}); if it holds huge Constant nodes, "
            "turn them into initializers"
        ) from None
    with open(model_path, "wb") as f:
        f.write(data)
        _finish(f, durable and not sparse)


def _tensor_serialized_size(t: TensorProto) -> int:
    """Exact serialized size of ``t`` without serializing its raw data."""
    if t.HasField("raw_data") and t.data_type in sizes.BITS_PER_ELEMENT:
        stub = TensorProto()
        _copy_fields_except(t, stub, {"raw_data"})
        n = sizes.data_nbytes(t)
        return stub.ByteSize() + len(wire.field_key(_RAW_DATA_FIELD, 2)) + len(wire.varint_bytes(n)) + n
    return t.ByteSize()


_RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


_Piece = tuple[bytes, int, Callable[[], Iterator[bytes]]]


def _raw_tensor_chunks(t: TensorProto) -> Iterator[bytes]:
    """``t.SerializeToString()`` in three chunks, with a single copy of the
    raw data (serializing the tensor whole makes two)."""
    before, after = TensorProto(), TensorProto()
    _copy_fields(t, before, lambda d: d.number < _RAW_DATA_FIELD)
    _copy_fields(t, after, lambda d: d.number > _RAW_DATA_FIELD)
    yield before.SerializeToString()
    data = t.raw_data
    yield wire.field_key(_RAW_DATA_FIELD, 2) + wire.varint_bytes(len(data))
    yield data
    del data
    yield after.SerializeToString()


def _deferred_tensor_chunks(t: TensorProto) -> Iterator[bytes]:
    """Serialized ``t`` with its deferred data inline as ``raw_data``, read in chunks."""
    before, after = TensorProto(), TensorProto()
    _copy_fields(t, before, lambda d: d.number < _RAW_DATA_FIELD and d.name not in _DATA_FIELDS)
    _copy_fields(t, after, lambda d: d.number > _RAW_DATA_FIELD and d.name not in _DATA_FIELDS)
    yield before.SerializeToString()
    yield wire.field_key(_RAW_DATA_FIELD, 2) + wire.varint_bytes(sizes.data_nbytes(t))
    yield from deferred_chunks(t)
    yield after.SerializeToString()


def _tensor_piece(t: TensorProto, key: bytes) -> _Piece:
    if is_deferred(t):
        stub = TensorProto()
        _copy_fields_except(t, stub, _DATA_FIELDS)
        n = sizes.data_nbytes(t)
        size = stub.ByteSize() + len(wire.field_key(_RAW_DATA_FIELD, 2)) + len(wire.varint_bytes(n)) + n
        return key + wire.varint_bytes(size), size, lambda: _deferred_tensor_chunks(t)
    if t.HasField("raw_data") and t.data_type in sizes.BITS_PER_ELEMENT:
        size = _tensor_serialized_size(t)
        return key + wire.varint_bytes(size), size, lambda: _raw_tensor_chunks(t)
    size = t.ByteSize()
    return key + wire.varint_bytes(size), size, lambda: iter((t.SerializeToString(),))


def _message_pieces(message) -> list[_Piece]:
    """``message`` as ``(field key + length prefix, payload size, payload
    chunks)`` pieces in field-number order; concatenated they are exactly
    ``message.SerializeToString()``. Repeated message fields give one piece
    per element, serialized only when written."""
    pieces: list[_Piece] = []
    cls = type(message)
    for fd in sorted(message.DESCRIPTOR.fields, key=lambda d: d.number):
        repeated = _is_repeated(fd)
        if repeated and fd.message_type is not None:
            key = wire.field_key(fd.number, 2)
            for element in getattr(message, fd.name):
                if isinstance(element, TensorProto):
                    pieces.append(_tensor_piece(element, key))
                else:
                    size = element.ByteSize()
                    pieces.append((key + wire.varint_bytes(size), size, lambda e=element: iter((e.SerializeToString(),))))
        elif (repeated and len(getattr(message, fd.name))) or (not repeated and message.HasField(fd.name)):
            part = cls()
            _copy_fields(message, part, lambda d, number=fd.number: d.number == number)
            data = part.SerializeToString()
            pieces.append((b"", len(data), lambda data=data: iter((data,))))
    return pieces


def write_inline(model: onnx.ModelProto, model_path: Path, ir_version: int | None = None) -> int:
    """Write ``model`` as one file, byte for byte what ``SerializeToString``
    gives (with ``ir_version`` replaced), serializing one top-level element
    (node, tensor, ...) at a time. Returns the size written. No checks."""
    head = onnx.ModelProto()
    _copy_fields_except(model, head, {"graph"})
    if ir_version is not None:
        head.ir_version = ir_version
    graph_pieces = _message_pieces(model.graph)
    graph_size = sum(len(prefix) + size for prefix, size, _ in graph_pieces)
    if graph_size > sizes.PROTOBUF_LIMIT:
        raise ModelSaveError(
            f"the model is about {graph_size / 2**30:.1f} GB, over protobuf's 2 GB limit for a single file; "
            "save it with external data"
        )
    graph_prefix = wire.field_key(wire.GRAPH_FIELD, 2) + wire.varint_bytes(graph_size)
    before = onnx.ModelProto()
    after = onnx.ModelProto()
    _copy_fields(head, before, lambda d: d.number < wire.GRAPH_FIELD)
    _copy_fields(head, after, lambda d: d.number > wire.GRAPH_FIELD)
    written = 0
    with open(model_path, "wb") as f:
        for chunk in (before.SerializeToString(), graph_prefix):
            f.write(chunk)
            written += len(chunk)
        for prefix, size, produce in graph_pieces:
            f.write(prefix)
            n = 0
            for chunk in produce():
                f.write(chunk)
                n += len(chunk)
                del chunk
            if n != size:
                raise ModelSaveError(
                    f"a graph element serialized to {n} bytes instead of {size}; a tensor's raw data "
                    "does not match its shape and type (corrupt tensor)"
                )
            written += len(prefix) + size
        tail = after.SerializeToString()
        f.write(tail)
        written += len(tail)
        _finish(f)
    return written
