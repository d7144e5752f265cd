"""What a compression pass is.

A pass is a small object with one job: given a model and a ``PassContext`` it
returns a ``PassResult`` (the new model, whether it changed, and one
``LayerReport`` per hidden layer it looked at). A pass never mutates the model
it is given and never prints; progress goes through ``ctx.progress``.

Inside, passes follow the same four steps: find the chains
(``find.find_dense_graph``), measure what they need (``measure``), decide per
layer (``decide``), and rewrite (``rewrite.apply_edit`` + ``materialize``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from ..errors import UsageError


def _local_stats():
    from ..distributed import LocalStats

    return LocalStats()


@dataclass
class PassContext:
    calibration: Any = None  # measure.CalibrationSet used to measure/fit, or None (data-free)
    heldout: Any = None  # CalibrationSet used to choose hyper-parameters (ridge, thresholds), or None
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    batch_size: int = 256
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)
    cache: Any = None  # passes.cache.SearchCache shared by a budget search's candidates, or None
    # where streamed statistics are computed (onnxfold.distributed): this process, or a Ray cluster
    stats_backend: Any = field(default_factory=_local_stats)
    # the model a list of passes started from (pipeline.run_passes sets it): a
    # downstream refit fits the folded model's ops towards its outputs
    reference: Any = None
    # recorded streams of a run outside a search (measure.jobs.StreamMemo: a refit's next run starts
    # from what the last one computed); a search's cache has its own
    streams: Any = None

    def measure(self, job, data, task: str) -> dict[str, Any]:
        """Accumulators of the statistics ``job`` (a ``distributed.StatsJob``) over ``data``."""
        return self.stats_backend.reduce(job, data, batch_size=self.batch_size, providers=self.providers,
                                         progress=lambda done, total: self.report_progress(task, done, total),
                                         memo=self.cache.streams if self.cache is not None else self.streams)

    def report_progress(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)


@dataclass
class LayerReport:
    """One hidden layer as a pass left it. Keys are part of the JSON report."""

    layer: str  # chain name, e.g. "layer0"
    producer: str  # producer node name
    activation: str
    width_before: int
    width_after: int
    linear: int = 0  # neurons moved to a linear path
    constant: int = 0  # neurons removed as constants
    merged: int = 0  # neurons removed by merging into others (folding)
    pruned: int = 0  # neurons dropped by selection (magnitude pruning)
    path_form: str | None = None  # "dense" | "factored" | "svd" | None
    path_rank: int | None = None
    params_before: int = 0  # producer + consumer (+ paths) parameters
    params_after: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(Protocol):
    name: str

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...


#: Share of the calibration samples a least-squares refit holds out to choose
#: its ridge strength (when the context brings no held-out set), and the
#: fewest samples worth splitting.
HELDOUT_SHARE = 0.2
MIN_SAMPLES_TO_SPLIT = 5


def heldout_mask(n: int, seed: int) -> np.ndarray | None:
    """Which of ``n`` calibration samples a refit holds out (seeded); None when too few to split."""
    if n < MIN_SAMPLES_TO_SPLIT:
        return None
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:max(1, round(n * HELDOUT_SHARE))]] = True
    return held


# ---------------------------------------------------------------------------
# the options every ratio-driven folding pass takes, validated one way

FOLD_SELECTS = ("kmeans", "magnitude", "obs")  # obs needs calibration data
FOLD_REPAIRS = ("auto", "none", "ar", "repair", "ls")
DATA_REPAIRS = ("repair", "ls")  # need calibration data


def check_ratio(what: str, where: str | None, r) -> None:
    """A share of units removed: a number in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)) or not 0 <= r < 1:
        at = "" if where is None else f" for {where}"
        raise UsageError(f"{what} ratio{at} must be a number in [0, 1), got {r!r}")


class FoldSettings:
    """Ratio (one for all, or per layer), selection, repair, seed and layer
    filter of a folding pass. ``what`` names the pass in messages ("fold",
    "channel fold"). ``repairs``: the repairs the pass offers; ``auto_repair``:
    what 'auto' means whatever the data (default: ``ls`` with calibration
    data, ``auto_without_data`` - ``ar`` - without); ``check_value(what, where, value)`` validates each ratio and
    ``as_value`` converts it (head folding also takes head counts)."""

    def __init__(self, what: str, ratio, select: str, repair: str, seed: int, layers, *,
                 repairs: Sequence[str] = FOLD_REPAIRS, auto_repair: str | None = None,
                 auto_without_data: str = "ar", check_value: Callable = check_ratio, as_value: Callable = float):
        if select not in FOLD_SELECTS:
            raise UsageError(f"unknown {what} selection {select!r}; choose one of {', '.join(FOLD_SELECTS)}")
        if repair not in repairs:
            raise UsageError(f"unknown {what} repair {repair!r}; choose one of {', '.join(repairs)}")
        ratios = dict(ratio) if isinstance(ratio, Mapping) else {None: ratio}
        for where, r in ratios.items():
            check_value(what, where, r)
        self.what, self.ratio, self.select, self.repair = what, ratio, select, repair
        self.auto_repair, self.auto_without_data, self.as_value = auto_repair, auto_without_data, as_value
        self.seed = int(seed)
        self.layers = None if layers is None else list(layers)

    def ratios(self, names: Sequence[str], unknown: str, plural: str) -> dict[str, float]:
        """Ratio per layer among ``names``. A layer the user named that the model
        lacks is a UsageError: ``unknown`` formats its name ("unknown conv chain
        {!r}"), ``plural`` names what the model has ("conv chains")."""
        asked = list(self.layers or []) + (list(self.ratio) if isinstance(self.ratio, Mapping) else [])
        missing = [n for n in asked if n not in names]
        if missing:
            have = ", ".join(names) or "none"
            raise UsageError(f"{unknown.format(missing[0])}; the model's foldable {plural} are: {have}")
        chosen = names if self.layers is None else [n for n in names if n in self.layers]
        if isinstance(self.ratio, Mapping):
            return {n: self.as_value(self.ratio[n]) for n in chosen if n in self.ratio}
        return {n: self.as_value(self.ratio) for n in chosen}

    def repair_mode(self, ctx: "PassContext") -> str:
        """'auto' is the least-squares refit with calibration data, the pass's
        ``auto_without_data`` without (or its ``auto_repair`` either way)."""
        repair = self.repair
        if repair == "auto":
            repair = self.auto_repair or ("ls" if ctx.calibration is not None else self.auto_without_data)
        if ctx.calibration is None and repair in DATA_REPAIRS:
            raise UsageError(f"{self.what} repair {repair!r} needs calibration data; give calibration data or use"
                             " repair 'ar' or 'none'")
        return repair

    def auto_note(self, ctx: "PassContext", repair: str, what: str) -> list[str]:
        """The note saying which repair 'auto' chose, if it was asked for."""
        if self.repair != "auto":
            return []
        data = "with" if ctx.calibration is not None else "no"
        return [f"{what}: repair {repair!r} chosen automatically ({data} calibration data)"]


def fold_in_order(groups: Sequence, ratios: Mapping[str, float], ctx: PassContext, task: str, fold: Callable,
                  unselected: Callable, params: Callable, before_each: Callable | None = None,
                  before: Mapping[str, int] | None = None) -> list[LayerReport]:
    """One report per group (chain, block...), in order: ``fold(group,
    ratio)`` for those with a ratio, ``unselected(group)`` for the others;
    parameters before (``before``, default ``params(group)`` now) and after
    (``params(group)``) filled in."""
    before = {g.name: params(g) for g in groups} if before is None else before
    reports = []
    for i, g in enumerate(groups):
        if before_each is not None:
            before_each(g)
        ctx.report_progress(task, i, len(groups))
        reports.append(fold(g, ratios[g.name]) if g.name in ratios else unselected(g))
    ctx.report_progress(task, len(groups), len(groups))
    for rep, g in zip(reports, groups):
        rep.params_before, rep.params_after = before[g.name], params(g)
    return reports
