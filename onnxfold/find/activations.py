"""Elementwise activations between two dense layers, as numpy-evaluable specs.

A piecewise-linear activation is described by its pieces: intervals of the
pre-activation z on which ``f(z) = slope * z + intercept``. Linearity folding
needs the pieces (which neuron stays on one of them); neuron folding and the
refits only need ``apply``. Per-channel parameters (PRelu slopes) are arrays
of length n, indexed like the hidden neurons, so that removing or merging
neurons can slice them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PIECEWISE_KINDS = ("relu", "leaky_relu", "prelu", "clip")
SMOOTH_KINDS = ("gelu", "gelu_tanh", "sigmoid", "tanh", "silu", "identity")


@dataclass(frozen=True)
class Piece:
    """One linear piece ``f(z) = slope*z + intercept`` valid for lo < z <= hi.

    ``slope`` may be an array (per-channel PRelu). A piece with slope 0 is a
    constant piece: a neuron that stays on it contributes a constant.
    """

    lo: float
    hi: float
    slope: np.ndarray | float
    intercept: float = 0.0

    @property
    def is_constant(self) -> bool:
        return bool(np.all(np.asarray(self.slope) == 0))


@dataclass
class ActivationSpec:
    """What sits between producer and consumer, as onnxfold understands it.

    kind: one of PIECEWISE_KINDS or SMOOTH_KINDS.
    alpha: LeakyRelu negative slope.
    slope: PRelu per-channel negative slope (length n) - sliced with neurons.
    lo, hi: Clip bounds (-inf/inf when absent).
    """

    kind: str
    alpha: float = 0.01
    slope: np.ndarray | None = None
    lo: float = -np.inf
    hi: float = np.inf
    nodes: list = field(default_factory=list)  # onnx node names making it up
    input: str = ""  # pre-activation tensor
    output: str = ""  # post-activation tensor

    @property
    def is_piecewise_linear(self) -> bool:
        return self.kind in PIECEWISE_KINDS

    def negative_slope(self, n: int | None = None) -> np.ndarray | float:
        if self.kind == "relu":
            return 0.0
        if self.kind == "leaky_relu":
            return float(self.alpha)
        if self.kind == "prelu":
            s = np.asarray(self.slope, dtype=np.float64).reshape(-1)
            return s if n is None or s.size == n else np.broadcast_to(s, (n,)).copy()
        raise ValueError(f"{self.kind} has no negative slope")

    def pieces(self, n: int) -> list[Piece]:
        """The linear pieces, in order of increasing z (piecewise kinds only)."""
        if self.kind in ("relu", "leaky_relu", "prelu"):
            return [Piece(-np.inf, 0.0, self.negative_slope(n)), Piece(0.0, np.inf, 1.0)]
        if self.kind == "clip":
            out = []
            if np.isfinite(self.lo):
                out.append(Piece(-np.inf, self.lo, 0.0, float(self.lo)))
            out.append(Piece(self.lo, self.hi, 1.0))
            if np.isfinite(self.hi):
                out.append(Piece(self.hi, np.inf, 0.0, float(self.hi)))
            return out
        raise ValueError(f"{self.kind} is not piecewise linear")

    def piece_index(self, z: np.ndarray) -> np.ndarray:
        """Index into ``pieces()`` of every element of z (last axis = neurons)."""
        if self.kind in ("relu", "leaky_relu", "prelu"):
            return (z > 0).astype(np.int8)
        if self.kind == "clip":
            idx = np.zeros(z.shape, dtype=np.int8)
            if np.isfinite(self.lo):
                idx += (z > self.lo).astype(np.int8)
            if np.isfinite(self.hi):
                idx += (z > self.hi).astype(np.int8)
            return idx
        raise ValueError(f"{self.kind} is not piecewise linear")

    def apply(self, z: np.ndarray) -> np.ndarray:
        """f(z) in numpy, matching onnxruntime's float32 semantics closely."""
        k = self.kind
        if k == "relu":
            return np.maximum(z, 0)
        if k == "leaky_relu":
            return np.where(z > 0, z, z * self.alpha).astype(z.dtype, copy=False)
        if k == "prelu":
            s = np.asarray(self.slope, dtype=z.dtype)
            return np.where(z > 0, z, z * s).astype(z.dtype, copy=False)
        if k == "clip":
            return np.clip(z, self.lo, self.hi).astype(z.dtype, copy=False)
        if k == "identity":
            return z
        if k == "sigmoid":
            return (1.0 / (1.0 + np.exp(-z))).astype(z.dtype, copy=False)
        if k == "tanh":
            return np.tanh(z)
        if k == "silu":
            return (z / (1.0 + np.exp(-z))).astype(z.dtype, copy=False)
        if k in ("gelu", "gelu_tanh"):
            return _gelu(np.asarray(z), tanh=k == "gelu_tanh")
        raise ValueError(f"unknown activation kind {k!r}")

    def select(self, index: np.ndarray) -> "ActivationSpec":
        """The same activation restricted to hidden neurons ``index``."""
        out = ActivationSpec(**{**self.__dict__})
        if self.kind == "prelu" and self.slope is not None and np.asarray(self.slope).size > 1:
            out.slope = np.asarray(self.slope).reshape(-1)[index]
        return out

    def describe(self) -> str:
        if self.kind == "leaky_relu":
            return f"LeakyRelu(alpha={self.alpha:g})"
        if self.kind == "clip":
            return f"Clip({self.lo:g}, {self.hi:g})"
        return {"relu": "Relu", "prelu": "PRelu", "gelu": "Gelu", "gelu_tanh": "Gelu(tanh)",
                "sigmoid": "Sigmoid", "tanh": "Tanh", "silu": "SiLU", "identity": "Identity"}[self.kind]


def _gelu(z: np.ndarray, *, tanh: bool) -> np.ndarray:
    """GELU (erf form, or ``tanh``'s approximation) of z, in z's dtype.

    Computed in float32 for float32 input, as onnxruntime computes Gelu and
    Erf: the constants are cast to that dtype first, because under numpy 2 a
    float32 array times a numpy float64 scalar is float64, and the float64
    erf of an encoder's hidden tensors was most of this function's time
    (about 4x that of float32, for values rounded back to float32). Narrower
    floats are computed in float32, float64 in float64; one buffer, updated
    in place."""
    work = z.dtype if z.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    x = z.astype(work, copy=False)
    if tanh:
        # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        out = np.multiply(x, x)
        out *= work.type(0.044715)
        out += 1
        out *= x
        out *= work.type(np.sqrt(2.0 / np.pi))
        np.tanh(out, out=out)
    else:
        from scipy.special import erf  # scipy comes with scikit-learn

        # 0.5 x (1 + erf(x / √2))
        out = np.multiply(x, work.type(1.0 / np.sqrt(2.0)))
        erf(out, out=out)
    out += 1
    out *= x
    out *= work.type(0.5)
    return out.astype(z.dtype, copy=False)
