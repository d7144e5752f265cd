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

**Grouped-query attention** (``Hkv`` key/value heads, ``n = H / Hkv`` query
heads on each): query heads ``g·n…(g+1)·n`` read key/value head g, and the
graph repeats every key/value head n times, so every group must keep the
same number of query heads. Two folds keep that shape:

* :func:`merge_heads` folds whole **key/value groups** (a key/value head
  with its n query heads; with ``n = 1`` this is multi-head folding, and the
  rule above): the medoid group keeps its k and q rows (query head j of the
  merged group is query head j of the medoid), and v with the n heads' o
  columns become the best rank-Dv factorisation of the stacked products
  ``[Σ_g Wo_{g,j} Wv_g]_j`` (v is shared by the n query heads, so one
  factorisation for all of them). ``merge="mean"`` averages q (per position
  j), k and v over the groups and sums o.
* :func:`merge_query_heads` folds **query heads within each group**: k and v
  stay, the medoid keeps its q rows, and the members' o columns are summed:
  given the medoid's pattern, ``Σ_h Wo_h Wv_g = (Σ_h Wo_h) Wv_g`` is exact,
  value biases included (``merge="mean"``: q rows averaged). A dropped query
  head hands its ``Wo_h bv_g`` to the o bias.

:func:`grouped_shape` says how many of each are kept.

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


def grouped_shape(num_heads: int, num_kv_heads: int, heads: int, kv_heads: float | None = None) -> tuple[int, int]:
    """(key/value heads kept, query heads kept per key/value head) for at
    most ``heads`` query heads in all.

    ``kv_heads`` (a count or the share removed, as in :func:`heads_after`;
    None: all of them) caps the key/value heads; they are also cut to
    ``heads`` when fewer query heads than key/value heads are asked for
    (every key/value head keeps at least one query head). The rest of the
    cut falls within the groups: ``heads // kv`` query heads each, at most
    the ``n`` they have. So without ``kv_heads`` query heads fold within
    their groups first, and whole groups only below one query head per
    group. Multi-head attention (``n = 1``) keeps ``min(heads, kv)`` heads."""
    n = num_heads // num_kv_heads
    kv = num_kv_heads if kv_heads is None else heads_after(num_kv_heads, kv_heads)
    kv = max(1, min(kv, heads))
    return kv, max(1, min(n, heads // kv))


@dataclass
class HeadWeights:
    """One attention block's projections, split per head.

    q: (H, D, in); qb: (H, D); k: (Hkv, D, in); kb: (Hkv, D); v: (Hkv, Dv,
    in); vb: (Hkv, Dv); o: (H, out, Dv) (the o-projection's columns of each
    query head); ob: (out). Multi-head attention has ``Hkv = H``; with
    grouped-query attention query head h reads key/value head ``h // n``."""

    q: np.ndarray
    qb: np.ndarray
    k: np.ndarray
    kb: np.ndarray
    v: np.ndarray
    vb: np.ndarray
    o: np.ndarray
    ob: np.ndarray

    @classmethod
    def split(cls, wq, bq, wk, bk, wv, bv, wo, bo, heads: int, kv_heads: int | None = None) -> HeadWeights:
        kv_heads = kv_heads or heads

        def rows(w, count=kv_heads):
            return np.asarray(w, dtype=np.float64).reshape(count, -1, w.shape[1])

        def vec(b, n):
            return np.zeros(n) if b is None else np.asarray(b, dtype=np.float64)

        out = wo.shape[0]
        o = np.asarray(wo, dtype=np.float64).reshape(out, heads, -1).transpose(1, 0, 2)
        return cls(rows(wq, heads), vec(bq, wq.shape[0]).reshape(heads, -1), rows(wk),
                   vec(bk, wk.shape[0]).reshape(kv_heads, -1), rows(wv), vec(bv, wv.shape[0]).reshape(kv_heads, -1),
                   o, vec(bo, out))

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // max(1, self.num_kv_heads)

    def per_query(self, x: np.ndarray) -> np.ndarray:
        """A per-key/value-head array repeated for each query head of its group."""
        return np.repeat(x, self.group_size, axis=0)

    def joined(self) -> tuple[np.ndarray, ...]:
        """(wq, bq, wk, bk, wv, bv, wo, bo) as whole-layer matrices (W out × in)."""
        h = self.num_heads
        out = self.o.shape[1]
        return (self.q.reshape(-1, self.q.shape[2]), self.qb.reshape(-1), self.k.reshape(-1, self.k.shape[2]),
                self.kb.reshape(-1), self.v.reshape(-1, self.v.shape[2]), self.vb.reshape(-1),
                self.o.transpose(1, 0, 2).reshape(out, -1) if h else np.zeros((out, 0)), self.ob)

    def features(self) -> np.ndarray:
        """Per-head clustering features (H × F): q, k, v rows with their
        biases and the head's o-projection columns, flattened (k and v those
        of the head's key/value head)."""
        h, rep = self.num_heads, self.per_query
        return np.hstack([self.q.reshape(h, -1), self.qb, rep(self.k).reshape(h, -1), rep(self.kb),
                          rep(self.v).reshape(h, -1), rep(self.vb), self.o.transpose(0, 2, 1).reshape(h, -1)])

    def group_features(self, features: str = "weights") -> np.ndarray:
        """Per key/value group clustering features (Hkv × F): ``"weights"``,
        the group's q rows (its query heads in order), k, v and o columns;
        ``"circuits"``, its query heads' circuits in order. Multi-head
        attention: :meth:`features` / :meth:`circuits` themselves."""
        g, n = self.num_kv_heads, self.group_size
        if features == "circuits":
            return self.circuits().reshape(g, -1)
        return np.hstack([self.q.reshape(g, -1), self.qb.reshape(g, -1), self.k.reshape(g, -1), self.kb,
                          self.v.reshape(g, -1), self.vb, self.o.transpose(0, 2, 1).reshape(g, n, -1).reshape(g, -1)])

    def circuits(self) -> np.ndarray:
        """Per-head features invariant to how a head's dimensions are rotated
        (H × F): the QK circuit ``Wq_hᵀ Wk_h`` with the query-bias term
        ``Wk_hᵀ bq_h`` (the parts of the scores that vary with the key), and
        the OV circuit ``Wo_h Wv_h``, each scaled to unit norm per head so
        both halves weigh alike. Two heads computing the same function have
        the same circuits even when their raw rows differ by a rotation."""
        h, k, v = self.num_heads, self.per_query(self.k), self.per_query(self.v)
        qk = np.matmul(self.q.transpose(0, 2, 1), k).reshape(h, -1)
        qb = np.matmul(self.qb[:, None, :], k).reshape(h, -1)
        ov = np.matmul(self.o, v).reshape(h, -1)

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


def query_heads_of_groups(group_labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where :func:`merge_heads` puts each query head (``n`` per key/value
    group, ``group_labels`` per group): (its head in the merged block, -1 if
    dropped; whether its value bias moved to the o bias, i.e. its group was
    merged with another)."""
    group_labels = np.asarray(group_labels)
    kept = group_labels >= 0
    merged = np.zeros(group_labels.size, dtype=bool)
    merged[kept] = np.bincount(group_labels[kept])[group_labels[kept]] > 1
    heads = np.where(kept[:, None], group_labels[:, None] * n + np.arange(n), -1).reshape(-1)
    return heads, np.repeat(merged, n)


def chained_labels(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Head labels of two folds in a row: ``second`` labels the heads ``first`` left (-1: dropped by either)."""
    first = np.asarray(first)
    return np.where(first >= 0, np.asarray(second)[np.maximum(first, 0)], -1)


def _check_merge(merge: str) -> None:
    if merge not in MERGES:
        raise ValueError(f"unknown head merge {merge!r}")


def merge_heads(w: HeadWeights, labels: np.ndarray, merge: str = "medoid", repair: str = "none",
                features: str = "weights") -> HeadWeights:
    """The block with its key/value groups merged by cluster (``labels``,
    one per key/value head; -1 = dropped with its query heads). In
    multi-head attention a group is one head.

    Singleton clusters keep their group bit for bit. Dropped groups and
    merged clusters hand their value-bias constants ``Wo_h bv_g`` to the o
    bias. ``repair="ar"`` only acts with ``merge="mean"`` (the medoid merge
    does not average q/k, and its v/o factorisation keeps the product's scale)."""
    _check_merge(merge)
    labels = np.asarray(labels)
    n, k = w.group_size, int(labels.max()) + 1
    mids = medoids(w.group_features(features), labels)
    d, dv, inq = w.q.shape[1], w.v.shape[1], w.q.shape[2]
    out = w.o.shape[1]
    q, qb = np.zeros((k, n, d, inq)), np.zeros((k, n, d))
    kk, kb = np.zeros((k, d, w.k.shape[2])), np.zeros((k, d))
    v, vb = np.zeros((k, dv, w.v.shape[2])), np.zeros((k, dv))
    o = np.zeros((k, n, out, dv))
    gq, gqb, go = (x.reshape(w.num_kv_heads, n, *x.shape[1:]) for x in (w.q, w.qb, w.o))  # per group
    ob = w.ob.copy()

    def move_value_bias(g):  # its query heads' constant Wo_h bv_g goes to the o bias
        return sum(go[g, j] @ w.vb[g] for j in range(n))

    for g in np.flatnonzero(labels < 0):
        ob += move_value_bias(g)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if members.size == 1:
            g = members[0]
            q[c], qb[c], kk[c], kb[c], v[c], vb[c], o[c] = gq[g], gqb[g], w.k[g], w.kb[g], w.v[g], w.vb[g], go[g]
            continue
        for g in members:
            ob += move_value_bias(g)
        if merge == "medoid":
            m = mids[c]
            q[c], qb[c], kk[c], kb[c] = gq[m], gqb[m], w.k[m], w.kb[m]
            # rows: query position j; columns: the members' heads at j (v is shared by the n positions)
            left, v[c] = _balanced_rank(np.vstack([np.hstack([go[g, j] for g in members]) for j in range(n)]),
                                        np.vstack([w.v[g] for g in members]), dv)
            o[c] = left.reshape(n, out, dv)
        else:
            q[c], qb[c] = gq[members].mean(0), gqb[members].mean(0)
            kk[c], kb[c] = w.k[members].mean(0), w.kb[members].mean(0)
            v[c] = w.v[members].mean(0)
            o[c] = go[members].sum(0)
            if repair == "ar":
                sq = _ar_rows(gq[members].reshape(members.size, n * d, inq)).reshape(n, d)
                sk, sv = _ar_rows(w.k[members]), _ar_rows(w.v[members])
                q[c] *= sq[:, :, None]
                qb[c] *= sq
                kk[c] *= sk[:, None]
                kb[c] *= sk
                v[c] *= sv[:, None]
    return HeadWeights(q.reshape(k * n, d, inq), qb.reshape(k * n, d), kk, kb, v, vb, o.reshape(k * n, out, dv), ob)


def merge_query_heads(w: HeadWeights, labels: np.ndarray, merge: str = "medoid", repair: str = "none",
                      features: str = "weights") -> HeadWeights:
    """The block with query heads merged within their key/value groups
    (``labels`` per query head, -1 = dropped): clusters ``g·n'…(g+1)·n'-1``
    hold query heads of group g only, the same number ``n'`` in every group.
    k and v are kept; a merged cluster keeps its medoid's q rows (``mean``:
    the members' average, with Fold-AR's factor for ``repair="ar"``) and the
    sum of the members' o columns."""
    _check_merge(merge)
    labels = np.asarray(labels)
    k, n, groups = int(labels.max()) + 1, w.group_size, w.num_kv_heads
    per = k // groups
    owner = np.arange(w.num_heads) // n
    if k != per * groups or any(np.any(owner[labels == c] != c // per) for c in range(k)):
        raise ValueError(f"query-head clusters must keep {per} heads in each of the {groups} key/value groups")
    mids = medoids(w.circuits() if features == "circuits" else w.features(), labels)
    q, qb, o, ob = np.zeros((k, *w.q.shape[1:])), np.zeros((k, w.qb.shape[1])), np.zeros((k, *w.o.shape[1:])), w.ob.copy()
    for h in np.flatnonzero(labels < 0):
        ob += w.o[h] @ w.vb[owner[h]]
    for c in range(k):
        members = np.flatnonzero(labels == c)
        o[c] = w.o[members].sum(0)
        if merge == "medoid" or members.size == 1:
            q[c], qb[c] = w.q[mids[c]], w.qb[mids[c]]
            continue
        q[c], qb[c] = w.q[members].mean(0), w.qb[members].mean(0)
        if repair == "ar":
            s = _ar_rows(w.q[members])
            q[c] *= s[:, None]
            qb[c] *= s
    return HeadWeights(q, qb, w.k.copy(), w.kb.copy(), w.v.copy(), w.vb.copy(), o, ob)
