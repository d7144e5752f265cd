"""Verify: compare a rewritten model with the original on held-out samples.

One comparison engine serves every command (optimize's final check, the
budget search's candidate judging, the benchmarks): both models run on the
same batches side by side and per-output error statistics are accumulated in
a streaming fashion, so evaluation sets of any size fit in memory.

Output kinds:
- sequence: float output [batch, positions, classes ≥ 2] (a language model's
  logits, a token classifier) → a classifier per position: per-token top-1
  agreement, per-token accuracy against labels [batch, positions] (a label
  < 0 is ignored, as in cross-entropy's ignore index) and the perplexity of
  the labels; positions an ``attention_mask`` input marks 0 are not judged.
  Per-sequence counts are kept too: budgets bound per-token rates with the
  sequence as the independent unit (decide/confidence.py);
- classifier-like: other float outputs whose last axis has ≥ 2 entries →
  top-1 agreement (and accuracy against labels when the data has labels);
- label output: integer output (e.g. skl2onnx's label) → exact agreement;
- anything else: max / mean absolute error only (regressors, embeddings).
Non-tensor outputs (e.g. ZipMap's sequence of maps) are skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from .measure.data import batch_samples


@dataclass
class OutputComparison:
    name: str
    kind: str  # "classifier" | "label" | "values"
    count: int = 0  # compared samples
    max_abs_error: float = 0.0
    mean_abs_error: float = 0.0
    max_abs_reference: float = 0.0  # scale for relative errors
    agreement: float | None = None  # top-1 / label agreement in [0, 1]
    accuracy_original: float | None = None
    accuracy_candidate: float | None = None
    positive_count: int | None = None  # samples the original calls positive
    positive_agreement: float | None = None  # agreement of decisions on those
    decision_agreement: float | None = None  # agreement of binary decisions overall
    # counts behind the rates: the confidence bounds of decide.budget need them
    flips: int | None = None  # samples whose top-1 / label changed
    labeled: int = 0  # labelled predictions compared
    newly_wrong: int = 0  # labelled predictions the original got right and the candidate gets wrong
    newly_right: int = 0  # ... and the other way round
    decision_flips: int | None = None  # samples whose binary decision changed
    positive_flips: int | None = None  # original's positives the candidate calls negative
    # sequence outputs: positions judged (count is then the number of sequences; agreement,
    # flips, accuracies and newly_wrong/right are per token) and the perplexity of the labels
    tokens: int | None = None
    perplexity_original: float | None = None
    perplexity_candidate: float | None = None
    # per-sample largest / mean absolute deviation (not in the JSON report)
    sample_max_abs_error: np.ndarray | None = field(default=None, repr=False)
    sample_mean_abs_error: np.ndarray | None = field(default=None, repr=False)
    # per sequence (sequence outputs): tokens judged, tokens whose top-1 changed, labelled
    # tokens, tokens newly wrong / newly right, and the mean log-perplexity change
    sample_tokens: np.ndarray | None = field(default=None, repr=False)
    sample_token_flips: np.ndarray | None = field(default=None, repr=False)
    sample_labeled: np.ndarray | None = field(default=None, repr=False)
    sample_newly_wrong: np.ndarray | None = field(default=None, repr=False)
    sample_newly_right: np.ndarray | None = field(default=None, repr=False)
    sample_nll_increase: np.ndarray | None = field(default=None, repr=False)

    @property
    def relative_max_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_reference, 1e-12)

    @property
    def accuracy_drop_pp(self) -> float | None:
        if self.accuracy_original is None or self.accuracy_candidate is None:
            return None
        return 100.0 * (self.accuracy_original - self.accuracy_candidate)

    @property
    def perplexity_increase_pct(self) -> float | None:
        if self.perplexity_original is None or self.perplexity_candidate is None:
            return None
        return 100.0 * (self.perplexity_candidate / self.perplexity_original - 1.0)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("sample_")}
        d["relative_max_error"] = self.relative_max_error
        d["accuracy_drop_pp"] = self.accuracy_drop_pp
        d["perplexity_increase_pct"] = self.perplexity_increase_pct
        return d


@dataclass
class Comparison:
    samples: int
    outputs: dict[str, OutputComparison] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    outputs_of_candidate: dict[str, np.ndarray] | None = None

    @property
    def primary(self) -> OutputComparison | None:
        """The output that carries the model's decision: a label output if
        there is one, else the first classifier output, else the first output."""
        for kind in ("label", "sequence", "classifier", "values"):
            for o in self.outputs.values():
                if o.kind == kind:
                    return o
        return None

    def to_dict(self) -> dict:
        return {"samples": self.samples, "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
                "notes": list(self.notes)}


class _Acc:
    """Streaming accumulator for one output."""

    def __init__(self, name: str, positive_threshold: float | None, perplexity: bool = True):
        self.name, self.thr = name, positive_threshold
        self.kind = None
        self.n = 0
        self.max_err = 0.0
        self.sum_err = 0.0
        self.n_elems = 0
        self.max_ref = 0.0
        self.agree = 0
        self.correct_ref = 0
        self.correct_cand = 0
        self.newly_wrong = 0
        self.newly_right = 0
        self.n_labeled = 0
        self.dec_agree = 0
        self.pos = 0
        self.pos_agree = 0
        self.sample_max: list[np.ndarray] = []
        self.sample_mean: list[np.ndarray] = []
        self.sequences = _SequenceCounts(perplexity)

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None,
               mask: np.ndarray | None = None, memo: dict | None = None) -> None:
        """One batch; ``mask`` (an attention mask, [batch, positions]) selects
        the positions of a sequence output that are judged. ``memo``: what
        this batch's reference gave the last time (``compare_models``'
        ``reference_memo``): filled the first time, read afterwards."""
        memo = {} if memo is None else memo
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape:
            raise ValueError(f"output '{self.name}' changed shape: {ref.shape} -> {cand.shape}")
        if self.kind is None:
            if np.issubdtype(ref.dtype, np.integer) or ref.dtype == bool:
                self.kind = "label"
            elif ref.ndim == 3 and ref.shape[-1] >= 2:
                self.kind = "sequence"
            elif ref.ndim >= 2 and ref.shape[-1] >= 2:
                self.kind = "classifier"
            else:
                self.kind = "values"
        b = ref.shape[0] if ref.ndim else 1
        self.n += b
        # float64 copies only where a float64 value is read (the reference's mostly come from ``memo``)
        f64 = np.float64
        err = np.subtract(ref, cand, dtype=f64)  # what r64 - c64 gives, without the two copies
        np.abs(err, out=err)
        if err.size:
            # a NaN makes the maximum NaN: the NaN-aware passes only when there is one (same sums otherwise)
            nan = bool(np.isnan(err.max()))
            self.max_err = np.inf if nan else max(self.max_err, float(err.max()))
            self.sum_err += float(np.nansum(err) if nan else err.sum())
            self.n_elems += err.size
            if "max_ref" not in memo:
                memo["max_ref"] = largest_magnitude(ref)
            self.max_ref = max(self.max_ref, memo["max_ref"])
            per_sample = (np.where(np.isnan(err), np.inf, err) if nan else err).reshape(b, -1)
            self.sample_max.append(per_sample.max(axis=1))
            self.sample_mean.append(per_sample.mean(axis=1))
        if self.kind == "sequence":
            self.sequences.update(ref, cand, labels, mask, memo)
            return
        if self.kind == "label":
            pr, pc = ref.reshape(b, -1), cand.reshape(b, -1)
            self.agree += int(np.all(pr == pc, axis=1).sum())
            pred_r, pred_c = pr[:, 0], pc[:, 0]
        elif self.kind == "classifier":
            if "pred" not in memo:
                memo["pred"] = ref.argmax(-1)
            pred_r, pred_c = memo["pred"], cand.argmax(-1)
            self.agree += int((pred_r == pred_c).reshape(b, -1).all(axis=1).sum())
        else:
            pred_r = pred_c = None
        if labels is not None and pred_r is not None:
            lab = np.asarray(labels)
            if lab.shape == pred_r.shape:
                right_r, right_c = pred_r == lab, pred_c == lab
                self.correct_ref += int(right_r.sum())
                self.correct_cand += int(right_c.sum())
                self.newly_wrong += int((right_r & ~right_c).sum())
                self.newly_right += int((~right_r & right_c).sum())
                self.n_labeled += lab.size
        if self.thr is not None and self.kind in ("classifier", "values"):
            if "decisions" not in memo:
                memo["decisions"] = _decisions(ref.astype(f64), self.thr)
            dr, dc = memo["decisions"], _decisions(cand.astype(f64), self.thr)
            self.dec_agree += int((dr == dc).sum())
            self.pos += int(dr.sum())
            self.pos_agree += int((dc[dr]).sum())

    def result(self) -> OutputComparison:
        o = OutputComparison(self.name, self.kind or "values", self.n, self.max_err,
                             self.sum_err / max(self.n_elems, 1), self.max_ref)
        if self.kind in ("label", "classifier"):
            o.agreement = self.agree / max(self.n, 1)
            o.flips = self.n - self.agree
        if self.n_labeled:
            o.accuracy_original = self.correct_ref / self.n_labeled
            o.accuracy_candidate = self.correct_cand / self.n_labeled
            o.labeled, o.newly_wrong, o.newly_right = self.n_labeled, self.newly_wrong, self.newly_right
        if self.thr is not None and self.kind in ("classifier", "values"):
            o.decision_agreement = self.dec_agree / max(self.n, 1)
            o.decision_flips = self.n - self.dec_agree
            o.positive_count = self.pos
            o.positive_agreement = self.pos_agree / self.pos if self.pos else None
            o.positive_flips = self.pos - self.pos_agree
        if self.sample_max:
            o.sample_max_abs_error = np.concatenate(self.sample_max)
            o.sample_mean_abs_error = np.concatenate(self.sample_mean)
        if self.kind == "sequence":
            self.sequences.fill(o)
        return o


class _SequenceCounts:
    """Per-sequence counts of a sequence output [batch, positions, classes]."""

    def __init__(self, perplexity: bool = True):
        # the perplexity takes a log-softmax over the vocabulary per position: most of
        # a language model's comparison, left out where nothing reads it
        self.perplexity = perplexity
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (
            "tokens", "flips", "labeled", "right_ref", "right_cand", "newly_wrong", "newly_right", "nll_ref",
            "nll_cand")}

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None, mask: np.ndarray | None,
               memo: dict | None = None) -> None:
        memo = {} if memo is None else memo
        b, s = ref.shape[:2]
        judged = np.ones((b, s), dtype=bool)
        if mask is not None and np.shape(mask) == (b, s):
            judged = np.asarray(mask) != 0
        if "pred" not in memo:
            memo["pred"] = ref.argmax(-1)
        pred_r, pred_c = memo["pred"], cand.argmax(-1)
        add = {"tokens": judged.sum(1), "flips": ((pred_r != pred_c) & judged).sum(1)}
        lab = None if labels is None else np.asarray(labels)
        if lab is not None and lab.shape == (b, s) and np.issubdtype(lab.dtype, np.integer):
            scored = judged & (lab >= 0) & (lab < ref.shape[-1])
            safe = np.where(scored, lab, 0)
            right_r, right_c = (pred_r == safe) & scored, (pred_c == safe) & scored
            add.update(labeled=scored.sum(1), right_ref=right_r.sum(1), right_cand=right_c.sum(1),
                       newly_wrong=(right_r & ~right_c).sum(1), newly_right=(~right_r & right_c).sum(1))
            if self.perplexity:
                add["nll_cand"] = (_nll(cand.astype(np.float64), safe) * scored).sum(1)
                if "nll" not in memo:
                    memo["nll"] = (_nll(ref.astype(np.float64), safe) * scored).sum(1)
                add["nll_ref"] = memo["nll"]
        for k, v in add.items():
            self.parts[k].append(np.asarray(v, dtype=np.float64))

    def fill(self, o: OutputComparison) -> None:
        got = {k: np.concatenate(v) for k, v in self.parts.items() if v}
        tokens, flips = got["tokens"], got["flips"]
        o.tokens = int(tokens.sum())
        o.flips = int(flips.sum())
        o.agreement = 1.0 - o.flips / max(o.tokens, 1)
        o.sample_tokens, o.sample_token_flips = tokens, flips
        if "labeled" in got and got["labeled"].sum() > 0 and len(got["labeled"]) == len(tokens):
            labeled = got["labeled"]
            o.labeled = int(labeled.sum())
            o.accuracy_original = float(got["right_ref"].sum()) / o.labeled
            o.accuracy_candidate = float(got["right_cand"].sum()) / o.labeled
            o.newly_wrong, o.newly_right = int(got["newly_wrong"].sum()), int(got["newly_right"].sum())
            o.sample_labeled, o.sample_newly_wrong, o.sample_newly_right = \
                labeled, got["newly_wrong"], got["newly_right"]
            if "nll_cand" in got:
                o.perplexity_original = float(np.exp(got["nll_ref"].sum() / o.labeled))
                o.perplexity_candidate = float(np.exp(got["nll_cand"].sum() / o.labeled))
                with np.errstate(invalid="ignore", divide="ignore"):
                    o.sample_nll_increase = (got["nll_cand"] - got["nll_ref"]) / labeled  # nan: nothing labelled


def _nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``labels`` under softmax(``logits``), per position."""
    top = logits.max(-1, keepdims=True)
    shifted = logits - top
    log_z = np.log(np.exp(shifted, out=shifted).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def largest_magnitude(values: np.ndarray) -> float:
    """max |values| (0 for none), as a float: the scale an output's relative errors are
    judged against. Integers are widened first (abs of the most negative one overflows);
    floats need no copy (abs and max are exact in their own dtype)."""
    v = np.asarray(values)
    if not v.size:
        return 0.0
    return float(np.abs(v.astype(np.float64) if v.dtype.kind in "iub" else v).max())


def _decisions(out: np.ndarray, thr: float) -> np.ndarray:
    """Binary detector decisions per sample: score > thr for a single score;
    for a softmax over several classes, any non-first class above thr."""
    b = out.shape[0]
    flat = out.reshape(b, -1) if out.ndim > 1 else out.reshape(b, 1)
    if flat.shape[1] == 1:
        return flat[:, 0] > thr
    return (flat[:, 1:] > thr).any(axis=1)


def compare_models(original: onnx.ModelProto, candidate: onnx.ModelProto, data, *, providers=None,
                   batch_size: int = 256, positive_threshold: float | None = None,
                   original_outputs: dict[str, np.ndarray] | None = None,
                   keep_outputs: bool = False,
                   candidate_outputs: Iterator[dict[str, np.ndarray]] | None = None,
                   reference_memo: dict | None = None,
                   stop: Callable[[Comparison], bool] | None = None,
                   perplexity: bool = True) -> Comparison:
    """Run both models on ``data`` (a CalibrationSet) and compare every output.

    ``original_outputs`` may hold the original model's outputs on ``data``
    already (the budget search judges many candidates against one reference).
    ``keep_outputs`` stores the candidate's outputs in ``Comparison.outputs_of_candidate``
    (small selection sets only). ``candidate_outputs``: the candidate's
    outputs batch by batch (``data.labeled_batches(batch_size)``'s batches),
    computed elsewhere - the search runs only the part of a candidate after
    what it shares with the original (``measure.suffix``). ``reference_memo``:
    a dict kept by a caller that compares many candidates on the same
    ``data``, batching and ``original_outputs``; what the reference gives
    per batch (its predictions, the perplexity of the labels under it) is
    computed for the first candidate and read for the others. ``stop``: called
    with the comparison so far after every batch but the last; when it says
    True, the rest of ``data`` is not run and the comparison of the samples
    seen is returned (its ``samples`` fewer than ``data``'s): the search stops
    judging a candidate whose failure is settled (``Budget.settled_failure``).
    ``perplexity=False``: sequence outputs get no perplexity (nor per-sequence
    log-perplexity change); the search leaves it out unless its budget
    limits the perplexity.
    """
    providers = providers or ["CPUExecutionProvider"]
    ref_sess = None if original_outputs is not None else _session(original, providers)
    if candidate_outputs is None:
        cand_sess = _session(candidate, providers)
        outs = [(o.name, o.type) for o in cand_sess.get_outputs()]
    else:  # the caller computed tensors for every output
        cand_sess = None
        outs = [(o.name, "tensor") for o in candidate.graph.output]
    tensor_outs = [name for name, kind in outs if kind.startswith("tensor")]
    notes = [f"output '{name}' is not a tensor ({kind}); not compared"
             for name, kind in outs if not kind.startswith("tensor")]
    accs = {n: _Acc(n, positive_threshold, perplexity) for n in tensor_outs}
    kept: dict[str, list] = {n: [] for n in tensor_outs}
    start = 0
    for batch, labels in data.labeled_batches(batch_size):
        feed = dict(batch)  # onnxruntime takes dicts only; a subset's batch gathers its rows here
        b = batch_samples(feed)
        if ref_sess is not None:  # the original first: data that does not fit fails there, as a data error
            ref = dict(zip(tensor_outs, _run_on_data(ref_sess, tensor_outs, feed, data)))
        if cand_sess is None:
            batch = next(candidate_outputs)
            got = {n: batch[n] for n in tensor_outs}
        else:
            with _in_runtime():
                got = dict(zip(tensor_outs, cand_sess.run(tensor_outs, feed, _quiet())))
        if ref_sess is None:
            ref = {n: original_outputs[n][start:start + b] for n in tensor_outs}
        mask = _attention_mask(feed)
        for n in tensor_outs:
            memo = None if reference_memo is None else reference_memo.setdefault((n, start, b), {})
            accs[n].update(ref[n], got[n], labels, mask, memo)
            if keep_outputs:
                kept[n].append(got[n])
        start += b
        if stop is not None and start < data.num_samples and stop(_comparison(start, accs, notes)):
            if hasattr(candidate_outputs, "close"):  # a generator's session goes now, not at collection
                candidate_outputs.close()
            break
    comp = _comparison(start, accs, notes)
    if keep_outputs:
        comp.outputs_of_candidate = {n: np.concatenate(v, axis=0) for n, v in kept.items()}
    return comp


def _comparison(samples: int, accs: dict[str, "_Acc"], notes: list[str]) -> Comparison:
    return Comparison(samples=samples, outputs={n: a.result() for n, a in accs.items()}, notes=list(notes))


def _attention_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The batch's attention mask, when the model takes one (an input named
    ``attention_mask``, as transformers exports name it)."""
    for name, value in feed.items():
        if name == "attention_mask" or name.endswith("/attention_mask"):
            return np.asarray(value)
    return None


def reference_outputs(model: onnx.ModelProto, data, *, providers=None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The model's tensor outputs on ``data``, concatenated (for repeated comparisons)."""
    sess = _session(model, providers or ["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs() if o.type.startswith("tensor")]
    parts: dict[str, list] = {n: [] for n in names}
    for feed in data.batches(batch_size):
        for n, v in zip(names, _run_on_data(sess, names, dict(feed), data)):
            parts[n].append(v)
    return {n: np.concatenate(v, axis=0) for n, v in parts.items()}


def _in_runtime():
    """Model runs outside the final check are calibration work (candidate
    judging in the budget search), not the decide stage's."""
    from .measure.stream import MEASURING_STAGES
    from .profile import stage

    return stage("calibration", unless_in=MEASURING_STAGES)


def _session(model: onnx.ModelProto, providers):
    from .runtime import create_session

    with _in_runtime():
        return create_session(model, providers)


def _quiet():
    from .runtime import quiet_run_options

    return quiet_run_options()


def _run_on_data(sess, names, feed, data):
    """``sess.run`` of the *original* model on user data: onnxruntime failing
    there means the data does not fit the model (a CalibrationDataError, one
    line), not a bug."""
    from .errors import CalibrationDataError
    from .runtime import run_error_message, run_error_types

    try:
        with _in_runtime():
            return sess.run(names, feed, _quiet())
    except run_error_types() as e:
        raise CalibrationDataError(
            f"onnxruntime failed on the {getattr(data, 'what', 'calibration')} data ({run_error_message(e)});"
            " make the data match what the model expects"
        ) from None
