"""Discovery on real transformer exports: LLaMA/Qwen2/Mistral decoders and BERT.

Each model is a ``transformers`` architecture built from a config in code
(tests/transformer_exports.py), exported by torch.onnx with the dynamo and
the legacy (TorchScript) exporter. What ``find_transformer`` reports is
compared with the torch module itself: head counts with the config, every
projection's weight and bias with the module's parameters (so q is told from
k, and each layer from the others). A head that repeats another one (the
export helper builds every block so) must then fold away losslessly through
what discovery recorded, checked with onnxruntime under other batch and
sequence sizes.

Exports are cached for the session: the dynamo exporter takes seconds per
model; the legacy one well under a second.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from helpers import ort_run

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")  # the dynamo exporter

import transformer_exports as te  # noqa: E402

from onnxfold.cli import main  # noqa: E402
from onnxfold.find.attention import find_transformer  # noqa: E402

CASES = [("llama_mha", "dynamo"), ("llama_mha", "legacy"), ("llama_gqa", "dynamo"), ("llama_gqa", "legacy"),
         ("qwen2_gqa", "dynamo"), ("qwen2_gqa", "legacy"), ("mistral_gqa", "legacy"), ("bert", "dynamo"),
         ("bert", "legacy")]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(source, exporter)`` → (path, torch module), exported once per session."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("transformer_exports")

    def get(source: str, exporter: str):
        if (source, exporter) not in cache:
            path = folder / f"{source}_{exporter}.onnx"
            cache[source, exporter] = path, te.export(source, exporter, path)
        return cache[source, exporter]

    return get


def _same(proj, linear) -> None:
    """A found projection holds exactly the torch Linear's weight (out × in) and bias."""
    w = linear.weight.detach().numpy()
    assert proj.weight_shape == w.shape
    np.testing.assert_array_equal(np.asarray(proj.weight, np.float32), w)
    if linear.bias is None:
        assert proj.bias is None
    else:
        np.testing.assert_allclose(proj.bias, linear.bias.detach().numpy(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- find


@pytest.mark.parametrize("source,exporter", CASES)
def test_find_every_block_of_the_export(exported, source, exporter):
    path, module = exported(source, exporter)
    model = onnx.load(str(path))
    src = te.SOURCES[source]
    view = find_transformer(model)
    blocks = view.blocks
    assert len(blocks) == te.LAYERS, [(s.where, s.reason) for s in view.skipped]
    cfg = module.config
    grouped = src.kv_heads < te.HEADS
    assert (view.grouped, view.attention) == ((blocks, []) if grouped else ([], blocks))
    for i, b in enumerate(blocks):
        assert (b.num_heads, b.num_kv_heads) == (cfg.num_attention_heads, src.kv_heads)
        assert b.head_dim == b.v_head_dim == cfg.hidden_size // cfg.num_attention_heads
        assert b.rotary == src.decoder  # LLaMA-style decoders rotate q and k; BERT has absolute positions
        lin = te.attention_linears(module, i)
        for key in "qkvo":
            _same(getattr(b, key), lin[key])
        # head counts written as constants: what they count agrees with the config
        for r in b.shape_refs:
            count = {"heads": b.num_heads, "kv_heads": b.num_kv_heads, "group": b.num_heads // b.num_kv_heads}
            assert r.value == count[r.counts] * r.per_head, r
        if grouped:  # the repeat of k and v is recorded: a group-size constant on each
            assert sum(r.counts == "group" for r in b.shape_refs) >= 2, b.shape_refs
            assert any(s.where in b.nodes and "grouped-query" in s.reason for s in view.skipped)
        else:
            assert {r.counts for r in b.shape_refs} <= {"heads"}
    if src.gated:
        assert len(view.gated) == te.LAYERS
        for i, g in enumerate(view.gated):
            assert g.activation.kind == "silu"
            lin = te.mlp_linears(module, i)
            for key in ("gate", "up", "down"):
                _same(getattr(g, key), lin[key])
    else:
        assert view.gated == []


@pytest.mark.parametrize("source,exporter", [("llama_mha", "dynamo"), ("llama_mha", "legacy"), ("bert", "dynamo"),
                                             ("bert", "legacy")])
def test_duplicated_head_folds_losslessly(exported, source, exporter):
    """Merging head 3 into its copy changes nothing only if discovery found
    the right rows, columns, head axis and head counts of every block."""
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.head_folding import HeadFoldingPass

    path, module = exported(source, exporter)
    model = onnx.load(str(path))
    res = HeadFoldingPass(te.HEADS - 1, repair="none")(model, PassContext())
    assert [(r.width_before, r.width_after) for r in res.layers] == [(te.HEADS, te.HEADS - 1)] * te.LAYERS
    onnx.checker.check_model(res.model)
    for batch, seq in ((1, 5), (3, 11)):
        feeds = te.sample_inputs(batch, seq, seed=seq)
        feeds["attention_mask"][-1, seq // 2:] = 0  # a padded row: the mask must still broadcast over the heads
        want = te.torch_output(module, feeds)
        np.testing.assert_allclose(ort_run(model, feeds)[0], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ort_run(res.model, feeds)[0], want, atol=1e-4, rtol=0)
    # the lossless check can fail: folding a head that has no copy changes the output
    lossy = HeadFoldingPass(te.HEADS - 2, repair="none")(model, PassContext())
    feeds = te.sample_inputs(2, 7, seed=3)
    assert np.abs(ort_run(lossy.model, feeds)[0] - te.torch_output(module, feeds)).max() > 1e-3


def test_grouped_query_blocks_are_reported_not_folded(exported, capsys):
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.head_folding import HeadFoldingPass

    path, _ = exported("llama_gqa", "dynamo")
    model = onnx.load(str(path))
    res = HeadFoldingPass(2)(model, PassContext())
    assert not res.changed and res.model is model
    assert sum("grouped-query" in n and "2 key/value heads" in n for n in res.notes) == te.LAYERS, res.notes
    out = path.with_name("gqa.fold.onnx")
    assert main(["optimize", str(path), "-o", str(out), "--no-auto-data", "--fold-heads", "2", "--quiet",
                 "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attn0: 4 heads over 2 key/value heads" in err and not out.exists()


# ---------------------------------------------------------------- inspect and optimize


def test_inspect_lists_attention_and_gated_blocks(exported, tmp_path, capsys):
    path, _ = exported("llama_gqa", "legacy")
    js = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(js), "--provider", "cpu", "--no-auto-data"]) == 0
    out = capsys.readouterr().out
    assert "Attention blocks in" in out and "Gated MLPs in" in out
    info = json.loads(js.read_text())
    assert {"model", "chains", "skipped", "notes"} <= set(info)  # the keys inspect always had
    assert [(a["block"], a["heads"], a["kv_heads"], a["head_dim"], a["rotary"], a["foldable"])
            for a in info["attention"]] == [(f"attn{i}", te.HEADS, 2, te.HEAD_DIM, True, False)
                                            for i in range(te.LAYERS)]
    assert [(g["block"], g["activation"], g["in"], g["neurons"], g["out"]) for g in info["gated"]] == \
        [(f"glu{i}", "SiLU", te.HIDDEN, te.INTERMEDIATE, te.HIDDEN) for i in range(te.LAYERS)]
    for a in info["attention"]:  # the printed table has the same rows
        assert any(a["block"] in line and a["q"] in line for line in out.splitlines())
    assert any("grouped-query" in s["reason"] for s in info["skipped"])
    # a projection of a found block is not also reported as a dense layer that failed to chain
    assert not any(s["where"] == info["attention"][0]["q"] for s in info["skipped"])


def test_inspect_bert_lists_dense_ffn_beside_attention(exported, tmp_path):
    path, _ = exported("bert", "dynamo")
    js = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(js), "--provider", "cpu", "--no-auto-data", "--quiet"]) == 0
    info = json.loads(js.read_text())
    assert [(c["activation"], c["neurons"]) for c in info["chains"]] == [("Gelu", te.INTERMEDIATE)] * te.LAYERS
    assert [(a["heads"], a["kv_heads"], a["foldable"]) for a in info["attention"]] == [(te.HEADS, te.HEADS, True)] * 2
    assert info["gated"] == []


def test_optimize_fold_ratio_folds_the_gated_mlps(exported, tmp_path):
    path, module = exported("llama_mha", "dynamo")
    out, rep = tmp_path / "llama.fold.onnx", tmp_path / "report.json"
    assert main(["optimize", str(path), "-o", str(out), "--no-auto-data", "--fold-ratio", "0.3", "--report", str(rep),
                 "--quiet", "--provider", "cpu"]) == 0
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded)
    # read the widths from the written graph itself: gate/up MatMuls of every layer are narrower
    inits = {t.name: tuple(t.dims) for t in folded.graph.initializer}
    report = json.loads(rep.read_text())
    glus = {r["layer"]: r for r in report["layers"] if r["layer"].startswith("glu")}
    assert len(glus) == te.LAYERS
    for g in find_transformer(folded).gated:
        kept = glus[g.name]["width_after"]
        assert kept < te.INTERMEDIATE * 0.75
        nodes = {n.name: n for n in folded.graph.node}
        assert inits[nodes[g.gate.node].input[1]] == (te.HIDDEN, kept)
        assert inits[nodes[g.down.node].input[1]] == (kept, te.HIDDEN)
    # dynamic batch and sequence still run; a rough agreement with the torch module on next tokens
    for batch, seq in ((1, 3), (4, 13)):
        feeds = te.sample_inputs(batch, seq, seed=batch)
        got = ort_run(folded, feeds)[0]
        assert got.shape == (batch, seq, te.VOCAB) and np.isfinite(got).all()
    feeds = te.sample_inputs(8, 16, seed=0)
    agree = (ort_run(folded, feeds)[0].argmax(-1) == te.torch_output(module, feeds).argmax(-1)).mean()
    assert agree > 0.5, agree
