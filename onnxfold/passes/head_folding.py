"""Head folding and gated-MLP folding passes for exported transformers.

find → decide → rewrite → (repair), one block at a time in graph order:

1. ``find.attention.find_transformer``: attention blocks (q/k/v/o projections,
   head counts, the Reshape constants that count heads) and gated MLPs; what
   looks like attention but does not match (fused nodes, grouped-query
   attention, ...) is reported in the notes and left untouched;
2. a block's heads are a unit group (``passes/units.head_group``: a unit is
   a block of head_dim rows of q/k/v and columns of o); the folding core
   (``passes/foldcore.py``) clusters them (k-means on per-head weights or
   circuits) or keeps the largest (magnitude pruning); ``decide.heads``
   merges them by the heads' own rule (medoid q/k + best rank-Dv v/o, or
   plain averaging with optional Fold-AR). Grouped-query attention folds in
   up to two steps (``decide.heads.grouped_shape`` says how far each goes):
   whole key/value groups (``head_group``: a unit is a key/value head with
   its query heads), then query heads within their groups, the same number
   in each (``passes/units.query_head_group``, ``merge_query_heads``).
   A gated MLP is a unit group (gate and up rows, down columns) that the
   core folds like dense neurons;
3. ``rewrite.attention``: new weight initializers, new head-count constants
   (heads, key/value heads and the group size of the key/value repeat);
4. ``repair="ls"``: ridge refit of the o-projection (of the down projection
   for gated MLPs) by the shared refit engine (``passes/refit.py``):
   X = the folded block's merged-heads activation, target = the original
   model's o-projection output; ridge strength chosen on held-out rows,
   shrunk towards the plain fold. Blocks are folded in order, each measured
   on the model with the earlier blocks already folded and refit.

Method: ``docs/methods.md`` section 3.3-3.4; the math is in ``decide/heads.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ..decide import folding as fold
from ..decide import heads as dh
from ..errors import UsageError
from ..find.attention import AttentionBlock, GatedMLP, Projection, find_transformer
from ..rewrite.attention import ProjectionEdit, ShapeEdit, rewrite_projections
from .base import FoldSettings, LayerReport, PassContext, PassResult
from .cache import PassScope
from .foldcore import FoldCore
from .handlers import ProjectionRows
from .refit import FoldState
from .units import UnitGroup, gated_group, head_group, query_head_group

#: what the transformer passes offer: REPAIR's moment matching is not implemented for them
REPAIRS = ("auto", "none", "ar", "ls")
#: what 'auto' means here: no repair. The medoid merge needs no variance
#: repair, Fold-AR made the mean merge worse on MiniLM, and the ls refit only
#: generalises as far as the calibration data's input lengths
#: (tools/results/heads.md): it is there on request, not by default.
AUTO_REPAIR = "none"


def _check_heads(what: str, where: str | None, v, name: str = "heads") -> None:
    ok = (isinstance(v, (int, np.integer)) and v >= 1) or (isinstance(v, float) and 0 <= v < 1)
    if isinstance(v, bool) or not ok:
        raise UsageError(f"{name} must be a head count >= 1 or a share in [0, 1), got {v!r}")


def _refit_projection(core: FoldCore, proj: Projection, x_name: str, orig_name: str, task: str,
                      groups: list[tuple] | None = None, w_orig: np.ndarray | None = None,
                      scope: PassScope | None = None):
    """Least-squares refit of ``proj`` (read from the current model, reading
    ``x_name``) against the original model: (weight, bias, note); weight
    None: keep the fold.

    Groups of input columns are refit independently, each with its own ridge
    strength (chosen on held-out samples) and intercept:

    * ``("output", cols)``: the original model's projection output
      (``orig_name``); columns outside ``cols`` keep their folded values and
      stay in the prediction (``cols=None``: all columns);
    * ``("part", cols, orig_cols, bias)``: only what the original's columns
      ``orig_cols`` contributed (``X_orig[:, orig_cols] @ W_orig[:, orig_cols]ᵀ``;
      ``orig_name`` is then the original's projection input, ``w_orig`` its
      weight), to be reproduced by the current columns ``cols`` plus an
      intercept: one merged head cluster standing in for its member heads.
      ``bias`` is the part of the current bias that already stands for them
      (their value biases, moved into the o bias by the fold); the refit
      replaces it.

    ``scope``: the pass run's :class:`~onnxfold.passes.cache.PassScope`; in a budget search the refit is
    then shared by every candidate that folded the same blocks the same way.
    """
    groups = groups or [("output", None)]
    w_prior, b_prior = proj.weight.copy(), proj.bias_or_zero().copy()
    cols_of = [slice(None) if g[1] is None else g[1] for g in groups]
    # a part's prior bias is the constant its member heads' value biases
    # moved into the o bias (the plain fold's intercept for this target)
    b_parts = [np.asarray(g[3], dtype=np.float64) if g[0] == "part" else b_prior for g in groups]
    where = None if scope is None else scope.key()
    outcomes = core.refits.solve(ProjectionRows(x_name, proj.dtype, orig_name, w_prior, groups, w_orig),
                                 [(w_prior[:, c], b) for c, b in zip(cols_of, b_parts)], task,
                                 None if where is None else ("projection ls refit", where, task))
    w_new, b_new = w_prior.copy(), b_prior.copy()
    notes, changed = [], False
    for g, cols, b_part, (r, held_rows) in zip(groups, cols_of, b_parts, outcomes):
        if r.lam is None:
            notes.append(f"kept (held-out {r.kept_error:.3g})")
            continue
        changed = True
        w_new[:, cols] = r.weight
        b_new = b_new - b_part + r.bias if g[0] == "part" else r.bias
        notes.append(f"ridge {r.lam:g}" + (f", held-out {r.heldout_error:.3g} (fold {r.kept_error:.3g})"
                                             if held_rows else ""))
    what = "ls" if len(groups) == 1 else f"ls per cluster ({len(groups)})"
    if not changed:
        return None, None, f"{what}: plain fold kept; " + "; ".join(notes)
    return w_new, b_new, f"{what}: " + "; ".join(notes)


def _hashable(v):
    return tuple(sorted(v.items())) if isinstance(v, Mapping) else v


class HeadFoldingPass:
    """Fold whole attention heads of every (matched) attention block.

    heads: query heads kept per block (int), or the share removed (float in
        [0, 1)), or ``{block name: either}`` (blocks not named are left alone).
    kv_heads: grouped-query attention: key/value heads kept per block (int),
        or the share removed (float), or ``{block name: either}``; None (the
        default): all, unless ``heads`` asks for fewer query heads than there
        are key/value heads. Query heads fold within their key/value groups
        first, the same number in each (the graph repeats every key/value
        head alike); whole groups (a key/value head with its query heads)
        fold down to ``kv_heads``. So ``heads`` is met with at most as many
        heads as asked: a multiple of the key/value heads kept
        (``decide.heads.grouped_shape``). Multi-head blocks fold to
        ``min(heads, kv_heads)`` heads.
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
                 refit: str = "all", features: str = "weights", kv_heads: float | Mapping[str, float] | None = None):
        self.settings = FoldSettings("head fold", heads, select, repair, seed, blocks, repairs=REPAIRS,
                                     auto_repair=AUTO_REPAIR, check_value=_check_heads, as_value=lambda v: v)
        for v in (kv_heads.values() if isinstance(kv_heads, Mapping) else [kv_heads] if kv_heads is not None else []):
            _check_heads("head fold", None, v, "kv_heads")
        self.kv_heads = kv_heads
        if features not in dh.FEATURES:
            raise UsageError(f"unknown head features {features!r}; choose one of {', '.join(dh.FEATURES)}")
        self.features = features
        if refit not in ("all", "merged", "cluster"):
            raise UsageError(f"unknown refit scope {refit!r}; choose 'all', 'merged' or 'cluster'")
        self.refit = refit
        if merge not in dh.MERGES:
            raise UsageError(f"unknown head merge {merge!r}; choose one of {', '.join(dh.MERGES)}")
        self.heads, self.select, self.merge, self.repair = heads, select, merge, repair
        self.seed = self.settings.seed
        self.blocks = self.settings.layers

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        repair = self.settings.repair_mode(ctx)
        view = find_transformer(model)
        notes = [f"head_folding: {s.where}: {s.reason}" for s in view.skipped]
        if not view.attention:
            return PassResult(model, False, [], notes + ["head_folding: no foldable attention block found"])
        names = [b.name for b in view.attention]
        wanted = self.settings.ratios(names, "unknown attention block {!r}", "attention blocks")
        unknown = [n for n in (self.kv_heads if isinstance(self.kv_heads, Mapping) else []) if n not in names]
        if unknown:
            raise UsageError(f"kv_heads: unknown attention block {unknown[0]!r}; the model's foldable attention"
                             f" blocks are: {', '.join(names)}")
        state = FoldState(model)
        core = FoldCore(state, ctx, select=self.select, repair=repair, seed=self.seed)
        scope = PassScope(ctx, model, ("head folding", self.select, self.merge, repair, self.seed, self.refit,
                                       self.features, _hashable(self.kv_heads)))
        reports = _fold_in_order(core, view.attention, _same_block, wanted, "head folding",
                                 lambda *a: self._fold_block(*a, scope=scope),
                                 lambda b: LayerReport(layer=b.name, producer=b.q.node, activation="attention (heads)",
                                                       width_before=b.num_heads, width_after=b.num_heads),
                                 lambda b, h: int(np.prod(self._shape(b, dh.heads_after(b.num_heads, h)))),
                                 "not selected for head folding", ahead=self._groups_ahead, steps=scope.steps)
        return PassResult(state.current_model(), state.edited, reports, notes)

    def _shape(self, b: AttentionBlock, heads: int) -> tuple[int, int]:
        """(key/value heads, query heads per key/value head) ``b`` keeps for at most ``heads`` query heads."""
        kv = self.kv_heads.get(b.name) if isinstance(self.kv_heads, Mapping) else self.kv_heads
        return dh.grouped_shape(b.num_heads, b.num_kv_heads, heads, kv)

    def _features(self, w: dh.HeadWeights, groups: bool):
        """What k-means clusters: key/value groups (heads, in multi-head attention) or query heads."""
        if groups:
            return lambda: w.group_features(self.features)
        return w.circuits if self.features == "circuits" else w.features

    def _groups_ahead(self, b: AttentionBlock, k: int) -> list[tuple[UnitGroup, int]]:
        """The first clustering :meth:`_fold_block` will ask for ``b`` (the
        second one clusters what the first merged)."""
        kv, per = self._shape(b, k)
        w = dh.HeadWeights.split(b.q.weight, b.q.bias, b.k.weight, b.k.bias, b.v.weight, b.v.bias,
                                 b.o.weight, b.o.bias, b.num_heads, b.num_kv_heads)
        if kv < b.num_kv_heads:
            return [(head_group(b, self._features(w, groups=True)), kv)]
        if per < b.group_size:
            return [(query_head_group(b, self._features(w, groups=False)), kv * per)]
        return []

    def _fold_block(self, core: FoldCore, b0: AttentionBlock, b: AttentionBlock, k: int, rep: LayerReport, *,
                    scope: PassScope | None = None) -> None:
        """Select (the core's), merge (the heads' own rule), write, refit (the core's engine):
        whole key/value groups first, then query heads within their groups."""
        state = core.state
        kv, per = self._shape(b, k)
        w0 = w = dh.HeadWeights.split(b.q.weight, b.q.bias, b.k.weight, b.k.bias, b.v.weight, b.v.bias,
                                      b.o.weight, b.o.bias, b.num_heads, b.num_kv_heads)
        n = b.group_size
        labels = np.arange(b.num_heads)  # original query head -> head of the folded block (-1: dropped)
        moved = np.zeros(b.num_heads, dtype=bool)  # query heads whose value bias went to the o bias
        if kv < b.num_kv_heads:
            plan = core.plan(head_group(b, self._features(w, groups=True)), kv)
            w = dh.merge_heads(w, plan.labels, merge=self.merge, repair=core.repair, features=self.features)
            state.replace(_write_block(state.current_model(), b, w))
            labels, moved = dh.query_heads_of_groups(plan.labels, n)
            if per < n:
                b = _same_block(state.current_model(), b0)
        if per < n:
            plan = core.plan(query_head_group(b, self._features(w, groups=False)), kv * per)
            w = dh.merge_query_heads(w, plan.labels, merge=self.merge, repair=core.repair, features=self.features)
            state.replace(_write_block(state.current_model(), b, w))
            labels = dh.chained_labels(labels, plan.labels)
        rep.width_after = w.num_heads
        rep.pruned = int((labels < 0).sum())
        rep.merged = int(b0.num_heads - rep.pruned - rep.width_after)
        notes = [f"key/value heads {b0.num_kv_heads} -> {kv}, {per} query heads each"] if b0.grouped else []
        if core.repair == "ls":
            notes.append(self._refit(core, b0, w0, labels, moved, scope))
        rep.note = "; ".join(notes)

    def _refit(self, core: FoldCore, b0: AttentionBlock, w0: dh.HeadWeights, labels: np.ndarray,
               moved: np.ndarray, scope: PassScope | None = None) -> str:
        """The ``ls`` refit of the folded block's o projection (``labels``:
        original query head -> folded head); what it did."""
        state = core.state
        b2 = _same_block(state.current_model(), b0)
        task = f"head folding {b0.name}: refit"
        dv = b0.v_head_dim
        groups = _cluster_parts(w0, labels, moved, dv) if self.refit == "cluster" else []
        if groups:  # each merged cluster's o columns reproduce what its member heads added
            wr, br, note = _refit_projection(core, b2.o, b2.o.input, b0.o.input, task, groups, b0.o.weight, scope)
        else:
            sizes = np.bincount(labels[labels >= 0], minlength=b2.num_heads)
            merged = sizes > 1
            cols = np.flatnonzero(np.repeat(merged, dv)) if self.refit == "merged" and merged.any() else None
            wr, br, note = _refit_projection(core, b2.o, b2.o.input, b0.o.output, task, [("output", cols)],
                                             scope=scope)
        if wr is not None:
            state.replace(rewrite_projections(state.current_model(), [ProjectionEdit(b2.o, wr, br)], [],
                                              set(b2.o.nodes)))
        return note


def _cluster_parts(w: dh.HeadWeights, labels: np.ndarray, moved: np.ndarray, dv: int) -> list[tuple]:
    """One ``("part", …)`` refit group per merged cluster (see
    :func:`_refit_projection`); ``labels``: original query head -> folded
    head, ``moved``: query heads whose value bias went to the o bias."""
    groups = []
    n = w.group_size
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        if members.size > 1:
            bias = sum((w.o[m] @ w.vb[m // n] for m in members if moved[m]), np.zeros(w.o.shape[1]))
            groups.append(("part", np.arange(c * dv, (c + 1) * dv),
                           np.concatenate([np.arange(m * dv, (m + 1) * dv) for m in members]), bias))
    return groups


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
    count = {"heads": new.num_heads, "kv_heads": new.num_kv_heads, "group": new.group_size}

    def bias(p: Projection, vec):
        return vec if p.bias is not None or np.any(vec != 0) else None

    edits = [ProjectionEdit(b.q, wq, bias(b.q, bq)), ProjectionEdit(b.k, wk, bias(b.k, bk)),
             ProjectionEdit(b.v, wv, bias(b.v, bv)), ProjectionEdit(b.o, wo, bias(b.o, bo))]
    shapes = [ShapeEdit(r, count[r.counts] * r.per_head) for r in b.shape_refs]
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
        # 'auto' for a gated MLP: the ridge refit of its down projection with
        # calibration data, none without. Unlike an o-projection, the down
        # projection acts on each position alone, so its refit does not depend
        # on the calibration data's input lengths; without it a 30 % fold of the
        # shipped decoders' MLPs kept 94 % per-token agreement, with it 99.3 %
        # (tools/results/refit.md, transformers.md).
        self.settings = FoldSettings("gated fold", ratio, select, repair, seed, None, repairs=REPAIRS,
                                     auto_without_data="none")
        self.ratio, self.select, self.repair, self.seed = ratio, select, repair, self.settings.seed

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        repair = self.settings.repair_mode(ctx)
        view = find_transformer(model)
        if not view.gated:
            return PassResult(model, False, [], ["gated_folding: no gated MLP found"])
        wanted = self.settings.ratios([g.name for g in view.gated], "unknown gated MLP {!r}", "gated MLPs")
        state = FoldState(model)
        core = FoldCore(state, ctx, select=self.select, repair=repair, seed=self.seed)
        scope = PassScope(ctx, model, ("gated folding", self.select, repair, self.seed))
        reports = _fold_in_order(core, view.gated, _same_glu, wanted, "gated folding",
                                 lambda *a: self._fold_glu(*a, scope=scope),
                                 lambda g: LayerReport(layer=g.name, producer=g.gate.node,
                                                       activation=f"gated {g.activation.describe()}",
                                                       width_before=g.width, width_after=g.width),
                                 lambda g, r: fold.target_width(g.width, r), "not selected for folding",
                                 ahead=lambda g, k: [(gated_group(g), k)], steps=scope.steps)
        return PassResult(state.current_model(), state.edited, reports, [])

    def _fold_glu(self, core: FoldCore, g0: GatedMLP, g: GatedMLP, k: int, rep: LayerReport, *,
                  scope: PassScope | None = None) -> None:
        """Fold (the core's: gate and up rows merged, down columns summed), write, refit."""
        state = core.state
        group = gated_group(g)
        plan = core.plan(group, k)
        current = state.current_model()
        core.rewrite(group, plan)
        edits = [ProjectionEdit(p, p.weight, p.bias) for p in (g.gate, g.up)]  # rows merged
        edits.append(ProjectionEdit(g.down, g.down.weight, None))  # columns summed, bias as it was
        state.replace(rewrite_projections(current, edits, [], set(g.gate.nodes + g.up.nodes + [g.mul] + g.down.nodes
                                                                 + g.activation.nodes)))
        rep.width_after, rep.merged, rep.pruned = plan.width_after, plan.merged, plan.pruned
        if core.repair != "ls":
            return
        g2 = _same_glu(state.current_model(), g0)
        wr, br, rep.note = _refit_projection(core, g2.down, g2.hidden, g0.down.output, f"gated folding {g.name}: refit",
                                             scope=scope)
        if wr is not None:
            state.replace(rewrite_projections(state.current_model(), [ProjectionEdit(g2.down, wr, br)], [],
                                              set(g2.down.nodes)))


def _fold_in_order(core: FoldCore, found: list, refind, wanted: dict, task: str, fold_one, report, target,
                   unselected: str, ahead=None, steps: list | None = None) -> list[LayerReport]:
    """One report per block (as ``found`` in the input model), in order: each
    is found again in the current model (``refind``: earlier rewrites moved
    it), folded to ``target(current, wanted[name])`` units by ``fold_one(core,
    found, current, k, report)`` unless that removes nothing, and its
    parameters counted before and after. ``ahead(block, k)``: the unit groups
    and k its fold will cluster first; a block's fold rewrites only its own
    projections, so these are clustered for every block at once, side by side
    on Ray (``FoldCore.prefetch_clusters``). ``steps``: gets ``(name, k)`` of
    each block before it is folded (a :class:`~onnxfold.passes.cache.PassScope`'s)."""
    state, ctx = core.state, core.ctx
    if ahead is not None:
        core.prefetch_clusters([p for x0 in found if x0.name in wanted for p in ahead(x0, target(x0, wanted[x0.name]))],
                               f"{task}: clustering on Ray")
    reports = []
    for i, x0 in enumerate(found):
        ctx.report_progress(task, i, len(found))
        x = refind(state.current_model(), x0)
        rep = report(x)
        rep.params_before = rep.params_after = x.num_params
        reports.append(rep)
        if x.name not in wanted:
            rep.note = unselected
            continue
        k = target(x, wanted[x.name])
        if k >= rep.width_before:
            rep.note = "nothing to fold"
            continue
        if steps is not None:
            steps.append((x0.name, k))
        fold_one(core, x0, x, k, rep)
        rep.params_after = refind(state.current_model(), x0).num_params
    ctx.report_progress(task, len(found), len(found))
    return reports


def _same_glu(model: onnx.ModelProto, glu: GatedMLP) -> GatedMLP:
    for g in find_transformer(model).gated:
        if g.gate.node == glu.gate.node:
            g.name = glu.name
            return g
    raise RuntimeError(f"gated MLP {glu.name} ({glu.gate.node}) is no longer found after rewriting")


