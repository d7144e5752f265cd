"""The IR version and opsets the installed onnxruntime accepts, probed at run time."""

from __future__ import annotations

import functools

import onnx
from onnx import TensorProto

from onnxfold.errors import UnsupportedModelError

from . import sizes


def identity_model(ir_version: int, opset: int) -> onnx.ModelProto:
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
                identity_model(ir, opset).SerializeToString(), so, providers=["CPUExecutionProvider"]
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
    opsets = [o.version for o in model.opset_import if o.domain in sizes.DEFAULT_DOMAINS]
    return max(opsets) if opsets else None


def target_ir_version(model: onnx.ModelProto) -> int:
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
    model.ir_version = target_ir_version(model)
    return model
