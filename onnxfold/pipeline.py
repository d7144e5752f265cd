"""The pass pipeline: which passes explicit settings ask for, running a list of
passes one after the other, and merging their per-layer reports.

The budget search (``search.py``) and the API (``api.py``) both run passes
through ``run_passes``; a pass is an object with one job that returns the
model and whether it changed (``passes.base.PassResult``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import onnx

from .errors import UsageError
from .options import OptimizeOptions
from .passes.base import LayerReport, PassContext


def merge_layer_reports(old: list[LayerReport], new: list[LayerReport]) -> list[LayerReport]:
    """Combine per-layer reports of consecutive passes into one row per layer."""
    by = {lr.layer: lr for lr in old}
    for lr in new:
        if lr.layer not in by:
            by[lr.layer] = replace(lr)
            continue
        o = by[lr.layer]
        o.width_after = lr.width_after
        for k in ("linear", "constant", "merged", "pruned"):
            setattr(o, k, getattr(o, k) + getattr(lr, k))
        o.path_form = lr.path_form or o.path_form
        o.path_rank = lr.path_rank if lr.path_rank is not None else o.path_rank
        o.params_after = lr.params_after
        o.note = "; ".join(x for x in (o.note, lr.note) if x)
    return list(by.values())


def run_passes(model: onnx.ModelProto, passes: list, ctx: PassContext):
    if ctx.reference is None:
        ctx = replace(ctx, reference=model)
    current, changed, layers, notes = model, False, [], []
    for p in passes:
        res = p(current, ctx)
        current, changed = res.model, changed or res.changed
        layers = merge_layer_reports(layers, res.layers)
        notes.extend(res.notes)
    return current, changed, layers, notes


def build_passes(opts: OptimizeOptions, *, has_data: bool, conv_chains: Sequence[str] = (),
                 gated: Sequence[str] = ()) -> list:
    """The pass list for explicit settings (the budget search builds its own).
    ``conv_chains``: names of the model's foldable conv chains; a fold ratio
    then also folds their channels (per-layer ratios go to the pass whose
    layer they name); ``gated``: names of its gated MLPs, likewise."""
    lin, fold, seed = opts.linearity, opts.fold, opts.runtime.seed
    linear, fold_ratio, fold_select, fold_repair = lin.enabled, fold.ratio, fold.select, fold.repair
    passes = []
    if linear:
        from .passes.linearity import LinearityPass

        t = 1.0 if lin.threshold is None else float(lin.threshold)
        passes.append(LinearityPass(threshold=t, mode=lin.mode, path_form=lin.path))
    if fold_ratio is not None:
        from .passes.folding import FoldingPass

        dense_ratio, conv_ratio = fold_ratio, fold_ratio
        if isinstance(fold_ratio, Mapping):
            conv_ratio = {k: v for k, v in fold_ratio.items() if k in conv_chains}
            dense_ratio = {k: v for k, v in fold_ratio.items() if k not in conv_chains and k not in gated}
        if dense_ratio or not isinstance(dense_ratio, Mapping):
            passes.append(FoldingPass(ratio=dense_ratio, select=fold_select, repair=fold_repair, seed=seed,
                                      drop_constant=has_data and not linear, allocate=fold.allocate))
        if conv_chains and (conv_ratio or not isinstance(conv_ratio, Mapping)):
            from .passes.channel_folding import ChannelFoldingPass

            passes.append(ChannelFoldingPass(ratio=conv_ratio, select=fold_select, repair=fold_repair, seed=seed,
                                             fold_residual=fold.residual))
        gated_ratio = {k: v for k, v in fold_ratio.items() if k in gated} if isinstance(fold_ratio, Mapping) \
            else fold_ratio
        if gated and (gated_ratio or not isinstance(gated_ratio, Mapping)):
            from .passes.head_folding import GatedFoldingPass

            passes.append(GatedFoldingPass(ratio=gated_ratio, select=fold_select, repair=fold_repair, seed=seed))
    if fold.heads is not None:
        from .passes.head_folding import HeadFoldingPass

        passes.append(HeadFoldingPass(heads=fold.heads, select=fold_select, repair=fold_repair, seed=seed,
                                      kv_heads=fold.kv_heads))
    # the least-squares repair goes on past each fold's consumer (passes/downstream.py)
    if has_data and fold_repair in ("auto", "ls") and fold.refit != "consumer" \
            and (fold_ratio is not None or fold.heads is not None):
        from .passes.downstream import DownstreamRefitPass

        passes.append(DownstreamRefitPass(keep="always" if fold.refit == "downstream" else "better", seed=seed))
    if has_data and fold.refine_epochs and fold_ratio is not None:
        from .passes.refine import BlockRefinePass

        passes.append(BlockRefinePass(epochs=fold.refine_epochs, seed=seed))
    return passes


def choose_mode(opts: OptimizeOptions, *, has_data: bool) -> str:
    """"fixed": the user gave settings; "search": find settings for a budget;
    "exact": no data, only rewrites exact for every input (+ data-free folding
    when a ratio was asked for)."""
    budget, explicit = opts.search.budget, opts.explicit
    if not has_data:
        if budget is not None and (budget.has_quality_limit or budget.target_ratio is not None) and not budget.is_default:
            raise UsageError("a budget needs calibration data to judge candidates: pass --calib")
        return "exact"
    if explicit:
        return "fixed"
    return "search"
