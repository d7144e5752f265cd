"""Checks of a written model: the ONNX checker, an onnxruntime load test, and the sparse twin
that stands in for a big single-file model in both."""

from __future__ import annotations

import contextlib
from pathlib import Path

import onnx

from onnxfold.errors import ModelLoadError, ModelSaveError, ort_message

from . import write


def _checker_message(exc: BaseException, limit: int = 300) -> str:
    """The checker's message without its ``==> Context`` trailer, on one line."""
    text = str(exc).split("==> Context", 1)[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_checker(p: Path, what: str, error: type) -> None:
    try:
        onnx.checker.check_model(str(p))
    except Exception as e:  # noqa: BLE001 - ValidationError, or a C++ parse error
        fix = "; repair or re-export the model" if error is ModelLoadError else ""
        raise error(f"{what} fails the ONNX checker: {_checker_message(e)}{fix}") from None


def check_with_runtime(path: Path, error: type = ModelSaveError, what: str = "the saved model") -> None:
    """Build a CPU onnxruntime session for the model file at ``path`` (no graph
    optimizations, no pre-packing: a load test, not a run) or raise ``error``."""
    import onnxruntime as ort

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


def check_twin(model: onnx.ModelProto, directory: Path, what: str, error: type, *, runtime: bool,
                ir_version: int | None = None) -> None:  # fmt: skip
    """Checker (+ onnxruntime) on a sparse twin of ``model`` written in ``directory``."""
    twin = directory / "twin.onnx"
    write.write_external(model, twin, "twin.onnx.data", ir_version, sparse=True)
    try:
        run_checker(twin, what, error)
        if runtime:
            check_with_runtime(twin, error, what)
    finally:
        for name in ("twin.onnx", "twin.onnx.data"):
            with contextlib.suppress(OSError):
                (directory / name).unlink()
