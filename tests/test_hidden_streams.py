"""A transformer's hidden width (its residual stream) as one group of ``find_groups``.

The expected members are read off the torch module and the graph without
onnxfold: a projection is the MatMul/Gemm whose constant weight equals a torch
``nn.Linear``'s, an embedding the Gather whose table equals a torch
embedding's, a norm the fused LayerNormalization or (decomposed RMSNorm) the
Mul that applies a constant vector of the hidden width. Norms make the group
unsearchable, with the reason said; a stream read by something not modelled is
reported as skipped at that node. Dense and conv chains that pass a norm give
the same kind of reason.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import make_model, tensor_info

from onnxfold.cli import main
from onnxfold.find.groups import find_groups

# ---------------------------------------------------------------- exports

CASES = [("llama_mha", "dynamo"), ("llama_mha", "legacy"), ("llama_gqa", "dynamo"), ("llama_gqa", "legacy"),
         ("bert", "dynamo"), ("bert", "legacy")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    import transformer_exports as te

    cache: dict = {}
    folder = tmp_path_factory.mktemp("hidden_exports")

    def get(source: str, exporter: str):
        if (source, exporter) not in cache:
            path = folder / f"{source}_{exporter}.onnx"
            cache[source, exporter] = path, te.export(source, exporter, path)
        return cache[source, exporter]

    return get


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant outputs by name, followed through Identity nodes."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for _ in range(3):
        for n in model.graph.node:
            if n.op_type == "Identity" and n.input[0] in out:
                out[n.output[0]] = out[n.input[0]]
    return out


def _node_of_linear(model, consts, linear) -> str:
    """The one MatMul/Gemm node whose constant weight is this torch Linear's."""
    w = linear.weight.detach().numpy()
    hits = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or n.input[1] not in consts:
            continue
        b = consts[n.input[1]]
        trans = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        stored = b if trans else b.T
        if stored.shape == w.shape and np.array_equal(stored, w):
            hits.append(n.name)
    assert len(hits) == 1, (linear, hits)
    return hits[0]


def _node_of_embedding(model, consts, emb) -> str:
    w = emb.weight.detach().numpy()
    hits = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in consts
            and consts[n.input[0]].shape == w.shape and np.array_equal(consts[n.input[0]], w)]
    assert len(hits) == 1, (emb, hits)
    return hits[0]


def _in_graph_order(model, names) -> list[str]:
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    return sorted(names, key=order.__getitem__)


def _expected(model, module, source) -> dict:
    """Width, producers, consumers and norms from the torch module's config and parameters."""
    import transformer_exports as te

    consts = _constants(model)
    cfg = module.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    producers, consumers = [], []
    for i in range(layers):
        att = te.attention_linears(module, i)
        producers.append(_node_of_linear(model, consts, att["o"]))
        consumers += [_node_of_linear(model, consts, att[k]) for k in "qkv"]
        if te.SOURCES[source].gated:
            mlp = te.mlp_linears(module, i)
            producers.append(_node_of_linear(model, consts, mlp["down"]))
            consumers += [_node_of_linear(model, consts, mlp[k]) for k in ("gate", "up")]
        else:
            layer = te.layers(module)[i]
            producers.append(_node_of_linear(model, consts, layer.output.dense))
            consumers.append(_node_of_linear(model, consts, layer.intermediate.dense))
    if te.SOURCES[source].decoder:
        producers.append(_node_of_embedding(model, consts, module.model.embed_tokens))
        consumers.append(_node_of_linear(model, consts, module.lm_head))
        # RMSNorm as torch.onnx writes it: its scale is a Mul by a constant vector of the hidden width
        norms = [n.name for n in model.graph.node if n.op_type == "Mul"
                 and any(consts.get(i) is not None and consts[i].shape == (hidden,) for i in n.input)]
    else:
        emb = module.embeddings
        producers += [_node_of_embedding(model, consts, e) for e in
                      (emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings)]
        norms = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]
    # one norm before each block's attention and MLP, one at the end (decoders) or after the embeddings (BERT)
    assert len(norms) == 2 * layers + 1, norms
    return {"width": hidden, "producers": _in_graph_order(model, producers),
            "consumers": _in_graph_order(model, consumers), "norms": norms}


@pytest.mark.parametrize("source,exporter", CASES)
def test_hidden_stream_members_are_the_models_own(exported, source, exporter):
    path, module = exported(source, exporter)
    model = onnx.load(str(path))
    want = _expected(model, module, source)
    found = find_groups(model)
    (g,) = found.of_kind("hidden")
    assert (g.name, g.width) == ("hidden0", want["width"])
    assert g.producers == want["producers"]
    assert g.consumers == want["consumers"]
    assert g.norms == want["norms"]
    # a norm normalises over every channel: no knob, and the reason is said (in find's skipped list too)
    assert not g.searchable and g.knobs == {}
    assert "norm" in g.reason and "not exact" in g.reason
    assert any(s.kind == "hidden" and s.where == g.name and "norm" in s.reason for s in found.skipped)
    assert all(any(c.startswith(f"norm {n} (") for c in g.coupling) for n in g.norms)
    decoder = source.startswith("llama")
    assert any(c.startswith("residual join") for c in g.coupling)
    # BERT's output is the stream itself: the model's interface has the hidden width
    assert ("graph output last_hidden_state" in g.coupling) == (not decoder)
    # the o/down projections write the stream: not also reported as dense layers that failed to chain
    assert not any(s.where in g.producers for s in found.skipped)
    # the search only sees groups with knobs
    assert g not in found.searchable


def test_stream_read_by_an_unknown_node_is_skipped_with_the_reason(exported):
    path, _ = exported("llama_mha", "legacy")
    model = onnx.load(str(path))
    emb = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    model.graph.node.append(helper.make_node("Sin", [emb.output[0]], ["probe_out"], name="probe"))
    model.graph.output.append(helper.make_tensor_value_info("probe_out", onnx.TensorProto.FLOAT, None))
    found = find_groups(model)
    assert found.of_kind("hidden") == []
    (s,) = [s for s in found.skipped if s.kind == "hidden"]
    assert s.where == "probe" and "read by Sin probe" in s.reason and "not modelled" in s.reason
    # the blocks themselves are still found and searchable
    assert len(found.of_kind("head")) == 2 and all(g.searchable for g in found.of_kind("head", "gated"))


def test_inspect_lists_the_hidden_stream_and_why_it_is_not_folded(exported, tmp_path, capsys):
    path, _ = exported("llama_gqa", "legacy")
    js = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(js), "--provider", "cpu", "--no-auto-data"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(js.read_text())["hidden"]
    assert (row["stream"], row["width"], row["foldable"], len(row["norms"]), row["joins"]) == ("hidden0", 64, False, 5, 4)
    assert "normalise over the whole hidden dimension" in row["reason"]
    assert "Hidden width (residual streams)" in out and "hidden0 not folded:" in out


# ---------------------------------------------------------------- norms on dense and conv chains


def _dense_norm_relu_dense(norm: str) -> onnx.ModelProto:
    """x[N,4] → MatMul(4→6) → norm → Relu → MatMul(6→3) → y; norm: "fused" LayerNormalization or
    "decomposed" (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, as an unfused export writes it)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.ones(6, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(6, np.float32), "bias"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    if norm == "fused":
        nodes.append(helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], name="ln", axis=-1))
    else:
        nodes += [helper.make_node("ReduceMean", ["h"], ["mu"], name="mean", axes=[-1]),
                  helper.make_node("Sub", ["h", "mu"], ["d"], name="sub"),
                  helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
                  helper.make_node("ReduceMean", ["d2"], ["var"], name="var", axes=[-1]),
                  helper.make_node("Add", ["var", "eps"], ["ve"], name="addeps"),
                  helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
                  helper.make_node("Div", ["d", "sd"], ["nd"], name="div"),
                  helper.make_node("Mul", ["nd", "scale"], ["ns"], name="ln"),
                  helper.make_node("Add", ["ns", "bias"], ["n"], name="lnb")]
    nodes += [helper.make_node("Relu", ["n"], ["a"], name="relu"),
              helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor_info("x", np.float32, ["N", 4])], [tensor_info("y", np.float32, ["N", 3])],
                      inits)


@pytest.mark.parametrize("norm,kind", [("fused", "LayerNormalization"), ("decomposed", "LayerNorm (decomposed)")])
def test_dense_chain_through_a_norm_says_the_norm_is_why(norm, kind):
    found = find_groups(_dense_norm_relu_dense(norm))
    assert found.of_kind("neuron") == []
    (s,) = [s for s in found.skipped if s.where == "fc1"]
    assert f"{kind} ln normalises over all the neurons" in s.reason and "not exact" in s.reason, s.reason


def test_conv_residual_stream_read_by_a_norm_says_the_norm_is_why():
    """stem Conv → s; s + Conv(Relu(Conv(s))) → GroupNormalization → head Conv: the stream is not
    folded even with fold_residual, because of the norm."""
    rng = np.random.default_rng(1)

    def conv(name, x, c_out, c_in):
        inits.append(numpy_helper.from_array(rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32),
                                             f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.y"], name=name))
        return f"{name}.y"

    nodes, inits = [], [numpy_helper.from_array(np.ones(4, np.float32), "gs"),
                        numpy_helper.from_array(np.zeros(4, np.float32), "gb")]
    s = conv("stem", "x", 4, 3)
    nodes.append(helper.make_node("Relu", [conv("b1", s, 5, 4)], ["b1r"], name="b1_relu"))
    nodes.append(helper.make_node("Add", [conv("b2", "b1r", 4, 5), s], ["sum"], name="join"))
    nodes.append(helper.make_node("GroupNormalization", ["sum", "gs", "gb"], ["gn"], name="gnorm", num_groups=2))
    conv("head", "gn", 2, 4)
    model = make_model(nodes, [tensor_info("x", np.float32, ["N", 3, 5, 5])],
                       [tensor_info("head.y", np.float32, ["N", 2, 5, 5])], inits, opset=21)
    found = find_groups(model, fold_residual=True)
    (r,) = found.of_kind("residual")
    assert not r.searchable and "GroupNormalization gnorm normalises over all the channels of the stream" in r.reason


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                                "SimplifiedLayerNormalization", "RMSNormalization"])
def test_fused_norms_on_a_stream(op):
    """ids → Gather(T) = e → q = e·Wq → o = q·Wo → norm(e [+ o]) → head: the fused norm's stream inputs
    (both, for the Skip* ones) and its output are the stream; its scale vector is the norm's."""
    from onnxfold.find.graph_index import GraphIndex
    from onnxfold.find.hidden import find_hidden_streams

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("T", (10, 8)), ("Wq", (8, 8)), ("Wo", (8, 8)), ("Wh", (8, 5)), ("gamma", (8,)))]
    skip = op.startswith("Skip")
    nodes = [helper.make_node("Gather", ["T", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["q", "Wo"], ["o"], name="o_proj"),
             helper.make_node(op, ["e", "o", "gamma"] if skip else ["o", "gamma"], ["n"], name="norm",
                              **({"domain": "com.microsoft"} if skip else {})),
             helper.make_node("MatMul", ["n", "Wh"], ["y"], name="head")]
    if not skip:  # the residual join is an Add of its own
        nodes[3:3] = [helper.make_node("Add", ["e", "o"], ["o2"], name="join")]
        nodes[4].input[0] = "o2"
    model = make_model(nodes, [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "S"])],
                       [tensor_info("y", np.float32, ["N", "S", 5])], inits)
    (s,), skipped = find_hidden_streams(GraphIndex(model), ["e"])
    assert skipped == []
    assert (s.width, s.producers, s.consumers, s.norm_names) == (8, ["emb", "o_proj"], ["q_proj", "head"], ["norm"])
    assert s.norms[0].kind == op and s.norms[0].scale == "gamma"
    assert s.joins == ([] if skip else ["join"]) and s.tables == {"emb": "T"}
