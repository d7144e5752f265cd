"""The folding core: one group's units selected, merged, repaired and refit.

Every folding pass (dense chains, conv chains and residual streams, gated
MLPs, attention heads) hands the core :class:`~onnxfold.passes.units.UnitGroup`
s; the steps are the same for all of them:

1. **measure** (REPAIR, dropping constant units): per-unit moments of the
   producers' outputs, on the current model and the original;
2. **select**: k-means clusters of units (``select="kmeans"``), the k units
   with the largest rows (``select="magnitude"``: pruning) or the k units
   whose removal costs the readers' refit output least on the data
   (``select="obs"``: pruning by Optimal Brain Surgeon) → labels
   (-1: removed) → ``decide.cluster_maps``: row map (cluster means) and
   column map (cluster sums);
3. **repair** the merged rows: none; ``ar`` (Fold-AR, data-free variance
   factor per cluster); ``repair`` (REPAIR: mean/std of each merged unit
   matched to its cluster's original ones);
4. **rewrite**: every member's handler merges its rows or sums its columns;
5. ``ls``: each consumer is refit by :class:`~onnxfold.passes.refit.RefitEngine`.

Heads keep their own merge (medoid q/k, rank-d v/o: ``decide/heads.py``)
and use steps 2 and 5 only. Method: ``docs/methods.md`` sections 2-3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..decide import folding as decide
from ..errors import UsageError
from ..find.activations import ActivationSpec
from ..measure.stats import GramAccumulator, NeuronStats, RowChunks
from ..measure.stream import needed_part
from .base import PassContext
from .cache import cached, model_digest
from .handlers import RowSource, last_axis_rows, output_rows
from .refit import FoldState, RefitEngine, RefitOutcome, lockstep_job
from .units import Member, UnitGroup


@dataclass
class FoldPlan:
    """What happens to one group's units (indices into its current width)."""

    labels: np.ndarray  # cluster per unit, -1 = removed (constant or pruned)
    removed: int = 0  # units removed before selection (constant on the data)
    merged: int = 0
    pruned: int = 0

    @property
    def width_after(self) -> int:
        return int(self.labels.max()) + 1


@dataclass
class Moments:
    """Per-unit statistics of one producer's output over the calibration data."""

    current: GramAccumulator | None = None  # the current model's: mean and covariance (REPAIR)
    target: NeuronStats | None = None  # the original model's (REPAIR)
    constant: NeuronStats | None = None  # the current model's, with the activation's pieces


class FoldCore:
    """The steps above for one pass run over one model (``state``)."""

    def __init__(self, state: FoldState, ctx: PassContext, *, select: str, repair: str, seed: int):
        self.state = state
        self.ctx = ctx
        self.select = select
        self.repair = repair
        self.seed = seed
        self.refits = RefitEngine(state, ctx, seed)
        #: output tensor of a producer whose rows were merged → its row map:
        #: a later refit of that op aims at the merged original output
        self.out_maps: dict[str, np.ndarray] = {}
        #: k-means answers computed ahead as tasks (prefetch_clusters), by their problem
        self.prefetched: dict[tuple, np.ndarray] = {}
        #: in a budget search, what the current model is a function of (the pass's input, settings and
        #: steps so far), when the pass can name it: a cheaper key than the bytes of the model's part
        self.model_scope: Callable[[], Hashable] | None = None

    # -- 0. clusterings ahead, side by side --------------------------------------
    def prefetch_clusters(self, groups: list[tuple[UnitGroup, int]], task: str = "clustering") -> int:
        """Cluster ``(group, k)`` s ahead of :meth:`plan`, as tasks on the
        statistics backend when it runs tasks (Ray): k-means problems that
        depend on nothing measured, so independent groups (the blocks of a
        transformer) cluster side by side. The answers are kept by their
        problem (the features' bytes, k, seed): :meth:`plan` uses one only if
        its group still has exactly those features when its turn comes (an
        earlier group's rewrite changed nothing there), so the result is the
        one-by-one result. Returns the problems sent; progress is reported as
        ``task``. Not for a Ray Dataset fit part, whose Ray Data jobs need the
        CPUs a task pool would hold."""
        run = getattr(self.ctx.stats_backend, "map_tasks", None)
        if run is None or self.select != "kmeans" or getattr(self.ctx.calibration, "is_ray_dataset", False):
            return 0
        problems = []
        for group, k in groups:
            if group.parts is not None:
                per = max(1, k // len(group.parts))
                asked = [(np.asarray(p, dtype=np.int64), per) for p in group.parts if len(p) > per]
            else:
                asked = [(None, k)] if group.width > k else []
            for units, kk in asked:
                feats = group.kmeans_features(self.seed, units)
                if feats is not None and not decide.kmeans_known(feats, kk, self.seed):  # known: answered here at once
                    problems.append((np.ascontiguousarray(feats, dtype=np.float64), kk))
        problems = list({decide.kmeans_key(f, k, self.seed): (f, k) for f, k in problems}.items())
        if len(problems) < 2:
            return 0  # one problem: no side by side to gain, only the shipping
        answers = run(partial(_kmeans_task, seed=self.seed), [p for _, p in problems],
                      progress=lambda done, total: self.ctx.report_progress(task, done, total))
        self.prefetched.update(zip((key for key, _ in problems), answers))
        return len(problems)

    def _kmeans(self, features: np.ndarray, k: int, seed: int) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float64)
        known = self.prefetched.pop(decide.kmeans_key(features, k, seed), None) if self.prefetched else None
        if known is None:
            return decide.kmeans_labels(features, k, seed=seed)
        decide.remember_kmeans(features, k, seed, known)  # as if computed here: later candidates ask again
        return known.copy()

    # -- 1. measure ----------------------------------------------------------
    def measure(self, group: UnitGroup, what: str, constants: ActivationSpec | None = None) -> dict[str, Moments]:
        """One streamed run: moments of every producer's output, by tensor.
        REPAIR's when ``repair == "repair"``; with ``constants`` (the group's
        activation), the current output's piece statistics too."""
        repair = self.repair == "repair"
        outs = {m.op.output: (m.op.dtype, m.handler.channels_first) for m in group.producers}
        current = {t: dt for t, (dt, _) in outs.items()}
        job = lockstep_job(self.state, current, current if repair else {},
                           partial(_new_moments, group.width, list(outs), repair, constants),
                           partial(_add_moments, {t: cf for t, (_, cf) in outs.items()}, repair, constants is not None),
                           self.ctx.cache)
        accs = self.ctx.measure(job, self.ctx.calibration, f"{what}: measuring")
        return {t: Moments(accs.get("current:" + t), accs.get("target:" + t), accs.get("constant:" + t))
                for t in outs}

    # -- 2. select -----------------------------------------------------------
    def plan(self, group: UnitGroup, k: int, removed: np.ndarray | None = None) -> FoldPlan:
        """Labels leaving at most ``k`` units besides the ``removed`` ones
        (a group with parts: see :meth:`plan_parts`)."""
        if group.parts is not None:
            return self.plan_parts(group, k)
        n = group.width
        removed = np.zeros(0, np.int64) if removed is None else np.asarray(removed, dtype=np.int64)
        rest = np.setdiff1d(np.arange(n), removed)
        labels = np.full(n, -1, dtype=np.int64)
        if rest.size <= k:
            labels[rest] = np.arange(rest.size)
            return FoldPlan(labels, int(removed.size))
        units = None if rest.size == n else rest
        if self.select == "kmeans":
            labels[rest] = group.cluster(k, self.seed, units, kmeans=self._kmeans)
            return FoldPlan(labels, int(removed.size), merged=int(rest.size - labels.max() - 1))
        kept = rest[self._obs_keep(group, k, rest) if self.select == "obs" else
                    decide.magnitude_keep(group.magnitude_rows(units), k)]
        labels[kept] = np.arange(kept.size)
        return FoldPlan(labels, int(removed.size), pruned=int(rest.size - kept.size))

    def plan_parts(self, group: UnitGroup, k: int) -> FoldPlan:
        """Labels leaving ``k // parts`` units in every part of the group
        (parts of equal size), clusters numbered part by part: k-means may
        find fewer distinct units than that in a part, whose clusters are then
        split to keep the count (duplicates kept apart stay exact)."""
        per = max(1, k // len(group.parts))
        labels = np.full(group.width, -1, dtype=np.int64)
        merged = pruned = 0
        obs_kept = self._obs_keep(group, per * len(group.parts), None, parts=group.parts) \
            if self.select == "obs" else None
        for i, part in enumerate(group.parts):
            part = np.asarray(part, dtype=np.int64)
            if part.size <= per:
                local = np.arange(part.size)
            elif self.select == "kmeans":
                local = decide.split_clusters(group.cluster(per, self.seed, part, kmeans=self._kmeans), per)
                merged += part.size - per
            elif obs_kept is not None:
                mine = np.flatnonzero(np.isin(part, obs_kept))
                local = np.full(part.size, -1, dtype=np.int64)
                local[mine] = np.arange(mine.size)
                pruned += part.size - per
            else:
                local = np.full(part.size, -1, dtype=np.int64)
                local[decide.magnitude_keep(group.magnitude_rows(part), per)] = np.arange(per)
                pruned += part.size - per
            labels[part] = np.where(local >= 0, local + i * per, -1)
        return FoldPlan(labels, 0, merged=merged, pruned=pruned)

    def _obs_keep(self, group: UnitGroup, k: int, units: np.ndarray | None, parts=None) -> np.ndarray:
        """Positions (into ``units``, or unit indices when None) of the ``k``
        units :func:`decide.obs_keep` keeps, from the covariance of the
        readers' input on the current model (one streamed run; in a budget
        search shared by the candidates that compute that input alike)."""
        # the readers that are refit; a linear path reading the units (linearity folding) keeps the plain fold
        readers = [m for m in group.consumers if m.source is not None]
        if self.ctx.calibration is None:
            raise UsageError(f"{group.name}: selection 'obs' needs calibration data (it measures what each unit "
                             "carries); give calibration data or use 'kmeans' or 'magnitude'")
        source, unit = (readers[0].source, readers[0].unit) if readers else (None, 1)
        weights = [m.handler.prior(m.op)[0] for m in readers]
        if not readers or any(m.source.tensor != source.tensor or m.unit != unit or m.handler.channels_first
                              for m in readers) or any(w.shape[1] != group.width * unit for w in weights):
            raise UsageError(f"{group.name}: selection 'obs' needs readers that take the units as their input's "
                             "last axis (dense, gated MLP and attention readers; not convolutions); use 'kmeans' "
                             "or 'magnitude' for this model")
        cov_key = self._covariance_key(source)
        cov = cached(self.ctx.cache, cov_key,
                     lambda: self._input_covariance(source, f"{group.name}: measuring what each unit carries"))
        cols = np.arange(group.width * unit).reshape(group.width, unit)
        pick = cols if units is None else cols[units]
        flat = pick.reshape(-1)
        weight = np.vstack(weights)[:, flat]
        if parts is not None:  # the quota per part depends on k: no path shared across k
            return decide.obs_keep(cov[np.ix_(flat, flat)], weight, k, unit, parts)
        # the greedy path is the same whatever k: a sweep over ratios walks it once
        path_key = None if cov_key is None else (
            "obs path", cov_key, unit, hashlib.sha1(flat.tobytes()).hexdigest(),
            hashlib.sha1(np.ascontiguousarray(weight).tobytes()).hexdigest())
        path = cached(self.ctx.cache, path_key, lambda: decide.ObsPath(cov[np.ix_(flat, flat)], weight, unit))
        return path.keep(k)

    def _input_covariance(self, source: RowSource, task: str) -> np.ndarray:
        job = lockstep_job(self.state, {source.tensor: source.dtype}, {}, _new_input_gram,
                           partial(_add_input_rows, source.tensor, source.activation))
        return self.ctx.measure(job, self.ctx.calibration, task)["x"].flush().sxx

    def _covariance_key(self, source: RowSource):
        """In a budget search, candidates that change nothing upstream of the
        readers' input share its covariance: keyed by the pass's
        ``model_scope`` where it names one, else by the model part that
        computes it (passes.cache)."""
        cache, ctx = self.ctx.cache, self.ctx
        if cache is None:
            return None
        if self.model_scope is not None:
            model_key = ("model", self.model_scope())
        else:
            model_key = ("part", model_digest(needed_part(self.state.current_model(),
                                                          {source.tensor: source.dtype})))
        act = source.activation
        # the activation applied in numpy: its kind and parameters (a PRelu's slopes as bytes)
        act_key = None if act is None else (act.kind, act.alpha, act.lo, act.hi,
                                             None if act.slope is None else np.asarray(act.slope).tobytes())
        return ("obs input covariance", model_key, source.tensor, act_key,
                cache.identity(ctx.calibration), ctx.batch_size)

    # -- 3 + 4. repair and rewrite --------------------------------------------
    def rewrite(self, group: UnitGroup, plan: FoldPlan, moments: dict[str, Moments] | None = None) -> None:
        """Merge the producers' and followers' rows, sum the consumers' columns."""
        row_map, col_map = decide.cluster_maps(plan.labels, sparse=group.sparse_maps)
        for m in group.producers:
            scale, shift = self._repair(m, plan.labels, row_map, moments)
            m.handler.merge_rows(m.op, row_map, scale, shift, m.unit)
            self.out_maps[m.op.output] = row_map
        for m in group.followers:
            m.handler.merge_rows(m.op, row_map, unit=m.unit)
        for m in group.consumers:
            m.handler.sum_columns(m.op, col_map, m.unit)
        self.state.edit()

    def _repair(self, m: Member, labels: np.ndarray, row_map, moments: dict[str, Moments] | None):
        """(scale, shift) of a producer's merged rows."""
        if not m.repaired:
            return None, None
        if self.repair == "ar" and self.select == "kmeans":
            return decide.fold_ar_scale(m.handler.weight_rows(m.op, m.unit), labels), None
        if self.repair == "repair":
            mo = moments[m.op.output]
            cur, target = mo.current, mo.target
            merged_mean, merged_std = decide.merged_moments(row_map, cur.mean_x, cur.sxx / cur.weight)
            return decide.repair_affine(row_map @ target.mean_z, row_map @ target.std_z, merged_mean, merged_std)
        return None, None

    def fold(self, group: UnitGroup, k: int, what: str) -> FoldPlan | None:
        """Steps 1-4; None when nothing is removed."""
        moments = self.measure(group, what) if self.repair == "repair" else None
        plan = self.plan(group, k)
        if plan.width_after == group.width:
            return None
        self.rewrite(group, plan, moments)
        return plan

    # -- 5. least-squares refit -------------------------------------------------
    def refit(self, m: Member, task: str, cache_key: Hashable | None = None) -> tuple[RefitOutcome | None, str]:
        """Refit consumer ``m`` to the original model's output of its op:
        (the outcome, or None and why the op was not refit)."""
        w_prior, b_prior = m.handler.prior(m.op)
        rows, why = m.handler.refit_rows(m.op, m.source, b_prior, self.out_maps.get(m.op.output))
        if rows is None:
            return None, why
        outcome = self.refits.solve(rows, [(w_prior, b_prior)], task, cache_key)[0]
        if outcome.refit.lam is not None:
            # copies: the refit may be shared with other candidates through the search cache
            m.handler.set_refit(m.op, outcome.refit.weight.copy(), outcome.refit.bias.copy())
            self.state.edit()
        return outcome, ""


def _kmeans_task(problem: tuple[np.ndarray, int], seed: int) -> np.ndarray:
    """One prefetched clustering, on a worker."""
    features, k = problem
    return decide.kmeans_labels(features, k, seed=seed)


def _new_input_gram() -> dict:
    return {"x": RowChunks(GramAccumulator(with_bias=True))}


def _add_input_rows(tensor: str, activation: ActivationSpec | None, accs: dict, _start, _feed, _labels,
                    tensors: list) -> None:
    x = tensors[0][tensor]
    accs["x"].update(last_axis_rows(x if activation is None else activation.apply(x)))


def _new_moments(width: int, tensors: list[str], repair: bool, constants: ActivationSpec | None) -> dict:
    out: dict = {}
    for t in tensors:
        if constants is not None:
            out["constant:" + t] = NeuronStats(constants, width)
        if repair:
            out["current:" + t] = GramAccumulator(with_bias=True)
            out["target:" + t] = NeuronStats(ActivationSpec("identity"), width)
    return out


def _add_moments(channels_first: dict[str, bool], repair: bool, constants: bool, accs: dict, _start, _feed,
                 _labels, tensors: list) -> None:
    cur, orig = tensors[0], tensors[-1]
    for t, cf in channels_first.items():
        z = output_rows(cur[t], cf)
        if constants:
            accs["constant:" + t].update(z)
        if repair:
            accs["current:" + t].update(z)
            accs["target:" + t].update(output_rows(orig[t], cf))
