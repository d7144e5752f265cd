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


def token_ids_input(data: CalibrationSet) -> str:
    """The input holding token ids: ``input_ids``, else the only integer input of rank 2."""
    arrays = data.arrays
    if "input_ids" in arrays:
        return "input_ids"
    ids = [n for n, a in arrays.items() if np.issubdtype(a.dtype, np.integer) and a.ndim == 2 and
           n != "attention_mask"]
    if len(ids) != 1:
        have = ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in arrays.items())
        raise UsageError(f"--labels next-token needs one integer input [samples, positions] holding token ids "
                         f"(named input_ids); the {data.what} data has {have}")
    return ids[0]


def next_token_labels(data: CalibrationSet) -> CalibrationSet:
    """``data`` with labels [samples, positions]: each position's next token id."""
    if getattr(data, "is_ray_dataset", False):
        raise UsageError("--labels next-token needs the data in memory (.npz, .npy or feed dicts); give the "
                         "calibration data as .npz")
    ids = data.arrays[token_ids_input(data)]
    labels = np.full(ids.shape, IGNORE_LABEL, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    mask = data.arrays.get("attention_mask")
    if mask is not None and mask.shape == ids.shape:
        labels[:, :-1][np.asarray(mask)[:, 1:] == 0] = IGNORE_LABEL
    return CalibrationSet(data.arrays, labels, fixed_batch=data.fixed_batch, what=data.what)
