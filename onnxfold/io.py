"""Loading and saving ONNX models.

``load_model`` reads a model (and the external-data files next to it) and
turns every way a file can be wrong into a one-line :class:`ModelLoadError`.
``save_model`` writes atomically: everything goes to a temporary directory
inside the output directory, is checked there (ONNX checker + an
onnxruntime session), and only then renamed into place, data file first.
Nothing is left behind on failure and the caller's ``ModelProto`` is never
modified.

Memory. protobuf (upb) copies bytes on every ``raw_data`` access, never gives
arena memory back when a field is cleared, and ``SerializeToString`` /
``ParseFromString`` hold the whole message twice. So nothing here handles a
model as one blob:

* loading a big file walks the protobuf wire format and merges it into the
  model a few MiB (or one tensor) at a time: peak = model + one tensor;
* saving streams the model field by field (one tensor serialized at a time)
  for a single file, or writes tensor by tensor into the data file plus a
  small *skeleton* model (initializers reduced to external-data stubs);
* the checks of a big single-file model (the ONNX checker reads a file into
  memory twice, onnxruntime once more) run on a *twin*: the skeleton plus a
  sparse data file of zeros (no disk space, no memory), with small tensors
  (shapes, axes) kept real. Its structure is exactly the written model's.

Peak extra memory of load/save is about one tensor's bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import onnx
from onnx import TensorProto

from onnxfold.errors import ModelLoadError, ModelSaveError, UnsupportedModelError
from onnxfold.tensors import defer_initializers, deferred_chunks, is_deferred
from onnxfold.tensors import iter_graph_tensors as _iter_graph_tensors

# protobuf cannot serialize a message of 2 GiB or more; keep a margin for the
# per-field overhead that the size estimate only approximates.
PROTOBUF_LIMIT = 2**31 - 1
_SIZE_MARGIN = 64 * 2**20
EXTERNAL_THRESHOLD = PROTOBUF_LIMIT - _SIZE_MARGIN
# tensors smaller than this stay inline when saving with external data
_EXTERNAL_MIN_BYTES = 1024
# tensors at least this big start at a 64 KiB boundary in the data file, so
# onnxruntime can memory-map them (onnx allows up to 64 KiB of padding)
_ALIGN_MIN_BYTES = 64 * 1024
_ALIGNMENT = 64 * 1024
# below this estimated size model_bytes serializes for an exact answer
_EXACT_SIZE_LIMIT = 64 * 2**20
# files / models up to this size are parsed and checked directly; bigger ones
# are parsed in chunks and checked through a sparse twin
_DIRECT_LIMIT = 64 * 2**20
_MERGE_CHUNK = 8 * 2**20

_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------
# tensor helpers


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


_BITS = _bits_per_element()
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


def _uses_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _data_nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data, without touching (copying) the data itself."""
    if _uses_external(t):
        length = _external_info(t).get("length")
        if length is not None and length.isdigit():
            return int(length)
    bits = _BITS.get(t.data_type)
    if bits is not None:  # raw_data, external, or typed fields (float_data, ...) alike
        return (_num_elements(t) * bits + 7) // 8
    return t.ByteSize()  # strings and anything exotic: serialize this one tensor


def _tensor_size_estimate(t: TensorProto) -> int:
    """Approximate serialized size of one tensor (data + metadata)."""
    dims = sum(1 + max(1, (int(d).bit_length() + 6) // 7) if d >= 0 else 11 for d in t.dims)
    return _data_nbytes(t) + len(t.name.encode()) + dims + 16  # as if its data were inline


def _main_graph_constant_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    yield attr.t


def _estimate_serialized_size(model: onnx.ModelProto) -> int:
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
    estimate = _estimate_serialized_size(model)
    if estimate < _EXACT_SIZE_LIMIT and not any(_uses_external(t) for t in _iter_graph_tensors(model.graph)):
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
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value_float":
                    n += 1
                elif attr.name == "value_floats":
                    n += len(attr.floats)
    return n


def model_has_external_data(path_or_model: onnx.ModelProto | str | os.PathLike) -> bool:
    """Whether any tensor is stored as external data: in the file as stored
    (for a path) or still referencing external data (for a ModelProto - a
    model from :func:`load_model` has its data loaded, so ``False``)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        # big fields are skipped unread: an external-data stub is small
        model = _read_proto(Path(path_or_model), skip_fields_over=2**20)
    return any(_uses_external(t) for t in _iter_graph_tensors(model.graph))


# --------------------------------------------------------------------------
# protobuf wire format: just enough to split a ModelProto into its fields


class _WireError(Exception):
    pass


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint_bytes(number << 3 | wire_type)


def _read_varint(f: BinaryIO) -> int:
    result = shift = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            raise _WireError("unexpected end of file")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    raise _WireError("malformed varint")


def _fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, payload_start, field_end)`` of the
    fields of the message stored in ``f[start:end]``."""
    pos = start
    while pos < end:
        f.seek(pos)
        key = _read_varint(f)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0")
        if wire_type == 0:
            _read_varint(f)
            payload = f.tell()
            field_end = payload
        elif wire_type == 1:
            payload = f.tell()
            field_end = payload + 8
        elif wire_type == 2:
            length = _read_varint(f)
            payload = f.tell()
            field_end = payload + length
        elif wire_type == 5:
            payload = f.tell()
            field_end = payload + 4
        else:  # groups (3, 4) do not occur in ONNX; 6, 7 do not exist
            raise _WireError(f"wire type {wire_type}")
        if field_end > end:
            raise _WireError("field runs past the end of its message")
        yield number, wire_type, pos, payload, field_end
        pos = field_end


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number


def _merge_range(model: onnx.ModelProto, f: BinaryIO, start: int, end: int, prefix: bytes = b"") -> None:
    """Merge ``prefix + f[start:end]`` into ``model`` with one buffer, no copies."""
    buf = bytearray(len(prefix) + end - start)
    buf[: len(prefix)] = prefix
    f.seek(start)
    view = memoryview(buf)
    if f.readinto(view[len(prefix) :]) != end - start:
        raise _WireError("unexpected end of file")
    model.MergeFromString(view)


def _parse_in_chunks(f: BinaryIO, size: int, skip_fields_over: int | None = None) -> onnx.ModelProto:
    """Parse a ModelProto from ``f`` a few MiB (or one big field) at a time.

    Equivalent to ``ParseFromString`` (protobuf merges a message field that
    arrives in several pieces) but never holds the whole file. With
    ``skip_fields_over``, graph fields larger than that are skipped unread.
    """
    model = onnx.ModelProto()
    for number, wire_type, start, payload, end in _fields(f, 0, size):
        if number != _GRAPH_FIELD or wire_type != 2:
            _merge_range(model, f, start, end)
            continue
        model.graph.SetInParent()
        run: list[int] = []  # [start, end) of consecutive graph fields not yet merged

        def flush() -> None:
            if run:
                length = run[1] - run[0]
                _merge_range(model, f, run[0], run[1], _key(_GRAPH_FIELD, 2) + _varint_bytes(length))
                run.clear()

        for _n, _w, g_start, _p, g_end in list(_fields(f, payload, end)):
            if skip_fields_over is not None and g_end - g_start > skip_fields_over:
                flush()
                continue
            if run and g_end - run[0] > _MERGE_CHUNK:
                flush()
            if run:
                run[1] = g_end
            else:
                run.extend((g_start, g_end))
        flush()
    return model


# --------------------------------------------------------------------------
# loading


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"


def _sniff(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, e.g. .npz)"
    if head.startswith(b"\x93NUMPY"):
        return " (it is a numpy .npy array)"
    if head.startswith(b"\x89HDF"):
        return " (it is an HDF5 file)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return " (it looks like a Python pickle, e.g. a PyTorch checkpoint)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return " (it is a text file)"
    return ""


def _check_input_file(p: Path) -> int:
    """The file's size; ModelLoadError for anything that is not a readable, non-empty file."""
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}; check the path")
    if p.is_dir():
        raise ModelLoadError(f"model path is a directory, not a file: {p}; give the path of the .onnx file")
    if not p.is_file():
        raise ModelLoadError(f"model path is not a regular file: {p}")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}") from None
    if size == 0:
        raise ModelLoadError(f"model file is empty: {p}; re-export the model")
    return size


def _read_proto(p: Path, skip_fields_over: int | None = None) -> onnx.ModelProto:
    """Parse the .onnx file at ``p`` (external data not loaded)."""
    size = _check_input_file(p)
    head = b""
    try:
        with open(p, "rb") as f:  # read-only: the input is never modified
            head = f.read(64)
            f.seek(0)
            if size <= _DIRECT_LIMIT and skip_fields_over is None:
                model = onnx.ModelProto()
                model.ParseFromString(f.read())
            else:
                model = _parse_in_chunks(f, size, skip_fields_over)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}; check its permissions") from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - DecodeError, _WireError: a corrupt or foreign file
        hint = _sniff(head)
        if hint:
            raise ModelLoadError(f"{p} is not an ONNX model file{hint}; give the exported .onnx model") from None
        raise ModelLoadError(
            f"{p} is not a valid ONNX model (protobuf parse failed: the file is truncated, corrupt "
            "or not ONNX); re-export or re-download it"
        ) from None
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.opset_import) == 0:
        hint = _sniff(head)
        raise ModelLoadError(
            f"{p} is not an ONNX model{hint or ' (no graph, IR version or opset found: truncated or not ONNX)'};"
            " give the exported .onnx model"
        )
    return model


def _check_external_files(model: onnx.ModelProto, p: Path) -> None:
    """Every external-data reference must point at an existing, long enough
    file inside the model's directory."""
    base = p.parent.resolve()
    sizes: dict[str, int] = {}
    for t in _iter_graph_tensors(model.graph):
        if not _uses_external(t):
            continue
        info = _external_info(t)
        loc = info.get("location", "")
        if not loc:
            raise ModelLoadError(f"tensor '{t.name}' in {p} uses external data but names no file; re-export the model")
        target = (base / loc).resolve()
        if Path(loc).is_absolute() or (target != base and base not in target.parents):
            raise ModelLoadError(
                f"external data file '{loc}' referenced by {p} lies outside the model's directory; "
                "keep the data file next to the model"
            )
        if loc not in sizes:
            if not target.is_file():
                raise ModelLoadError(
                    f"external data file '{loc}' referenced by {p} is missing; keep '{loc}' next to the model"
                )
            sizes[loc] = target.stat().st_size
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else _data_nbytes(t)
        except ValueError:
            raise ModelLoadError(
                f"tensor '{t.name}' in {p} has an invalid external-data offset/length; re-export the model"
            ) from None
        if offset < 0 or length < 0 or offset + length > sizes[loc]:
            raise ModelLoadError(
                f"external data file '{loc}' referenced by {p} is truncated (tensor '{t.name}' needs bytes "
                f"{offset}..{offset + length}, the file has {sizes[loc]}); copy the complete file"
            )


def _checker_message(exc: BaseException, limit: int = 300) -> str:
    """The checker's message without its ``==> Context`` trailer, on one line."""
    text = str(exc).split("==> Context", 1)[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_checker(p: Path, what: str, error: type) -> None:
    try:
        onnx.checker.check_model(str(p))
    except Exception as e:  # noqa: BLE001 - ValidationError, or a C++ parse error
        fix = "; repair or re-export the model" if error is ModelLoadError else ""
        raise error(f"{what} fails the ONNX checker: {_checker_message(e)}{fix}") from None


def load_model(path: str | os.PathLike, *, defer_external: bool = False) -> onnx.ModelProto:
    """Load the model at ``path`` with its external data (files next to it).

    ``defer_external=True`` leaves the main graph's external initializers on
    disk (see :mod:`onnxfold.tensors`): the returned model then holds none of
    those weights, and everything in onnxfold reads them when needed. That is
    how the CLI loads a model; save such a model with :func:`save_model`.

    Raises ModelLoadError (one line, with the fix) for a missing path, a
    directory, an empty / truncated / corrupt / non-ONNX file, a missing or
    truncated external-data file, or a model the ONNX checker rejects. The
    file is only opened for reading. A file over 64 MiB is parsed in chunks
    and checked through a sparse twin (see the module docstring).
    """
    p = Path(path)
    model = _read_proto(p)
    has_external = any(_uses_external(t) for t in _iter_graph_tensors(model.graph))
    if has_external:
        _check_external_files(model, p)
    if p.stat().st_size <= _DIRECT_LIMIT:
        _run_checker(p, f"model {p}", ModelLoadError)  # by path: also checks the data files
    else:
        with tempfile.TemporaryDirectory(prefix="onnxfold-check-") as tmp:
            _check_twin(model, Path(tmp), f"model {p}", ModelLoadError, runtime=False)
    if has_external:
        try:
            if defer_external:
                defer_initializers(model, p.parent)
                for t in _iter_graph_tensors(model.graph):  # Constant/attribute tensors: load, they are small
                    if _uses_external(t) and not is_deferred(t):
                        onnx.external_data_helper.load_external_data_for_tensor(t, str(p.parent))
            else:
                onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot read the external data of {p}: {_first_line(e)}") from None
    return model


# --------------------------------------------------------------------------
# runtime versions


def _identity_model(ir_version: int, opset: int) -> onnx.ModelProto:
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int]:
    """(highest IR version, highest default-domain opset) the installed
    onnxruntime accepts, found by probing tiny Identity models."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3

    def accepts(ir: int, opset: int) -> bool:
        try:
            ort.InferenceSession(
                _identity_model(ir, opset).SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
        except Exception:  # noqa: BLE001 - "unsupported IR version / opset"
            return False
        return True

    safe_opset = 13  # every onnxruntime of the last years runs opset 13
    max_ir = next((ir for ir in range(onnx.IR_VERSION + 3, 6, -1) if accepts(ir, safe_opset)), None)
    if max_ir is None:
        raise RuntimeError("the installed onnxruntime accepts no IR version >= 7; reinstall onnxruntime")
    top = max(onnx.defs.onnx_opset_version(), 21) + 4
    max_opset = next((op for op in range(top, safe_opset - 1, -1) if accepts(max_ir, op)), safe_opset)
    return max_ir, max_opset


def _default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _target_ir_version(model: onnx.ModelProto) -> int:
    """The IR version to save ``model`` with; raises for an opset the runtime lacks."""
    max_ir, max_opset = runtime_limits()
    opset = _default_opset(model)
    if opset is not None and opset > max_opset:
        raise UnsupportedModelError(
            f"the model uses ONNX opset {opset} but the installed onnxruntime supports at most opset "
            f"{max_opset}; upgrade onnxruntime or re-export the model with opset {max_opset} or lower"
        )
    return min(model.ir_version, max_ir) if model.ir_version > 0 else max_ir


def clamp_versions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower ``model.ir_version`` to what onnxruntime accepts (never raises it).

    Modifies ``model`` in place (a scalar field: no copy of a possibly huge
    model) and returns it. Raises UnsupportedModelError when the default
    opset is newer than onnxruntime supports: down-converting is not safe.
    """
    model.ir_version = _target_ir_version(model)
    return model


# --------------------------------------------------------------------------
# saving


def default_output_path(input_path: str | os.PathLike) -> Path:
    """``<dir>/<stem>.fold.onnx`` for an input ``<dir>/<stem>.onnx``."""
    p = Path(input_path)
    name = p.name
    if name.lower().endswith(".onnx"):
        name = name[: -len(".onnx")]
    return p.with_name(f"{name}.fold.onnx")


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


def _check_no_unloaded_external(model: onnx.ModelProto) -> None:
    for t in _iter_graph_tensors(model.graph):
        if _uses_external(t) and not is_deferred(t):
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
    no atomicity: :func:`save_model` and the runtime build on this.

    ``sparse=True`` writes a *twin* for checks: only initializers of >= 64 KiB
    go external and their data is left as holes (zeros) in a sparse file;
    tensors still referencing unloaded external data are fine then.
    ``durable=False`` skips the fsync (scratch files).
    """
    g = model.graph
    skeleton = onnx.ModelProto()
    _copy_fields_except(model, skeleton, {"graph"})
    if ir_version is not None:
        skeleton.ir_version = ir_version
    sg = skeleton.graph
    _copy_fields_except(g, sg, {"initializer"})
    min_bytes = _ALIGN_MIN_BYTES if sparse else _EXTERNAL_MIN_BYTES
    with open(model_path.parent / data_name, "wb") as f:
        offset = 0
        for t in g.initializer:
            nbytes = _data_nbytes(t) if t.data_type != TensorProto.STRING else 0
            unloaded = _uses_external(t) and not is_deferred(t)
            if t.data_type == TensorProto.STRING or nbytes < min_bytes or (unloaded and not sparse):
                if is_deferred(t):  # small: inline it (a basepath stub means nothing outside onnxfold)
                    sg.initializer.add().CopyFrom(_inlined(t))
                else:
                    sg.initializer.add().CopyFrom(t)  # small, or unloaded external (save_model refuses those)
                continue
            if nbytes >= _ALIGN_MIN_BYTES and offset % _ALIGNMENT:
                pad = _ALIGNMENT - offset % _ALIGNMENT
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
            f"cannot serialize the model's graph ({_first_line(e)}); if it holds huge Constant nodes, "
            "turn them into initializers"
        ) from None
    with open(model_path, "wb") as f:
        f.write(data)
        _finish(f, durable and not sparse)


def _tensor_serialized_size(t: TensorProto) -> int:
    """Exact serialized size of ``t`` without serializing its raw data."""
    if t.HasField("raw_data") and t.data_type in _BITS:
        stub = TensorProto()
        _copy_fields_except(t, stub, {"raw_data"})
        n = _data_nbytes(t)
        return stub.ByteSize() + len(_key(_RAW_DATA_FIELD, 2)) + len(_varint_bytes(n)) + n
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
    yield _key(_RAW_DATA_FIELD, 2) + _varint_bytes(len(data))
    yield data
    del data
    yield after.SerializeToString()


def _deferred_tensor_chunks(t: TensorProto) -> Iterator[bytes]:
    """Serialized ``t`` with its deferred data inline as ``raw_data``, read in chunks."""
    before, after = TensorProto(), TensorProto()
    _copy_fields(t, before, lambda d: d.number < _RAW_DATA_FIELD and d.name not in _DATA_FIELDS)
    _copy_fields(t, after, lambda d: d.number > _RAW_DATA_FIELD and d.name not in _DATA_FIELDS)
    yield before.SerializeToString()
    yield _key(_RAW_DATA_FIELD, 2) + _varint_bytes(_data_nbytes(t))
    yield from deferred_chunks(t)
    yield after.SerializeToString()


def _tensor_piece(t: TensorProto, key: bytes) -> _Piece:
    if is_deferred(t):
        stub = TensorProto()
        _copy_fields_except(t, stub, _DATA_FIELDS)
        n = _data_nbytes(t)
        size = stub.ByteSize() + len(_key(_RAW_DATA_FIELD, 2)) + len(_varint_bytes(n)) + n
        return key + _varint_bytes(size), size, lambda: _deferred_tensor_chunks(t)
    if t.HasField("raw_data") and t.data_type in _BITS:
        size = _tensor_serialized_size(t)
        return key + _varint_bytes(size), size, lambda: _raw_tensor_chunks(t)
    size = t.ByteSize()
    return key + _varint_bytes(size), size, lambda: iter((t.SerializeToString(),))


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
            key = _key(fd.number, 2)
            for element in getattr(message, fd.name):
                if isinstance(element, TensorProto):
                    pieces.append(_tensor_piece(element, key))
                else:
                    size = element.ByteSize()
                    pieces.append((key + _varint_bytes(size), size, lambda e=element: iter((e.SerializeToString(),))))
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
    if graph_size > PROTOBUF_LIMIT:
        raise ModelSaveError(
            f"the model is about {graph_size / 2**30:.1f} GB, over protobuf's 2 GB limit for a single file; "
            "save it with external data"
        )
    graph_prefix = _key(_GRAPH_FIELD, 2) + _varint_bytes(graph_size)
    before = onnx.ModelProto()
    after = onnx.ModelProto()
    _copy_fields(head, before, lambda d: d.number < _GRAPH_FIELD)
    _copy_fields(head, after, lambda d: d.number > _GRAPH_FIELD)
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


def check_with_runtime(path: Path, error: type = ModelSaveError, what: str = "the saved model") -> None:
    """Build a CPU onnxruntime session for the model file at ``path`` (no graph
    optimizations, no pre-packing: a load test, not a run) or raise ``error``."""
    import onnxruntime as ort

    from onnxfold.runtime import ort_message

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        msg = ort_message(e)
        hint = ""
        if "is not a registered function/op" in msg:
            hint = ("; onnxfold only writes models that load in onnxruntime: to skip that check, save from Python"
                    " with onnxfold.io.save_model(result.model, path, check=False)")
        raise error(f"onnxruntime cannot load {what}: {msg}{hint}") from None
    del session


def _check_twin(model: onnx.ModelProto, directory: Path, what: str, error: type, *, runtime: bool,
                ir_version: int | None = None) -> None:  # fmt: skip
    """Checker (+ onnxruntime) on a sparse twin of ``model`` written in ``directory``."""
    twin = directory / "twin.onnx"
    write_external(model, twin, "twin.onnx.data", ir_version, sparse=True)
    try:
        _run_checker(twin, what, error)
        if runtime:
            check_with_runtime(twin, error, what)
    finally:
        for name in ("twin.onnx", "twin.onnx.data"):
            with contextlib.suppress(OSError):
                (directory / name).unlink()


def _check_output_path(p: Path) -> None:
    parent = p.parent
    if p.is_dir():
        raise ModelSaveError(f"output path is a directory: {p}; give a file name such as {p / 'model.onnx'}")
    if not parent.exists():
        raise ModelSaveError(f"output directory does not exist: {parent}; create it first")
    if not parent.is_dir():
        raise ModelSaveError(f"output directory {parent} is not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelSaveError(f"output directory is not writable: {parent}; choose a writable directory")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Atomically save ``model`` to ``path`` and return the path.

    ``external_data``: None = automatic (external when the model would exceed
    protobuf's 2 GB), True = weights (initializers >= 1 KiB) in
    ``<name>.data`` beside the output, False = one file (a ModelSaveError if
    that is over 2 GB). The IR version is clamped to what onnxruntime accepts
    (see :func:`clamp_versions`; UnsupportedModelError for a too new opset).
    With ``check``, the written model must pass the ONNX checker and load in an
    onnxruntime CPU session before anything at ``path`` is replaced (a single
    file over 64 MiB is checked through its sparse twin). The caller's model
    is not modified. With external data the data file is renamed into place
    before the model file; a crash between the two renames can leave a
    previous output's .onnx next to the new .data. A stale ``<name>.data``
    from an earlier external save is left alone by a single-file save.
    """
    p = Path(path)
    _check_output_path(p)
    _check_no_unloaded_external(model)
    ir_version = _target_ir_version(model)
    estimate = _estimate_serialized_size(model)
    if external_data is None:
        external_data = estimate > EXTERNAL_THRESHOLD
    elif not external_data and estimate > EXTERNAL_THRESHOLD:
        raise ModelSaveError(
            f"the model is about {estimate / 2**30:.1f} GB, over protobuf's 2 GB limit for a single file; "
            "save it with external data"
        )
    data_name = f"{p.name}.data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-{os.getpid()}-", dir=p.parent))
    except OSError as e:
        raise ModelSaveError(
            f"cannot write to output directory {p.parent}: {e.strerror or e}; choose a writable directory"
        ) from None
    try:
        tmp_model = tmp_dir / p.name
        if external_data:
            write_external(model, tmp_model, data_name, ir_version)
            if check:  # the .onnx is small; onnxruntime memory-maps the aligned data
                _run_checker(tmp_model, "the saved model", ModelSaveError)
                check_with_runtime(tmp_model)
        else:
            write_inline(model, tmp_model, ir_version)
            if check and estimate <= _DIRECT_LIMIT:
                _run_checker(tmp_model, "the saved model", ModelSaveError)
                check_with_runtime(tmp_model)
            elif check:
                _check_twin(model, tmp_dir, "the saved model", ModelSaveError, runtime=True, ir_version=ir_version)
        if external_data:
            os.replace(tmp_dir / data_name, p.parent / data_name)
        os.replace(tmp_model, p)
    except OSError as e:
        raise ModelSaveError(
            f"cannot write {p}: {e.strerror or e}; check free space and permissions of {p.parent}"
        ) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return p
