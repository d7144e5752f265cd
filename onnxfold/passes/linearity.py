"""Linearity folding pass: neurons that stay on one linear piece leave their layer.

find → measure → decide → rewrite, one chain at a time in topological order:

1. interval bounds (IBP) of the chain's pre-activation, propagated from the
   graph inputs (unbounded unless ``input_bounds`` is given) through the
   current, already edited, chains: what they prove never costs accuracy;
2. with calibration data, stream the *current* model (earlier chains already
   rewritten) once: per-neuron piece statistics of the pre-activation and, for
   the data-aware SVD, the Gram of every input a new path would read;
3. decide (``decide/linearity.py``): which neurons are linear / constant /
   mixed, which of them leave (only when that saves parameters), and how each
   new linear path is stored;
4. rewrite: the leaving neurons go from every member of the chain's dense
   unit group (``passes/units.py``, the view every folding pass works on:
   ``UnitGroup.keep`` slices the producer's rows, the activation's slopes
   and the columns of the consumer and of the linear paths that read the
   hidden activation, each through its op's handler); then the bias
   corrections and new paths go onto those readers. What the new paths
   start from (the producer's input and its own paths), the producer's bias
   and the parameters a neuron costs are read through the handlers too.

A linear neuron reads the producer's input *and* the producer's existing
linear paths, so its path to the consumer starts at every one of those
inputs: a skip made for layer i carries on through layer i+1's linear
neurons, as the paper chains skips (a skip from the concatenation of the
earlier inputs = one path per input here).

Modes: ``extended`` (default) removes constant neurons too, corrects the mean
error of approximately linear/constant neurons in the consumer's bias, and
stores paths in the cheapest form; ``paper`` moves only linear neurons into
dense skips, only for a layer where that saves parameters, without bias
correction - the published method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx

from ..decide import linearity as decide
from ..distributed import StatsJob
from ..errors import UsageError
from ..find.chains import Chain, DenseGraph, find_dense_graph
from ..find.dense import DenseOp, LinearPath
from ..find.graph_index import GraphIndex
from ..measure.data import CalibrationSet, load_calibration
from ..measure.stats import GramAccumulator, NeuronStats, RowChunks
from ..measure.stream import known_types, needed_part
from ..rewrite import materialize
from .base import LayerReport, PassContext, PassResult
from .cache import model_digest
from .units import UnitGroup, dense_group

#: Ops that only move elements around: bounds of their output are the hull of
#: their input's bounds (used to carry IBP bounds through Flatten/Reshape).
_SHAPE_ONLY_OPS = ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose")


@dataclass
class _Sink:
    """Something that reads the hidden activation linearly: the consumer
    (factors ``[W_cᵀ]``) or a linear path of some op (its factors)."""

    op: DenseOp
    factors: list[np.ndarray]  # first factor: one row per hidden neuron

    def matrix(self) -> np.ndarray:
        return decide.product(self.factors)


@dataclass
class _Plan:
    """What happens to one chain: which neurons leave and what replaces them."""

    leave: np.ndarray  # bool (n,)
    move_linear: bool
    move_constant: bool
    sinks: list[_Sink]  # the consumer first, then path readers
    paths: list[tuple[_Sink, str, decide.PathChoice]] = field(default_factory=list)  # (sink, input, choice)
    bias_delta: list[np.ndarray] = field(default_factory=list)  # per sink, in the order of ``sinks``
    params: int = 0  # predicted parameters of the chain's ops afterwards

    @property
    def new_nodes(self) -> int:
        """Graph nodes the new paths add: one MatMul per factor and one Add each."""
        return sum(len(c.factors) + 1 for _s, _i, c in self.paths if c.factors)

    def cost(self, node_cost: int) -> int:
        return self.params + node_cost * self.new_nodes


class LinearityPass:
    """Linearity folding (Dobler & Lemmerich, arXiv 2506.21146) on every
    chain with a piecewise-linear activation (Relu, LeakyRelu, PRelu, Clip).

    threshold: a neuron on one piece for at least this share of calibration
        rows is linear (or constant); 1.0 = only neurons that never left their
        piece, which is exact on the calibration data.
    mode: ``"extended"`` (constant neurons removed, mean-error bias
        correction, cheapest path form) or ``"paper"`` (linear neurons only,
        dense skips, only where they save parameters, no correction).
    path_form: how extended mode stores a path: ``"auto"`` (fewest
        parameters), ``"dense"``, ``"factored"`` (exact, rank ≤ |L|) or
        ``"svd"`` (data-aware truncation). Paper mode is always dense.
    svd_tolerance: relative energy of a path's output on the calibration
        inputs that a truncation may discard. With threshold 1.0 ``auto``
        asks for a lossless result and only truncates what is numerically
        zero (``decide.LOSSLESS_SVD_TOLERANCE``); a forced ``svd`` always
        uses ``svd_tolerance``.
    input_bounds: ``(lo, hi)`` bounds of the graph inputs (scalars or
        per-feature vectors of the last axis) for proving neurons linear or
        dead; ``None``: unbounded.
    layers: only these chains (names as ``find`` gives them, ``layer0``…, or
        producer node names); ``None``: all.
    """

    name = "linearity"

    def __init__(self, threshold: float = 1.0, mode: str = "extended", path_form: str = "auto",
                 svd_tolerance: float = 1e-4, input_bounds=None, layers: Iterable[str] | None = None,
                 node_cost: int = decide.PATH_NODE_COST_PARAMS):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
                or not 0.0 < float(threshold) <= 1.0:
            raise UsageError(f"linearity threshold must be in (0, 1], got {threshold!r}")
        if mode not in decide.MODES:
            raise UsageError(f"linearity mode must be one of {', '.join(decide.MODES)}, got {mode!r}")
        if path_form not in decide.PATH_FORMS:
            raise UsageError(f"linear path form must be one of {', '.join(decide.PATH_FORMS)}, got {path_form!r}")
        if not (isinstance(svd_tolerance, (int, float, np.floating)) and 0.0 <= float(svd_tolerance) < 1.0):
            raise UsageError(f"svd tolerance must be in [0, 1), got {svd_tolerance!r}")
        if input_bounds is not None:
            try:
                lo, hi = (np.asarray(v, dtype=np.float64) for v in input_bounds)
                ordered = bool(np.all(lo <= hi))  # False with NaN too
            except (TypeError, ValueError):
                raise UsageError("input_bounds must be a pair (lo, hi) of numbers or arrays") from None
            if not ordered:
                raise UsageError("input_bounds must satisfy lo <= hi (and hold no NaN)")
            input_bounds = (lo, hi)
        if isinstance(node_cost, bool) or not isinstance(node_cost, (int, np.integer)) or node_cost < 0:
            raise UsageError(f"node cost must be a non-negative integer, got {node_cost!r}")
        self.threshold = float(threshold)
        self.mode = mode
        self.node_cost = int(node_cost)  # extended mode: parameters one extra graph node must save
        self.path_form = "dense" if mode == "paper" else path_form
        self.svd_tolerance = float(svd_tolerance)
        self.input_bounds = input_bounds
        self.layers = None if layers is None else set(layers)

    @property
    def extended(self) -> bool:
        return self.mode == "extended"

    def _truncation_tolerance(self) -> float:
        if self.path_form == "auto" and self.threshold >= 1.0:
            return min(self.svd_tolerance, decide.LOSSLESS_SVD_TOLERANCE)
        return self.svd_tolerance

    # ------------------------------------------------------------------
    def __call__(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        work = model  # never modified: find indexes it, materialize builds a new model
        view = find_dense_graph(work)
        index = GraphIndex(work)
        data = ctx.calibration
        if data is not None and not isinstance(data, CalibrationSet) and not getattr(data, "is_ray_dataset", False):
            data = load_calibration(data, work)
        notes: list[str] = []
        if data is None:
            notes.append("linearity: no calibration data, only provably dead or linear neurons were handled")
            if self.path_form == "svd":
                notes.append("linearity: an SVD truncation needs calibration data; paths are stored exactly")

        current = work  # the model as edited so far (what the next chain is measured on)
        stale = False
        edited = False
        reports: list[LayerReport] = []
        # one bounds memo for the whole walk: a deep model's layers are bounded
        # once each, not once per later layer
        bounds = _Bounds(view, index, self.input_bounds)
        for chain in view.chains:
            view.release_except(chain)  # unedited weights are read again when needed
            report = self._blank_report(chain)
            reports.append(report)
            if self.layers is not None and chain.name not in self.layers and chain.producer.name not in self.layers:
                report.note = "not selected"
                continue
            if not chain.activation.is_piecewise_linear:
                report.note = f"{chain.activation.describe()} is not piecewise linear"
                continue
            if data is not None and stale:
                current, stale = materialize(work, view), False
            plan = self._plan(chain, view, index, current, data, ctx, report, bounds)
            if plan is None or not plan.leave.any():
                continue
            self._apply(chain, view, plan)
            predicted, plan = plan.params, None  # its sinks view the pre-edit weights: let them go now
            bounds.memo.clear()  # widths changed: bounds are recomputed (only after an edit)
            edited, stale = True, True
            report.width_after = chain.width
            report.params_after = _chain_params(chain)
            if report.params_after != predicted:  # the prediction drives decisions: keep it honest
                raise AssertionError(f"{chain.name}: predicted {predicted} parameters, got {report.params_after}")
        plan = None
        if not edited:
            return PassResult(model=model, changed=False, layers=reports, notes=notes)
        return PassResult(model=materialize(work, view, release=True), changed=True, layers=reports, notes=notes)

    # ------------------------------------------------------------------
    @staticmethod
    def _blank_report(chain: Chain) -> LayerReport:
        params = _chain_params(chain)
        return LayerReport(layer=chain.name, producer=chain.producer.name, activation=chain.activation.describe(),
                           width_before=chain.width, width_after=chain.width, params_before=params,
                           params_after=params)

    def _plan(self, chain: Chain, view: DenseGraph, index: GraphIndex, current: onnx.ModelProto,
              data: CalibrationSet | None, ctx: PassContext, report: LayerReport, bounds: _Bounds) -> _Plan | None:
        group = dense_group(chain)  # what the units are: the producer's rows, the readers' columns
        n = group.width
        pieces = decide.PieceTable.of(chain.activation, n)
        z_bounds = bounds.pre_activation(chain.producer)

        # a linear neuron reads the producer's input and every input of its paths
        sources = [src for m in group.producers for src in m.handler.sources(m.op)]
        sinks = _sinks(group)

        evidence = None
        if data is not None:
            stats = _cached_measure(ctx, current, [chain.activation.input], data,
                                    f"neurons {chain.activation.describe()}",
                                    lambda: _measure_neurons(current, chain, data, ctx))
            evidence = decide.PieceEvidence.from_counts(stats.count, stats.piece_counts, stats.mean_z, stats.mean_a,
                                                        min_z=stats.min_z, max_z=stats.max_z, pieces=pieces)
        classes = decide.classify_neurons(pieces, self.threshold, evidence=evidence, z_bounds=z_bounds,
                                          allow_constant=self.extended, mean_correction=self.extended)
        n_lin, n_const = classes.count(decide.LINEAR), classes.count(decide.CONSTANT)
        provable = int(np.count_nonzero(classes.provable))
        if n_lin + n_const == 0:
            report.note = "no linear or constant neuron"
            return None
        grams: dict[str, GramAccumulator] = {}
        if data is not None and n_lin and self.extended and self.path_form in ("auto", "svd"):
            # a second run, only for layers that have linear neurons: most have none,
            # and a Gram costs rows × width² per input
            inputs = [name for name, _f in sources]
            grams = _cached_measure(ctx, current, inputs, data, "grams",
                                    lambda: _measure_grams(current, chain, inputs, data, ctx))

        shape = _layer_shape(group, sinks)
        if self.extended:
            options = [(False, True), (True, True)] if n_lin else [(False, True)]
        else:
            options = [(True, False)]
        plans = [self._build(group, classes, sources, sinks, shape, grams, move_linear=ml, move_constant=mc)
                 for ml, mc in options]
        node_cost = self.node_cost if self.extended else 0
        best = min(plans, key=lambda p: p.cost(node_cost))  # min keeps the first: fewer changes on ties
        notes = [f"{provable} provable"] if provable else []
        if best.cost(node_cost) >= shape.params:
            extra = best.params - shape.params
            cost = f"would add {extra} parameters" if extra > 0 else "would not save parameters"
            if extra < 0:
                cost = (f"would save only {-extra} parameters for {best.new_nodes} more graph nodes (each costs "
                        f"about as much run time as {node_cost} parameters)")
            report.note = "; ".join([f"{n_lin} linear / {n_const} constant neurons stay: removing them {cost}", *notes])
            return None
        is_lin, is_const = classes.kind == decide.LINEAR, classes.kind == decide.CONSTANT
        report.linear = int(np.count_nonzero(best.leave & is_lin))
        report.constant = int(np.count_nonzero(best.leave & is_const))
        if n_lin and not best.move_linear:
            notes.append(f"{n_lin} linear neurons stay: their path would cost more than it saves")
        wanted = np.count_nonzero((is_lin & best.move_linear) | (is_const & best.move_constant))
        if report.linear + report.constant < wanted:
            notes.append("one neuron kept so that the layer is not empty")
        consumer = best.sinks[0]
        primary = sources[0][0]  # the producer's own input
        main = next((c for s, inp, c in best.paths if s is consumer and inp == primary), None)
        if main is not None:
            report.path_form, report.path_rank = main.form, main.rank
            if main.form in ("svd", "none"):
                notes.append(f"path truncated to rank {main.rank}, {main.discarded:.2e} of its energy discarded")
        chained = [c.form for s, inp, c in best.paths if s is consumer and inp != primary]
        if chained:
            notes.append(f"{len(chained)} chained paths ({', '.join(sorted(set(chained)))})")
        to_readers = [c.form for s, _inp, c in best.paths if s is not consumer]
        if to_readers:
            notes.append(f"{len(to_readers)} paths into readers of the hidden activation")
        report.note = "; ".join(notes)
        return best

    def _build(self, group: UnitGroup, classes: decide.NeuronClasses, sources, sinks: list[_Sink],
               shape: decide.LayerShape, grams: dict[str, GramAccumulator], *, move_linear: bool,
               move_constant: bool) -> _Plan:
        (producer,) = group.producers
        leave = decide.removal_mask(classes, move_linear, move_constant)
        linear = np.flatnonzero(leave & (classes.kind == decide.LINEAR))
        gone = np.flatnonzero(leave)
        # what each leaving neuron adds to a reader, besides its linear path
        b_p = producer.handler.row_bias(producer.op)
        value = classes.offset + np.where(classes.kind == decide.LINEAR, classes.slope * b_p, 0.0)
        plan = _Plan(leave=leave, move_linear=move_linear, move_constant=move_constant, sinks=sinks)
        new_params, new_biases = 0, 0
        tolerance = self._truncation_tolerance()
        for sink in sinks:
            delta = value[gone] @ sink.matrix()[gone, :] if gone.size else np.zeros(sink.op.out_features)
            if linear.size:
                for src_input, src_factors in sources:
                    factors = decide.compose_path(src_factors, linear, classes.slope[linear], sink.factors)
                    acc = grams.get(src_input)
                    choice = decide.choose_path_form(
                        factors, self.path_form, gram=None if acc is None else acc.XtX,
                        gram_root=None if acc is None else acc.xtx_root(decide.SVD_RIDGE),
                        mean_input=None if acc is None else acc.mean_x, tolerance=tolerance)
                    if choice.bias_shift is not None:
                        delta = delta + choice.bias_shift
                    plan.paths.append((sink, src_input, choice))  # rank 0 ("none") stores nothing
                    new_params += choice.params
            plan.bias_delta.append(delta)
            if sink.op.bias is None and np.any(delta != 0):
                new_biases += sink.op.out_features
        plan.params = decide.params_after(shape, int(gone.size), new_params, new_biases)
        return plan

    @staticmethod
    def _apply(chain: Chain, view: DenseGraph, plan: _Plan) -> None:
        # the leaving units go from every member of the group: producer rows,
        # activation slopes, the consumer's and path readers' columns
        dense_group(chain).keep(np.flatnonzero(~plan.leave))
        consumer = plan.sinks[0]
        cons = consumer.op
        consumer_paths = [LinearPath(input=inp, factors=c.factors) for s, inp, c in plan.paths
                          if s is consumer and c.factors]
        added = [(cons, len(cons.paths) + i) for i in range(len(consumer_paths))]
        delta = plan.bias_delta[0]
        if np.any(delta != 0):
            cons.bias = cons.bias_or_zero() + delta
        for p in consumer_paths:
            if p.factors[-1].shape[1] != cons.out_features:
                raise ValueError(f"{chain.name}: new path does not end in {cons.out_features} outputs")
            cons.paths.append(p)
        cons.changed = True
        # readers that are linear paths of other ops: keep() already dropped
        # the leaving rows of their first factor; their bias and paths are ours
        for sink, delta in zip(plan.sinks[1:], plan.bias_delta[1:]):
            op = sink.op
            if np.any(delta != 0):
                op.bias = op.bias_or_zero() + delta
            for s, inp, c in plan.paths:
                if s is sink and c.factors:
                    op.paths.append(LinearPath(input=inp, factors=c.factors))
                    added.append((op, len(op.paths) - 1))
            op.changed = True
        # a new path that reads some chain's hidden activation must follow that
        # chain's later edits
        for op, k in added:
            for other in view.chains:
                if other.activation.output == op.paths[k].input:
                    other.path_readers.append((op, k))


def _sinks(group: UnitGroup) -> list[_Sink]:
    """What reads the hidden units (the dense unit group's consumers): the
    consumer first, then every linear path reading the hidden activation."""
    return [_Sink(m.handler.owner(m.op), m.handler.reader_factors(m.op)) for m in group.consumers]


def _chain_params(chain: Chain) -> int:
    """Parameters of the producer, consumer and path-reading ops of a chain."""
    return dense_group(chain).num_params


def _layer_shape(group: UnitGroup, sinks: list[_Sink]) -> decide.LayerShape:
    row_cost = sum(m.handler.row_params(m.op) for m in group.producers)
    col_cost = sum(s.factors[0].shape[1] for s in sinks)
    return decide.LayerShape(row_cost=int(row_cost), col_cost=int(col_cost), params=group.num_params)


def _cached_measure(ctx: PassContext, model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, what: str,
                    compute):
    """``compute()`` - statistics of ``tensors`` of ``model`` on ``data`` - shared
    within a budget search by every candidate whose model computes those
    tensors identically (keyed by the model part that computes them)."""
    if ctx.cache is None:
        return compute()
    types = known_types(model)
    part = needed_part(model, {name: onnx.helper.tensor_dtype_to_np_dtype(types.get(name, onnx.TensorProto.FLOAT))
                               for name in tensors})
    key = (what, model_digest(part), tuple(tensors), ctx.cache.identity(data), ctx.batch_size)
    return ctx.cache.get_or_compute(key, compute)


def _measure_neurons(model: onnx.ModelProto, chain: Chain, data: CalibrationSet, ctx: PassContext) -> NeuronStats:
    """Piece statistics of the chain's pre-activation on ``data`` (one streamed run)."""
    pre = chain.activation.input
    job = StatsJob([(model, [pre])], partial(_new_neuron_stats, chain.activation, chain.width),
                   partial(_add_neuron_rows, pre))
    return ctx.measure(job, data, f"linearity: measure {chain.name}")["neurons"]


def _new_neuron_stats(activation, width: int) -> dict:
    return {"neurons": NeuronStats(activation, width)}


def _add_neuron_rows(pre: str, accs: dict, _start, _feed, _labels, tensors: list) -> None:
    accs["neurons"].update(np.asarray(tensors[0][pre]))


def _measure_grams(model: onnx.ModelProto, chain: Chain, inputs: list[str], data: CalibrationSet,
                   ctx: PassContext) -> dict[str, GramAccumulator]:
    """XᵀX and the mean of every tensor in ``inputs`` on ``data`` (one streamed run)."""
    names = list(dict.fromkeys(inputs))
    job = StatsJob([(model, names)], partial(_new_grams, names), _add_gram_rows)
    return {name: acc.flush() for name, acc in ctx.measure(job, data, f"linearity: path inputs of {chain.name}").items()}


def _new_grams(names: list[str]) -> dict:
    return {name: RowChunks(GramAccumulator(with_bias=False)) for name in names}


def _add_gram_rows(accs: dict, _start, _feed, _labels, tensors: list) -> None:
    for name, acc in accs.items():
        acc.update(np.asarray(tensors[0][name]))


class _Bounds:
    """Interval bounds of tensors of the current (edited) view, from the graph
    inputs' bounds. Per feature of the last axis; scalars where only a hull is
    known (after Flatten/Reshape); (-inf, inf) where nothing is known."""

    def __init__(self, view: DenseGraph, index: GraphIndex, input_bounds):
        self.view = view
        self.index = index
        self.input_bounds = input_bounds
        self.by_output = {c.activation.output: c for c in view.chains}
        self.memo: dict[str, tuple] = {}

    def tensor(self, name: str):
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = (-np.inf, np.inf)  # guards against cycles through odd graphs
        out = (-np.inf, np.inf)
        if name in self.index.graph_inputs:
            if self.input_bounds is not None:
                out = self.input_bounds
        elif name in self.by_output:
            chain = self.by_output[name]
            if chain.activation.is_piecewise_linear:
                zlo, zhi = self.pre_activation(chain.producer)
                out = decide.activation_interval(decide.PieceTable.of(chain.activation, chain.width), zlo, zhi)
        else:
            node = self.index.producer.get(name)
            if node is not None and node.op_type in _SHAPE_ONLY_OPS and node.input:
                lo, hi = self.tensor(node.input[0])
                out = (float(np.min(lo)), float(np.max(hi)))
        self.memo[name] = out
        return out

    def pre_activation(self, op: DenseOp) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of ``W x + b + Σ paths`` of ``op``."""
        lo, hi = _fit_bounds(self.tensor(op.input), op.in_features, op.input)
        was_loaded = op.weight_loaded
        zlo, zhi = decide.interval_matmul(lo, hi, op.weight.T)
        if not was_loaded:  # bounds of a deep layer walk every layer before it: do not hold them all
            op.release()
        for p in op.paths:
            plo, phi = _fit_bounds(self.tensor(p.input), p.factors[0].shape[0], p.input)
            a, b = decide.interval_matmul(plo, phi, p.matrix())
            zlo, zhi = zlo + a, zhi + b
        bias = op.bias_or_zero()
        return zlo + bias, zhi + bias


def _fit_bounds(bounds, width: int, name: str):
    lo, hi = bounds
    for v in (lo, hi):
        if np.ndim(v) and np.size(v) not in (1, width):
            raise UsageError(f"input_bounds for '{name}' have {np.size(v)} entries but its last axis has {width}")
    return lo, hi
