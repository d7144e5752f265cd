"""The least-squares refit every folding pass uses.

After a fold, an op that reads the merged units (a consumer) is refit so
that the folded model reproduces the *original* model's output of that op:
the current (partly folded) model and the original are streamed in lockstep
over the calibration data; a rows builder (from the op's handler,
:mod:`onnxfold.passes.handlers`) turns each batch into least-squares rows
X, Y and the target; ridge statistics are accumulated separately for fit
rows and held-out rows; ``decide.folding.refit_consumer`` chooses the ridge
strength on the held-out rows (or keeps the plain fold when that is better
there) and solves. A rows builder may fit several column groups at once
(one per merged head cluster), each with its own ridge strength.

Held-out rows: the context's held-out set when it has one, else a seeded
share of the calibration samples (``base.heldout_mask``); the weights are
then solved on all rows with the chosen strength. Because passes fold one
group at a time and measure on the already folded and refit model, each
refit also corrects the error of the groups folded before it.

Row budget: a refit of p features takes at most :func:`row_budget` (p)
rows of the data, drawn uniformly (see :data:`ROWS_PER_FEATURE`); token and
pixel positions make far more rows than that (a decoder's 4,096 windows of
64 tokens are 262,144 rows for a few hundred features), and each row costs
p² in the Gram. A builder with a ``layout`` (rows per batch and features,
known from the tensors' shapes) builds only the rows drawn.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import partial
from typing import NamedTuple

import numpy as np
import onnx

from ..decide import folding as decide
from ..distributed import StatsJob, run_stats_job
from ..measure.jobs import KeyedModel, part_of
from ..measure.data import CalibrationSet, batch_samples
from ..measure.stats import ColumnMoments, GramAccumulator, RowChunks
from .base import HELDOUT_SHARE, PassContext, heldout_mask

#: Rows per feature a refit needs at most. A least-squares fit of p features on
#: n rows predicts new rows with an excess error of about p/n times its residual
#: (p/(n-p-1) for Gaussian noise): at 128 rows per feature under 1 % of a
#: residual that is itself small after a good fold, while every further row
#: costs p² in the Gram. Rows beyond the budget are left out, drawn uniformly
#: over the data (a seeded draw per batch, so a shard on another worker draws
#: the same rows); fit and held-out rows keep their shares.
ROWS_PER_FEATURE = 128
#: The budget never goes below this many rows (narrow refits are cheap, and
#: neighbouring tokens or pixels are correlated rows).
MIN_BUDGET_ROWS = 8192


def row_budget(features: int) -> int:
    """The most rows a refit of ``features`` features accumulates over the data."""
    return max(ROWS_PER_FEATURE * int(features), MIN_BUDGET_ROWS)


def budget_share(features: int, batch_rows: int, batch_samples: int, data_samples: int) -> float:
    """The share of a batch's rows a refit keeps: 1 while the data's rows
    (estimated from this batch's rows per sample) fit :func:`row_budget`."""
    total = batch_rows / max(batch_samples, 1) * data_samples
    return min(1.0, row_budget(features) / total) if total > 0 else 1.0


class FoldState:
    """The model a pass is folding: the original, and the current (partly
    folded) model - rebuilt from the pass's edited view by ``materialize``
    only when data has to be streamed through it, or set directly by passes
    that rewrite the graph after each group."""

    def __init__(self, original: onnx.ModelProto, materialize=None):
        self.original = original
        self._materialize = materialize  # (release: bool) -> model
        self._current: onnx.ModelProto | None = original
        self.edited = False

    def current_model(self) -> onnx.ModelProto:
        if self._current is None:
            self._current = self._materialize(release=False)
        return self._current

    def final_model(self) -> onnx.ModelProto:
        """The folded model; a view's weights are released as they are written."""
        if self._current is None:
            self._current = self._materialize(release=True)
        return self._current

    def edit(self) -> None:
        """The view was edited: the current model is rebuilt when next needed
        (a pass without a view sets it with :meth:`replace`)."""
        self.edited = True
        if self._materialize is not None:
            self._current = None

    def replace(self, model: onnx.ModelProto) -> None:
        """The current model, rewritten by the pass."""
        self.edited = True
        self._current = model


def original_part(state: FoldState, tensors: Mapping[str, np.dtype], cache) -> KeyedModel:
    """The part of the pass's input model that computes ``tensors``
    (:func:`~onnxfold.measure.jobs.part_of`). In a budget search its digest is
    computed once per input model (the search cache's ``input_digest``) and the
    part is built only when its stream is not replayed."""
    part = part_of(state.original, tensors)
    if cache is not None:
        part.key = cache.input_digest(state.original, ("part", tuple(tensors.items())), lambda: part.model)
    return part


def lockstep_job(state: FoldState, current: Mapping[str, np.dtype], original: Mapping[str, np.dtype], init,
                 update, cache=None) -> StatsJob:
    """A statistics job over the current model's ``current`` tensors and the
    original model's ``original`` tensors (name → dtype), the two models in
    lockstep over the same batches (``update`` gets their tensors in that
    order); a single run while nothing has been edited (then both are the
    same, and the update gets one tensor dict). Only the part of each model
    that computes its tensors is run; ``cache``: the search cache, if any
    (see :func:`original_part`)."""
    if not state.edited or not original:
        both = {**current, **original}
        return StatsJob([(part_of(state.current_model(), both), list(both))], init, update)
    return StatsJob([(part_of(state.current_model(), current), list(current)),
                     (original_part(state, original, cache), list(original))], init, update, replayable=(1,))


class RefitOutcome(NamedTuple):  # a tuple: the search cache sizes what it holds through tuples
    refit: decide.Refit
    held_rows: int  # held-out rows the ridge strength was chosen on


def refit_note(outcome: RefitOutcome) -> str:
    """The report note of a one-group refit."""
    r = outcome.refit
    if r.lam is None:
        return f"ls: plain fold kept (held-out relative error {r.kept_error:.3g})"
    if not outcome.held_rows:
        return f"ls: ridge {r.lam:g} (too few samples to hold any out)"
    return f"ls: ridge {r.lam:g}, held-out relative error {r.heldout_error:.3g} (plain fold {r.kept_error:.3g})"


class RefitEngine:
    """Held-out ridge refits against the original model, for one pass run."""

    def __init__(self, state: FoldState, ctx: PassContext, seed: int):
        self.state = state
        self.ctx = ctx
        self.seed = seed

    def solve(self, rows, priors: list[tuple[np.ndarray, np.ndarray]], task: str,
              cache_key: Hashable | None = None) -> list[RefitOutcome]:
        """One refit per column group of ``rows`` (a builder from
        :mod:`~onnxfold.passes.handlers`), shrunk towards ``priors``
        ((weight, bias) per group). With ``cache_key`` and a search cache in
        the context, shared by every candidate that asks with the same key."""
        cache = self.ctx.cache
        if cache is None or cache_key is None:
            return self._solve(rows, priors, task)
        return cache.get_or_compute(cache_key, lambda: self._solve(rows, priors, task))

    def _solve(self, rows, priors, task: str) -> list[RefitOutcome]:
        ctx = self.ctx
        if ctx.heldout is not None:
            fits = self._grams(rows, ctx.calibration, None, task)
            helds = self._grams(rows, ctx.heldout, np.ones(ctx.heldout.num_samples, dtype=bool), task)
            stats = [(f, h, spread, f) for (f, _, _), (_, h, spread) in zip(fits, helds)]
        else:
            held_samples = heldout_mask(ctx.calibration.num_samples, self.seed)
            # the ridge strength is chosen on the held-out rows; the weights are then fit on all rows
            stats = [(f, h, spread, GramAccumulator(with_bias=True).merge(f).merge(h))
                     for f, h, spread in self._grams(rows, ctx.calibration, held_samples, task)]
        return [RefitOutcome(decide.refit_consumer(fit, held if held.count else None, w, b, final=final,
                                                   target_ss=spread), held.count)
                for (w, b), (fit, held, spread, final) in zip(priors, stats)]

    def _grams(self, rows, data: CalibrationSet, held_samples: np.ndarray | None, task: str):
        """Per column group: (fit rows, held-out rows, spread of the held-out target)."""
        # a builder's own per-batch cap (conv patches) draws from one RNG stream across the batches
        # in order, which shards on other workers could not reproduce: such rows stream in this
        # process. The row budget's draws are seeded per batch and run anywhere.
        sampler = None if rows.max_rows is None else np.random.default_rng(self.seed + 1)
        job = StatsJob([(part_of(self.state.current_model(), rows.current), list(rows.current)),
                        (original_part(self.state, rows.original, self.ctx.cache), list(rows.original))],
                       partial(_new_grams, rows.widths),
                       partial(_add_rows, rows, held_samples, sampler, data.num_samples, self.seed),
                       replayable=(1,))
        if sampler is None:
            accs = self.ctx.measure(job, data, task)
        else:
            ctx = self.ctx
            accs = run_stats_job(job, data, batch_size=ctx.batch_size, providers=ctx.providers,
                                 progress=lambda done, total: ctx.report_progress(task, done, total),
                                 memo=None if ctx.cache is None else ctx.cache.streams)
        return [(accs[f"fit{i}"].flush(), accs[f"held{i}"].flush(), float(accs[f"spread{i}"].m2.sum()))
                for i in range(len(rows.widths))]


def _new_grams(widths: list[int]) -> dict:
    out = {}
    for i, width in enumerate(widths):
        # a refit keeps a share of each batch's rows (row_budget): gathered into chunks for the updates
        out[f"fit{i}"] = RowChunks(GramAccumulator(with_bias=True))
        out[f"held{i}"] = RowChunks(GramAccumulator(with_bias=True))
        out[f"spread{i}"] = ColumnMoments(width)
    return out


def _add_rows(rows, held_samples: np.ndarray | None, sampler, data_samples: int, seed: int, accs: dict,
              start: int, feed: dict, _labels, tensors: list) -> None:
    """One batch of every group's least-squares rows; ``start``: index of the
    batch's first sample in the data (of ``data_samples``).

    A builder that can say how many rows a batch makes before building them
    (``layout``) builds only the rows the groups keep under the row budget:
    on a decoder's token rows that is a share of each batch, and building
    every row (float64 copies, the prior's products) cost more than the
    Gram updates of the rows kept. The rows kept are the same either way."""
    count = batch_samples(feed)
    choose = partial(_chosen_rows, held_samples=held_samples, sampler=sampler, max_rows=rows.max_rows,
                     start=start, count=count, data_samples=data_samples, seed=seed)
    chosen = None  # per group, [fit rows, held-out rows]: drawn once (a builder's cap draws from one stream)
    if hasattr(rows, "layout"):
        first_axis, n, features = rows.layout(tensors[0])
        chosen = [choose(n, first_axis, p, i) for i, p in enumerate(features)]
        keep = np.unique(np.concatenate([idx for pair in chosen for idx in pair]))
        if keep.size < n:
            _first, groups = rows.rows(tensors[0], tensors[-1], keep=keep)
            for i, (group, pair) in enumerate(zip(groups, chosen)):
                _update_group(accs, i, group, [np.searchsorted(keep, idx) for idx in pair])
            return
    first_axis, groups = rows.rows(tensors[0], tensors[-1])
    for i, group in enumerate(groups):
        X = group[0]
        if chosen is None:
            _update_group(accs, i, group, choose(X.shape[0], first_axis, X.shape[1], i))
        elif X.shape[0] != n:
            raise RuntimeError(f"a rows builder's layout said {n} rows per batch, its rows have {X.shape[0]}")
        else:
            _update_group(accs, i, group, chosen[i])


def _chosen_rows(n: int, first_axis: int, features: int, group: int, *, held_samples: np.ndarray | None, sampler,
                 max_rows: int | None, start: int, count: int, data_samples: int,
                 seed: int) -> list[np.ndarray]:
    """[fit rows, held-out rows] (sorted indices) that group ``group`` of a
    batch of ``n`` rows (``first_axis``: its tensors' first axis; ``count``
    samples from sample ``start``) of ``features`` features keeps: a
    builder's own cap (``max_rows``, drawn by ``sampler``), then the row
    budget's seeded draw."""
    if held_samples is None or n % first_axis:
        held = np.zeros(n, dtype=bool)
    else:
        held = np.repeat(_held_rows(held_samples[start:start + count], first_axis), n // first_axis)
    chosen = []
    for selected in (~held, held):
        idx = np.flatnonzero(selected)
        if sampler is not None and idx.size > max_rows:  # a builder's own cap per batch (conv patches)
            idx = np.sort(sampler.choice(idx, max_rows, replace=False))
        chosen.append(idx)
    share = budget_share(features, sum(idx.size for idx in chosen), count, data_samples)
    if share < 1.0:
        draw = np.random.default_rng([seed, start, group])
        chosen = [np.sort(draw.choice(idx, max(1, round(share * idx.size)), replace=False)) if idx.size else idx
                  for idx in chosen]
    return chosen


def _update_group(accs: dict, i: int, group: tuple, chosen: list[np.ndarray]) -> None:
    """Group ``i``'s rows (X, Y, target[, weights]) at ``chosen`` ([fit rows,
    held-out rows], indices into X) into its accumulators."""
    X, Y, target, *weights = group
    weights = weights[0] if weights else None  # a builder may weigh its rows (weighted least squares)
    n = X.shape[0]
    for acc, idx in zip((accs[f"fit{i}"], accs[f"held{i}"]), chosen):
        if not idx.size:
            continue
        if idx.size == n and isinstance(X, np.ndarray):  # every row: no copy to take
            w = weights
            acc.update(X, Y, w)
        else:  # copies of the chosen rows, this call's own: centred in place (and not kept alive here)
            w = None if weights is None else weights[idx]
            acc.update(X[idx], Y[idx], w, overwrite=True)
        if acc is accs[f"held{i}"]:
            # the held-out target's spread, in the weighted rows' units (relative errors in notes);
            # a held-out split of its own (the search's select split) has every row of a batch held out
            t = target if idx.size == n else target[idx]
            accs[f"spread{i}"].update(t if w is None else t * np.sqrt(w)[:, None])


def _held_rows(held_samples: np.ndarray, first_axis: int) -> np.ndarray:
    """Which slices of a batch's tensors (along their first axis) are held
    out, given which of the batch's samples are. The first axis is the sample
    axis in practice; where it is not (time-major tensors), a batch that is
    all held out (or all not) stays so, and a mixed one holds out every 5th
    slice."""
    if held_samples.size == first_axis:
        return held_samples
    if held_samples.all() or not held_samples.any():
        return np.full(first_axis, bool(held_samples.all()))
    return np.arange(first_axis) % round(1 / HELDOUT_SHARE) == 0
