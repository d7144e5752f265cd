"""Head folding and gated-MLP folding passes for exported transformers.

find → decide → rewrite → (repair), one block at a time in graph order:

1. ``find.attention.find_transformer``: attention blocks (q/k/v/o projections,
   head counts, the Reshape constants that count heads) and gated MLPs; what
   looks like attention but does not match (fused nodes, grouped-query
   attention, ...) is reported in the notes and left untouched;
2. ``decide.heads``: cluster the heads (k-means on per-head weights) or keep
   the largest (magnitude pruning), merge them (medoid q/k + best rank-Dv v/o,
   or plain averaging with optional Fold-AR);
3. ``rewrite.attention``: new weight initializers, new head-count constants;
4. ``repair="ls"``: ridge refit of the o-projection (of the down projection
   for gated MLPs) on calibration data: X = the folded block's merged-heads
   activation, target = the original model's o-projection output; ridge
   strength chosen on held-out rows, shrunk towards the plain fold
   (``decide.folding.refit_consumer``). Blocks are folded in order, each
   measured on the model with the earlier blocks already folded and refit.

Method: ``docs/methods.md`` section 3.3-3.4; the math is in ``decide/heads.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import onnx

from ..decide import folding as fold
from ..decide import heads as dh
from ..distributed import StatsJob
from ..errors import UsageError
from ..find.activations import ActivationSpec
from ..find.attention import AttentionBlock, GatedMLP, Projection, find_transformer
from ..measure.stats import GramAccumulator, NeuronStats
from ..measure.stream import needed_part
from ..rewrite.attention import ProjectionEdit, ShapeEdit, rewrite_projections
from .base import LayerReport, PassContext, PassResult, heldout_mask

SELECTS = ("kmeans", "magnitude")
REPAIRS = ("auto", "none", "ar", "ls")


def _check(select: str, repair: str) -> None:
    if select not in SELECTS:
        raise UsageError(f"unknown selection {select!r}; choose one of {', '.join(SELECTS)}")
    if repair not in REPAIRS:
        raise UsageError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")


def _repair_mode(repair: str, ctx: PassContext) -> str:
    mode = ("ls" if ctx.calibration is not None else "ar") if repair == "auto" else repair
    if mode == "ls" and ctx.calibration is None:
        raise UsageError("repair 'ls' needs calibration data; give calibration data or use repair 'ar' or 'none'")
    return mode


class _Refitter:
    """Least-squares refits of one projection against the original model.

    Groups of input columns are refit independently, each with its own ridge
    strength (chosen on held-out samples) and intercept:

    * target ``("output", cols)``: the original model's projection output;
      columns outside ``cols`` keep their folded values and stay in the
      prediction (``cols=None``: all columns);
    * target ``("part", cols, orig_cols, bias)``: only what the original's
      columns ``orig_cols`` contributed (``X_orig[:, orig_cols] @ W_orig[:, orig_cols]ᵀ``),
      to be reproduced by the current columns ``cols`` plus an intercept: one
      merged head cluster standing in for its member heads. ``bias`` is the
      part of the current bias that already stands for them (their value
      biases, moved into the o bias by the fold); the refit replaces it.
    """

    def __init__(self, original: onnx.ModelProto, ctx: PassContext, seed: int):
        self.original = original
        self.ctx = ctx
        self.seed = seed

    def _held(self) -> np.ndarray | None:
        return heldout_mask(self.ctx.calibration.num_samples, self.seed)

    def _grams(self, current, x_name, orig_names, dtype, data, w_prior, w_orig, groups, held, task):
        job = StatsJob([(needed_part(current, {x_name: dtype}), [x_name]),
                        (needed_part(self.original, {n: dtype for n in orig_names}), list(orig_names))],
                       partial(_new_group_grams, len(groups), w_prior.shape[0]),
                       partial(_add_group_rows, x_name, list(orig_names), w_prior, w_orig, groups, held))
        accs = self.ctx.measure(job, data, task)
        return [(accs[f"fit{i}"], accs[f"held{i}"], float(accs[f"spread{i}"].m2_z.sum())) for i in range(len(groups))]

    def refit(self, current: onnx.ModelProto, proj: Projection, x_name: str, orig_name: str, task: str,
              groups: list[tuple] | None = None, w_orig: np.ndarray | None = None):
        """(weight, bias, note) of ``proj`` refit; weight None: keep the fold.
        ``orig_name``: the original's projection output (``output`` groups)
        or its projection input (``part`` groups, with its weight ``w_orig``)."""
        groups = groups or [("output", None)]
        w_prior, b_prior = proj.weight.copy(), proj.bias_or_zero().copy()
        data = self.ctx.calibration
        args = (current, x_name, [orig_name], proj.dtype)
        if self.ctx.heldout is not None:
            fits = self._grams(*args, data, w_prior, w_orig, groups, None, task)
            helds = self._grams(*args, self.ctx.heldout, w_prior, w_orig, groups,
                                np.ones(self.ctx.heldout.num_samples, dtype=bool), task)
            stats = [(f, h, sp, f) for (f, _, _), (_, h, sp) in zip(fits, helds)]
        else:
            stats = [(f, h, sp, GramAccumulator(with_bias=True).merge(f).merge(h))
                     for f, h, sp in self._grams(*args, data, w_prior, w_orig, groups, self._held(), task)]
        w_new, b_new = w_prior.copy(), b_prior.copy()
        notes, changed = [], False
        for g, (fit, held, spread, final) in zip(groups, stats):
            cols = slice(None) if g[1] is None else g[1]
            part = g[0] == "part"
            # a part's prior bias is the constant its member heads' value biases
            # moved into the o bias (the plain fold's intercept for this target)
            b_part = np.asarray(g[3], dtype=np.float64) if part else b_prior
            r = fold.refit_consumer(fit, held if held.count else None, w_prior[:, cols], b_part, final=final,
                                    target_ss=spread)
            if r.lam is None:
                notes.append(f"kept (held-out {r.kept_error:.3g})")
                continue
            changed = True
            w_new[:, cols] = r.weight
            b_new = b_new - b_part + r.bias if part else r.bias
            notes.append(f"ridge {r.lam:g}" + (f", held-out {r.heldout_error:.3g} (fold {r.kept_error:.3g})"
                                                 if held.count else ""))
        what = "ls" if len(groups) == 1 else f"ls per cluster ({len(groups)})"
        if not changed:
            return None, None, f"{what}: plain fold kept; " + "; ".join(notes)
        return w_new, b_new, f"{what}: " + "; ".join(notes)


def _targets(spec, names: list[str], what: str) -> dict[str, object]:
    if isinstance(spec, Mapping):
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise UsageError(f"unknown {what} {unknown[0]!r}; the model has: {', '.join(names) or 'none'}")
        return dict(spec)
    return {n: spec for n in names}


def _new_group_grams(groups: int, out_features: int) -> dict:
    out = {}
    for i in range(groups):
        out[f"fit{i}"], out[f"held{i}"] = GramAccumulator(with_bias=True), GramAccumulator(with_bias=True)
        out[f"spread{i}"] = NeuronStats(ActivationSpec("identity"), out_features)
    return out


def _add_group_rows(x_name: str, orig_names: list[str], w_prior: np.ndarray, w_orig: np.ndarray | None,
                    groups: list[tuple], held: np.ndarray | None, accs: dict, start: int, feed: dict, _labels,
                    tensors: list) -> None:
    """One batch of every group's least-squares rows (see ``_Refitter``);
    ``start``: index of the batch's first sample in the data."""
    cv, ov = tensors
    x = np.asarray(cv[x_name])
    count = next(iter(feed.values())).shape[0]
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    o2 = {n: np.asarray(ov[n]).reshape(x2.shape[0], -1).astype(np.float64) for n in orig_names}
    if held is None or x2.shape[0] % count:
        rows = np.zeros(x2.shape[0], dtype=bool)
    else:  # every sample contributes the same number of rows (its tokens)
        rows = np.repeat(held[start:start + count], x2.shape[0] // count)
    for i, g in enumerate(groups):
        fit, hold, spread = accs[f"fit{i}"], accs[f"held{i}"], accs[f"spread{i}"]
        if g[0] == "output":
            cols = slice(None) if g[1] is None else g[1]
            t = o2[orig_names[0]]
            y = t - x2 @ w_prior.T
        else:
            cols, ocols = g[1], g[2]
            t = o2[orig_names[0]][:, ocols] @ w_orig[:, ocols].T
            y = t - x2[:, cols] @ w_prior[:, cols].T
        xs = x2[:, cols]
        for acc, sel in ((fit, ~rows), (hold, rows)):
            if sel.any():
                acc.update(xs[sel], y[sel])
        if rows.any():
            spread.update(t[rows])


class HeadFoldingPass:
    """Fold whole attention heads of every (matched) attention block.

    heads: heads kept per block (int), or the share removed (float in [0, 1)),
        or ``{block name: either}`` (blocks not named are left alone).
    select: ``"kmeans"`` (cluster and merge) or ``"magnitude"`` (keep the
        heads with the largest weight norm, drop the rest).
    merge: ``"medoid"`` (default) or ``"mean"``; see ``decide/heads.py``.
    repair: ``"none"``, ``"ar"`` (Fold-AR; acts on ``merge="mean"``),
        ``"ls"`` (ridge refit of the o-projection on calibration data),
        ``"auto"`` (``none``: see the note below and ``__call__``).
    features: what k-means clusters heads on: ``"weights"`` (their q, k, v
        rows and o columns, as the paper does for neurons) or ``"circuits"``
        (their QK and OV circuits, unchanged by rotating a head's dimensions).
    refit: what ``ls`` refits: ``"all"`` (every o-projection column and the
        bias, to reproduce the original o-projection output), ``"merged"``
        (only the columns of merged clusters, the rest keep the fold), or
        ``"cluster"`` (each merged cluster's columns separately, to reproduce
        only what its member heads added).

    The ``ls`` refit is only as general as the calibration data: on MiniLM,
    a refit on fixed-length 64-token windows improved those windows but
    broke short inputs (``tools/results/heads.md``); calibrate on the input
    lengths the model will see.
    """

    name = "head_folding"

    def __init__(self, heads: float | Mapping[str, float], select: str = "kmeans",
                 merge: str = "medoid", repair: str = "auto", seed: int = 0, blocks: Sequence[str] | None = None,
                 refit: str = "all", features: str = "weights"):
        _check(select, repair)
        if features not in dh.FEATURES:
            raise UsageError(f"unknown head features {features!r}; choose one of {', '.join(dh.FEATURES)}")
        self.features = features
        if refit not in ("all", "merged", "cluster"):
            raise UsageError(f"unknown refit scope {refit!r}; choose 'all', 'merged' or 'cluster'")
        self.refit = refit
        if merge not in dh.MERGES:
            raise UsageError(f"unknown head merge {merge!r}; choose one of {', '.join(dh.MERGES)}")
        for v in (heads.values() if isinstance(heads, Mapping) else [heads]):
            ok = (isinstance(v, (int, np.integer)) and v >= 1) or (isinstance(v, float) and 0 <= v < 1)
            if isinstance(v, bool) or not ok:
                raise UsageError(f"heads must be a head count >= 1 or a share in [0, 1), got {v!r}")
        self.heads, self.select, self.merge, self.repair = heads, select, merge, repair
        self.seed = int(seed)
        self.blocks = None if blocks is None else list(blocks)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        # auto: no repair. The medoid merge needs no variance repair, Fold-AR
        # made the mean merge worse on MiniLM, and the ls refit only generalises
        # as far as the calibration data's input lengths (tools/results/heads.md):
        # it is there on request, not by default.
        repair = _repair_mode("none" if self.repair == "auto" else self.repair, ctx)
        view = find_transformer(model)
        notes = [f"head_folding: {s.where}: {s.reason}" for s in view.skipped]
        if not view.attention:
            return PassResult(model, False, [], notes + ["head_folding: no foldable attention block found"])
        names = [b.name for b in view.attention]
        wanted = _targets(self.heads, names, "attention block")
        if self.blocks is not None:
            wanted = {n: v for n, v in wanted.items() if n in self.blocks}
        current, changed, reports = model, False, []
        refitter = _Refitter(model, ctx, self.seed) if repair == "ls" else None
        for i, b0 in enumerate(view.attention):
            ctx.report_progress("head folding", i, len(view.attention))
            b = _same_block(current, b0)
            h = b.num_heads
            rep = LayerReport(layer=b.name, producer=b.q.node, activation="attention (heads)", width_before=h,
                              width_after=h, params_before=b.num_params, params_after=b.num_params)
            reports.append(rep)
            if b.name not in wanted:
                rep.note = "not selected for head folding"
                continue
            k = dh.heads_after(h, wanted[b.name])
            if k >= h:
                rep.note = "nothing to fold"
                continue
            w = dh.HeadWeights.split(b.q.weight, b.q.bias, b.k.weight, b.k.bias, b.v.weight, b.v.bias, b.o.weight,
                                     b.o.bias, h)
            labels = dh.head_labels(w, k, self.select, self.seed, features=self.features)
            new = dh.merge_heads(w, labels, merge=self.merge, repair=repair, features=self.features)
            kept = new.num_heads
            current = _write_block(current, b, new)
            changed = True
            rep.width_after = kept
            rep.merged = h - kept if self.select == "kmeans" else 0
            rep.pruned = h - kept if self.select == "magnitude" else 0
            if refitter is not None:
                b2 = _same_block(current, b0)
                sizes = np.bincount(labels[labels >= 0], minlength=kept)
                dv = b.v_head_dim
                merged = np.flatnonzero(sizes > 1)
                if self.refit == "cluster" and merged.size:
                    # each merged cluster's o columns reproduce what its member heads added
                    groups = []
                    for c in merged:
                        members = np.flatnonzero(labels == c)
                        moved = sum(w.o[m] @ w.vb[m] for m in members)
                        groups.append(("part", np.arange(c * dv, (c + 1) * dv),
                                       np.concatenate([np.arange(m * dv, (m + 1) * dv) for m in members]), moved))
                    wr, br, rep.note = refitter.refit(current, b2.o, b2.o.input, b0.o.input,
                                                      f"head folding {b.name}: refit", groups, b0.o.weight)
                else:
                    cols = np.flatnonzero(np.repeat(sizes > 1, dv)) if self.refit == "merged" and merged.size else None
                    wr, br, rep.note = refitter.refit(current, b2.o, b2.o.input, b0.o.output,
                                                      f"head folding {b.name}: refit", [("output", cols)])
                if wr is not None:
                    current = rewrite_projections(current, [ProjectionEdit(b2.o, wr, br)], [], set(b2.o.nodes))
            rep.params_after = _same_block(current, b0).num_params
        ctx.report_progress("head folding", len(view.attention), len(view.attention))
        return PassResult(current, changed, reports, notes)


def _same_block(model: onnx.ModelProto, block: AttentionBlock) -> AttentionBlock:
    """``block`` as found in ``model`` (after earlier rewrites): matched by the
    q projection's node name, which rewrites keep."""
    for b in find_transformer(model).attention:
        if b.q.node == block.q.node:
            b.name = block.name
            return b
    raise RuntimeError(f"attention block {block.name} ({block.q.node}) is no longer found after rewriting")


def _write_block(model: onnx.ModelProto, b: AttentionBlock, new: dh.HeadWeights) -> onnx.ModelProto:
    wq, bq, wk, bk, wv, bv, wo, bo = new.joined()
    kept = new.num_heads

    def bias(p: Projection, vec):
        return vec if p.bias is not None or np.any(vec != 0) else None

    edits = [ProjectionEdit(b.q, wq, bias(b.q, bq)), ProjectionEdit(b.k, wk, bias(b.k, bk)),
             ProjectionEdit(b.v, wv, bias(b.v, bv)), ProjectionEdit(b.o, wo, bias(b.o, bo))]
    shapes = [ShapeEdit(r, kept * r.per_head) for r in b.shape_refs]
    return rewrite_projections(model, edits, shapes, set(b.nodes))


class GatedFoldingPass:
    """Fold the hidden neurons of gated MLPs ``down(act(gate x) * up x)``.

    ratio: share of neurons removed (float in [0, 1)) or ``{glu name: ratio}``.
    select: ``"kmeans"`` (gate and up rows averaged, down columns summed, one
        clustering on ``[gate_j, up_j, down_jᵀ]``) or ``"magnitude"``.
    repair: ``"none"``, ``"ar"`` (Fold-AR factor on the merged *up* rows: the
        linear branch, so the factor scales the product directly), ``"ls"``
        (ridge refit of the down projection), ``"auto"``.
    """

    name = "gated_folding"

    def __init__(self, ratio: float | Mapping[str, float], select: str = "kmeans", repair: str = "auto",
                 seed: int = 0):
        _check(select, repair)
        for v in (ratio.values() if isinstance(ratio, Mapping) else [ratio]):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise UsageError(f"gated fold ratio must be a number in [0, 1), got {v!r}")
        self.ratio, self.select, self.repair, self.seed = ratio, select, repair, int(seed)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        # auto: no repair. The medoid merge needs no variance repair, Fold-AR
        # made the mean merge worse on MiniLM, and the ls refit only generalises
        # as far as the calibration data's input lengths (tools/results/heads.md):
        # it is there on request, not by default.
        repair = _repair_mode("none" if self.repair == "auto" else self.repair, ctx)
        view = find_transformer(model)
        if not view.gated:
            return PassResult(model, False, [], ["gated_folding: no gated MLP found"])
        wanted = _targets(self.ratio, [g.name for g in view.gated], "gated MLP")
        current, changed, reports = model, False, []
        refitter = _Refitter(model, ctx, self.seed) if repair == "ls" else None
        for g0 in view.gated:
            g = _same_glu(current, g0)
            n = g.width
            rep = LayerReport(layer=g.name, producer=g.gate.node, activation=f"gated {g.activation.describe()}",
                              width_before=n, width_after=n, params_before=g.num_params, params_after=g.num_params)
            reports.append(rep)
            if g.name not in wanted:
                rep.note = "not selected for folding"
                continue
            k = fold.target_width(n, float(wanted[g.name]))
            if k >= n:
                rep.note = "nothing to fold"
                continue
            feats = dh.gated_features(g.gate.weight, g.gate.bias, g.up.weight, g.up.bias, g.down.weight)
            labels = dh.gated_labels(feats, k, self.select, self.seed)
            row_map, col_map = fold.cluster_maps(labels)
            wg, wu = row_map @ g.gate.weight, row_map @ g.up.weight
            bg = None if g.gate.bias is None else row_map @ g.gate.bias
            bu = None if g.up.bias is None else row_map @ g.up.bias
            if repair == "ar" and self.select == "kmeans":
                s = fold.fold_ar_scale(g.up.weight, labels)
                wu = wu * s[:, None]
                bu = None if bu is None else bu * s
            wd = g.down.weight @ col_map
            current = rewrite_projections(
                current, [ProjectionEdit(g.gate, wg, bg), ProjectionEdit(g.up, wu, bu),
                          ProjectionEdit(g.down, wd, None)], [],
                set(g.gate.nodes + g.up.nodes + [g.mul] + g.down.nodes + g.activation.nodes))
            changed = True
            kept = int(labels.max()) + 1
            rep.width_after = kept
            rep.merged = n - kept if self.select == "kmeans" else 0
            rep.pruned = n - kept if self.select == "magnitude" else 0
            if refitter is not None:
                g2 = _same_glu(current, g0)
                wr, br, rep.note = refitter.refit(current, g2.down, g2.hidden, g0.down.output,
                                                  f"gated folding {g.name}: refit")
                if wr is not None:
                    current = rewrite_projections(current, [ProjectionEdit(g2.down, wr, br)], [], set(g2.down.nodes))
            rep.params_after = _same_glu(current, g0).num_params
        return PassResult(current, changed, reports, [])


def _same_glu(model: onnx.ModelProto, glu: GatedMLP) -> GatedMLP:
    for g in find_transformer(model).gated:
        if g.gate.node == glu.gate.node:
            g.name = glu.name
            return g
    raise RuntimeError(f"gated MLP {glu.name} ({glu.gate.node}) is no longer found after rewriting")


