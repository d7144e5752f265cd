"""Conv channel folding pass: merge (or prune) the hidden channels of conv chains.

The convolutional counterpart of :class:`onnxfold.passes.folding.FoldingPass`
(method: ``docs/methods.md`` section 3.1-3.2), on the chains
:func:`onnxfold.find.conv.find_conv_graph` finds:

    producer Conv(+BN) → activation → [depthwise Conv(+BN) → [act]] → consumer Conv

One chain at a time, in graph order:

1. BN is folded into its conv (exact);
2. the producer's output channels are clustered by k-means on
   ``[kernel row, bias, consumer's input-channel slice, depthwise kernel/bias]``
   (``select="kmeans"``), or the k channels with the largest kernel L2 norm
   are kept (``select="magnitude"``); a cluster's producer kernels (and
   depthwise kernels/biases) are averaged, the consumer's input-channel slices
   summed;
3. repair: ``"ar"`` Fold-AR (data-free), ``"repair"`` REPAIR (per-channel
   mean/std of the merged pre-activation matched, on calibration data, to the
   mean over the cluster of the original channels' mean/std), ``"ls"`` ridge
   least-squares refit of the consumer conv on calibration patches (im2col),
   target = the original model's consumer output; ``"auto"``: ``ls`` with
   data, ``ar`` without.

Channels on a residual stream (joined by Add/Sub/Mul) are coupled across every
conv that writes or reads them; they are reported (``notes``) and not folded.
Shapes the pass does not support are reported and left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx

from ..decide import channels as dch
from ..decide import folding as decide
from ..distributed import StatsJob
from ..errors import UsageError
from ..find.activations import ActivationSpec
from ..find.conv import (
    ConvChain,
    ConvGraph,
    ConvOp,
    GemmReader,
    ResidualGroup,
    find_conv_graph,
)
from ..find.graph_index import GraphIndex
from ..measure.data import CalibrationSet
from ..measure.stats import GramAccumulator, NeuronStats
from ..measure.stream import needed_part, stream_tensors
from ..rewrite.conv import (
    ChannelEdit,
    apply_channel_edit,
    materialize_convs,
    merge_output_channels,
    sum_input_channels,
)
from .base import FoldSettings, LayerReport, PassContext, PassResult, heldout_mask


#: Patch rows (output positions) used per batch by the least-squares refit:
#: neighbouring positions are highly redundant, a random subset is enough and
#: keeps the im2col memory bounded.
MAX_ROWS_PER_BATCH = 8192


@dataclass
class _Plan:
    labels: np.ndarray  # cluster per channel, -1 = pruned
    merged: int = 0
    pruned: int = 0

    @property
    def width_after(self) -> int:
        return int(self.labels.max()) + 1


class ChannelFoldingPass:
    """Model folding on the hidden channels of conv chains.

    ratio: share of each chain's hidden channels removed (one float), or
        ``{chain name: ratio}`` (chains not named are left alone).
    select: ``"kmeans"`` (merge clusters) or ``"magnitude"`` (keep the k
        channels with the largest BN-folded kernel L2 norm: pruning baseline).
    repair: ``"auto"``, ``"none"``, ``"ar"``, ``"repair"``, ``"ls"`` (see module doc).
    seed: k-means seed and seed of the internal held-out split.
    fold_residual: also fold residual-stream channels (off by default, as in
        Wang et al.): every conv writing the stream gets the same assignment
        (rows averaged), every conv or pooled Gemm reading it sums its input
        slices. Streams with other readers or parameterised ops on them are
        reported and left alone.
    layers: only fold these chains (conv0, conv1, ...).
    """

    name = "channel_folding"

    def __init__(self, ratio: float | Mapping[str, float], select: str = "kmeans", repair: str = "auto",
                 seed: int = 0, fold_residual: bool = False, layers: Sequence[str] | None = None):
        self.settings = FoldSettings("channel fold", ratio, select, repair, seed, layers)
        self.ratio, self.select, self.repair, self.seed = ratio, select, repair, self.settings.seed
        self.layers = self.settings.layers
        self.fold_residual = bool(fold_residual)

    def _ratios(self, view: ConvGraph) -> dict[str, float]:
        names = [c.name for c in view.chains] + ([g.name for g in view.residual] if self.fold_residual else [])
        return self.settings.ratios(names, "unknown conv chain {!r}", "conv chains")

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        repair = self.settings.repair_mode(ctx)
        if repair == "ls" and getattr(ctx.calibration, "is_ray_dataset", False):
            raise UsageError("conv channel folding with the least-squares refit streams its data in this process "
                             "and does not take a Parquet / Ray Dataset source; give the calibration data as .npz "
                             "or use --fold-repair ar")
        view = find_conv_graph(model)
        ratios = self._ratios(view)
        notes = [describe_residual(g, self.fold_residual) for g in view.residual]
        notes += [f"channel folding: {s.where} not folded: {s.reason}" for s in view.skipped]
        groups = [g for g in view.residual if self.fold_residual and g.foldable and g.name in ratios]
        if not view.chains and not groups:
            return PassResult(model, False, [], ["channel folding: no foldable conv chain found", *notes])
        run = _ChannelRun(model, view, ctx, select=self.select, repair=repair, seed=self.seed)
        before = {c.name: c.num_params for c in view.chains}
        reports: list[LayerReport] = []
        for grp in groups:  # streams first: the chains' refits then also correct their error
            rep = run.fold_residual(grp, ratios[grp.name])
            reports.append(rep)
        for i, chain in enumerate(view.chains):
            view.release_except(chain)  # unedited kernels are read again when needed
            ctx.report_progress("channel folding", i, len(view.chains))
            if chain.name in ratios:
                reports.append(run.fold(chain, ratios[chain.name]))
            else:
                reports.append(_report(chain, chain.width, note="not selected for folding"))
        ctx.report_progress("channel folding", len(view.chains), len(view.chains))
        for rep, chain in zip(reports[len(groups):], view.chains):
            rep.params_before, rep.params_after = before[chain.name], chain.num_params
        if self.repair == "auto":
            data = "with" if ctx.calibration is not None else "no"
            notes.append(f"channel folding: repair {repair!r} chosen automatically ({data} calibration data)")
        out = run.current_model() if run.edited else model
        return PassResult(out, run.edited, reports, notes)


def describe_residual(g, fold: bool = False) -> str:
    width = "?" if g.width is None else g.width
    if not fold:
        what = "not folded (fold_residual is off)"
    elif g.foldable:
        what = "folded with one shared assignment (fold_residual)"
    else:
        what = f"not folded: {g.reason}"
    return (f"channel folding: {g.name}: {width} residual-stream channels coupled by {len(g.joins)} join(s)"
            f" ({', '.join(g.joins)}); written by {', '.join(g.producers) or 'the graph input'}, read by"
            f" {', '.join(g.readers) or 'nothing'}: {what}")


def _report(chain: ConvChain, width_before: int, **kw) -> LayerReport:
    act = chain.activation.describe()
    if chain.mids:
        act += " + depthwise " + ", ".join(m.name for m, _ in chain.mids)
    return LayerReport(layer=chain.name, producer=chain.producer.name, activation=act,
                       width_before=width_before, width_after=chain.width, **kw)


class _ChannelRun:
    def __init__(self, model: onnx.ModelProto, view: ConvGraph, ctx: PassContext, *, select: str, repair: str,
                 seed: int):
        self.original = model
        self.view = view
        self.ctx = ctx
        self.select = select
        self.repair = repair
        self.seed = seed
        self.edited = False
        self._current: onnx.ModelProto | None = model
        self._ix = GraphIndex(model)
        self._out_maps: dict[str, np.ndarray] = {}  # output tensor of a folded stream's writer -> row map

    def current_model(self) -> onnx.ModelProto:
        if self._current is None:
            self._current = materialize_convs(self.original, self.view)
        return self._current

    def _apply(self, chain: ConvChain, edit: ChannelEdit) -> None:
        apply_channel_edit(chain, edit)
        self.edited = True
        self._current = None

    # The least-squares refit streams here, in this process, on every backend: its row
    # subsample draws from one RNG stream across the batches in order, which shards
    # run on other workers could not reproduce (the statistics jobs below can).
    def _stream(self, model, tensors: Mapping[str, np.dtype], data: CalibrationSet,
                task: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        ctx = self.ctx
        for feed, _labels, values in stream_tensors(
                needed_part(model, tensors), list(tensors), data, batch_size=ctx.batch_size,
                providers=ctx.providers, progress=lambda done, total: ctx.report_progress(task, done, total)):
            yield next(iter(feed.values())).shape[0], values

    def _stream_both(self, data: CalibrationSet, current: Mapping[str, np.dtype], original: Mapping[str, np.dtype],
                     task: str):
        """(samples, current model's tensors, original model's tensors) per batch, in lockstep."""
        if not self.edited or not original:
            for count, values in self._stream(self.current_model(), {**current, **original}, data, task):
                yield count, values, values
            return
        orig = self._stream(self.original, original, data, task)
        for count, values in self._stream(self.current_model(), current, data, task):
            yield count, values, next(orig)[1]

    # -- one chain -------------------------------------------------------
    def fold(self, chain: ConvChain, ratio: float) -> LayerReport:
        n = chain.width
        k = decide.target_width(n, ratio)
        if k == n:
            return _report(chain, n, note="nothing to fold")
        stats = self._measure(chain) if self.repair == "repair" else None
        plan = self._plan(chain, k)
        row_map, col_map = decide.cluster_maps(plan.labels)
        edit = ChannelEdit(row_map=row_map, col_map=col_map)
        if self.repair == "ar" and self.select == "kmeans":
            edit.row_scale = decide.fold_ar_scale(chain.producer.rows(), plan.labels)
        elif self.repair == "repair":
            target, current = stats
            merged_mean, merged_std = decide.merged_moments(row_map, current.mean_x, current.sxx / current.count)
            t_std = np.sqrt(np.clip(np.diag(target.sxx) / target.count, 0.0, None))
            edit.row_scale, edit.row_shift = decide.repair_affine(row_map @ target.mean_x, row_map @ t_std,
                                                                  merged_mean, merged_std)
        self._apply(chain, edit)
        note = self._refit(chain) if self.repair == "ls" else ""
        return _report(chain, n, merged=plan.merged, pruned=plan.pruned, note=note)

    def _plan(self, chain: ConvChain, k: int) -> _Plan:
        prod, cons = chain.producer, chain.consumer
        n = chain.width
        labels = np.full(n, -1, dtype=np.int64)
        if self.select == "kmeans":
            own = [prod.rows(), prod.bias_or_zero()[:, None]]
            for m, _ in chain.mids:
                own += [m.rows(), m.bias_or_zero()[:, None]]
            readers = np.moveaxis(cons.weight, 1, 0).reshape(n, -1)
            labels = dch.channel_labels(np.hstack(own), readers, k, seed=self.seed)
            return _Plan(labels, merged=int(n - labels.max() - 1))
        kept = decide.magnitude_keep(prod.rows(), k)
        labels[kept] = np.arange(kept.size)
        return _Plan(labels, pruned=int(n - kept.size))

    def _measure(self, chain: ConvChain) -> tuple[GramAccumulator, GramAccumulator]:
        """(original's, current model's) per-channel moments of the producer's
        pre-activation, over every position of every calibration sample."""
        return self._measure_ops([chain.producer], chain.name)[chain.producer.output]

    # -- least-squares refit ---------------------------------------------
    def _conv_geometry(self, op: ConvOp) -> tuple[tuple, str]:
        node = self._ix.node_by_name[op.name]
        kernel = tuple(op.weight.shape[2:])
        if op.group != 1:
            return (), "ls: grouped conv is not refit; kept the plain fold"
        if len(kernel) != 2:
            return (), f"ls: {len(kernel)}-D conv is not refit (2-D only); kept the plain fold"
        auto_pad = self._ix.attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            return (), f"ls: auto_pad {auto_pad} is not refit; kept the plain fold"
        strides = tuple(self._ix.attr(node, "strides", [1, 1]))
        pads = tuple(self._ix.attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else (0, 0, 0, 0)
        dilations = tuple(self._ix.attr(node, "dilations", [1, 1]))
        return (kernel, strides, pads, dilations), ""

    def _heldout_samples(self) -> np.ndarray | None:
        return heldout_mask(self.ctx.calibration.num_samples, self.seed)

    def _refit_grams(self, inp: str, inp_dtype, out: str, out_dtype, make_x, width_out: int, data: CalibrationSet,
                     b_prior: np.ndarray, held_samples: np.ndarray | None, task: str):
        """Least-squares statistics for refitting the op reading ``inp`` and
        writing ``out``: X = ``make_x(current input)`` (one row per output
        position), Y = original output − (current output − b_prior); rows of
        held-out samples go to the second accumulator. Returns (fit, held,
        spread of the held-out target). When ``out`` is on a folded residual
        stream, the original output is mapped by that stream's row map (a
        merged channel's target is its cluster's mean)."""
        out_map = self._out_maps.get(out)
        fit, held = GramAccumulator(with_bias=True), GramAccumulator(with_bias=True)
        held_target = NeuronStats(ActivationSpec("identity"), width_out)
        rng = np.random.default_rng(self.seed + 1)
        start = 0
        for count, cur, orig in self._stream_both(data, {inp: inp_dtype, out: out_dtype}, {out: out_dtype}, task):
            X = make_x(cur[inp])
            current, target = dch.nchw_rows(cur[out]), dch.nchw_rows(orig[out])
            if out_map is not None:
                target = target @ out_map.T
            if X.shape[0] != current.shape[0]:
                raise RuntimeError(f"{out}: {X.shape[0]} input rows for {current.shape[0]} output positions")
            per_sample = X.shape[0] // count
            sample_of_row = start + np.arange(X.shape[0]) // per_sample
            is_held = np.zeros(X.shape[0], dtype=bool) if held_samples is None else held_samples[sample_of_row]
            start += count
            for acc, rows in ((fit, ~is_held), (held, is_held)):
                idx = np.flatnonzero(rows)
                if idx.size > MAX_ROWS_PER_BATCH:
                    idx = np.sort(rng.choice(idx, MAX_ROWS_PER_BATCH, replace=False))
                if idx.size:
                    acc.update(X[idx], target[idx].astype(np.float64) - current[idx] + b_prior)
                    if acc is held:
                        held_target.update(target[idx])
        return fit, held, float(held_target.m2_z.sum())

    def _solve(self, what: str, *grams_args) -> tuple:
        """Ridge refit (``decide.refit_consumer``) of an op with prior weight
        ``w_prior`` (out × features); returns (Refit, note)."""
        inp, inp_dtype, out, out_dtype, make_x, width_out, w_prior, b_prior = grams_args
        task = f"channel folding {what}: refit"
        if self.ctx.heldout is not None:
            fit, _, _ = self._refit_grams(inp, inp_dtype, out, out_dtype, make_x, width_out, self.ctx.calibration,
                                          b_prior, None, task)
            _, held, spread = self._refit_grams(inp, inp_dtype, out, out_dtype, make_x, width_out, self.ctx.heldout,
                                                b_prior, np.ones(self.ctx.heldout.num_samples, dtype=bool), task)
            final = fit
        else:
            fit, held, spread = self._refit_grams(inp, inp_dtype, out, out_dtype, make_x, width_out,
                                                  self.ctx.calibration, b_prior, self._heldout_samples(), task)
            final = GramAccumulator(with_bias=True).merge(fit).merge(held)
        refit = decide.refit_consumer(fit, held if held.count else None, w_prior, b_prior, final=final,
                                      target_ss=spread)
        if refit.lam is None:
            return None, f"ls: plain fold kept (held-out relative error {refit.kept_error:.3g})"
        if not held.count:
            return refit, f"ls: ridge {refit.lam:g} (too few samples to hold any out)"
        return refit, (f"ls: ridge {refit.lam:g}, held-out relative error {refit.heldout_error:.3g}"
                       f" (plain fold {refit.kept_error:.3g})")

    def _refit_conv(self, op: ConvOp, inp: str, inp_dtype) -> str:
        """Refit ``op`` (reading ``inp``) to reproduce the original model's output of ``op``."""
        geometry, why = self._conv_geometry(op)
        if why:
            return why
        refit, note = self._solve(op.name, inp, inp_dtype, op.output, op.dtype, lambda x: dch.im2col(x, *geometry),
                                  op.out_channels, op.rows().copy(), op.bias_or_zero().copy())
        if refit is not None:
            op.weight = refit.weight.reshape(op.weight.shape)
            op.bias = refit.bias
            op.changed = True
            self.edited, self._current = True, None
        return note

    def _refit_gemm(self, g: GemmReader) -> str:
        refit, note = self._solve(g.name, g.input, g.dtype, g.output, g.dtype, lambda x: np.asarray(x),
                                  g.weight.shape[0], g.weight.copy(), g.bias_or_zero().copy())
        if refit is not None:
            g.weight, g.bias, g.changed = refit.weight, refit.bias, True
            self.edited, self._current = True, None
        return note

    def _refit(self, chain: ConvChain) -> str:
        return self._refit_conv(chain.consumer, chain.hidden, chain.producer.dtype)

    # -- residual streams ------------------------------------------------
    def fold_residual(self, grp: ResidualGroup, ratio: float) -> LayerReport:
        view = self.view
        producers = [view.ops[p] for p in grp.producers]
        convs = [view.ops[c] for c in grp.conv_readers]
        gemms = [view.gemms[g] for g in grp.gemm_readers]
        n = int(grp.width)
        k = decide.target_width(n, ratio)
        members = [*producers, *convs, *gemms]
        report = LayerReport(layer=grp.name, producer=", ".join(grp.producers), activation="residual stream",
                             width_before=n, width_after=n, params_before=sum(m.num_params for m in members))
        report.params_after = report.params_before
        if k == n:
            report.note = "nothing to fold"
            return report
        stats = self._measure_ops(producers, grp.name) if self.repair == "repair" else None
        if self.select == "kmeans":
            own = np.hstack([np.hstack([p.rows(), p.bias_or_zero()[:, None]]) for p in producers])
            readers = np.hstack([np.zeros((n, 0))] + [np.moveaxis(c.weight, 1, 0).reshape(n, -1) for c in convs]
                                + [g.weight.T for g in gemms])
            labels = dch.channel_labels(own, readers, k, seed=self.seed)
            report.merged = int(n - labels.max() - 1)
        else:
            kept = decide.magnitude_keep(np.hstack([p.rows() for p in producers]), k)
            labels = np.full(n, -1, dtype=np.int64)
            labels[kept] = np.arange(kept.size)
            report.pruned = int(n - kept.size)
        row_map, col_map = decide.cluster_maps(labels)
        for p in producers:
            scale = shift = None
            if self.repair == "ar" and self.select == "kmeans":
                scale = decide.fold_ar_scale(p.rows(), labels)
            elif self.repair == "repair":
                target, current = stats[p.output]
                m_mean, m_std = decide.merged_moments(row_map, current.mean_x, current.sxx / current.count)
                t_std = np.sqrt(np.clip(np.diag(target.sxx) / target.count, 0.0, None))
                scale, shift = decide.repair_affine(row_map @ target.mean_x, row_map @ t_std, m_mean, m_std)
            merge_output_channels(p, row_map, scale, shift)
            self._out_maps[p.output] = row_map
        for r in [*convs, *gemms]:
            sum_input_channels(r, col_map)
        self.edited, self._current = True, None
        report.width_after = k
        report.params_after = sum(m.num_params for m in members)
        if self.repair == "ls":
            notes = [self._refit_conv(c, c.input, c.dtype) for c in convs] + [self._refit_gemm(g) for g in gemms]
            report.note = "; ".join(f"{r.name}: {nt}" for r, nt in zip([*convs, *gemms], notes))
        return report

    def _measure_ops(self, ops: list[ConvOp], what: str) -> dict:
        """{output: (original's, current model's) per-channel moments} of ``ops``' outputs."""
        tensors = {op.output: op.dtype for op in ops}
        if not self.edited:  # one run: both models are the same
            models = [(needed_part(self.current_model(), tensors), list(tensors))]
        else:
            models = [(needed_part(self.current_model(), tensors), list(tensors)),
                      (needed_part(self.original, tensors), list(tensors))]
        job = StatsJob(models, partial(_new_channel_moments, list(tensors)), _add_channel_moments)
        accs = self.ctx.measure(job, self.ctx.calibration, f"channel folding {what}: measuring")
        return {t: (accs["target:" + t], accs["current:" + t]) for t in tensors}


def _new_channel_moments(tensors: list[str]) -> dict:
    out = {}
    for t in tensors:
        out["target:" + t], out["current:" + t] = GramAccumulator(with_bias=True), GramAccumulator(with_bias=True)
    return out


def _add_channel_moments(accs: dict, _start, _feed, _labels, tensors: list) -> None:
    cur, orig = tensors[0], tensors[-1]
    for key, acc in accs.items():
        which, t = key.split(":", 1)
        acc.update(dch.nchw_rows((orig if which == "target" else cur)[t]))
