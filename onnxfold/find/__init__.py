"""Find: which dense chains a graph has, as a numpy view the passes edit."""

from .activations import ActivationSpec, Piece
from .chains import Chain, DenseGraph, Skipped, find_dense_graph
from .dense import DenseOp, LinearPath

__all__ = ["ActivationSpec", "Piece", "Chain", "DenseGraph", "DenseOp", "LinearPath", "Skipped",
           "find_dense_graph"]
