"""What a model expects as input, and checking data against it.

:func:`feed_specs` reads each graph input's element type and shape (and
whether an initializer gives it a default); :func:`validate_input` checks one
array against its spec and casts it, raising one-line
:class:`~onnxfold.errors.CalibrationDataError` s; :func:`fixed_batch_of` is
the batch size the model fixes, if any. Used by every data source
(:mod:`.data`, :mod:`.raydata`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxfold.errors import CalibrationDataError, UnsupportedModelError

__all__ = ["FeedSpec", "feed_specs", "model_inputs", "validate_input", "fixed_batch_of"]


class FeedSpec:
    """One graph input: element type, dims (None = dynamic) and whether it has a default."""

    __slots__ = ("name", "elem_type", "dims", "optional")

    def __init__(self, name: str, elem_type: int, dims: list | None, optional: bool):
        self.name = name
        self.elem_type = elem_type  # 0 when unknown / not a tensor
        self.dims = dims  # None: rank unknown; else list of int (fixed) or None (dynamic)
        self.optional = optional  # has an initializer default

    @property
    def np_dtype(self) -> np.dtype | None:
        if not self.elem_type:
            return None
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except Exception:
            return None

    def shape_str(self) -> str:
        if self.dims is None:
            return "unknown"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def feed_specs(model: onnx.ModelProto) -> dict[str, FeedSpec]:
    """The spec of every graph input, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, FeedSpec] = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        elem = tt.elem_type if tt is not None else 0
        dims = None
        if tt is not None and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out[vi.name] = FeedSpec(vi.name, elem, dims, vi.name in inits)
    return out


def model_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the inputs a feed must provide (graph inputs minus initializers)."""
    return [s.name for s in feed_specs(model).values() if not s.optional]


def _kind(dt: np.dtype) -> str:
    if dt.kind == "f":
        return "float"
    if dt.kind in "iu":
        return "integer"
    if dt.kind == "b":
        return "bool"
    if dt.kind in "USO":
        return "string"
    return dt.kind


def validate_input(name: str, arr: np.ndarray, spec: FeedSpec, what: str) -> np.ndarray:
    """``arr`` checked against ``spec`` (dtype kind, rank, fixed dims, finite values) and cast to its dtype."""
    want = spec.np_dtype
    if want is not None and want.kind not in "USO":
        have_k, want_k = _kind(arr.dtype), _kind(want)
        if have_k != want_k:
            raise CalibrationDataError(
                f"{what} input '{name}' has {arr.dtype} ({have_k}) data but the model expects {want} ({want_k});"
                f" convert it with .astype('{want.name}') (after any preprocessing the model expects)"
            )
        if arr.dtype != want:
            if want_k == "integer" and arr.size:
                info = np.iinfo(want)
                lo, hi = arr.min(), arr.max()
                if lo < info.min or hi > info.max:
                    raise CalibrationDataError(
                        f"{what} input '{name}' has values in [{lo}, {hi}] that do not fit the model's {want};"
                        " fix the data range"
                    )
            with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as Inf below
                arr = arr.astype(want)
    if spec.dims is not None:
        if arr.ndim != len(spec.dims):
            raise CalibrationDataError(
                f"{what} input '{name}' has rank {arr.ndim} (shape {list(arr.shape)}) but the model expects rank"
                f" {len(spec.dims)} (shape {spec.shape_str()}); the first axis must be the sample axis"
            )
        for ax in range(1, arr.ndim):
            d = spec.dims[ax]
            if d is not None and arr.shape[ax] != d:
                raise CalibrationDataError(
                    f"{what} input '{name}' has size {arr.shape[ax]} on axis {ax} (shape {list(arr.shape)}) but the"
                    f" model expects {d} (shape {spec.shape_str()}); reshape or preprocess the data to match"
                )
    if arr.dtype.kind == "f" and arr.size:
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            nan = int(np.count_nonzero(np.isnan(arr)))
            raise CalibrationDataError(
                f"{what} input '{name}' has {bad} non-finite values ({nan} NaN, {bad - nan} Inf"
                f"{' after casting to ' + str(arr.dtype) if spec.np_dtype is not None else ''}); clean or drop those samples"
            )
    return arr


def fixed_batch_of(arrays: Mapping[str, np.ndarray], specs: dict[str, FeedSpec]) -> int | None:
    """The batch size the model fixes for the inputs in ``arrays`` (None: dynamic)."""
    fixed: dict[str, int] = {}
    for name in arrays:
        spec = specs.get(name)
        if spec is not None and spec.dims and spec.dims[0] is not None:
            fixed[name] = spec.dims[0]
    if not fixed:
        return None
    vals = set(fixed.values())
    if len(vals) > 1:
        desc = ", ".join(f"'{k}' {v}" for k, v in fixed.items())
        raise UnsupportedModelError(
            f"the model's inputs fix different batch sizes ({desc}); onnxfold cannot batch them together"
        )
    return vals.pop()
