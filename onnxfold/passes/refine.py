"""Nonlinear refinement: each folded hidden layer's kept units, trained to the original's output.

The least-squares refits (the fold's consumer refit, the downstream refit)
change one linear op at a time with the others fixed: the producer rows a
fold kept stay the original's, even where the input they now read has moved.
This pass takes each folded dense chain (producer → activation → consumer)
in graph order and fits the producer's kept rows, its bias, the consumer's
weight and bias *together* by gradient descent (Adam, PyTorch) so that the
block, fed the compressed model's own input, reproduces the original's
output. The target is the one the downstream refit uses
(:mod:`onnxfold.passes.downstream`): the original's output of the consumer,
or the original's sum less the current residual where the consumer is added
to a residual stream, with each row weighted by 1 / its spread where only a
norm reads that sum.

The rows are a seeded sample of the calibration data (at most ``max_rows``,
input and target stored in float32 while one chain is trained: the only
pass that holds activations). A seeded 20 % of the calibration samples is
held out (``base.heldout_mask``, as the refits hold out); the weights with the
lowest held-out loss over the epochs are kept,
and a chain whose held-out loss did not fall keeps the weights it had.
``keep="better"`` then keeps the refined model only when the error of its
outputs on held-out data is lower, as the downstream refit does.

Folded chains this pass does not handle are left as they are and named in
the notes: a producer or consumer that is no plain MatMul / Gemm with
constant weights, a linear path (linearity folding), an activation without
a PyTorch form here, a folded consumer whose units are no unchanged copies
of the original's (merged, or refit by the fold of the chain before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx

from ..errors import UsageError
from ..find.activations import ActivationSpec
from ..find.chains import find_dense_graph
from ..find.graph_index import GraphIndex
from ..find.projections import Projection
from ..measure.data import batch_samples
from ..measure.jobs import StatsJob, part_of
from ..rewrite.attention import ProjectionEdit, rewrite_projections
from .base import PassContext, PassResult, heldout_mask
from .downstream import (KEEPS, fit_target, kept_if_better, kept_units, linear_ops, norm_weighting,
                         residual_addend)
from .refit import FoldState, original_part

#: rows sampled per chain (input + target, float32), and the memory they may take: MiniLM's 1024
#: calibration windows of 64 tokens give 65 536 rows of 384 + 384 floats (200 MB), all of them taken
DEFAULT_MAX_ROWS = 131_072
MAX_ROW_BYTES = 512 << 20
BATCH_ROWS = 1024


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UsageError("nonlinear refinement (refine_epochs) needs PyTorch: pip install 'onnxfold[refine]'"
                         " (or torch itself)") from e
    return torch


@dataclass
class RefineTarget:
    """One folded chain to refine: its producer and consumer (as linear ops of
    the current model), the activation between them, and what the block's
    output is fit to (the original's tensor ``target``, or the original's
    ``residual[0]`` less the current ``residual[1]``; ``weighting``: the
    norm's row weights, see ``downstream.norm_weighting``)."""

    chain: str
    producer: Projection
    activation: ActivationSpec
    consumer: Projection
    target: str
    residual: tuple[str, str] | None = None
    weighting: str | None = None
    units: np.ndarray | None = None  # the original's units the consumer's outputs are (it was folded too)


def torch_activation(spec: ActivationSpec):
    """The PyTorch function of ``spec`` (None when there is none here)."""
    torch = _torch()
    F = torch.nn.functional
    k = spec.kind
    if k == "relu":
        return F.relu
    if k == "leaky_relu":
        return partial(F.leaky_relu, negative_slope=float(spec.alpha))
    if k == "prelu":  # per kept neuron, or one slope
        slope = torch.as_tensor(np.asarray(spec.slope, dtype=np.float32).reshape(-1))
        return lambda z: torch.where(z > 0, z, z * slope)
    if k == "clip":
        return lambda z: torch.clamp(z, float(spec.lo), float(spec.hi))
    if k == "gelu":
        return F.gelu
    if k == "gelu_tanh":
        return partial(F.gelu, approximate="tanh")
    return {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "identity": lambda z: z}.get(k)


def refine_targets(current: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[list[RefineTarget], list[str]]:
    """The folded chains of ``current`` (the producer narrower than the
    reference's op of the same name) that this pass can refine, in graph
    order, and a note for each folded chain it cannot."""
    view = find_dense_graph(current)
    ops = {p.node: p for p in linear_ops(current)}
    ref = {p.node: p for p in linear_ops(reference)}
    ix_now, ix_ref = GraphIndex(current), GraphIndex(reference)
    out, skipped = [], []
    for chain in view.chains:
        r = ref.get(chain.producer.name)
        if r is None or chain.producer.out_features >= r.out_features:
            continue  # not folded
        prod, cons = ops.get(chain.producer.name), ops.get(chain.consumer.name)
        why = None
        if prod is None or cons is None or cons.node not in ref:
            why = "its producer or consumer is not a plain MatMul / Gemm with constant weights"
        elif chain.producer.paths or chain.consumer.paths or chain.path_readers:
            why = "it has a linear path (linearity folding)"
        elif torch_activation(chain.activation) is None:
            why = f"no PyTorch form of its activation {chain.activation.describe()}"
        elif prod.output != chain.producer.output:
            why = "its producer writes more than the pre-activation"
        units = None
        if why is None and cons.out_features != ref[cons.node].out_features:
            # the reader was folded too (the next chain's producer): its kept units are the target
            units = kept_units(cons, ref[cons.node])
            if units is None:
                why = "its reader's units are no unchanged copies of the original's (merged or refit)"
        if why is not None:
            skipped.append(f"{chain.name}: not refined ({why})")
            continue
        residual = None if units is not None else residual_addend(ix_now, ix_ref, cons)
        weighting = None if residual is None else norm_weighting(ix_ref, residual[0])
        out.append(RefineTarget(chain.name, prod, chain.activation, cons, ref[cons.node].output, residual, weighting,
                                units))
    return out, skipped


class RowSample:
    """Sampled rows of one chain (input, target, weight, held out?), kept in
    float32 in the order of the samples they came from; merges like the
    statistics accumulators (shards concatenate)."""

    def __init__(self):
        self.chunks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def merge(self, other: "RowSample") -> "RowSample":
        self.chunks.extend(other.chunks)
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        chunks = sorted(self.chunks, key=lambda c: c[0])
        return tuple(np.concatenate([c[i] for c in chunks]) for i in range(1, 5))


def _new_sample() -> dict:
    return {"rows": RowSample()}


def _add_sample(target: RefineTarget, max_rows: int, seed: int, held_samples: np.ndarray, accs: dict, start: int,
                feed: dict, _labels, tensors: list) -> None:
    cur, orig = tensors[0], tensors[-1]
    count = batch_samples(feed)
    x = np.asarray(cur[target.producer.input])
    per_sample = x.size // (count * x.shape[-1])  # rows per sample (tokens, positions)
    keep = min(1.0, max_rows / (held_samples.size * per_sample))
    X = x.reshape(-1, x.shape[-1])
    T, w = fit_target(cur, orig, x.shape[:-1], target.target, target.consumer.out_features, target.residual,
                      target.units, target.weighting)
    w = np.ones(X.shape[0]) if w is None else w
    held = np.repeat(held_samples[start:start + count], per_sample)
    # the same rows whatever the batching: the draw is seeded by the batch's first sample
    chosen = np.random.default_rng([seed, start]).random(X.shape[0]) < keep
    accs["rows"].chunks.append((start, X[chosen].astype(np.float32), T[chosen].astype(np.float32),
                                w[chosen].astype(np.float32), held[chosen]))


@dataclass
class BlockRefinePass:
    """Refine the folded chains' kept units (module docstring). ``epochs``:
    passes over the sampled rows (0: off); ``reference``: the model before
    the folds (default: the context's)."""

    epochs: int = 12
    lr: float = 1e-3
    max_rows: int = DEFAULT_MAX_ROWS
    keep: str = "better"
    seed: int = 0
    reference: onnx.ModelProto | None = field(default=None, repr=False)
    name: str = "refine"

    def __post_init__(self):
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        if int(self.epochs) < 0 or self.lr <= 0 or self.max_rows < 1:
            raise ValueError("refine needs epochs >= 0, lr > 0 and max_rows >= 1")

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        reference = self.reference if self.reference is not None else ctx.reference
        if not self.epochs or reference is None or ctx.calibration is None:
            return PassResult(model, False, [], [])
        targets, notes = refine_targets(model, reference)
        if not targets:
            return PassResult(model, False, [], [f"refine: {n}" for n in notes])
        torch = _torch()
        state = FoldState(reference)
        state.replace(model)
        held = heldout_mask(ctx.calibration.num_samples, self.seed)
        if held is None:
            return PassResult(model, False, [], ["refine: too few calibration samples to hold any out"])
        refined = []
        for i, t in enumerate(targets):
            ctx.report_progress("refine", i, len(targets))
            current = state.current_model()
            ops = {p.node: p for p in linear_ops(current)}
            t.producer, t.consumer = ops[t.producer.node], ops[t.consumer.node]
            X, T, w, held_rows = self._rows(t, state, ctx, held)
            if not held_rows.any() or held_rows.all():
                notes.append(f"{t.chain}: not refined (every sampled row on one side of the held-out split)")
                continue
            result = self._train(torch, t, X, T, w, held_rows,
                                 lambda done: ctx.report_progress(f"refine {t.chain}: training", done, self.epochs))
            if result is None:
                notes.append(f"{t.chain}: kept (the held-out loss did not fall)")
                continue
            (w1, b1, w2, b2), before, after = result
            # out × in weights; rewrite_projections writes Wᵀ as a MatMul's B, a transB Gemm stores W itself
            edits = [ProjectionEdit(t.producer, w1.T if t.producer.stored_out_in else w1, b1),
                     ProjectionEdit(t.consumer, w2.T if t.consumer.stored_out_in else w2, b2)]
            state.replace(rewrite_projections(current, edits, [], set(t.producer.nodes) | set(t.consumer.nodes)))
            refined.append(t.chain)
            notes.append(f"{t.chain}: held-out loss {before:.4g} -> {after:.4g} ({len(X):,} rows)")
        ctx.report_progress("refine", len(targets), len(targets))
        what = f"refine: {len(refined)} of {len(targets)} folded chains refined ({'; '.join(notes)})"
        if not refined:
            return PassResult(model, False, [], [what])
        return kept_if_better(model, state.current_model(), reference, ctx, self.keep, self.seed, what,
                              "refine: compare", "before")

    def _rows(self, t: RefineTarget, state: FoldState, ctx: PassContext, held: np.ndarray):
        current = {t.producer.input: t.producer.dtype}
        original = {t.target: t.consumer.dtype}
        if t.residual is not None:
            current[t.residual[1]] = t.consumer.dtype
            original = {t.residual[0]: t.consumer.dtype}
        row_bytes = 4 * (t.producer.in_features + t.consumer.out_features + 1)
        max_rows = max(1, min(self.max_rows, MAX_ROW_BYTES // row_bytes))
        job = StatsJob([(part_of(state.current_model(), current), list(current)),
                        (original_part(state, original, ctx.cache), list(original))],
                       _new_sample, partial(_add_sample, t, max_rows, self.seed, held), replayable=(1,))
        return ctx.measure(job, ctx.calibration, f"refine {t.chain}: rows")["rows"].arrays()

    def _train(self, torch, t: RefineTarget, X, T, w, held_rows, progress):
        act = torch_activation(t.activation)
        torch.manual_seed(self.seed)
        params = [torch.tensor(np.asarray(a, dtype=np.float32), requires_grad=True) for a in
                  (t.producer.weight.T, t.producer.bias_or_zero(), t.consumer.weight.T, t.consumer.bias_or_zero())]
        w1, b1, w2, b2 = params
        Xt, Tt = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(T))
        wt = torch.from_numpy(w / max(float(w.mean()), 1e-30))
        fit, hold = np.flatnonzero(~held_rows), np.flatnonzero(held_rows)

        def loss(idx) -> float:
            total = 0.0
            with torch.no_grad():
                for s in range(0, len(idx), 8 * BATCH_ROWS):
                    j = idx[s:s + 8 * BATCH_ROWS]
                    err = act(Xt[j] @ w1 + b1) @ w2 + b2 - Tt[j]
                    total += float(((err * err).sum(1) * wt[j]).sum())
            return total / len(idx)

        start = best = loss(hold)
        snapshot = None
        steps_per_epoch = max(1, len(fit) // BATCH_ROWS)
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs * steps_per_epoch)
        rng = np.random.default_rng(self.seed)
        for epoch in range(int(self.epochs)):
            progress(epoch)
            order = fit[rng.permutation(len(fit))]
            for s in range(steps_per_epoch):
                j = order[s * BATCH_ROWS:(s + 1) * BATCH_ROWS]
                err = act(Xt[j] @ w1 + b1) @ w2 + b2 - Tt[j]
                batch_loss = ((err * err).sum(1) * wt[j]).mean()
                opt.zero_grad()
                batch_loss.backward()
                opt.step()
                sched.step()
            h = loss(hold)
            if h < best:
                best, snapshot = h, [p.detach().numpy().astype(np.float64).copy() for p in params]
        progress(int(self.epochs))
        if snapshot is None:
            return None
        w1, b1, w2, b2 = snapshot
        return (w1.T, b1, w2.T, b2), start, best

