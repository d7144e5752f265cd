"""Saving a model atomically: written and checked in a temporary directory, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from onnxfold.errors import ModelSaveError

from . import checks, sizes, versions, write


def default_output_path(input_path: str | os.PathLike) -> Path:
    """``<dir>/<stem>.fold.onnx`` for an input ``<dir>/<stem>.onnx``."""
    p = Path(input_path)
    name = p.name
    if name.lower().endswith(".onnx"):
        name = name[: -len(".onnx")]
    return p.with_name(f"{name}.fold.onnx")


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
    (see :func:`versions.clamp_versions`; UnsupportedModelError for a too new opset).
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
    write.check_no_unloaded_external(model)
    ir_version = versions.target_ir_version(model)
    estimate = sizes.estimate_serialized_size(model)
    if external_data is None:
        external_data = estimate > sizes.EXTERNAL_THRESHOLD
    elif not external_data and estimate > sizes.EXTERNAL_THRESHOLD:
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
            write.write_external(model, tmp_model, data_name, ir_version)
            if check:  # the .onnx is small; onnxruntime memory-maps the aligned data
                checks.run_checker(tmp_model, "the saved model", ModelSaveError)
                checks.check_with_runtime(tmp_model)
        else:
            write.write_inline(model, tmp_model, ir_version)
            if check and estimate <= sizes.DIRECT_LIMIT:
                checks.run_checker(tmp_model, "the saved model", ModelSaveError)
                checks.check_with_runtime(tmp_model)
            elif check:
                checks.check_twin(model, tmp_dir, "the saved model", ModelSaveError, runtime=True, ir_version=ir_version)
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
