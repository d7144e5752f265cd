"""Downstream refit: the linear ops after the folds, refit one after another.

A fold's own least-squares repair refits only the op that reads the merged
units (its consumer). The error it leaves travels on: every later linear op
sees inputs that differ from the original's. This pass, run after the
folding passes, walks the linear ops (``MatMul`` / ``Gemm`` with a constant
2-D weight and an optional constant bias: ``find.projections``) in graph
order from the first one a fold changed, and refits each whose output has
the same meaning in both models (found by node name, same output width)
so that the compressed model's own input to it reproduces the original's
output of it:

* ops are refit in order, each on the current model after the refits
  before it, so each one sees (and corrects) the error the previous ones
  left; ops that read the same tensor (q / k / v, gate / up) are refit from
  one stream, since none of them changes what the others read;
* an op whose output is added to the residual stream (``residual_addend``)
  fits the original's sum less the current residual: it makes up for the
  stream's error as well as its own; where that sum is read only by a norm
  over its last axis (a post-norm block: BERT's Add → LayerNorm), each
  token's row is weighted by 1 / its variance (mean square for an RMSNorm)
  in the original sum (``norm_weighting``): the norm divides a token's error
  by its spread, so what the model outputs weighs a token's error by that
  weight, not equally;
* an op whose output width changed is refit towards the original's output
  at the units it kept when it kept them unchanged (``kept_units``: a fold
  that selected units); one whose units were merged is left alone;
* each refit is :class:`~onnxfold.passes.refit.RefitEngine`'s: streamed Gram
  matrices (no activation is stored), the ridge strength chosen on
  held-out rows, the op's present weights kept when they are better there;
  an intercept is added to an op that had no bias when it helps.

``keep="better"`` then compares the refit model with the one it started
from on held-out data (the context's held-out split, else a seeded share of
the calibration samples, which the refit also fit on): the squared error of
every float graph output against the original, relative to the original
output's spread, summed over the outputs; the refit is kept only when it is
lower. ``keep="always"`` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx

from ..find.graph_index import GraphIndex
from ..find.norms import FUSED_NORMS, decomposed_norm_at
from ..find.projections import Projection, projection_at
from ..measure.jobs import KeyedModel, StatsJob
from ..rewrite.attention import ProjectionEdit, rewrite_projections
from .base import PassContext, PassResult, heldout_mask
from .handlers import OneInputRows
from .refit import FoldState, RefitEngine

KEEPS = ("better", "always")


def linear_ops(model: onnx.ModelProto) -> list[Projection]:
    """Every MatMul / Gemm with a constant 2-D weight it alone reads, in graph order
    (with its bias Add when it has one)."""
    ix = GraphIndex(model)
    ops = []
    for node in ix.nodes:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        p = None
        after = ix.single_consumer(node.output[0]) if node.op_type == "MatMul" else None
        if after is not None and after.op_type == "Add":
            p = projection_at(ix, after.output[0])
        if p is None:
            p = projection_at(ix, node.output[0])
        # a weight shared by several ops (tied embeddings) would need one refit for all of them
        if p is not None and len(ix.consumers.get(p.weight_input, [])) == 1:
            ops.append(p)
    return ops


def _same(a: Projection, b: Projection) -> bool:
    if a.weight_shape != b.weight_shape or (a.bias is None) != (b.bias is None):
        return False
    if a.bias is not None and not np.array_equal(a.bias, b.bias):
        return False
    return bool(np.array_equal(a.weight, b.weight))


def residual_addend(current: GraphIndex, reference: GraphIndex, op: Projection) -> tuple[str, str] | None:
    """(sum, addend) when ``op``'s output is added, alone, to another computed
    tensor (the residual stream) by an Add that both models have by name, with
    the same inputs: then the reference's sum less the current addend is what
    the op should output. None otherwise (nothing to add it to)."""
    add = current.single_consumer(op.output)
    if add is None or add.op_type != "Add" or len(add.input) != 2 or op.output in current.graph_outputs:
        return None
    addend = add.input[1] if add.input[0] == op.output else add.input[0]
    if addend == op.output or current.is_const(addend):
        return None
    ref = reference.node_by_name.get(add.name)
    if ref is None or ref.op_type != "Add" or list(ref.input) != list(add.input) or list(ref.output) != list(add.output):
        return None
    return add.output[0], addend


#: how a norm divides each row: by its spread about the row mean (LayerNorm) or by its root mean square
_CENTRED_NORMS = ("LayerNormalization", "LayerNorm (decomposed)")
_RMS_NORMS = ("RMSNormalization", "SimplifiedLayerNormalization", "RMSNorm (decomposed)")


def norm_weighting(ix: GraphIndex, tensor: str) -> str | None:
    """``"variance"`` when every reader of ``tensor`` is one LayerNorm over its
    last axis, ``"mean_square"`` for one RMSNorm, else None (the tensor is read
    otherwise, or is a graph output). To first order the norm's output error
    for a row is the row's error divided by that row's root variance (mean
    square), so a least-squares fit of the tensor that weights each row by
    1 / variance (mean square) minimises the normalised error."""
    readers = ix.consumers.get(tensor, [])
    if not readers or tensor in ix.graph_outputs:
        return None
    if len(readers) == 1 and readers[0].op_type in FUSED_NORMS:
        node = readers[0]
        if node.op_type.startswith("Skip") or node.input[0] != tensor or ix.attr(node, "axis", -1) != -1:
            return None
        kind = node.op_type
    else:
        norm = decomposed_norm_at(ix, tensor)
        if norm is None or not {r.name for r in readers} <= set(norm.nodes):
            return None
        kind = norm.kind
    return "variance" if kind in _CENTRED_NORMS else "mean_square" if kind in _RMS_NORMS else None


def row_weights(rows: np.ndarray, weighting: str) -> np.ndarray:
    """1 / each row's variance (``"variance"``) or mean square (``"mean_square"``),
    floored at a millionth of the rows' mean so a constant row cannot take all
    the weight."""
    spread = rows.var(axis=1) if weighting == "variance" else np.mean(rows * rows, axis=1)
    return 1.0 / np.maximum(spread, 1e-6 * max(float(spread.mean()), 1e-30))


def kept_units(op: Projection, original: Projection) -> np.ndarray | None:
    """When ``op`` has fewer output units than ``original`` and each of them is
    an unchanged copy of one of the original's (same weights and bias: a fold
    that selected units rather than merged them), the original's index of each;
    None otherwise. The original's output at those units is then a target."""
    if op.out_features >= original.out_features or op.weight_shape[1] != original.weight_shape[1] \
            or (op.bias is None) != (original.bias is None):
        return None
    def key(p: Projection, i: int) -> bytes:
        bias = b"" if p.bias is None else np.float64(p.bias[i]).tobytes()
        return np.ascontiguousarray(p.weight[i]).tobytes() + bias
    where = {}
    for j in range(original.out_features):
        where.setdefault(key(original, j), j)
    units = [where.get(key(op, i)) for i in range(op.out_features)]
    if any(u is None for u in units) or len(set(units)) != len(units):
        return None
    return np.asarray(units)


def refit_plan(current: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[list[list[str]], int, int]:
    """(stages: node names of the ops refit together, in order; ops from the first
    changed one on; of those, ops left alone: no match, or an output of another
    width or read differently). An op is matched to the reference's by node name."""
    ref = {p.node: p for p in linear_ops(reference)}
    ops = linear_ops(current)
    first = next((i for i, p in enumerate(ops) if p.node not in ref or not _same(p, ref[p.node])), None)
    if first is None:
        return [], 0, 0
    readers_now, readers_ref = GraphIndex(current).consumers, GraphIndex(reference).consumers

    def same_meaning(p: Projection, r: Projection) -> bool:
        # the same tensor read by the same nodes: nothing (a linear path of linearity folding, say) was
        # added to the op's output in one model and not in the other, so the target is the whole output
        # (or, for units a fold selected, the original's output at those units)
        width = r.out_features == p.out_features or kept_units(p, r) is not None
        return width and r.output == p.output and \
            {n.name for n in readers_now.get(p.output, [])} == {n.name for n in readers_ref.get(r.output, [])}

    stages: dict[str, list[str]] = {}  # input tensor -> ops reading it (inputs come before their readers)
    skipped = 0
    for p in ops[first:]:
        r = ref.get(p.node)
        if r is None or not same_meaning(p, r):
            skipped += 1
            continue
        stages.setdefault(p.input, []).append(p.node)
    return list(stages.values()), len(ops) - first, skipped


@dataclass
class SharedInputRows(OneInputRows):
    """Least-squares rows for ops that read one tensor ``x`` of the current
    model: group i fits the reference's output ``targets[i]`` (tensor name)
    as what op i's prior ``w_priors[i]`` (out × in) must add, plus an
    intercept. Picklable (Ray)."""

    x: str
    dtype: Any
    targets: list[str]
    w_priors: list[np.ndarray]
    # per target, None or the original's units the op's outputs are (a fold that selected units)
    units: list[np.ndarray | None] | None = None
    # per target, None or (sum, addend): the op's output is added to ``addend`` (the residual stream) and
    # the group fits the reference's ``sum`` less the current model's ``addend``, so that the refit makes
    # up for the error the residual stream carries, not only for its own
    residuals: list[tuple[str, str] | None] | None = None
    # per target, None or how the norm that alone reads the residual sum weighs its rows (norm_weighting)
    weightings: list[str | None] | None = None

    def _residual(self, i: int) -> tuple[str, str] | None:
        return None if self.residuals is None else self.residuals[i]

    @property
    def current(self) -> dict:
        out = {self.x: self.dtype}
        out.update({r[1]: self.dtype for r in (self.residuals or ()) if r is not None})
        return out

    @property
    def original(self) -> dict:
        # the op's own output too where a sum is the target: it is the target where the Add broadcast it
        out = {t: self.dtype for t in self.targets}
        out.update({r[0]: self.dtype for r in (self.residuals or ()) if r is not None})
        return out

    @property
    def widths(self) -> list[int]:
        return [w.shape[0] for w in self.w_priors]

    def rows(self, cur: dict, orig: dict):
        x2 = self.input_rows(cur)
        out = []
        for i, (t, w) in enumerate(zip(self.targets, self.w_priors)):
            target, weights = fit_target(cur, orig, np.shape(cur[self.x])[:-1], t, w.shape[0], self._residual(i),
                                         None if self.units is None else self.units[i],
                                         None if self.weightings is None else self.weightings[i])
            out.append((x2, target - x2 @ w.T, target, weights))
        return np.shape(cur[self.x])[0], out


def fit_target(cur: dict, orig: dict, lead: tuple, own: str, width: int, residual: tuple[str, str] | None,
               units: np.ndarray | None, weighting: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """What an op of output ``width`` whose input has leading shape ``lead`` is fit
    to, as float64 rows, and the rows' weights (None: equal): the original's
    own output ``own`` (at ``units`` when given), or the original's sum less
    the current addend (``residual``), weighted by ``weighting``
    (``norm_weighting``). ``cur`` / ``orig``: one batch's tensors of the
    current and the original model."""
    # the sum has the op output's shape unless the Add broadcast the op output itself; then
    # the op's own output is the target (the same choice on every batch: shapes decide it)
    if residual is not None and np.shape(orig[residual[0]]) != (*lead, width):
        residual = None
    rows = int(np.prod(lead))
    weights = None
    if residual is None:
        target = np.asarray(orig[own]).reshape(rows, -1).astype(np.float64)
    else:
        total = np.asarray(orig[residual[0]], dtype=np.float64).reshape(rows, -1)
        target = total - np.asarray(cur[residual[1]], dtype=np.float64).reshape(rows, -1)
        if weighting is not None:
            weights = row_weights(total, weighting)
    if units is not None:
        target = target[:, units]
    return target, weights


class _ErrorSums:
    """Per output: squared error against the reference and the reference's moments."""

    def __init__(self, n: int):
        self.sse, self.count = np.zeros(n), np.zeros(n)
        self.sum, self.sum_sq = np.zeros(n), np.zeros(n)

    def merge(self, other: "_ErrorSums") -> "_ErrorSums":
        for k in ("sse", "count", "sum", "sum_sq"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def relative(self) -> float:
        spread = self.sum_sq - self.sum ** 2 / np.maximum(self.count, 1)
        return float(np.sum(self.sse / np.where(spread > 0, spread, 1.0)))


def _new_error_sums(n_outputs: int, n_models: int) -> dict:
    return {f"model{i}": _ErrorSums(n_outputs) for i in range(n_models)}


def _add_errors(n_models: int, accs: dict, _start, _feed, _labels, tensors: list) -> None:
    reference = tensors[-1]
    for i in range(n_models):
        acc = accs[f"model{i}"]
        for j, (name, ref) in enumerate(reference.items()):
            r = np.asarray(ref, dtype=np.float64)
            d = np.asarray(tensors[i][name], dtype=np.float64) - r
            acc.sse[j] += float(np.sum(d * d))
            acc.count[j] += r.size
            acc.sum[j] += float(r.sum())
            acc.sum_sq[j] += float(np.sum(r * r))


def output_errors(models: list[onnx.ModelProto], reference: onnx.ModelProto, data, ctx: PassContext,
                  task: str) -> list[float]:
    """Each model's held-out error against ``reference``: squared error of every
    float graph output relative to the reference output's spread, summed."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = [o.name for o in reference.graph.output if o.type.tensor_type.elem_type in floats]
    # the reference is the model the search started from: its digest once per model object, not per job
    ref = reference if ctx.cache is None else \
        KeyedModel(lambda: reference, ctx.cache.input_digest(reference, "whole model", lambda: reference))
    job = StatsJob([(m, names) for m in models] + [(ref, names)],
                   partial(_new_error_sums, len(names), len(models)), partial(_add_errors, len(models)),
                   replayable=(len(models),))
    accs = ctx.measure(job, data, task)
    return [accs[f"model{i}"].relative() for i in range(len(models))]


@dataclass
class DownstreamRefitPass:
    """Refit the linear ops downstream of the folds (module docstring);
    ``reference``: the model before the folds (default: the context's)."""

    keep: str = "better"
    seed: int = 0
    residual: bool = True  # False: every op fits its own original output (residual_addend not used)
    norm_weighted: bool = True  # False: a residual sum's rows weigh the same whatever norm reads it
    reference: onnx.ModelProto | None = field(default=None, repr=False)
    name: str = "downstream_refit"

    def __post_init__(self):
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        reference = self.reference if self.reference is not None else ctx.reference
        if reference is None or ctx.calibration is None:
            return PassResult(model, False, [], [])
        stages, following, skipped = refit_plan(model, reference)
        if not stages:
            return PassResult(model, False, [], [])
        state = FoldState(reference)
        state.replace(model)
        engine = RefitEngine(state, ctx, self.seed)
        refit = kept = 0
        ref = {p.node: p for p in linear_ops(reference)}
        ix_ref = GraphIndex(reference)  # the reference never changes: indexed once, not per stage
        for i, nodes in enumerate(stages):
            ctx.report_progress("downstream refit", i, len(stages))
            ops = {p.node: p for p in linear_ops(state.current_model())}
            group = [ops[n] for n in nodes]
            residuals = weightings = None
            if self.residual:
                ix_now = GraphIndex(state.current_model())
                residuals = [residual_addend(ix_now, ix_ref, p) for p in group]
            units = [kept_units(p, ref[p.node]) for p in group]
            if residuals is not None:  # a narrower op's output is added to nothing of the original's width
                residuals = [None if u is not None else r for r, u in zip(residuals, units)]
                if self.norm_weighted:
                    weightings = [None if r is None else norm_weighting(ix_ref, r[0]) for r in residuals]
            rows = SharedInputRows(group[0].input, group[0].dtype, [ref[n].output for n in nodes],
                                   [p.weight.astype(np.float64) for p in group], residuals=residuals,
                                   units=units if any(u is not None for u in units) else None,
                                   weightings=weightings if weightings and any(weightings) else None)
            outcomes = engine.solve(rows, [(p.weight.astype(np.float64), p.bias_or_zero().copy()) for p in group],
                                    f"downstream refit {i + 1}/{len(stages)}")
            edits = []
            for p, (r, _held) in zip(group, outcomes):
                if r.lam is None:
                    kept += 1
                    continue
                refit += 1
                # rewrite_projections writes Wᵀ as the MatMul's / Gemm's B; a transB Gemm stores W itself
                edits.append(ProjectionEdit(p, r.weight.T if p.stored_out_in else r.weight, r.bias))
            if edits:
                state.replace(rewrite_projections(state.current_model(), edits, [],
                                                  {n for p, _ in zip(group, outcomes) for n in p.nodes}))
        ctx.report_progress("downstream refit", len(stages), len(stages))
        what = (f"downstream refit: {refit} linear ops refit, {kept} kept as they were "
                f"(of {following} from the first changed one; {skipped} left alone: output width or readers changed)")
        if not refit:
            return PassResult(model, False, [], [what])
        return kept_if_better(model, state.current_model(), reference, ctx, self.keep, self.seed, what,
                              "downstream refit: compare", "consumer-only")


def kept_if_better(model: onnx.ModelProto, result: onnx.ModelProto, reference: onnx.ModelProto, ctx: PassContext,
                   keep: str, seed: int, what: str, task: str, before: str) -> PassResult:
    """``result`` (what a pass made of ``model``) with ``keep="always"``; with
    ``"better"`` only when its output error against ``reference`` is lower on
    held-out data (the context's held-out split, else a seeded share of the
    calibration samples), else ``model``. The note starts with ``what`` and
    names ``model``'s error ``before``."""
    if keep == "always":
        return PassResult(result, True, [], [what])
    data, share = ctx.heldout, "held-out split"
    if data is None:
        held = heldout_mask(ctx.calibration.num_samples, seed)
        if held is None:
            return PassResult(result, True, [], [what + "; too few samples to compare, kept"])
        data, share = ctx.calibration.subset(np.flatnonzero(held)), "held-out share of the calibration data"
    error_before, error_after = output_errors([model, result], reference, data, ctx, task)
    if error_after < error_before:
        return PassResult(result, True, [], [f"{what}; kept: output error on the {share} {error_after:.4g} "
                                             f"({before} {error_before:.4g})"])
    return PassResult(model, False, [], [f"{what}; discarded: output error on the {share} {error_after:.4g} "
                                         f"is not below {before} {error_before:.4g}"])
