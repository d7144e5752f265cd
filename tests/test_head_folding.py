"""Attention-head folding and gated-MLP folding on small exported transformers.

Models are tiny torch modules exported with the legacy exporter (opset 17,
dynamic batch and sequence axes: the Reshape shapes are Concats of dynamic
sizes and head-count constants, as in real exports) or built with
onnx.helper (constant Reshape shapes). References are always onnxruntime on
the original model, or a plain numpy attention written here.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from helpers import attention_graph, ort_run
from onnx import helper, numpy_helper

from onnxfold.decide import heads as dh
from onnxfold.find.attention import find_transformer
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.head_folding import GatedFoldingPass, HeadFoldingPass, _write_block

torch = pytest.importorskip("torch")
nn = torch.nn

HIDDEN, HEADS, HEAD_DIM = 16, 4, 4


class _Attention(nn.Module):
    """BERT-style eager self-attention with a residual, explicit head counts in view()."""

    def __init__(self, hidden=HIDDEN, heads=HEADS, kv_heads=None):
        super().__init__()
        self.h, self.d = heads, hidden // heads
        self.kvh = kv_heads or heads
        self.q = nn.Linear(hidden, heads * self.d)
        self.k = nn.Linear(hidden, self.kvh * self.d)
        self.v = nn.Linear(hidden, self.kvh * self.d)
        self.o = nn.Linear(heads * self.d, hidden)

    def forward(self, x, mask):
        b, s = x.shape[0], x.shape[1]
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, self.kvh, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, self.kvh, self.d).transpose(1, 2)
        if self.kvh != self.h:  # grouped-query attention: repeat k/v heads
            k = k.repeat_interleave(self.h // self.kvh, dim=1)
            v = v.repeat_interleave(self.h // self.kvh, dim=1)
        scores = q @ k.transpose(-1, -2) / self.d ** 0.5
        scores = scores + (1.0 - mask[:, None, None, :]) * -10000.0
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, self.h * self.d)
        return x + self.o(ctx)


class _Encoder(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([_Attention(**kw) for _ in range(layers)])

    def forward(self, x, mask):
        for b in self.blocks:
            x = torch.tanh(b(x, mask))
        return x


class _Gated(nn.Module):
    def __init__(self, hidden=HIDDEN, inner=8):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _export(module, args, names, dyn) -> onnx.ModelProto:
    torch.manual_seed(0)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=17, input_names=names,
                          output_names=["y"], dynamic_axes=dyn)
    return onnx.load_from_string(buf.getvalue())


def _attention_model(layers=2, duplicate=None, seed=0, **kw) -> onnx.ModelProto:
    torch.manual_seed(seed)
    enc = _Encoder(layers, **kw)
    if duplicate is not None:  # make head b of every block a copy of head a (q, k, v rows, o columns)
        a, b = duplicate
        d = HEAD_DIM
        with torch.no_grad():
            for blk in enc.blocks:
                for lin in (blk.q, blk.k, blk.v):
                    lin.weight[b * d:(b + 1) * d] = lin.weight[a * d:(a + 1) * d]
                    lin.bias[b * d:(b + 1) * d] = lin.bias[a * d:(a + 1) * d]
                blk.o.weight[:, b * d:(b + 1) * d] = blk.o.weight[:, a * d:(a + 1) * d]
    dyn = {0: "batch", 1: "seq"}
    return _export(enc, (torch.randn(2, 7, HIDDEN), torch.ones(2, 7)), ["x", "mask"],
                   {"x": dyn, "mask": dyn, "y": dyn})


def _feed(batch, seq, seed=1, pad=True):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    if pad and batch > 1:
        mask[-1, seq // 2:] = 0  # a padded sample: the mask Add must still broadcast
    return {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32), "mask": mask}


def _run(model, feed):
    return ort_run(model, feed)[0]


def _weights(model, block):
    """(wq, bq, wk, bk, wv, bv, wo, bo) of a block read straight from the
    initializers its MatMul/Add nodes use (W out × in)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for p in (block.q, block.k, block.v, block.o):
        mm = nodes[p.node]
        out.append(inits[mm.input[1]].T.astype(np.float64))
        add = nodes[p.bias_node]
        out.append(inits[next(i for i in add.input if i in inits)].astype(np.float64))
    return out


def _numpy_encoder(model, x, mask):
    """The _Encoder forward in numpy from the model's current initializers,
    with the head counts taken from the q and k weights' widths."""
    blocks = find_transformer(model).attention
    for b in blocks:
        wq, bq, wk, bk, wv, bv, wo, bo = _weights(model, b)
        h, hkv = wq.shape[0] // HEAD_DIM, wk.shape[0] // HEAD_DIM
        bsz, s, _ = x.shape

        def split(t, bsz=bsz, s=s):
            t = t.reshape(bsz, s, -1, HEAD_DIM).transpose(0, 2, 1, 3)
            return np.repeat(t, h // t.shape[1], axis=1)  # grouped-query: query head i reads kv head i // n

        q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
        sc = q @ k.transpose(0, 1, 3, 2) / HEAD_DIM ** 0.5 + (1.0 - mask[:, None, None, :]) * -10000.0
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ctx = (p @ v).transpose(0, 2, 1, 3).reshape(bsz, s, h * HEAD_DIM)
        x = np.tanh(x + ctx @ wo.T + bo)
    return x


# ---------------------------------------------------------------- find


def test_find_matches_exported_attention_with_head_constants():
    model = _attention_model()
    view = find_transformer(model)
    assert [b.num_heads for b in view.attention] == [HEADS, HEADS]
    assert all(b.head_dim == HEAD_DIM and b.v_head_dim == HEAD_DIM for b in view.attention)
    # the exporter writes view(b, s, 4, 4) and reshape(b, s, 16): q, k, v head
    # counts and the merged width are constants the rewrite has to change
    refs = sorted((r.value, r.per_head) for r in view.attention[0].shape_refs)
    assert refs == [(HEADS, 1)] * 3 + [(HEADS * HEAD_DIM, HEAD_DIM)]
    assert view.gated == [] and view.skipped == []


# ---------------------------------------------------------------- identity and lossless cases


def test_all_heads_as_singletons_is_the_identity():
    """r = 0 through the whole decide + rewrite path (not the pass's early exit)."""
    model = _attention_model()
    feed = _feed(3, 9)
    ref = _run(model, feed)
    current = model
    for b in find_transformer(model).attention:
        b = next(x for x in find_transformer(current).attention if x.q.node == b.q.node)
        w = dh.HeadWeights.split(b.q.weight, b.q.bias, b.k.weight, b.k.bias, b.v.weight, b.v.bias, b.o.weight,
                                 b.o.bias, b.num_heads)
        labels = dh.head_labels(w, b.num_heads)
        assert np.array_equal(labels, np.arange(HEADS))
        current = _write_block(current, b, dh.merge_heads(w, labels))
    onnx.checker.check_model(current)
    np.testing.assert_array_equal(_run(current, feed), ref)
    res = HeadFoldingPass(0.0)(model, PassContext())
    assert not res.changed and res.model is model
    assert [r.width_after for r in res.layers] == [HEADS, HEADS]


@pytest.mark.parametrize("merge", ["medoid", "mean"])
def test_duplicated_heads_fold_losslessly(merge):
    model = _attention_model(duplicate=(1, 3))
    res = HeadFoldingPass(HEADS - 1, merge=merge, repair="ar")(model, PassContext())
    assert res.changed
    assert [r.width_after for r in res.layers] == [HEADS - 1] * 2
    assert [r.merged for r in res.layers] == [1, 1]
    onnx.checker.check_model(res.model)
    assert [b.num_heads for b in find_transformer(res.model).attention] == [HEADS - 1] * 2
    for batch, seq in ((1, 5), (3, 11)):
        feed = _feed(batch, seq)
        np.testing.assert_allclose(_run(res.model, feed), _run(model, feed), atol=2e-5, rtol=0)
    # fewer parameters: one head's q, k, v rows (incl. bias) and o columns per block
    before = sum(r.params_before for r in res.layers)
    after = sum(r.params_after for r in res.layers)
    assert before - after == 2 * (3 * HEAD_DIM * (HIDDEN + 1) + HIDDEN * HEAD_DIM)


def test_rotated_copy_of_a_head_folds_losslessly_on_circuits():
    """Head 3 computes what head 0 does with its dimensions rotated: its rows
    differ, its QK and OV circuits do not. Clustering on circuits finds it."""
    torch.manual_seed(0)
    enc = _Encoder(1)
    d = HEAD_DIM
    rng = np.random.default_rng(4)
    rq = torch.from_numpy(np.linalg.qr(rng.standard_normal((d, d)))[0]).float()
    rv = torch.from_numpy(np.linalg.qr(rng.standard_normal((d, d)))[0]).float()
    with torch.no_grad():
        blk = enc.blocks[0]
        for lin, r in ((blk.q, rq), (blk.k, rq), (blk.v, rv)):
            lin.weight[3 * d:] = r @ lin.weight[:d]
            lin.bias[3 * d:] = r @ lin.bias[:d]
        blk.o.weight[:, 3 * d:] = blk.o.weight[:, :d] @ rv.T
    dyn = {0: "batch", 1: "seq"}
    model = _export(enc, (torch.randn(2, 7, HIDDEN), torch.ones(2, 7)), ["x", "mask"],
                    {"x": dyn, "mask": dyn, "y": dyn})
    feed = _feed(3, 11)
    ref = _run(model, feed)
    res = HeadFoldingPass(3, features="circuits", repair="none")(model, PassContext())
    assert [r.width_after for r in res.layers] == [3]
    np.testing.assert_allclose(_run(res.model, feed), ref, atol=2e-5, rtol=0)
    raw = HeadFoldingPass(3, features="weights", repair="none")(model, PassContext())
    assert np.abs(_run(raw.model, feed) - ref).max() > 1e-3  # raw rows do not see the copy


def test_distinct_heads_are_not_folded_losslessly():
    """The lossless check above can fail: merging heads that differ changes the output."""
    model = _attention_model()
    res = HeadFoldingPass(HEADS - 1, repair="none")(model, PassContext())
    feed = _feed(2, 6)
    assert np.abs(_run(res.model, feed) - _run(model, feed)).max() > 1e-3


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("select", ["kmeans", "magnitude"])
def test_folded_model_matches_numpy_attention_under_dynamic_shapes(select):
    model = _attention_model()
    res = HeadFoldingPass(2, select=select, repair="none")(model, PassContext())
    onnx.checker.check_model(res.model)
    assert [b.num_heads for b in find_transformer(res.model).attention] == [2, 2]
    for batch, seq in ((1, 5), (3, 11)):
        feed = _feed(batch, seq)
        out = _run(res.model, feed)
        assert out.shape == (batch, seq, HIDDEN)
        # an independent numpy attention with 2 heads on the folded weights:
        # the graph's head constants must agree with the new weight widths
        ref = _numpy_encoder(res.model, feed["x"].astype(np.float64), feed["mask"].astype(np.float64))
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        # and the numpy attention itself agrees with the original model
        np.testing.assert_allclose(_run(model, feed), _numpy_encoder(model, feed["x"].astype(np.float64),
                                                                       feed["mask"].astype(np.float64)),
                                   atol=1e-4, rtol=0)


def _const_shape_attention(dup: bool) -> onnx.ModelProto:
    """One attention block built with onnx.helper, Reshape shapes as constant
    initializers with 0 (copy) for batch and sequence."""
    rng = np.random.default_rng(3)
    h, d, hid = HEADS, HEAD_DIM, HIDDEN
    w = {n: rng.standard_normal((hid, hid)).astype(np.float32) * 0.3 for n in "qkvo"}
    b = {n: rng.standard_normal(hid).astype(np.float32) * 0.1 for n in "qkvo"}
    if dup:
        for n in "qkv":
            w[n][:, 3 * d:] = w[n][:, :d]
            b[n][3 * d:] = b[n][:d]
        w["o"][3 * d:] = w["o"][:d]
    nodes, inits = attention_graph(w, b, h, d)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", hid])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", hid])
    g = helper.make_graph(nodes, "attn", [x], [y], inits)
    return helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_reshape_shapes_are_rewritten():
    model = _const_shape_attention(dup=True)
    onnx.checker.check_model(model)
    res = HeadFoldingPass(3, repair="none")(model, PassContext())
    onnx.checker.check_model(res.model)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    shapes = {n.name: inits[n.input[1]].tolist() for n in res.model.graph.node if n.op_type == "Reshape"}
    assert shapes == {"q_split": [0, 0, 3, HEAD_DIM], "k_split": [0, 0, 3, HEAD_DIM], "v_split": [0, 0, 3, HEAD_DIM],
                      "merge": [0, 0, 3 * HEAD_DIM]}
    assert "Wq" not in inits and "split_shape" not in inits  # unused originals dropped
    for batch, seq in ((1, 5), (3, 11)):
        x = np.random.default_rng(batch).standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        np.testing.assert_allclose(ort_run(res.model, {"x": x})[0], ort_run(model, {"x": x})[0], atol=2e-5, rtol=0)


# ---------------------------------------------------------------- repair


def _ls_and_plain_errors(model, **settings) -> tuple[dict, list]:
    """Mean squared output error of the fold with ``repair`` none and ls (on
    inputs the calibration data did not hold), and the ls run's layer notes."""
    rng = np.random.default_rng(5)
    calib = CalibrationSet({"x": rng.standard_normal((48, 8, HIDDEN)).astype(np.float32),
                            "mask": np.ones((48, 8), np.float32)})
    ctx = PassContext(calibration=calib, batch_size=16)
    feed = _feed(16, 8, seed=9, pad=False)
    ref = _run(model, feed)
    errs = {}
    for repair in ("none", "ls"):
        res = HeadFoldingPass(2, repair=repair, **settings)(model, ctx)
        onnx.checker.check_model(res.model)
        errs[repair] = float(((_run(res.model, feed) - ref) ** 2).mean())
    return errs, [r.note for r in res.layers]


@pytest.mark.parametrize("refit", ["all", "cluster"])
def test_ls_refit_of_the_output_projection_beats_the_plain_fold(refit):
    errs, notes = _ls_and_plain_errors(_attention_model(seed=2), refit=refit)
    assert all(n.startswith("ls") for n in notes), notes
    # a full refit has the whole o-projection to work with; a per-cluster refit
    # only the merged cluster's 4 columns (measured: 0.78 and 0.97 of "none")
    assert errs["ls"] < (0.9 if refit == "all" else 0.995) * errs["none"], errs


# ---------------------------------------------------------------- gated MLPs


def test_gated_mlp_with_duplicated_neurons_folds_losslessly():
    torch.manual_seed(0)
    mlp = _Gated()
    with torch.no_grad():  # neurons 5 and 6 copy 1 and 2 (gate and up rows, down columns)
        for lin in (mlp.gate, mlp.up):
            lin.weight[5:7] = lin.weight[1:3]
        mlp.down.weight[:, 5:7] = mlp.down.weight[:, 1:3]
    dyn = {0: "batch", 1: "seq"}
    model = _export(mlp, (torch.randn(2, 5, HIDDEN),), ["x"], {"x": dyn, "y": dyn})
    view = find_transformer(model)
    assert len(view.gated) == 1 and view.gated[0].width == 8 and view.gated[0].activation.kind == "silu"
    res = GatedFoldingPass(0.25, repair="none")(model, PassContext())
    onnx.checker.check_model(res.model)
    assert [(r.width_before, r.width_after) for r in res.layers] == [(8, 6)]
    assert find_transformer(res.model).gated[0].width == 6
    for batch, seq in ((1, 5), (3, 11)):
        x = np.random.default_rng(seq).standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        np.testing.assert_allclose(ort_run(res.model, {"x": x})[0], ort_run(model, {"x": x})[0], atol=1e-5, rtol=0)
    # folding further is lossy: the check above can fail
    lossy = GatedFoldingPass(0.5, repair="none")(model, PassContext())
    x = np.random.default_rng(0).standard_normal((2, 4, HIDDEN)).astype(np.float32)
    assert np.abs(ort_run(lossy.model, {"x": x})[0] - ort_run(model, {"x": x})[0]).max() > 1e-4


# ---------------------------------------------------------------- grouped-query attention


def _gqa_model(copy: str | None = None, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """_Encoder with 2 key/value heads for 4 query heads (torch's
    repeat_interleave: a Tile in the graph). ``copy``: "query" (in each key/value
    group the second query head repeats the first: q rows, o columns), "groups"
    (key/value head 1 with its query heads repeats head 0 with its own) or
    "values" (v weights zero: every head adds a constant, its value bias)."""
    torch.manual_seed(seed)
    enc = _Encoder(layers, kv_heads=2)
    d = HEAD_DIM
    with torch.no_grad():
        for blk in enc.blocks:
            if copy == "query":
                for a, b in ((0, 1), (2, 3)):
                    blk.q.weight[b * d:(b + 1) * d] = blk.q.weight[a * d:(a + 1) * d]
                    blk.q.bias[b * d:(b + 1) * d] = blk.q.bias[a * d:(a + 1) * d]
                    blk.o.weight[:, b * d:(b + 1) * d] = blk.o.weight[:, a * d:(a + 1) * d]
            elif copy == "groups":
                for lin in (blk.k, blk.v):
                    lin.weight[d:] = lin.weight[:d]
                    lin.bias[d:] = lin.bias[:d]
                blk.q.weight[2 * d:] = blk.q.weight[:2 * d]
                blk.q.bias[2 * d:] = blk.q.bias[:2 * d]
                blk.o.weight[:, 2 * d:] = blk.o.weight[:, :2 * d]
            elif copy == "values":
                blk.v.weight.zero_()
    dyn = {0: "batch", 1: "seq"}
    return _export(enc, (torch.randn(2, 7, HIDDEN), torch.ones(2, 7)), ["x", "mask"],
                   {"x": dyn, "mask": dyn, "y": dyn})


def _counts(model) -> list[tuple[int, int]]:
    return [(b.num_heads, b.num_kv_heads) for b in find_transformer(model).attention]


def _same_outputs(model, folded, atol=2e-5) -> None:
    for batch, seq in ((1, 5), (3, 11)):
        feed = _feed(batch, seq)
        np.testing.assert_allclose(_run(folded, feed), _run(model, feed), atol=atol, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,shape", [
    (4, None, (2, 2)), (3, None, (2, 1)), (2, None, (2, 1)), (1, None, (1, 1)),  # within groups first
    (4, 1, (1, 2)), (2, 1, (1, 2)), (1, 1, (1, 1)), (4, 0.5, (1, 2)),  # key/value heads asked for
    (5, None, (2, 2)),
])
def test_grouped_shape_folds_within_groups_first(heads, kv_heads, shape):
    """4 query heads on 2 key/value heads: (key/value heads, query heads each) kept."""
    assert dh.grouped_shape(4, 2, heads, kv_heads) == shape


def test_grouped_shape_of_multi_head_attention_is_the_head_count():
    assert [dh.grouped_shape(4, 4, k) for k in (4, 3, 1)] == [(4, 1), (3, 1), (1, 1)]
    assert dh.grouped_shape(4, 4, 3, 2) == (2, 1)  # a key/value cap is a head cap
    assert dh.grouped_shape(6, 2, 5) == (2, 2)  # 6 heads over 2: 5 asked, 4 kept (2 per group)


def test_grouped_query_attention_is_found_as_a_foldable_block():
    view = find_transformer(_gqa_model(layers=1))
    assert _counts(_gqa_model(layers=1)) == [(HEADS, 2)] and view.grouped == view.attention
    assert view.skipped == []
    refs = sorted((r.counts, r.value, r.per_head) for r in view.attention[0].shape_refs)
    # q split [b, s, 4, 4], k/v splits [b, s, 2, 4], the Tile by 2 of k and v, the merged width 16
    assert refs == [("group", 2, 1)] * 2 + [("heads", HEADS, 1), ("heads", HEADS * HEAD_DIM, HEAD_DIM)] \
        + [("kv_heads", 2, 1)] * 2


@pytest.mark.parametrize("merge", ["medoid", "mean"])
def test_query_heads_fold_within_their_groups_losslessly(merge):
    model = _gqa_model("query")
    res = HeadFoldingPass(2, merge=merge, repair="ar")(model, PassContext())
    assert [(r.width_before, r.width_after, r.merged, r.pruned) for r in res.layers] == [(HEADS, 2, 2, 0)] * 2
    assert [r.note for r in res.layers] == ["key/value heads 2 -> 2, 1 query heads each"] * 2
    onnx.checker.check_model(res.model)
    assert _counts(res.model) == [(2, 2)] * 2
    _same_outputs(model, res.model)
    # only q rows and o columns go: k and v are shared by the group and stay
    before = sum(r.params_before for r in res.layers)
    assert before - sum(r.params_after for r in res.layers) == 2 * 2 * (HEAD_DIM * (HIDDEN + 1) + HIDDEN * HEAD_DIM)
    # the lossless check can fail: whole groups differ
    lossy = HeadFoldingPass(4, kv_heads=1, merge=merge, repair="none")(model, PassContext())
    assert np.abs(_run(lossy.model, _feed(2, 6)) - _run(model, _feed(2, 6))).max() > 1e-3


@pytest.mark.parametrize("merge", ["medoid", "mean"])
def test_repeated_key_value_groups_fold_losslessly(merge):
    model = _gqa_model("groups")
    res = HeadFoldingPass(4, kv_heads=1, merge=merge, repair="ar")(model, PassContext())
    assert [(r.width_before, r.width_after, r.merged) for r in res.layers] == [(HEADS, 2, 2)] * 2
    assert [r.note for r in res.layers] == ["key/value heads 2 -> 1, 2 query heads each"] * 2
    onnx.checker.check_model(res.model)
    assert _counts(res.model) == [(2, 1)] * 2
    _same_outputs(model, res.model)
    # a whole group goes: its k, v rows, its query heads' q rows and o columns
    before = sum(r.params_before for r in res.layers)
    assert before - sum(r.params_after for r in res.layers) == \
        2 * (2 * HEAD_DIM * (HIDDEN + 1) + 2 * (HEAD_DIM * (HIDDEN + 1) + HIDDEN * HEAD_DIM))
    # the lossless check can fail: the query heads within a group differ
    lossy = HeadFoldingPass(2, merge=merge, repair="none")(model, PassContext())
    assert np.abs(_run(lossy.model, _feed(2, 6)) - _run(model, _feed(2, 6))).max() > 1e-3


def test_pruned_query_heads_hand_their_value_bias_to_the_output_bias():
    """With v weights zero every head adds the constant Wo_h bv_g: pruning a
    query head is exact only if that constant moves into the o bias."""
    model = _gqa_model("values", layers=1)  # one block: the exporter would share two blocks' zero v weights
    res = HeadFoldingPass(2, select="magnitude", repair="none")(model, PassContext())
    assert [(r.width_after, r.pruned) for r in res.layers] == [(2, 2)]
    _same_outputs(model, res.model, atol=1e-5)
    kv = HeadFoldingPass(1, select="magnitude", repair="none")(model, PassContext())  # a whole group too
    assert _counts(kv.model) == [(1, 1)]
    _same_outputs(model, kv.model, atol=1e-5)


@pytest.mark.parametrize("settings,counts", [(dict(heads=2), (2, 2)), (dict(heads=4, kv_heads=1), (2, 1)),
                                             (dict(heads=1), (1, 1)), (dict(heads=2, select="magnitude"), (2, 2)),
                                             (dict(heads=0.5, kv_heads=0.5, merge="mean"), (2, 1))])
def test_folded_grouped_query_model_matches_numpy_attention_under_dynamic_shapes(settings, counts):
    model = _gqa_model(seed=3)
    res = HeadFoldingPass(**settings, repair="none")(model, PassContext())
    onnx.checker.check_model(res.model)
    assert _counts(res.model) == [counts] * 2
    for batch, seq in ((1, 1), (1, 5), (3, 11)):
        feed = _feed(batch, seq)
        x, mask = feed["x"].astype(np.float64), feed["mask"].astype(np.float64)
        out = _run(res.model, feed)
        assert out.shape == (batch, seq, HIDDEN)
        # numpy grouped-query attention with the folded weights' head counts: the
        # graph's head, key/value head and group-size constants agree with them
        np.testing.assert_allclose(out, _numpy_encoder(res.model, x, mask), atol=1e-4, rtol=0)
        np.testing.assert_allclose(_run(model, feed), _numpy_encoder(model, x, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("refit", ["all", "merged", "cluster"])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_ls_refit_of_a_grouped_query_fold_beats_the_plain_fold(refit, kv_heads):
    errs, notes = _ls_and_plain_errors(_gqa_model(seed=2), kv_heads=kv_heads, refit=refit)
    assert all(n.startswith("key/value heads") and "; ls" in n for n in notes), notes
    assert errs["ls"] < 0.995 * errs["none"], errs


def test_bad_kv_heads_are_usage_errors():
    from onnxfold.errors import UsageError

    for kv in (0, 1.5, True, {"attn0": -1}):
        with pytest.raises(UsageError, match="kv_heads"):
            HeadFoldingPass(2, kv_heads=kv)
    with pytest.raises(UsageError, match="attn9"):
        HeadFoldingPass(2, kv_heads={"attn9": 1})(_gqa_model(layers=1), PassContext())


# ---------------------------------------------------------------- unsupported forms


def test_fused_attention_node_is_reported_and_left_alone():
    hid = HIDDEN
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", hid])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", hid])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((hid, 3 * hid)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(3 * hid, np.float32), "B")]
    node = helper.make_node("Attention", ["x", "W", "B"], ["y"], domain="com.microsoft", num_heads=HEADS,
                            name="fused")
    g = helper.make_graph([node], "fused", [x], [y], inits)
    model = helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                              helper.make_opsetid("com.microsoft", 1)])
    before = model.SerializeToString()
    res = HeadFoldingPass(2)(model, PassContext())
    assert not res.changed and res.model.SerializeToString() == before
    assert any("fused" in n and "Attention" in n for n in res.notes)


def test_gated_ls_refit_beats_the_plain_fold():
    torch.manual_seed(1)
    dyn = {0: "batch", 1: "seq"}
    model = _export(_Gated(inner=12), (torch.randn(2, 5, HIDDEN),), ["x"], {"x": dyn, "y": dyn})
    rng = np.random.default_rng(2)
    ctx = PassContext(calibration=CalibrationSet({"x": rng.standard_normal((64, 6, HIDDEN)).astype(np.float32)}),
                      batch_size=16)
    x = rng.standard_normal((8, 6, HIDDEN)).astype(np.float32)
    ref = ort_run(model, {"x": x})[0]
    errs = {}
    for repair in ("none", "ls", "auto"):
        res = GatedFoldingPass(0.5, repair=repair)(model, ctx)
        onnx.checker.check_model(res.model)
        errs[repair] = float(((ort_run(res.model, {"x": x})[0] - ref) ** 2).mean())
    assert errs["ls"] < 0.9 * errs["none"], errs
    # with calibration data, the default is the refit (the down projection acts per position)
    assert errs["auto"] == errs["ls"], errs
    # without data it is no repair
    plain = GatedFoldingPass(0.5)(model, PassContext())
    assert float(((ort_run(plain.model, {"x": x})[0] - ref) ** 2).mean()) == errs["none"]


def test_bad_arguments_are_usage_errors():
    from onnxfold.errors import UsageError

    for kw in ({"heads": 1.5}, {"heads": 0}, {"heads": True}, {"heads": 2, "select": "random"},
               {"heads": 2, "merge": "max"}, {"heads": 2, "repair": "repair"}, {"heads": 2, "refit": "some"}):
        with pytest.raises(UsageError):
            HeadFoldingPass(**kw)
    with pytest.raises(UsageError):  # ls without data
        HeadFoldingPass(2, repair="ls")(_const_shape_attention(False), PassContext())
    with pytest.raises(UsageError):
        HeadFoldingPass({"attn9": 2})(_const_shape_attention(False), PassContext())


def test_cli_fold_heads_folds_duplicated_heads_losslessly(tmp_path):
    """`onnxfold optimize --fold-heads K` reaches the same pass through the
    CLI (data-free here: no repair), writes a model that runs under other
    batch/sequence shapes, and reports the head counts."""
    import json

    from onnxfold.cli import main

    model = _attention_model(duplicate=(1, 3))
    src, out, rep = tmp_path / "enc.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    assert main(["optimize", str(src), "-o", str(out), "--fold-heads", str(HEADS - 1), "--no-linear",
                 "--report", str(rep), "--quiet", "--no-auto-data", "--provider", "cpu"]) == 0
    r = json.loads(rep.read_text())
    heads = [lr for lr in r["layers"] if lr["activation"] == "attention (heads)"]
    assert [(lr["width_before"], lr["width_after"]) for lr in heads] == [(HEADS, HEADS - 1)] * 2
    assert r["after"]["parameters"] < r["before"]["parameters"]
    folded = onnx.load(out)
    for batch, seq in ((1, 5), (3, 11)):
        feed = _feed(batch, seq)
        np.testing.assert_allclose(_run(folded, feed), _run(model, feed), atol=2e-5, rtol=0)


# ---------------------------------------------------------------- selection by Optimal Brain Surgeon


def test_obs_gated_fold_drops_the_copies_and_the_refit_makes_it_lossless():
    torch.manual_seed(0)
    mlp = _Gated()
    with torch.no_grad():  # neurons 5 and 6 copy 1 and 2, with the largest down columns
        for lin in (mlp.gate, mlp.up):
            lin.weight[5:7] = lin.weight[1:3]
        mlp.down.weight[:, 5:7] = 3 * mlp.down.weight[:, 1:3]
    dyn = {0: "batch", 1: "seq"}
    model = _export(mlp, (torch.randn(2, 5, HIDDEN),), ["x"], {"x": dyn, "y": dyn})
    rng = np.random.default_rng(0)
    ctx = PassContext(calibration=CalibrationSet({"x": rng.standard_normal((64, 6, HIDDEN)).astype(np.float32)}),
                      batch_size=16)
    res = GatedFoldingPass(0.25, select="obs", repair="ls")(model, ctx)
    assert [(r.width_before, r.width_after, r.pruned) for r in res.layers] == [(8, 6, 2)]
    x = rng.standard_normal((3, 9, HIDDEN)).astype(np.float32)  # another length than the calibration's
    np.testing.assert_allclose(ort_run(res.model, {"x": x})[0], ort_run(model, {"x": x})[0], atol=1e-4, rtol=0)
    # keeping the largest rows keeps both copies and drops two distinct neurons: the check above can fail
    lossy = GatedFoldingPass(0.25, select="magnitude", repair="ls")(model, ctx)
    assert np.abs(ort_run(lossy.model, {"x": x})[0] - ort_run(model, {"x": x})[0]).max() > 1e-3


def test_obs_query_heads_keep_one_per_key_value_group_and_drop_the_copies():
    model = _gqa_model("query")
    rng = np.random.default_rng(0)
    calib = CalibrationSet({"x": rng.standard_normal((64, 8, HIDDEN)).astype(np.float32),
                            "mask": np.ones((64, 8), np.float32)})
    res = HeadFoldingPass(2, select="obs", repair="ls")(model, PassContext(calibration=calib, batch_size=16))
    # one query head of each pair kept: either rebuilds its copy once the o projection is refit
    assert [(r.width_before, r.width_after, r.merged, r.pruned) for r in res.layers] == [(HEADS, 2, 0, 2)] * 2
    assert _counts(res.model) == [(2, 2)] * 2
    _same_outputs(model, res.model, atol=1e-3)
