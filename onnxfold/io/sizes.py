"""Size accounting: bytes and parameters of a model without serializing it, and the size limits
loading and saving work by."""

from __future__ import annotations

from typing import Iterator

import onnx
from onnx import TensorProto

from onnxfold.tensors import iter_graph_tensors as _iter_graph_tensors


# protobuf cannot serialize a message of 2 GiB or more; keep a margin for the
# per-field overhead that the size estimate only approximates.
PROTOBUF_LIMIT = 2**31 - 1


PROTOBUF_LIMIT = 2**31 - 1
_SIZE_MARGIN = 64 * 2**20


_SIZE_MARGIN = 64 * 2**20
EXTERNAL_THRESHOLD = PROTOBUF_LIMIT - _SIZE_MARGIN


# tensors smaller than this stay inline when saving with external data
EXTERNAL_MIN_BYTES = 1024


# tensors at least this big start at a 64 KiB boundary in the data file, so
# onnxruntime can memory-map them (onnx allows up to 64 KiB of padding)
ALIGN_MIN_BYTES = 64 * 1024


ALIGN_MIN_BYTES = 64 * 1024
ALIGNMENT = 64 * 1024


# below this estimated size model_bytes serializes for an exact answer
_EXACT_SIZE_LIMIT = 64 * 2**20


# files / models up to this size are parsed and checked directly; bigger ones
# are parsed in chunks and checked through a sparse twin
DIRECT_LIMIT = 64 * 2**20


DEFAULT_DOMAINS = ("", "ai.onnx")


def _bits_per_element() -> dict[int, int]:
    bits = {
        "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32,
        "INT64": 64, "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64,
        "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8,
        "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8,
        "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
        "FLOAT6E2M3": 6, "FLOAT6E3M2": 6,
    }  # fmt: skip
    return {getattr(TensorProto, k): v for k, v in bits.items() if hasattr(TensorProto, k)}


BITS_PER_ELEMENT = _bits_per_element()


BITS_PER_ELEMENT = _bits_per_element()
_FLOAT_TYPES = frozenset(
    getattr(TensorProto, k)
    for k in (
        "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2",
    )  # fmt: skip
    if hasattr(TensorProto, k)
)


def _num_elements(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def uses_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def data_nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data, without touching (copying) the data itself."""
    if uses_external(t):
        length = external_info(t).get("length")
        if length is not None and length.isdigit():
            return int(length)
    bits = BITS_PER_ELEMENT.get(t.data_type)
    if bits is not None:  # raw_data, external, or typed fields (float_data, ...) alike
        return (_num_elements(t) * bits + 7) // 8
    return t.ByteSize()  # strings and anything exotic: serialize this one tensor


def _tensor_size_estimate(t: TensorProto) -> int:
    """Approximate serialized size of one tensor (data + metadata)."""
    dims = sum(1 + max(1, (int(d).bit_length() + 6) // 7) if d >= 0 else 11 for d in t.dims)
    return data_nbytes(t) + len(t.name.encode()) + dims + 16  # as if its data were inline


def _main_graph_constant_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    yield attr.t


def estimate_serialized_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` (with all tensor data inline), estimated
    without serializing it: works for models far beyond protobuf's 2 GB."""
    g = model.graph
    size = sum(_tensor_size_estimate(t) for t in g.initializer)
    for node in g.node:
        tensor_attrs = [a for a in node.attribute if a.HasField("t")]
        if tensor_attrs:  # Constant-like nodes: count their tensor without serializing it
            size += sum(_tensor_size_estimate(a.t) for a in tensor_attrs) + 64
            size += sum(a.ByteSize() for a in node.attribute if not a.HasField("t"))
            size += sum(len(s) for s in node.input) + sum(len(s) for s in node.output)
            size += len(node.name) + len(node.op_type) + len(node.domain)
        else:
            size += node.ByteSize() + 4
    for field in (g.input, g.output, g.value_info, g.sparse_initializer, g.quantization_annotation):
        size += sum(x.ByteSize() + 4 for x in field)
    size += len(g.name.encode()) + len(g.doc_string.encode()) + 16
    for field in (model.opset_import, model.metadata_props, model.functions, model.training_info):
        size += sum(x.ByteSize() + 4 for x in field)
    size += len(model.producer_name) + len(model.producer_version) + len(model.domain)
    size += len(model.doc_string.encode()) + 32
    return size


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of ``model`` in bytes as a self-contained file (all weights inline).

    Exact (``ByteSize``) for small in-memory models; otherwise the sum of all
    tensor data (initializers, Constant and other attribute tensors, external
    tensors by their stored length) plus the rest of the graph's serialized
    size - within a few bytes per tensor, and it never serializes the model.
    """
    estimate = estimate_serialized_size(model)
    if estimate < _EXACT_SIZE_LIMIT and not any(uses_external(t) for t in _iter_graph_tensors(model.graph)):
        return model.ByteSize()
    return estimate


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of elements in the float initializers and float Constant-node
    tensors of the main graph (integer tensors - shapes, indices - are not
    parameters)."""
    g = model.graph
    n = sum(_num_elements(t) for t in g.initializer if t.data_type in _FLOAT_TYPES)
    n += sum(_num_elements(t) for t in _main_graph_constant_tensors(g) if t.data_type in _FLOAT_TYPES)
    for node in g.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value_float":
                    n += 1
                elif attr.name == "value_floats":
                    n += len(attr.floats)
    return n
