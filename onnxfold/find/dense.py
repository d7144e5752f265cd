"""Dense ops and linear paths as numpy arrays: the view every pass edits.

A ``DenseOp`` is one fully connected layer as it appears in the graph, in any
of the forms exporters emit, normalised to ``z = W x + b + sum_k P_k(x_k)``:

- ``Gemm(x, B, C)`` (transA=0, transB 0/1, alpha, beta), or
- ``MatMul(x, B)`` optionally followed by ``Add(·, bias)``, then optionally
- ``BatchNormalization`` on 2-D input (folded into W and b), and
- extra ``Add(·, MatMul(x_k, F0)[·MatMul(F1)…])`` terms: linear paths, which
  is how linearity folding stores moved neurons.

W is out × in (``W = Bᵀ`` for MatMul), kept in float64 while passes edit it;
``dtype`` is what gets written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import numpy as np


@dataclass
class LinearPath:
    """A bias-free linear term ``x @ F0 @ F1 @ …`` added to a pre-activation.

    ``factors[0]`` has one row per element of the source ``input`` tensor's
    last axis; ``factors[-1]`` one column per output neuron of the owning op.
    """

    input: str
    factors: list[np.ndarray]
    nodes: list[str] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """The dense in × out matrix of this path."""
        return reduce(np.matmul, self.factors)

    @property
    def rank(self) -> int:
        return min(min(f.shape) for f in self.factors)

    @property
    def num_params(self) -> int:
        return int(sum(f.size for f in self.factors))

    @property
    def form(self) -> str:
        return "dense" if len(self.factors) == 1 else "factored"


@dataclass
class DenseOp:
    name: str  # name of the main Gemm/MatMul node: stable id
    input: str  # tensor read by the main product
    output: str  # final pre-activation tensor (after bias, BN, paths)
    weight: np.ndarray  # out × in, float64
    bias: np.ndarray | None  # out, float64
    form: str  # "gemm" or "matmul": how the main product is written back
    dtype: np.dtype
    nodes: list[str] = field(default_factory=list)  # all nodes making up the op
    paths: list[LinearPath] = field(default_factory=list)
    changed: bool = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def num_params(self) -> int:
        n = self.weight.size + (0 if self.bias is None else self.bias.size)
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
