"""The shipped byte-level LLaMA decoders (models/llama_*.onnx) as a user gets them.

Valid ONNX with token I/O, dynamic batch and sequence in onnxruntime, causal
(a prefix's logits do not depend on what follows), and the next-byte accuracy
and perplexity that models/README.md states, recomputed here from the logits.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.special import log_softmax

MODELS = Path(__file__).resolve().parent.parent / "models"
DECODERS = ["llama_mha", "llama_gqa"]
KV_HEADS = {"llama_mha": 4, "llama_gqa": 2}  # 4 query heads of 32 dims each
VOCAB = 256
# enough calibration windows for fit, select and final check at a 99 % per-token agreement budget
# (406 windows per held-out part when nothing changed, docs/statistics.md); see tools/byte_decoders.py
WINDOWS = {"calib": 4096, "test": 2048}


def _session(name: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # the README's numbers were measured single-threaded
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(MODELS / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])


def _windows(name: str, split: str):
    with np.load(MODELS / f"{name}.{split}.npz") as f:
        assert sorted(f.files) == ["input_ids", "labels"]
        return f["input_ids"], f["labels"]


def _logits(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input_ids": ids[i: i + 128]})[0] for i in range(0, len(ids), 128)])


def _readme_value(name: str, row: str) -> str:
    """The value cell of ``| row | value |`` in the README section ``## name``."""
    text = (MODELS / "README.md").read_text()
    section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith(f"| {row} |"):
            return line[len(f"| {row} |"):].rstrip(" |").strip()
    raise AssertionError(f"README section {name} has no row {row!r}")


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_is_valid_onnx_with_token_inputs_and_logits(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inputs = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    assert [i.name for i in inputs] == ["input_ids"]
    assert inputs[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inputs[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    (out,) = g.output
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", VOCAB]
    assert {n.domain for n in g.node} <= {"", "ai.onnx"}, "fused contrib ops in a shipped decoder"
    # weights read from hidden 128: q/o 128, k/v kv_heads x 32 (64 when grouped), MLP 344, lm_head 256
    widths = {int(t.dims[1]) for t in g.initializer if len(t.dims) == 2 and t.dims[0] == 128}
    assert widths == {128, KV_HEADS[name] * 32, 344, VOCAB}
    corpus = json.loads({p.key: p.value for p in model.metadata_props}["training_corpus"])
    assert corpus["calib_files"] and corpus["test_files"]
    assert not set(corpus["calib_files"]) & set(corpus["test_files"])


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_windows_label_the_next_byte(name):
    for split in ("calib", "test"):
        ids, labels = _windows(name, split)
        assert ids.dtype == labels.dtype == np.int64
        assert ids.shape == labels.shape == (WINDOWS[split], 64)
        assert ids.min() >= 0 and ids.max() < VOCAB
        np.testing.assert_array_equal(labels[:, :-1], ids[:, 1:])


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_runs_with_other_batch_and_shorter_sequence(name):
    ids, _ = _windows(name, "calib")
    sess = _session(name)
    full = sess.run(["logits"], {"input_ids": ids[:5]})[0]
    assert full.shape == (5, 64, VOCAB) and np.isfinite(full).all()
    short = sess.run(["logits"], {"input_ids": ids[:3, :23]})[0]
    assert short.shape == (3, 23, VOCAB)
    # causal: the first 23 positions see only the first 23 bytes
    np.testing.assert_allclose(short, full[:3, :23], rtol=0, atol=1e-4)
    one = sess.run(["logits"], {"input_ids": ids[4:5]})[0]
    np.testing.assert_allclose(one, full[4:5], rtol=0, atol=1e-4)
    # a changed byte changes the predictions after it, never before it
    edited = ids[:1].copy()
    edited[0, 30] = (edited[0, 30] + 1) % VOCAB
    moved = sess.run(["logits"], {"input_ids": edited})[0]
    np.testing.assert_allclose(moved[:, :30], full[:1, :30], rtol=0, atol=1e-4)
    assert np.abs(moved[:, 30:] - full[:1, 30:]).max() > 1e-2


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_test_accuracy_and_perplexity_match_readme(name):
    ids, labels = _windows(name, "test")
    logits = _logits(_session(name), ids)
    hits = int(np.sum(logits.argmax(axis=-1) == labels))
    accuracy_pct = 100.0 * hits / labels.size
    log_p = log_softmax(logits.astype(np.float64), axis=-1)
    perplexity = float(np.exp(-np.mean(np.take_along_axis(log_p, labels[..., None], axis=-1))))

    stated_acc = _readme_value(name, "Test next-byte accuracy (onnxruntime)")  # "**55.55%** (18203/32768)"
    stated_pct = float(stated_acc.split("%")[0].strip("*"))
    assert abs(accuracy_pct - stated_pct) <= 0.005 + 1e-9, (accuracy_pct, stated_acc)
    assert stated_acc.endswith(f"/{labels.size})")
    stated_ppl = _readme_value(name, "Test perplexity per byte (onnxruntime)")  # "**5.520** (2.465 bits/byte)"
    assert abs(perplexity - float(stated_ppl.split("**")[1])) <= 0.0005 + 1e-9, (perplexity, stated_ppl)

    # clearly better than always predicting the calib windows' most frequent byte
    _, calib_labels = _windows(name, "calib")
    unigram_pct = 100.0 * np.mean(labels == np.bincount(calib_labels.ravel(), minlength=VOCAB).argmax())
    assert accuracy_pct > unigram_pct + 10.0
