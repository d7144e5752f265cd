"""Neuron folding pass: merge (or prune) the neurons of every hidden layer.

find → measure → decide → rewrite, one chain at a time in topological order:

1. (with data, if needed) stream the current model's pre-activation of the
   chain: constant neurons (``drop_constant``) and the moments REPAIR needs;
2. decide the new width: constant neurons go first (their mean output moves
   into the consumer's bias), then k-means clusters of the rest are merged
   (``select="kmeans"``) or the largest rows kept (``select="magnitude"``);
3. merge the producer's rows and sum the consumer's columns (with Fold-AR /
   REPAIR scaling of the rows): steps 2-3 are the folding core's
   (``passes/foldcore.py``), shared with every other group kind;
4. ``repair="ls"``: materialize the partly folded model, stream its folded
   hidden activations next to the original model's consumer pre-activation,
   and refit the consumer by ridge least squares (ridge strength chosen on
   held-out rows). Because the next chain is measured on this already folded
   and refit model, each refit also corrects the error of the layers before it.

Method: ``docs/methods.md`` section 2; the math is in ``decide/folding.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce

import numpy as np
import onnx

from ..decide import folding as decide
from ..decide.allocation import ALLOCATIONS
from ..errors import UsageError
from ..find.chains import Chain, DenseGraph, find_dense_graph
from ..measure.stats import NeuronStats
from ..rewrite import materialize
from .base import FoldSettings, LayerReport, PassContext, PassResult, fold_in_order
from .cache import PassScope
from .foldcore import FoldCore
from .refit import FoldState, refit_note
from .units import dense_group

#: samples the sensitivity probes fit on and are judged on (each at most): the probes rank layers, a few
#: hundred samples of a transformer's tokens do that; the fold itself uses all the calibration data
PROBE_SAMPLES = 512


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
    allocate: with one ``ratio`` for every layer, ``"uniform"`` folds each by
        it; ``"sensitivity"`` (needs calibration data) first folds each layer
        alone at a probe ratio, measures the output error on held-out samples,
        and shares the same number of removed neurons in inverse proportion
        to those errors (``decide/allocation.py``).
    """

    name = "folding"

    def __init__(self, ratio: float | Mapping[str, float], select: str = "kmeans", repair: str = "auto",
                 seed: int = 0, layers: Sequence[str] | None = None, drop_constant: bool = False,
                 allocate: str = "uniform"):
        self.settings = FoldSettings("fold", ratio, select, repair, seed, layers)
        self.ratio, self.select, self.repair, self.seed = ratio, select, repair, self.settings.seed
        self.layers = self.settings.layers
        self.drop_constant = bool(drop_constant)
        if allocate not in ALLOCATIONS:
            raise UsageError(f"unknown fold allocation {allocate!r}; choose one of {', '.join(ALLOCATIONS)}")
        self.allocate = allocate

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
        notes = []
        if self.allocate == "sensitivity" and not isinstance(self.ratio, Mapping) and len(ratios) > 1:
            if ctx.calibration is None:
                raise UsageError("allocating the fold ratio by sensitivity needs calibration data")
            ratios, note = self._by_sensitivity(model, ctx, view, ratios)
            notes.append(note)
        run = _FoldRun(model, view, ctx, select=self.select, repair=repair, seed=self.seed,
                       drop_constant=self.drop_constant)
        reports = fold_in_order(view.chains, ratios, ctx, "folding", run.fold,
                                lambda c: _report(c, c.width, note="not selected for folding"), _chain_params,
                                before_each=view.release_except)  # unedited weights are read again when needed
        out = run.state.final_model() if run.state.edited else model
        notes = self.settings.auto_note(ctx, repair, "folding") + notes
        return PassResult(out, run.state.edited, reports, notes)

    def _by_sensitivity(self, model: onnx.ModelProto, ctx: PassContext, view: DenseGraph,
                        ratios: dict[str, float]) -> tuple[dict[str, float], str]:
        """Per-chain ratios sharing the neurons ``ratios`` would remove by each
        chain's sensitivity: its output error folded alone at the probe ratio,
        on held-out samples (the first PROBE_SAMPLES of the fit part to fit on,
        of the held-out part to judge on)."""
        from dataclasses import replace

        from ..decide.allocation import allocate_by_sensitivity, probe_ratio
        from .base import heldout_mask
        from .downstream import output_errors

        ratio = float(self.ratio)
        held = None if ctx.heldout is not None else heldout_mask(ctx.calibration.num_samples, self.seed)
        if ctx.heldout is not None:
            fit, judge = ctx.calibration, ctx.heldout
        elif held is None:
            fit = judge = ctx.calibration
        else:
            fit, judge = ctx.calibration.subset(np.flatnonzero(~held)), ctx.calibration.subset(np.flatnonzero(held))
        fit = fit.subset(slice(0, PROBE_SAMPLES)) if fit.num_samples > PROBE_SAMPLES else fit
        judge = judge.subset(slice(0, PROBE_SAMPLES)) if judge.num_samples > PROBE_SAMPLES else judge
        probe_ctx = replace(ctx, calibration=fit, heldout=None, reference=model)
        losses = {}
        for i, name in enumerate(ratios):
            ctx.report_progress("folding: sensitivity", i, len(ratios))
            alone = FoldingPass({name: probe_ratio(ratio)}, select=self.select, repair=self.repair, seed=self.seed)
            # judged one at a time: one probe model in memory besides the original, whatever the depth
            losses[name] = output_errors([alone(model, probe_ctx).model], model, judge, ctx,
                                         f"folding: sensitivity of {name}")[0]
        ctx.report_progress("folding: sensitivity", len(ratios), len(ratios))
        widths = {c.name: c.width for c in view.chains if c.name in ratios}
        allocated = allocate_by_sensitivity(widths, losses, ratio)
        shown = ", ".join(f"{k} {allocated[k]:.3f} (error {losses[k]:.3g})" for k in ratios)
        return allocated, (f"folding: ratio {ratio:g} allocated by sensitivity (each layer folded alone at "
                           f"{probe_ratio(ratio):g}, output error on {judge.num_samples} held-out samples): {shown}")


def _chain_params(chain: Chain) -> int:
    return chain.producer.num_params + chain.consumer.num_params


def _report(chain: Chain, width_before: int, **kw) -> LayerReport:
    return LayerReport(layer=chain.name, producer=chain.producer.name, activation=chain.activation.describe(),
                       width_before=width_before, width_after=chain.width, **kw)


class _FoldRun:
    """State of one pass over one model: the view being edited and the
    partly folded model it stands for (materialized lazily, only when data
    has to be streamed through it)."""

    def __init__(self, model: onnx.ModelProto, view: DenseGraph, ctx: PassContext, *, select: str, repair: str,
                 seed: int, drop_constant: bool):
        self.ctx = ctx
        self.select, self.repair, self.seed = select, repair, seed
        self.drop_constant = drop_constant
        self.state = FoldState(model, lambda release: materialize(model, view, release=release))
        self.core = FoldCore(self.state, ctx, select=select, repair=repair, seed=seed)
        # its steps: (chain, ratio) in the order folded - what the model now is
        self.scope = PassScope(ctx, model, ("dense folding", select, repair, seed, drop_constant))
        # a chain's selection reads the model before its own fold: the chains folded before it
        self.core.model_scope = lambda: self.scope.key(self.scope.steps[:-1])

    def fold(self, chain: Chain, ratio: float) -> LayerReport:
        self.scope.steps.append((chain.name, ratio))
        n = chain.width
        group = dense_group(chain)
        moments = None
        constant = np.zeros(0, np.int64)
        if self.drop_constant or self.repair == "repair":
            moments = self.core.measure(group, f"folding {chain.name}",
                                        constants=chain.activation if self.drop_constant else None)
        if self.drop_constant:
            constant = _constant_neurons(moments[chain.producer.output].constant)
            if constant.size == n:  # a layer must keep a neuron: keep the first, constant or not
                constant = constant[1:]
        plan = self.core.plan(group, decide.target_width(n, ratio), constant)
        if plan.width_after == n:
            return _report(chain, n, note="nothing to fold")
        bias_delta = None
        if constant.size:
            bias_delta = _move_constants(chain, constant, moments[chain.producer.output].constant.mean_a)
        self.core.rewrite(group, plan, moments)
        if bias_delta is not None:
            chain.consumer.bias = chain.consumer.bias_or_zero() + bias_delta
        note = self._refit(chain, group) if self.repair == "ls" else ""
        return _report(chain, n, constant=plan.removed, merged=plan.merged, pruned=plan.pruned, note=note)

    def _refit(self, chain: Chain, group) -> str:
        """Refit the consumer's main weight and bias; returns the report note.

        Other ops that read this layer through linear paths keep the plain
        fold (their path rows were summed by the fold); only the consumer is
        refit. If the consumer itself also reads the layer through a path, the
        path's contribution would change with the refit rows, so it is left
        as folded."""
        cons = chain.consumer
        if any(op is cons for op, _ in chain.path_readers):
            return "ls: the consumer also reads this layer through a linear path; kept the plain fold"
        outcome, _ = self.core.refit(group.consumers[0], f"folding {chain.name}: refit", self._refit_key())
        return refit_note(outcome)

    def _refit_key(self):
        """In a budget search the refit is shared by every candidate that
        folds the same model the same way up to this layer."""
        key = self.scope.key()
        return None if key is None else ("ls refit", key)


def _move_constants(chain: Chain, constant: np.ndarray, mean_a: np.ndarray) -> np.ndarray:
    """A neuron constant on the data contributes ``column · value`` to every
    reader: the consumer's bias change (returned), and the biases of path
    readers (changed here, before the fold drops their rows)."""
    value = np.zeros(chain.width)
    value[constant] = mean_a[constant]
    for op, idx in chain.path_readers:
        op.bias = op.bias_or_zero() + reduce(np.matmul, [value[None, :], *op.paths[idx].factors])[0]
        op.changed = True
    return chain.consumer.weight @ value


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
