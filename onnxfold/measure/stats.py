"""Streamed statistics: per-neuron activation statistics and least-squares Grams.

Rows: a hidden tensor of shape (batch, n) or (batch, seq, n) - in general
(..., n), the last axis being the neurons - is flattened to (m, n) rows, each
row (a sample, or a token position) one observation.

Everything accumulates in float64 and merges exactly (Chan et al.'s pairwise
update for centred second moments), so streaming in batches of any size gives
the same numbers as one pass over all rows, up to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxfold.find.activations import ActivationSpec
from onnxfold.measure.data import CalibrationSet

__all__ = [
    "NeuronStats",
    "ColumnMoments",
    "GramAccumulator",
    "RowChunks",
    "ridge_path",
    "collect_neuron_stats",
    "DEFAULT_RIDGE_LAMS",
]

#: Default ridge grid, relative to trace(Gram)/p (see GramAccumulator.solve_ridge).
DEFAULT_RIDGE_LAMS: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def _rows(x: np.ndarray, width: int | None, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{what} must have at least one axis")
    if x.ndim == 1:  # a column of m rows when the width is 1 or free, else one row
        x = x.reshape(-1, 1) if width in (None, 1) else x.reshape(1, -1)
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{what} has {x.shape[-1]} columns on its last axis, expected {width}")
    return x.reshape(-1, x.shape[-1])


def _scratch(x64: np.ndarray, rows: np.ndarray, overwrite: bool) -> bool:
    """Whether float64 rows ``x64`` (``rows`` cast, or ``rows`` itself) may be
    centred in place: a copy the cast made, or the caller's own scratch copy."""
    if x64 is not rows:
        return x64.base is None
    return overwrite and x64.flags.writeable and x64.flags.c_contiguous


def _batch_moments(x64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums and centred sums of squares of one batch (m, n) float64."""
    s = x64.sum(axis=0)
    c = x64 - s / x64.shape[0]
    return s, np.einsum("ij,ij->j", c, c)


def _merge_moments(n1, s1, m1, n2, s2, m2):
    """Chan's merge of (count, sum, centred M2) pairs."""
    if n1 == 0:
        return n2, s2.copy(), m2.copy()
    if n2 == 0:
        return n1, s1, m1
    n = n1 + n2
    d = s2 / n2 - s1 / n1
    return n, s1 + s2, m1 + m2 + d * d * (n1 * n2 / n)


class ColumnMoments:
    """Per-column ``count``, ``sum`` and centred sum of squares ``m2`` of rows
    (..., n), float64: the moments :class:`NeuronStats` keeps of its
    pre-activations (the same arithmetic, the same numbers), without the
    activation, extremes and piece counts - a refit's held-out target spread
    takes a few rows of every batch, where those would cost more than the rows."""

    def __init__(self, n: int):
        self.n = int(n)
        self.count = 0
        self.sum = np.zeros(self.n)
        self.m2 = np.zeros(self.n)

    def update(self, x: np.ndarray) -> None:
        rows = _rows(x, self.n, "rows")
        if rows.shape[0]:
            s, m2 = _batch_moments(rows.astype(np.float64, copy=False))
            self.count, self.sum, self.m2 = _merge_moments(self.count, self.sum, self.m2, rows.shape[0], s, m2)

    def merge(self, other: "ColumnMoments") -> "ColumnMoments":
        if other.n != self.n:
            raise ValueError(f"cannot merge moments of {other.n} columns into {self.n}")
        self.count, self.sum, self.m2 = _merge_moments(self.count, self.sum, self.m2, other.count, other.sum,
                                                       other.m2)
        return self


class NeuronStats:
    """Per-neuron statistics of a pre-activation z and its activation a = f(z).

    Accumulated (float64): ``count`` rows, ``sum_z``, centred ``m2_z``,
    ``min_z``, ``max_z``, ``sum_a``, centred ``m2_a``, ``active_count`` (rows
    with z > 0) and, for piecewise-linear kinds, ``piece_counts`` of shape
    (n_pieces, n) indexed like ``activation.pieces(n)``. ``sum_z2`` / ``sum_a2``
    are derived. ``f`` is evaluated in the tensor's own dtype (as onnxruntime
    does), then promoted.
    """

    def __init__(self, activation: ActivationSpec, n: int):
        self.activation = activation
        self.n = int(n)
        self.count = 0
        self.sum_z = np.zeros(self.n)
        self.m2_z = np.zeros(self.n)
        self.min_z = np.full(self.n, np.inf)
        self.max_z = np.full(self.n, -np.inf)
        self.sum_a = np.zeros(self.n)
        self.m2_a = np.zeros(self.n)
        self.active_count = np.zeros(self.n, dtype=np.int64)
        if activation.is_piecewise_linear:
            self._pieces = activation.pieces(self.n)
            self.piece_counts: np.ndarray | None = np.zeros((len(self._pieces), self.n), dtype=np.int64)
        else:
            self._pieces = None
            self.piece_counts = None

    # -- accumulation --------------------------------------------------------
    def update(self, z: np.ndarray) -> None:
        """Add the rows of pre-activations ``z`` (shape (..., n))."""
        rows = _rows(z, self.n, "pre-activation")
        m = rows.shape[0]
        if m == 0:
            return
        a = np.asarray(self.activation.apply(rows))
        z64 = rows.astype(np.float64, copy=False)
        a64 = a.astype(np.float64, copy=False)
        sz, mz = _batch_moments(z64)
        sa, ma = _batch_moments(a64)
        n0 = self.count
        _, self.sum_z, self.m2_z = _merge_moments(n0, self.sum_z, self.m2_z, m, sz, mz)
        self.count, self.sum_a, self.m2_a = _merge_moments(n0, self.sum_a, self.m2_a, m, sa, ma)
        np.minimum(self.min_z, z64.min(axis=0), out=self.min_z)
        np.maximum(self.max_z, z64.max(axis=0), out=self.max_z)
        self.active_count += np.count_nonzero(rows > 0, axis=0)
        if self.piece_counts is not None:
            idx = self.activation.piece_index(rows)
            for p in range(self.piece_counts.shape[0]):
                self.piece_counts[p] += np.count_nonzero(idx == p, axis=0)

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Add ``other``'s rows into this accumulator (in place; returns self)."""
        if other.n != self.n or other.activation.kind != self.activation.kind:
            raise ValueError("can only merge NeuronStats of the same activation kind and width")
        n0 = self.count
        _, self.sum_z, self.m2_z = _merge_moments(n0, self.sum_z, self.m2_z, other.count, other.sum_z, other.m2_z)
        self.count, self.sum_a, self.m2_a = _merge_moments(n0, self.sum_a, self.m2_a, other.count, other.sum_a, other.m2_a)
        np.minimum(self.min_z, other.min_z, out=self.min_z)
        np.maximum(self.max_z, other.max_z, out=self.max_z)
        self.active_count += other.active_count
        if self.piece_counts is not None:
            self.piece_counts += other.piece_counts
        return self

    # -- derived -------------------------------------------------------------
    def _div(self, x: np.ndarray) -> np.ndarray:
        if self.count == 0:
            return np.full(self.n, np.nan)
        return x / self.count

    @property
    def sum_z2(self) -> np.ndarray:
        return self.m2_z + (self.sum_z**2 / self.count if self.count else 0.0)

    @property
    def sum_a2(self) -> np.ndarray:
        return self.m2_a + (self.sum_a**2 / self.count if self.count else 0.0)

    @property
    def mean_z(self) -> np.ndarray:
        return self._div(self.sum_z)

    @property
    def var_z(self) -> np.ndarray:
        """Population variance (ddof=0) of z per neuron."""
        return self._div(self.m2_z)

    @property
    def std_z(self) -> np.ndarray:
        return np.sqrt(self.var_z)

    @property
    def mean_a(self) -> np.ndarray:
        return self._div(self.sum_a)

    @property
    def var_a(self) -> np.ndarray:
        return self._div(self.m2_a)

    @property
    def std_a(self) -> np.ndarray:
        return np.sqrt(self.var_a)

    # -- on/off (z > 0), any kind ---------------------------------------------
    @property
    def active_rate(self) -> np.ndarray:
        """Fraction of rows with z > 0, per neuron."""
        return self._div(self.active_count.astype(np.float64))

    def always_on(self) -> np.ndarray:
        """Boolean mask: neurons with z > 0 on every row seen."""
        return (self.active_count == self.count) & (self.count > 0)

    def never_on(self) -> np.ndarray:
        """Boolean mask: neurons with z > 0 on no row seen."""
        return (self.active_count == 0) & (self.count > 0)

    # -- pieces (piecewise-linear kinds) ------------------------------------
    def _need_pieces(self) -> np.ndarray:
        if self.piece_counts is None:
            raise ValueError(f"{self.activation.kind} is not piecewise linear: no pieces")
        return self.piece_counts

    @property
    def n_pieces(self) -> int:
        return int(self._need_pieces().shape[0])

    def piece_rate(self, p: int) -> np.ndarray:
        """Fraction of rows on piece ``p`` (index into ``activation.pieces(n)``), per neuron."""
        return self._div(self._need_pieces()[p].astype(np.float64))

    def on_one_piece_rate(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of each neuron's most frequent piece, fraction of rows on it)."""
        pc = self._need_pieces()
        best = np.argmax(pc, axis=0)
        return best, self._div(pc[best, np.arange(self.n)].astype(np.float64))

    def mean_error_vs_piece(self, p: int) -> np.ndarray:
        """E[f(z) - (slope_p z + intercept_p)] per neuron, exactly, from the sums.

        Adding ``W_next[:, j] * mean_error_vs_piece(p)[j]`` to the consumer's
        bias corrects the mean when neuron j is replaced by piece p.
        """
        self._need_pieces()
        piece = self._pieces[p]
        slope = np.broadcast_to(np.asarray(piece.slope, dtype=np.float64), (self.n,))
        return self.mean_a - slope * self.mean_z - float(piece.intercept)

    def __repr__(self) -> str:
        return f"NeuronStats({self.activation.kind}, n={self.n}, rows={self.count})"


class GramRoot:
    """A square root R of a ridged Gram matrix, ``RᵀR = G + λI`` with ``λ =
    rel_ridge · trace(G) / d``: what weighting by the data needs
    (``‖X M‖ ≈ ‖R M‖``), at the cost of a Cholesky factorisation, several
    times cheaper than the eigendecomposition it replaces (p = 3264: ~0.2 s
    against ~20 s on 2 cores). When G + λI is not numerically positive
    definite, R comes from the eigendecomposition with the negative
    eigenvalues clipped (``diag(√(e + λ)) Qᵀ``)."""

    def __init__(self, gram: np.ndarray, rel_ridge: float, *, method: str = "cholesky"):
        """``method="eigh"``: the root from the eigendecomposition right away
        (what the fallback uses; also to compare the two)."""
        from scipy.linalg import LinAlgError, cholesky

        G = np.asarray(gram, dtype=np.float64)
        G = (G + G.T) / 2.0
        d = G.shape[0]
        lam = rel_ridge * max(float(np.trace(G)) / max(d, 1), np.finfo(np.float64).tiny)
        self.upper = self.scale = self.Q = None
        if method == "cholesky":
            try:
                self.upper = cholesky(G + lam * np.eye(d), lower=False, check_finite=False)
                return
            except LinAlgError:
                pass
        elif method != "eigh":
            raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}")
        evals, self.Q = np.linalg.eigh(G)
        self.scale = np.sqrt(np.clip(evals, 0.0, None) + lam)

    def apply(self, A: np.ndarray) -> np.ndarray:
        """R @ A."""
        if self.upper is not None:
            return self.upper @ A
        return (self.Q.T @ A) * self.scale[:, None]

    def solve(self, Y: np.ndarray) -> np.ndarray:
        """R⁻¹ @ Y."""
        if self.upper is not None:
            from scipy.linalg import solve_triangular

            return solve_triangular(self.upper, Y, lower=False, check_finite=False)
        return self.Q @ (Y / self.scale[:, None])


class GramAccumulator:
    """Streamed least-squares sufficient statistics, float64.

    Accumulates, for rows X (m, p) and optional targets Y (m, q), the count,
    means and centred cross-products (``sxx`` p×p, ``sxy`` p×q, ``syy`` = the
    diagonal of the centred YᵀY, q). The raw ones are available as ``XtX``,
    ``XtY``, ``sum_x``, ``sum_y``, ``YtY_diag``. Inputs of shape (..., p) are
    flattened to rows like hidden tensors.

    ``with_bias=True``: solutions include an unpenalised intercept (solved
    from the centred statistics); ``False``: no intercept (b = 0).

    Rows may carry weights (``update(..., weights=)``): every statistic is
    then the weighted one (weighted least squares), ``weight`` is the weights'
    sum where unweighted rows count 1 each, and ``count`` stays the number of
    rows.
    """

    def __init__(self, p: int | None = None, q: int | None = None, *, with_bias: bool = True):
        self.with_bias = with_bias
        self.p = p
        self.q = q
        self.count = 0  # rows
        self.weight = 0.0  # the rows' summed weight (count, for unweighted rows)
        self._has_y: bool | None = None
        self.mean_x: np.ndarray | None = None
        self.mean_y: np.ndarray | None = None
        self.sxx: np.ndarray | None = None
        self.sxy: np.ndarray | None = None
        self.syy: np.ndarray | None = None
        self._eig = None  # cached eigendecomposition of the regularised matrix
        self._xtx_root = None  # cached (relative ridge, GramRoot of XᵀX): data-aware truncations

    def _init(self, p: int, q: int | None):
        self.p, self.q = p, q
        self.mean_x = np.zeros(p)
        self.sxx = np.zeros((p, p))
        if q is not None:
            self.mean_y = np.zeros(q)
            self.sxy = np.zeros((p, q))
            self.syy = np.zeros(q)

    def update(self, X: np.ndarray, Y: np.ndarray | None = None, weights: np.ndarray | None = None, *,
               overwrite: bool = False) -> None:
        """Add rows X (..., p) with targets Y (..., q) (same leading shape) or
        None; ``weights``: one non-negative weight per row (default 1).
        ``overwrite=True``: X and Y are the caller's scratch copies (rows it
        took for this call), centred in place instead of in a new array - one
        m×p allocation and pass less, the same values."""
        X = np.asarray(X)
        Xr = _rows(X, self.p, "X")
        if Y is not None:
            Y = np.asarray(Y)
            Yr = _rows(Y, self.q, "Y")
            if Yr.shape[0] != Xr.shape[0]:
                raise ValueError(f"X has {Xr.shape[0]} rows but Y has {Yr.shape[0]}")
        else:
            Yr = None
        has_y = Yr is not None
        if self._has_y is None:
            self._has_y = has_y
        elif self._has_y != has_y:
            raise ValueError("either every update gives Y or none does")
        if self.mean_x is None:
            self._init(Xr.shape[1], Yr.shape[1] if has_y else None)
        m = Xr.shape[0]
        v = None
        if weights is not None:
            v = np.asarray(weights, dtype=np.float64).reshape(-1)
            if v.size != m or not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"weights must be {m} finite non-negative numbers, one per row")
        mass = float(m) if v is None else float(v.sum())
        if m == 0 or mass == 0.0:
            return
        self._eig = self._xtx_root = None
        x64 = Xr.astype(np.float64, copy=False)
        bx = x64.mean(axis=0) if v is None else (v @ x64) / mass
        # centred in place when astype made a copy (float32 rows): one m×p
        # float64 array less to allocate and fill per batch, same values
        xc = np.subtract(x64, bx, out=x64) if _scratch(x64, Xr, overwrite) else x64 - bx
        xv = xc if v is None else xc * v[:, None]
        n1, n = self.weight, self.weight + mass
        w = n1 * mass / n
        dx = bx - self.mean_x
        self.sxx += xv.T @ xc
        if n1:
            self.sxx += w * np.outer(dx, dx)
        if has_y:
            y64 = Yr.astype(np.float64, copy=False)
            by = y64.mean(axis=0) if v is None else (v @ y64) / mass
            yc = np.subtract(y64, by, out=y64) if _scratch(y64, Yr, overwrite) else y64 - by
            dy = by - self.mean_y
            self.sxy += xv.T @ yc
            self.syy += np.einsum("ij,ij->j", yc, yc) if v is None else v @ (yc * yc)
            if n1:
                self.sxy += w * np.outer(dx, dy)
                self.syy += w * dy * dy
            self.mean_y = self.mean_y + dy * (mass / n)
        self.mean_x = self.mean_x + dx * (mass / n)
        self.count += m
        self.weight = n

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        """Add ``other``'s rows into this accumulator (in place; returns self)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.p, self.q, self._has_y = other.p, other.q, other._has_y
            self.count, self.weight = other.count, other.weight
            for k in ("mean_x", "mean_y", "sxx", "sxy", "syy"):
                v = getattr(other, k)
                setattr(self, k, None if v is None else v.copy())
            self._eig = self._xtx_root = None
            return self
        if (self.p, self.q, self._has_y) != (other.p, other.q, other._has_y):
            raise ValueError("can only merge GramAccumulators of the same shapes")
        n1, n2 = self.weight, other.weight
        n = n1 + n2
        w = n1 * n2 / n
        dx = other.mean_x - self.mean_x
        self.sxx = self.sxx + other.sxx + w * np.outer(dx, dx)
        if self._has_y:
            dy = other.mean_y - self.mean_y
            self.sxy = self.sxy + other.sxy + w * np.outer(dx, dy)
            self.syy = self.syy + other.syy + w * dy * dy
            self.mean_y = self.mean_y + dy * (n2 / n)
        self.mean_x = self.mean_x + dx * (n2 / n)
        self.count += other.count
        self.weight = n
        self._eig = self._xtx_root = None
        return self

    # -- raw statistics --------------------------------------------------------
    @property
    def sum_x(self) -> np.ndarray:
        return self.mean_x * self.weight

    @property
    def sum_y(self) -> np.ndarray:
        self._need_y()
        return self.mean_y * self.weight

    @property
    def XtX(self) -> np.ndarray:
        return self.sxx + self.weight * np.outer(self.mean_x, self.mean_x)

    @property
    def XtY(self) -> np.ndarray:
        self._need_y()
        return self.sxy + self.weight * np.outer(self.mean_x, self.mean_y)

    @property
    def YtY_diag(self) -> np.ndarray:
        self._need_y()
        return self.syy + self.weight * self.mean_y**2

    def total_ss(self, per_output: bool = False) -> np.ndarray | float:
        """Sum of squares of Y about its mean (with_bias) or about 0 (without): the R² baseline."""
        t = self.syy if self.with_bias else self.YtY_diag
        return t.copy() if per_output else float(t.sum())

    def _need_y(self):
        if self.count == 0 or not self._has_y:
            raise ValueError("no targets Y accumulated")

    # -- solving -------------------------------------------------------------
    def _system(self) -> tuple[np.ndarray, np.ndarray]:
        self._need_y()
        return (self.sxx, self.sxy) if self.with_bias else (self.XtX, self.XtY)

    def lam_scale(self) -> float:
        """trace(A)/p of the regularised matrix A (centred XᵀX with bias, XᵀX without)."""
        A = self.sxx if self.with_bias else self.XtX
        s = float(np.trace(A)) / max(self.p, 1)
        return s if s > 0 else 1.0

    def _eigh(self):
        if self._eig is None:
            A, B = self._system()
            d, V = np.linalg.eigh(A)
            d = np.clip(d, 0.0, None)
            self._eig = (d, V, V.T @ B)
        return self._eig

    def xtx_root(self, rel_ridge: float) -> GramRoot:
        """:class:`GramRoot` of ``XtX``, computed once per accumulated state:
        every truncated path from this input weighs with the same Gram."""
        if self._xtx_root is None or self._xtx_root[0] != rel_ridge:
            self._xtx_root = (rel_ridge, GramRoot(self.XtX, rel_ridge))
        return self._xtx_root[1]

    def solve_ridge(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(W (q×p), b (q,)) minimising ||X Wᵀ + b - Y||² + λ||W||², b unpenalised.

        ``lam`` is relative: λ = lam · trace(A)/p, A being the centred XᵀX
        (with_bias) or XᵀX, i.e. lam=1e-2 adds 1 % of the average feature
        energy to every diagonal entry - invariant to the scale of X, so the
        grid ``DEFAULT_RIDGE_LAMS`` is meaningful for any layer. lam=0 gives
        the minimum-norm least-squares solution (pseudo-inverse).

        One lam > 0 on a matrix not decomposed yet (a refit's final solve on
        all rows) is a Cholesky solve of A + λI, a fraction of the cost of
        the eigendecomposition a path of lams shares: the same solution (to
        float tolerance), since λ ≥ 1e-6 · trace(A)/p keeps every direction
        above the pseudo-inverse's cutoff for any p under ~60 000.
        """
        if lam > 0 and self._eig is None:
            solved = self._solve_cholesky(lam)
            if solved is not None:
                return solved
        return self.solve_ridge_path([lam])[0]

    def _solve_cholesky(self, lam: float) -> tuple[np.ndarray, np.ndarray] | None:
        from scipy.linalg import LinAlgError, cho_factor, cho_solve

        A, B = self._system()
        reg = A + (lam * self.lam_scale()) * np.eye(self.p)
        try:
            Wt = cho_solve(cho_factor(reg, lower=True, check_finite=False), B, check_finite=False)  # p×q
        except LinAlgError:  # not positive definite in floating point: the eigendecomposition handles it
            return None
        W = np.ascontiguousarray(Wt.T)
        b = self.mean_y - W @ self.mean_x if self.with_bias else np.zeros(self.q)
        return W, b

    def solve_ridge_path(self, lams: Iterable[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`solve_ridge` for several lams, sharing one eigendecomposition."""
        d, V, VtB = self._eigh()
        out = []
        for inv in self._ridge_inverses(d, lams):
            Wt = V @ (inv[:, None] * VtB)  # p×q
            W = Wt.T.copy()
            if self.with_bias:
                b = self.mean_y - W @ self.mean_x
            else:
                b = np.zeros(self.q)
            out.append((W, b))
        return out

    def heldout_residuals(self, heldout: "GramAccumulator", lams: Sequence[float]) -> list[float]:
        """``heldout.residual(*sol)`` for each ``sol`` of :meth:`solve_ridge_path`
        (``lams``), without forming the solutions. In this accumulator's
        eigenbasis (A = V diag(d) Vᵀ, B̃ = VᵀB), a lam's solution is
        Wᵀ = V D B̃ with D = diag(1/(d + λ)); the held-out residual's quadratic
        term Σ_j w_jᵀ S w_j (S the held-out sxx) is then Dᵀ (C ∘ B̃B̃ᵀ) D with
        C = Vᵀ S V, computed once: O(p²) per lam instead of O(p²q). Used when
        that is cheaper (q large against p); with an intercept only."""
        lams = list(lams)
        d, V, VtB = self._eigh()
        p, q = VtB.shape
        if not (self.with_bias and heldout.with_bias) or 2 * p >= 13 * q or heldout.count == 0:
            return [heldout.residual(W, b) for W, b in self.solve_ridge_path(lams)]
        heldout._need_y()
        M = (V.T @ heldout.sxx @ V) * (VtB @ VtB.T)
        lin = np.einsum("aj,aj->a", VtB, V.T @ heldout.sxy)
        u = V.T @ (heldout.mean_x - self.mean_x)
        dy = heldout.mean_y - self.mean_y
        out = []
        for D in self._ridge_inverses(d, lams):
            shift = dy - (D * u) @ VtB  # held-out mean error of the solution (its intercept fits the train means)
            r = float(np.sum(heldout.syy)) - 2.0 * float(D @ lin) + float(D @ M @ D) \
                + heldout.weight * float(shift @ shift)
            out.append(max(r, 0.0))
        return out

    def _ridge_inverses(self, d: np.ndarray, lams: Iterable[float]) -> list[np.ndarray]:
        """Per lam, 1 / (d + λ) on the eigenvalues ``d`` (0 below the pseudo-inverse's cutoff)."""
        scale = self.lam_scale()
        dmax = float(d.max()) if d.size else 0.0
        cutoff = dmax * max(self.p, 1) * np.finfo(np.float64).eps
        out = []
        for lam in lams:
            if lam < 0:
                raise ValueError("ridge lam must be >= 0")
            denom = d + lam * scale
            out.append(np.where(denom > cutoff, 1.0 / np.where(denom > cutoff, denom, 1.0), 0.0))
        return out

    def residual(self, W: np.ndarray, b: np.ndarray | None = None, *, per_output: bool = False):
        """Sum over rows of ||y - W x - b||², from the statistics (clipped at 0)."""
        self._need_y()
        W = np.asarray(W, dtype=np.float64).reshape(self.q, self.p)
        b = np.zeros(self.q) if b is None else np.asarray(b, dtype=np.float64).reshape(self.q)
        d = self.mean_y - W @ self.mean_x - b
        r = (
            self.syy
            - 2.0 * np.einsum("jk,kj->j", W, self.sxy)
            + np.einsum("jk,jk->j", W @ self.sxx, W)
            + self.weight * d * d
        )
        r = np.clip(r, 0.0, None)
        return r if per_output else float(r.sum())

    def r2(self, W: np.ndarray, b: np.ndarray | None = None) -> float:
        """1 - residual / total_ss (total_ss about the mean when with_bias)."""
        t = self.total_ss()
        return 1.0 - self.residual(W, b) / t if t > 0 else float("nan")

    def __repr__(self) -> str:
        return f"GramAccumulator(p={self.p}, q={self.q}, rows={self.count}, with_bias={self.with_bias})"


def ridge_path(
    train: GramAccumulator,
    heldout: GramAccumulator,
    lams: Sequence[float] = DEFAULT_RIDGE_LAMS,
    *,
    return_residuals: bool = False,
):
    """The lam (relative, see :meth:`GramAccumulator.solve_ridge`) whose solution on
    ``train`` has the smallest residual on ``heldout``; ties go to the larger lam.

    With ``return_residuals=True`` returns ``(best_lam, [heldout residual per lam])``.
    """
    lams = list(lams)
    if not lams:
        raise ValueError("ridge_path needs at least one lam")
    res = train.heldout_residuals(heldout, lams)
    best = min(range(len(lams)), key=lambda i: (res[i], -lams[i]))
    return (lams[best], res) if return_residuals else lams[best]


#: Rows a :class:`RowChunks` gathers before a Gram update, counted in elements
#: (rows × columns): 2¹⁸ float64 elements are 2 MiB. Below a few hundred rows
#: an update's fixed cost (casts, means, outer products: a dozen numpy calls)
#: outweighs its m·p² product, and a refit that keeps a quarter of each
#: 256-sample batch updates with some sixty rows: 32768 rows of width 256 in
#: batches of 64 took 0.52 s, in chunks of 2¹⁸ elements 0.16 s (larger chunks
#: gain nothing more here). Neuron statistics gain nothing from chunks (their
#: per-row work dominates), so they take their batches as they come.
CHUNK_ELEMENTS = 1 << 18


class RowChunks:
    """Hands a :class:`GramAccumulator` its rows in chunks of about
    :data:`CHUNK_ELEMENTS` instead of a batch at a time.

    ``update(X, Y=None, weights=None)`` takes what the Gram's ``update``
    takes; ``flush()`` passes on what is pending and returns the Gram. The
    statistics are the same up to float64 rounding (the Gram merges exactly);
    only how many rows each update sees changes. ``merge`` adds another
    RowChunks' rows (a worker's shard or batch): its Gram's, and its pending
    rows to this one's."""

    def __init__(self, gram: GramAccumulator, elements: int = CHUNK_ELEMENTS):
        self.gram = gram
        self.elements = int(elements)
        self._pending: list[tuple] = []
        self._size = 0

    def update(self, X: np.ndarray, Y: np.ndarray | None = None, weights: np.ndarray | None = None, *,
               overwrite: bool = False) -> None:
        """``overwrite=True``: X and Y are the caller's scratch copies, as for
        the Gram's update (a batch passed on alone is centred in place)."""
        size = int(np.prod(np.shape(X)))
        if not size:
            return
        if not self._pending and size >= self.elements:  # big enough on its own: no copy
            self.gram.update(X, Y, weights, overwrite=overwrite)
            return
        self._pending.append((X, Y, weights, overwrite))
        self._size += size
        if self._size >= self.elements:
            self.flush()

    def flush(self) -> GramAccumulator:
        """The Gram, with every row added so far."""
        if len(self._pending) == 1:
            X, Y, weights, overwrite = self._pending[0]
            self.gram.update(X, Y, weights, overwrite=overwrite)
        elif self._pending:
            xs, ys, ws, _ = zip(*self._pending)
            if len({y is None for y in ys}) > 1:
                raise ValueError("either every update gives Y or none does")
            if any(w is not None for w in ws):  # unweighted rows among weighted ones weigh 1, as in update
                ws = [np.ones(_rows(x, None, "X").shape[0]) if w is None else w for x, w in zip(xs, ws)]
            # one concatenated copy per argument: this call's own, so the Gram centres it in place
            joined = [None if parts[0] is None else np.concatenate(
                [a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a for a in parts]) for parts in (xs, ys, ws)]
            self.gram.update(*joined, overwrite=True)
        self._pending, self._size = [], 0
        return self.gram

    def merge(self, other: "RowChunks") -> "RowChunks":
        # a worker's batch arrives with its rows still pending: they join this side's chunks
        if other.gram.count:
            self.gram.merge(other.gram)
        for X, Y, weights, overwrite in other._pending:
            self.update(X, Y, weights, overwrite=overwrite)
        return self


def collect_neuron_stats(
    model: onnx.ModelProto,
    layers: Mapping[str, ActivationSpec],
    data: CalibrationSet,
    *,
    batch_size: int = 256,
    providers: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, NeuronStats]:
    """Stream ``data`` through ``model`` once; NeuronStats per pre-activation tensor.

    ``layers`` maps pre-activation tensor names to their activation specs; the
    last axis of each tensor is the neuron axis (n taken from the tensor).
    """
    from onnxfold.measure.stream import stream_tensors

    stats: dict[str, NeuronStats] = {}
    names = list(layers)
    for _feed, _labels, tensors in stream_tensors(
        model, names, data, batch_size=batch_size, providers=providers, progress=progress
    ):
        for name in names:
            z = np.asarray(tensors[name])
            if z.ndim == 0:
                raise ValueError(f"tensor '{name}' is a scalar, not a layer's pre-activation")
            st = stats.get(name)
            if st is None:
                st = stats[name] = NeuronStats(layers[name], z.shape[-1])
            st.update(z)
    return stats
