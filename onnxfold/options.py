"""What one ``optimize`` run is asked to do: one typed options object.

The settings are grouped by concern, as the CLI's option groups are
(``onnxfold optimize --help``): the data, linearity folding, neuron folding,
the budget search, the runtime and what the report measures. The CLI builds one
:class:`OptimizeOptions` from its arguments; :func:`onnxfold.optimize` takes
one (``options=``) or the same settings as flat keywords
(``fold_ratio=0.5``; :data:`KEYWORDS` lists them), and the pipeline reads
them from this object only - no setting is passed on by hand from layer to
layer.

Values are checked here, once, with one clear line for a bad one
(:class:`~onnxfold.errors.UsageError`); what a value means is the pass's
business (e.g. per-layer ratios naming layers the model lacks are caught by
the pass that knows the model's layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from numbers import Real
from typing import Any

from .decide.allocation import ALLOCATIONS
from .decide.budget import Budget
from .errors import UsageError
from .passes.base import FOLD_REPAIRS, FOLD_SELECTS

LINEAR_MODES = ("extended", "paper")
LINEAR_PATHS = ("auto", "dense", "factored", "svd")
# after the folds: consumer = each fold's own consumer refit only; downstream = also every linear op
# after the first changed one, in order; auto = downstream, kept when its held-out output error is lower
FOLD_REFITS = ("auto", "consumer", "downstream")
PROVIDERS = ("auto", "cpu", "cuda")
LABEL_KINDS = ("next-token",)


def _choice(what: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _ratio(what: str, value) -> None:
    for where, r in (value.items() if isinstance(value, Mapping) else [(None, value)]):
        if not _number(r) or not 0 <= r < 1:
            at = "" if where is None else f" for {where}"
            raise UsageError(f"{what}{at} must be a number in [0, 1), got {r!r}; give e.g. 0.5")


@dataclass(frozen=True)
class DataOptions:
    """What the data carries beyond its inputs."""

    labels: str | None = None  # "next-token": a language model's labels are its input ids shifted by one

    def validate(self) -> None:
        if self.labels is not None:
            _choice("label kind", self.labels, LABEL_KINDS)


@dataclass(frozen=True)
class LinearityOptions:
    """Linearity folding (docs/methods.md section 1)."""

    enabled: bool = True
    threshold: float | None = None  # None: 1.0 for explicit settings; the search chooses its own
    mode: str = "extended"  # "extended" or "paper"
    path: str = "auto"  # how linear paths are stored: auto, dense, factored, svd

    def validate(self) -> None:
        _choice("linear mode", self.mode, LINEAR_MODES)
        _choice("linear path form", self.path, LINEAR_PATHS)
        if self.threshold is not None and (not _number(self.threshold) or not 0.5 < self.threshold <= 1.0):
            raise UsageError(f"linear threshold must be in (0.5, 1], got {self.threshold!r}; give e.g. 0.99")


@dataclass(frozen=True)
class FoldOptions:
    """Neuron, channel, gated-MLP and head folding (docs/methods.md sections 2-3)."""

    ratio: float | Mapping[str, float] | None = None  # share removed per layer, or {layer: share}
    select: str = "kmeans"  # "kmeans" merges clusters, "magnitude" keeps the largest units
    repair: str = "auto"  # auto: ls with calibration data, ar without
    refit: str = "auto"  # with the ls repair: see FOLD_REFITS
    heads: int | float | Mapping[str, Any] | None = None  # query heads kept per block, or the share removed
    residual: bool = False  # conv models: also fold residual-stream channels
    # grouped-query attention: key/value heads kept per block, or the share removed (None: fold within groups)
    kv_heads: int | float | Mapping[str, Any] | None = None
    # one ratio for every dense layer: "uniform" folds each by it, "sensitivity" shares the same number
    # of removed neurons by each layer's measured sensitivity (passes/folding.py, decide/allocation.py)
    allocate: str = "uniform"
    # epochs of the nonlinear refinement of each folded dense chain (passes/refine.py); 0: none
    refine_epochs: int = 0

    def validate(self) -> None:
        _choice("fold selection", self.select, FOLD_SELECTS)
        _choice("fold repair", self.repair, FOLD_REPAIRS)
        _choice("fold refit", self.refit, FOLD_REFITS)
        _choice("fold allocation", self.allocate, ALLOCATIONS)
        if self.allocate != "uniform" and (self.ratio is None or isinstance(self.ratio, Mapping)):
            raise UsageError("allocating by sensitivity shares one fold ratio among the layers: give one"
                             " --fold-ratio (e.g. 0.3), not per-layer ratios")
        if self.ratio is not None:
            _ratio("fold ratio", self.ratio)
        for what, v in (("heads", self.heads), ("kv heads", self.kv_heads)):
            for h in (v.values() if isinstance(v, Mapping) else [v]):
                ok = h is None or (isinstance(h, int) and not isinstance(h, bool) and h >= 1) \
                    or (isinstance(h, float) and 0 <= h < 1)
                if not ok:
                    raise UsageError(f"{what} must be a head count >= 1 or a share in [0, 1), got {h!r};"
                                     " give e.g. 8 or 0.25")
        if isinstance(self.refine_epochs, bool) or not isinstance(self.refine_epochs, int) or self.refine_epochs < 0:
            raise UsageError(f"refine epochs must be a whole number >= 0, got {self.refine_epochs!r}; give e.g. 12")
        if self.refine_epochs and self.ratio is None:
            raise UsageError("refine epochs train the hidden layers a fold ratio folded: give --fold-ratio too"
                             " (the budget search does not refine)")
        if self.kv_heads is not None and self.heads is None:
            raise UsageError("kv heads need heads too (the query heads kept); give e.g. --fold-heads 0.0 to keep"
                             " every group's query heads")


@dataclass(frozen=True)
class SearchOptions:
    """The budget the result must meet and how hard the search looks."""

    budget: Budget | None = None  # None: the default budget (docs/statistics.md)
    positive_threshold: float | None = None  # detector outputs: compare decisions score > P
    max_evaluations: int = 30  # candidate models the budget search may build

    def validate(self) -> None:
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise UsageError(f"budget must be an onnxfold Budget, got {type(self.budget).__name__}; build one with onnxfold.Budget(...)")
        if isinstance(self.max_evaluations, bool) or not isinstance(self.max_evaluations, int) \
                or self.max_evaluations < 1:
            raise UsageError(f"max evaluations must be a positive integer, got {self.max_evaluations!r}; give 1 or more")
        if self.positive_threshold is not None and not _number(self.positive_threshold):
            raise UsageError(f"positive threshold must be a number, got {self.positive_threshold!r}; give e.g. 0.5")


#: what each memo of streamed activations may hold by default (RuntimeOptions.memo_mib)
MEMO_MIB = 1024


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how models run: onnxruntime, batches, seeds, Ray."""

    provider: str = "auto"  # auto: CUDA when it really works, else CPU
    batch_size: int = 256
    seed: int = 0  # data splits, k-means, held-out rows
    ray_address: str | None = None  # compute calibration statistics on Ray ("local", "HOST:6379", "auto")
    ray_workers: int | None = None
    ray_gpus_per_worker: float = 0.0
    # streamed activations each memo may keep for replay (MiB; None: MEMO_MIB). The memos make later runs
    # over the same data replay or start where the model starts to differ; 0 keeps none, so the working
    # memory stays flat in the number of samples and every run is run again (docs/methods.md 3.6)
    memo_mib: int | None = None

    @property
    def memo_bytes(self) -> int:
        return (MEMO_MIB if self.memo_mib is None else self.memo_mib) * 2**20

    def validate(self) -> None:
        _choice("provider", self.provider, PROVIDERS)
        if self.memo_mib is not None and (isinstance(self.memo_mib, bool) or not isinstance(self.memo_mib, int)
                                          or self.memo_mib < 0):
            raise UsageError(f"memo size must be a whole number of MiB >= 0, got {self.memo_mib!r}; give e.g. 0")
        for what, v in (("batch size", self.batch_size), ("ray workers", self.ray_workers)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{what} must be a positive integer, got {v!r}; give 1 or more")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"seed must be an integer, got {self.seed!r}; give e.g. 0")
        if not _number(self.ray_gpus_per_worker) or self.ray_gpus_per_worker < 0:
            raise UsageError(f"GPUs per Ray worker must be >= 0, got {self.ray_gpus_per_worker!r}; give 0 or more")


@dataclass(frozen=True)
class ReportOptions:
    """What the report measures beyond the check itself."""

    latency: bool = False  # time the original and the result
    profile_memory: bool = False  # each stage's peak resident memory (Linux)

    def validate(self) -> None:
        return None  # flags: any truthy value turns them on


@dataclass(frozen=True)
class OptimizeOptions:
    data: DataOptions = field(default_factory=DataOptions)
    linearity: LinearityOptions = field(default_factory=LinearityOptions)
    fold: FoldOptions = field(default_factory=FoldOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    report: ReportOptions = field(default_factory=ReportOptions)

    def validate(self) -> "OptimizeOptions":
        for f in fields(self):
            getattr(self, f.name).validate()
        return self

    @property
    def explicit(self) -> bool:
        """Did the user ask for fixed settings (no search)?"""
        return self.fold.ratio is not None or self.fold.heads is not None \
            or self.linearity.threshold is not None or self.linearity.mode == "paper"

    def with_keywords(self, **settings) -> "OptimizeOptions":
        """A copy with flat keyword settings (:data:`KEYWORDS`) put in their groups."""
        groups: dict[str, dict[str, Any]] = {}
        for key, value in settings.items():
            if key not in KEYWORDS:
                raise TypeError(f"optimize() got an unexpected keyword argument {key!r}")
            group, name = KEYWORDS[key]
            groups.setdefault(group, {})[name] = value
        return replace(self, **{g: replace(getattr(self, g), **kw) for g, kw in groups.items()})

    def keywords(self) -> dict[str, Any]:
        """The flat keyword form (what the report's ``settings`` records)."""
        return {key: getattr(getattr(self, g), name) for key, (g, name) in KEYWORDS.items()}


#: optimize()'s flat keywords → (group, field) of OptimizeOptions
KEYWORDS: dict[str, tuple[str, str]] = {
    "labels": ("data", "labels"),
    "linear": ("linearity", "enabled"),
    "linear_threshold": ("linearity", "threshold"),
    "linear_mode": ("linearity", "mode"),
    "linear_path": ("linearity", "path"),
    "fold_ratio": ("fold", "ratio"),
    "fold_select": ("fold", "select"),
    "fold_repair": ("fold", "repair"),
    "fold_refit": ("fold", "refit"),
    "fold_heads": ("fold", "heads"),
    "fold_kv_heads": ("fold", "kv_heads"),
    "fold_residual": ("fold", "residual"),
    "fold_allocate": ("fold", "allocate"),
    "refine_epochs": ("fold", "refine_epochs"),
    "budget": ("search", "budget"),
    "positive_threshold": ("search", "positive_threshold"),
    "max_evaluations": ("search", "max_evaluations"),
    "provider": ("runtime", "provider"),
    "batch_size": ("runtime", "batch_size"),
    "seed": ("runtime", "seed"),
    "ray_address": ("runtime", "ray_address"),
    "ray_workers": ("runtime", "ray_workers"),
    "ray_gpus_per_worker": ("runtime", "ray_gpus_per_worker"),
    "memo_mib": ("runtime", "memo_mib"),
    "latency": ("report", "latency"),
    "profile_memory": ("report", "profile_memory"),
}
