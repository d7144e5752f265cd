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

Method: ``shared/METHODS.md`` section 2; the math is in ``decide/folding.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import onnx

from ..decide import folding as decide
from ..errors import UsageError
from ..find.chains import Chain, DenseGraph, find_dense_graph
from ..measure.data import CalibrationSet
from ..measure.stats import GramAccumulator, NeuronStats
from ..measure.stream import stream_tensors
from ..rewrite import HiddenEdit, apply_edit, materialize
from .base import LayerReport, PassContext, PassResult

SELECTS = ("kmeans", "magnitude")
REPAIRS = ("auto", "none", "ar", "repair", "ls")
DATA_REPAIRS = ("repair", "ls")

#: Share of the calibration data held out to choose the ridge strength when
#: the context brings no held-out set; and the fewest samples worth splitting.
HELDOUT_SHARE = 0.2
MIN_SAMPLES_TO_SPLIT = 5


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
        data, ``ar`` without.
    seed: k-means seed and the seed of the internal held-out split.
    layers: only fold these chains (names as ``find`` gives them: layer0, ...).
    drop_constant: first remove neurons whose output is constant on the
        calibration data (e.g. a ReLU never active), moving that constant
        into the consumer's bias. Needs calibration data.
    """

    name = "folding"

    def __init__(self, ratio: float | Mapping[str, float], select: str = "kmeans", repair: str = "auto",
                 seed: int = 0, layers: Sequence[str] | None = None, drop_constant: bool = False):
        if select not in SELECTS:
            raise UsageError(f"unknown fold selection {select!r}; choose one of {', '.join(SELECTS)}")
        if repair not in REPAIRS:
            raise UsageError(f"unknown fold repair {repair!r}; choose one of {', '.join(REPAIRS)}")
        ratios = dict(ratio) if isinstance(ratio, Mapping) else {None: ratio}
        for where, r in ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)) or not 0 <= r < 1:
                at = "" if where is None else f" for {where}"
                raise UsageError(f"fold ratio{at} must be a number in [0, 1), got {r!r}")
        self.ratio = ratio
        self.select = select
        self.repair = repair
        self.seed = int(seed)
        self.layers = None if layers is None else list(layers)
        self.drop_constant = bool(drop_constant)

    # ------------------------------------------------------------------ setup
    def _ratios(self, view: DenseGraph) -> dict[str, float]:
        names = [c.name for c in view.chains]
        asked = list(self.layers or []) + (list(self.ratio) if isinstance(self.ratio, Mapping) else [])
        unknown = [n for n in asked if n not in names]
        if unknown:
            have = ", ".join(names) or "none"
            raise UsageError(f"unknown layer {unknown[0]!r} for folding; the model's foldable layers are: {have}")
        chosen = names if self.layers is None else [n for n in names if n in self.layers]
        if isinstance(self.ratio, Mapping):
            return {n: float(self.ratio[n]) for n in chosen if n in self.ratio}
        return {n: float(self.ratio) for n in chosen}

    def _repair_mode(self, ctx: PassContext) -> str:
        if self.repair == "auto":
            return "ls" if ctx.calibration is not None else "ar"
        return self.repair

    # ------------------------------------------------------------------ run
    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        repair = self._repair_mode(ctx)
        if ctx.calibration is None and (repair in DATA_REPAIRS or self.drop_constant):
            what = f"fold repair {repair!r}" if repair in DATA_REPAIRS else "dropping constant neurons"
            raise UsageError(f"{what} needs calibration data; give calibration data or use repair 'ar' or 'none'")
        view = find_dense_graph(model)
        ratios = self._ratios(view)
        if not view.chains:
            return PassResult(model, False, [], ["folding: no foldable hidden layer found"])
        run = _FoldRun(model, view, ctx, select=self.select, repair=repair, seed=self.seed,
                       drop_constant=self.drop_constant)
        before = {c.name: _chain_params(c) for c in view.chains}
        reports: list[LayerReport] = []
        for i, chain in enumerate(view.chains):
            ctx.report_progress("folding", i, len(view.chains))
            if chain.name in ratios:
                reports.append(run.fold(chain, ratios[chain.name]))
            else:
                reports.append(_report(chain, chain.width, note="not selected for folding"))
        ctx.report_progress("folding", len(view.chains), len(view.chains))
        for rep, chain in zip(reports, view.chains):
            rep.params_before, rep.params_after = before[chain.name], _chain_params(chain)
        out = run.current_model() if run.edited else model
        return PassResult(out, run.edited, reports, run.notes)


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
        self.notes: list[str] = []
        self._current: onnx.ModelProto | None = model
        self._ls_sets: tuple[CalibrationSet, CalibrationSet | None, bool] | None = None

    # -- model state ---------------------------------------------------------
    def current_model(self) -> onnx.ModelProto:
        if self._current is None:
            self._current = materialize(self.original, self.view)
        return self._current

    def _apply(self, chain: Chain, edit: HiddenEdit) -> None:
        apply_edit(chain, edit)
        self.edited = True
        self._current = None

    def _stream(self, model: onnx.ModelProto, names: list[str], data: CalibrationSet,
                task: str) -> Iterator[dict[str, np.ndarray]]:
        ctx = self.ctx
        for _feed, _labels, tensors in stream_tensors(
                _needed_part(model, names), names, data, batch_size=ctx.batch_size, providers=ctx.providers,
                progress=lambda done, total: ctx.report_progress(task, done, total)):
            yield tensors

    # -- one chain -----------------------------------------------------------
    def fold(self, chain: Chain, ratio: float) -> LayerReport:
        n = chain.width
        k = decide.target_width(n, ratio)
        need_repair_stats = self.repair == "repair"
        stats = self._measure(chain, constants=self.drop_constant, repair=need_repair_stats) \
            if (self.drop_constant or need_repair_stats) else {}
        plan = self._plan(chain, k, stats.get("constant"))
        if plan.width_after == n:
            return _report(chain, n, note="nothing to fold")
        row_map, col_map = decide.cluster_maps(plan.labels)
        edit = HiddenEdit(row_map=row_map, col_map=col_map)
        notes = []
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
        if self.repair == "ls":
            notes.append(self._refit(chain))
        return _report(chain, n, constant=int(plan.constant.size), merged=plan.merged, pruned=plan.pruned,
                       note="; ".join(x for x in notes if x))

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
            feats = decide.neuron_features(prod.weight[rest], bias, cons.weight[:, rest])
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
        """One streamed run over the calibration data (two models in lockstep
        when REPAIR needs the original's moments and earlier layers changed).

        constant: NeuronStats of the current pre-activation;
        current: GramAccumulator (no targets) of it - mean and covariance, so the
            moments of any merge ``row_map @ z`` follow without another run;
        target: NeuronStats of the original model's pre-activation."""
        pre, act, n = chain.producer.output, chain.activation, chain.width
        data = self.ctx.calibration
        out: dict = {}
        cur_stats = NeuronStats(act, n)
        if constants:
            out["constant"] = cur_stats
        if repair:
            out["current"] = GramAccumulator(with_bias=True)
            out["target"] = cur_stats if not self.edited else NeuronStats(act, n)
        task = f"folding {chain.name}: measuring"
        current = self._stream(self.current_model(), [pre], data, task)
        original = self._stream(self.original, [pre], data, task) if repair and self.edited else None
        for tensors in current:
            z = _rows(tensors[pre])
            cur_stats.update(z)
            if repair:
                out["current"].update(z)
                if original is not None:
                    out["target"].update(_rows(next(original)[pre]))
        return out

    # -- least-squares refit -------------------------------------------------
    def _refit_sets(self) -> tuple[CalibrationSet, CalibrationSet | None, bool]:
        """(fit, held-out, merge-for-final): the context's held-out set, else a
        seeded split of the calibration data whose parts are merged again for
        the final solve once the ridge strength is chosen."""
        if self._ls_sets is None:
            calib, held = self.ctx.calibration, self.ctx.heldout
            if held is not None:
                self._ls_sets = (calib, held, False)
            elif calib.num_samples >= MIN_SAMPLES_TO_SPLIT:
                fit, held = calib.split([1 - HELDOUT_SHARE, HELDOUT_SHARE], self.seed)
                self._ls_sets = (fit, held, True)
            else:
                self._ls_sets = (calib, None, False)
        return self._ls_sets

    def _refit_gram(self, chain: Chain, model: onnx.ModelProto, data: CalibrationSet,
                    b_prior: np.ndarray) -> GramAccumulator:
        """X = folded hidden activations; Y = what the consumer's main product
        must add to the plain fold to reproduce the original pre-activation:
        original − (current consumer output − b_prior). Using the current
        consumer output (not just W x) keeps linear paths the consumer also
        sums (from other tensors) out of the fit without modelling them."""
        pre, post, act = chain.producer.output, chain.consumer.output, chain.activation
        gram = GramAccumulator(with_bias=True)
        task = f"folding {chain.name}: refit"
        original = self._stream(self.original, [post], data, task)
        for tensors in self._stream(model, [pre, post], data, task):
            target = _rows(next(original)[post]).astype(np.float64)
            x = act.apply(_rows(tensors[pre]))
            gram.update(x, target - _rows(tensors[post]) + b_prior)
        return gram

    def _refit(self, chain: Chain) -> str:
        cons = chain.consumer
        if any(op is cons for op, _ in chain.path_readers):
            return "ls: the consumer also reads this layer through a linear path; kept the plain fold"
        fit_set, held_set, merge = self._refit_sets()
        model = self.current_model()
        w_prior, b_prior = cons.weight.copy(), cons.bias_or_zero().copy()
        fit = self._refit_gram(chain, model, fit_set, b_prior)
        held = self._refit_gram(chain, model, held_set, b_prior) if held_set is not None else None
        final = GramAccumulator(with_bias=True).merge(fit).merge(held) if merge else fit
        refit = decide.refit_consumer(fit, held, w_prior, b_prior, final=final)
        if refit.lam is None:
            return f"ls: plain fold kept (held-out rel. error {refit.kept_error:.3g})"
        k = chain.width
        self._apply(chain, HiddenEdit.keep(k, np.arange(k), consumer_weight=refit.weight, consumer_bias=refit.bias))
        if held is None:
            return f"ls: ridge {refit.lam:g} (too few samples to hold any out)"
        return (f"ls: ridge {refit.lam:g}, held-out rel. error {refit.heldout_error:.3g}"
                f" (plain fold {refit.kept_error:.3g})")


def _needed_part(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``names`` (no graph outputs of its
    own; ``stream_tensors`` exposes ``names``). Layer i of a deep model is
    measured without running the layers after it - about half the work over
    a whole pass. Graphs with subgraphs (If, Loop, Scan: they read outer
    names implicitly) are returned whole."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model
    need, keep = set(names), []
    for node in reversed(g.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    out = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, fld, getattr(model, fld))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = g.name
    out.graph.input.extend(i for i in g.input if i.name in need)
    out.graph.initializer.extend(t for t in g.initializer if t.name in need)
    out.graph.node.extend(reversed(keep))
    out.graph.value_info.extend(v for v in g.value_info if v.name in need)
    return out


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
