"""Linearity folding decisions in plain numpy (no ONNX here).

Method and notation: ``docs/methods.md`` section 1 (Dobler & Lemmerich,
arXiv 2506.21146). One hidden layer of n neurons sits between a producer
(``z = W_p x + b_p + Σ_k x_k G_k``) and its readers (the consumer's columns,
plus any linear path that reads the hidden activation). With a piecewise-linear
activation every neuron j is, per calibration row, on one piece
``f(z) = s·z + c``. This module decides, per neuron:

- **linear**: on one piece with slope s ≠ 0 for at least a share t of the rows
  (or provably on it for every input): ``f(z_j) ≈ s_j z_j + c_j``, so the
  neuron leaves the layer and becomes part of a linear path from the layer's
  inputs straight to its readers;
- **constant**: on a slope-0 piece (ReLU off, Clip saturated) for at least a
  share t: it leaves the layer and its mean output goes into the readers' bias;
- **mixed**: stays.

and builds what replaces the linear neurons: for every (source, reader) pair a
linear path ``x_k @ G_k[:, L] diag(s_L) R[L, :]`` (G = producer factors from
that source, R = reader's matrix), stored dense, factored at its bottleneck, or
truncated by a data-aware SVD - whichever costs the fewest parameters for the
error allowed (:func:`choose_path_form`).

Matrices follow :class:`onnxfold.find.dense.LinearPath`: a path is
``x @ F0 @ F1 @ …`` with x's features as rows of F0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..find.activations import ActivationSpec
from ..measure.stats import GramRoot

MIXED, LINEAR, CONSTANT = 0, 1, 2
KIND_NAMES = {MIXED: "mixed", LINEAR: "linear", CONSTANT: "constant"}

MODES = ("paper", "extended")
PATH_FORMS = ("auto", "dense", "factored", "svd")

#: Ridge added to the Gram of a path's input before the data-aware SVD,
#: relative to trace(Gram)/dim. It only keeps the inverse square root finite:
#: directions the calibration data never excites then carry a tiny weight
#: instead of none, so they are truncated first but not divided by zero.
SVD_RIDGE = 1e-9

#: Relative discarded energy that counts as "nothing": what float64 products of
#: float32 weights cannot tell from zero. ``auto`` with threshold 1.0 (a request
#: for a lossless result) never truncates more than this.
LOSSLESS_SVD_TOLERANCE = 1e-12


# --------------------------------------------------------------------------
# pieces


@dataclass
class PieceTable:
    """The linear pieces of an activation, per neuron.

    Piece p covers the *closed* interval ``[lo[p], hi[p]]`` of z: at a
    breakpoint both neighbouring pieces give the same value (these activations
    are continuous), so a neuron touching a breakpoint is still exactly on
    either piece. ``slope`` is (n, P) - per-channel PRelu slopes differ by
    neuron - and ``intercept`` (P,).
    """

    lo: np.ndarray
    hi: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray

    @classmethod
    def of(cls, spec: ActivationSpec, n: int) -> "PieceTable":
        pieces = spec.pieces(n)
        lo = np.array([p.lo for p in pieces], dtype=np.float64)
        hi = np.array([p.hi for p in pieces], dtype=np.float64)
        slope = np.stack([np.broadcast_to(np.asarray(p.slope, dtype=np.float64).reshape(-1), (n,))
                          for p in pieces], axis=1)
        intercept = np.array([p.intercept for p in pieces], dtype=np.float64)
        return cls(lo=lo, hi=hi, slope=np.ascontiguousarray(slope), intercept=intercept)

    @property
    def n(self) -> int:
        return self.slope.shape[0]

    @property
    def num_pieces(self) -> int:
        return self.lo.size

    def is_constant(self) -> np.ndarray:
        """(n, P): piece p is a constant piece for neuron j (slope 0)."""
        return self.slope == 0

    def contains(self, zlo: np.ndarray, zhi: np.ndarray) -> np.ndarray:
        """(n, P): the interval [zlo_j, zhi_j] lies inside piece p."""
        zlo = np.broadcast_to(np.asarray(zlo, dtype=np.float64), (self.n,))
        zhi = np.broadcast_to(np.asarray(zhi, dtype=np.float64), (self.n,))
        return (zlo[:, None] >= self.lo[None, :]) & (zhi[:, None] <= self.hi[None, :])


# --------------------------------------------------------------------------
# interval bounds (IBP)


def _safe_mul(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a*x with 0*inf = 0 (a zero slope ignores an unbounded input)."""
    with np.errstate(invalid="ignore"):
        return np.where(a == 0, 0.0, a * x)


def interval_matmul(lo, hi, matrix: np.ndarray, block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ``x @ matrix`` for every x with lo ≤ x ≤ hi (elementwise).

    ``lo``/``hi`` are scalars or vectors over the rows of ``matrix``; ``lo`` may
    be -inf and ``hi`` +inf. An output is unbounded only through a non-zero
    weight on an unbounded input (0·inf counts as 0). The matrix is walked
    ``block_rows`` rows at a time in float64, so the extra memory is a few
    blocks, not copies of a possibly huge weight.
    """
    d, m = matrix.shape
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64).reshape(-1), (d,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64).reshape(-1), (d,))
    lo_unbounded, hi_unbounded = ~np.isfinite(lo), ~np.isfinite(hi)
    lo_f, hi_f = np.where(lo_unbounded, 0.0, lo), np.where(hi_unbounded, 0.0, hi)
    low, high = np.zeros(m), np.zeros(m)
    below, above = np.zeros(m, dtype=bool), np.zeros(m, dtype=bool)
    for r0 in range(0, d, block_rows):
        rows = slice(r0, min(d, r0 + block_rows))
        M = np.asarray(matrix[rows], dtype=np.float64)
        if not (lo_unbounded[rows].all() and hi_unbounded[rows].all()):
            pos, neg = np.maximum(M, 0.0), np.minimum(M, 0.0)
            low += lo_f[rows] @ pos + hi_f[rows] @ neg
            high += hi_f[rows] @ pos + lo_f[rows] @ neg
            del pos, neg
        lu, hu = lo_unbounded[rows], hi_unbounded[rows]
        if lu.any():
            below |= (M[lu] > 0).any(axis=0)
            above |= (M[lu] < 0).any(axis=0)
        if hu.any():
            below |= (M[hu] < 0).any(axis=0)
            above |= (M[hu] > 0).any(axis=0)
    return np.where(below, -np.inf, low), np.where(above, np.inf, high)


def activation_interval(pieces: PieceTable, zlo: np.ndarray, zhi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of f(z) for z in [zlo, zhi], per neuron.

    f is continuous and linear on each piece, so its extremes over an interval
    are at the interval's ends or at breakpoints inside it (PRelu slopes may be
    negative, so f need not be monotone).
    """
    n = pieces.n
    zlo = np.broadcast_to(np.asarray(zlo, dtype=np.float64), (n,))
    zhi = np.broadcast_to(np.asarray(zhi, dtype=np.float64), (n,))

    def f_at(z: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        for p in range(pieces.num_pieces):
            on = (z >= pieces.lo[p]) & (z <= pieces.hi[p]) & np.isnan(out)
            val = _safe_mul(pieces.slope[:, p], z) + pieces.intercept[p]
            out = np.where(on, val, out)
        return out

    candidates = [f_at(zlo), f_at(zhi)]
    breaks = np.unique(np.concatenate([pieces.lo, pieces.hi]))
    for b in breaks[np.isfinite(breaks)]:
        inside = (zlo <= b) & (b <= zhi)
        candidates.append(np.where(inside, f_at(np.full(n, b)), np.nan))
    stack = np.stack(candidates)
    return np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)


# --------------------------------------------------------------------------
# classification


@dataclass
class PieceEvidence:
    """What calibration data says about one layer's neurons.

    rows: number of calibration rows (samples × positions).
    piece_rate (n, P): share of rows on piece p (closed intervals: rows at a
        breakpoint count for both pieces).
    mean_z, mean_a (n,): E[z], E[f(z)] over the rows.
    """

    rows: int
    piece_rate: np.ndarray
    mean_z: np.ndarray
    mean_a: np.ndarray

    @classmethod
    def from_counts(cls, rows: int, piece_counts: np.ndarray, mean_z, mean_a, *, min_z=None, max_z=None,
                    pieces: PieceTable | None = None) -> "PieceEvidence":
        """From piece counts of shape (P, n), as ``NeuronStats.piece_counts`` has them.

        Streamed counts put a row at a breakpoint on one side only; with
        ``min_z``/``max_z`` and ``pieces``, a neuron whose whole observed range
        lies in a piece's closed interval gets rate 1 on it (a ReLU neuron that
        is ≥ 0 on every row, and exactly 0 on some, is exactly linear).
        """
        counts = np.asarray(piece_counts, dtype=np.float64).T
        rate = counts / max(rows, 1)
        if min_z is not None and max_z is not None and pieces is not None and rows > 0:
            rate = np.where(pieces.contains(min_z, max_z), 1.0, rate)
        return cls(rows=int(rows), piece_rate=rate, mean_z=np.asarray(mean_z, dtype=np.float64),
                   mean_a=np.asarray(mean_a, dtype=np.float64))


@dataclass
class NeuronClasses:
    """Per-neuron decision of one layer (all arrays length n).

    kind: MIXED / LINEAR / CONSTANT.
    piece: the piece a linear/constant neuron is replaced by (-1 for mixed).
    slope: that piece's slope (0 for constant and mixed neurons).
    offset: what the neuron adds besides ``slope·z``: for linear neurons the
        piece's intercept plus (with mean correction) ``E[f(z) − slope·z − c]``;
        for constant neurons the constant it is replaced by (``E[f(z)]``, or
        the piece's value when the neuron never leaves the piece).
    rate: share of calibration rows on the neuron's most frequent piece (1.0
        where provable); the keep-one rule keeps the lowest.
    provable: the decision holds for every input in the given bounds.
    """

    kind: np.ndarray
    piece: np.ndarray
    slope: np.ndarray
    offset: np.ndarray
    rate: np.ndarray
    provable: np.ndarray

    @property
    def n(self) -> int:
        return self.kind.size

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.kind == kind))


def classify_neurons(pieces: PieceTable, threshold: float, *, evidence: PieceEvidence | None = None,
                     z_bounds: tuple[np.ndarray, np.ndarray] | None = None, allow_linear: bool = True,
                     allow_constant: bool = True, mean_correction: bool = True) -> NeuronClasses:
    """Classify every neuron of a layer as mixed, linear or constant.

    A neuron is on piece p *provably* when its pre-activation bounds
    ``z_bounds`` lie in p, and *empirically* when its rate on p is ≥
    ``threshold``. Provable decisions are taken first and never cost accuracy;
    without ``evidence`` they are the only ones. Among qualifying pieces the
    most frequent wins, a constant one on ties (it costs nothing to remove).
    ``mean_correction`` puts ``E[f(z) − s z − c]`` into a linear neuron's
    offset (and uses E[f(z)] for constants; without it a constant neuron is
    replaced by its piece's value, a linear one by its piece).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n, P = pieces.n, pieces.num_pieces
    constant_piece = pieces.is_constant()
    allowed = np.where(constant_piece, allow_constant, allow_linear)

    provable_on = np.zeros((n, P), dtype=bool)
    if z_bounds is not None:
        provable_on = pieces.contains(*z_bounds) & allowed

    if evidence is not None:
        rate = np.asarray(evidence.piece_rate, dtype=np.float64)
        if rate.shape != (n, P):
            raise ValueError(f"piece_rate has shape {rate.shape}, expected {(n, P)}")
        rate = np.where(provable_on, 1.0, rate)
    else:
        rate = provable_on.astype(np.float64)
    # a tiny preference for constant pieces breaks ties towards removal
    score = np.where(allowed, rate + 1e-9 * constant_piece, -1.0)
    best = np.argmax(score, axis=1)
    idx = np.arange(n)
    best_rate = rate[idx, best]
    qualifies = allowed[idx, best] & (provable_on[idx, best] | ((evidence is not None) & (best_rate >= threshold)))
    is_const = constant_piece[idx, best]

    kind = np.where(qualifies, np.where(is_const, CONSTANT, LINEAR), MIXED).astype(np.int8)
    piece = np.where(qualifies, best, -1)
    slope = np.where(kind == LINEAR, pieces.slope[idx, best], 0.0)
    intercept = pieces.intercept[best]
    offset = np.where(qualifies, intercept, 0.0)
    provable = qualifies & provable_on[idx, best]
    if evidence is not None and mean_correction:
        exact = provable | (best_rate >= 1.0)  # never left the piece: the correction is 0 by definition
        mean_error = evidence.mean_a - slope * evidence.mean_z - intercept
        offset = np.where((kind == LINEAR) & ~exact, intercept + mean_error, offset)
        offset = np.where((kind == CONSTANT) & ~exact, evidence.mean_a, offset)
    overall_rate = np.where(provable, 1.0, rate.max(axis=1))
    return NeuronClasses(kind=kind, piece=piece, slope=slope.astype(np.float64), offset=offset.astype(np.float64),
                         rate=overall_rate, provable=provable)


def removal_mask(classes: NeuronClasses, move_linear: bool, move_constant: bool) -> np.ndarray:
    """Which neurons leave the layer; always leaves at least one neuron.

    If every neuron would leave, the one with the lowest single-piece rate
    stays (ties: the first), so the layer keeps its shape in the graph.
    """
    leave = ((classes.kind == LINEAR) & move_linear) | ((classes.kind == CONSTANT) & move_constant)
    if leave.all() and leave.size:
        leave = leave.copy()
        leave[int(np.argmin(classes.rate))] = False
    return leave


# --------------------------------------------------------------------------
# linear paths


def product(factors: list[np.ndarray]) -> np.ndarray:
    return reduce(np.matmul, factors)


def compose_path(source: list[np.ndarray], rows: np.ndarray, slope: np.ndarray,
                 reader: list[np.ndarray]) -> list[np.ndarray]:
    """Factors of ``x @ S[…, L] diag(slope) R[L, …]`` for neurons ``rows`` = L.

    ``source``: factors from an input x to the layer's pre-activation (last
    factor has n columns). ``reader``: factors from the layer's activation to a
    reader's pre-activation (first factor has n rows). The chain is returned
    unmultiplied; :func:`choose_path_form` decides how to store it.
    """
    rows = np.asarray(rows, dtype=np.int64)
    return [*source[:-1], source[-1][:, rows] * slope[None, :], reader[0][rows, :], *reader[1:]]


def split_factors(factors: list[np.ndarray]) -> list[np.ndarray]:
    """The exact 2-factor form ``[A, B]`` of a chain of ≥ 2 factors, split at
    its narrowest inner dimension (the cheapest split: every factor left of it
    has at least that many columns)."""
    if len(factors) < 2:
        raise ValueError("a single matrix has no inner dimension to split at")
    k = int(np.argmin([f.shape[1] for f in factors[:-1]]))
    return [product(factors[:k + 1]), product(factors[k + 1:])]


def factors_params(factors: list[np.ndarray]) -> int:
    return int(sum(f.size for f in factors))


@dataclass
class Truncation:
    """A data-aware rank-r form ``[A_r, B_r]`` of a path and what it discards."""

    factors: list[np.ndarray]  # [] when r = 0 (the path vanishes on the data)
    rank: int
    discarded: float  # relative energy ‖X(M − M_r)‖² / ‖X M‖² on the calibration inputs
    singular_values: np.ndarray


def data_aware_truncation(factors: list[np.ndarray], gram: np.ndarray, tolerance: float,
                          gram_root: GramRoot | None = None) -> Truncation:
    """Truncated SVD of the path ``M = A B`` weighted by its input's Gram XᵀX.

    Minimises ``‖X M − X M_r‖_F`` over rank-r M_r: with any square root
    ``XᵀX + λI = RᵀR`` (a Cholesky factor, :class:`~onnxfold.measure.stats.GramRoot`),
    the best M_r is ``R⁻¹ · svd_r(R M)`` (another root differs by a rotation,
    which changes neither the singular values nor M_r). The smallest r whose
    discarded share of the energy is ≤ ``tolerance`` is kept. Works on the
    factors, so the cost is that of the bottleneck, not of the dense in × out
    product. ``gram_root``: the Gram's root (``SVD_RIDGE``), when the caller
    has it already (every path from one input shares it).
    """
    A, B = split_factors(factors) if len(factors) > 1 else (factors[0], np.eye(factors[0].shape[1]))
    d = A.shape[0]
    G = np.asarray(gram, dtype=np.float64)
    if G.shape != (d, d):
        raise ValueError(f"gram has shape {G.shape}, expected {(d, d)}")
    root = GramRoot(G, SVD_RIDGE) if gram_root is None else gram_root
    RA = root.apply(A)
    Qa, Ra = np.linalg.qr(RA)
    Qb, Rb = np.linalg.qr(B.T)
    U, sig, Vt = np.linalg.svd(Ra @ Rb.T)
    energy = sig ** 2
    total = float(energy.sum())
    if total <= 0.0:
        return Truncation(factors=[], rank=0, discarded=0.0, singular_values=sig)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) / total  # tail[r] = discarded with rank r
    rank = int(np.argmax(tail <= tolerance))
    if rank == 0:
        return Truncation(factors=[], rank=0, discarded=float(tail[0]), singular_values=sig)
    A_r = root.solve(Qa @ (U[:, :rank] * sig[:rank]))
    B_r = (Qb @ Vt[:rank].T).T
    return Truncation(factors=[A_r, B_r], rank=rank, discarded=float(tail[rank]), singular_values=sig)


@dataclass
class PathChoice:
    """How one new linear path is stored."""

    form: str  # "dense" | "factored" | "svd" | "none" (vanishes on the data)
    factors: list[np.ndarray]
    rank: int
    discarded: float = 0.0
    bias_shift: np.ndarray | None = None  # mean error of a truncation, for the reader's bias

    @property
    def params(self) -> int:
        return factors_params(self.factors)


def exact_rank_bound(factors: list[np.ndarray]) -> int:
    return int(min([factors[0].shape[0]] + [f.shape[1] for f in factors]))


def choose_path_form(factors: list[np.ndarray], path_form: str = "auto", *, gram: np.ndarray | None = None,
                     gram_root: GramRoot | None = None,
                     mean_input: np.ndarray | None = None, tolerance: float = 1e-4) -> PathChoice:
    """Store a path as ``dense`` (one in × out matrix), ``factored`` (exact, two
    factors at the bottleneck) or ``svd`` (data-aware truncation, needs the
    input's ``gram``); ``auto`` takes the fewest parameters among them, exact
    forms winning ties. A truncation's mean error on the calibration inputs
    (``mean_input`` @ (M − M_r)) is returned as ``bias_shift`` so the reader's
    bias can absorb it. ``gram_root``: see :func:`data_aware_truncation`.
    """
    if path_form not in PATH_FORMS:
        raise ValueError(f"path_form must be one of {PATH_FORMS}, got {path_form!r}")
    rank = exact_rank_bound(factors)
    dense = PathChoice("dense", [product(factors)], rank)
    if path_form == "dense" or len(factors) == 1:
        return dense
    factored = PathChoice("factored", split_factors(factors), rank)
    if path_form == "factored":
        return factored
    exact = factored if factored.params < dense.params else dense
    if gram is None:
        return exact  # no data: nothing to weigh a truncation with
    t = data_aware_truncation(factors, gram, tolerance, gram_root)
    shift = None
    if mean_input is not None:
        full = np.asarray(mean_input, dtype=np.float64) @ product(factors)
        kept = product([np.asarray(mean_input, dtype=np.float64)[None, :], *t.factors])[0] if t.factors else 0.0
        shift = full - kept
    svd = PathChoice("svd" if t.rank else "none", t.factors, t.rank, t.discarded, shift)
    if path_form == "svd":
        return svd
    return svd if svd.params < exact.params and t.rank < rank else exact


# --------------------------------------------------------------------------
# parameter accounting


@dataclass
class LayerShape:
    """Parameter costs around one hidden layer, for predicting a plan's size.

    row_cost: parameters per neuron on the producer side (its weight row, its
        bias, its columns in the producer's linear paths).
    col_cost: parameters per neuron on the reader side (its consumer column,
        its rows in the first factor of paths that read the activation).
    params: current parameters of the producer, consumer and reader ops.
    """

    row_cost: int
    col_cost: int
    params: int


#: What one extra graph node costs, in parameters: moving neurons to a linear
#: path adds a MatMul per factor and an Add, and each node has a fixed
#: run-time cost (~1-2 µs in onnxruntime on CPU, about the time a batch-1
#: product streams a few thousand float32 weights). Extended mode only takes a
#: path when it saves more than that; without it, small models came out with
#: fewer parameters but slower at batch 1 (tools/bench_perf.py, BENCHMARKS.md).
PATH_NODE_COST_PARAMS = 4096


def params_after(shape: LayerShape, removed: int, new_path_params: int, new_biases: int = 0) -> int:
    """Parameters of the producer, consumer and readers after removing
    ``removed`` neurons, adding paths of ``new_path_params`` and creating
    biases of ``new_biases`` entries."""
    return shape.params - removed * (shape.row_cost + shape.col_cost) + new_path_params + new_biases


def paper_skip_pays(k: int, in_width: int, out_width: int) -> bool:
    """The paper's criterion for one layer: moving k neurons to a dense skip of
    in_width × out_width saves parameters (in_width counts all inputs the skip
    reads). :func:`params_after` gives the same answer in the paper's setting."""
    return k * (in_width + out_width + 1) > in_width * out_width
