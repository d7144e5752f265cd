"""Conv channel folding decisions in plain numpy (no ONNX here).

The dense decisions (:mod:`onnxfold.decide.folding`: k-means, cluster maps,
Fold-AR, REPAIR, ridge refit) work on rows; a convolution's output channel j
becomes one row by flattening its kernel ``W[j]`` ([in/group, *kernel]), and
the consumer's input-channel slice ``W_next[:, j]`` ([out, *kernel]) becomes
its outgoing "column". This module holds what is conv-specific: the channel
features, patch extraction (im2col) for the consumer refit, and the per-layer
ratio that reaches a parameter-sparsity target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .folding import kmeans_labels, target_width


def channel_labels(own: np.ndarray, readers: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster index (0..k'-1, k' ≤ k, numbered by first member) of every channel.

    own: n × p, what makes a channel's value (producer kernel rows and biases,
    coupled depthwise kernels...); readers: n × q, how it is read (consumer
    input slices). Channels whose ``own`` rows are exactly equal compute the
    same values, so they are merged first whatever their readers (their slices
    summed): folding exact duplicates is then always lossless. The remaining
    distinct channels are clustered by k-means on ``[own, summed readers]``
    (:func:`onnxfold.decide.folding.kmeans_labels`, Wang et al.'s features)."""
    own = np.ascontiguousarray(own, dtype=np.float64)
    readers = np.asarray(readers, dtype=np.float64)
    _, first, inverse = np.unique(own, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    dup_group = rank[inverse]  # 0..m-1 in order of first occurrence
    m = order.size
    if m <= k:
        return dup_group.astype(np.int64)
    summed = np.zeros((m, readers.shape[1]))
    np.add.at(summed, dup_group, readers)
    sub = kmeans_labels(np.hstack([own[first[order]], summed]), k, seed=seed)
    labels = sub[dup_group]
    _, firsts, inv = np.unique(labels, return_index=True, return_inverse=True)
    renumber = np.argsort(np.argsort(firsts, kind="stable"), kind="stable")
    return renumber[inv.reshape(-1)].astype(np.int64)


def nchw_rows(x: np.ndarray) -> np.ndarray:
    """[N, C, *spatial] → rows [N·prod(spatial), C] (one row per position)."""
    x = np.asarray(x)
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def conv_output_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
           dilations: Sequence[int]) -> np.ndarray:
    """Patches of a 2-D convolution's input, one row per output position.

    x: [N, C, H, W]; returns [N·Ho·Wo, C·kh·kw] in the order of a kernel
    reshaped ``W.reshape(out, -1)`` (channel, then kernel row, then column),
    rows ordered (n, ho, wo) like :func:`nchw_rows` of the output."""
    win = _windows(x, kernel, strides, pads, dilations)
    N, C, Ho, Wo, kh, kw = win.shape
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(N * Ho * Wo, C * kh * kw)


def _windows(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """A view [N, C, Ho, Wo, kh, kw] of the (padded) input's patches."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


class PatchRows:
    """:func:`im2col`'s rows, copied out only when taken: ``rows[idx]`` equals
    ``im2col(x, ...)[idx]`` for an index array. A refit that draws a few
    thousand of a batch's output positions copies only those patches (the
    whole patch matrix is C·kh·kw times the input)."""

    def __init__(self, x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int]):
        self._win = _windows(x, kernel, strides, pads, dilations)
        N, C, self._ho, self._wo, kh, kw = self._win.shape
        self.shape = (N * self._ho * self._wo, C * kh * kw)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype == bool or idx.ndim != 1:
            raise TypeError("PatchRows takes a 1-D array of row indices")
        n, pos = np.divmod(idx, self._ho * self._wo)
        ho, wo = np.divmod(pos, self._wo)
        # advanced indices around a slice: the row axis comes first, then (C, kh, kw)
        return self._win[n, :, ho, wo].reshape(idx.size, self.shape[1])


def chain_params(widths: Sequence[int], per_channel: Sequence[int], fixed: Sequence[int]) -> int:
    """Parameters of a set of chains given their hidden widths: chain i costs
    ``per_channel[i]`` per hidden channel plus ``fixed[i]``."""
    return int(sum(w * p + f for w, p, f in zip(widths, per_channel, fixed)))


def ratio_for_sparsity(target: float, widths: Sequence[int], per_channel: Sequence[int],
                       fixed: Sequence[int], grid: int = 400) -> tuple[float, float]:
    """One per-layer ratio r (the same for every chain, as in Wang et al.) whose
    folded widths ``target_width(n, r)`` remove the share of the chains'
    parameters closest to ``target``. Returns (r, share removed).

    Tries r = i / grid for i in 0..grid−1; among ratios giving the same
    widths, the one closest to ``target`` is returned."""
    before = chain_params(widths, per_channel, fixed)
    best = (0.0, 0.0, (float("inf"), float("inf")))
    for i in range(grid):
        r = i / grid
        after = chain_params([target_width(n, r) for n in widths], per_channel, fixed)
        share = 1.0 - after / before if before else 0.0
        key = (round(abs(share - target), 12), abs(r - target))
        if key < best[2]:
            best = (r, share, key)
    return best[0], best[1]
