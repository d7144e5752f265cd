"""Neuron folding decisions in plain numpy / scikit-learn (no ONNX here).

One hidden layer of n neurons has incoming rows ``w_in`` (n × in), bias
``b_in`` (n) and outgoing columns ``w_out`` (out × n). Folding turns it into k
neurons, expressed as the two maps of :class:`onnxfold.rewrite.HiddenEdit`:

- ``row_map`` (k × n): new incoming rows/biases are ``row_map @ old`` (cluster
  means, or a selection when pruning);
- ``col_map`` (n × k): new outgoing columns are ``old @ col_map`` (cluster
  membership: a cluster's columns are summed).

Repairs then adjust the merged pre-activations (``row_scale``/``row_shift``) or
refit the consumer (:func:`refit_consumer`). Method and notation:
``docs/methods.md`` section 2 (Wang et al., ICLR 2025).
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..measure.stats import DEFAULT_RIDGE_LAMS, GramAccumulator, ridge_path

#: k-means restarts (scikit-learn's own default for k-means++ init); fixed
#: so that a seed fully determines the clustering.
KMEANS_N_INIT = 1

#: Clusterings kept by :func:`kmeans_labels`, newest last. Trying several
#: repairs (or budgets) on one model clusters the same layers again with the
#: same k; k-means is the slowest step of data-free folding.
_KMEANS_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_KMEANS_CACHE_SIZE = 64

#: Relative ridge strengths tried by the consumer refit. The refit shrinks
#: towards the plain fold (see :func:`refit_consumer`), so strong values are
#: meaningful too: they interpolate between "refit" and "no refit".
REFIT_RIDGE_LAMS: tuple[float, ...] = (*DEFAULT_RIDGE_LAMS, 1.0, 10.0)


def target_width(n: int, ratio: float) -> int:
    """Neurons left when a share ``ratio`` of ``n`` is removed: round(n·(1−r)), at least 1."""
    return max(1, min(n, int(round(n * (1.0 - ratio)))))


def unit_features(blocks) -> np.ndarray:
    """Per-unit clustering features: the blocks (each n × p_i, one row per
    unit: its incoming rows, bias, outgoing columns...) side by side, float64."""
    return np.hstack([np.asarray(b, dtype=np.float64).reshape(np.shape(b)[0], -1) for b in blocks])


def neuron_features(w_in: np.ndarray, b_in: np.ndarray | None, w_out: np.ndarray) -> np.ndarray:
    """Per-neuron clustering features ``[w_in[j,:], b_in[j], w_out[:,j]ᵀ]`` (n × (in+1+out))."""
    n = w_in.shape[0]
    b = np.zeros(n) if b_in is None else np.asarray(b_in, dtype=np.float64).reshape(n)
    return unit_features([w_in, b[:, None], np.asarray(w_out).T])


#: k-means problems with n · k · dim at least this big use cheap seeding and threads
BIG_KMEANS = 2**30
#: Big problems seed from an n × n Gram of the points up to this many points (128 MiB)
GRAM_SEEDING_MAX_POINTS = 4096

#: Feature matrices bigger than this many elements (n neurons × (in + 1 + out))
#: are clustered on a random projection instead: for a 8192-wide layer the
#: features alone would be 1 GiB in float64 and one k-means iteration ~10¹² flops
#: (2**22: the MiniLM FFN, 1536 x 769, and the shipped MLPs stay exact).
SKETCH_ABOVE = 2**22
#: Dimension of that projection. Random Gaussian projections to O(log k / ε²)
#: dimensions preserve the k-means cost within 1 ± ε (Boutsidis et al., 2010;
#: Makarychev et al., 2019); 128 keeps a 4096-cluster fold of a 8192-wide
#: layer at seconds per Lloyd iteration.
SKETCH_DIM = 128


def needs_sketch(blocks) -> bool:
    """Whether :func:`unit_features` of ``blocks`` is too big to cluster directly."""
    return blocks[0].shape[0] * sum(int(np.prod(b.shape[1:])) for b in blocks) > SKETCH_ABOVE


def unit_sketch(blocks, dim: int = SKETCH_DIM, seed: int = 0) -> np.ndarray:
    """``unit_features(blocks) @ R`` for a Gaussian R (entries N(0, 1/dim)),
    computed block-wise in float32 without forming the features. R's blocks
    are drawn in the order of ``blocks``; the products of the matrix blocks
    are summed first, then those of the one-column blocks (biases).

    Exact duplicate units get bit-identical rows (the row of their first
    occurrence), so :func:`kmeans_labels` still puts them in one cluster.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(dim)
    draws = [(rng.standard_normal((b.shape[1], dim)) * scale).astype(np.float32) for b in blocks]
    matrices = [(b, r) for b, r in zip(blocks, draws) if b.shape[1] > 1]
    vectors = [(b, r) for b, r in zip(blocks, draws) if b.shape[1] == 1]
    sketch = np.zeros((blocks[0].shape[0], dim), dtype=np.float32)
    for b, r in matrices:
        sketch += np.asarray(b, dtype=np.float32) @ r
    for b, r in vectors:
        sketch += np.asarray(b, dtype=np.float32) * r
    first = _first_duplicate([b for b, _ in matrices], [b for b, _ in vectors])
    dup = first != np.arange(first.size)
    sketch[dup] = sketch[first[dup]]
    return sketch.astype(np.float64)


def _first_duplicate(matrices, vectors) -> np.ndarray:
    """For each unit, the index of the first unit with byte-identical rows in
    every block (vector blocks compared as float64)."""
    n = (matrices or vectors)[0].shape[0]
    first: dict[bytes, int] = {}
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        h = hashlib.blake2b(digest_size=16)
        for m in matrices:
            h.update(np.ascontiguousarray(m[j]).tobytes())
        for v in vectors:
            h.update(np.asarray(v[j], dtype=np.float64).tobytes())
        out[j] = first.setdefault(h.digest(), j)
    return out


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0..k-1 in order of their first member, so that the
    folded layer's neuron order does not depend on k-means' label numbering."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return order[inverse].astype(np.int64)


def kmeans_key(features: np.ndarray, k: int, seed: int, n_init: int = KMEANS_N_INIT) -> tuple:
    """What :func:`kmeans_labels` memoises a clustering by (``features`` C-contiguous float64)."""
    return hashlib.sha1(features.data).hexdigest(), features.shape, int(k), int(seed), int(n_init)


def kmeans_known(features: np.ndarray, k: int, seed: int = 0, n_init: int = KMEANS_N_INIT) -> bool:
    """Whether :func:`kmeans_labels` has this clustering memoised (it would return at once)."""
    return kmeans_key(np.ascontiguousarray(features, dtype=np.float64), k, seed, n_init) in _KMEANS_CACHE


def remember_kmeans(features: np.ndarray, k: int, seed: int, labels: np.ndarray, n_init: int = KMEANS_N_INIT) -> None:
    """Memoise what :func:`kmeans_labels` returned for this problem elsewhere (a Ray task)."""
    _KMEANS_CACHE[kmeans_key(np.ascontiguousarray(features, dtype=np.float64), k, seed, n_init)] = labels.copy()
    while len(_KMEANS_CACHE) > _KMEANS_CACHE_SIZE:
        _KMEANS_CACHE.popitem(last=False)


def kmeans_labels(features: np.ndarray, k: int, seed: int = 0, n_init: int = KMEANS_N_INIT) -> np.ndarray:
    """Cluster index (0..k'-1, k' ≤ k) of every row of ``features``.

    Exact duplicate rows are collapsed first and clustered once, weighted by
    their count: duplicates always land in one cluster (so folding a layer of
    duplicated neurons is exact), and when there are at most k distinct rows no
    k-means is needed at all. Deterministic for a given ``seed``; results are
    memoised by the features' bytes.
    """
    features = np.ascontiguousarray(features, dtype=np.float64)
    key = kmeans_key(features, k, seed, n_init)
    if key in _KMEANS_CACHE:
        _KMEANS_CACHE.move_to_end(key)
        return _KMEANS_CACHE[key].copy()
    labels = _kmeans_labels(features, k, seed, n_init)
    _KMEANS_CACHE[key] = labels
    while len(_KMEANS_CACHE) > _KMEANS_CACHE_SIZE:
        _KMEANS_CACHE.popitem(last=False)
    return labels.copy()


def _kmeans_labels(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    n = features.shape[0]
    if not 1 <= k:
        raise ValueError("k must be at least 1")
    if _rows_all_distinct(features):  # what np.unique below would find, without sorting n long rows
        X, w, to_rows = features, np.ones(n, dtype=np.intp), None
    else:
        distinct, first, inverse, counts = np.unique(features, axis=0, return_index=True, return_inverse=True,
                                                     return_counts=True)
        inverse = inverse.reshape(-1)
        # np.unique sorts rows; restore first-occurrence order so the result does
        # not depend on how rows happen to sort.
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        X, w, to_rows = distinct[order], counts[order], rank[inverse]
    if X.shape[0] <= k:
        return _canonical(np.arange(n) if to_rows is None else to_rows)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    big = X.shape[0] * k * X.shape[1] >= BIG_KMEANS
    # One thread for the usual small problems: OpenMP/BLAS threads fighting
    # over busy cores made k-means several times slower in our measurements.
    # Big ones (wide layers) are worth the threads.
    with threadpool_limits(None if big else 1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicate rows: labels stay valid
        if big:
            # plain k-means++ seeding (one candidate per step instead of
            # scikit-learn's greedy 2 + ln k): ~10x faster for thousands of
            # clusters (35 s -> 3 s for k=4096 on a 8192-wide layer), and the
            # seeding, not Lloyd's iterations, dominated there.
            if X.shape[0] <= GRAM_SEEDING_MAX_POINTS:
                from sklearn.utils import check_random_state

                init = _gram_kmeans_plusplus(w, trials=1)(X, k, check_random_state(seed))
            else:  # the n × n Gram would not fit comfortably: scikit-learn's product per step
                from sklearn.cluster import kmeans_plusplus

                init, _ = kmeans_plusplus(X, k, sample_weight=w, random_state=seed, n_local_trials=1)
            km = KMeans(n_clusters=k, n_init=1, init=init, random_state=seed)
        else:
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, init=_gram_kmeans_plusplus(w))
        distinct_labels = km.fit(X, sample_weight=w).labels_
    return _canonical(distinct_labels if to_rows is None else distinct_labels[to_rows])


def _rows_all_distinct(features: np.ndarray) -> bool:
    """True only if no two rows are equal (as ``np.unique(axis=0)`` compares
    them: -0.0 equals 0.0, NaN equals nothing): an exact integer hash of each
    row's bits (-0.0 made 0.0) is different for every row. Equal rows always
    hash alike, so a False only means "look closer" (np.unique does)."""
    bits = np.ascontiguousarray(features + 0.0).view(np.uint64)  # + 0.0: -0.0 becomes 0.0
    mult = np.random.default_rng(0).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (bits * mult).sum(axis=1, dtype=np.uint64)
    return np.unique(h).size == h.size


def _gram_kmeans_plusplus(sample_weight: np.ndarray, trials: int | None = None):
    """scikit-learn's k-means++ seeding (``init="k-means++"``: greedy, 2 + ln k
    trials per centre, the same random draws in the same order) as an
    ``init`` callable, with every point-to-point product taken from one Gram
    matrix ``X Xᵀ`` computed up front instead of a product per step (and
    without scikit-learn's per-step input checks): 5-10x faster for the
    few-hundred-neuron layers a budget search folds again and again.
    ``trials=1``: ``sklearn.cluster.kmeans_plusplus(..., n_local_trials=1)``,
    the plain seeding big problems use (one product per centre there: 4.5 s
    of a MiniLM search's 60 s decide stage went to the six 1536-neuron FFN
    layers' 1382 steps each; from the Gram, under 0.1 s a layer).

    The candidates are data points, so their distances are rows of that
    Gram; they equal scikit-learn's per-step products up to the last bits of
    the BLAS summation order, which only matters for an exact tie in a draw
    (the chosen settings of every benchmark stayed the same, BENCHMARKS.md).
    ``sample_weight``: what ``fit`` is given (KMeans does not pass it to a
    callable)."""
    weight = np.asarray(sample_weight, dtype=np.float64)

    def init(X: np.ndarray, n_clusters: int, random_state) -> np.ndarray:
        # X: the centred data KMeans.fit seeds on; norms as sklearn's row_norms
        x_sq = np.einsum("ij,ij->i", X, X)
        x_sq_row, weight_col = x_sq[None, :], weight.reshape(-1, 1)
        gram = X @ X.T

        def sq_distances(rows: np.ndarray) -> np.ndarray:  # as sklearn's _euclidean_distances(squared=True)
            d = -2 * gram[rows]
            d += x_sq[rows][:, None]
            d += x_sq_row
            return np.maximum(d, 0, out=d)

        n = X.shape[0]
        tries = 2 + int(np.log(n_clusters)) if trials is None else int(trials)
        indices = np.full(n_clusters, -1, dtype=int)
        indices[0] = random_state.choice(n, p=weight / weight.sum())
        closest = sq_distances(indices[:1])
        pot = closest @ weight
        for c in range(1, n_clusters):
            picks = np.searchsorted(np.cumsum(weight * closest), random_state.uniform(size=tries) * pot)
            np.clip(picks, None, closest.size - 1, out=picks)
            dist = sq_distances(picks)
            np.minimum(closest, dist, out=dist)
            pots = dist @ weight_col
            best = np.argmin(pots)
            pot, closest = pots[best], dist[best]
            indices[c] = picks[best]
        return X[indices]

    return init


def split_clusters(labels: np.ndarray, k: int) -> np.ndarray:
    """``labels`` (0..k'-1) with clusters split until there are ``min(k, n)``:
    the last member of the largest cluster becomes a cluster of its own
    (numbered next), as often as needed."""
    labels = np.array(labels, dtype=np.int64)
    while labels.max() + 1 < min(k, labels.size):
        sizes = np.bincount(labels)
        labels[np.flatnonzero(labels == int(np.argmax(sizes)))[-1]] = sizes.size
    return labels


def magnitude_keep(w_in: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the k neurons with the largest incoming-row L2 norm
    (ties: lower index first) - the structured magnitude-pruning baseline."""
    norms = np.linalg.norm(np.asarray(w_in, dtype=np.float64), axis=1)
    order = np.argsort(-norms, kind="stable")
    return np.sort(order[:k])


#: Damping of the input covariance in :func:`obs_keep`, relative to its
#: mean diagonal: keeps the inverse finite when units are (nearly) collinear
#: on the data (dead or duplicate units), as OBS/SparseGPT do.
OBS_DAMPING = 1e-2


def obs_keep(cov: np.ndarray, weight: np.ndarray, k: int, unit: int = 1,
             parts: list[np.ndarray] | None = None) -> np.ndarray:
    """Indices (ascending) of the ``k`` units to keep so that the reader
    ``y = weight @ x``, refit by least squares on what is kept, loses least:
    structured Optimal Brain Surgeon, greedy (Hassibi & Stork, 1993; the
    structured form of Kurtic et al., ZipLM 2023).

    ``cov``: the covariance of the reader's input over the data (p × p,
    p = units · ``unit``, unit u owning columns ``u·unit … u·unit+unit−1``);
    ``weight``: the reader's weight (q × p; several readers of the same input
    stacked). Removing unit u with the rest re-solved costs
    ``tr(W_u (H⁻¹)_uu⁻¹ W_uᵀ)`` of summed squared output error; the cheapest
    unit goes, W and H⁻¹ are updated in closed form, and so on until ``k``
    are left. ``parts``: unit index arrays that must each keep an equal share
    (``k // len(parts)``), as query heads keep a count per key/value group.
    """
    if parts is None:
        return ObsPath(cov, weight, unit).keep(k)
    path = ObsPath(cov, weight, unit)
    part_of = np.zeros(path.units, dtype=np.int64)
    for i, part in enumerate(parts):
        part_of[np.asarray(part, dtype=np.int64)] = i
    per = max(1, k // len(parts))
    while path.alive.sum() > per * len(parts):
        # a part at its quota keeps what it has
        counts = np.bincount(part_of[path.alive], minlength=len(parts))
        path.remove_cheapest(counts[part_of] <= per)
    return np.flatnonzero(path.alive)


class ObsPath:
    """The greedy removal order of :func:`obs_keep` (without ``parts``),
    walked only as far as asked: the units kept at k are the units kept at
    k + 1 less the next one removed, whatever k is asked for, so one path
    answers every k of a sweep (a budget search asks for several ratios of
    the same layer) at the price of the deepest one."""

    def __init__(self, cov: np.ndarray, weight: np.ndarray, unit: int = 1):
        H = np.asarray(cov, dtype=np.float64)
        self.W = np.array(weight, dtype=np.float64, order="C")  # C order: _remove_column updates it in place
        p = H.shape[0]
        self.unit = unit
        self.units = p // unit
        if self.W.shape[1] != p or self.units * unit != p:
            raise ValueError(f"weight has {self.W.shape[1]} columns, the covariance {p}; unit {unit}")
        damp = OBS_DAMPING * max(float(np.mean(np.diag(H))), 1e-12)
        self.Hinv = np.ascontiguousarray(np.linalg.inv(H + damp * np.eye(p)))
        self.alive = np.ones(self.units, dtype=bool)
        self.removed: list[int] = []

    def keep(self, k: int) -> np.ndarray:
        """Indices (ascending) of the ``k`` units kept (at least one)."""
        k = max(1, min(int(k), self.units))
        while self.units - len(self.removed) > k:
            self.remove_cheapest()
        alive = np.ones(self.units, dtype=bool)
        alive[self.removed[:self.units - k]] = False
        return np.flatnonzero(alive)

    def remove_cheapest(self, blocked: np.ndarray | None = None) -> int:
        """Remove the unit whose loss costs least (``blocked`` units stay)."""
        W, Hinv, alive, unit = self.W, self.Hinv, self.alive, self.unit
        if unit == 1:
            return self._remove_column(blocked)
        costs = np.full(self.units, np.inf)
        cols = np.arange(self.units * unit).reshape(self.units, unit)
        for u in np.flatnonzero(alive):
            c = cols[u]
            Wu = W[:, c]
            costs[u] = float(np.trace(Wu @ np.linalg.solve(Hinv[np.ix_(c, c)], Wu.T)))
        if blocked is not None:
            costs[blocked] = np.inf
        best = int(np.argmin(costs))
        c = slice(best * unit, (best + 1) * unit)
        block = np.linalg.inv(Hinv[c, c])
        # the kept columns take over what the removed unit carried; its row/column of H⁻¹ drop out
        W -= (W[:, c] @ block) @ Hinv[c, :]
        Hinv -= (Hinv[:, c] @ block) @ Hinv[c, :]
        W[:, c] = 0.0
        Hinv[c, :] = 0.0
        Hinv[:, c] = 0.0
        Hinv[c, c] = np.eye(unit)  # never read again (the unit is dead); keeps the diagonal positive
        alive[best] = False
        self.removed.append(best)
        return best

    def _remove_column(self, blocked: np.ndarray | None) -> int:
        """:meth:`remove_cheapest` for single columns: the updates are rank-1,
        done in place by BLAS (no p × p temporary per removal)."""
        from scipy.linalg.blas import dger

        W, Hinv, alive = self.W, self.Hinv, self.alive
        costs = np.einsum("ij,ij->j", W, W) / Hinv.diagonal()
        costs[~alive] = np.inf
        if blocked is not None:
            costs[blocked] = np.inf
        best = int(np.argmin(costs))
        h, w = Hinv[:, best].copy(), W[:, best].copy()
        # H⁻¹ is symmetric and C-ordered, so its transpose is the Fortran-ordered matrix BLAS updates in place
        dger(-1.0 / h[best], h, h, a=Hinv.T, overwrite_a=1)
        dger(-1.0 / h[best], h, w, a=W.T, overwrite_a=1)
        W[:, best] = 0.0
        Hinv[best, :] = 0.0
        Hinv[:, best] = 0.0
        Hinv[best, best] = 1.0
        alive[best] = False
        self.removed.append(best)
        return best


def cluster_maps(labels: np.ndarray, sparse: bool = False):
    """(row_map k×n of cluster means, col_map n×k of cluster membership).

    ``labels[j]`` is neuron j's cluster in 0..k-1, or -1 for a neuron that is
    removed outright (zero row in ``col_map``, no weight in ``row_map``).
    ``sparse=True`` gives scipy CSR matrices (n non-zeros instead of k·n
    entries: what wide layers need; ``apply_edit`` takes either)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    inside = np.flatnonzero(labels >= 0)
    sizes = np.bincount(labels[inside], minlength=k).astype(np.float64)
    if np.any(sizes == 0):
        raise ValueError("cluster labels must be 0..k-1 with no empty cluster")
    if sparse:
        from scipy.sparse import csr_matrix

        member = csr_matrix((np.ones(inside.size), (inside, labels[inside])), shape=(labels.size, k))
        row_map = csr_matrix((1.0 / sizes[labels[inside]], (labels[inside], inside)), shape=(k, labels.size))
        return row_map, member
    member = np.zeros((labels.size, k))
    member[inside, labels[inside]] = 1.0
    return member.T / sizes[:, None], member


def fold_ar_scale(w_in: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fold-AR's data-free variance repair, one factor per cluster:
    ``sqrt(N_c / (1 + (N_c − 1)·E_c))``, E_c = mean pairwise cosine similarity
    of the members' incoming rows (1 for singletons). Labels as in
    :func:`cluster_maps` (-1: removed neuron, ignored).

    Why: averaging N inputs-correlated-as-E pre-activations divides their
    variance by N / (1 + (N−1)E) (Wang et al., assuming uncorrelated inputs).
    E_c is floored at 0: anti-aligned members would make the factor explode,
    and we never amplify beyond the uncorrelated case (factor ≤ sqrt(N_c)).
    Zero rows take part with cosine 0.
    """
    from scipy.sparse import csr_matrix

    labels = np.asarray(labels)
    keep = labels >= 0
    w = np.asarray(w_in)
    w = w[keep] if not keep.all() else w
    if w.dtype != np.float32:  # float32 stays float32: a wide layer's copy is big
        w = w.astype(np.float64)
    labels = labels[keep]
    norms = np.linalg.norm(w, axis=1)
    unit = np.divide(w, norms[:, None], out=np.zeros_like(w), where=norms[:, None] > 0)
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    # in the rows' own precision: a float64 copy of a wide layer's rows is what
    # would dominate memory here
    member = csr_matrix((np.ones(labels.size, dtype=unit.dtype), (labels, np.arange(labels.size))),
                        shape=(k, labels.size))
    sums = member @ unit
    del unit
    self_terms = np.bincount(labels, weights=(norms > 0).astype(np.float64), minlength=k)
    # sum over ordered pairs i≠j of cos_ij = ||Σ u_i||² − Σ ||u_i||²
    pair_sum = np.einsum("ij,ij->i", sums, sums, dtype=np.float64) - self_terms
    pairs = sizes * (sizes - 1)
    mean_cos = np.divide(pair_sum, pairs, out=np.ones(k), where=pairs > 0)
    mean_cos = np.clip(mean_cos, 0.0, 1.0)
    return np.sqrt(sizes / (1.0 + (sizes - 1.0) * mean_cos))


def merged_moments(row_map: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``row_map @ z`` given z's mean and covariance."""
    m = row_map.toarray() if hasattr(row_map, "toarray") else np.asarray(row_map, dtype=np.float64)
    var = np.einsum("ij,ij->i", m @ cov, m)  # diag(M Σ Mᵀ) without forming k×k
    return m @ mean, np.sqrt(np.clip(var, 0.0, None))


def repair_affine(target_mean: np.ndarray, target_std: np.ndarray, merged_mean: np.ndarray,
                  merged_std: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """REPAIR (Jordan et al.): (scale, shift) with ``scale·z + shift`` having the
    target mean and std. A merged neuron that is constant on the data keeps
    scale 1 (there is no spread to stretch) and only gets its mean moved."""
    merged_std = np.asarray(merged_std, dtype=np.float64)
    ok = merged_std > eps * np.maximum(1.0, np.abs(merged_mean))
    scale = np.where(ok, np.asarray(target_std, dtype=np.float64) / np.where(ok, merged_std, 1.0), 1.0)
    shift = np.asarray(target_mean, dtype=np.float64) - scale * merged_mean
    return scale, shift


@dataclass
class Refit:
    """Outcome of :func:`refit_consumer`: the consumer's new weight and bias."""

    weight: np.ndarray  # out × k
    bias: np.ndarray  # out
    lam: float | None  # chosen relative ridge strength; None: keeping the fold won
    heldout_error: float  # squared error on the held-out rows / the target's spread there (nan: none held out)
    kept_error: float  # the same for the plain fold, for comparison


def refit_consumer(fit: GramAccumulator, heldout: GramAccumulator | None, w_prior: np.ndarray,
                   b_prior: np.ndarray, *, final: GramAccumulator | None = None, target_ss: float | None = None,
                   lams=REFIT_RIDGE_LAMS, default_lam: float = 1e-2) -> Refit:
    """Ridge least-squares refit of the consumer, shrunk towards the plain fold.

    The accumulators hold X = the folded hidden activations and
    Y = target − (current consumer output − b_prior), i.e. what the consumer's
    main product must add on top of the plain fold ``w_prior`` (out × k). So a
    ridge solution Δ, b gives ``w_prior + Δ, b``: minimising
    ``‖y − (w_prior+Δ)x − b‖² + λ‖Δ‖²``. Shrinking towards the fold rather than
    towards 0 means a strong λ falls back to plain folding instead of to a
    dead layer, which matters with few calibration rows.

    ``lams`` are relative (see ``GramAccumulator.solve_ridge``); the one with the
    smallest residual on ``heldout`` (solving on ``fit``) is chosen, unless
    keeping the plain fold is better there; the returned weights are solved
    with it on ``final`` (default ``fit``; e.g. fit and held-out rows merged
    when the held-out rows were split off the calibration data). Without
    ``heldout``, ``default_lam``. Errors are reported relative to
    ``target_ss``, the held-out target's sum of squares about its mean
    (default: that of the accumulated Y).
    """
    w_prior = np.asarray(w_prior, dtype=np.float64)
    b_prior = np.asarray(b_prior, dtype=np.float64)
    zeros = np.zeros_like(w_prior)
    if heldout is None or heldout.count == 0:
        lam = default_lam
        kept_error = held_error = float("nan")
    else:
        lam, residuals = ridge_path(fit, heldout, lams, return_residuals=True)
        total = heldout.total_ss() if target_ss is None else target_ss
        kept = heldout.residual(zeros, b_prior)
        kept_error = kept / total if total > 0 else 0.0
        held_error = min(residuals) / total if total > 0 else 0.0
        if kept <= min(residuals):
            return Refit(w_prior.copy(), b_prior.copy(), None, kept_error, kept_error)
    delta, b = (fit if final is None else final).solve_ridge(lam)
    return Refit(w_prior + delta, b, lam, held_error, kept_error)
