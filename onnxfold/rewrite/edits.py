"""Neuron-level edits of one hidden layer, applied to the numpy view.

Every compression decision - drop a neuron, move it to a linear path, merge a
cluster, rescale, refit the consumer - is expressed as one ``HiddenEdit`` on a
``Chain``. Edits only touch the ``DenseOp`` arrays; nothing is written into the
ONNX graph until ``materialize``. Rows (producer side) and columns (consumer
side) of one op are independent, so the edits of consecutive chains compose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import issparse

from ..find.activations import ActivationSpec
from ..find.chains import Chain
from ..find.dense import DenseOp, LinearPath


@dataclass
class HiddenEdit:
    """How the n neurons of a hidden layer become k.

    row_map (k×n): new producer rows (and bias, path outputs, per-channel
        activation parameters) are ``row_map @ old`` - a selection, or cluster means.
    row_scale, row_shift (k): then ``z' = row_scale * z + row_shift`` (repairs).
    col_map (n×k): new consumer columns are ``old @ col_map`` - a selection, or
        cluster sums; also applied to linear paths that read the hidden layer.
    consumer_weight (out×k): replaces the consumer's columns outright (refit).
    consumer_bias (out): replaces the consumer's bias (refit);
    consumer_bias_delta (out): added to it (removed constant neurons, mean corrections).
    new_paths: linear paths added to the consumer's pre-activation.
    """

    row_map: np.ndarray
    col_map: np.ndarray
    row_scale: np.ndarray | None = None
    row_shift: np.ndarray | None = None
    consumer_weight: np.ndarray | None = None
    consumer_bias: np.ndarray | None = None
    consumer_bias_delta: np.ndarray | None = None
    new_paths: list[LinearPath] = field(default_factory=list)
    # a pure keep-edit stores the kept indices instead of two k×n selection
    # matrices (row_map/col_map are then None): gigabytes for a 16k-wide layer
    keep_index: np.ndarray | None = None
    keep_from: int | None = None

    @classmethod
    def keep(cls, n: int, keep: np.ndarray, **kw) -> "HiddenEdit":
        """Keep neurons ``keep`` (indices, in order), drop the others."""
        idx = np.asarray(keep, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"keep indices must be in [0, {n})")
        return cls(row_map=None, col_map=None, keep_index=idx, keep_from=int(n), **kw)

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_map, col_map) as matrices (built for a keep-edit)."""
        if self.keep_index is not None and self.row_map is None:
            sel = selection(self.keep_from, self.keep_index)
            return sel, sel.T
        return self.row_map, self.col_map

    @property
    def width(self) -> int:
        if self.keep_index is not None and self.row_map is None:
            return int(self.keep_index.size)
        return self.row_map.shape[0]


def selection(n: int, keep: np.ndarray) -> np.ndarray:
    sel = np.zeros((len(keep), n))
    sel[np.arange(len(keep)), keep] = 1.0
    return sel


def _selection_rows(M) -> np.ndarray | None:
    """``idx`` with ``M == selection(n, idx)`` (each row a single 1), else None.
    Lets a keep-edit index rows instead of multiplying by a k × n matrix
    (the product is cubic in the width: minutes for a 16k-wide layer)."""
    k = M.shape[0]
    if k == 0 or M.ndim != 2:
        return None
    if issparse(M):
        M = M.tocsr()
        if not np.all(np.diff(M.indptr) == 1) or not np.all(M.data == 1.0):
            return None
        return M.indices.astype(np.int64)
    idx = M.argmax(axis=1)
    if not np.all(M[np.arange(k), idx] == 1.0) or np.count_nonzero(M) != k:
        return None
    return idx


def _as_map(m):
    """A fold map as float64: dense ndarray, or scipy sparse for wide layers."""
    if issparse(m):
        return m.astype(np.float64).tocsr()
    return np.asarray(m, dtype=np.float64)


def row_selection(M) -> tuple[np.ndarray, np.ndarray | None]:
    """(the row map as float64, dense or sparse; its selected indices when it
    is a pure selection, else None): a selection is applied by indexing -
    the same numbers as the product, without a k × n multiply."""
    M = _as_map(M)
    return M, _selection_rows(M)


def column_selection(C) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`row_selection` of a column map (n × k)."""
    C = _as_map(C)
    return C, _selection_rows(C.T.tocsr() if issparse(C) else C.T)


def merge_dense_rows(op: DenseOp, M=None, rows: np.ndarray | None = None, scale: np.ndarray | None = None,
                     shift: np.ndarray | None = None) -> None:
    """Output rows of a dense op (weight, bias, last factor of its linear
    paths) become ``M @ old`` - or ``old[rows]`` for a selection - then
    ``z' = scale * z + shift``."""
    if rows is not None:
        op.weight = op.weight[rows]
        bias = op.bias[rows] if op.bias is not None else None
        for p in op.paths:
            p.factors[-1] = p.factors[-1][:, rows]
        k = rows.size
    else:
        # a sparse map is multiplied in the weight's precision: scipy would
        # otherwise make a float64 copy of a possibly huge weight first
        op.weight = (M.astype(op.weight.dtype) if issparse(M) else M) @ op.weight
        bias = M @ op.bias if op.bias is not None else None
        for p in op.paths:
            p.factors[-1] = p.factors[-1] @ M.T
        k = M.shape[0]
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
        op.weight *= s[:, None]
        bias = None if bias is None else bias * s
        for p in op.paths:
            p.factors[-1] = p.factors[-1] * s[None, :]
    if shift is not None:
        bias = (np.zeros(k) if bias is None else bias) + shift
    op.bias = bias
    op.changed = True


def merge_slopes(act: ActivationSpec, n: int, M=None, rows: np.ndarray | None = None) -> None:
    """Per-channel PReLU slopes of an n-wide layer follow its rows."""
    if act.kind != "prelu" or np.asarray(act.slope).size != n or n <= 1:
        return
    slope = np.asarray(act.slope, dtype=np.float64).reshape(-1)
    if rows is not None:
        act.slope = slope[rows]
    else:  # rows of M are usually cluster means; otherwise take the weighted mean slope
        sums = np.asarray(M.sum(axis=1)).reshape(-1)
        act.slope = M @ slope if np.allclose(sums, 1.0) else (M @ slope) / np.maximum(sums, 1e-300)


def sum_dense_columns(op: DenseOp, C=None, cols: np.ndarray | None = None) -> None:
    """Input columns of a dense op become ``old @ C`` (``old[:, cols]`` for a selection)."""
    if cols is not None:
        op.weight = op.weight[:, cols]
    else:
        op.weight = op.weight @ (C.astype(op.weight.dtype) if issparse(C) else C)
    op.changed = True


def sum_path_rows(op: DenseOp, index: int, C=None, cols: np.ndarray | None = None) -> None:
    """The rows of linear path ``index`` of ``op`` read the summed hidden units."""
    f0 = op.paths[index].factors[0]
    op.paths[index].factors[0] = f0[cols] if cols is not None else C.T @ f0
    op.changed = True


def apply_edit(chain: Chain, edit: HiddenEdit) -> None:
    """Apply ``edit`` to the chain's producer, activation and consumer in place."""
    prod, cons, act = chain.producer, chain.consumer, chain.activation
    n = prod.out_features
    if edit.keep_index is not None and edit.row_map is None:
        if edit.keep_from != n:
            raise ValueError(f"edit of {chain.name}: keeps neurons of a width-{edit.keep_from} layer, not {n}")
        rows = cols = edit.keep_index
        k = rows.size
        M = C = None
    else:
        (M, rows), (C, cols) = row_selection(edit.row_map), column_selection(edit.col_map)
        k = M.shape[0]
        if M.shape != (k, n) or C.shape != (n, k):
            raise ValueError(f"edit of {chain.name}: row_map {M.shape} / col_map {C.shape} do not fit width {n}")
    if k < 1:
        raise ValueError(f"edit of {chain.name} would leave no neuron")
    merge_dense_rows(prod, M, rows, edit.row_scale, edit.row_shift)
    merge_slopes(act, n, M, rows)

    # consumer columns
    if edit.consumer_weight is not None:
        cw = np.asarray(edit.consumer_weight, dtype=np.float64)
        if cw.shape != (cons.out_features, k):
            raise ValueError(f"edit of {chain.name}: consumer_weight {cw.shape} != {(cons.out_features, k)}")
        cons.weight = cw
    else:
        sum_dense_columns(cons, C, cols)
    for op, idx in chain.path_readers:
        sum_path_rows(op, idx, C, cols)
    if edit.consumer_bias is not None:
        cons.bias = np.asarray(edit.consumer_bias, dtype=np.float64).copy()
    if edit.consumer_bias_delta is not None:
        cons.bias = cons.bias_or_zero() + edit.consumer_bias_delta
    for p in edit.new_paths:
        if p.factors[-1].shape[1] != cons.out_features:
            raise ValueError(f"edit of {chain.name}: new path does not end in {cons.out_features} outputs")
        cons.paths.append(p)
    cons.changed = True
