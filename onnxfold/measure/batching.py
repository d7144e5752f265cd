"""Models whose batch axis is fixed at 1, run in batches anyway.

Exported detectors often fix the batch axis at 1; run as they are, every
calibration sample is one onnxruntime call, and per-call overhead then costs
far more than the arithmetic. :func:`batchable_copy` makes a copy with a
symbolic batch axis (graph inputs and outputs, and Reshape targets that
spell the batch as a literal 1), and keeps it only when it gives the same
outputs as the original run one sample at a time on a probe batch - a graph
that mixes samples (a reduction over the batch axis, a reshape that folds it
away) fails the probe and the original is run per sample.
:func:`restore_fixed_batch` gives a model derived from the copy back the
original's fixed input and output shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

BATCH_DIM = "batch"
#: samples in the probe batch
PROBE_SAMPLES = 8
#: the copy's outputs may differ from per-sample runs by float rounding only
#: (a batched product may sum in another order)
PROBE_RTOL, PROBE_ATOL = 1e-5, 1e-6


@dataclass
class BatchableCopy:
    model: onnx.ModelProto
    reshape_targets: dict[str, onnx.TensorProto]  # initializer name -> the original's value


def _leading_one(vi: onnx.ValueInfoProto) -> bool:
    tt = vi.type.tensor_type
    return vi.type.HasField("tensor_type") and tt.HasField("shape") and len(tt.shape.dim) > 0 \
        and tt.shape.dim[0].HasField("dim_value") and tt.shape.dim[0].dim_value == 1


def symbolic_batch(model: onnx.ModelProto) -> BatchableCopy:
    """A copy of ``model`` whose leading dims of 1 (graph inputs and outputs)
    are the symbolic ``batch``; Reshape targets held in initializers that
    start with a literal 1 start with 0 (copy the input's batch) instead;
    intermediate shapes are left to onnxruntime to infer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    for vi in [*g.input, *g.output]:
        if vi.name not in inits and _leading_one(vi):
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    for vi in g.value_info:
        vi.type.tensor_type.ClearField("shape")
    targets: dict[str, onnx.TensorProto] = {}
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        shape = numpy_helper.to_array(inits[name])
        if shape.ndim == 1 and shape.size > 1 and shape[0] == 1 and name not in targets:
            original = onnx.TensorProto()
            original.CopyFrom(inits[name])
            targets[name] = original
            shape = shape.copy()
            shape[0] = 0  # allowzero is 0 by default: 0 copies the input's dim
            inits[name].CopyFrom(numpy_helper.from_array(shape, name))
    return BatchableCopy(out, targets)


def restore_fixed_batch(model: onnx.ModelProto, original: onnx.ModelProto, copy: BatchableCopy) -> onnx.ModelProto:
    """``model`` (derived from ``copy``) with the original's graph input and
    output shapes and Reshape targets where the names still exist."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = {vi.name: vi.type for vi in [*original.graph.input, *original.graph.output]}
    for vi in [*out.graph.input, *out.graph.output]:
        if vi.name in shapes:
            vi.type.CopyFrom(shapes[vi.name])
    for t in out.graph.initializer:
        if t.name in copy.reshape_targets:
            t.CopyFrom(copy.reshape_targets[t.name])
    return out


def batchable_copy(model: onnx.ModelProto, data, providers: list[str]) -> tuple[BatchableCopy | None, str | None]:
    """(the copy with a symbolic batch axis, None) when it reproduces the
    per-sample outputs of ``model`` on the first samples of ``data`` (a
    CalibrationSet of a model with a fixed batch of 1); else (None, a note
    saying the model runs one sample at a time)."""
    from onnxfold.profile import stage
    from onnxfold.runtime import create_session

    from onnxfold.runtime import quiet_run_options

    n = min(PROBE_SAMPLES, data.num_samples)
    probe = data.subset(np.arange(n))
    feeds = [dict(f) for f in probe.batches(1)]
    copy = symbolic_batch(model)
    why = None
    with stage("calibration"):
        try:
            fixed_sess, batched_sess = create_session(model, providers), create_session(copy.model, providers)
            names = [o.name for o in fixed_sess.get_outputs() if o.type.startswith("tensor")]
            per_sample = [fixed_sess.run(names, f, quiet_run_options()) for f in feeds]
            batch = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
            batched = batched_sess.run(names, batch, quiet_run_options())
        except Exception:  # noqa: BLE001 - whatever fails, the original still runs per sample (and reports data errors)
            why = "a copy with a symbolic batch axis does not run in batches"
        else:
            for i, name in enumerate(names):
                one = np.concatenate([np.asarray(p[i]) for p in per_sample])
                many = np.asarray(batched[i])
                if one.shape != many.shape or not np.allclose(many, one, rtol=PROBE_RTOL, atol=PROBE_ATOL):
                    why = f"a copy with a symbolic batch axis gives other outputs ('{name}') than per-sample runs"
                    break
    if why is None:
        return copy, None
    return None, (f"the model's batch axis is fixed at 1 and {why}: calibration and verification run one "
                  "sample at a time (slower)")


def run_in_batches(model: onnx.ModelProto, sets: list, providers: list[str]
                   ) -> tuple[onnx.ModelProto, BatchableCopy | None, str | None]:
    """For the data ``sets`` (CalibrationSets or None) of ``model``: when the
    model's batch axis is fixed at 1 and :func:`batchable_copy` passes its
    probe, (the copy, the copy's record, None) and the sets batch freely from
    now on; else (``model``, None, a note when the model runs per sample)."""
    fixed = [s for s in sets if s is not None and s.fixed_batch == 1]
    if not fixed:
        return model, None, None
    copy, note = batchable_copy(model, fixed[0], providers)
    if copy is None:
        return model, None, note
    for s in fixed:
        s.fixed_batch = None
    return copy.model, copy, None
