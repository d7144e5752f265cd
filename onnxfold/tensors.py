"""Tensor data wherever it lives: inline in the proto, or *deferred* in an
external-data file that was never loaded into memory.

A model loaded with ``load_model(path, defer_external=True)`` keeps each
external tensor as the stub it is in the file and records the directory the
``location`` is relative to under the ``basepath`` key (a key the ONNX
external-data format defines). Such a model holds none of its weights: find
reads one weight when a pass needs it, and saving copies untouched tensors
from the source file in chunks. That is what keeps the peak memory of
optimizing a multi-GB model near the size of what actually changes.

A ``basepath`` stub is only meaningful inside onnxfold: onnxruntime does not
know the key, so every writer here (``io.write_external``, ``io.write_inline``)
turns deferred tensors back into plain data. Use :func:`load_deferred` to get a
self-contained in-memory model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BASEPATH_KEY = "basepath"
_CHUNK = 64 * 2**20


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def is_deferred(t: TensorProto) -> bool:
    """An external tensor whose file onnxfold can find (see the module docstring)."""
    return is_external(t) and BASEPATH_KEY in _info(t)


def _num_elements(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def numpy_dtype(t: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))


def deferred_source(t: TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length in bytes) of a deferred tensor."""
    info = _info(t)
    path = Path(info[BASEPATH_KEY]) / info["location"]
    offset = int(info.get("offset") or 0)
    length = info.get("length")
    nbytes = int(length) if length else _num_elements(t) * numpy_dtype(t).itemsize
    return path, offset, nbytes


def tensor_array(t: TensorProto) -> np.ndarray:
    """The tensor as a numpy array (one copy of its data; a deferred tensor is
    read from its file)."""
    if is_deferred(t) and t.data_type not in (TensorProto.STRING,):
        path, offset, nbytes = deferred_source(t)
        dt = numpy_dtype(t).newbyteorder("<")
        count = _num_elements(t)
        if count * dt.itemsize > nbytes:
            raise ValueError(f"external data of tensor {t.name!r} is shorter than its shape")
        arr = np.fromfile(path, dtype=dt, count=count, offset=offset)
        return arr.reshape(tuple(int(d) for d in t.dims)).astype(dt.newbyteorder("="), copy=False)
    return numpy_helper.to_array(t)


def tensor_shape(t: TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


def deferred_chunks(t: TensorProto, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The raw (little-endian) bytes of a deferred tensor, ``chunk`` at a time."""
    path, offset, nbytes = deferred_source(t)
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                raise OSError(f"external data file {path} ends early (tensor {t.name!r})")
            left -= len(data)
            yield data


def iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers and attribute tensors of ``graph`` and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_graph_tensors(attr.g)
            for g in attr.graphs:
                yield from iter_graph_tensors(g)


def defer_initializers(model: onnx.ModelProto, base_dir: str | os.PathLike) -> int:
    """Mark the main graph's external initializers (stubs relative to
    ``base_dir``) as deferred; returns how many. The data stays on disk."""
    base = str(Path(base_dir).resolve())
    n = 0
    for t in model.graph.initializer:
        if is_external(t) and not is_deferred(t):
            entry = t.external_data.add()
            entry.key, entry.value = BASEPATH_KEY, base
            n += 1
    return n


def has_deferred(model: onnx.ModelProto) -> bool:
    return any(is_deferred(t) for t in iter_graph_tensors(model.graph))


def load_deferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every deferred tensor of ``model`` into memory (in place) and return it."""
    for t in iter_graph_tensors(model.graph):
        if is_deferred(t):
            data = b"".join(deferred_chunks(t))
            t.raw_data = data
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    return model
