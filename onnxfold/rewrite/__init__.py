"""Rewrite: neuron edits on the numpy view, then graph surgery."""

from .edits import HiddenEdit, apply_edit, selection
from .materialize import materialize

__all__ = ["HiddenEdit", "apply_edit", "selection", "materialize"]
