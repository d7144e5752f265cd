"""Helpers shared by the benchmark scripts in tools/ (not a public API)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
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


def model_arguments(description: str, models, wait_s: float = 0.0) -> argparse.ArgumentParser:
    """The options every per-model benchmark takes: where the models are, where
    results go, which models, how long to wait for them to appear."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--only", action="append", choices=models)
    ap.add_argument("--wait", type=float, default=wait_s, help="seconds to wait for the models to appear")
    return ap


def ready_models(args, models) -> list[str]:
    """The requested models that exist (waiting up to --wait), saying which are missing."""
    names = args.only or list(models)
    ready = wait_for(args.models, names, args.wait)
    missing = [n for n in names if n not in ready]
    if missing:
        print(f"models not found in {args.models}: {', '.join(missing)}; benchmarking the others", flush=True)
    return ready


def footer(total_seconds: float, checks) -> list[str]:
    """A results file's last lines: the total time and the checks."""
    return ["", f"Total benchmark time: {total_seconds:.0f} s.", "", "## Checks", ""] + [f"- {c}" for c in checks]


@dataclass
class ResultsRun:
    """One benchmark run that writes ``OUT/<stem>.md`` and ``OUT/<stem>.json``:
    where results go (``--out``), when and where it ran, its checks."""

    out: Path
    when: str = field(default_factory=lambda: dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    where: str = field(default_factory=machine)
    started: float = field(default_factory=time.perf_counter)
    checks: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, description: str, argv=None, add_options=None) -> tuple["ResultsRun", argparse.Namespace]:
        """Parse ``--out`` (and what ``add_options(parser)`` adds) and start the clock."""
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
        if add_options is not None:
            add_options(ap)
        args = ap.parse_args(argv)
        return cls(args.out), args

    def check(self, what: str, ok: bool) -> None:
        self.checks.append(f"CHECK {what}: {'PASS' if ok else 'FAIL'}")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def passed(self) -> bool:
        return all(c.endswith("PASS") for c in self.checks)

    def write(self, stem: str, markdown: str, result: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{stem}.md").write_text(markdown)
        (self.out / f"{stem}.json").write_text(
            json.dumps({"generated": self.when, "machine": self.where, **result}, indent=1) + "\n")
        print(f"wrote {self.out / (stem + '.md')} and {self.out / (stem + '.json')} ({self.seconds:.0f}s)")
