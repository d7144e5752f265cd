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


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype weights are kept in while passes edit them: float64 for
    float64 models, float32 otherwise (float16 weights are widened so that
    edits do not round twice). Arithmetic on them is done in float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class DenseOp:
    """One dense layer (see the module docstring).

    ``weight`` (out × in) is read from the model on first use when the op was
    built with a ``weight_loader`` (find does that: a view of a multi-GB model
    then holds only the weights a pass is working on). ``release()`` drops an
    unchanged weight again; an edited one is kept until written back.
    """

    def __init__(self, name: str, input: str, output: str, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, form: str = "gemm", dtype=np.float32,
                 nodes: list[str] | None = None, paths: list[LinearPath] | None = None, changed: bool = False,
                 *, weight_loader: Callable[[], np.ndarray] | None = None,
                 weight_shape: tuple[int, int] | None = None):
        if weight is None and (weight_loader is None or weight_shape is None):
            raise ValueError("DenseOp needs a weight, or a weight_loader and weight_shape")
        self.name = name  # name of the main Gemm/MatMul node: stable id
        self.input = input  # tensor read by the main product
        self.output = output  # final pre-activation tensor (after bias, BN, paths)
        self.bias = bias  # out, float64, or None
        self.form = form  # "gemm" or "matmul": how the main product is written back
        self.dtype = np.dtype(dtype)  # what gets written back
        self.nodes = list(nodes or [])  # all nodes making up the op
        self.paths = list(paths or [])
        self.changed = changed
        self._loader = weight_loader
        self._weight: np.ndarray | None = None
        self._shape = tuple(weight_shape) if weight_shape is not None else None
        if weight is not None:
            self.weight = weight

    @property
    def storage_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def weight(self) -> np.ndarray:
        """out × in, in ``storage_dtype``."""
        if self._weight is None:
            self._weight = np.asarray(self._loader(), dtype=self.storage_dtype)
            if self._weight.shape != self._shape:
                raise ValueError(f"weight of {self.name} has shape {self._weight.shape}, expected {self._shape}")
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=self.storage_dtype)
        if value.ndim != 2:
            raise ValueError(f"weight of {self.name} must be 2-D, got shape {value.shape}")
        self._weight = value
        self._shape = value.shape

    @property
    def weight_loaded(self) -> bool:
        return self._weight is not None

    def release(self) -> None:
        """Forget an unedited weight that can be read again (memory)."""
        if not self.changed and self._loader is not None:
            self._weight = None

    def discard(self) -> None:
        """Drop the weight for good (it has been written back): any later use is an error."""
        self._weight = None

        def gone() -> np.ndarray:
            raise RuntimeError(f"the weight of {self.name} was written back and released")

        self._loader = gone

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
