"""Neuron folding pass: merge (or prune) the neurons of every hidden layer.

find → measure → decide → rewrite, one chain at a time in topological order:

1. (with data, if needed) stream the current model's pre-activation of the
   chain: constant neurons (``drop_constant``) and the moments REPAIR needs;
2. decide the new width: constant neurons go first (their mean output moves
   into the consumer's bias), then k-means clusters of the rest are merged
   (``select="kmeans"``) or the largest rows kept (``select="magnitude"``);
3. apply the ``HiddenEdit`` (with Fold-AR / REPAIR scaling of the rows);
4. ``repair="ls"``: materialize the partly folded model, stream its folded
   hidden activations next to the original model's consumer pre-activation,
   and refit the consumer by ridge least squares (ridge strength chosen on
   held-out rows). Because the next chain is measured on this already folded
   and refit model, each refit also corrects the error of the layers before it.

Method: ``docs/methods.md`` section 2; the math is in ``decide/folding.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce

import numpy as np
import onnx

from ..decide import folding as decide
from ..distributed import StatsJob
from ..errors import UsageError
from ..find.activations import ActivationSpec
from ..find.chains import Chain, DenseGraph, find_dense_graph
from ..measure.data import CalibrationSet
from ..measure.stats import GramAccumulator, NeuronStats
from ..measure.stream import needed_part
from ..rewrite import HiddenEdit, apply_edit, materialize
from .base import HELDOUT_SHARE, FoldSettings, LayerReport, PassContext, PassResult, heldout_mask



#: layers wider than this get their fold maps as sparse matrices (a dense
#: k × n map of a 8192-wide layer is 256 MiB and a 10¹²-flop product)
SPARSE_MAPS_ABOVE = 1024


@dataclass
class _Plan:
    """What happens to one chain's neurons (indices into the current width)."""

    labels: np.ndarray  # cluster per neuron, -1 = removed (constant or pruned)
    constant: np.ndarray  # indices removed as constants
    merged: int = 0
    pruned: int = 0

    @property
    def width_after(self) -> int:
        return int(self.labels.max()) + 1


class FoldingPass:
    """Model folding (Wang et al., ICLR 2025) on every hidden layer of a model.

    ratio: share of each hidden layer's neurons removed, one float for every
        layer, or ``{chain name: ratio}`` (chains not named are left alone).
    select: ``"kmeans"`` merges clusters of similar neurons; ``"magnitude"``
        keeps the neurons with the largest incoming rows (pruning baseline).
    repair: ``"none"``; ``"ar"`` (Fold-AR, data-free); ``"repair"`` (REPAIR,
        mean/std matching on calibration data); ``"ls"`` (ridge refit of the
        consumer on calibration data); ``"auto"``: ``ls`` with calibration
        data, ``ar`` without. With ``select="magnitude"`` nothing is merged,
        so ``ar`` changes nothing and ``repair`` only re-centres the kept
        neurons after earlier layers changed.
    seed: k-means seed and the seed of the internal held-out split.
    layers: only fold these chains (names as ``find`` gives them: layer0, ...).
    drop_constant: first remove neurons whose output is constant on the
        calibration data (e.g. a ReLU never active), moving that constant
        into the consumer's bias. Needs calibration data.
    """

    name = "folding"

    def __init__(self, ratio: float | Mapping[str, float], select: str = "kmeans", repair: str = "auto",
                 seed: int = 0, layers: Sequence[str] | None = None, drop_constant: bool = False):
        self.settings = FoldSettings("fold", ratio, select, repair, seed, layers)
        self.ratio, self.select, self.repair, self.seed = ratio, select, repair, self.settings.seed
        self.layers = self.settings.layers
        self.drop_constant = bool(drop_constant)

    # ------------------------------------------------------------------ run
    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        repair = self.settings.repair_mode(ctx)
        if ctx.calibration is None and self.drop_constant:
            raise UsageError("dropping constant neurons needs calibration data; give calibration data or do not"
                             " ask for drop_constant")
        view = find_dense_graph(model)
        ratios = self.settings.ratios([c.name for c in view.chains], "unknown layer {!r} for folding", "layers")
        if not view.chains:
            return PassResult(model, False, [], ["folding: no foldable hidden layer found"])
        run = _FoldRun(model, view, ctx, select=self.select, repair=repair, seed=self.seed,
                       drop_constant=self.drop_constant)
        before = {c.name: _chain_params(c) for c in view.chains}
        reports: list[LayerReport] = []
        for i, chain in enumerate(view.chains):
            view.release_except(chain)  # unedited weights are read again when needed
            ctx.report_progress("folding", i, len(view.chains))
            if chain.name in ratios:
                reports.append(run.fold(chain, ratios[chain.name]))
            else:
                reports.append(_report(chain, chain.width, note="not selected for folding"))
        ctx.report_progress("folding", len(view.chains), len(view.chains))
        for rep, chain in zip(reports, view.chains):
            rep.params_before, rep.params_after = before[chain.name], _chain_params(chain)
        out = run.final_model() if run.edited else model
        notes = []
        if self.repair == "auto":
            data = "with" if ctx.calibration is not None else "no"
            notes.append(f"folding: repair {repair!r} chosen automatically ({data} calibration data)")
        return PassResult(out, run.edited, reports, notes)


def _chain_params(chain: Chain) -> int:
    return chain.producer.num_params + chain.consumer.num_params


def _report(chain: Chain, width_before: int, **kw) -> LayerReport:
    return LayerReport(layer=chain.name, producer=chain.producer.name, activation=chain.activation.describe(),
                       width_before=width_before, width_after=chain.width, **kw)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1])


class _FoldRun:
    """State of one pass over one model: the view being edited and the
    partly folded model it stands for (materialized lazily, only when data
    has to be streamed through it)."""

    def __init__(self, model: onnx.ModelProto, view: DenseGraph, ctx: PassContext, *, select: str, repair: str,
                 seed: int, drop_constant: bool):
        self.original = model
        self.view = view
        self.ctx = ctx
        self.select = select
        self.repair = repair
        self.seed = seed
        self.drop_constant = drop_constant
        self.edited = False
        self._current: onnx.ModelProto | None = model
        self.folded: list[tuple[str, float]] = []  # (chain, ratio) in the order folded: what the model now is

    # -- model state ---------------------------------------------------------
    def current_model(self) -> onnx.ModelProto:
        if self._current is None:
            self._current = materialize(self.original, self.view)
        return self._current

    def final_model(self) -> onnx.ModelProto:
        """The folded model; the view's weights are released as they are written."""
        if self._current is None:
            self._current = materialize(self.original, self.view, release=True)
        return self._current

    def _apply(self, chain: Chain, edit: HiddenEdit) -> None:
        apply_edit(chain, edit)
        self.edited = True
        self._current = None

    def _job(self, current: Mapping[str, np.dtype], original: Mapping[str, np.dtype], init, update) -> StatsJob:
        """A statistics job over the current model's ``current`` tensors and the
        original model's ``original`` tensors (name → dtype), the two models in
        lockstep over the same batches (``update`` gets their tensors in that
        order); a single run while nothing has been edited (then both are the
        same, and the update gets one tensor dict). Only the part of each model
        that computes its tensors is run."""
        if not self.edited or not original:
            both = {**current, **original}
            return StatsJob([(needed_part(self.current_model(), both), list(both))], init, update)
        return StatsJob([(needed_part(self.current_model(), current), list(current)),
                         (needed_part(self.original, original), list(original))], init, update)

    # -- one chain -----------------------------------------------------------
    def fold(self, chain: Chain, ratio: float) -> LayerReport:
        self.folded.append((chain.name, ratio))
        n = chain.width
        k = decide.target_width(n, ratio)
        need_repair_stats = self.repair == "repair"
        stats = self._measure(chain, constants=self.drop_constant, repair=need_repair_stats) \
            if (self.drop_constant or need_repair_stats) else {}
        plan = self._plan(chain, k, stats.get("constant"))
        if plan.width_after == n:
            return _report(chain, n, note="nothing to fold")
        row_map, col_map = decide.cluster_maps(plan.labels, sparse=n > SPARSE_MAPS_ABOVE)
        edit = HiddenEdit(row_map=row_map, col_map=col_map)
        if plan.constant.size:
            self._move_constants_to_biases(chain, plan.constant, stats["constant"].mean_a, edit)
        if self.repair == "ar" and self.select == "kmeans":
            edit.row_scale = decide.fold_ar_scale(chain.producer.weight, plan.labels)
        elif self.repair == "repair":
            target, current = stats["target"], stats["current"]
            merged_mean, merged_std = decide.merged_moments(row_map, current.mean_x, current.sxx / current.count)
            edit.row_scale, edit.row_shift = decide.repair_affine(
                row_map @ target.mean_z, row_map @ target.std_z, merged_mean, merged_std)
        self._apply(chain, edit)
        note = self._refit(chain) if self.repair == "ls" else ""
        return _report(chain, n, constant=int(plan.constant.size), merged=plan.merged, pruned=plan.pruned, note=note)

    def _plan(self, chain: Chain, k: int, constant_stats: NeuronStats | None) -> _Plan:
        n = chain.width
        constant = _constant_neurons(constant_stats) if constant_stats is not None else np.zeros(0, np.int64)
        if constant.size == n:  # a layer must keep a neuron: keep the first, constant or not
            constant = constant[1:]
        rest = np.setdiff1d(np.arange(n), constant)
        labels = np.full(n, -1, dtype=np.int64)
        if rest.size <= k:
            labels[rest] = np.arange(rest.size)
            return _Plan(labels, constant)
        prod, cons = chain.producer, chain.consumer
        if self.select == "kmeans":
            bias = None if prod.bias is None else prod.bias[rest]
            w_in = prod.weight if rest.size == n else prod.weight[rest]
            w_out = cons.weight if rest.size == n else cons.weight[:, rest]
            if decide.needs_sketch(rest.size, prod.in_features, cons.out_features):
                feats = decide.neuron_sketch(w_in, bias, w_out, seed=self.seed)
            else:
                feats = decide.neuron_features(w_in, bias, w_out)
            labels[rest] = decide.kmeans_labels(feats, k, seed=self.seed)
            return _Plan(labels, constant, merged=int(rest.size - labels.max() - 1))
        kept = rest[decide.magnitude_keep(prod.weight[rest], k)]
        labels[kept] = np.arange(kept.size)
        return _Plan(labels, constant, pruned=int(rest.size - kept.size))

    def _move_constants_to_biases(self, chain: Chain, constant: np.ndarray, mean_a: np.ndarray,
                                  edit: HiddenEdit) -> None:
        """A neuron constant on the data contributes ``column · value`` to every
        reader: add that to the consumer's bias (and to path readers' biases)."""
        value = np.zeros(chain.width)
        value[constant] = mean_a[constant]
        edit.consumer_bias_delta = chain.consumer.weight @ value
        for op, idx in chain.path_readers:  # before apply_edit drops their rows
            op.bias = op.bias_or_zero() + reduce(np.matmul, [value[None, :], *op.paths[idx].factors])[0]
            op.changed = True

    # -- measuring ---------------------------------------------------------
    def _measure(self, chain: Chain, *, constants: bool, repair: bool) -> dict:
        """One streamed run over the calibration data.

        constant: NeuronStats of the current pre-activation;
        current: GramAccumulator (no targets) of it - mean and covariance, so the
            moments of any merge ``row_map @ z`` follow without another run;
        target: NeuronStats of the original model's pre-activation."""
        prod = chain.producer
        pre = {prod.output: prod.dtype}
        job = self._job(pre, pre if repair else {},
                        partial(_new_fold_moments, chain.activation, chain.width, constants, repair),
                        partial(_add_fold_moments, prod.output, constants, repair))
        return self.ctx.measure(job, self.ctx.calibration, f"folding {chain.name}: measuring")

    # -- least-squares refit -------------------------------------------------
    def _heldout_samples(self) -> np.ndarray | None:
        """Which calibration samples the refit holds out to choose its ridge
        strength (seeded), when the context brings no held-out set."""
        return heldout_mask(self.ctx.calibration.num_samples, self.seed)

    def _refit_grams(self, chain: Chain, data: CalibrationSet, b_prior: np.ndarray,
                     held_samples: np.ndarray | None = None) -> tuple[GramAccumulator, GramAccumulator, float]:
        """Least-squares statistics of the consumer over ``data``: (fit rows,
        rows of the ``held_samples``, spread of the original pre-activation on
        the latter - what reported errors are relative to).

        X = folded hidden activations; Y = what the consumer's main product
        must add to the plain fold to reproduce the original pre-activation:
        original − (current consumer output − b_prior). Using the current
        consumer output (not just W x) keeps linear paths the consumer also
        sums (from other tensors) out of the fit without modelling them."""
        prod, cons = chain.producer, chain.consumer
        job = self._job({prod.output: prod.dtype, cons.output: cons.dtype}, {cons.output: cons.dtype},
                        partial(_new_refit_stats, cons.out_features),
                        partial(_add_refit_rows, prod.output, cons.output, chain.activation, b_prior, held_samples))
        accs = self.ctx.measure(job, data, f"folding {chain.name}: refit")
        return accs["fit"], accs["held"], float(accs["held_target"].m2_z.sum())

    def _refit(self, chain: Chain) -> str:
        """Refit the consumer's main weight and bias; returns the report note.

        Other ops that read this layer through linear paths keep the plain
        fold (their path rows were summed by the edit); only the consumer is
        refit. If the consumer itself also reads the layer through a path, the
        path's contribution would change with the refit rows, so it is left
        as folded."""
        cons = chain.consumer
        if any(op is cons for op, _ in chain.path_readers):
            return "ls: the consumer also reads this layer through a linear path; kept the plain fold"
        w_prior, b_prior = cons.weight.copy(), cons.bias_or_zero().copy()
        refit, held_count = self._cached_refit(chain, w_prior, b_prior)
        if refit.lam is None:
            return f"ls: plain fold kept (held-out relative error {refit.kept_error:.3g})"
        k = chain.width
        # copies: the refit may be shared with other candidates through the search cache
        self._apply(chain, HiddenEdit.keep(k, np.arange(k), consumer_weight=refit.weight.copy(),
                                           consumer_bias=refit.bias.copy()))
        if not held_count:
            return f"ls: ridge {refit.lam:g} (too few samples to hold any out)"
        return (f"ls: ridge {refit.lam:g}, held-out relative error {refit.heldout_error:.3g}"
                f" (plain fold {refit.kept_error:.3g})")

    def _cached_refit(self, chain: Chain, w_prior: np.ndarray, b_prior: np.ndarray) -> tuple[decide.Refit, int]:
        """:meth:`_solve_refit`; in a budget search shared by every candidate
        that folds the same model the same way up to this layer. The model
        the refit runs is a function of the pass's input model (keyed by its
        content), the pass's settings and the layers folded so far with their
        ratios - a cheaper key than the model's bytes after every fold."""
        cache = self.ctx.cache
        if cache is None:
            return self._solve_refit(chain, w_prior, b_prior)
        key = ("ls refit", cache.input_digest(self.original, "whole model", lambda: self.original),
               self.select, self.repair, self.seed, self.drop_constant, tuple(self.folded),
               cache.identity(self.ctx.calibration), cache.identity(self.ctx.heldout), self.ctx.batch_size)
        return cache.get_or_compute(key, lambda: self._solve_refit(chain, w_prior, b_prior))

    def _solve_refit(self, chain: Chain, w_prior: np.ndarray, b_prior: np.ndarray) -> tuple[decide.Refit, int]:
        """(the refit, number of held-out rows it was chosen on)."""
        if self.ctx.heldout is not None:
            fit, _, _ = self._refit_grams(chain, self.ctx.calibration, b_prior)
            _, held, spread = self._refit_grams(chain, self.ctx.heldout, b_prior,
                                                np.ones(self.ctx.heldout.num_samples, dtype=bool))
            final = fit
        else:
            fit, held, spread = self._refit_grams(chain, self.ctx.calibration, b_prior, self._heldout_samples())
            # the ridge strength is chosen on the held-out rows; the weights are then fit on all rows
            final = GramAccumulator(with_bias=True).merge(fit).merge(held)
        refit = decide.refit_consumer(fit, held if held.count else None, w_prior, b_prior, final=final,
                                      target_ss=spread)
        return refit, held.count


def _new_fold_moments(activation: ActivationSpec, n: int, constants: bool, repair: bool) -> dict:
    out: dict = {"constant": NeuronStats(activation, n)} if constants else {}
    if repair:
        out["current"], out["target"] = GramAccumulator(with_bias=True), NeuronStats(activation, n)
    return out


def _add_fold_moments(pre: str, constants: bool, repair: bool, accs: dict, _start, _feed, _labels,
                      tensors: list) -> None:
    z = _rows(tensors[0][pre])
    if constants:
        accs["constant"].update(z)
    if repair:
        accs["current"].update(z)
        accs["target"].update(_rows(tensors[-1][pre]))


def _new_refit_stats(out_features: int) -> dict:
    return {"fit": GramAccumulator(with_bias=True), "held": GramAccumulator(with_bias=True),
            "held_target": NeuronStats(ActivationSpec("identity"), out_features)}


def _add_refit_rows(pre: str, out: str, activation: ActivationSpec, b_prior: np.ndarray,
                    held_samples: np.ndarray | None, accs: dict, start: int, feed: dict, _labels,
                    tensors: list) -> None:
    """One batch of the consumer's least-squares rows (see ``_FoldRun._refit_grams``);
    ``start``: index of the batch's first sample in the data."""
    cur, orig = tensors[0], tensors[-1]
    z, current, target = cur[pre], cur[out], orig[out]
    count = next(iter(feed.values())).shape[0]
    held = np.zeros(z.shape[0], dtype=bool) if held_samples is None \
        else _held_rows(held_samples[start:start + count], z.shape[0])
    for acc, rows in ((accs["fit"], ~held), (accs["held"], held)):
        if rows.any():
            y = target[rows].astype(np.float64) - current[rows] + b_prior
            acc.update(activation.apply(z[rows]), y)
    if held.any():
        accs["held_target"].update(target[held])


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


def _constant_neurons(stats: NeuronStats) -> np.ndarray:
    """Neurons whose output is the same on every calibration row: z never
    moves, or z stays on one constant piece of a piecewise activation (a ReLU
    that is never active, a Clip saturated at one bound)."""
    constant = stats.min_z == stats.max_z
    if stats.piece_counts is not None:
        pieces = stats.activation.pieces(stats.n)
        best, rate = stats.on_one_piece_rate()
        slopes = np.stack([np.broadcast_to(np.asarray(p.slope, dtype=np.float64), (stats.n,)) for p in pieces])
        constant |= (rate == 1.0) & (slopes[best, np.arange(stats.n)] == 0)
    return np.flatnonzero(constant & (stats.count > 0))
