"""A statistics job and how it runs in one process.

A pass that needs statistics of some tensors over the calibration data
describes them as a :class:`StatsJob`; :func:`run_stats_job` streams the data
through the job's models in this process, batch by batch.
:mod:`onnxfold.distributed` chooses where jobs run (this process, or shards on
Ray actors, which call :func:`run_stats_job` on their part and whose results
:func:`merge_accumulators` adds up).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from .data import CalibrationSet
from .stream import stream_tensors

__all__ = ["Accumulators", "UpdateFn", "StatsJob", "merge_accumulators", "run_stats_job"]

#: accumulators by name; every value has ``merge(other)`` (in place, returns self)
Accumulators = dict[str, Any]
#: update(accumulators, index of the batch's first sample in the data, feed, labels, tensors per model)
UpdateFn = Callable[[Accumulators, int, dict, Any, list], None]


@dataclass
class StatsJob:
    """One streamed run: ``models`` (model, tensor names) run in lockstep over
    the same batches; ``init()`` makes empty accumulators; ``update`` adds a
    batch. On Ray, ``init`` and ``update`` are pickled to the workers: make
    them module-level functions (or ``functools.partial`` of them) holding no
    model or data."""

    models: Sequence[tuple[onnx.ModelProto, Sequence[str]]]
    init: Callable[[], Accumulators]
    update: UpdateFn


def merge_accumulators(into: Accumulators, other: Accumulators) -> Accumulators:
    """Add ``other``'s accumulators into ``into``, name by name (in place; returns ``into``)."""
    if into.keys() != other.keys():
        raise ValueError(f"cannot merge accumulators {sorted(into)} and {sorted(other)}")
    for name, acc in into.items():
        acc.merge(other[name])
    return into


def run_stats_job(job: StatsJob, data: CalibrationSet, *, batch_size: int, providers: list[str] | None,
                  first_sample: int = 0, progress: Callable[[int, int], None] | None = None,
                  intra_op_threads: int | None = None) -> Accumulators:
    """Run ``job`` over ``data`` in this process. ``first_sample``: index of
    ``data``'s first sample in the whole data set (a shard's offset), which
    ``update`` receives per batch. ``intra_op_threads``: see ``stream_tensors``."""
    accs = job.init()
    streams = [stream_tensors(model, list(names), data, batch_size=batch_size, providers=providers,
                              progress=progress if i == 0 else None, intra_op_threads=intra_op_threads)
               for i, (model, names) in enumerate(job.models)]
    start = first_sample
    for batches in zip(*streams):
        feed, labels, _ = batches[0]
        job.update(accs, start, feed, labels, [tensors for _f, _l, tensors in batches])
        start += next(iter(feed.values())).shape[0]
    return accs
