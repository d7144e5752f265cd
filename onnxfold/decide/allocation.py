"""How one fold ratio is shared among layers: more where removing units costs less.

The budget search sizes each layer itself. With one ratio given for every
layer, folding each by that share spends the same on a layer the output
hardly notices as on one it depends on. :func:`allocate_by_sensitivity`
shares the same number of removed units so that each layer's ratio is
inversely proportional to its *sensitivity*: the output error measured when
that layer alone is folded (``passes.folding``, ``allocate="sensitivity"``).
"""

from __future__ import annotations

from collections.abc import Mapping

#: how one fold ratio is shared: the same for every layer, or by sensitivity
ALLOCATIONS = ("uniform", "sensitivity")
#: no layer loses more than this share, however insensitive it measured
MAX_ALLOCATED_RATIO = 0.9
#: a layer is probed at this multiple of the ratio (capped): far enough from the ratio that the measured
#: losses stand out of the noise, near enough that they rank the layers as the ratio itself would
PROBE_FACTOR = 1.5


def probe_ratio(ratio: float) -> float:
    return min(MAX_ALLOCATED_RATIO, PROBE_FACTOR * float(ratio))


def allocate_by_sensitivity(widths: Mapping[str, int], losses: Mapping[str, float], ratio: float,
                            cap: float = MAX_ALLOCATED_RATIO) -> dict[str, float]:
    """Per layer, the share of its ``widths[layer]`` units removed: ∝ 1 / ``losses[layer]``,
    the same number removed in all as ``ratio`` of every layer would remove
    (Σ nᵢ rᵢ = ratio · Σ nᵢ), none above ``cap`` (a layer at the cap passes what it
    cannot take to the others, in proportion). A loss of 0 (or below) takes the cap."""
    if not 0 <= ratio < 1 or not widths:
        raise ValueError(f"ratio must be in [0, 1) with at least one layer, got {ratio!r}")
    cap = max(float(cap), float(ratio))
    total = ratio * sum(widths.values())
    capped: set[str] = {k for k in widths if losses[k] <= 0}
    while True:
        free = [k for k in widths if k not in capped]
        left = total - cap * sum(widths[k] for k in capped)
        if not free or left <= 0:
            out = {k: (cap if k in capped else 0.0) for k in widths}
            break
        scale = left / sum(widths[k] / losses[k] for k in free)
        over = {k for k in free if scale / losses[k] > cap}
        if not over:
            out = {k: (cap if k in capped else scale / losses[k]) for k in widths}
            break
        capped |= over
    return out
