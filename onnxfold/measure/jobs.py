"""A statistics job and how it runs in one process.

A pass that needs statistics of some tensors over the calibration data
describes them as a :class:`StatsJob`; :func:`run_stats_job` streams the data
through the job's models in this process, batch by batch.
:mod:`onnxfold.distributed` chooses where jobs run (this process, or shards on
Ray actors, which call :func:`run_stats_job` on their part and whose results
:func:`merge_accumulators` adds up).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .data import CalibrationSet, batch_samples
from .stream import model_digest, needed_part, stream_tensors
from .suffix import TensorMemo, suffix_part

__all__ = ["Accumulators", "UpdateFn", "StatsJob", "KeyedModel", "part_of", "model_of", "StreamMemo", "merge_accumulators",
           "run_stats_job"]

#: accumulators by name; every value has ``merge(other)`` (in place, returns self)
Accumulators = dict[str, Any]
#: update(accumulators, index of the batch's first sample in the data, feed, labels, tensors per model)
UpdateFn = Callable[[Accumulators, int, dict, Any, list], None]


class KeyedModel:
    """A model a job runs, built on first use, with its content key known
    beforehand (what :func:`model_digest` of it gives): a replayed stream
    (:class:`StreamMemo`) then needs neither the model nor its digest. For the
    parts of the model a search started from, whose digests the search
    computes once (``passes.cache.SearchCache.input_digest``)."""

    def __init__(self, build: Callable[[], onnx.ModelProto], key: Hashable, whole: onnx.ModelProto | None = None):
        self._build, self.key = build, key
        self._model: onnx.ModelProto | None = None
        #: the model this is a part of (:func:`part_of`): a suffix run plans on it (``measure.suffix``)
        self.whole = whole

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = self._build()
        return self._model


def part_of(whole: onnx.ModelProto, tensors: Mapping[str, Any], key: Hashable = None) -> KeyedModel:
    """The part of ``whole`` that computes ``tensors`` (name → dtype: ``stream.needed_part``),
    built when a run needs it. A run that starts from recorded tensors plans
    on ``whole`` instead: what the part's run computes that the rest of the
    model reads (its frontier) is only known there. ``key``: see :class:`KeyedModel`."""
    tensors = dict(tensors)
    return KeyedModel(lambda: needed_part(whole, tensors), key, whole)


def model_of(model: onnx.ModelProto | KeyedModel) -> onnx.ModelProto:
    """The ModelProto of a job's model (building a :class:`KeyedModel`)."""
    return model.model if isinstance(model, KeyedModel) else model


@dataclass
class StatsJob:
    """One streamed run: ``models`` (model, tensor names) run in lockstep over
    the same batches; ``init()`` makes empty accumulators; ``update`` adds a
    batch. On Ray, ``init`` and ``update`` are pickled to the workers: make
    them module-level functions (or ``functools.partial`` of them) holding no
    model or data."""

    models: Sequence[tuple[onnx.ModelProto | KeyedModel, Sequence[str]]]
    init: Callable[[], Accumulators]
    update: UpdateFn
    #: indices into ``models`` of the ones that give the same tensors every time they run on the
    #: same data (parts of the model a search started from): a :class:`StreamMemo` may replay them
    replayable: tuple[int, ...] = ()


#: what a :class:`StreamMemo` holds by default, all streams together
STREAM_MEMO_BYTES = 1 << 30


class StreamMemo:
    """Recorded streams of models that a budget search runs again and again
    on the same data: the original model's parts, which every candidate's
    refit reads its targets from. A stream is keyed by the part's content
    (its serialized bytes), the tensors, the data object and the batching, so
    a replay yields exactly the arrays a fresh run would. The least recently
    used streams go first past ``max_bytes``; a stream larger than half of it
    is never recorded (it would push out everything else)."""

    def __init__(self, max_bytes: int | None = None, tensors: TensorMemo | None = None):
        self.max_bytes = STREAM_MEMO_BYTES if max_bytes is None else max_bytes
        #: the frontiers of the other models' runs, which later runs start from (``measure.suffix``)
        self.tensors = tensors
        self.bytes = 0
        self.replays = 0
        self._streams: OrderedDict[Hashable, tuple[list, int]] = OrderedDict()
        self._data: dict[int, Any] = {}  # keeps each keyed data object alive, so its id is not reused

    def key(self, model: onnx.ModelProto | KeyedModel, names: Sequence[str], data: CalibrationSet, batch_size: int,
            providers: list[str] | None, first_sample: int) -> Hashable:
        self._data[id(data)] = data
        digest = model.key if isinstance(model, KeyedModel) and model.key is not None else model_digest(model_of(model))
        return digest, tuple(names), id(data), batch_size, tuple(providers or ()), first_sample

    def get(self, key: Hashable) -> list | None:
        entry = self._streams.get(key)
        if entry is None:
            return None
        self._streams.move_to_end(key)
        self.replays += 1
        return entry[0]

    def put(self, key: Hashable, batches: list, size: int) -> None:
        if size > self.max_bytes // 2 or key in self._streams:
            return
        self._streams[key] = (batches, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._streams.popitem(last=False)
            self.bytes -= dropped


class _Recording:
    """The batches of one stream as it runs (of the tensors ``names``, or all),
    and their bytes; ``batches`` is None once they passed ``limit`` (too large
    to keep)."""

    def __init__(self, limit: int, names: list[str] | None = None):
        self.limit, self.names = limit, names
        self.batches: list | None = []
        self.size = 0

    def add(self, tensors: dict) -> None:
        if self.batches is None:
            return
        batch = tensors if self.names is None else {n: tensors[n] for n in self.names}
        self.size += sum(np.asarray(v).nbytes for v in batch.values())
        if self.size > self.limit:
            self.batches = None
            return
        for value in batch.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # replayed later: an update must not change it in place
        self.batches.append(batch)

    def wrap(self, stream: Iterator) -> Iterator:
        for feed, labels, tensors in stream:
            self.add(tensors)
            yield feed, labels, tensors


def _replayed(batches: list, data: CalibrationSet, batch_size: int,
              progress: Callable[[int, int], None] | None) -> Iterator:
    total, done = data.num_samples, 0
    for (feed, labels), tensors in zip(data.labeled_batches(batch_size), batches):
        done += batch_samples(feed)
        if progress is not None:
            progress(done, total)
        yield feed, labels, tensors


def merge_accumulators(into: Accumulators, other: Accumulators) -> Accumulators:
    """Add ``other``'s accumulators into ``into``, name by name (in place; returns ``into``)."""
    if into.keys() != other.keys():
        raise ValueError(f"cannot merge accumulators {sorted(into)} and {sorted(other)}")
    for name, acc in into.items():
        acc.merge(other[name])
    return into


def run_stats_job(job: StatsJob, data: CalibrationSet, *, batch_size: int, providers: list[str] | None,
                  first_sample: int = 0, progress: Callable[[int, int], None] | None = None,
                  intra_op_threads: int | None = None, memo: StreamMemo | None = None) -> Accumulators:
    """Run ``job`` over ``data`` in this process. ``first_sample``: index of
    ``data``'s first sample in the whole data set (a shard's offset), which
    ``update`` receives per batch. ``intra_op_threads``: see ``stream_tensors``.
    ``memo``: replays the job's replayable models from an earlier run, or
    records them for a later one."""
    accs = job.init()
    streams, finish = [], []  # finish: what to keep of the runs once they are done
    for i, (model, names) in enumerate(job.models):
        shown = progress if i == 0 else None
        key = None
        if memo is not None and i in job.replayable:
            key = memo.key(model, names, data, batch_size, providers, first_sample)
            batches = memo.get(key)
            if batches is not None:
                streams.append(_replayed(batches, data, batch_size, shown))
                continue
        frontiers = None if memo is None else memo.tensors
        # a part is planned on the model it is a part of; another model must yield what a full run yields
        whole = model.whole if isinstance(model, KeyedModel) and model.whole is not None else None
        if frontiers is not None and frontiers.usable(whole or model_of(model), names, part=whole is not None):
            stream = _suffix_stream(frontiers, whole or model_of(model), list(names), data, batch_size, providers,
                                    first_sample, shown, intra_op_threads, finish)
        else:
            stream = stream_tensors(model_of(model), list(names), data, batch_size=batch_size, providers=providers,
                                    progress=shown, intra_op_threads=intra_op_threads)
        if key is not None:
            rec = _Recording(memo.max_bytes // 2)
            finish.append(lambda key=key, rec=rec: rec.batches and memo.put(key, rec.batches, rec.size))
            stream = rec.wrap(stream)
        streams.append(stream)
    start = first_sample
    for batches in zip(*streams):
        feed, labels, _ = batches[0]
        job.update(accs, start, feed, labels, [tensors for _f, _l, tensors in batches])
        start += batch_samples(feed)
    for keep in finish:
        keep()
    return accs


def _suffix_stream(memo, model: onnx.ModelProto, names: list[str], data: CalibrationSet, batch_size: int,
                   providers, first_sample: int, progress, intra_op_threads, finish: list) -> Iterator:
    """``model``'s ``names`` over ``data``, run from the tensors ``memo`` recorded
    of an earlier run where it shares them (only the nodes after them run), its
    own frontier recorded for the next run (:mod:`onnxfold.measure.suffix`).
    Yields what :func:`stream_tensors` yields for ``names``."""
    key = memo.key(data, batch_size, providers, first_sample)
    plan = memo.plan(key, model, names)
    frontier = memo.frontier(model, names, plan)
    rec = _Recording(memo.max_bytes // 2, frontier)
    finish.append(lambda: rec.batches and memo.record(key, model, rec.batches))
    run = list(dict.fromkeys([*names, *frontier]))
    if plan.nodes == 0:  # every tensor asked for was recorded (or is an input or a weight): nothing to run
        stream = _leaves_only(model, run, list(plan.leaf_batches()), data, batch_size, progress)
    else:
        stream = stream_tensors(suffix_part(model, run, plan.leaves), run, data, batch_size=batch_size,
                                providers=providers, progress=progress, intra_op_threads=intra_op_threads,
                                extra_feeds=list(plan.leaf_batches()) if plan.leaves else None)
    for feed, labels, tensors in stream:
        rec.add(tensors)
        yield feed, labels, {n: tensors[n] for n in names}


def _leaves_only(model: onnx.ModelProto, names: list[str], leaves: list[dict], data: CalibrationSet,
                 batch_size: int, progress) -> Iterator:
    """A stream whose tensors are all recorded leaves (``leaves``: one dict per
    batch, or none), graph inputs or initializers."""
    from ..tensors import tensor_array

    inits = {t.name: t for t in model.graph.initializer}
    total, done = data.num_samples, 0
    for i, (feed, labels) in enumerate(data.labeled_batches(batch_size)):
        tensors = dict(leaves[i]) if leaves else {}
        for n in names:
            if n not in tensors:
                tensors[n] = feed[n] if n in feed else tensor_array(inits[n])
        done += batch_samples(feed)
        if progress is not None:
            progress(done, total)
        yield feed, labels, tensors
