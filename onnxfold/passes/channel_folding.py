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
conv that writes or reads them; they are reported (``notes``) and folded only
with ``fold_residual``, as one unit group. Steps 2-3 and the refit are the
folding core's (``passes/foldcore.py``), shared with every other group kind.
Shapes the pass does not support are reported and left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from ..decide import folding as decide
from ..errors import UsageError
from ..find.conv import ConvChain, ConvGraph, ResidualGroup, find_conv_graph
from ..find.graph_index import GraphIndex
from ..rewrite.conv import materialize_convs
from .base import FoldSettings, LayerReport, PassContext, PassResult, fold_in_order
from .cache import PassScope
from .foldcore import FoldCore
from .refit import FoldState, refit_note
from .units import conv_chain_group, residual_group


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
                             "and does not take data read by Ray (Parquet, a Ray Dataset, a shard directory over "
                             "2 GiB); give the calibration data as .npz or use --fold-repair ar")
        view = find_conv_graph(model)
        ratios = self._ratios(view)
        notes = [describe_residual(g, self.fold_residual) for g in view.residual]
        notes += [f"channel folding: {s.where} not folded: {s.reason}" for s in view.skipped]
        groups = [g for g in view.residual if self.fold_residual and g.foldable and g.name in ratios]
        if not view.chains and not groups:
            return PassResult(model, False, [], ["channel folding: no foldable conv chain found", *notes])
        run = _ChannelRun(model, view, ctx, select=self.select, repair=repair, seed=self.seed)
        before = {c.name: c.num_params for c in view.chains}
        # streams first: the chains' refits then also correct their error
        reports = [run.fold_residual(grp, ratios[grp.name]) for grp in groups]
        reports += fold_in_order(view.chains, ratios, ctx, "channel folding", run.fold,
                                 lambda c: _report(c, c.width, note="not selected for folding"),
                                 lambda c: c.num_params, before_each=view.release_except,
                                 before=before)  # unedited kernels are read again when needed
        notes += self.settings.auto_note(ctx, repair, "channel folding")
        out = run.state.current_model() if run.state.edited else model
        return PassResult(out, run.state.edited, reports, notes)


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
        self.view = view
        self.state = FoldState(model, lambda release: materialize_convs(model, view))
        self.core = FoldCore(self.state, ctx, select=select, repair=repair, seed=seed)
        self.index = GraphIndex(model)
        # its steps: (chain or stream, ratio) in the order folded
        self.scope = PassScope(ctx, model, ("channel folding", select, repair, seed))

    def _refit_key(self, member):
        """In a budget search a refit is shared by every candidate that folds
        the same model the same way up to it, and which consumer of the last
        step this is (a stream's consumers are refit one after another)."""
        key = self.scope.key()
        return None if key is None else ("ls refit", key, member.op.name)

    def fold(self, chain: ConvChain, ratio: float) -> LayerReport:
        self.scope.steps.append((chain.name, ratio))
        n = chain.width
        k = decide.target_width(n, ratio)
        if k == n:
            return _report(chain, n, note="nothing to fold")
        group = conv_chain_group(chain, self.index)
        plan = self.core.fold(group, k, f"channel folding {chain.name}")
        if plan is None:
            return _report(chain, n, note="nothing to fold")
        note = ""
        if self.core.repair == "ls":
            note = self._refit(group.consumers[0], chain.consumer.name)
        return _report(chain, n, merged=plan.merged, pruned=plan.pruned, note=note)

    def _refit(self, member, what: str) -> str:
        outcome, why = self.core.refit(member, f"channel folding {what}: refit", self._refit_key(member))
        return why or refit_note(outcome)

    def fold_residual(self, grp: ResidualGroup, ratio: float) -> LayerReport:
        self.scope.steps.append((grp.name, ratio))
        group = residual_group(grp, self.view, self.index)
        n = group.width
        k = decide.target_width(n, ratio)
        members = [m.op for m in group.producers + group.consumers]
        report = LayerReport(layer=grp.name, producer=", ".join(grp.producers), activation="residual stream",
                             width_before=n, width_after=n, params_before=sum(m.num_params for m in members))
        report.params_after = report.params_before
        if k == n:
            report.note = "nothing to fold"
            return report
        plan = self.core.fold(group, k, f"channel folding {grp.name}")
        if plan is None:
            report.note = "nothing to fold"
            return report
        report.merged, report.pruned = plan.merged, plan.pruned
        report.width_after = plan.width_after
        report.params_after = sum(m.num_params for m in members)
        if self.core.repair == "ls":
            report.note = "; ".join(f"{m.op.name}: {self._refit(m, m.op.name)}" for m in group.consumers)
        return report
