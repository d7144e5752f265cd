"""What a compression pass is.

A pass is a small object with one job: given a model and a ``PassContext`` it
returns a ``PassResult`` (the new model, whether it changed, and one
``LayerReport`` per hidden layer it looked at). A pass never mutates the model
it is given and never prints; progress goes through ``ctx.progress``.

Inside, passes follow the same four steps: find the chains
(``find.find_dense_graph``), measure what they need (``measure``), decide per
layer (``decide``), and rewrite (``rewrite.apply_edit`` + ``materialize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx


def _local_stats():
    from ..distributed import LocalStats

    return LocalStats()


@dataclass
class PassContext:
    calibration: Any = None  # measure.CalibrationSet used to measure/fit, or None (data-free)
    heldout: Any = None  # CalibrationSet used to choose hyper-parameters (ridge, thresholds), or None
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    batch_size: int = 256
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)
    cache: Any = None  # passes.cache.SearchCache shared by a budget search's candidates, or None
    # where streamed statistics are computed (onnxfold.distributed): this process, or a Ray cluster
    stats_backend: Any = field(default_factory=_local_stats)

    def measure(self, job, data, task: str) -> dict[str, Any]:
        """Accumulators of the statistics ``job`` (a ``distributed.StatsJob``) over ``data``."""
        return self.stats_backend.reduce(job, data, batch_size=self.batch_size, providers=self.providers,
                                         progress=lambda done, total: self.report_progress(task, done, total))

    def report_progress(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)


@dataclass
class LayerReport:
    """One hidden layer as a pass left it. Keys are part of the JSON report."""

    layer: str  # chain name, e.g. "layer0"
    producer: str  # producer node name
    activation: str
    width_before: int
    width_after: int
    linear: int = 0  # neurons moved to a linear path
    constant: int = 0  # neurons removed as constants
    merged: int = 0  # neurons removed by merging into others (folding)
    pruned: int = 0  # neurons dropped by selection (magnitude pruning)
    path_form: str | None = None  # "dense" | "factored" | "svd" | None
    path_rank: int | None = None
    params_before: int = 0  # producer + consumer (+ paths) parameters
    params_after: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(Protocol):
    name: str

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...


#: Share of the calibration samples a least-squares refit holds out to choose
#: its ridge strength (when the context brings no held-out set), and the
#: fewest samples worth splitting.
HELDOUT_SHARE = 0.2
MIN_SAMPLES_TO_SPLIT = 5


def heldout_mask(n: int, seed: int) -> np.ndarray | None:
    """Which of ``n`` calibration samples a refit holds out (seeded); None when too few to split."""
    if n < MIN_SAMPLES_TO_SPLIT:
        return None
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:max(1, round(n * HELDOUT_SHARE))]] = True
    return held
