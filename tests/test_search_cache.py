"""The budget search's shared cache: a candidate's model does not depend on
which candidates were evaluated before it."""

from pathlib import Path

import numpy as np
import onnx

from onnxfold.decide.budget import Budget
from onnxfold.measure.data import load_calibration
from onnxfold.passes.base import PassContext
from onnxfold.search import BudgetSearch, Setting

MODELS = Path(__file__).resolve().parent.parent / "models"


def _search(model, fit, select) -> BudgetSearch:
    return BudgetSearch(model, Budget.default(), PassContext(calibration=fit, heldout=select))


def test_candidates_equal_their_fresh_evaluation():
    model = onnx.load(MODELS / "digits_mlp.onnx")
    data = load_calibration(str(MODELS / "digits_mlp.calib.npz"), model)
    fit, select = data.split((0.75, 0.25), seed=0)
    layers = ("layer0", "layer1", "layer2")
    uniform = Setting.of({(n, "ratio"): 2 for n in layers})
    # each differs from the one before in one layer: later ones reuse the earlier layers' refits
    settings = [Setting(), uniform, uniform.with_step("layer2", "ratio", 4), uniform.with_step("layer1", "ratio", 4),
                uniform.with_step("layer0", "ratio", 4), Setting.of({("layer1", "threshold"): 4}),
                Setting.of({("layer1", "threshold"): 4, ("layer2", "ratio"): 3})]
    shared = _search(model, fit, select)
    for s in settings:
        got = shared.evaluate(s)
        fresh = _search(model, fit, select)
        want = fresh.evaluate(s)
        assert shared.model_for(got).SerializeToString() == fresh.model_for(want).SerializeToString(), s
        assert (got.parameters, got.met, got.spent) == (want.parameters, want.met, want.spent)
    cache = shared.ctx.cache
    assert cache.hits > 0  # the sharing happened
    assert cache.misses > 0 and np.isfinite(cache.bytes)


def test_passes_never_stream_the_split_that_judges_the_candidates(monkeypatch):
    """The select split judges every candidate; a ridge strength chosen on it
    would make the refit candidates look better there than on fresh data (the
    final check then rejects the search's winner). The passes hold out a share
    of the fit split instead."""
    from onnxfold.passes import refit

    model = onnx.load(MODELS / "digits_mlp.onnx")
    data = load_calibration(str(MODELS / "digits_mlp.calib.npz"), model)
    fit, select = data.split((0.75, 0.25), seed=0)
    streamed = []
    grams = refit.RefitEngine._grams

    def spy(self, rows, data, held_samples, task):
        streamed.append((data, held_samples))
        return grams(self, rows, data, held_samples, task)

    monkeypatch.setattr(refit.RefitEngine, "_grams", spy)
    search = _search(model, fit, select)
    cand = search.evaluate(Setting.of({("layer1", "ratio"): 4}))
    assert cand.comparison  # judged
    assert streamed, "the ls refit ran"
    assert all(d is fit for d, _ in streamed)
    # the ridge strength is chosen on a held-out share of the fit split
    assert all(h is not None and 0 < h.sum() < fit.num_samples for _, h in streamed)


def test_reused_sessions_give_the_fresh_metrics(monkeypatch):
    """Candidates judged with onnxruntime sessions reused across candidates
    (identical model parts) measure exactly what fresh sessions measure."""
    from onnxfold.measure import jobs

    # the original's parts would be replayed from the stream memo instead of run again, and the
    # candidates' own runs would start from recorded tensors (measure.suffix): parts of other bytes
    monkeypatch.setattr(jobs, "STREAM_MEMO_BYTES", 0)
    monkeypatch.setattr("onnxfold.passes.cache.TensorMemo", lambda *a, **k: None)
    monkeypatch.setattr("onnxfold.search.TensorMemo", lambda *a, **k: None)
    model = onnx.load(MODELS / "digits_mlp.onnx")
    data = load_calibration(str(MODELS / "digits_mlp.calib.npz"), model)
    fit, select = data.split((0.75, 0.25), seed=0)
    uniform = Setting.of({(n, "ratio"): 2 for n in ("layer0", "layer1", "layer2")})
    settings = [Setting(), uniform, uniform.with_step("layer2", "ratio", 4)]
    shared = _search(model, fit, select)
    for s in settings:
        got = shared.evaluate(s)
        fresh = _search(model, fit, select)
        fresh.sessions.max_sessions = 0  # every session built anew
        want = fresh.evaluate(s)
        assert fresh.sessions.hits == 0
        assert got.comparison == want.comparison, s
        assert shared.model_for(got).SerializeToString() == fresh.model_for(want).SerializeToString(), s
    assert shared.sessions.hits > 0  # the reuse happened
