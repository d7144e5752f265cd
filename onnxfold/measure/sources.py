"""Reading data sources into ``{key: array}``: ``.npz`` files, directories of
``.npy`` files or ``.npz`` shards, iterables of feed dicts (and onnxruntime's
``CalibrationDataReader``), and recognising a Parquet / Ray Dataset source,
which only :mod:`.raydata` reads. Every problem raises a one-line
:class:`~onnxfold.errors.CalibrationDataError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxfold.errors import CalibrationDataError, UsageError

from .inputs import FeedSpec

#: the key (``.npz`` entry, ``labels.npy``, dict key, column) that holds labels
LABELS_KEY = "labels"
RAY_DATA_HINT = "pip install 'onnxfold[ray]'"

__all__ = ["LABELS_KEY", "RAY_DATA_HINT", "quote_names", "read_path", "read_feeds", "as_array", "is_shard_dir",
           "is_dataset", "is_ray_source", "describe_ray_source",
           "needs_ray_error"]


def quote_names(names: Iterable[str]) -> str:
    """``'a', 'b'`` (or ``nothing``): names as error messages list them."""
    names = list(names)
    return ", ".join(f"'{n}'" for n in names) if names else "nothing"


def sanitize_file_name(name: str) -> str:
    """``name`` with the characters file names cannot hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure is a user data problem
        raise CalibrationDataError(f"cannot read {what} file '{path}': {type(e).__name__}: {e}") from None


def read_path(path: Path, specs: dict[str, FeedSpec], what: str) -> dict[str, Any]:
    """``{key: array}`` of an ``.npz``, a ``.npy`` (one-input model) or a directory of ``.npy`` files."""
    if not path.exists():
        raise CalibrationDataError(
            f"{what} data '{path}' does not exist; give an .npz file or a directory of <input>.npy files"
        )
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise CalibrationDataError(
                f"{what} directory '{path}' has no .npy files; save one <input_name>.npy per model input (or .npz shards)"
            )
        by_sanitized = {sanitize_file_name(n): n for n in specs}
        out: dict[str, Any] = {}
        for f in files:
            stem = f.name[:-4]
            key = stem if stem in specs or stem == LABELS_KEY else by_sanitized.get(stem, stem)
            out[key] = _read_npy(f, what)
        return out
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = _read_npy(path, what)
        required = [s.name for s in specs.values() if not s.optional]
        if len(required) != 1:
            raise CalibrationDataError(
                f"{what} data '{path}' is a single array but the model has {len(required)} inputs"
                f" ({quote_names(required)}); use an .npz with one key per input"
            )
        return {required[0]: arr}
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CalibrationDataError(f"cannot read {what} data '{path}': {e.strerror or e}") from None
    if magic != b"PK\x03\x04" and magic[:4] != b"PK\x05\x06":
        raise CalibrationDataError(
            f"cannot read {what} data '{path}': it is not an .npz archive; save it with numpy.savez(path, input_name=array, ...)"
            " or give a directory of <input>.npy files"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):  # pragma: no cover - np.load returned an array
                raise ValueError("not an npz archive")
            return {k: z[k] for k in z.files}
    except CalibrationDataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CalibrationDataError(
            f"cannot read {what} data '{path}' as an .npz archive ({type(e).__name__}: {e});"
            " save it with numpy.savez"
        ) from None


def as_array(value: Any, key: str, what: str) -> np.ndarray:
    """``value`` as a numeric array, or a one-line error naming ``key``."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise CalibrationDataError(f"{what} value for '{key}' is not an array ({type(e).__name__}: {e})") from None
    if arr.dtype == object:
        raise CalibrationDataError(
            f"{what} value for '{key}' is not a numeric array (ragged or object data); give equal-shaped samples"
        )
    return arr


def read_feeds(source: Any, what: str) -> dict[str, Any]:
    """Concatenate an iterable of feed dicts (or a CalibrationDataReader) along axis 0."""
    if hasattr(source, "get_next") and callable(source.get_next):
        def _reader_iter():
            while True:
                item = source.get_next()
                if item is None:
                    return
                yield item
        it: Iterable = _reader_iter()
    else:
        it = source
    parts: dict[str, list[np.ndarray]] = {}
    first_keys: list[str] | None = None
    count = 0
    try:
        for i, feed in enumerate(it):
            if not isinstance(feed, Mapping):
                raise CalibrationDataError(
                    f"{what} item {i} is a {type(feed).__name__}, not a feed dict; yield {{input_name: array}} dicts"
                )
            keys = list(feed)
            if first_keys is None:
                first_keys = keys
                parts = {k: [] for k in keys}
            elif set(keys) != set(first_keys):
                raise CalibrationDataError(
                    f"{what} feed dict {i} has keys {quote_names(keys)} but the first had {quote_names(first_keys)}; give every feed the same keys"
                )
            for k in keys:
                arr = as_array(feed[k], k, what)
                if arr.ndim == 0:
                    raise CalibrationDataError(
                        f"{what} feed dict {i} has a scalar for '{k}'; its first axis must be the sample axis"
                    )
                if parts[k] and parts[k][0].shape[1:] != arr.shape[1:]:
                    raise CalibrationDataError(
                        f"{what} feed dicts give '{k}' different per-sample shapes {list(parts[k][0].shape[1:])}"
                        f" and {list(arr.shape[1:])} (feed {i}); pad them to one shape"
                    )
                parts[k].append(arr)
            count += 1
    except CalibrationDataError:
        raise
    except TypeError as e:
        raise CalibrationDataError(
            f"{what} data of type {type(source).__name__} is not supported ({e}); give an .npz path, a directory"
            " of .npy files, a dict of arrays or an iterable of feed dicts"
        ) from None
    if count == 0:
        raise CalibrationDataError(f"{what} data has zero samples (the iterable yielded no feed dicts); give at least one")
    out = {}
    for k, arrs in parts.items():
        try:
            out[k] = arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)
        except Exception as e:  # noqa: BLE001 - dtype mixes numpy refuses
            raise CalibrationDataError(f"{what} feed dicts for '{k}' cannot be concatenated ({e})") from None
    return out


def is_shard_dir(path: Path) -> bool:
    """A directory of ``.npz`` shards (and no ``.npy`` files, which mean one file per input)."""
    return path.is_dir() and not any(path.glob("*.npy")) and any(path.glob("*.npz"))


# ---------------------------------------------------------------------------
# Ray sources (read by onnxfold.measure.raydata)


def is_dataset(source: Any) -> bool:
    """A ``ray.data.Dataset`` (recognised without importing Ray)."""
    return type(source).__module__.startswith("ray.data") and hasattr(source, "map_batches")


def _is_parquet(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    p = Path(source)
    return p.suffix.lower() == ".parquet" or (p.is_dir() and any(p.glob("*.parquet")))


def is_ray_source(source: Any) -> bool:
    """A Parquet file / directory of ``.parquet`` files, or a ``ray.data.Dataset``."""
    return is_dataset(source) or _is_parquet(source)


def describe_ray_source(source: Any) -> str:
    return "a Ray Dataset" if is_dataset(source) else f"Parquet data '{source}'"


def needs_ray_error(source: Any, what: str = "calibration") -> UsageError:
    """The one-line error for a Ray source without --ray."""
    return UsageError(f"{what} {describe_ray_source(source)} is read with Ray Data: add --ray (API: ray_address=) "
                      f"and install it with {RAY_DATA_HINT}")
