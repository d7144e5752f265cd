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

The package's modules, each with one job: ``sizes`` (bytes and parameters
without serializing, the size limits), ``wire`` (the protobuf wire format),
``load``, ``write`` (field by field, inline or into a data file), ``checks``
(ONNX checker, onnxruntime load test, the sparse twin), ``versions`` (what the
installed onnxruntime accepts) and ``save`` (atomic).
"""

from .checks import check_with_runtime
from .load import load_model, load_working_copy, model_has_external_data
from .save import default_output_path, save_model
from .sizes import EXTERNAL_THRESHOLD, PROTOBUF_LIMIT, count_parameters, model_bytes
from .versions import clamp_versions, runtime_limits
from .write import write_external, write_inline

__all__ = [
    "EXTERNAL_THRESHOLD", "PROTOBUF_LIMIT", "check_with_runtime", "clamp_versions", "count_parameters",
    "default_output_path", "load_model", "load_working_copy", "model_bytes", "model_has_external_data", "runtime_limits",
    "save_model", "write_external", "write_inline",
]
