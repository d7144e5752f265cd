"""Loading a model: every way a file can be wrong becomes one ModelLoadError line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnxfold.errors import ModelLoadError, UsageError, first_line
from onnxfold.tensors import defer_initializers, is_deferred
from onnxfold.tensors import iter_graph_tensors as _iter_graph_tensors

from . import checks, sizes, wire
from .versions import clamp_versions


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
            if size <= sizes.DIRECT_LIMIT and skip_fields_over is None:
                model = onnx.ModelProto()
                model.ParseFromString(f.read())
            else:
                model = wire.parse_in_chunks(f, size, skip_fields_over)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}; check its permissions") from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - DecodeError, wire.WireError: a corrupt or foreign file
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
    file_sizes: dict[str, int] = {}
    for t in _iter_graph_tensors(model.graph):
        if not sizes.uses_external(t):
            continue
        info = sizes.external_info(t)
        loc = info.get("location", "")
        if not loc:
            raise ModelLoadError(f"tensor '{t.name}' in {p} uses external data but names no file; re-export the model")
        target = (base / loc).resolve()
        if Path(loc).is_absolute() or (target != base and base not in target.parents):
            raise ModelLoadError(
                f"external data file '{loc}' referenced by {p} lies outside the model's directory; "
                "keep the data file next to the model"
            )
        if loc not in file_sizes:
            if not target.is_file():
                raise ModelLoadError(
                    f"external data file '{loc}' referenced by {p} is missing; keep '{loc}' next to the model"
                )
            file_sizes[loc] = target.stat().st_size
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else sizes.data_nbytes(t)
        except ValueError:
            raise ModelLoadError(
                f"tensor '{t.name}' in {p} has an invalid external-data offset/length; re-export the model"
            ) from None
        if offset < 0 or length < 0 or offset + length > file_sizes[loc]:
            raise ModelLoadError(
                f"external data file '{loc}' referenced by {p} is truncated (tensor '{t.name}' needs bytes "
                f"{offset}..{offset + length}, the file has {file_sizes[loc]}); copy the complete file"
            )


def load_model(path: str | os.PathLike, *, defer_external: bool = False) -> onnx.ModelProto:
    """Load the model at ``path`` with its external data (files next to it).

    ``defer_external=True`` leaves the main graph's external initializers on
    disk (see :mod:`onnxfold.tensors`): the returned model then holds none of
    those weights, and everything in onnxfold reads them when needed. That is
    how the CLI loads a model; save such a model with :func:`onnxfold.io.save_model`.

    Raises ModelLoadError (one line, with the fix) for a missing path, a
    directory, an empty / truncated / corrupt / non-ONNX file, a missing or
    truncated external-data file, or a model the ONNX checker rejects. The
    file is only opened for reading. A file over 64 MiB is parsed in chunks
    and checked through a sparse twin (see the module docstring).
    """
    p = Path(path)
    model = _read_proto(p)
    has_external = any(sizes.uses_external(t) for t in _iter_graph_tensors(model.graph))
    if has_external:
        _check_external_files(model, p)
    if p.stat().st_size <= sizes.DIRECT_LIMIT:
        checks.run_checker(p, f"model {p}", ModelLoadError)  # by path: also checks the data files
    else:
        with tempfile.TemporaryDirectory(prefix="onnxfold-check-") as tmp:
            checks.check_twin(model, Path(tmp), f"model {p}", ModelLoadError, runtime=False)
    if has_external:
        try:
            if defer_external:
                defer_initializers(model, p.parent)
                for t in _iter_graph_tensors(model.graph):  # Constant/attribute tensors: load, they are small
                    if sizes.uses_external(t) and not is_deferred(t):
                        onnx.external_data_helper.load_external_data_for_tensor(t, str(p.parent))
            else:
                onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot read the external data of {p}: {first_line(e)}") from None
    return model


def model_has_external_data(path_or_model: onnx.ModelProto | str | os.PathLike) -> bool:
    """Whether any tensor is stored as external data: in the file as stored
    (for a path) or still referencing external data (for a ModelProto - a
    model from :func:`load_model` has its data loaded, so ``False``)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        # big fields are skipped unread: an external-data stub is small
        model = _read_proto(Path(path_or_model), skip_fields_over=2**20)
    return any(sizes.uses_external(t) for t in _iter_graph_tensors(model.graph))


def load_working_copy(model_or_path) -> tuple[onnx.ModelProto, str | None]:
    """(model, its path or None) for a path or a ModelProto, as the API and
    the plots work on it: a ModelProto is copied (the caller's object is never
    touched), a path is loaded with its external weights left on disk until a
    pass reads them (see :mod:`onnxfold.tensors`); the IR version is lowered to
    what onnxruntime accepts."""
    if isinstance(model_or_path, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model_or_path)
        return clamp_versions(m), None
    if isinstance(model_or_path, (str, Path)):
        return clamp_versions(load_model(model_or_path, defer_external=True)), str(model_or_path)
    raise UsageError(f"expected a path or an onnx.ModelProto, got {type(model_or_path).__name__}")
