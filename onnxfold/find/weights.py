"""Op weights read from the model when first used, not when the model is searched.

Every op view ``find`` returns (``DenseOp``, ``ConvOp``, ``GemmReader``,
``Projection``) keeps its main weight behind a loader: finding the ops of a
multi-GB model reads only shapes and dtypes, a pass reads the weights of the
group it is deciding, and ``release()`` drops them again once the group is
decided, so a pass walking the model holds little more than what it edits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .graph_index import CACHE_MAX_BYTES, GraphIndex


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype weights are kept in while passes edit them: float64 for
    float64 models, float32 otherwise (float16 weights are widened so that
    edits do not round twice). Arithmetic on them is done in float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def constant_loader(ix: GraphIndex, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """A loader reading constant ``name`` of ``ix`` when called (then
    ``transform(value)``): what an op gets instead of its weight."""

    def load() -> np.ndarray:
        value = ix.const(name)
        if not value.flags.writeable or value.nbytes <= CACHE_MAX_BYTES:
            # the op owns what it edits: never a view of the proto's bytes or of the index's cache
            value = value.copy()
        return value if transform is None else transform(value)

    return load


def scaled_rows(loader: Callable[[], np.ndarray], scale: np.ndarray) -> Callable[[], np.ndarray]:
    """``loader``'s weight with output row (axis 0) i multiplied by ``scale[i]``,
    in float64: how a BatchNormalization after the op is folded in without
    reading the weight."""
    s = np.asarray(scale, dtype=np.float64)

    def load() -> np.ndarray:
        w = np.asarray(loader(), dtype=np.float64)
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))

    return load


class LazyWeight:
    """Base of the op views: a ``weight`` read on first use.

    A subclass sets ``name`` (for messages), ``dtype`` (what is written back)
    and ``changed`` (edited: must be written back) and calls
    :meth:`_init_weight`. The weight is kept in ``storage_dtype``; a weight
    set by a pass replaces it (and its shape). ``release()`` drops an
    unedited weight, which the next use reads again, identical.
    """

    #: rank the weight must have when a pass sets it (None: any)
    weight_rank: int | None = None

    name: str
    dtype: np.dtype
    changed: bool

    def _init_weight(self, weight: np.ndarray | None, loader: Callable[[], np.ndarray] | None,
                     shape: tuple[int, ...] | None) -> None:
        if weight is None and (loader is None or shape is None):
            raise ValueError(f"{type(self).__name__} needs a weight, or a weight_loader and weight_shape")
        self._loader = loader
        self._weight: np.ndarray | None = None
        self._shape = tuple(int(d) for d in shape) if shape is not None else None
        if weight is not None:
            self.weight = weight

    @property
    def storage_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def weight(self) -> np.ndarray:
        """The weight in ``storage_dtype`` (read from the model on first use)."""
        if self._weight is None:
            w = np.asarray(self._loader(), dtype=self.storage_dtype)
            if w.shape != self._shape:
                raise ValueError(f"weight of {self.name} has shape {w.shape}, expected {self._shape}")
            self._weight = w
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=self.storage_dtype)
        if self.weight_rank is not None and value.ndim != self.weight_rank:
            raise ValueError(f"weight of {self.name} must be {self.weight_rank}-D, got shape {value.shape}")
        self._weight = value
        self._shape = value.shape

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's shape, known without reading it."""
        return self._shape

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

    def scale_rows(self, scale: np.ndarray) -> None:
        """Multiply output row i of the weight by ``scale[i]``: now if the
        weight is loaded, else when it is read."""
        if self._weight is not None:
            s = np.asarray(scale, dtype=np.float64)
            self.weight = self._weight * s.reshape((-1,) + (1,) * (self._weight.ndim - 1))
        else:
            self._loader = scaled_rows(self._loader, scale)


class OpsView:
    """What the dense and conv views share: ops by name and chains by name."""

    ops: dict
    chains: list

    def chain(self, name: str):
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def changed(self) -> bool:
        """Has any op been edited since the view was found?"""
        return any(op.changed for op in self.ops.values())
