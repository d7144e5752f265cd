"""Dense ops and linear paths as numpy arrays: the view every pass edits.

A ``DenseOp`` is one fully connected layer as it appears in the graph, in any
of the forms exporters emit, normalised to ``z = W x + b + sum_k P_k(x_k)``:

- ``Gemm(x, B, C)`` (transA=0, transB 0/1, alpha, beta), or
- ``MatMul(x, B)`` optionally followed by ``Add(·, bias)``, then optionally
- ``BatchNormalization`` on 2-D input (folded into W and b), and
- extra ``Add(·, MatMul(x_k, F0)[·MatMul(F1)…])`` terms: linear paths, which
  is how linearity folding stores moved neurons.

W is out × in (``W = Bᵀ`` for MatMul), kept in float32 (float64 for float64
models) while passes edit it and read from the model only when a pass needs
it; ``dtype`` is what gets written back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import numpy as np

from .weights import LazyWeight, storage_dtype

__all__ = ["DenseOp", "LinearPath", "storage_dtype"]


class LinearPath:
    """A bias-free linear term ``x @ F0 @ F1 @ …`` added to a pre-activation.

    ``factors[0]`` has one row per element of the source ``input`` tensor's
    last axis; ``factors[-1]`` one column per output neuron of the owning op.
    Factors found in a model are read on first use (``factor_loader``, with
    their ``factor_shapes`` known up front) and kept in float64: they are
    rank-limited, and products and SVDs of them need the precision.
    """

    def __init__(self, input: str, factors: list[np.ndarray] | None = None, nodes: list[str] | None = None,
                 *, factor_loader: Callable[[], list[np.ndarray]] | None = None,
                 factor_shapes: list[tuple[int, int]] | None = None):
        if factors is None and (factor_loader is None or factor_shapes is None):
            raise ValueError("LinearPath needs factors, or a factor_loader and factor_shapes")
        self.input = input
        self.nodes = list(nodes or [])
        self._loader = factor_loader
        self._shapes = None if factor_shapes is None else [tuple(sh) for sh in factor_shapes]
        self._factors = None if factors is None else list(factors)

    @property
    def factors(self) -> list[np.ndarray]:
        """The factors (a list a pass may edit in place; the owning op is then ``changed``)."""
        if self._factors is None:
            self._factors = [np.asarray(f, dtype=np.float64) for f in self._loader()]
        return self._factors

    @factors.setter
    def factors(self, value: list[np.ndarray]) -> None:
        self._factors = list(value)

    @property
    def factor_shapes(self) -> list[tuple[int, ...]]:
        return [f.shape for f in self._factors] if self._factors is not None else list(self._shapes)

    @property
    def factors_loaded(self) -> bool:
        return self._factors is not None

    def release(self) -> None:
        """Forget factors that can be read again (call only when unedited)."""
        if self._loader is not None:
            self._factors = None

    def matrix(self) -> np.ndarray:
        """The dense in × out matrix of this path."""
        return reduce(np.matmul, self.factors)

    @property
    def rank(self) -> int:
        return min(min(sh) for sh in self.factor_shapes)

    @property
    def num_params(self) -> int:
        return int(sum(int(np.prod(sh)) for sh in self.factor_shapes))

    @property
    def form(self) -> str:
        return "dense" if len(self.factor_shapes) == 1 else "factored"

    def __repr__(self) -> str:
        return f"LinearPath({self.input!r}, shapes={self.factor_shapes}, nodes={self.nodes})"


class DenseOp(LazyWeight):
    """One dense layer (see the module docstring).

    ``weight`` (out × in) is read from the model on first use when the op was
    built with a ``weight_loader`` (find does that: a view of a multi-GB model
    then holds only the weights a pass is working on). ``release()`` drops an
    unchanged weight (and linear-path factors) again; an edited one is kept
    until written back.
    """

    weight_rank = 2

    def __init__(self, name: str, input: str, output: str, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, form: str = "gemm", dtype=np.float32,
                 nodes: list[str] | None = None, paths: list[LinearPath] | None = None, changed: bool = False,
                 *, weight_loader: Callable[[], np.ndarray] | None = None,
                 weight_shape: tuple[int, int] | None = None):
        self.name = name  # name of the main Gemm/MatMul node: stable id
        self.input = input  # tensor read by the main product
        self.output = output  # final pre-activation tensor (after bias, BN, paths)
        self.bias = bias  # out, float64, or None
        self.form = form  # "gemm" or "matmul": how the main product is written back
        self.dtype = np.dtype(dtype)  # what gets written back
        self.nodes = list(nodes or [])  # all nodes making up the op
        self.paths = list(paths or [])
        self.changed = changed
        self._init_weight(weight, weight_loader, weight_shape)

    def release(self) -> None:
        """Forget an unedited weight and path factors that can be read again (memory)."""
        super().release()
        if not self.changed:
            for p in self.paths:
                p.release()

    def __repr__(self) -> str:
        return f"DenseOp({self.name!r}, {self.out_features}x{self.in_features}, form={self.form}, changed={self.changed})"

    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def num_params(self) -> int:
        n = self._shape[0] * self._shape[1] + (0 if self.bias is None else self.bias.size)
        return int(n + sum(p.num_params for p in self.paths))

    def bias_or_zero(self) -> np.ndarray:
        return np.zeros(self.out_features) if self.bias is None else self.bias

    def forward(self, x: np.ndarray, sources: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """z for rows of x (…, in); ``sources`` gives path inputs by tensor name."""
        z = x @ self.weight.T + self.bias_or_zero()
        for p in self.paths:
            if sources is None or p.input not in sources:
                raise KeyError(f"path input {p.input!r} of {self.name} not provided")
            z = z + reduce(np.matmul, [sources[p.input], *p.factors])
        return z
