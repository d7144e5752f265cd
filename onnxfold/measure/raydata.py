"""Calibration data as a Ray Dataset: Parquet files, a ``ray.data.Dataset``
passed to the API, or a directory of ``.npz`` shards too big for the driver
(each shard read and validated by a Ray task on the driver's node); ``--ray`` /
``ray_address=`` only.

Columns are the model's input names (a column may hold fixed-shape tensors:
Ray's tensor extension type, or flat lists that reshape to the input's
shape) plus an optional ``labels`` column.

:func:`load_ray_calibration` reads the data once into the cluster's object
store (Ray spills it to disk when it is large; the driver holds one reference
per block), in a fixed order, and numbers the rows. The pipeline then splits it
exactly as it splits an in-memory :class:`~onnxfold.measure.data.CalibrationSet`
(same seeded permutation, same part sizes: the same samples land in the same
parts as from an ``.npz``): the small held-out parts (select, final check) are
gathered on the driver as ordinary ``CalibrationSet`` s; the fit part stays a
:class:`RayFitData`, whose statistics jobs run as ``ds.map_batches`` over a
pool of actors (:class:`DatasetStatsWorker`, one onnxruntime session per
model each), each returning the float64 accumulators of its batches, which
the driver merges while it iterates the results (see
:meth:`onnxfold.distributed.RayStats.reduce`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxfold.errors import CalibrationDataError, RayNotInstalledError, first_line, wrapped_error

from .data import MIN_SAMPLES_TO_SPLIT, CalibrationSet, SampleCount, load_calibration, load_for_specs, split_indices
from .inputs import feed_specs
from .jobs import StatsJob, merge_accumulators, run_stats_job
from .sources import (LABELS_KEY, RAY_DATA_HINT, describe_ray_source, is_dataset, is_ray_source, is_shard_dir,
                      quote_names)

__all__ = ["is_ray_source", "describe_ray_source", "reads_with_ray_data", "SHARDS_IN_MEMORY_MAX_BYTES",
           "load_ray_calibration", "RayCalibration", "RayFitData", "DatasetStatsWorker", "RAY_DATA_HINT"]

ROW = "_onnxfold_row"  # a row's index in the whole data set
MIN_BLOCK_ROWS = 64


def _import_ray_data():
    try:
        import ray
        import ray.data  # noqa: F401 - needs pandas and pyarrow (ray[data])
    except ImportError:
        raise RayNotInstalledError(f"Parquet and Ray Dataset calibration sources need Ray Data, which is not "
                                   f"installed; install it with {RAY_DATA_HINT}") from None
    return ray


# ---------------------------------------------------------------------------
# batches -> arrays (driver and actors)
def column_array(values: Any, dims: list | None) -> np.ndarray:
    """A numpy batch column as an array (n, ...): object columns (lists,
    ragged tensors) are stacked; flat rows reshape to the input's fixed shape."""
    arr = np.asarray(values)
    if arr.dtype == object and arr.size:
        try:
            arr = np.stack([np.asarray(v) for v in arr])
        except ValueError:
            pass  # ragged: load_calibration names the problem
    if dims is not None and arr.dtype != object and arr.ndim >= 1 and len(dims) > 1 \
            and all(d is not None for d in dims[1:]) and arr.ndim != len(dims):
        size = int(np.prod(dims[1:]))
        if arr.shape[0] and int(np.prod(arr.shape[1:])) == size:
            arr = arr.reshape(arr.shape[0], *dims[1:])
    return arr


def _batch_to_dict(batch: dict, dims: dict[str, list | None], labels: bool) -> dict[str, np.ndarray]:
    out = {name: column_array(batch[name], d) for name, d in dims.items()}
    if labels:
        out[LABELS_KEY] = column_array(batch[LABELS_KEY], None)
    return out


def _number_rows(table, offset: int, a: int, b: int):
    """Rows ``a:b`` of ``table`` (whose first row is row ``offset`` of the data set), numbered."""
    import pyarrow as pa

    return table.slice(a, b - a).append_column(ROW, pa.array(np.arange(offset + a, offset + b, dtype=np.int64)))


def _in_order(ds):
    """``ds`` on a copy with a context of its own (the caller's and the process-wide one are left as they
    are) that keeps the rows' order - the numbering depends on it - and shows no progress bars."""
    ds = type(ds).copy(ds, _deep_copy=True)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds


def _add_labels(batch: dict, rows_fn, columns: tuple[str, ...], dims: dict) -> dict:
    args = [column_array(batch[c], dims.get(c)) if c in batch else None for c in columns]
    return {**batch, LABELS_KEY: rows_fn(*args)}


def _pick_rows(batch: dict, rows: np.ndarray) -> dict:
    keep = np.isin(batch[ROW], rows)
    return {k: v[keep] for k, v in batch.items()}


# ---------------------------------------------------------------------------
class RayCalibration(SampleCount):
    """All calibration samples, numbered, in the object store (see the module
    docstring). Only :meth:`split` and the facts below are used on it."""

    is_ray_dataset = True
    fixed_batch = None

    def __init__(self, ds, num_samples: int, model: onnx.ModelProto, dims: dict, has_labels: bool, what: str,
                 source: str):
        self.ds, self._n, self.model, self.dims = ds, num_samples, model, dims
        self.has_labels, self.what, self.source = has_labels, what, source

    @property
    def input_names(self) -> list[str]:
        return list(self.dims)

    def with_labels(self, rows_fn, *columns: str) -> "RayCalibration":
        """These samples with a labels column ``rows_fn(*columns)`` computed
        batch by batch where the rows are (a row's labels from that row alone;
        a column the data lacks is passed as None)."""
        ds = _in_order(self.ds.map_batches(_add_labels, fn_kwargs={"rows_fn": rows_fn, "columns": columns,
                                                                   "dims": self.dims}, batch_format="numpy"))
        return RayCalibration(ds, self._n, self.model, self.dims, True, self.what, self.source)

    def gather(self, rows: np.ndarray) -> CalibrationSet:
        """The samples at ``rows`` (sorted indices) as an in-memory set, in row order."""
        picked = self.ds.map_batches(_pick_rows, fn_kwargs={"rows": rows}, batch_format="numpy")
        parts = [b for b in picked.iter_batches(batch_size=None, batch_format="numpy") if len(b[ROW])]
        order = np.argsort(np.concatenate([b[ROW] for b in parts]), kind="stable")
        data = {k: np.concatenate([column_array(b[k], self.dims.get(k)) for b in parts])[order]
                for k in parts[0] if k != ROW}
        return load_calibration(data, self.model, what=self.what)

    def split(self, fractions, seed: int) -> list:
        """Like :meth:`CalibrationSet.split` (same samples in the same parts): the
        first (fit) part a :class:`RayFitData`, the held-out parts gathered."""
        parts = split_indices(self._n, fractions, seed, self.what)
        if len(parts) == 1:
            return [RayFitData(self, self._n, np.zeros(0, np.int64))]
        held = np.sort(np.concatenate(parts[1:]))
        gathered = self.gather(held)  # one pass over the data for every held-out part
        return [RayFitData(self, len(parts[0]), held), *(gathered.subset(np.searchsorted(held, p)) for p in parts[1:])]


class RayFitData(SampleCount):
    """The fit part of a :class:`RayCalibration`: every row not in ``held``
    (sorted row indices of the held-out parts), numbered 0.. in row order, as
    :meth:`CalibrationSet.split` numbers its fit part."""

    is_ray_dataset = True
    fixed_batch = None

    def __init__(self, parent: RayCalibration, num_samples: int, held: np.ndarray):
        self.parent, self._n, self.held = parent, num_samples, held
        self.what, self.has_labels = parent.what, parent.has_labels

    @property
    def input_names(self) -> list[str]:
        return self.parent.input_names

    def __repr__(self) -> str:
        return f"RayFitData({self._n} samples of {self.parent.source})"


class DatasetStatsWorker:
    """A Ray Data actor (``map_batches``): one onnxruntime session per model of
    a statistics job; each batch of rows becomes the job's accumulators over
    those rows (``run_stats_job``, the single-process code), returned pickled
    with the number of rows."""

    def __init__(self, provider: str, threads: int, models: list[tuple[bytes, list[str]]], init, update,
                 batch_size: int, held: np.ndarray, dims: dict, has_labels: bool, what: str):
        from onnxfold.runtime import resolve_provider

        self.providers, _ = resolve_provider(provider)
        self.threads, self.batch_size, self.held, self.dims = threads, batch_size, held, dims
        self.has_labels, self.what = has_labels, what
        self.job = StatsJob([(onnx.load_from_string(b), names) for b, names in models], init, update)
        self.check_model = self.job.models[0][0]  # same inputs as the original: validates and casts batches

    def __call__(self, batch: dict) -> dict:
        from onnxfold.errors import OnnxFoldError

        try:
            accs, count = self._accumulate(batch)
        except OnnxFoldError as e:  # the data's fault: handed back (Ray Data would keep only its traceback text)
            return {"accs": np.array([b""], dtype=object), "rows": np.array([0]),
                    "error": np.array([pickle.dumps((type(e), str(e)))], dtype=object)}
        return {"accs": np.array([pickle.dumps(accs)], dtype=object), "rows": np.array([count]),
                "error": np.array([b""], dtype=object)}

    def _accumulate(self, batch: dict):
        rows = np.asarray(batch[ROW])
        keep = ~np.isin(rows, self.held)
        fit_ids = rows[keep] - np.searchsorted(self.held, rows[keep])
        order = np.argsort(fit_ids, kind="stable")
        fit_ids = fit_ids[order]
        accs = self.job.init()
        if fit_ids.size:
            data = _batch_to_dict({k: np.asarray(v)[keep][order] for k, v in batch.items() if k != ROW},
                                  self.dims, self.has_labels)
            data = load_calibration(data, self.check_model, what=self.what)
            # runs of consecutive fit ids: run_stats_job numbers a run's samples from its first
            cuts = [0, *(np.flatnonzero(np.diff(fit_ids) != 1) + 1).tolist(), fit_ids.size]
            for a, b in zip(cuts, cuts[1:]):
                run = data if (a, b) == (0, fit_ids.size) else data.subset(slice(a, b))
                merge_accumulators(accs, run_stats_job(self.job, run, batch_size=self.batch_size,
                                                       providers=self.providers, first_sample=int(fit_ids[a]),
                                                       intra_op_threads=self.threads))
        return accs, int(fit_ids.size)


# ---------------------------------------------------------------------------
#: A directory of ``.npz`` shards bigger than this (bytes on disk) is read by
#: Ray tasks into the object store with ``--ray``, never into the driver: the
#: driver's memory then stays flat in the number of samples. Smaller ones are
#: loaded by the driver, which keeps what in-memory data allows (the budget
#: search's candidates as Ray tasks, conv least-squares refits) at twice the
#: data in the head node's memory.
SHARDS_IN_MEMORY_MAX_BYTES = 2 * 2**30


def shard_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.npz"))


def reads_with_ray_data(source: Any, model: onnx.ModelProto) -> bool:
    """Whether ``--ray`` reads ``source`` with Ray Data: Parquet and Dataset
    sources always; a directory of ``.npz`` shards when it is bigger than
    :data:`SHARDS_IN_MEMORY_MAX_BYTES`, the model's batch axis is dynamic (a
    fixed batch axis needs the in-memory set and its per-sample fallback) and
    the driver is on the cluster (``ray://`` clients read on the driver: the
    cluster's nodes may not see their files)."""
    if is_ray_source(source):
        return True
    if not (isinstance(source, (str, os.PathLike)) and is_shard_dir(Path(source))):
        return False
    if shard_bytes(Path(source)) <= SHARDS_IN_MEMORY_MAX_BYTES:
        return False
    specs = feed_specs(model)
    if any(s.dims and s.dims[0] is not None for s in specs.values() if not s.optional):
        return False
    import ray

    return not ray.util.client.ray.is_connected()


def load_ray_calibration(source: Any, model: onnx.ModelProto, *, what: str = "calibration"
                         ) -> RayCalibration | CalibrationSet:
    """Read ``source`` (Parquet path, ``ray.data.Dataset`` or a directory of
    ``.npz`` shards) for ``model``: columns checked against the model's inputs,
    the first rows validated like any data (dtype, shape, NaN), all rows
    numbered in the object store. Fewer samples than are worth splitting come
    back as an in-memory set."""
    ray = _import_ray_data()
    specs = feed_specs(model)
    if isinstance(source, (str, os.PathLike)) and is_shard_dir(Path(source)):
        tables, counts, columns = _read_shards(ray, Path(source), specs, what)
        label = f"shards '{source}'"
    else:
        tables, counts, columns, label = _read_dataset(ray, source, specs, what)
    dims = {n: specs[n].dims for n in specs if n in columns}
    has_labels = LABELS_KEY in columns and LABELS_KEY not in specs
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    n = int(offsets[-1])
    if n == 0:
        raise CalibrationDataError(f"{what} {label} has zero rows; give at least one sample")
    # blocks of a share of the rows: two per CPU of the cluster, so that every actor gets some
    per_block = max(MIN_BLOCK_ROWS, -(-n // max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))))
    numbered = ray.remote(_number_rows)
    rows_ds = ray.data.from_arrow_refs([numbered.remote(t, int(o), a, min(a + per_block, c))
                                        for t, o, c in zip(tables, offsets, counts) for a in range(0, c, per_block)])
    data = RayCalibration(_in_order(rows_ds), n, model, dims, has_labels, what, label)
    if n < MIN_SAMPLES_TO_SPLIT:
        return data.gather(np.arange(n))
    return data


def _read_dataset(ray, source: Any, specs: dict, what: str) -> tuple[list, list[int], list[str], str]:
    """A Parquet path or a Dataset: (Arrow table refs, their row counts, the columns, how to name it)."""
    label = describe_ray_source(source)
    if is_dataset(source):
        ds = source
    else:
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"{what} data '{path}' does not exist; give a .parquet file or a directory "
                                       "of .parquet files")
        try:
            ds = ray.data.read_parquet(str(path))
        except Exception as e:  # noqa: BLE001 - any failure is a data problem
            raise CalibrationDataError(f"cannot read {label}: {first_line(e)}") from None
    required = [s.name for s in specs.values() if not s.optional]
    try:
        columns = list(ds.columns())
    except Exception as e:  # noqa: BLE001
        raise CalibrationDataError(f"cannot read {label}: {first_line(e)}") from None
    missing = [n for n in required if n not in columns]
    if missing:
        raise CalibrationDataError(f"{what} {label} has no column for input '{missing[0]}' (has: {quote_names(columns)}); "
                                   f"the model's inputs are {quote_names(required)}")
    extra = [c for c in columns if c not in specs and c != LABELS_KEY]
    if extra:
        raise CalibrationDataError(f"{what} {label} has {quote_names(extra)} which {'is' if len(extra) == 1 else 'are'} not "
                                   f"a model input (inputs: {quote_names(required)}; labels go under '{LABELS_KEY}'); "
                                   "remove or rename it")
    ds = _in_order(ds)
    fixed = [specs[n].dims[0] for n in columns if n in specs and specs[n].dims and specs[n].dims[0] is not None]
    if fixed:
        raise CalibrationDataError(f"the model's batch axis is fixed to {fixed[0]}: {label} needs a dynamic batch "
                                   "axis; give the data as .npz instead")
    try:
        tables = ds.to_arrow_refs()  # the columns were checked: inputs and labels only
        counts = ray.get([ray.remote(_num_rows).remote(t) for t in tables])
    except Exception as e:  # noqa: BLE001 - unreadable files
        raise CalibrationDataError(f"cannot read {label}: {first_line(e)}") from None
    return tables, counts, columns, label


def _read_shards(ray, path: Path, specs: dict, what: str) -> tuple[list, list[int], list[str]]:
    """A directory of ``.npz`` shards, each read and validated by a Ray task
    into an Arrow table in the object store: the driver only sees each
    shard's row count and keys. The tasks run on the driver's node (its files
    may be local to it), in worker processes, so the samples never pass
    through the driver's memory."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    read = ray.remote(_read_shard).options(num_returns=2, scheduling_strategy=here)
    files = sorted(path.glob("*.npz"))
    refs = [read.remote(str(f), specs, what) for f in files]
    tables = [t for t, _ in refs]
    infos = []
    for f, (_, info) in zip(files, refs):
        try:
            infos.append(ray.get(info))
        except ray.exceptions.RayTaskError as e:
            cause = wrapped_error(e)
            if cause is None:
                raise CalibrationDataError(f"{what} shard '{f}': {first_line(e)}") from None
            raise type(cause)(str(cause)) from None
    first_keys = infos[0][1]
    for f, (_, keys) in zip(files, infos):
        if keys != first_keys:
            raise CalibrationDataError(
                f"{what} shard '{f}' has {quote_names(keys)} but the first shard has {quote_names(first_keys)}; "
                "give every shard the same keys")
    return tables, [count for count, _ in infos], list(first_keys)


def _read_shard(path: str, specs: dict, what: str):
    """(one ``.npz`` shard as an Arrow table, (its rows, its keys)): validated
    as any calibration data, errors naming the shard."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    try:
        part = load_for_specs(path, specs, what=what)
    except CalibrationDataError as e:
        raise CalibrationDataError(f"{what} shard '{path}': {e}") from None
    columns = dict(part.arrays)
    if part.has_labels:
        columns[LABELS_KEY] = part.labels
    table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in columns.items()})
    return table, (part.num_samples, list(columns))


def _num_rows(table) -> int:
    return table.num_rows
