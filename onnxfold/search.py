"""Budget-driven search: the smallest model that meets the user's budget.

Candidates are *settings* - a step per (group, knob) over every foldable
group of the model (``find.groups``: dense chains get a linearity threshold
and a fold ratio, conv chains and gated MLPs a fold ratio, attention blocks a
head count, residual streams a fold ratio when asked for), plus one selection
method (k-means, magnitude, or Optimal Brain Surgeon on the dense, gated and
attention groups: ``OBS_KINDS``) - turned into a model by running the passes on the original, and
judged on the *select* split against the budget. The search never looks at
the final evaluation data.

1. Lossless first: linearity folding at T = 1.0 (constant and exactly linear
   neurons). If even that fails on held-out data, start from the original.
2. Uniform settings (one step of one knob for every group that has it: one
   fold ratio, one head count, one threshold): per knob, the largest step
   that meets the budget, by bisection that probes the least aggressive step
   first (:func:`sweep_probe`). The best of these is the baseline the
   per-group search must beat, and its starting point.
3. Per-group greedy: from the best uniform setting, try one step further for
   each group and knob (next fold ratio, next head count, the lowest uniform
   threshold that met the budget); take the step that saves the most
   parameters per unit of budget spent; repeat until no step meets the
   budget (or, for a target ratio, until the ratio is reached).

Every evaluated setting is cached with its metrics, not its model: the search
keeps the models of the lossless start, the leading candidate and the last
one evaluated, and rebuilds any other (deterministically, for its seed) when
asked for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import onnx

from .decide.budget import Budget, BudgetCheck
from .find.groups import KNOB_ORDER, RATIO_STEPS, THRESHOLD_STEPS, FoldableGroups, Group, find_groups
from .passes.base import LayerReport, PassContext
from .passes.cache import SearchCache, model_digest
from .pipeline import merge_layer_reports, run_passes
from .runtime import SessionCache, reusing_sessions
from .measure.stream import needed_nodes, stream_tensors
from .measure.suffix import TensorMemo, cut_tensors, suffix_part
from .verify import compare_models, largest_magnitude, reference_outputs

__all__ = ["RATIO_STEPS", "THRESHOLD_STEPS", "SELECTS", "BudgetSearch", "Candidate", "SearchResult", "Setting",
           "describe", "passes_for"]

SELECTS = ("kmeans", "magnitude", "obs")
#: a candidate is judged from the tensors it shares with the lossless start when at most this share of
#: its nodes is left to run (recording them costs one run of the shared part)
SUFFIX_AT_MOST = 0.75
#: recordings on the select split a search keeps (one per place where candidates start to differ)
JUDGE_RECORDINGS = 8
#: group kinds "obs" selects in (it needs readers taking the units as their input's last axis:
#: passes.foldcore); a sweep or move with it leaves the other kinds (conv channels) where they are
OBS_KINDS = ("neuron", "gated", "head")
#: selections whose uniform sweeps run after every other knob's
LATE_SELECTS = ("obs",)
#: knobs the selection method acts on: their uniform phase runs once per method
SELECTING_KNOBS = ("ratio", "heads")
#: knobs the greedy phase moves straight to the lowest uniform step that met the
#: budget and saved parameters (one small threshold step rarely changes anything)
JUMP_KNOBS = ("threshold",)
#: how each knob's values appear in a described setting (the report's search.chosen)
DESCRIBED_AS = {"threshold": "linear_thresholds", "ratio": "fold_ratios", "heads": "heads_kept"}
#: models up to this many parameters are searched with one BLAS thread (see BudgetSearch.run)
ONE_BLAS_THREAD_UP_TO = 64_000_000


@dataclass(frozen=True)
class Setting:
    """One candidate: ``steps`` holds (group, knob, step) for every knob moved
    off step 0 (untouched), sorted; a step indexes the values the group's knob
    declares (``find.groups.Group.knobs``)."""

    steps: tuple[tuple[str, str, int], ...] = ()
    select: str = "kmeans"
    lossless: bool = True  # run linearity folding at T = 1.0 first

    @classmethod
    def of(cls, steps: Mapping[tuple[str, str], int], *, select: str = "kmeans", lossless: bool = True) -> "Setting":
        return cls(tuple(sorted((g, k, int(s)) for (g, k), s in steps.items() if s)), select, lossless)

    def step(self, group: str, knob: str) -> int:
        return next((s for g, k, s in self.steps if g == group and k == knob), 0)

    def with_step(self, group: str, knob: str, step: int) -> "Setting":
        d = {(g, k): s for g, k, s in self.steps}
        d[(group, knob)] = step
        return Setting.of(d, select=self.select, lossless=self.lossless)


def _selects_in(select: str, group: Group) -> bool:
    """Whether a setting with this selection may move ``group``'s knobs."""
    return select != "obs" or group.kind in OBS_KINDS


def sweep_probe(lo: int, hi: int) -> int:
    """The next step a uniform sweep evaluates, given the largest step known to
    meet the budget (``lo``) and the smallest known to fail (``hi``).

    Bisection, except that a sweep's first probe is its least aggressive step:
    a failing candidate costs as much to build and judge as a meeting one, and
    a sweep that cannot meet the budget at all (on the shipped models, most
    sweeps of fold ratios and head counts under the default budget) is then
    settled by one candidate instead of log2(steps). A sweep whose first step
    meets pays one candidate more than plain bisection. Under the search's
    premise that quality falls with the step, both find the same step."""
    return 1 if lo == 0 else (lo + hi) // 2


def _values(setting: Setting, groups: Mapping[str, Group]) -> Iterable[tuple[Group, str, object]]:
    """(group, knob, value) for every moved knob of ``setting``."""
    for name, knob, step in setting.steps:
        g = groups[name]
        yield g, knob, g.knobs[knob][step]


def describe(setting: Setting, groups: Mapping[str, Group]) -> dict:
    """A setting as the report shows it: each knob's values by group name."""
    out = {"lossless_linearity": setting.lossless, **{key: {} for key in DESCRIBED_AS.values()}}
    for g, knob, value in _values(setting, groups):
        out[DESCRIBED_AS[knob]][g.name] = value
    out["fold_select"] = setting.select
    return out


def passes_for(setting: Setting, groups: Mapping[str, Group], *, seed: int) -> list:
    """The passes a setting stands for, in order: linearity folding (T = 1.0,
    then each lower threshold on its layers), heads, gated MLPs, dense
    neurons, conv channels (residual streams first, inside the pass)."""
    from .passes.channel_folding import ChannelFoldingPass
    from .passes.folding import FoldingPass
    from .passes.head_folding import GatedFoldingPass, HeadFoldingPass
    from .passes.linearity import LinearityPass

    by_threshold: dict[float, set[str]] = {}
    ratios: dict[str, dict[str, float]] = {}
    heads: dict[str, int] = {}
    for g, knob, value in _values(setting, groups):
        if knob == "threshold":
            by_threshold.setdefault(value, set()).add(g.name)
        elif knob == "heads":
            heads[g.name] = int(value)
        else:
            ratios.setdefault(g.kind, {})[g.name] = value
    passes = [LinearityPass(threshold=1.0)] if setting.lossless else []
    passes += [LinearityPass(threshold=t, layers=by_threshold[t]) for t in sorted(by_threshold, reverse=True)]
    if heads:
        # no repair: the medoid merge needs none, and an o-projection refit only
        # generalises as far as the calibration data's input lengths (HeadFoldingPass)
        passes.append(HeadFoldingPass(heads=heads, select=setting.select, seed=seed))
    if ratios.get("gated"):
        passes.append(GatedFoldingPass(ratio=ratios["gated"], select=setting.select, seed=seed))
    if ratios.get("neuron"):
        passes.append(FoldingPass(ratio=ratios["neuron"], select=setting.select, repair="ls", seed=seed))
    conv = {**ratios.get("residual", {}), **ratios.get("channel", {})}
    if conv:
        passes.append(ChannelFoldingPass(ratio=conv, select=setting.select, repair="ls", seed=seed,
                                         fold_residual=bool(ratios.get("residual"))))
    return passes


@dataclass
class Candidate:
    setting: Setting
    model: onnx.ModelProto | None  # None in the search's cache (see BudgetSearch.model_for)
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
    best: Candidate | None  # None: nothing met the budget; else with its model
    baseline_uniform: Candidate | None  # best single fixed setting found (metrics only)
    lossless: Candidate | None  # linearity folding at T = 1.0 alone (exact on the calibration data), with its model
    evaluated: list[dict] = field(default_factory=list)  # (setting, params, spent, met, judged_samples): report/plot
    notes: list[str] = field(default_factory=list)
    chosen: dict | None = None  # the best setting, described
    best_uniform: dict | None = None


@dataclass
class _Evaluator:
    """Turns a setting into a judged Candidate (with its model): run its
    passes (from the shared lossless start when there is one), compare with
    the original on the select split. Holds no search state, so a Ray task
    can run it."""

    original: onnx.ModelProto
    budget: Budget
    ctx: PassContext
    reference: dict
    lossless: tuple | None  # (model, layer reports, notes) after linearity folding at T = 1.0
    groups: Mapping[str, Group]
    select_split: Any  # the CalibrationSet candidates are judged on (never seen by the passes)
    #: the tensors of the lossless start (or the original) recorded on the select split, from which a
    #: candidate is run only after what it shares with them (None: every candidate runs in full)
    judge_memo: TensorMemo | None = None
    #: what the reference gives per batch of the select split (verify.compare_models' reference_memo)
    reference_memo: dict | None = None
    #: each output's largest absolute reference value on the whole select split (Budget.settled_failure)
    reference_scales: dict | None = None

    def build(self, setting: Setting) -> tuple[onnx.ModelProto, list[LayerReport], list[str]]:
        """The model a setting stands for, with its layer reports and notes."""
        passes = passes_for(setting, self.groups, seed=self.ctx.seed)
        if setting.lossless and self.lossless is not None:
            # every candidate starts with the same lossless step: reuse it
            start, prefix_layers, prefix_notes = self.lossless
            model, _, layers, notes = run_passes(start, passes[1:], self.ctx)
            return model, merge_layer_reports([replace(lr) for lr in prefix_layers], layers), prefix_notes + notes
        model, _, layers, notes = run_passes(self.original, passes, self.ctx)
        if setting == Setting():
            self.lossless = (model, [replace(lr) for lr in layers], list(notes))
        return model, layers, notes

    def __call__(self, setting: Setting) -> Candidate:
        from .io import count_parameters

        ctx = self.ctx
        model, layers, notes = self.build(setting)
        # settings that change nothing more give the same model: judged once
        comp = ctx.cache.get_or_compute(("judged", model_digest(model)), lambda: self._compare(model)) \
            if ctx.cache is not None else self._compare(model)
        # judged on part of the split only when the rest could not have saved it
        check = self.budget.settled_failure(comp, self.select_split.num_samples, self.reference_scales) \
            or self.budget.check(comp)
        params = count_parameters(model)
        if self.budget.target_ratio is not None and not self.budget.has_quality_limit:
            # a pure target-ratio budget is judged on size at the end; the error
            # it minimises is measured against the default limits
            spent = Budget.default(self.budget.positive_threshold).check(comp).spent
            check = BudgetCheck(met=True, spent=spent, failures=[], confidence=self.budget.confidence)
        return Candidate(setting, model, params, check, layers, notes, comp.to_dict())

    def _compare(self, model: onnx.ModelProto):
        total = self.select_split.num_samples
        # a candidate whose failure the first batches settle is not run on the rest (its
        # onnxruntime time, mostly): the decision is the same, only its reported spent is a lower bound
        scales = self.reference_scales
        stop = (lambda partial: self.budget.settled_failure(partial, total, scales) is not None) \
            if self.budget.has_quality_limit else None
        return compare_models(self.original, model, self.select_split, providers=self.ctx.providers,
                              batch_size=self.ctx.batch_size, positive_threshold=self.budget.positive_threshold,
                              original_outputs=self.reference, candidate_outputs=self._suffix_outputs(model),
                              reference_memo=self.reference_memo, stop=stop,
                              perplexity=self.budget.max_perplexity_increase is not None)

    def _suffix_outputs(self, model: onnx.ModelProto):
        """The candidate's outputs on the select split, batch by batch, run from
        the tensors it shares with the model every candidate starts from (the
        lossless start, else the original), recorded on the select split the
        first time a candidate cuts there; None (run it in full) when there is
        no memo, or it shares too little for the suffix to pay."""
        memo = self.judge_memo
        if memo is None or not all(o.type.HasField("tensor_type") for o in model.graph.output) \
                or not memo.usable(model, [o.name for o in model.graph.output]):
            return None
        ctx, data, names = self.ctx, self.select_split, [o.name for o in model.graph.output]
        key = memo.key(data, ctx.batch_size, ctx.providers, 0)
        plan = memo.plan(key, model, names)
        if plan.recording is None or plan.nodes > SUFFIX_AT_MOST * plan.full_nodes:
            base = self.lossless[0] if self.lossless is not None else self.original
            cut = cut_tensors(model, base)
            if not cut or len(needed_nodes(model, names, cut)) > SUFFIX_AT_MOST * plan.full_nodes:
                return None
            memo.record(key, base, [{n: t[n] for n in cut} for _f, _l, t in stream_tensors(
                suffix_part(base, cut, {}), cut, data, batch_size=ctx.batch_size, providers=ctx.providers)])
            plan = memo.plan(key, model, names)
            if plan.recording is None or plan.nodes > SUFFIX_AT_MOST * plan.full_nodes:
                return None  # too large to keep
        leaves = list(plan.leaf_batches())
        if plan.nodes == 0:
            return iter(leaves)
        stream = stream_tensors(suffix_part(model, names, plan.leaves), names, data, batch_size=ctx.batch_size,
                                providers=ctx.providers, extra_feeds=leaves)
        return ({n: t[n] for n in names} for _f, _l, t in stream)


class BudgetSearch:
    def __init__(self, original: onnx.ModelProto, budget: Budget, ctx: PassContext, *,
                 groups: FoldableGroups | Sequence[Group] | None = None, max_evaluations: int = 60,
                 progress: Callable[[str, int, int], None] | None = None,
                 judge: Callable[[Setting], Candidate] | None = None):
        """``groups``: the model's foldable groups (``find.groups.find_groups``,
        found here when not given). ``judge``: evaluates a setting instead of
        running passes and onnxruntime (tests drive the search's phases with a stub)."""
        from .io import count_parameters

        # Candidates are judged on the select split (the context's held-out
        # set). The passes must never see it: a ridge strength or threshold
        # chosen on the split that then judges the result makes every
        # candidate look better there than on fresh data, and the final check
        # rejects the winner. The passes hold out a share of the fit split
        # instead. Statistics and decompositions are shared by the candidates
        # (see passes.cache).
        self.select_split = ctx.heldout
        self.original, self.budget = original, budget
        # the memos of streamed activations are as large as the caller's (RuntimeOptions.memo_mib)
        self.memo_bytes = ctx.streams.max_bytes if ctx.streams is not None else None
        self.ctx = ctx = replace(ctx, cache=SearchCache(memo_bytes=self.memo_bytes), heldout=None)
        if groups is None:
            groups = find_groups(original)
        found = groups.groups if isinstance(groups, FoldableGroups) else list(groups)
        self.groups: dict[str, Group] = {g.name: g for g in found}
        self.max_evaluations = max_evaluations
        self.progress = progress
        self.cache: dict[Setting, Candidate] = {}  # metrics only: no models
        self._lossless = None  # (model, layer reports, notes) after linearity folding at T = 1.0
        self._lead: tuple[Candidate, onnx.ModelProto] | None = None  # the best met candidate so far, with its model
        self._last: tuple[Setting, onnx.ModelProto] | None = None  # the last candidate evaluated, with its model
        self.original_params = count_parameters(original)
        self._judge = judge
        # onnxruntime sessions reused for identical model parts: the original's
        # part behind a refit's targets, parts upstream of what a candidate changes
        self.sessions = SessionCache()
        self.judge_memo = TensorMemo(max_bytes=self.memo_bytes, max_recordings=JUDGE_RECORDINGS)
        self.reference_memo: dict = {}
        self.reference = None if judge is not None else reference_outputs(
            original, self.select_split, providers=ctx.providers, batch_size=ctx.batch_size)
        self.reference_scales = None if self.reference is None else {
            name: largest_magnitude(values) for name, values in self.reference.items()}

    # ------------------------------------------------------------------
    def _evaluator(self, ctx: PassContext | None = None) -> "_Evaluator":
        local = ctx is None  # a Ray task gets no memos: they would be shipped with it
        return _Evaluator(self.original, self.budget, ctx or self.ctx, self.reference, self._lossless, self.groups,
                          self.select_split, judge_memo=self.judge_memo if local else None,
                          reference_memo=self.reference_memo if local else None,
                          reference_scales=self.reference_scales)

    def describe(self, setting: Setting) -> dict:
        return describe(setting, self.groups)

    def _remember(self, setting: Setting, cand: Candidate) -> Candidate:
        """Cache the candidate's metrics; keep its model only while it leads."""
        model, cand = cand.model, replace(cand, model=None)
        self.cache[setting] = cand
        self._last = (setting, model)
        if cand.met and model is not None and (self._lead is None or self._better(self._lead[0], cand)):
            self._lead = (cand, model)
        if self.progress:
            self.progress("budget search", len(self.cache), self.max_evaluations)
        return cand

    def evaluate(self, setting: Setting) -> Candidate:
        """The judged candidate of ``setting`` (metrics; its model: ``model_for``)."""
        if setting in self.cache:
            return self.cache[setting]
        if self._judge is not None:
            return self._remember(setting, self._judge(setting))
        evaluator = self._evaluator()
        with reusing_sessions(self.sessions):
            cand = evaluator(setting)
        if setting == Setting() and evaluator.lossless is not None:
            self._lossless = evaluator.lossless  # every later candidate starts from it
        return self._remember(setting, cand)

    def model_for(self, cand: Candidate) -> onnx.ModelProto | None:
        """The model of an evaluated candidate: kept if it is the lossless
        start, the leading or the last one, else built again from its setting
        (the passes are deterministic for the seed; the shared statistics
        cache makes the rebuild cheap)."""
        s = cand.setting
        if self._judge is not None:
            return cand.model
        if self._lead is not None and self._lead[0].setting == s:
            return self._lead[1]
        if self._last is not None and self._last[0] == s:
            return self._last[1]
        if s == Setting() and self._lossless is not None:
            return self._lossless[0]
        with reusing_sessions(self.sessions):
            return self._evaluator().build(s)[0]

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

        task_ctx = replace(self.ctx, progress=None, stats_backend=LocalStats(),
                           cache=SearchCache(memo_bytes=self.memo_bytes))
        shown = lambda done, total: self.ctx.report_progress("budget search: candidates on Ray", done, total)  # noqa: E731
        for setting, cand in zip(todo, run_tasks(self._evaluator(task_ctx), todo, progress=shown)):
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
        """``step`` moved one group's knob one notch and met the budget: push
        that same knob further by bisection while the budget still holds."""
        changed = [(g, k, s) for g, k, s in step.setting.steps if before.setting.step(g, k) != s]
        if not changed:
            return step
        group, knob, lo = changed[0]
        hi, good = len(self.groups[group].knobs[knob]), step
        while hi - lo > 1 and self._budget_left():
            mid = (lo + hi) // 2
            c = self.evaluate(good.setting.with_step(group, knob, mid))
            if c.met and c.parameters < good.parameters:
                lo, good = mid, c
            else:
                hi = mid
        return good

    def _budget_left(self) -> bool:
        return len(self.cache) < self.max_evaluations

    # ------------------------------------------------------------------
    def run(self, names: Sequence[str] | None = None) -> SearchResult:
        """Search every searchable group (or those among ``names``)."""
        from threadpoolctl import threadpool_limits

        groups = [g for _, g in sorted(self.groups.items())
                  if g.searchable and (names is None or g.name in names)]
        # Numpy's BLAS on one thread: the search's matrices (Grams, eigh, refits
        # of layers up to a few thousand wide) gain little from threads, and
        # threads waiting on cores busy with onnxruntime or another process
        # made an eigh 10-15x slower on a loaded 2-core machine.
        limit = 1 if self.original_params <= ONE_BLAS_THREAD_UP_TO else None
        try:
            with threadpool_limits(limits=limit, user_api="blas"), reusing_sessions(self.sessions):
                return self._run(groups)
        finally:
            self.sessions.clear()  # their memory goes back once the search is done

    def _uniform(self, groups: list[Group], base: Candidate) -> tuple[Candidate | None, dict[str, int]]:
        """Phase 2: for each knob (and selection method where it acts), the
        largest step that meets the budget for every group at once, by
        bisection (quality falls with the step). Returns the best such
        candidate and, per jump knob, the lowest uniform step that met the
        budget and saved parameters."""
        best = base if base.met else None
        lossless = base.met
        knobs = [k for k in KNOB_ORDER if any(k in g.knobs for g in groups)]
        # obs sweeps last: it streams a covariance per group, and under a small --max-evaluations the
        # other knobs (thresholds) come first, as they did before it existed
        early = [s for s in SELECTS if s not in LATE_SELECTS]
        sweeps = [(k, s) for k in knobs if k in SELECTING_KNOBS for s in early] + \
            [(k, SELECTS[0]) for k in knobs if k not in SELECTING_KNOBS] + \
            [(k, s) for s in LATE_SELECTS for k in knobs if k in SELECTING_KNOBS]
        jump_to: dict[str, int] = {}
        for knob, select in sweeps:
            having = [g for g in groups if knob in g.knobs and _selects_in(select, g)]
            if not having:
                continue

            def uniform(step: int) -> Setting:
                return Setting.of({(g.name, knob): min(step, len(g.knobs[knob]) - 1) for g in having},
                                  select=select, lossless=lossless)

            lo, hi = 0, max(len(g.knobs[knob]) for g in having)  # lo: largest step known to meet, hi: smallest to fail
            while hi - lo > 1 and self._budget_left():
                mid = sweep_probe(lo, hi)
                c = self.evaluate(uniform(mid))
                if c.met:
                    lo = mid
                    if knob in JUMP_KNOBS and c.parameters < base.parameters:
                        jump_to[knob] = mid
                    if self._better(best, c):
                        best = c
                else:
                    hi = mid
        return best, jump_to

    def _moves(self, groups: list[Group], current: Setting, jump_to: dict[str, int]) -> list[Setting]:
        """Phase 3's candidates: one step further for each group and knob."""
        moves = []
        for g in groups:
            if not _selects_in(current.select, g):
                continue
            for knob in (k for k in KNOB_ORDER if k in g.knobs):
                step = current.step(g.name, knob)
                if knob in JUMP_KNOBS:
                    if knob in jump_to and step < jump_to[knob]:
                        moves.append(current.with_step(g.name, knob, jump_to[knob]))
                elif step + 1 < len(g.knobs[knob]):
                    moves.append(current.with_step(g.name, knob, step + 1))
        return moves

    def _run(self, groups: list[Group]) -> SearchResult:
        notes: list[str] = []
        base = self.evaluate(Setting())
        # the select split's resolution: the same for every candidate, said once
        notes.extend(f"select split: {n}" for n in base.check.resolution_notes)
        if not base.met:
            # the untouched original is no answer (it is what a failed search
            # returns anyway); only search the lossy settings without the lossless step
            notes.append("lossless linearity folding did not meet the budget on held-out data; "
                         "searching without it")
        uniform_best, jump_to = self._uniform(groups, base)
        best = current = uniform_best
        while current is not None and self._budget_left():
            if self.budget.target_ratio is not None and self._ratio_ok(current) and not self.budget.has_quality_limit:
                break
            moves = self._moves(groups, current.setting, jump_to)
            self.prefetch(moves)  # independent candidates: Ray tasks when the backend has them
            scored = []
            for s in moves:
                if s not in self.cache and not self._budget_left():  # prefetched candidates cost nothing more
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
        # judged_samples: fewer than the select split's where the failure was settled early, and
        # spent is then a lower bound (Budget.settled_failure)
        evaluated = [dict(setting=self.describe(c.setting), parameters=c.parameters,
                          parameter_ratio=c.parameters / self.original_params, spent=c.spent, met=c.met,
                          judged_samples=c.comparison.get("samples"))
                     for c in self.cache.values()]
        return SearchResult(
            best=None if best is None else replace(best, model=self.model_for(best)),
            baseline_uniform=uniform_best, lossless=replace(base, model=self.model_for(base)),
            evaluated=evaluated, notes=notes,
            chosen=None if best is None else self.describe(best.setting),
            best_uniform=None if uniform_best is None else self.describe(uniform_best.setting))
