"""onnxruntime sessions: provider choice, session creation, input specs.

``resolve_provider`` decides between CUDA and CPU once per process by
really running a tiny model on CUDA (an installed ``onnxruntime-gpu`` lists
the CUDA provider even on machines where it cannot load). The probe is
silent: onnxruntime's C++ logger writes straight to file descriptor 2, so
fd 2 is pointed at a temporary file during the probe and what was written
there becomes the one-line reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from onnxfold.errors import ANSI_ESCAPE, ModelLoadError, UnsupportedModelError, UsageError, ort_message

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# ModelProtos above this go to onnxruntime through a file, not as bytes
SESSION_BYTES_LIMIT = 512 * 2**20

_LOG_PREFIX = re.compile(r"^\S+ \S+ \[[EWIVF]:onnxruntime:[^\]]*\]\s*(?:\S+\.(?:cc|cpp|h):\d+ \S+\]\s*)?")


# --------------------------------------------------------------------------
# providers


@contextlib.contextmanager
def _capture_fd2():
    """Point file descriptor 2 at a temp file; yields a list that receives
    the captured text once the block ends (fd 2 restored)."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield captured
            finally:
                try:
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001
                    pass
                os.dup2(saved, 2)
                tmp.seek(0)
                captured.append(tmp.read(64 * 1024).decode("utf-8", "replace"))
    finally:
        os.close(saved)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "cuda_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model.SerializeToString()


def _reason_from_log(log: str) -> str | None:
    lines = [ANSI_ESCAPE.sub("", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        m = re.search(r"Failed to load library (\S+) with error: (.*)$", ln)
        if m:
            return f"cannot load {os.path.basename(m.group(1))}: {m.group(2).strip()}"
    errors = [ln for ln in lines if "[E:" in ln or "[F:" in ln] or [ln for ln in lines if "[W:" in ln] or lines
    if not errors:
        return None
    msg = _LOG_PREFIX.sub("", errors[0])
    return ort_message(msg, limit=200)


@functools.lru_cache(maxsize=1)
def _cuda_probe() -> tuple[bool, str]:
    """(usable, reason when not). Runs once per process."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ok, reason = False, None
    ort.set_default_logger_severity(3)
    try:
        with _capture_fd2() as log, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                session = ort.InferenceSession(_probe_model(), so, providers=[CUDA])
                if session.get_providers()[0] == CUDA:
                    x = np.arange(4, dtype=np.float32)
                    (y,) = session.run(None, {"x": x})
                    ok = bool(np.array_equal(y, 2 * x))
                    if not ok:
                        reason = "a test run on CUDA gave wrong results"
                del session
            except Exception as e:  # noqa: BLE001
                reason = ort_message(e, limit=200)
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)
    if ok:
        return True, ""
    logged = _reason_from_log(log[0] if log else "")
    if logged and logged.startswith("cannot load "):  # a missing CUDA/cuDNN library says it best
        return False, logged
    return False, reason or logged or "onnxruntime fell back to CPU without saying why"


def resolve_provider(provider: str = "auto") -> tuple[list[str], str | None]:
    """Execution providers for sessions, and an optional one-line notice.

    "cpu": CPU only. "cuda": CUDA (CPU as fallback for ops CUDA lacks); a
    UsageError if CUDA does not really work here. "auto": CUDA when a probe
    model really runs on it, else CPU plus a notice saying why.
    """
    choice = str(provider).strip().lower()
    if choice not in PROVIDER_CHOICES:
        raise UsageError(f"unknown provider '{provider}'; use one of: auto, cpu, cuda")
    if choice == "cpu":
        return [CPU], None
    ok, reason = _cuda_probe()
    if ok:
        return [CUDA, CPU], None
    if choice == "cuda":
        raise UsageError(f"CUDA execution provider requested but not usable here: {reason}; use --provider cpu")
    return [CPU], f"CUDA not available ({reason}); running on CPU"


# --------------------------------------------------------------------------
# sessions


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container or
    ``taskset`` may allow fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _session_options(intra_op_threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if intra_op_threads is not None and intra_op_threads < 0:
        raise UsageError(f"thread count must be >= 0, got {intra_op_threads}")
    # onnxruntime's default counts the machine's cores, not the ones this
    # process may use; and its idle workers spin, taking the cores that the
    # statistics and fits between two runs need: calibration alternates the two
    so.intra_op_num_threads = usable_cores() if intra_op_threads is None else int(intra_op_threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class SessionCache:
    """onnxruntime sessions by content: the serialized model bytes (SHA-1),
    the providers and the thread count. A budget search streams the same model
    parts again and again - the original model's part that computes a refit's
    targets is the same for every candidate, and so is every part upstream of
    the layers a candidate changes - and building a session (graph
    optimisation, kernel setup) costs as much as running a small one.
    A session's outputs depend only on those bytes and options, so a reused
    session gives bit-identical results. Least recently used dropped first;
    only models up to ``max_model_bytes`` are kept, and they run without
    onnxruntime's memory arena (see :func:`create_session`)."""

    def __init__(self, max_sessions: int = 16, max_bytes: int = 256 * 2**20):
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self._sessions: dict = {}  # key -> (session, model bytes), in use order (dicts keep insertion order)
        self.bytes = 0
        self.hits = self.misses = 0

    def keeps(self, model_bytes: int) -> bool:
        """Whether a model of this size is cached (a bigger one is built every time)."""
        return model_bytes <= self.max_bytes // 4

    def clear(self) -> None:
        self._sessions.clear()
        self.bytes = 0

    def get_or_build(self, key, size: int, build):
        if key in self._sessions:
            self.hits += 1
            self._sessions[key] = self._sessions.pop(key)  # most recently used last
            return self._sessions[key][0]
        self.misses += 1
        session = build()
        self._sessions[key] = (session, size)
        self.bytes += size
        while len(self._sessions) > 1 and (len(self._sessions) > self.max_sessions or self.bytes > self.max_bytes):
            _, dropped = self._sessions.pop(next(iter(self._sessions)))
            self.bytes -= dropped
        return session


_SESSIONS: contextvars.ContextVar[SessionCache | None] = contextvars.ContextVar("onnxfold_sessions", default=None)


@contextlib.contextmanager
def reusing_sessions(cache: SessionCache | None = None):
    """Within the block, :func:`create_session` returns the same session for
    the same model bytes and options (see :class:`SessionCache`)."""
    token = _SESSIONS.set(cache if cache is not None else SessionCache())
    try:
        yield _SESSIONS.get()
    finally:
        _SESSIONS.reset(token)


def create_session(
    model: onnx.ModelProto | str | os.PathLike,
    providers: list[str],
    *,
    intra_op_threads: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
):
    """An onnxruntime InferenceSession for ``model`` (a ModelProto or a path).

    A ModelProto up to ``SESSION_BYTES_LIMIT`` (512 MiB) is passed as bytes
    (serializing holds it twice more for a moment); a bigger one is written
    with its weights in an aligned external-data file to a temporary directory
    in ``scratch_dir`` (default: the system temp dir - pick a disk, not a
    tmpfs, for huge models), which onnxruntime memory-maps; the files are
    deleted as soon as the session exists. Raises ModelLoadError with
    onnxruntime's message when the session cannot be built.
    """
    import onnxruntime as ort

    from onnxfold.io import load as io_load, sizes as io_sizes, write as io_write
    from onnxfold.tensors import has_deferred

    so = _session_options(intra_op_threads)
    providers = list(providers)

    def build(source):
        try:
            return ort.InferenceSession(source, so, providers=providers)
        except Exception as e:  # noqa: BLE001
            msg = ort_message(e)
            hint = ("; onnxfold must run the model in onnxruntime to measure it: replace the op with standard ONNX "
                    "ops, or run without calibration data (exact rewrites only) and save from Python with "
                    "onnxfold.io.save_model(result.model, path, check=False)"
                    if "is not a registered function/op" in msg else "")
            raise ModelLoadError(f"onnxruntime cannot create a session for the model: {msg}{hint}") from None

    if not isinstance(model, onnx.ModelProto):
        p = Path(model)
        if not p.is_file():
            raise ModelLoadError(f"model file not found: {p}")
        return build(str(p))
    deferred = has_deferred(model)  # weights left on disk by load_model: copied into the scratch files
    if io_load.model_has_external_data(model) and not deferred:
        raise ModelLoadError(
            "the model still references external data that was never loaded; "
            "load it with onnxfold.io.load_model or pass the model's path"
        )
    if not deferred and io_sizes.estimate_serialized_size(model) <= min(SESSION_BYTES_LIMIT, io_sizes.EXTERNAL_THRESHOLD):
        data = model.SerializeToString()
        try:
            cache = _SESSIONS.get()
            if cache is None or not cache.keeps(len(data)):
                return build(data)
            key = (hashlib.sha1(data).hexdigest(), tuple(providers), so.intra_op_num_threads)
            # a kept session would keep its memory arena too, grown to the largest batch it ran: sixteen
            # of them held gigabytes of idle activations (a 3.5 MB decoder's search peaked at 8 GB)
            so.enable_cpu_mem_arena = False
            return cache.get_or_build(key, len(data), lambda: build(data))
        finally:
            del data
    tmp = Path(tempfile.mkdtemp(prefix="onnxfold-session-", dir=scratch_dir))
    try:
        path = tmp / "model.onnx"
        try:
            io_write.write_external(model, path, "model.onnx.data", durable=False)
        except OSError as e:
            raise ModelLoadError(
                f"cannot write the model to {tmp} for onnxruntime: {e.strerror or e}; "
                "free space or choose another scratch directory"
            ) from None
        return build(str(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class InputSpec(NamedTuple):
    name: str
    shape: list | None  # ints, str (symbolic) or None (unknown) per dim; None = unknown rank
    dtype: np.dtype


def _ort_type_to_dtype(type_str: str, name: str) -> np.dtype:
    m = re.fullmatch(r"tensor\((\w+)\)", type_str)
    if not m:
        raise UnsupportedModelError(
            f"graph input '{name}' has type {type_str}; onnxfold supports tensor inputs only"
        )
    enum = getattr(onnx.TensorProto, m.group(1).upper(), None)
    if enum is None:
        raise UnsupportedModelError(f"graph input '{name}' has unknown element type {m.group(1)}")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(enum))


def input_specs(session_or_model) -> list[InputSpec]:
    """``(name, shape, dtype)`` of every real graph input (initializers
    excluded), from an InferenceSession or a ModelProto. Dynamic dims are the
    symbolic name (str) or None. Non-tensor inputs raise UnsupportedModelError."""
    if isinstance(session_or_model, onnx.ModelProto):
        g = session_or_model.graph
        inits = {t.name for t in g.initializer}
        specs = []
        for vi in g.input:
            if vi.name in inits:
                continue
            if not vi.type.HasField("tensor_type"):
                kind = vi.type.WhichOneof("value") or "unknown"
                raise UnsupportedModelError(
                    f"graph input '{vi.name}' has type {kind}; onnxfold supports tensor inputs only"
                )
            tt = vi.type.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param if d.dim_param else None)
                    for d in tt.shape.dim
                ]
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except Exception:  # noqa: BLE001 - elem_type 0 (undefined) or unknown
                raise UnsupportedModelError(
                    f"graph input '{vi.name}' has no usable element type ({tt.elem_type})"
                ) from None
            specs.append(InputSpec(vi.name, shape, dtype))
        return specs
    if hasattr(session_or_model, "get_inputs"):
        return [
            InputSpec(i.name, [d if isinstance(d, (int, str)) else None for d in i.shape],
                      _ort_type_to_dtype(i.type, i.name))
            for i in session_or_model.get_inputs()
        ]  # fmt: skip
    raise TypeError(f"input_specs needs an InferenceSession or a ModelProto, not {type(session_or_model).__name__}")


# --------------------------------------------------------------------------
# running


def run_error_types() -> tuple:
    """onnxruntime's errors for inputs it rejects or a node that fails on them."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

        return (InvalidArgument, Fail)
    except Exception:  # noqa: BLE001
        return ()


def quiet_run_options():
    """RunOptions that keep onnxruntime from logging node failures to stderr (we raise instead)."""
    import onnxruntime

    ro = onnxruntime.RunOptions()
    ro.log_severity_level = 4  # fatal only
    return ro


def run_error_message(e: Exception) -> str:
    """onnxruntime's error for a failed run as one short line: the differing
    dims of a shape mismatch, or the failing node and its message."""
    text = ort_message(e)
    if text.endswith("for the following indices"):  # the dims that differ follow on the next lines
        detail = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip() and not ln.strip().startswith("Please")]
        text = f"{text}: {'; '.join(detail)}" if detail else text
    # node failures read "Non-zero status code returned while running X node. Name:'n' Status Message: ..."
    if "Status Message:" in text:
        head, _, tail = text.partition("Status Message:")
        node = head[head.find("running"):].strip() if "running" in head else ""
        tail = tail.strip()
        if " was false. " in tail:  # drop the failed C++ condition, keep the explanation
            tail = tail.split(" was false. ", 1)[1]
        text = f"{node} {tail}".strip()
    return text
