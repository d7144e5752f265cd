"""Labels derived from the data itself: next-token labels for language models.

``--labels next-token`` judges a causal language model the way it is
trained: the label of position t is the input id at position t + 1, and the
last position (whose next token is not in the window) is ignored, as are
positions whose next token an ``attention_mask`` marks as padding. Ignored
positions carry IGNORE_LABEL, as in cross-entropy's ignore index.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .data import CalibrationSet

LABEL_KINDS = ("next-token",)
IGNORE_LABEL = -100


def token_ids_input(data) -> str:
    """The input holding token ids: ``input_ids``, else the only integer input
    of rank 2 (of an in-memory set, or of a Ray-read one by the model's input types)."""
    if getattr(data, "is_ray_dataset", False):
        from .inputs import feed_specs

        specs = feed_specs(data.model)
        kinds = {n: (specs[n].np_dtype or np.dtype(object), len(d or [])) for n, d in data.dims.items()}
    else:
        kinds = {n: (a.dtype, a.ndim) for n, a in data.arrays.items()}
    if "input_ids" in kinds:
        return "input_ids"
    ids = [n for n, (dtype, ndim) in kinds.items() if np.issubdtype(dtype, np.integer) and ndim == 2 and
           n != "attention_mask"]
    if len(ids) != 1:
        have = ", ".join(f"{n} {dtype}[rank {ndim}]" for n, (dtype, ndim) in kinds.items())
        raise UsageError(f"--labels next-token needs one integer input [samples, positions] holding token ids "
                         f"(named input_ids); the {data.what} data has {have}")
    return ids[0]


def next_token_rows(ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Labels [samples, positions] of token ids [samples, positions]: row by
    row, so any set of rows (a shard, a Ray Data batch) gets its own."""
    labels = np.full(ids.shape, IGNORE_LABEL, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    if mask is not None and mask.shape == ids.shape:
        labels[:, :-1][np.asarray(mask)[:, 1:] == 0] = IGNORE_LABEL
    return labels


def next_token_labels(data):
    """``data`` with labels [samples, positions]: each position's next token id.
    Data read by Ray gets its labels where its rows are (a Ray Data map)."""
    if getattr(data, "is_ray_dataset", False):
        return data.with_labels(next_token_rows, token_ids_input(data), "attention_mask")
    ids = data.arrays[token_ids_input(data)]
    labels = next_token_rows(ids, data.arrays.get("attention_mask"))
    return CalibrationSet(data.arrays, labels, fixed_batch=data.fixed_batch, what=data.what)
