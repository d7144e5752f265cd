"""Values a budget search would otherwise compute again for every candidate.

The search turns each candidate setting into a model by running the passes
from the same start. Most of what a pass measures or decomposes does not
depend on the candidate's own setting: the statistics of layer i depend only
on the part of the model that computes its tensors, which is the same for
every candidate that changes nothing upstream of layer i. So a value is keyed
by what it really depends on:

* a model part by its serialized bytes (:func:`model_digest`): the part of the
  current model that computes the measured tensors (``stream.needed_part``) -
  after an upstream rewrite those bytes differ, so a downstream statistic taken
  on the rewritten model never reuses one taken on the original;
* a data split by its identity (the cache holds a reference to every object
  it keyed, so an id cannot be reused by another object while the cache lives);
* a pass's progress by what it did so far (the layers a fold pass folded,
  with their ratios), on top of the digest of the model the pass started from.

A hit returns the very object computed on the miss (accumulators keep their
own cached eigendecompositions), so results are bit-identical to recomputing.
The cache lives for one search (``PassContext.cache``); outside a search it is
``None`` and passes compute as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np
import onnx

from ..measure.jobs import StreamMemo
from ..measure.suffix import TensorMemo
from ..measure.stream import model_digest  # noqa: F401 - keyed by it here, imported from here by the passes

T = TypeVar("T")

#: what the cache may hold (least recently used dropped first): Gram
#: matrices of wide layers are tens of MiB each
MAX_BYTES = 1 << 30
#: input models whose digests are remembered (see SearchCache.input_digest)
DIGESTED_MODELS = 4

class SearchCache:
    def __init__(self, max_bytes: int = MAX_BYTES, memo_bytes: int | None = None):
        """``memo_bytes``: what each memo of streamed activations may hold (None: their default)."""
        self._values: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._kept: dict[int, Any] = {}
        self._digests: OrderedDict[int, tuple[onnx.ModelProto, dict]] = OrderedDict()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        # the original model's streamed tensors, replayed to every candidate (apart: they are large)
        # and the frontiers of the candidates' own runs, which the next run of a pass starts from
        self.streams = StreamMemo(max_bytes=memo_bytes, tensors=TensorMemo(max_bytes=memo_bytes))

    def identity(self, obj: Any) -> int | None:
        """Identity of an object (a data split) for a key; None for None. The
        cache keeps the object alive: only for the few objects a search shares."""
        if obj is None:
            return None
        self._kept[id(obj)] = obj  # keeps the id from being reused while the cache lives
        return id(obj)

    def input_digest(self, model: onnx.ModelProto, key: Hashable, part: Callable[[], onnx.ModelProto]) -> str:
        """:func:`model_digest` of ``part()``, a part of ``model`` named by ``key``,
        computed once per model object while that object is among the last few
        asked about: for a pass's *input* model, which passes never modify
        (most candidates start from the same one). The memo holds the model,
        so its id cannot be reused meanwhile; it holds only a few, so models
        of finished candidates are not kept alive."""
        entry = self._digests.get(id(model))
        if entry is None or entry[0] is not model:
            entry = self._digests[id(model)] = (model, {})
        self._digests.move_to_end(id(model))
        while len(self._digests) > DIGESTED_MODELS:
            self._digests.popitem(last=False)
        if key not in entry[1]:
            entry[1][key] = model_digest(part())
        return entry[1][key]

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key in self._values:
            self._values.move_to_end(key)
            self.hits += 1
            return self._values[key][0]
        self.misses += 1
        value = compute()
        size = _nbytes(value)
        self._values[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._values) > 1:
            _, (_, dropped) = self._values.popitem(last=False)
            self.bytes -= dropped
        return value


class PassScope:
    """What a fold pass's current model is, in a budget search: a function of
    the pass's input model (keyed by its content), its settings and the steps
    it took so far (``steps``: the layers, chains or blocks folded, with their
    ratio or unit count) - the key of the values a pass shares across
    candidates (its refits, an ``obs`` selection's input covariance), far
    cheaper than the bytes of the model after every fold."""

    def __init__(self, ctx, original: onnx.ModelProto, settings: tuple):
        self.ctx, self.original, self.settings = ctx, original, settings
        self.steps: list[tuple[str, Any]] = []

    def key(self, steps: list | None = None) -> tuple | None:
        """The key after ``steps`` (default: every step so far); None outside a search."""
        cache, ctx, original = self.ctx.cache, self.ctx, self.original
        if cache is None:
            return None
        return (cache.input_digest(original, "whole model", lambda: original), self.settings,
                tuple(self.steps if steps is None else steps), cache.identity(ctx.calibration),
                cache.identity(ctx.heldout), ctx.batch_size)


def _nbytes(value: Any, depth: int = 0) -> int:
    """The arrays a cached value holds, roughly (accumulators, tuples, dicts)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if depth > 3:
        return 0
    if isinstance(value, dict):
        return sum(_nbytes(v, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v, depth + 1) for v in value)
    if hasattr(value, "__dict__"):
        return _nbytes(vars(value), depth + 1)
    return 0


def cached(cache: SearchCache | None, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, through ``cache`` when there is one."""
    return compute() if cache is None else cache.get_or_compute(key, compute)
