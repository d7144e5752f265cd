"""Refits shared across the candidates of a budget search.

A transformer pass folds its blocks one after another and refits each;
candidates that fold the same blocks the same way up to a refit share it
through the search cache (keyed by the pass's input model, its settings and
the blocks folded so far), and a candidate that folded an earlier block
otherwise refits again. Either way the model must be the one a run without
the cache gives, up to the rounding of the cache's suffix runs
(docs/methods.md section 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ort_run

from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.cache import SearchCache
from onnxfold.passes.head_folding import GatedFoldingPass, HeadFoldingPass

MODELS = Path(__file__).resolve().parents[1] / "models"


def _decoder(name: str):
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    with np.load(MODELS / f"{name}.calib.npz") as f:
        ids = f["input_ids"]
    return model, ids[:48], ids[-8:]


@pytest.mark.parametrize("make, name, first, again, other", [
    (lambda r: HeadFoldingPass(r, repair="ls"), "llama_mha", {"attn0": 2}, {"attn0": 2, "attn1": 3},
     {"attn0": 3, "attn1": 3}),
    (lambda r: GatedFoldingPass(r, repair="ls"), "llama_gqa", {"glu0": 0.5}, {"glu0": 0.5, "glu1": 0.25},
     {"glu0": 0.25, "glu1": 0.25}),
])
def test_a_refit_is_shared_by_candidates_that_folded_alike_up_to_it(make, name, first, again, other):
    model, ids, test_ids = _decoder(name)
    cache = SearchCache()
    ctx = PassContext(calibration=CalibrationSet({"input_ids": ids}), batch_size=16, cache=cache)
    make(first)(model, ctx)
    for ratios, shared in ((again, 1), (other, 0)):  # the first block folded alike, then otherwise
        hits, misses = cache.hits, cache.misses
        got = make(ratios)(model, ctx).model
        assert (cache.hits - hits, cache.misses - misses) == (shared, 2 - shared)
        fresh = make(ratios)(model, PassContext(calibration=CalibrationSet({"input_ids": ids}), batch_size=16))
        want = ort_run(fresh.model, {"input_ids": test_ids})[0]
        np.testing.assert_allclose(ort_run(got, {"input_ids": test_ids})[0], want, rtol=0,
                                   atol=1e-5 * np.abs(want).max())
