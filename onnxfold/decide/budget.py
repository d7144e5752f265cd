"""Budgets: what "good enough" means for a compressed model, judged with confidence.

A ``Budget`` turns a ``verify.Comparison`` on held-out samples into a
``BudgetCheck``. Every limit is a claim about unseen data, so it is judged by
a one-sided upper confidence bound (``decide.confidence``), never by the
point estimate alone:

- min agreement: the disagreement rate (top-1, label, or binary decisions
  and decisions on the original's positives with a positive threshold);
  for a sequence output the per-token rate, with the sequence as the unit;
- max accuracy drop: the paired newly-wrong / newly-right counts (McNemar),
  per token for a sequence output;
- max perplexity increase (sequence outputs with next-token labels): the
  mean per-sequence change of log-perplexity (Student's t);
- max error / default relative error: the share of samples whose error is
  over the limit, against ``1 - error_quantile`` (the budget bounds that
  quantile of the per-sample error); with the mean metric, the mean error.

When the samples cannot resolve a limit at that confidence (even a
candidate with no change at all could not be shown to meet it), only a
candidate with *no observed change* passes: no decision changed and no
output moved by more than ``UNCHANGED_RELATIVE_ERROR`` of its range. The
check then says how many samples the limit needs.

``spent`` in [0, inf) is the largest bound / limit (1.0 = at the limit), so the
search can compare candidates by "parameters saved per unit of budget spent".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import UsageError
from ..verify import Comparison, OutputComparison
from .confidence import (DEFAULT_CONFIDENCE, MIN_SAMPLES_FOR_MEAN, accuracy_drop_upper, mean_upper,
                         paired_drop_upper, rate_upper, samples_for_accuracy_drop, samples_for_rate,
                         sequences_for_paired_drop, sequences_for_unit_mean, unit_mean_upper)

DEFAULT_MIN_AGREEMENT = 99.5  # percent, classifier-like outputs
DEFAULT_MAX_RELATIVE_ERROR = 1e-3  # non-classifier outputs, relative to max |reference|
DEFAULT_ERROR_QUANTILE = 0.99  # an error limit bounds this quantile of the per-sample error
UNCHANGED_RELATIVE_ERROR = 1e-3  # 'no observed change': no output moved by more than this share of its range
UNRESOLVED_SPENT = 1000.0  # 'far over budget' (finite: the JSON report must stay standard JSON)


@dataclass
class LimitCheck:
    """One limit of the budget judged on one output."""

    kind: str  # agreement | decision_agreement | positive_agreement | accuracy_drop | error_quantile | mean_error
    output: str
    limit: float  # the allowed rate (fraction), accuracy drop (fraction) or mean error
    observed: float  # the point estimate on the held-out samples
    bound: float  # one-sided upper confidence bound of it (inf when not computable)
    samples: int  # samples (for positive_agreement: positives) behind the bound
    needed: int | None  # samples at which an unchanged candidate meets the limit; None: never (zero budget)
    met: bool
    message: str = ""  # why it failed ('' when it passed)

    @property
    def resolved(self) -> bool:
        return self.needed is not None and self.samples >= self.needed

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["resolved"] = self.resolved
        return d


@dataclass
class BudgetCheck:
    met: bool
    spent: float
    failures: list[str]
    limits: list[LimitCheck] = field(default_factory=list)
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def resolution_notes(self) -> list[str]:
        """One sentence per limit the samples could not resolve."""
        return [resolution_note(lc, self.confidence) for lc in self.limits if not lc.resolved]

    def to_dict(self) -> dict:
        return {"met": self.met, "spent": self.spent, "failures": list(self.failures),
                "confidence": self.confidence, "limits": [lc.to_dict() for lc in self.limits]}


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


_WHAT = {
    "agreement": ("disagreement", "held-out samples"),
    "decision_agreement": ("decision disagreement", "held-out samples"),
    "positive_agreement": ("disagreement on the original's positives", "positives among the held-out samples"),
    "accuracy_drop": ("accuracy drop", "labelled held-out samples"),
    "error_quantile": ("share of samples over the error limit", "held-out samples"),
    "mean_error": ("mean error", "held-out samples"),
    "token_agreement": ("per-token disagreement", "held-out sequences"),
    "token_accuracy_drop": ("per-token accuracy drop", "labelled held-out sequences"),
    "perplexity_increase": ("perplexity increase", "labelled held-out sequences"),
}


def resolution_note(lc: LimitCheck, confidence: float) -> str:
    """'N samples cannot resolve ...; needs M': said in the console and the report."""
    what, unit = _WHAT[lc.kind]
    limit = f"{lc.limit:.3g}" if lc.kind == "mean_error" else _pct(lc.limit)
    need = ("no sample count resolves a zero budget" if lc.needed is None
            else f"needs at least {lc.needed} {unit}")
    return (f"{lc.samples} {unit} cannot resolve a {limit} {what} budget on '{lc.output}' at "
            f"{100 * confidence:g}% confidence ({need}): only candidates with no observed change pass")


@dataclass
class Budget:
    max_accuracy_drop: float | None = None  # percentage points, needs labels
    min_agreement: float | None = None  # percent, top-1 (or decisions with positive_threshold)
    max_error: dict[str, float] | float | None = None  # absolute, per output name or for all
    error_metric: str = "max"  # "max" | "mean" absolute deviation
    max_relative_error: float | None = None  # relative to max |reference| (default budget, non-classifiers)
    max_perplexity_increase: float | None = None  # percent, sequence outputs with next-token labels
    target_ratio: float | None = None  # parameter ratio to reach (with the least error)
    positive_threshold: float | None = None
    confidence: float = DEFAULT_CONFIDENCE  # of every one-sided bound
    error_quantile: float = DEFAULT_ERROR_QUANTILE  # an error limit bounds this quantile of per-sample errors
    is_default: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def default(cls, positive_threshold: float | None = None) -> "Budget":
        """Never silently degrade: top-1 agreement >= 99.5 % on classifier
        outputs, error <= 1e-3 relative on the others."""
        return cls(min_agreement=DEFAULT_MIN_AGREEMENT, max_relative_error=DEFAULT_MAX_RELATIVE_ERROR,
                   positive_threshold=positive_threshold, is_default=True)

    @property
    def has_quality_limit(self) -> bool:
        return any(x is not None for x in (self.max_accuracy_drop, self.min_agreement, self.max_error,
                                           self.max_relative_error, self.max_perplexity_increase))

    def validate(self, *, has_labels: bool) -> None:
        if self.max_accuracy_drop is not None and not has_labels:
            raise UsageError("--max-accuracy-drop needs labels: add a 'labels' array to the calibration "
                             "(and evaluation) data")
        if self.max_perplexity_increase is not None and not has_labels:
            raise UsageError("--max-perplexity-increase needs next-token labels: add --labels next-token (or a "
                             "'labels' array [samples, positions] to the data)")
        if self.max_perplexity_increase is not None and self.max_perplexity_increase < 0:
            raise UsageError(f"--max-perplexity-increase is a percentage >= 0, got {self.max_perplexity_increase}; "
                             "give e.g. 1")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"--max-accuracy-drop is a number of percentage points >= 0, got {self.max_accuracy_drop}")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 100:
            raise UsageError(f"--min-agreement is a percentage in (0, 100], got {self.min_agreement}")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise UsageError(f"--target-ratio must be in (0, 1], got {self.target_ratio}")
        if self.error_metric not in ("max", "mean"):
            raise UsageError(f"error metric must be 'max' or 'mean', got {self.error_metric!r}")
        if not 0.5 <= self.confidence < 1:
            raise UsageError(f"--confidence is a probability in [0.5, 1), got {self.confidence}")
        if not 0 < self.error_quantile < 1:
            raise UsageError(f"--error-quantile must be in (0, 1), got {self.error_quantile}")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}

    def samples_needed(self, sequences: bool = False) -> int:
        """Held-out samples at which an unchanged candidate meets every limit
        this budget sets (the largest need over the output kinds);
        ``sequences``: the model has sequence outputs, whose per-token limits
        count sequences under a bound that needs a few more of them."""
        needs = [1]
        if self.min_agreement is not None:
            allowed = 1 - self.min_agreement / 100
            needs.append(samples_for_rate(allowed, self.confidence) or 1)
            if sequences:
                needs.append(sequences_for_unit_mean(allowed, self.confidence) or 1)
        if self.max_accuracy_drop is not None:
            needs.append(samples_for_accuracy_drop(self.max_accuracy_drop / 100, self.confidence) or 1)
            if sequences:
                needs.append(sequences_for_paired_drop(self.max_accuracy_drop / 100, self.confidence) or 1)
        if self.max_perplexity_increase is not None:
            needs.append(MIN_SAMPLES_FOR_MEAN)
        if self.max_error is not None or self.max_relative_error is not None:
            needs.append(MIN_SAMPLES_FOR_MEAN if self.error_metric == "mean"
                         else samples_for_rate(1 - self.error_quantile, self.confidence))
        return max(needs)

    # ------------------------------------------------------------------
    def check(self, comp: Comparison) -> BudgetCheck:
        """Judge one comparison: every limit by its upper confidence bound."""
        limits: list[LimitCheck] = []
        for name, o in comp.outputs.items():
            classifier = o.kind in ("classifier", "label", "sequence")
            unchanged = _unchanged(o)
            if o.kind == "sequence":
                limits += self._sequence_limits(name, o, unchanged, primary=o is comp.primary)
                limits += self._error_limits(name, o, unchanged, classifier)
                continue
            if self.min_agreement is not None and (classifier or self.positive_threshold is not None):
                allowed = 1.0 - self.min_agreement / 100
                if self.positive_threshold is not None and o.decision_flips is not None:
                    limits.append(self._rate("decision_agreement", name, o.decision_flips, o.count, allowed, unchanged))
                    if o.positive_count:
                        limits.append(self._rate("positive_agreement", name, o.positive_flips, o.positive_count,
                                                 allowed, unchanged))
                elif o.flips is not None:
                    limits.append(self._rate("agreement", name, o.flips, o.count, allowed, unchanged))
            if self.max_accuracy_drop is not None and o.labeled and o is comp.primary:
                allowed = self.max_accuracy_drop / 100
                n = o.labeled
                bound = accuracy_drop_upper(o.newly_wrong, o.newly_right, n, self.confidence)
                limits.append(self._judge("accuracy_drop", name, (o.newly_wrong - o.newly_right) / n, bound, n,
                                          samples_for_accuracy_drop(allowed, self.confidence), allowed, unchanged))
            limits += self._error_limits(name, o, unchanged, classifier)
        if self.max_accuracy_drop is not None and not any(lc.kind.endswith("accuracy_drop") for lc in limits):
            # never pass a limit silently for want of something to judge it on
            limits.append(LimitCheck("accuracy_drop", "-", self.max_accuracy_drop / 100, 0.0, float("inf"), 0,
                                     None, met=False, message="accuracy drop: no labelled classifier output to "
                                     "judge it on (labels must match the decisive output's predictions)"))
        if self.max_perplexity_increase is not None and not any(lc.kind == "perplexity_increase" for lc in limits):
            limits.append(LimitCheck("perplexity_increase", "-", self.max_perplexity_increase / 100, 0.0,
                                     float("inf"), 0, None, met=False,
                                     message="perplexity increase: no sequence output with labels [samples, "
                                     "positions] to judge it on (use --labels next-token for a language model)"))
        spent = min(max((_spent(lc) for lc in limits), default=0.0), UNRESOLVED_SPENT)
        failures = [lc.message for lc in limits if not lc.met]
        return BudgetCheck(met=not failures, spent=spent, failures=failures, limits=limits,
                           confidence=self.confidence)

    def settled_failure(self, partial: Comparison, total: int,
                        scales: Mapping[str, float] | None = None) -> BudgetCheck | None:
        """A failed check when ``partial`` (the first samples of ``total``) already
        decides that the whole comparison fails, whatever the other samples give;
        else None. The budget search then stops judging the candidate there.
        ``scales``: each output's largest absolute reference value over all
        ``total`` samples, when known (the search has the reference outputs):
        errors relative to it are then final once seen too.

        Only counts that can grow but never shrink decide it:

        - a limit that ``total`` samples cannot resolve (``needed`` above
          ``total``, or a zero budget) passes only an unchanged candidate: a
          flipped decision, a newly wrong or newly right label, or (with
          ``scales``) an output moved by more than UNCHANGED_RELATIVE_ERROR
          fails it;
        - a rate over every sample (agreement, decision agreement): the
          Clopper-Pearson bound of the events seen so far over ``total``
          samples is the least the final bound can be;
        - the per-token disagreement of a sequence output: the final bound is at
          least the mean of the per-sequence rates, and that is at least the
          rates seen so far summed over ``total``;
        - an error limit, absolute or (with ``scales``) relative: the samples
          over it so far as a rate over ``total``, or with the mean metric the
          errors seen so far summed over ``total`` (the t bound is at least the
          mean).

        The accuracy drop (newly right labels can offset newly wrong ones) and
        the perplexity change never stop a candidate unless unresolvable.
        ``spent`` is then a lower bound of what the whole comparison gives."""
        if not self.has_quality_limit or partial.samples >= total:
            return None
        seen, spent, failures, scales = partial.samples, 0.0, [], scales or {}
        for lc in self.check(partial).limits:
            o = partial.outputs.get(lc.output)
            if o is None:
                continue
            scale = 1.0 if self._error_limit(lc.output) is not None else scales.get(lc.output)
            changed = any(x for x in (o.flips, o.decision_flips, o.newly_wrong, o.newly_right)) or (
                lc.output in scales and o.max_abs_error > UNCHANGED_RELATIVE_ERROR * max(scales[lc.output], 1e-12))
            # every kind but a plain accuracy drop counts samples or sequences, at most ``total`` of them;
            # the accuracy drop counts labelled predictions, several per sample for a per-pixel classifier
            if (lc.needed is None or lc.needed > total) and lc.kind != "accuracy_drop":
                least = UNRESOLVED_SPENT if changed else 0.0
            elif lc.kind in ("agreement", "decision_agreement"):
                events = o.flips if lc.kind == "agreement" else o.decision_flips
                least = rate_upper(int(events), total, self.confidence) / lc.limit
            elif lc.kind == "token_agreement" and o.sample_tokens is not None:
                has = o.sample_tokens > 0
                least = float((o.sample_token_flips[has] / o.sample_tokens[has]).sum()) / total / lc.limit
            elif lc.kind == "error_quantile" and scale is not None and o.sample_max_abs_error is not None:
                absolute = self._error_limit(lc.output)
                error_limit = self.max_relative_error if absolute is None else absolute
                over = int((o.sample_max_abs_error / max(scale, 1e-12) > error_limit).sum())
                least = rate_upper(over, total, self.confidence) / lc.limit
            elif lc.kind == "mean_error" and scale is not None and o.sample_mean_abs_error is not None:
                least = float(o.sample_mean_abs_error.sum()) / max(scale, 1e-12) / total / lc.limit
            else:
                continue
            if least > 1.0 + 1e-12 / lc.limit:
                spent = max(spent, least)
                shown = f"{lc.limit:.3g}" if lc.kind == "mean_error" else _pct(lc.limit)
                failures.append(f"{lc.output}: {_WHAT[lc.kind][0]} fails the {shown} budget whatever the "
                                f"other samples give (judging stopped after {seen} of {total} samples)")
        if not failures:
            return None
        return BudgetCheck(met=False, spent=min(spent, UNRESOLVED_SPENT), failures=failures,
                           confidence=self.confidence)

    def _sequence_limits(self, name: str, o: OutputComparison, unchanged: bool, primary: bool) -> list[LimitCheck]:
        """Per-token limits of a sequence output, the sequence as the independent unit."""
        out = []
        has = o.sample_tokens > 0
        if self.min_agreement is not None:
            allowed = 1.0 - self.min_agreement / 100
            rates = o.sample_token_flips[has] / o.sample_tokens[has]
            out.append(self._judge("token_agreement", name, o.flips / max(o.tokens, 1),
                                   unit_mean_upper(rates, self.confidence), int(has.sum()),
                                   sequences_for_unit_mean(allowed, self.confidence), allowed, unchanged))
        if o.sample_labeled is None:
            return out
        labeled = o.sample_labeled > 0
        n = int(labeled.sum())
        if self.max_accuracy_drop is not None and primary:
            allowed = self.max_accuracy_drop / 100
            worse = o.sample_newly_wrong[labeled] / o.sample_labeled[labeled]
            better = o.sample_newly_right[labeled] / o.sample_labeled[labeled]
            out.append(self._judge("token_accuracy_drop", name, (o.newly_wrong - o.newly_right) / max(o.labeled, 1),
                                   paired_drop_upper(worse, better, self.confidence), n,
                                   sequences_for_paired_drop(allowed, self.confidence), allowed, unchanged))
        if self.max_perplexity_increase is not None:
            # judged on the mean log-perplexity change; shown as the perplexity ratio - 1
            delta = o.sample_nll_increase[labeled]
            observed = math.expm1(float(delta.mean())) if n else 0.0
            bound = math.expm1(min(mean_upper(delta, self.confidence), 700.0))
            out.append(self._judge("perplexity_increase", name, observed, bound, n, MIN_SAMPLES_FOR_MEAN,
                                   self.max_perplexity_increase / 100, unchanged))
        return out

    def _error_limits(self, name: str, o: OutputComparison, unchanged: bool, classifier: bool) -> list[LimitCheck]:
        limits: list[LimitCheck] = []
        limit = self._error_limit(name)
        relative = self.max_relative_error is not None and not classifier and limit is None
        if (limit is not None or relative) and o.sample_max_abs_error is not None:
            scale = max(o.max_abs_reference, 1e-12) if limit is None else 1.0
            limit = self.max_relative_error if limit is None else limit
            if self.error_metric == "mean":
                values = o.sample_mean_abs_error / scale
                n = int(values.size)
                limits.append(self._judge("mean_error", name, float(values.mean()) if n else 0.0,
                                          mean_upper(values, self.confidence), n, MIN_SAMPLES_FOR_MEAN,
                                          limit, unchanged))
            else:
                over = int((o.sample_max_abs_error / scale > limit).sum())
                limits.append(self._rate("error_quantile", name, over, int(o.sample_max_abs_error.size),
                                         1.0 - self.error_quantile, unchanged))
        return limits

    def _rate(self, kind: str, name: str, events: int, n: int, allowed: float, unchanged: bool) -> LimitCheck:
        return self._judge(kind, name, events / n if n else 0.0, rate_upper(events, n, self.confidence), n,
                           samples_for_rate(allowed, self.confidence), allowed, unchanged)

    def _judge(self, kind: str, name: str, observed: float, bound: float, n: int, needed: int | None,
               limit: float, unchanged: bool) -> LimitCheck:
        lc = LimitCheck(kind, name, limit, observed, bound, n, needed, met=True)
        what = _WHAT[kind][0]
        shown = (lambda x: f"{x:.3g}") if kind == "mean_error" else _pct
        if not lc.resolved:
            lc.met = unchanged
            if not unchanged:
                lc.message = (f"{name}: the candidate changed the outputs, and {n} {_WHAT[kind][1]} cannot "
                              f"resolve a {shown(limit)} {what} budget at {100 * self.confidence:g}% confidence"
                              + ("" if needed is None else f" (needs at least {needed})"))
        elif bound > limit + 1e-12:
            lc.met = False
            lc.message = (f"{name}: {what} {shown(observed)} observed, upper {100 * self.confidence:g}% bound "
                          f"{shown(bound)} > {shown(limit)} allowed ({n} samples)")
        return lc

    def _error_limit(self, name: str) -> float | None:
        if self.max_error is None:
            return None
        if isinstance(self.max_error, dict):
            return self.max_error.get(name, self.max_error.get("*"))
        return float(self.max_error)


def _spent(lc: LimitCheck) -> float:
    """Share of the limit used: bound / limit; an unresolved limit is all or nothing."""
    if not lc.resolved:
        return 0.0 if lc.met else UNRESOLVED_SPENT
    return lc.bound / lc.limit


def _unchanged(o: OutputComparison) -> bool:
    """No observed change on this output: no decision changed and no value
    moved by more than UNCHANGED_RELATIVE_ERROR of the output's range."""
    if any(x for x in (o.flips, o.decision_flips, o.newly_wrong, o.newly_right)):
        return False
    return o.relative_max_error <= UNCHANGED_RELATIVE_ERROR


def parse_max_error(text: str) -> dict[str, float] | float:
    """``0.01`` for every output, or ``scores=0.01,boxes=0.5`` per output."""
    if "=" not in text:
        return float(text)
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        out[name.strip()] = float(val)
    return out
