"""Helpers shared by the benchmark scripts in tools/ (not a public API)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxfold.find import find_dense_graph  # noqa: E402
from onnxfold.measure.stream import run_model  # noqa: E402

PROVIDERS = ["CPUExecutionProvider"]


def dense_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(all dense parameters incl. paths, those of the input layer)."""
    g = model.graph
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    total = input_layer = 0
    for op in find_dense_graph(model).ops.values():
        total += op.num_params
        if op.input in inputs:
            input_layer += op.weight.size + (0 if op.bias is None else op.bias.size)
    return total, input_layer


def logits(model, data) -> np.ndarray:
    out = run_model(model, data, providers=PROVIDERS)
    name = model.graph.output[0].name
    return out[name]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, onnx {onnx.__version__},"
            f" onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)")


def wait_for(models_dir: Path, names, timeout_s: float) -> list[str]:
    """Model names whose .onnx, .calib.npz and .test.npz all exist, waiting up to timeout_s."""
    deadline = time.time() + timeout_s
    while True:
        ready = [n for n in names
                 if all((models_dir / f"{n}{s}").exists() for s in (".onnx", ".calib.npz", ".test.npz"))]
        if len(ready) == len(names) or time.time() > deadline:
            return ready
        print(f"waiting for models in {models_dir} ({len(ready)}/{len(names)} ready)", flush=True)
        time.sleep(15)
