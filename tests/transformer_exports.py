"""Tiny transformers models, built from a config in code and exported by torch.onnx.

Each source is a ``transformers`` architecture with random weights (never
``from_pretrained``): 2 layers, hidden 64, 4 heads, intermediate 128, vocab
100. The decoders (LLaMA, Mistral, Qwen2) run with ``use_cache=False``; the
grouped-query variants have 2 key/value heads. Biases are random (they are
zero at init, and a bias the finder missed would not show), and in every
block heads repeat other heads (``DUPLICATE``) so that merging them is
lossless: a head fold that stays exact shows that what discovery recorded
about the block (projections, head axis, head counts) is right. In a
grouped-query block the repeats stay within each key/value group (every
group must keep as many query heads), or, built with ``duplicate="groups"``,
key/value group 1 with its query heads repeats group 0. ``export(source,
exporter, path)`` writes the ONNX file with dynamic batch and sequence axes
and returns the torch module, whose parameters are the reference the tests
compare discovery against (independent of onnxfold).

The module is wrapped so that the graph's inputs are exactly ``input_ids``
and ``attention_mask`` and its output is the logits (decoders) or the last
hidden state (encoders): what a user exporting for inference writes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 100, 64, 2, 4, 128
HEAD_DIM = HIDDEN // HEADS


@dataclass(frozen=True)
class Source:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    kv_heads: int
    decoder: bool
    attn: str = "sdpa"  # attention implementation: "sdpa" (the default) or "eager"

    @property
    def gated(self) -> bool:
        return self.decoder  # LLaMA-style decoders have SwiGLU MLPs; BERT has dense GELU ones


SOURCES = {s.name: s for s in [
    Source("llama_mha", "LlamaConfig", "LlamaForCausalLM", HEADS, True),
    Source("llama_gqa", "LlamaConfig", "LlamaForCausalLM", 2, True),
    # Qwen2: biased q/k/v projections; eager attention scales the scores after the QK MatMul
    Source("qwen2_gqa", "Qwen2Config", "Qwen2ForCausalLM", 2, True, attn="eager"),
    Source("mistral_gqa", "MistralConfig", "MistralForCausalLM", 2, True),
    Source("bert", "BertConfig", "BertModel", HEADS, False),
]}

EXPORTERS = ("dynamo", "legacy")

#: (kept head, its copy) pairs per block: multi-head, two of the heads (q, k,
#: v rows, o columns); grouped-query, the two query heads of each key/value
#: group (q rows and o columns only); "groups": key/value head 1 (k, v rows)
#: and its query heads (q rows, o columns) repeat key/value head 0 and its own
DUPLICATE = {"mha": [(1, 3)], "gqa": [(0, 1), (2, 3)], "groups": [(0, 1)]}


def build(source: str, seed: int = 0, duplicate: str = "heads"):
    """The torch module of ``source`` (eval mode, random weights from
    ``seed``). ``duplicate``: "heads" (see ``DUPLICATE``) or "groups" (a
    grouped-query source's key/value group 1 repeats group 0)."""
    import torch
    import transformers

    s = SOURCES[source]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, max_position_embeddings=64)
    if s.decoder:
        cfg = getattr(transformers, s.config)(**common, num_key_value_heads=s.kv_heads, use_cache=False,
                                              tie_word_embeddings=False)
    else:
        cfg = getattr(transformers, s.config)(**common)
    cfg._attn_implementation = s.attn
    model = getattr(transformers, s.model)(cfg).eval()
    # random biases (zero at init): a bias the finder missed would then show in the outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name.lower():
                p.normal_(0.0, 0.1)
        grouped = s.kv_heads < HEADS
        if duplicate == "groups" and not grouped:
            raise ValueError(f"{source} has no key/value groups to duplicate")
        # (q heads, kv heads) spanned by one unit: a head, or a key/value group with its query heads
        nq, nkv = (HEADS // s.kv_heads, 1) if duplicate == "groups" else (1, 1)
        for a, b in DUPLICATE[duplicate if duplicate == "groups" else "gqa" if grouped else "mha"]:
            for i in range(LAYERS):
                lin = attention_linears(model, i)
                copies = [("q", nq), ("k", nkv), ("v", nkv)] if not grouped or duplicate == "groups" else [("q", nq)]
                for key, span in copies:
                    rows_a, rows_b = (slice(u * span * HEAD_DIM, (u + 1) * span * HEAD_DIM) for u in (a, b))
                    lin[key].weight[rows_b] = lin[key].weight[rows_a]
                    if lin[key].bias is not None:
                        lin[key].bias[rows_b] = lin[key].bias[rows_a]
                cols_a, cols_b = (slice(u * nq * HEAD_DIM, (u + 1) * nq * HEAD_DIM) for u in (a, b))
                lin["o"].weight[:, cols_b] = lin["o"].weight[:, cols_a]
    return model


def layers(model):
    """The transformer layers of a built module, in graph order."""
    return model.model.layers if hasattr(model, "model") else model.encoder.layer


def attention_linears(model, i: int) -> dict:
    """The q, k, v, o ``nn.Linear`` modules of layer ``i``."""
    layer = layers(model)[i]
    if hasattr(layer, "self_attn"):
        a = layer.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}
    a = layer.attention
    return {"q": a.self.query, "k": a.self.key, "v": a.self.value, "o": a.output.dense}


def mlp_linears(model, i: int) -> dict:
    """The gate, up, down ``nn.Linear`` modules of decoder layer ``i``."""
    mlp = layers(model)[i].mlp
    return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}


class _Inference:
    """input_ids, attention_mask → logits / last hidden state."""

    def __new__(cls, model):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, input_ids, attention_mask):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
                return out.logits if hasattr(out, "logits") else out.last_hidden_state

        return Wrapped().eval()


def sample_inputs(batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def export(source: str, exporter: str, path, seed: int = 0, duplicate: str = "heads"):
    """Export ``source`` with torch.onnx (``exporter``: "dynamo" or "legacy")
    to ``path``; returns the torch module exported (built with ``duplicate``)."""
    import torch

    model = build(source, seed, duplicate)
    wrapped = _Inference(model)
    feeds = sample_inputs()
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    names = ["input_ids", "attention_mask"]
    out = "logits" if SOURCES[source].decoder else "last_hidden_state"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(wrapped, args, str(path), dynamo=True, input_names=names, output_names=[out],
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), opset_version=18,
                              verbose=False)
        elif exporter == "legacy":
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(wrapped, args, str(path), dynamo=False, input_names=names, output_names=[out],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, out: axes}, opset_version=17)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return model


def torch_output(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The torch module's own output on ``feeds`` (float32 numpy)."""
    import torch

    with torch.no_grad():
        out = _Inference(model)(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask")))
    return out.numpy()
