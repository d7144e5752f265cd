"""The onnxruntime session that tools/build_models.py and tools/byte_decoders.py check models with."""

from __future__ import annotations


def cpu_session(path: str):
    """Single-threaded CPU session: the shipped models' numbers must not depend on the thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
