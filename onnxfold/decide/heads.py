"""Head folding and gated-MLP folding decisions in plain numpy (no ONNX here).

Attention head h of a block computes ``A_h = softmax(s·(X Wq_hᵀ+bq_h)(Y Wk_hᵀ+bk_h)ᵀ + M)``
and adds ``A_h (Y Wv_hᵀ + bv_h) Wo_hᵀ`` to the output (W out × in; Wq_h the
rows of head h, Wo_h the o-projection's columns of head h). Folding k of H
heads: cluster heads on ``[Wq_h, bq_h, Wk_h, bk_h, Wv_h, bv_h, Wo_hᵀ]`` with
k-means (``decide.folding.kmeans_labels``), then merge every cluster into one
head. How to merge is not obvious, because ``q·kᵀ`` is bilinear and the
softmax is not linear at all:

* ``merge="medoid"`` (default): the merged head's attention pattern is that
  of the *medoid* (the member nearest the cluster's feature mean): its q and
  k rows are kept unchanged. Averaging q and k rows of different heads would
  average neither their scores (``mean(q)·mean(k)ᵀ ≠ mean(q·kᵀ)``: cross
  terms between heads appear) nor their patterns, and it flattens the
  softmax (the variance collapse Fold-AR tries to undo). The value/output
  side is linear given the pattern: with every member's pattern replaced by
  the medoid's, the cluster adds ``A_m Y (Σ_h Wo_h Wv_h)ᵀ``, so v and o are
  merged into the best rank-Dv factorisation of ``Σ_h Wo_h Wv_h`` (truncated
  SVD, balanced ``U√S``, ``√S Vᵀ``): the best data-free choice in Frobenius
  norm given that pattern. Exact when the members are identical.
* ``merge="mean"``: the paper's rule applied literally: q, k, v rows and
  biases averaged, o columns summed. With ``repair="ar"`` the averaged q, k
  and v rows get Fold-AR's variance factor (one per head dimension).

In both, value biases leave the heads: attention rows sum to 1, so head h
adds the constant ``Wo_h bv_h`` to every token; for merged (and pruned)
heads that constant moves exactly into the o-projection's bias.

``features="circuits"`` clusters (and picks medoids) on the heads' QK and OV
circuits instead of their raw rows (see :meth:`HeadWeights.circuits`).

Magnitude head pruning (``select="magnitude"``) keeps the k heads with the
largest feature norm and drops the rest.

Gated MLPs ``down(act(gate x) ⊙ up x)`` need nothing of their own here:
neuron j is gate row j, up row j and down column j, one unit group
(``passes/units.gated_group``) that the folding core clusters on
``[gate_j, up_j, down_jᵀ]`` and merges like dense neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import folding as fold

MERGES = ("medoid", "mean")


def heads_after(num_heads: int, heads: float) -> int:
    """Heads kept: an int is the count itself (clipped to 1..H), a float in
    [0, 1) the share removed (``round(H·(1−r))``, at least 1)."""
    if isinstance(heads, (int, np.integer)) and not isinstance(heads, bool):
        return int(max(1, min(num_heads, int(heads))))
    return fold.target_width(num_heads, float(heads))


@dataclass
class HeadWeights:
    """One attention block's projections, split per head.

    q, k: (H, D, in); qb, kb: (H, D); v: (H, Dv, in); vb: (H, Dv);
    o: (H, out, Dv) (the o-projection's columns of each head); ob: (out)."""

    q: np.ndarray
    qb: np.ndarray
    k: np.ndarray
    kb: np.ndarray
    v: np.ndarray
    vb: np.ndarray
    o: np.ndarray
    ob: np.ndarray

    @classmethod
    def split(cls, wq, bq, wk, bk, wv, bv, wo, bo, heads: int) -> HeadWeights:
        def rows(w):
            return np.asarray(w, dtype=np.float64).reshape(heads, -1, w.shape[1])

        def vec(b, n):
            return np.zeros(n) if b is None else np.asarray(b, dtype=np.float64)

        out = wo.shape[0]
        o = np.asarray(wo, dtype=np.float64).reshape(out, heads, -1).transpose(1, 0, 2)
        return cls(rows(wq), vec(bq, wq.shape[0]).reshape(heads, -1), rows(wk), vec(bk, wk.shape[0]).reshape(heads, -1),
                   rows(wv), vec(bv, wv.shape[0]).reshape(heads, -1), o, vec(bo, out))

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    def joined(self) -> tuple[np.ndarray, ...]:
        """(wq, bq, wk, bk, wv, bv, wo, bo) as whole-layer matrices (W out × in)."""
        h = self.num_heads
        out = self.o.shape[1]
        return (self.q.reshape(-1, self.q.shape[2]), self.qb.reshape(-1), self.k.reshape(-1, self.k.shape[2]),
                self.kb.reshape(-1), self.v.reshape(-1, self.v.shape[2]), self.vb.reshape(-1),
                self.o.transpose(1, 0, 2).reshape(out, -1) if h else np.zeros((out, 0)), self.ob)

    def features(self) -> np.ndarray:
        """Per-head clustering features (H × F): q, k, v rows with their
        biases and the head's o-projection columns, flattened."""
        h = self.num_heads
        return np.hstack([self.q.reshape(h, -1), self.qb, self.k.reshape(h, -1), self.kb, self.v.reshape(h, -1),
                          self.vb, self.o.transpose(0, 2, 1).reshape(h, -1)])


    def circuits(self) -> np.ndarray:
        """Per-head features invariant to how a head's dimensions are rotated
        (H × F): the QK circuit ``Wq_hᵀ Wk_h`` with the query-bias term
        ``Wk_hᵀ bq_h`` (the parts of the scores that vary with the key), and
        the OV circuit ``Wo_h Wv_h``, each scaled to unit norm per head so
        both halves weigh alike. Two heads computing the same function have
        the same circuits even when their raw rows differ by a rotation."""
        h = self.num_heads
        qk = np.matmul(self.q.transpose(0, 2, 1), self.k).reshape(h, -1)
        qb = np.matmul(self.qb[:, None, :], self.k).reshape(h, -1)
        ov = np.matmul(self.o, self.v).reshape(h, -1)

        def unit(x):
            n = np.linalg.norm(x, axis=1, keepdims=True)
            return np.divide(x, n, out=np.zeros_like(x), where=n > 0)

        return np.hstack([unit(np.hstack([qk, qb])), unit(ov)])


FEATURES = ("weights", "circuits")


def head_labels(w: HeadWeights, k: int, select: str = "kmeans", seed: int = 0,
                features: str = "weights") -> np.ndarray:
    """Cluster per head (0..k'-1), or -1 for a head dropped (magnitude:
    largest weight norm, whatever ``features`` says)."""
    if select == "kmeans" and features == "circuits":
        return fold.kmeans_labels(w.circuits(), k, seed=seed)
    feats = w.features()
    if select == "kmeans":
        return fold.kmeans_labels(feats, k, seed=seed)
    keep = fold.magnitude_keep(feats, k)
    labels = np.full(w.num_heads, -1, dtype=np.int64)
    labels[keep] = np.arange(keep.size)
    return labels


def medoids(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per cluster, the member nearest (L2) the cluster's mean (ties: lowest index)."""
    k = int(labels.max()) + 1
    out = np.zeros(k, dtype=np.int64)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        centre = features[members].mean(axis=0)
        d = np.linalg.norm(features[members] - centre, axis=1)
        out[c] = members[int(np.argmin(d))]
    return out


def _balanced_rank(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(A' out×r, B' r×in) with A' B' the best rank-r approximation of the
    product ``a @ b`` (a out×m, b m×in, m small), balanced as ``U√S``, ``√S Vᵀ``.
    Computed through two thin QRs and an m×m SVD, never forming ``a @ b``."""
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    root = np.sqrt(s[:r])
    left = (qa @ u[:, :r]) * root
    right = root[:, None] * (vt[:r] @ qb.T)
    if left.shape[1] < r:  # fewer singular values than r: pad with zeros
        left = np.hstack([left, np.zeros((left.shape[0], r - left.shape[1]))])
        right = np.vstack([right, np.zeros((r - right.shape[0], right.shape[1]))])
    return left, right


def _ar_rows(rows: np.ndarray) -> np.ndarray:
    """Fold-AR factor per head dimension of a cluster: rows (N, D, in) of N
    members → D factors (dimension d of the members forms one fold cluster)."""
    n, d, _ = rows.shape
    labels = np.tile(np.arange(d), n)
    return fold.fold_ar_scale(rows.reshape(n * d, -1), labels)


def merge_heads(w: HeadWeights, labels: np.ndarray, merge: str = "medoid", repair: str = "none",
                features: str = "weights") -> HeadWeights:
    """The block with its heads merged by cluster (``labels``; -1 = dropped).

    Singleton clusters keep their head bit for bit. Dropped heads and merged
    clusters hand their value-bias constant ``Wo_h bv_h`` to the o bias.
    ``repair="ar"`` only acts with ``merge="mean"`` (the medoid merge does
    not average q/k, and its v/o factorisation keeps the product's scale)."""
    if merge not in MERGES:
        raise ValueError(f"unknown head merge {merge!r}")
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    mids = medoids(w.circuits() if features == "circuits" else w.features(), labels)
    d, dv, inq, inv = w.q.shape[1], w.v.shape[1], w.q.shape[2], w.v.shape[2]
    out = w.o.shape[1]
    q = np.zeros((k, d, inq))
    qb = np.zeros((k, d))
    kk = np.zeros((k, d, w.k.shape[2]))
    kb = np.zeros((k, d))
    v = np.zeros((k, dv, inv))
    vb = np.zeros((k, dv))
    o = np.zeros((k, out, dv))
    ob = w.ob.copy()
    for h in np.flatnonzero(labels < 0):
        ob += w.o[h] @ w.vb[h]
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if members.size == 1:
            h = members[0]
            q[c], qb[c], kk[c], kb[c], v[c], vb[c], o[c] = w.q[h], w.qb[h], w.k[h], w.kb[h], w.v[h], w.vb[h], w.o[h]
            continue
        for h in members:
            ob += w.o[h] @ w.vb[h]
        if merge == "medoid":
            m = mids[c]
            q[c], qb[c], kk[c], kb[c] = w.q[m], w.qb[m], w.k[m], w.kb[m]
            o[c], v[c] = _balanced_rank(np.hstack([w.o[h] for h in members]),
                                        np.vstack([w.v[h] for h in members]), dv)
        else:
            q[c], qb[c] = w.q[members].mean(0), w.qb[members].mean(0)
            kk[c], kb[c] = w.k[members].mean(0), w.kb[members].mean(0)
            v[c] = w.v[members].mean(0)
            o[c] = w.o[members].sum(0)
            if repair == "ar":
                sq, sk, sv = _ar_rows(w.q[members]), _ar_rows(w.k[members]), _ar_rows(w.v[members])
                q[c] *= sq[:, None]
                qb[c] *= sq
                kk[c] *= sk[:, None]
                kb[c] *= sk
                v[c] *= sv[:, None]
    return HeadWeights(q, qb, kk, kb, v, vb, o, ob)
