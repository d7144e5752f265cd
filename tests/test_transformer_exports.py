"""Discovery on real transformer exports: LLaMA/Qwen2/Mistral decoders and BERT.

Each model is a ``transformers`` architecture built from a config in code
(tests/transformer_exports.py), exported by torch.onnx with the dynamo and
the legacy (TorchScript) exporter. What ``find_transformer`` reports is
compared with the torch module itself: head counts with the config, every
projection's weight and bias with the module's parameters (so q is told from
k, and each layer from the others). A head that repeats another one (the
export helper builds every block so) must then fold away losslessly through
what discovery recorded, checked with onnxruntime under other batch and
sequence sizes. Grouped-query blocks fold their query heads within each
key/value group, or whole key/value groups (a model built with a repeated
group shows that lossless too).

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
    """``exported(source, exporter[, duplicate])`` → (path, torch module),
    exported once per session (``duplicate``: see ``transformer_exports.build``)."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("transformer_exports")

    def get(source: str, exporter: str, duplicate: str = "heads"):
        key = source, exporter, duplicate
        if key not in cache:
            path = folder / f"{source}_{exporter}_{duplicate}.onnx"
            cache[key] = path, te.export(source, exporter, path, duplicate=duplicate)
        return cache[key]

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
    assert view.attention == blocks and view.grouped == (blocks if grouped else [])
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
    assert not any(s.where in b.nodes for b in blocks for s in view.skipped), view.skipped


def _matches_torch(model, folded, module) -> None:
    """``model`` and ``folded`` both give the torch module's output at other
    batch and sequence sizes, with a padded row (the mask must still broadcast
    over the heads)."""
    for batch, seq in ((1, 5), (3, 11)):
        feeds = te.sample_inputs(batch, seq, seed=seq)
        feeds["attention_mask"][-1, seq // 2:] = 0
        want = te.torch_output(module, feeds)
        np.testing.assert_allclose(ort_run(model, feeds)[0], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ort_run(folded, feeds)[0], want, atol=1e-4, rtol=0)


def _differs_from_torch(model, module) -> bool:
    feeds = te.sample_inputs(2, 7, seed=3)
    return np.abs(ort_run(model, feeds)[0] - te.torch_output(module, feeds)).max() > 1e-3


def _head_counts(model) -> list[tuple[int, int]]:
    return [(b.num_heads, b.num_kv_heads) for b in find_transformer(model).attention]


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
    assert all(r.note == "" for r in res.layers)  # no key/value groups to speak of
    onnx.checker.check_model(res.model)
    _matches_torch(model, res.model, module)
    # the lossless check can fail: folding a head that has no copy changes the output
    lossy = HeadFoldingPass(te.HEADS - 2, repair="none")(model, PassContext())
    assert _differs_from_torch(lossy.model, module)


GROUPED = [c for c in CASES if c[0].endswith("_gqa")]


@pytest.mark.parametrize("source,exporter", GROUPED)
@pytest.mark.parametrize("merge", ["medoid", "mean"])
def test_grouped_query_heads_fold_within_their_groups_losslessly(exported, source, exporter, merge):
    """Each key/value group's second query head repeats its first: folding
    to 2 query heads keeps both key/value heads and one query head each."""
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.head_folding import HeadFoldingPass

    path, module = exported(source, exporter)
    model = onnx.load(str(path))
    res = HeadFoldingPass(te.HEADS // 2, merge=merge, repair="none")(model, PassContext())
    assert [(r.width_before, r.width_after, r.merged, r.pruned) for r in res.layers] == \
        [(te.HEADS, te.HEADS // 2, te.HEADS // 2, 0)] * te.LAYERS
    assert all("key/value heads 2 -> 2, 1 query heads each" in r.note for r in res.layers)
    onnx.checker.check_model(res.model)
    assert _head_counts(res.model) == [(2, 2)] * te.LAYERS
    _matches_torch(model, res.model, module)
    # the check can fail: one head in all means folding the two key/value groups, which differ
    lossy = HeadFoldingPass(1, merge=merge, repair="none")(model, PassContext())
    assert _head_counts(lossy.model) == [(1, 1)] * te.LAYERS
    assert _differs_from_torch(lossy.model, module)


@pytest.mark.parametrize("exporter", te.EXPORTERS)
@pytest.mark.parametrize("merge", ["medoid", "mean"])
def test_repeated_key_value_groups_fold_losslessly(exported, exporter, merge):
    """Key/value group 1 with its query heads repeats group 0: ``kv_heads=1``
    merges the two groups, keeping 2 query heads on one key/value head."""
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.head_folding import HeadFoldingPass

    path, module = exported("llama_gqa", exporter, "groups")
    model = onnx.load(str(path))
    res = HeadFoldingPass(te.HEADS, kv_heads=1, merge=merge, repair="none")(model, PassContext())
    assert [(r.width_before, r.width_after, r.merged) for r in res.layers] == [(te.HEADS, 2, 2)] * te.LAYERS
    assert all("key/value heads 2 -> 1, 2 query heads each" in r.note for r in res.layers)
    onnx.checker.check_model(res.model)
    assert _head_counts(res.model) == [(2, 1)] * te.LAYERS
    _matches_torch(model, res.model, module)
    # the check can fail: here the query heads within a group differ
    lossy = HeadFoldingPass(te.HEADS // 2, merge=merge, repair="none")(model, PassContext())
    assert _head_counts(lossy.model) == [(2, 2)] * te.LAYERS
    assert _differs_from_torch(lossy.model, module)


@pytest.mark.parametrize("source,exporter", [("qwen2_gqa", "dynamo"), ("mistral_gqa", "legacy")])
@pytest.mark.parametrize("settings,counts", [(dict(heads=1), (1, 1)), (dict(heads=3), (2, 2)),
                                             (dict(heads=2, kv_heads=0.5, select="magnitude"), (2, 1))])
def test_lossy_grouped_fold_keeps_dynamic_batch_and_sequence(exported, source, exporter, settings, counts):
    """Down to one head; both steps; magnitude pruning: the head counts, key/value
    heads and group sizes written agree with the weights at any batch and sequence."""
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.head_folding import HeadFoldingPass

    path, _ = exported(source, exporter)
    model = onnx.load(str(path))
    res = HeadFoldingPass(**settings, repair="none")(model, PassContext())
    onnx.checker.check_model(res.model)
    assert _head_counts(res.model) == [counts] * te.LAYERS
    assert all(r.params_after < r.params_before for r in res.layers)
    for batch, seq in ((1, 1), (1, 4), (5, 13)):
        feeds = te.sample_inputs(batch, seq, seed=batch + seq)
        got = ort_run(res.model, feeds)[0]
        assert got.shape == (batch, seq, te.VOCAB) and np.isfinite(got).all()


def test_cli_folds_grouped_query_heads(exported, tmp_path):
    import json

    path, module = exported("llama_gqa", "dynamo")
    out, rep = tmp_path / "gqa.fold.onnx", tmp_path / "report.json"
    assert main(["optimize", str(path), "-o", str(out), "--no-auto-data", "--fold-heads", "2", "--quiet",
                 "--provider", "cpu", "--no-linear", "--report", str(rep)]) == 0
    layers = [r for r in json.loads(rep.read_text())["layers"] if r["activation"] == "attention (heads)"]
    assert [(r["width_before"], r["width_after"]) for r in layers] == [(te.HEADS, 2)] * te.LAYERS
    assert all("key/value heads 2 -> 2" in r["note"] for r in layers)
    _matches_torch(onnx.load(str(path)), onnx.load(str(out)), module)
    # whole key/value groups fold on request
    out2 = tmp_path / "gqa.kv.onnx"
    assert main(["optimize", str(path), "-o", str(out2), "--no-auto-data", "--fold-heads", "4", "--fold-kv-heads",
                 "1", "--quiet", "--provider", "cpu", "--no-linear"]) == 0
    assert _head_counts(onnx.load(str(out2))) == [(2, 1)] * te.LAYERS


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
            for a in info["attention"]] == [(f"attn{i}", te.HEADS, 2, te.HEAD_DIM, True, True)
                                            for i in range(te.LAYERS)]
    assert [(g["block"], g["activation"], g["in"], g["neurons"], g["out"]) for g in info["gated"]] == \
        [(f"glu{i}", "SiLU", te.HIDDEN, te.INTERMEDIATE, te.HIDDEN) for i in range(te.LAYERS)]
    for a in info["attention"]:  # the printed table has the same rows
        assert any(a["block"] in line and a["q"] in line for line in out.splitlines())
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
