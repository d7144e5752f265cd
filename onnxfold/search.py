"""Budget-driven search: the smallest model that meets the user's budget.

Candidates are *settings* - a linearity threshold and a fold ratio per hidden
layer, plus one selection method - turned into a model by running the passes
on the original, and judged on the *select* split against the budget. The
search never looks at the final evaluation data.

1. Lossless first: linearity folding at T = 1.0 (constant and exactly linear
   neurons). If even that fails on held-out data, start from the original.
2. Uniform settings (one T, or one ratio and method, for every layer),
   ascending until the budget breaks. The best of these is the baseline the
   per-layer search must beat, and its starting point.
3. Per-layer greedy: from the best uniform setting, try one step further for
   each layer (next fold ratio, next lower threshold); take the step that
   saves the most parameters per unit of budget spent; repeat until no step
   meets the budget (or, for a target ratio, until the ratio is reached).

Every evaluated setting is cached, so the result is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Callable

import onnx

from .decide.budget import Budget, BudgetCheck
from .passes.base import LayerReport, PassContext
from .pipeline import merge_layer_reports, run_passes
from .passes.cache import SearchCache, model_digest
from .verify import compare_models, reference_outputs

RATIO_STEPS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
THRESHOLD_STEPS = (1.0, 0.999, 0.99, 0.98, 0.95, 0.9)
SELECTS = ("kmeans", "magnitude")
#: models up to this many parameters are searched with one BLAS thread (see BudgetSearch.run)
ONE_BLAS_THREAD_UP_TO = 64_000_000


@dataclass(frozen=True)
class Setting:
    """One candidate. ``ratios``/``thresholds`` map layer names to a step
    index into RATIO_STEPS / THRESHOLD_STEPS (0 = untouched / T = 1)."""

    ratios: tuple[tuple[str, int], ...] = ()
    thresholds: tuple[tuple[str, int], ...] = ()
    select: str = "kmeans"
    lossless: bool = True  # run linearity folding at T = 1.0 first

    def ratio_of(self, layer: str) -> int:
        return dict(self.ratios).get(layer, 0)

    def threshold_of(self, layer: str) -> int:
        return dict(self.thresholds).get(layer, 0)

    def with_ratio(self, layer: str, step: int) -> "Setting":
        d = dict(self.ratios)
        d[layer] = step
        return replace(self, ratios=tuple(sorted((k, v) for k, v in d.items() if v)))

    def with_threshold(self, layer: str, step: int) -> "Setting":
        d = dict(self.thresholds)
        d[layer] = step
        return replace(self, thresholds=tuple(sorted((k, v) for k, v in d.items() if v)))

    def describe(self) -> dict:
        return {
            "lossless_linearity": self.lossless,
            "linear_thresholds": {k: THRESHOLD_STEPS[v] for k, v in self.thresholds},
            "fold_ratios": {k: RATIO_STEPS[v] for k, v in self.ratios},
            "fold_select": self.select,
        }


@dataclass
class Candidate:
    setting: Setting
    model: onnx.ModelProto
    parameters: int
    check: BudgetCheck
    layers: list[LayerReport]
    notes: list[str]
    comparison: dict

    @property
    def met(self) -> bool:
        return self.check.met

    @property
    def spent(self) -> float:
        return self.check.spent


@dataclass
class SearchResult:
    best: Candidate | None  # None: nothing met the budget
    baseline_uniform: Candidate | None  # best single fixed setting found
    lossless: Candidate | None  # linearity folding at T = 1.0 alone (exact on the calibration data)
    evaluated: list[dict] = field(default_factory=list)  # (setting, params, spent, met) for the report/plot
    notes: list[str] = field(default_factory=list)


def passes_for(setting: Setting, *, seed: int, conv_layers: frozenset[str] = frozenset()) -> list:
    """The passes a setting stands for; ratios of ``conv_layers`` (conv chain
    names) fold channels, the others dense neurons."""
    from .passes.channel_folding import ChannelFoldingPass
    from .passes.folding import FoldingPass
    from .passes.linearity import LinearityPass

    passes = []
    if setting.lossless:
        passes.append(LinearityPass(threshold=1.0))
    by_t: dict[int, set[str]] = {}
    for layer, step in setting.thresholds:
        by_t.setdefault(step, set()).add(layer)
    for step in sorted(by_t):
        passes.append(LinearityPass(threshold=THRESHOLD_STEPS[step], layers=by_t[step]))
    dense = {k: RATIO_STEPS[v] for k, v in setting.ratios if k not in conv_layers}
    conv = {k: RATIO_STEPS[v] for k, v in setting.ratios if k in conv_layers}
    if dense:
        passes.append(FoldingPass(ratio=dense, select=setting.select, repair="ls", seed=seed))
    if conv:
        passes.append(ChannelFoldingPass(ratio=conv, select=setting.select, repair="ls", seed=seed))
    return passes


@dataclass
class _Evaluator:
    """Turns a setting into a judged Candidate: run its passes (from the shared
    lossless start when there is one), compare with the original on the select
    split. Holds no search state, so a Ray task can run it."""

    original: onnx.ModelProto
    budget: Budget
    ctx: PassContext
    reference: dict
    lossless: tuple | None  # (model, layer reports, notes) after linearity folding at T = 1.0
    conv_layers: frozenset[str] = frozenset()

    def __call__(self, setting: Setting) -> Candidate:
        from .io import count_parameters

        ctx = self.ctx
        passes = passes_for(setting, seed=ctx.seed, conv_layers=self.conv_layers)
        if setting.lossless and self.lossless is not None:
            # every candidate starts with the same lossless step: reuse it
            start, prefix_layers, prefix_notes = self.lossless
            model, _, layers, notes = run_passes(start, passes[1:], ctx)
            layers = merge_layer_reports([replace(lr) for lr in prefix_layers], layers)
            notes = prefix_notes + notes
        else:
            model, _, layers, notes = run_passes(self.original, passes, ctx)
            if setting == Setting():
                self.lossless = (model, [replace(lr) for lr in layers], list(notes))
        # settings that change nothing more give the same model: judged once
        comp = ctx.cache.get_or_compute(("judged", model_digest(model)), lambda: self._compare(model)) \
            if ctx.cache is not None else self._compare(model)
        check = self.budget.check(comp)
        params = count_parameters(model)
        if self.budget.target_ratio is not None and not self.budget.has_quality_limit:
            # a pure target-ratio budget is judged on size at the end; the error
            # it minimises is measured against the default limits
            spent = Budget.default(self.budget.positive_threshold).check(comp).spent
            check = BudgetCheck(met=True, spent=spent, failures=[], confidence=self.budget.confidence)
        return Candidate(setting, model, params, check, layers, notes, comp.to_dict())

    def _compare(self, model: onnx.ModelProto):
        return compare_models(self.original, model, self.ctx.heldout, providers=self.ctx.providers,
                              batch_size=self.ctx.batch_size, positive_threshold=self.budget.positive_threshold,
                              original_outputs=self.reference)


class BudgetSearch:
    def __init__(self, original: onnx.ModelProto, budget: Budget, ctx: PassContext, *, max_evaluations: int = 60,
                 progress: Callable[[str, int, int], None] | None = None,
                 judge: Callable[[Setting], Candidate] | None = None):
        """``judge``: evaluates a setting instead of running passes and
        onnxruntime (tests drive the search's phases with a stub)."""
        from .io import count_parameters

        # statistics and decompositions shared by the candidates (see passes.cache)
        self.original, self.budget, self.ctx = original, budget, replace(ctx, cache=SearchCache())
        ctx = self.ctx
        self.max_evaluations = max_evaluations
        self.progress = progress
        self.cache: dict[Setting, Candidate] = {}
        self._lossless = None  # (model, layer reports, notes) after linearity folding at T = 1.0
        self.conv_layers: frozenset[str] = frozenset()  # conv chains among the searched layers (set by run)
        self.original_params = count_parameters(original)
        self._count_parameters = count_parameters
        self._judge = judge
        self.reference = None if judge is not None else reference_outputs(
            original, ctx.heldout, providers=ctx.providers, batch_size=ctx.batch_size)

    # ------------------------------------------------------------------
    def _evaluator(self, ctx: PassContext | None = None) -> "_Evaluator":
        return _Evaluator(self.original, self.budget, ctx or self.ctx, self.reference, self._lossless,
                          self.conv_layers)

    def _remember(self, setting: Setting, cand: Candidate) -> Candidate:
        self.cache[setting] = cand
        if self.progress:
            self.progress("budget search", len(self.cache), self.max_evaluations)
        return cand

    def evaluate(self, setting: Setting) -> Candidate:
        if setting in self.cache:
            return self.cache[setting]
        if self._judge is not None:
            return self._remember(setting, self._judge(setting))
        evaluator = self._evaluator()
        cand = evaluator(setting)
        if setting == Setting() and evaluator.lossless is not None:
            self._lossless = evaluator.lossless  # every later candidate starts from it
        return self._remember(setting, cand)

    def prefetch(self, settings: list[Setting]) -> None:
        """Evaluate, side by side, the settings a sequential walk over
        ``settings`` would evaluate next (the uncached ones, up to the
        evaluations left) when the statistics backend runs tasks (Ray); the
        results enter the cache in that order, so the search takes the same
        path as without. Each task measures in its own process, with its own
        (empty) SearchCache: the driver's is not shipped."""
        run_tasks = getattr(self.ctx.stats_backend, "map_tasks", None)
        todo = [s for s in dict.fromkeys(settings) if s not in self.cache]
        todo = todo[:max(0, self.max_evaluations - len(self.cache))]
        if run_tasks is None or len(todo) < 2 or getattr(self.ctx.calibration, "is_ray_dataset", False):
            return  # a Ray Dataset fit part: each candidate's statistics are Ray Data jobs run from here
        from .distributed import LocalStats

        task_ctx = replace(self.ctx, progress=None, stats_backend=LocalStats(), cache=SearchCache())
        for setting, cand in zip(todo, run_tasks(self._evaluator(task_ctx), todo)):
            self._remember(setting, cand)

    def _ratio_ok(self, c: Candidate) -> bool:
        return self.budget.target_ratio is None or c.parameters <= self.budget.target_ratio * self.original_params

    def _better(self, a: Candidate | None, b: Candidate) -> bool:
        """Is b a better final answer than a?"""
        if a is None:
            return True
        if self.budget.target_ratio is not None:
            ra, rb = self._ratio_ok(a), self._ratio_ok(b)
            if ra != rb:
                return rb
            if ra and rb:  # both reach the target: least error wins
                return (b.spent, b.parameters) < (a.spent, a.parameters)
        return (b.parameters, b.spent) < (a.parameters, a.spent)

    def _extend(self, before: Candidate, step: Candidate) -> Candidate:
        """``step`` moved one layer one notch and met the budget: push that
        same layer further by bisection while the budget still holds."""
        changed = [(k, v) for k, v in step.setting.ratios if before.setting.ratio_of(k) != v]
        kind = "ratio"
        if not changed:
            changed = [(k, v) for k, v in step.setting.thresholds if before.setting.threshold_of(k) != v]
            kind = "threshold"
        if not changed:
            return step
        layer, lo = changed[0]
        top = len(RATIO_STEPS) if kind == "ratio" else len(THRESHOLD_STEPS)
        hi, good = top, step
        while hi - lo > 1 and self._budget_left():
            mid = (lo + hi) // 2
            s = good.setting.with_ratio(layer, mid) if kind == "ratio" else good.setting.with_threshold(layer, mid)
            c = self.evaluate(s)
            if c.met and c.parameters < good.parameters:
                lo, good = mid, c
            else:
                hi = mid
        return good

    def _budget_left(self) -> bool:
        return len(self.cache) < self.max_evaluations

    # ------------------------------------------------------------------
    def run(self, layer_names: list[str], conv_layers: Sequence[str] = ()) -> SearchResult:
        """Search fold ratios over ``layer_names`` (dense hidden layers, which
        also get linearity thresholds) and ``conv_layers`` (conv chains, whose
        channels fold)."""
        from threadpoolctl import threadpool_limits

        self.conv_layers = frozenset(conv_layers)

        # Numpy's BLAS on one thread: the search's matrices (Grams, eigh, refits
        # of layers up to a few thousand wide) gain little from threads, and
        # threads waiting on cores busy with onnxruntime or another process
        # made an eigh 10-15x slower on a loaded 2-core machine.
        limit = 1 if self.original_params <= ONE_BLAS_THREAD_UP_TO else None
        with threadpool_limits(limits=limit, user_api="blas"):
            return self._run(list(layer_names), sorted(self.conv_layers))

    def _run(self, dense_names: list[str], conv_names: list[str]) -> SearchResult:
        notes: list[str] = []
        base = self.evaluate(Setting())
        # the select split's resolution: the same for every candidate, said once
        notes.extend(f"select split: {n}" for n in base.check.resolution_notes)
        best = base if base.met else None
        if not base.met:
            # the untouched original is no answer (it is what a failed search
            # returns anyway); only search the lossy settings without the lossless step
            notes.append("lossless linearity folding did not meet the budget on held-out data; "
                         "searching without it")

        # uniform settings: one value for every layer; the largest step that
        # meets the budget is found by bisection (quality falls with the step)
        uniform_best = best
        lossless = base.met
        layers = sorted(dense_names + conv_names)  # fold ratios
        dense = sorted(dense_names)  # linearity thresholds

        def uniform(kind: str, step: int, select: str = "kmeans") -> Setting:
            if kind == "ratio":
                return Setting(ratios=tuple((n, step) for n in layers), select=select, lossless=lossless)
            return Setting(thresholds=tuple((n, step) for n in dense), lossless=lossless)

        threshold_pays = False
        best_threshold_step = 0
        kinds = [("ratio", "kmeans", RATIO_STEPS), ("ratio", "magnitude", RATIO_STEPS)]
        if dense:
            kinds.append(("threshold", "kmeans", THRESHOLD_STEPS))
        for kind, select, steps in kinds:
            lo, hi = 0, len(steps)  # lo: largest step known to meet (0 = untouched), hi: smallest known to fail
            while hi - lo > 1 and self._budget_left():
                mid = (lo + hi) // 2
                c = self.evaluate(uniform(kind, mid, select))
                if c.met:
                    lo = mid
                    if kind == "threshold" and c.parameters < base.parameters:
                        threshold_pays, best_threshold_step = True, mid
                    if self._better(uniform_best, c):
                        uniform_best = c
                else:
                    hi = mid
        best = uniform_best

        # per-layer greedy from the best uniform point
        current = best
        while current is not None and self._budget_left():
            if self.budget.target_ratio is not None and self._ratio_ok(current) and not self.budget.has_quality_limit:
                break
            moves = []
            for layer in layers:
                r = current.setting.ratio_of(layer)
                if r + 1 < len(RATIO_STEPS):
                    moves.append(current.setting.with_ratio(layer, r + 1))
                # thresholds: one move per layer, straight to the lowest uniform
                # threshold that met the budget (small steps rarely change anything)
                if threshold_pays and layer in dense and current.setting.threshold_of(layer) < best_threshold_step:
                    moves.append(current.setting.with_threshold(layer, best_threshold_step))
            self.prefetch(moves)  # independent candidates: Ray tasks when the backend has them
            scored = []
            for s in moves:
                if not self._budget_left():
                    break
                c = self.evaluate(s)
                saved = current.parameters - c.parameters
                if not c.met or saved <= 0:
                    continue
                cost = max(c.spent - current.spent, 1e-3)
                scored.append((saved / cost, -c.parameters, c))
            if not scored:
                break
            scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
            current = self._extend(current, scored[0][2])
            if self._better(best, current):
                best = current

        if best is not None and self.budget.target_ratio is not None and not self._ratio_ok(best):
            notes.append(f"target ratio {self.budget.target_ratio} not reached within the budget "
                         f"(best {best.parameters / self.original_params:.3f})")
            best = None
        evaluated = [dict(setting=c.setting.describe(), parameters=c.parameters,
                          parameter_ratio=c.parameters / self.original_params, spent=c.spent, met=c.met)
                     for c in self.cache.values()]
        return SearchResult(best=best, baseline_uniform=uniform_best, lossless=base, evaluated=evaluated, notes=notes)
