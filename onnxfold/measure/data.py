"""Calibration and evaluation data: the in-memory set, batching, splitting, loading.

Reading the sources is :mod:`.sources`, checking them against the model's
inputs :mod:`.inputs`; :func:`load_calibration` puts the two together.

A :class:`CalibrationSet` holds in-memory arrays ``{input_name: array}`` whose
first axis is the sample axis (all inputs the same length), plus optional
``labels`` (first axis = samples as well). User data sets are materialised in
memory; what must never be materialised are the hidden tensors the model
produces from them (see :mod:`onnxfold.measure.stream`).

Conventions
-----------
* The key ``labels`` (in an ``.npz``, a directory as ``labels.npy``, a dict or
  a feed dict) holds labels, unless the model itself has an input named
  ``labels``: then it is that input and the data carries no labels.
* Labels are never fed to the model; :meth:`CalibrationSet.batches` yields feed
  dicts only, :meth:`CalibrationSet.labeled_batches` yields ``(feed, labels)``
  pairs (labels ``None`` when the set has none).
* A model whose batch axis is a fixed 1 (common in exported detectors) accepts
  data with any number of samples; the set records ``fixed_batch_one = True``
  and its batches then hold one sample each, whatever batch size is asked for.
  A batch axis fixed to some other K > 1 is honoured the same way (batches of
  exactly K; the sample count must then be a multiple of K).
* Every problem with the data raises :class:`~onnxfold.errors.CalibrationDataError`
  with one line naming the problem and the fix, before any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxfold.errors import CalibrationDataError, UsageError

from .inputs import FeedSpec, feed_specs, fixed_batch_of, model_inputs, validate_input
from .sources import (
    LABELS_KEY,
    as_array,
    is_ray_source,
    is_shard_dir,
    needs_ray_error,
    quote_names,
    read_feeds,
    read_path,
)

#: fewer calibration samples than this are not split into fit / held-out parts
#: (``onnxfold.api.split_data``; a Ray source that small is gathered into memory)
MIN_SAMPLES_TO_SPLIT = 10

__all__ = ["Batch", "CalibrationSet", "batch_samples", "load_calibration", "load_for_specs", "model_inputs", "LABELS_KEY", "MIN_SAMPLES_TO_SPLIT",
           "SampleCount", "split_indices"]


class SampleCount:
    """``num_samples`` and ``len()`` of a set of samples (``self._n``)."""

    _n: int

    @property
    def num_samples(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n


class Batch(Mapping):
    """One batch of a subset: ``{input name: its rows}``, each input's rows
    gathered from the shared arrays when first read (then kept). A budget
    search streams the same split many times, mostly replaying recorded
    tensors or running only the end of the graph, which read no input; on
    wide inputs gathering them anyway was a large share of its time. Hand
    ``dict(batch)`` to onnxruntime, which takes dicts only."""

    __slots__ = ("_arrays", "_rows", "_got")

    def __init__(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray):
        self._arrays, self._rows = arrays, rows
        self._got: dict[str, np.ndarray] = {}

    @property
    def samples(self) -> int:
        return int(self._rows.size)

    def __getitem__(self, name: str) -> np.ndarray:
        got = self._got.get(name)
        if got is None:
            got = self._got[name] = np.take(self._arrays[name], self._rows, axis=0)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays


def batch_samples(feed: Mapping[str, np.ndarray]) -> int:
    """How many samples a batch (a feed dict or a :class:`Batch`) holds,
    without gathering a subset's rows."""
    if isinstance(feed, Batch):
        return feed.samples
    return next(iter(feed.values())).shape[0]


class CalibrationSet(SampleCount):
    """In-memory samples ``{input_name: array}`` (+ optional labels).

    ``arrays`` maps input names to arrays whose first axis is the sample axis;
    ``labels`` (optional) has the same first-axis length. ``fixed_batch`` is the
    model's fixed batch size (``None`` when the batch axis is dynamic):
    :meth:`batches` then ignores the requested batch size.

    Construct with :func:`load_calibration` to get validation against a model;
    the constructor itself only checks that the sample counts agree.

    A subset (:meth:`subset`, :meth:`split`) shares its parent's arrays and
    holds only the row indices: batches gather their rows when they are made,
    so splitting 100k samples into fit/select/final parts does not copy them
    (reading ``arrays`` or ``labels`` of a subset materialises it). A
    subset's batch is a :class:`Batch` that gathers an input's rows when that
    input is first read: a run replayed from a memo, or started inside the
    graph, reads none of them.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray | None = None,
        *,
        fixed_batch: int | None = None,
        what: str = "calibration",
    ):
        self.what = what
        self._rows: np.ndarray | None = None  # a subset: these rows of the arrays (see the class docstring)
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not self.arrays:
            raise CalibrationDataError(f"{what} data has no inputs; give one array per model input")
        counts = {}
        for name, arr in self.arrays.items():
            if arr.ndim == 0:
                raise CalibrationDataError(
                    f"{what} input '{name}' is a scalar; its first axis must be the sample axis"
                )
            counts[name] = arr.shape[0]
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
            raise CalibrationDataError(
                f"{what} inputs have different numbers of samples ({desc}); give every input the same first-axis length"
            )
        self._n = next(iter(counts.values()))
        if self._n == 0:
            raise CalibrationDataError(f"{what} data has zero samples; give at least one sample")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 0 or labels.shape[0] != self._n:
                got = "a scalar" if labels.ndim == 0 else f"{labels.shape[0]} entries"
                raise CalibrationDataError(
                    f"{what} labels have {got} but the data has {self._n} samples; give one label per sample"
                )
        self._labels: np.ndarray | None = labels
        if fixed_batch is not None and fixed_batch < 1:
            raise ValueError("fixed_batch must be >= 1 or None")
        self.fixed_batch: int | None = fixed_batch

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """``{input name: array}`` of this set's samples (a subset's are gathered: a copy)."""
        if self._rows is None:
            return self._arrays
        return {k: np.take(v, self._rows, axis=0) for k, v in self._arrays.items()}

    @arrays.setter
    def arrays(self, value: Mapping[str, np.ndarray]) -> None:
        self._arrays = dict(value)

    @property
    def labels(self) -> np.ndarray | None:
        if self._labels is None or self._rows is None:
            return self._labels
        return np.take(self._labels, self._rows, axis=0)

    # -- basic facts ---------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._arrays)

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def fixed_batch_one(self) -> bool:
        """True when the model's batch axis is a fixed 1: batches hold one sample."""
        return self.fixed_batch == 1

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{[self._n, *v.shape[1:]]}" for k, v in self._arrays.items())
        lab = "" if self._labels is None else f", labels {[self._n, *self._labels.shape[1:]]}"
        fb = "" if self.fixed_batch is None else f", fixed_batch={self.fixed_batch}"
        return f"CalibrationSet({self._n} samples; {shapes}{lab}{fb})"

    # -- batching ------------------------------------------------------------
    def effective_batch_size(self, batch_size: int) -> int:
        """The batch size :meth:`batches` really uses (the model's fixed one if any)."""
        if self.fixed_batch is not None:
            return self.fixed_batch
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}; give 1 or more")
        return int(batch_size)

    def _ranges(self, batch_size: int) -> Iterator[tuple[int, int]]:
        bs = self.effective_batch_size(batch_size)
        if self.fixed_batch is not None and self._n % bs:
            raise CalibrationDataError(
                f"the model's batch axis is fixed to {bs} but the {self.what} data has {self._n} samples;"
                f" give a multiple of {bs} samples"
            )
        for start in range(0, self._n, bs):
            yield start, min(start + bs, self._n)

    def batches(self, batch_size: int) -> Iterator[Mapping[str, np.ndarray]]:
        """Feed dicts of consecutive samples (views, not copies; a subset's
        are :class:`Batch` mappings); labels excluded.

        With a fixed batch axis in the model (``fixed_batch``), batches hold
        exactly that many samples regardless of ``batch_size``.
        """
        for a, b in self._ranges(batch_size):
            yield self._rows_of(self._arrays, a, b)

    def _rows_of(self, arrays: Mapping[str, np.ndarray], a: int, b: int) -> Mapping[str, np.ndarray]:
        if self._rows is None:
            return {k: v[a:b] for k, v in arrays.items()}
        return Batch(arrays, self._rows[a:b])

    def labeled_batches(self, batch_size: int) -> Iterator[tuple[Mapping[str, np.ndarray], np.ndarray | None]]:
        """Like :meth:`batches` but yields ``(feed, labels_batch)``; labels ``None`` without labels."""
        for a, b in self._ranges(batch_size):
            feed = self._rows_of(self._arrays, a, b)
            labels = None if self._labels is None else self._rows_of({"": self._labels}, a, b)[""]
            yield feed, labels

    # -- subsets -------------------------------------------------------------
    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> "CalibrationSet":
        """A new set with the samples at ``indices`` (ints, boolean mask or slice); shares the arrays."""
        if isinstance(indices, slice):
            idx = np.arange(self._n)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                if idx.shape != (self._n,):
                    raise ValueError(f"boolean mask has shape {idx.shape}, expected ({self._n},)")
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = idx.astype(np.intp)
            elif not np.issubdtype(idx.dtype, np.integer):
                raise ValueError("subset indices must be integers, a boolean mask or a slice")
        if idx.size == 0:
            raise CalibrationDataError(f"a subset of the {self.what} data would have zero samples")
        if idx.min() < -self._n or idx.max() >= self._n:
            raise IndexError(f"subset index out of range for {self._n} samples")
        idx = np.where(idx < 0, idx + self._n, idx).astype(np.intp)
        out = object.__new__(CalibrationSet)  # shares the arrays: only the row indices are new
        out.what, out._arrays, out._labels, out.fixed_batch = self.what, self._arrays, self._labels, self.fixed_batch
        out._rows = idx if self._rows is None else self._rows[idx]
        out._n = int(idx.size)
        return out

    def split(self, fractions: Sequence[float], seed: int) -> list["CalibrationSet"]:
        """Split into parts of the given fractions (sum 1) after a seeded random permutation.

        Deterministic for a given ``seed``. Part sizes are ``floor(f * N)`` with
        the remainder handed out by largest fractional part (ties: earlier part).
        Within a part samples keep their original order. Every part must get at
        least one sample, else :class:`CalibrationDataError` says how many
        samples are needed.
        """
        return [self.subset(idx) for idx in split_indices(self._n, fractions, seed, self.what)]


def split_indices(n: int, fractions: Sequence[float], seed: int, what: str = "calibration") -> list[np.ndarray]:
    """The sorted sample indices of each part of :meth:`CalibrationSet.split`
    (also used for data that is not in memory, see :mod:`onnxfold.measure.raydata`)."""
    fr = np.asarray(list(fractions), dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or not np.all(np.isfinite(fr)) or np.any(fr <= 0):
        raise UsageError(f"split fractions must be positive numbers, got {list(fractions)}")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise UsageError(f"split fractions must sum to 1, got {list(fractions)} (sum {fr.sum():g})")
    sizes = _part_sizes(fr, n)
    if sizes.min() < 1:
        need = len(fr)
        while _part_sizes(fr, need).min() < 1:
            need += 1
        parts = ", ".join(f"{f:g}" for f in fr)
        raise CalibrationDataError(
            f"{what} data has {n} samples, too few to split into fractions ({parts});"
            f" give at least {need} samples"
        )
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(perm[start:start + s]))
        start += s
    return out


def _part_sizes(fr: np.ndarray, n: int) -> np.ndarray:
    raw = fr / fr.sum() * n
    sizes = np.floor(raw).astype(np.int64)
    rest = n - int(sizes.sum())
    if rest > 0:
        order = np.argsort(-(raw - sizes), kind="stable")
        sizes[order[:rest]] += 1
    return sizes


def _load_shards(path: Path, specs: dict[str, FeedSpec], what: str) -> CalibrationSet:
    parts: list[CalibrationSet] = []
    for f in sorted(path.glob("*.npz")):
        try:
            part = load_for_specs(f, specs, what=what)
        except CalibrationDataError as e:
            raise CalibrationDataError(f"{what} shard '{f}': {e}") from None
        if parts and (part.has_labels != parts[0].has_labels or part.input_names != parts[0].input_names):
            raise CalibrationDataError(
                f"{what} shard '{f}' has inputs {quote_names(part.input_names)}{' and labels' if part.has_labels else ''}"
                f" but the first shard has {quote_names(parts[0].input_names)}{' and labels' if parts[0].has_labels else ''};"
                " give every shard the same keys")
        parts.append(part)
    arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].input_names}
    labels = np.concatenate([p.labels for p in parts]) if parts[0].has_labels else None
    return CalibrationSet(arrays, labels, fixed_batch=parts[0].fixed_batch, what=what)


def load_calibration(source: Any, model: onnx.ModelProto, *, what: str = "calibration") -> CalibrationSet:
    """Read and validate data for ``model``'s inputs into a :class:`CalibrationSet`.

    ``source`` may be:

    * a path (str / PathLike) to an ``.npz`` archive (keys = model input names,
      optional ``labels``), to a directory of such ``.npz`` shards (read in
      name order and concatenated; a shard that does not fit is named in the
      error), to a directory of ``<input_name>.npy`` files (plus
      optional ``labels.npy``; names with characters not allowed in file names
      may use ``_`` in their place), or to a single ``.npy`` for a one-input model;
    * a ``dict`` ``{input_name: array}`` (optional ``labels`` key);
    * a numpy array, for a one-input model;
    * an existing :class:`CalibrationSet` (validated again against ``model``);
    * any iterable of feed dicts (list, generator, ...) or an object with
      onnxruntime's ``CalibrationDataReader`` protocol (``get_next()`` returning
      a feed dict until ``None``); feeds may carry a ``labels`` key and are
      concatenated along the first axis (so their per-sample shapes must agree).

    Validation (graph inputs minus initializers; inputs with an initializer
    default may be given but need not be): missing and unknown names, rank,
    fixed non-batch dims, dtype kind (float vs integer vs bool is an error;
    width differences such as float64 -> float32 or int32 -> int64 are cast
    silently), NaN/Inf, zero samples, sample-count mismatches, label length.
    ``what`` names the data in messages ("calibration", "evaluation").
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError("load_calibration needs an onnx.ModelProto")
    return load_for_specs(source, feed_specs(model), what=what)


def load_for_specs(source: Any, specs: dict[str, FeedSpec], *, what: str = "calibration") -> CalibrationSet:
    """:func:`load_calibration` against a model's input specs (``feed_specs``):
    what a Ray task reading one shard needs, without the model's weights."""
    required = [s.name for s in specs.values() if not s.optional]
    labels_is_input = LABELS_KEY in specs

    if is_ray_source(source):  # Parquet / a Ray Dataset: read with Ray Data (onnxfold.api with ray_address)
        raise needs_ray_error(source, what)
    if isinstance(source, CalibrationSet):
        raw: dict[str, Any] = dict(source.arrays)
        if source.labels is not None and not labels_is_input:
            raw[LABELS_KEY] = source.labels
    elif isinstance(source, (str, os.PathLike)) and is_shard_dir(Path(source)):
        return _load_shards(Path(source), specs, what)
    elif isinstance(source, (str, os.PathLike)):
        raw = read_path(Path(source), specs, what)
    elif isinstance(source, Mapping):
        raw = dict(source)
    elif isinstance(source, np.ndarray):
        if len(required) != 1:
            raise CalibrationDataError(
                f"{what} data is a single array but the model has {len(required)} inputs ({quote_names(required)});"
                " give a dict {input_name: array}"
            )
        raw = {required[0]: source}
    elif source is None:
        raise CalibrationDataError(f"no {what} data given; pass an .npz file, a directory of .npy files or a dict of arrays")
    else:
        raw = read_feeds(source, what)

    labels = None
    if not labels_is_input and LABELS_KEY in raw:
        labels = as_array(raw.pop(LABELS_KEY), LABELS_KEY, what)

    have = list(raw)
    for name in required:
        if name not in raw:
            raise CalibrationDataError(
                f"{what} data is missing input '{name}' (has: {quote_names(have)}); the model's inputs are {quote_names(required)}"
            )
    extra = [k for k in have if k not in specs]
    if extra:
        raise CalibrationDataError(
            f"{what} data has {quote_names(extra)} which {'is not a model input' if len(extra) == 1 else 'are not model inputs'}"
            f" (inputs: {quote_names(required)}; labels go under '{LABELS_KEY}'); remove or rename {'it' if len(extra) == 1 else 'them'}"
        )

    arrays: dict[str, np.ndarray] = {}
    # model input order first, then optional inputs in model order
    for name in specs:
        if name not in raw:
            continue
        arr = as_array(raw[name], name, what)
        if arr.ndim == 0:
            raise CalibrationDataError(
                f"{what} input '{name}' is a scalar; its first axis must be the sample axis (shape {specs[name].shape_str()})"
            )
        if arr.shape[0] == 0:
            raise CalibrationDataError(f"{what} data has zero samples for input '{name}'; give at least one sample")
        arrays[name] = arr
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
        raise CalibrationDataError(
            f"{what} inputs have different numbers of samples ({desc}); give every input the same first-axis length"
        )
    n = next(iter(counts.values()))
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != n):
        got = "a scalar" if labels.ndim == 0 else f"{labels.shape[0]} entries"
        raise CalibrationDataError(f"{what} labels have {got} but the data has {n} samples; give one label per sample")
    for name in list(arrays):
        arrays[name] = validate_input(name, arrays[name], specs[name], what)
    fixed = fixed_batch_of(arrays, specs)
    if fixed is not None and fixed > 1 and n % fixed:
        raise CalibrationDataError(
            f"the model's batch axis is fixed to {fixed} but the {what} data has {n} samples; give a multiple of {fixed}"
        )
    return CalibrationSet(arrays, labels, fixed_batch=fixed, what=what)
