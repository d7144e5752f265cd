"""Suffix runs (``measure.suffix``): a stream that starts from the tensors an
earlier run of the same data recorded, running only the nodes after them.

What must hold: only tensors computed the same way in both models are reused
(a changed weight upstream of them means a full run); the values are those of
a full run; the recording is a copy (editing the model it came from in place
does not make it stale); and a search with suffix runs chooses what it
chooses without them."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx
from onnx import numpy_helper

import onnxfold
from helpers import build_mlp, ort_run, random_input
from onnxfold.decide.budget import Budget
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.jobs import StatsJob, StreamMemo, run_stats_job
from onnxfold.measure.stream import needed_part, stream_tensors
from onnxfold.measure.suffix import TensorMemo, cut_tensors, same_tensors, suffix_part


def _relus(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "Relu"]


def _weights(model: onnx.ModelProto) -> list[str]:
    """The weight initializers of the Gemms, in graph order."""
    return [n.input[1] for n in model.graph.node if n.op_type == "Gemm"]


def _with_weight(model: onnx.ModelProto, name: str, scale: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), name))
    return out


def _collect(name: str, accs, _start, _feed, _labels, tensors) -> None:
    accs["rows"].append(np.array(tensors[0][name]))


class _Rows(list):
    def merge(self, other):
        self.extend(other)
        return self


def _stream(model, name, data, memo, whole=False):
    """``name`` of ``model`` over ``data`` through run_stats_job (a pass's stream), concatenated;
    the part that computes it is run, or with ``whole`` the model itself."""
    job_model = model if whole else needed_part(model, {name: np.float32})
    names = [name, *(o.name for o in model.graph.output)] if whole else [name]
    job = StatsJob([(job_model, names)], lambda: {"rows": _Rows()}, partial(_collect, name))
    return np.concatenate(run_stats_job(job, data, batch_size=32, providers=None, memo=memo)["rows"])


def _full(model, name, data):
    return np.concatenate([t[name] for _f, _l, t in stream_tensors(model, [name], data, batch_size=32)])


def test_same_tensors_are_those_computed_by_equal_nodes_from_equal_inputs():
    model = build_mlp([5, 8, 8, 3], seed=1)
    w0, w1, w2 = _weights(model)
    h0, h1 = _relus(model)
    assert {h0, h1, w0, w1, w2, "x"} <= same_tensors(model, model)
    changed = _with_weight(model, w1, 1.5)
    same = same_tensors(changed, model)
    assert h0 in same and w0 in same and "x" in same
    assert w1 not in same and h1 not in same  # the changed weight, and everything it reaches
    assert not {n.output[0] for n in model.graph.node if n.op_type == "Gemm"}.issubset(same)
    first = same_tensors(_with_weight(model, w0, 1.5), model)
    assert h0 not in first and h1 not in first and w1 in first


def test_what_a_plan_shares_is_same_tensors_less_the_initializers():
    """The suffix plans compare an initializer only where a node reads it: the
    computed tensors they share are exactly same_tensors' (a weight changed
    first, in the middle or last; an initializer that is also a graph input;
    an extra node), less the initializer names."""
    from onnxfold.measure.suffix import _computed_alike

    model = build_mlp([5, 8, 8, 8, 3], seed=1)
    weights = _weights(model)
    overridable = onnx.ModelProto()
    overridable.CopyFrom(model)
    overridable.graph.input.append(onnx.helper.make_tensor_value_info(weights[1], onnx.TensorProto.FLOAT, None))
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[1].output[0] = renamed.graph.node[2].input[0] = "renamed"
    variants = [model, overridable, renamed, *(_with_weight(model, w, 1.5) for w in weights)]
    for changed in variants:
        for reference in (model, overridable):
            inits = {t.name for t in changed.graph.initializer}
            full = same_tensors(changed, reference)
            shared, equal_initializer = _computed_alike(changed, reference)
            assert shared == full - inits
            assert {n for n in inits if equal_initializer(n)} == full & inits
    assert _computed_alike(_with_weight(model, weights[0], 1.5), model)[0] == {"x"}  # the first layer changed


def test_a_suffix_part_computes_from_the_given_tensors_only():
    model = build_mlp([5, 8, 8, 3], seed=1)
    h0, h1 = _relus(model)
    part = suffix_part(model, [h1], {h0: np.float32})
    assert [i.name for i in part.graph.input] == [h0]  # x and the first layer are left out
    assert len(part.graph.node) < len(needed_part(model, {h1: np.float32}).graph.node)
    data = CalibrationSet({"x": random_input(model, batch=40, seed=3)})
    h0_values = _full(model, h0, data)
    got = np.concatenate([t[h1] for _f, _l, t in stream_tensors(part, [h1], data, batch_size=40,
                                                                 extra_feeds=[{h0: h0_values}])])
    np.testing.assert_array_equal(got, _full(model, h1, data))


def test_a_later_run_starts_from_what_an_earlier_run_recorded_and_gives_a_full_runs_values():
    model = build_mlp([5, 16, 16, 16, 3], seed=1)
    data = CalibrationSet({"x": random_input(model, batch=100, seed=2)})
    h0, h1, h2 = _relus(model)
    w0, w1, w2, _ = _weights(model)
    memo = StreamMemo(tensors=TensorMemo())
    _stream(model, h1, data, memo)  # a refit of layer 1 measures its input...
    assert memo.tensors.suffix_runs == 0
    refit = _with_weight(model, w2, 0.5)  # ...and changes layer 2, whose output the next refit measures
    got = _stream(refit, h2, data, memo)
    assert memo.tensors.suffix_runs == 1 and memo.tensors.nodes_skipped >= 2  # layers 0 and 1 not run again
    np.testing.assert_array_equal(got, _full(refit, h2, data))

    # a change upstream of everything recorded: nothing is shared, the stream runs in full
    upstream = _with_weight(model, w0, 2.0)
    runs = memo.tensors.suffix_runs
    got = _stream(upstream, h2, data, memo)
    assert memo.tensors.suffix_runs == runs
    np.testing.assert_array_equal(got, _full(upstream, h2, data))
    assert not np.allclose(got, _full(refit, h2, data))


def test_a_recording_is_a_copy_of_the_model_it_came_from():
    model = build_mlp([5, 16, 16, 3], seed=1)
    data = CalibrationSet({"x": random_input(model, batch=64, seed=2)})
    h0, h1 = _relus(model)
    w0 = _weights(model)[0]
    memo = StreamMemo(tensors=TensorMemo())
    _stream(model, h1, data, memo, whole=True)
    for t in model.graph.initializer:  # edited in place after the run that recorded it
        if t.name == w0:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(3.0), w0))
    got = _stream(model, h1, data, memo, whole=True)
    np.testing.assert_array_equal(got, _full(model, h1, data))


def test_a_recording_past_its_share_of_the_memo_is_not_kept():
    model = build_mlp([5, 16, 16, 3], seed=1)
    data = CalibrationSet({"x": random_input(model, batch=100, seed=2)})
    h1 = _relus(model)[1]
    memo = StreamMemo(tensors=TensorMemo(max_bytes=2 * 100 * 16 * 4 - 1))  # half of it holds less than one tensor
    _stream(model, h1, data, memo)
    assert memo.tensors.bytes == 0
    _stream(model, h1, data, memo)
    assert memo.tensors.suffix_runs == 0


def test_the_weights_a_recording_copies_count_against_the_memo():
    model = build_mlp([5, 300, 300, 3], seed=1)  # a 300 x 300 weight (360 kB) behind small activations
    data = CalibrationSet({"x": random_input(model, batch=20, seed=2)})
    h1 = _relus(model)[1]
    activations = 20 * 300 * 4 * 2  # both hidden layers are on the frontier of a run to h1 at most
    memo = StreamMemo(tensors=TensorMemo(max_bytes=4 * activations))
    _stream(model, h1, data, memo)
    assert memo.tensors.bytes == 0  # the copy of the weights would not fit in half of it
    roomy = StreamMemo(tensors=TensorMemo(max_bytes=8 << 20))
    _stream(model, h1, data, roomy)
    assert roomy.tensors.bytes > 300 * 300 * 4


def test_where_a_model_starts_to_differ():
    model = build_mlp([5, 8, 8, 8, 3], seed=1)
    h0, h1, h2 = _relus(model)
    w1 = _weights(model)[1]
    assert cut_tensors(model, model) == [o.name for o in model.graph.output]  # nothing differs: the outputs
    assert cut_tensors(_with_weight(model, w1, 2.0), model) == [h0]  # layer 1 reads the last shared tensor


def test_a_search_with_suffix_runs_chooses_what_it_chooses_without_them(monkeypatch):
    model = build_mlp([20, 48, 32, 32, 5], seed=3)
    x = random_input(model, batch=800, seed=4)
    passes, judged = [], []

    def made_in(where):
        def tensor_memo(*args, **kwargs):
            where.append(TensorMemo(*args, **kwargs))
            return where[-1]
        return tensor_memo

    def search():
        return onnxfold.optimize(model, {"x": x}, budget=Budget(min_agreement=90), provider="cpu", latency=False,
                                 seed=0)

    monkeypatch.setattr("onnxfold.passes.cache.TensorMemo", made_in(passes))
    monkeypatch.setattr("onnxfold.search.TensorMemo", made_in(judged))
    with_suffix = search()
    assert sum(m.suffix_runs for m in passes) > 0  # the passes' streams
    assert len(judged) == 1 and judged[0].suffix_runs > 0  # candidates judged from the lossless start's tensors
    monkeypatch.setattr("onnxfold.passes.cache.TensorMemo", lambda *a, **k: None)
    monkeypatch.setattr("onnxfold.search.TensorMemo", lambda *a, **k: None)
    without = search()
    assert with_suffix.report["search"]["chosen"] == without.report["search"]["chosen"]
    a, b = with_suffix.report["search"]["evaluated"], without.report["search"]["evaluated"]
    assert [e["setting"] for e in a] == [e["setting"] for e in b]
    assert [e["met"] for e in a] == [e["met"] for e in b]
    np.testing.assert_allclose([e["spent"] for e in a], [e["spent"] for e in b], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ort_run(with_suffix.model, {"x": x})[0], ort_run(without.model, {"x": x})[0],
                               rtol=0, atol=1e-5)


def test_a_fixed_fold_with_suffix_runs_gives_the_model_it_gives_without_them(monkeypatch):
    """Outside a search too: each refit's run starts from what the one before recorded."""
    model = build_mlp([20, 48, 32, 32, 5], seed=3)
    x = random_input(model, batch=600, seed=4)
    made = []

    def tensor_memo(*args, **kwargs):
        made.append(TensorMemo(*args, **kwargs))
        return made[-1]

    def fold():
        return onnxfold.optimize(model, {"x": x}, fold_ratio=0.4, provider="cpu", latency=False, seed=0)

    monkeypatch.setattr("onnxfold.api.TensorMemo", tensor_memo)
    with_suffix = fold()
    assert len(made) == 1 and made[0].suffix_runs > 0 and made[0].nodes_skipped > 0
    monkeypatch.setattr("onnxfold.api.TensorMemo", lambda *a, **k: None)
    without = fold()
    assert with_suffix.report["layers"] == without.report["layers"]
    np.testing.assert_allclose(ort_run(with_suffix.model, {"x": x})[0], ort_run(without.model, {"x": x})[0],
                               rtol=0, atol=1e-5)


def test_a_stream_of_a_graph_input_alone_yields_every_batch():
    """A refit of the first layer streams the model's input itself: nothing to
    run, and nothing recorded to start from; every batch must still come."""
    model = build_mlp([5, 16, 3], seed=1)
    data = CalibrationSet({"x": random_input(model, batch=70, seed=2)})
    got = _stream(model, "x", data, StreamMemo(tensors=TensorMemo()))
    np.testing.assert_array_equal(got, data.arrays["x"])
