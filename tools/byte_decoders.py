"""Tiny byte-level LLaMA-architecture decoders for ``models/`` (used by build_models.py).

The decoders are ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig``
in code (no pretrained weights, nothing downloaded) and trained on next-byte
prediction over the Python standard library's own source, which every Python
installation carries offline:

* corpus: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``
  in sorted order, concatenated as raw bytes (vocabulary = the 256 byte
  values).  ``_sysconfigdata*`` is left out because it is generated per
  platform at install time; everything else is the interpreter's release
  source, so the corpus is the same on every machine with the same Python.
* split by whole files (file ``i`` of the sorted list): ``i % 10 == 3`` is
  calibration text, ``i % 10 == 7`` test text, the rest training text, so no
  calibration or test byte is ever trained on.
* calibration / test windows: the calib (test) text is cut into consecutive
  non-overlapping chunks of ``WINDOW + 1`` bytes and a seeded
  ``numpy.random.RandomState`` picks ``N_CALIB_WINDOWS`` (``N_TEST_WINDOWS``)
  of them; ``input_ids`` is a chunk's first ``WINDOW`` bytes and ``labels``
  its last ``WINDOW`` (the next byte for every position).  The windows
  depend only on the text and the seed, not on training, so
  ``build_models.py --windows-only`` rewrites them without retraining; a
  larger count picks a superset of a smaller one (``choice`` without
  replacement takes a prefix of one seeded permutation).

The corpus description is written into the ONNX file's ``metadata_props``
(``training_corpus``, JSON) so that models/README.md is regenerated from the
files on disk alone, like the other models' sections.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sysconfig
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from _ort import cpu_session

VOCAB = 256
WINDOW = 64  # bytes per calibration / test window
# a 99 % per-token agreement budget needs 406 held-out windows per part when nothing changed
# (Budget.samples_needed(sequences=True)) and about three times that with a few tenths of a
# percent of tokens changed (docs/statistics.md); select and final check take at most 30 %
# of the calibration windows each, so 4,096 leave ~1,200 per part and 40 % to fit on
N_CALIB_WINDOWS = 4096
N_TEST_WINDOWS = 2048  # the benchmarks' test split: 131,072 judged tokens
OPSET = 18
MAX_IR_VERSION = 8  # the IR version that goes with opset 18; older onnxruntime loads it
# torch vs onnxruntime on the logits (magnitude ~10): float32 reassociation only
LOGITS_ATOL = 1e-4
CALIB_FILE_SLOT, TEST_FILE_SLOT = 3, 7  # file i goes to calib if i % 10 == 3, test if == 7
PLATFORM_GENERATED_PREFIX = "_sysconfigdata"
CORPUS_METADATA_KEY = "training_corpus"


@dataclass(frozen=True)
class DecoderSpec:
    name: str
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    layers: int
    steps: int
    batch_size: int
    train_seq: int  # bytes per training window (longer than WINDOW: rotary sees more positions)
    lr: float
    warmup: int
    weight_decay: float = 0.1
    # "eager" exports attention as explicit MatMul / Mul / Add(mask) / Softmax and the
    # grouped-query repeat as Unsqueeze/Expand/Reshape; "sdpa" (transformers' default)
    # adds the exporter's NaN-safe softmax (IsNaN/Where) around the same ops.
    attn_implementation: str = "eager"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def architecture(self) -> str:
        kind = "multi-head" if self.kv_heads == self.heads else "grouped-query"
        return (
            f"LLaMA decoder ({kind} attention): {self.layers} layers, hidden {self.hidden}, "
            f"{self.heads} query heads / {self.kv_heads} kv heads of {self.head_dim} dims, "
            f"SwiGLU MLP {self.intermediate}, RMSNorm, rotary; vocab {VOCAB} (bytes)"
        )


# ----------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------


@dataclass
class Corpus:
    files: Dict[str, List[str]]  # split -> file names
    text: Dict[str, np.ndarray]  # split -> uint8 bytes
    description: dict  # what goes into the ONNX metadata


def stdlib_corpus() -> Corpus:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(
        n for n in os.listdir(root)
        if n.endswith(".py") and not n.startswith(PLATFORM_GENERATED_PREFIX)
        and os.path.isfile(os.path.join(root, n))
    )
    files: Dict[str, List[str]] = {"train": [], "calib": [], "test": []}
    chunks: Dict[str, List[bytes]] = {"train": [], "calib": [], "test": []}
    digest = hashlib.sha256()
    for i, name in enumerate(names):
        with open(os.path.join(root, name), "rb") as fh:
            data = fh.read()
        digest.update(data)
        split = {CALIB_FILE_SLOT: "calib", TEST_FILE_SLOT: "test"}.get(i % 10, "train")
        files[split].append(name)
        chunks[split].append(data)
    text = {k: np.frombuffer(b"".join(v), dtype=np.uint8) for k, v in chunks.items()}
    description = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "files": len(names),
        "bytes": int(sum(len(t) for t in text.values())),
        "sha256": digest.hexdigest(),
        "split_bytes": {k: int(len(t)) for k, t in text.items()},
        "split_files": {k: len(v) for k, v in files.items()},
        "calib_files": files["calib"],
        "test_files": files["test"],
    }
    return Corpus(files, text, description)


def windows(text: np.ndarray, seed: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` non-overlapping (input_ids, labels) windows of ``WINDOW`` bytes."""
    n_chunks = len(text) // (WINDOW + 1)
    if n_chunks < count:
        raise RuntimeError(f"{len(text)} bytes hold only {n_chunks} windows, need {count}")
    pick = np.sort(np.random.RandomState(seed).choice(n_chunks, count, replace=False))
    chunks = text[: n_chunks * (WINDOW + 1)].reshape(n_chunks, WINDOW + 1)[pick].astype(np.int64)
    return np.ascontiguousarray(chunks[:, :-1]), np.ascontiguousarray(chunks[:, 1:])


# ----------------------------------------------------------------------------
# model, training, export
# ----------------------------------------------------------------------------


def llama(spec: DecoderSpec):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(spec.train_seq, 4 * WINDOW),
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation=spec.attn_implementation,
    )
    return LlamaForCausalLM(config)


def logits_module(lm):
    """input_ids -> logits only (no KV cache, no ModelOutput) for export and checks."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Logits(lm).eval()


def train(spec: DecoderSpec, train_text: np.ndarray, seed: int):
    """AdamW on random windows of the training text; global RNGs already seeded."""
    import torch
    import torch.nn.functional as F

    model = llama(spec)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:  # linear warmup, cosine down to 10 %
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    text = torch.from_numpy(train_text.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    span = spec.train_seq + 1
    model.train()
    t0 = time.time()
    for step in range(spec.steps):
        starts = torch.randint(0, len(text) - span, (spec.batch_size,), generator=gen)
        batch = text[starts[:, None] + torch.arange(span)]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0 or step == spec.steps - 1:
            print(f"  step {step + 1:4d}/{spec.steps}  train loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    model.eval()
    return model


def export(model, path: str, corpus_description: dict) -> None:
    import onnx
    import torch

    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    example = torch.zeros(2, WINDOW, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            logits_module(model), (example,), dynamo=True, opset_version=OPSET,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_shapes={"input_ids": dims}, verbose=False,
        )
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CORPUS_METADATA_KEY, json.dumps(corpus_description, sort_keys=True)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def ort_logits(path: str, input_ids: np.ndarray, batch: int = 128) -> np.ndarray:
    sess = cpu_session(path)
    return np.concatenate([
        sess.run(["logits"], {"input_ids": input_ids[i: i + batch]})[0]
        for i in range(0, len(input_ids), batch)
    ])


def check_export(model, spec: DecoderSpec, path: str, calib_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """I/O names and dynamic axes, plain ONNX ops, onnxruntime == torch; worst |diff|."""
    import onnx
    import torch

    g = onnx.load(path).graph
    ins = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    outs = [o.name for o in g.output]
    if ins != ["input_ids"] or outs != ["logits"]:
        raise RuntimeError(f"{spec.name}: unexpected I/O names {ins} -> {outs}")
    in_dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    if in_dims != ["batch", "seq"] or out_dims != ["batch", "seq", VOCAB]:
        raise RuntimeError(f"{spec.name}: input dims {in_dims}, output dims {out_dims}")
    # onnxruntime's fused contrib ops would mean attention or norms were fused away
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"{spec.name}: expected only default-domain ONNX ops, got {foreign}")
    worst = 0.0
    # a shorter sequence and a single row check that batch and sequence stay dynamic
    for ids in (calib_ids, test_ids, test_ids[:1, :17]):
        with torch.no_grad():
            ref = logits_module(model)(torch.from_numpy(ids)).numpy()
        got = ort_logits(path, ids)
        diff = float(np.max(np.abs(ref - got)))
        worst = max(worst, diff)
        if got.shape != ref.shape or diff > LOGITS_ATOL:
            raise RuntimeError(f"{spec.name}: onnxruntime differs from torch by {diff:.3g} > {LOGITS_ATOL}")
    return worst


def save_windows(path: str, input_ids: np.ndarray, labels: np.ndarray) -> None:
    np.savez_compressed(path, input_ids=input_ids.astype(np.int64), labels=labels.astype(np.int64))


def corpus_windows(corpus: Corpus, seed: int):
    """(calib, test) windows: seeded by the model's seed alone, independent of training."""
    return (windows(corpus.text["calib"], seed + 1, N_CALIB_WINDOWS),
            windows(corpus.text["test"], seed + 2, N_TEST_WINDOWS))


def write_windows(spec: DecoderSpec, out: str, seed: int) -> None:
    """Rewrite NAME.calib.npz / NAME.test.npz only (the model file stays): the same
    windows a full build writes, since they do not depend on training."""
    calib, test = corpus_windows(stdlib_corpus(), seed)
    save_windows(os.path.join(out, f"{spec.name}.calib.npz"), *calib)
    save_windows(os.path.join(out, f"{spec.name}.test.npz"), *test)
    print(f"  windows only: {len(calib[0])} calib + {len(test[0])} test windows of {WINDOW} bytes")


def build_decoder(spec: DecoderSpec, out: str, seed: int) -> None:
    """Train, export, check and write NAME.onnx / .calib.npz / .test.npz (RNGs already seeded)."""
    corpus = stdlib_corpus()
    d = corpus.description
    print(
        f"  corpus: {d['python']} stdlib, {d['files']} files, {d['bytes']:,} bytes; "
        f"train/calib/test bytes {d['split_bytes']['train']:,}/{d['split_bytes']['calib']:,}/"
        f"{d['split_bytes']['test']:,}"
    )
    calib, test = corpus_windows(corpus, seed)
    model = train(spec, corpus.text["train"], seed)
    onnx_path = os.path.join(out, f"{spec.name}.onnx")
    export(model, onnx_path, corpus.description)
    diff = check_export(model, spec, onnx_path, calib[0], test[0])
    save_windows(os.path.join(out, f"{spec.name}.calib.npz"), *calib)
    save_windows(os.path.join(out, f"{spec.name}.test.npz"), *test)
    ev = evaluate(out, spec.name)
    print(
        f"  max |torch - onnxruntime| = {diff:.2e}; onnxruntime test next-byte accuracy "
        f"{ev['test']['accuracy']:.4f}, perplexity {ev['test']['perplexity']:.3f} "
        f"(unigram baseline {ev['unigram']['accuracy']:.4f} / {ev['unigram']['perplexity']:.2f})"
    )


# ----------------------------------------------------------------------------
# evaluation and README section (from the files on disk)
# ----------------------------------------------------------------------------


def next_byte_scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Per-token accuracy and perplexity (exp of the mean next-byte cross-entropy)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], axis=-1).mean()
    hits = int((logits.argmax(-1) == labels).sum())
    return {"accuracy": hits / labels.size, "hits": hits, "tokens": int(labels.size),
            "perplexity": float(np.exp(nll)), "bits_per_byte": float(nll / np.log(2))}


def unigram_scores(calib_labels: np.ndarray, test_labels: np.ndarray) -> dict:
    """Baseline that ignores context: the calib windows' byte frequencies (add-one)."""
    counts = np.bincount(calib_labels.ravel(), minlength=VOCAB) + 1.0
    log_p = np.log(counts / counts.sum())
    return {"accuracy": float(np.mean(test_labels == counts.argmax())), "byte": int(counts.argmax()),
            "perplexity": float(np.exp(-log_p[test_labels].mean()))}


def evaluate(out: str, name: str):
    import onnx

    paths = {k: os.path.join(out, f"{name}{ext}") for k, ext in
             (("onnx", ".onnx"), ("calib", ".calib.npz"), ("test", ".test.npz"))}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    result: dict = {"paths": paths, "sizes": {k: os.path.getsize(p) for k, p in paths.items()}}
    labels = {}
    for split in ("calib", "test"):
        with np.load(paths[split]) as f:
            ids, labels[split] = f["input_ids"], f["labels"]
        result[split] = next_byte_scores(ort_logits(paths["onnx"], ids), labels[split])
        result[split]["windows"] = ids.shape
    result["unigram"] = unigram_scores(labels["calib"], labels["test"])
    m = onnx.load(paths["onnx"])
    with open(paths["onnx"], "rb") as fh:
        result["sha256"] = hashlib.sha256(fh.read()).hexdigest()
    result["ops"] = [n.op_type for n in m.graph.node]
    result["ir_version"] = m.ir_version
    result["opset"] = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    result["n_params"] = int(sum(np.prod(t.dims) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                                 and len(t.dims) >= 1))
    props = {p.key: p.value for p in m.metadata_props}
    result["corpus"] = json.loads(props[CORPUS_METADATA_KEY]) if CORPUS_METADATA_KEY in props else None
    return result


README_INTRO = [
    "The two byte-level decoders (`llama_mha`, `llama_gqa`, at the end) differ in every file: `NAME.onnx` is exported with the dynamo exporter (`torch.onnx.export(..., dynamo=True, "
    "opset_version=18)`), input `input_ids` int64 (batch, seq) with dynamic `batch` and `seq`, output "
    "`logits` float32 (batch, seq, 256), no attention mask and no KV cache; `NAME.calib.npz` / "
    "`NAME.test.npz` hold `input_ids` int64 (n, 64) and `labels` int64 (n, 64), the next byte for every "
    "position, so accuracy and perplexity are judged per token. The windows do not depend on training: "
    "`python tools/build_models.py --windows-only` rewrites them (4,096 calib windows: fit, select and "
    "final check at a 99 % per-token agreement budget; 2,048 test windows) and leaves the models as they are.",
    "",
]


def _op_summary(ops: List[str]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in Counter(ops).items())


def _scores(s: dict) -> str:
    return (f"{s['accuracy'] * 100:.2f}% ({s['hits']}/{s['tokens']}); perplexity {s['perplexity']:.3f} "
            f"({s['bits_per_byte']:.3f} bits/byte)")


def readme_rows(spec: DecoderSpec, ev: dict) -> List[Tuple[str, str]]:
    c = ev["corpus"]
    if c is None:
        corpus = "(no `training_corpus` metadata in the ONNX file)"
        files = ("-", "-")
    else:
        sb, sf = c["split_bytes"], c["split_files"]
        corpus = (
            f"{c['python']} standard library: the {c['files']} top-level `*.py` files of "
            f"`sysconfig.get_paths()[\"stdlib\"]` in sorted order, `_sysconfigdata*` left out "
            f"(generated per platform); {c['bytes']:,} bytes, sha256 of the concatenation "
            f"`{c['sha256'][:16]}...`. Split by file index i: i % 10 == {CALIB_FILE_SLOT} calib "
            f"({sf['calib']} files, {sb['calib']:,} bytes), i % 10 == {TEST_FILE_SLOT} test "
            f"({sf['test']} files, {sb['test']:,} bytes), the rest train ({sf['train']} files, "
            f"{sb['train']:,} bytes)"
        )
        files = (", ".join(c["calib_files"]), ", ".join(c["test_files"]))
    n_calib = ev["calib"]["windows"][0]
    n, seq = ev["test"]["windows"]
    u = ev["unigram"]
    tokens = spec.steps * spec.batch_size * spec.train_seq
    return [
        ("Architecture", spec.architecture),
        ("Built from", f"`transformers.LlamaForCausalLM(LlamaConfig(...))` in code, attn_implementation "
                       f"`{spec.attn_implementation}`, untied embedding / lm_head, rope theta 10000, "
                       f"RMSNorm eps 1e-6; no pretrained weights"),
        ("Parameters", f"{ev['n_params']:,}"),
        ("Graph form", "dynamo export: per layer q/k/v/o MatMul with Reshape/Transpose, rotary "
                       "Slice/Neg/Concat/Mul/Add on q and k, "
                       + ("grouped-query repeat of k and v as Unsqueeze/Expand/Reshape, "
                          if spec.kv_heads != spec.heads else "")
                       + "QK MatMul, Mul by 1/sqrt(head dim), Add of the in-graph causal mask, Softmax; "
                         "RMSNorm decomposed (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul); SwiGLU as "
                         "MatMul/Sigmoid/Mul"),
        ("ONNX ops", _op_summary(ev["ops"])),
        ("Opset / IR version", f"{ev['opset'].get('ai.onnx')} / {ev['ir_version']}"),
        ("Input / output", f"`input_ids` int64 (batch, seq) -> `logits` float32 (batch, seq, {VOCAB})"),
        ("Corpus", corpus),
        ("Calib files", files[0]),
        ("Test files", files[1]),
        ("Windows", f"{n_calib:,} calib + {n:,} test windows of {seq} bytes: non-overlapping {seq + 1}-byte chunks "
                    f"of the calib / test text picked by a seeded RandomState; labels = next byte"),
        ("Training", f"AdamW lr {spec.lr:g} (betas 0.9/0.95, weight decay {spec.weight_decay:g} on "
                     f"matrices), {spec.warmup} warmup steps then cosine to 10 %, grad-norm clip 1, "
                     f"{spec.steps} steps x {spec.batch_size} random windows of {spec.train_seq} bytes "
                     f"of the train text ({tokens:,} predicted bytes), next-byte cross-entropy"),
        ("Test next-byte accuracy (onnxruntime)", f"**{ev['test']['accuracy'] * 100:.2f}%** "
                                                   f"({ev['test']['hits']}/{ev['test']['tokens']})"),
        ("Test perplexity per byte (onnxruntime)", f"**{ev['test']['perplexity']:.3f}** "
                                                    f"({ev['test']['bits_per_byte']:.3f} bits/byte)"),
        ("Calib next-byte accuracy / perplexity", _scores(ev["calib"])),
        ("Unigram baseline (test)", f"{u['accuracy'] * 100:.2f}% accuracy (always byte {u['byte']}, "
                                    f"{chr(u['byte'])!r}), perplexity {u['perplexity']:.2f}: the calib "
                                    f"windows' byte frequencies, add-one smoothed"),
    ]
