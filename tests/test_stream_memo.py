"""Replaying the original model's streams in a budget search (``measure.jobs.StreamMemo``).

Every candidate's refit reads its targets from the original model, run again
on the same data each time; the memo records that stream once and replays it.
A replay must give exactly what a fresh run gives, and never more memory than
it is allowed."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import onnxfold
from helpers import build_mlp, ort_run, random_input
from onnxfold.decide.budget import Budget
from onnxfold.errors import UsageError
from onnxfold.measure import jobs
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.jobs import StatsJob, StreamMemo, run_stats_job
from onnxfold.measure.stream import needed_part


class _Sums:
    def __init__(self):
        self.total = 0.0
        self.rows = 0

    def merge(self, other):
        self.total += other.total
        self.rows += other.rows
        return self


def _new() -> dict:
    return {"s": _Sums()}


def _add(name: str, accs, _start, _feed, _labels, tensors) -> None:
    v = np.asarray(tensors[-1][name], dtype=np.float64)
    accs["s"].total += float(np.sum(v * np.arange(1, v.shape[-1] + 1)))
    accs["s"].rows += v.shape[0]


def _job(model, name, update=None):
    part = needed_part(model, {name: np.float32})
    return StatsJob([(part, [name]), (part, [name])], _new, update or partial(_add, name), replayable=(1,))


def _setup():
    model = build_mlp([5, 16, 3], seed=1)
    data = CalibrationSet({"x": random_input(model, batch=70, seed=2)})
    hidden = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    return model, data, hidden


def test_a_replayed_stream_gives_what_a_fresh_run_gives(monkeypatch):
    model, data, hidden = _setup()
    fresh = run_stats_job(_job(model, hidden), data, batch_size=32, providers=None)["s"]
    memo = StreamMemo()
    first = run_stats_job(_job(model, hidden), data, batch_size=32, providers=None, memo=memo)["s"]
    assert memo.replays == 0 and memo.bytes == 70 * 16 * 4
    runs = []
    real = jobs.stream_tensors
    monkeypatch.setattr(jobs, "stream_tensors", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
    # a new model object with the same content: the same stream (the key is the content, not the object)
    again = run_stats_job(_job(build_mlp([5, 16, 3], seed=1), hidden), data, batch_size=32, providers=None,
                          memo=memo)["s"]
    assert memo.replays == 1 and len(runs) == 1  # only the model that is not replayable ran
    assert fresh.rows == first.rows == again.rows == 70
    assert fresh.total == first.total == again.total
    # other batching, other data or another model: not the same stream
    run_stats_job(_job(model, hidden), data, batch_size=16, providers=None, memo=memo)
    run_stats_job(_job(model, hidden), data.subset(np.arange(40)), batch_size=32, providers=None, memo=memo)
    run_stats_job(_job(build_mlp([5, 16, 3], seed=9), hidden), data, batch_size=32, providers=None, memo=memo)
    assert memo.replays == 1


def test_a_keyed_model_is_neither_built_nor_digested_when_its_stream_replays(monkeypatch):
    """The search's original parts come as KeyedModels whose key is the digest the
    search computed once: a replay needs neither the part nor a digest of it, and
    the key is the content's own, so it replays a stream a plain part recorded."""
    from onnxfold.measure.jobs import KeyedModel
    from onnxfold.measure.stream import model_digest

    model, data, hidden = _setup()
    part = needed_part(model, {hidden: np.float32})
    memo = StreamMemo()
    first = run_stats_job(_job(model, hidden), data, batch_size=32, providers=None, memo=memo)["s"]
    built = []
    keyed = KeyedModel(lambda: built.append(1) or part, model_digest(part))
    monkeypatch.setattr(jobs, "model_digest", lambda m: pytest.fail("digested a keyed model"))
    job = StatsJob([(part, [hidden]), (keyed, [hidden])], _new, partial(_add, hidden), replayable=(1,))
    again = run_stats_job(job, data, batch_size=32, providers=None, memo=memo)["s"]
    assert memo.replays == 1 and not built and again.total == first.total
    # not recorded yet (other batching): built once, to run
    run_stats_job(StatsJob([(part, [hidden]), (keyed, [hidden])], _new, partial(_add, hidden), replayable=(1,)),
                  data, batch_size=16, providers=None, memo=memo)
    assert built == [1]


def test_a_stream_over_half_the_memo_is_not_recorded_and_old_ones_make_room():
    model, data, hidden = _setup()
    one = 70 * 16 * 4
    memo = StreamMemo(max_bytes=2 * one - 1)  # half of it is less than one stream
    run_stats_job(_job(model, hidden), data, batch_size=32, providers=None, memo=memo)
    assert memo.bytes == 0
    memo = StreamMemo(max_bytes=2 * one)
    run_stats_job(_job(model, hidden), data, batch_size=32, providers=None, memo=memo)
    run_stats_job(_job(model, hidden), data, batch_size=16, providers=None, memo=memo)
    run_stats_job(_job(model, hidden), data, batch_size=8, providers=None, memo=memo)
    assert memo.bytes == 2 * one  # the first recorded went
    run_stats_job(_job(model, hidden), data, batch_size=32, providers=None, memo=memo)
    assert memo.replays == 0


def test_an_update_cannot_change_a_recorded_tensor_in_place():
    model, data, hidden = _setup()

    def scale_in_place(accs, start, feed, labels, tensors):
        tensors[-1][hidden] *= 2.0

    memo = StreamMemo()
    with pytest.raises(ValueError, match="read-only"):
        run_stats_job(_job(model, hidden, scale_in_place), data, batch_size=32, providers=None, memo=memo)
    assert memo.bytes == 0  # a run that failed records nothing


def test_budget_search_replays_the_original_and_chooses_as_without_the_memo(monkeypatch):
    model = build_mlp([8, 32, 32, 4], "relu", seed=3)
    x = random_input(model, batch=600, seed=4)
    kwargs = dict(budget=Budget(max_error=0.05), provider="cpu", latency=False, max_evaluations=10, seed=0,
                  fold_repair="ls", fold_select="obs")
    replays = []
    real_get = StreamMemo.get

    def counting_get(self, key):
        got = real_get(self, key)
        replays.append(got is not None)
        return got

    monkeypatch.setattr(StreamMemo, "get", counting_get)
    with_memo = onnxfold.optimize(model, CalibrationSet({"x": x}), **kwargs)
    assert any(replays), "the search never replayed the original's stream"
    replays.clear()
    without = onnxfold.optimize(model, CalibrationSet({"x": x}), **kwargs, memo_mib=0)  # nothing fits: every stream runs
    assert not any(replays)
    assert with_memo.report["search"]["chosen"] == without.report["search"]["chosen"]
    assert [e["setting"] for e in with_memo.report["search"]["evaluated"]] == \
        [e["setting"] for e in without.report["search"]["evaluated"]]
    feed = {"x": random_input(model, batch=9, seed=8)}
    np.testing.assert_array_equal(ort_run(with_memo.model, feed)[0], ort_run(without.model, feed)[0])


def _memos(monkeypatch) -> list:
    """Every StreamMemo and TensorMemo made from now on."""
    from onnxfold.measure import suffix

    made = []
    for cls in (StreamMemo, suffix.TensorMemo):
        init = cls.__init__

        def spy(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", spy)
    return made


@pytest.mark.parametrize("memo_mib", [None, 0])
def test_memo_mib_bounds_what_the_memos_keep_and_changes_no_result(monkeypatch, memo_mib):
    model = build_mlp([6, 32, 24, 3], seed=3)
    x = random_input(model, batch=600, seed=4)
    baseline = onnxfold.optimize(model, {"x": x}, fold_ratio=0.5, fold_repair="ls", provider="cpu", latency=False)
    made = _memos(monkeypatch)
    res = onnxfold.optimize(model, {"x": x}, fold_ratio=0.5, fold_repair="ls", provider="cpu", latency=False,
                            memo_mib=memo_mib)
    assert made, "the run made no memo"
    limit = (1 << 30) if memo_mib is None else 0
    assert all(m.max_bytes == limit for m in made)
    kept = sum(m.bytes for m in made)
    if memo_mib == 0:
        assert kept == 0  # nothing recorded: working memory flat in the samples
    else:
        assert kept > 0  # the default memos do record (else this test could not tell the two apart)
    probe = random_input(model, batch=64, seed=5)
    np.testing.assert_allclose(ort_run(res.model, {"x": probe})[0], ort_run(baseline.model, {"x": probe})[0],
                               rtol=1e-5, atol=1e-6)


def test_memo_mib_must_be_a_whole_number_of_mib():
    model = build_mlp([4, 8, 2], seed=1)
    x = random_input(model, batch=32, seed=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="memo size"):
            onnxfold.optimize(model, {"x": x}, fold_ratio=0.5, provider="cpu", memo_mib=bad)


def test_a_replayed_stream_reads_none_of_its_inputs():
    """Replaying needs the recorded tensors, not the data: the subset's rows
    stay ungathered (a gathered batch keeps what it read in ``_got``)."""
    model, data, hidden = _setup()
    part = data.subset(np.arange(3, 70, 2))
    feeds = []

    def update(accs, start, feed, labels, tensors):
        feeds.append(feed)
        _add(hidden, accs, start, feed, labels, tensors)

    def job():
        return StatsJob([(needed_part(model, {hidden: np.float32}), [hidden])], _new, update, replayable=(0,))

    memo = StreamMemo()
    first = run_stats_job(job(), part, batch_size=8, providers=None, memo=memo)["s"]
    assert memo.replays == 0 and feeds and all(f._got for f in feeds)  # the run fed its input
    feeds.clear()
    again = run_stats_job(job(), part, batch_size=8, providers=None, memo=memo)["s"]
    assert memo.replays == 1 and len(feeds) == 5 and not any(f._got for f in feeds)
    assert (first.rows, first.total) == (again.rows, again.total)
