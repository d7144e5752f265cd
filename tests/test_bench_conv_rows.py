"""tools/bench_conv_rows.py: the cap it sweeps is the one a conv refit obeys,
and its results file reports what its result holds (no benchmark run)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from bench_conv_rows import render  # noqa: E402
from test_channel_folding import _ctx, _x, chain_model  # noqa: E402

from onnxfold.measure import stats  # noqa: E402
from onnxfold.passes import handlers  # noqa: E402
from onnxfold.passes.channel_folding import ChannelFoldingPass  # noqa: E402


def _refit_rows(monkeypatch, cap: int) -> list[int]:
    """Rows of every Gram update a conv fold's least-squares refit makes, with ``cap``."""
    rows = []
    update = stats.GramAccumulator.update

    def counting(self, X, Y=None, weights=None, **kw):
        rows.append(np.asarray(X).shape[0])
        return update(self, X, Y, weights, **kw)

    monkeypatch.setattr(stats.GramAccumulator, "update", counting)
    monkeypatch.setattr(handlers, "MAX_ROWS_PER_BATCH", cap)
    res = ChannelFoldingPass(0.5, repair="ls")(chain_model(n=12, bn=True, seed=8), _ctx(_x(48, seed=2)))
    assert res.layers[0].note.startswith("ls:")
    return rows


def test_a_conv_refit_takes_at_most_the_cap_of_patch_rows_per_batch(monkeypatch):
    # batches of 16 samples x 81 output positions: about 1300 patch rows, split into fit and held-out rows
    free = _refit_rows(monkeypatch, 10**6)
    assert max(free) > 100
    capped = _refit_rows(monkeypatch, 100)
    assert capped and max(capped) <= 100 and sum(capped) < sum(free)


def _search(cap, decide, chosen):
    return {"exit_code": 0, "wall_s": 20.0, "status": "optimized", "calibration_s": 1.25, "decide_s": decide,
            "candidates": 11, "chosen": chosen, "parameters_ratio": 0.963, "final_agreement": 1.0,
            "final_accuracy": 0.973, "final_samples": 1000}


def _folds(accs):
    return [{"target_sparsity": s, "ratio": r, "select": sel, "test_acc": a, "agreement": 0.99, "seconds": 2.0,
             "test_samples": 1000}
            for (s, r, sel), a in zip([(0.25, 0.25, "kmeans"), (0.25, 0.25, "magnitude")], accs)]


def test_render_reports_each_cap_and_compares_with_the_first():
    chosen = {"lossless_linearity": True, "fold_ratios": {"conv2": 0.1}, "heads_kept": {}, "fold_select": "kmeans"}
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "total_seconds": 100.0,
              "checks": ["CHECK every search met its budget on the final check: PASS"],
              "runs": [{"cap": 8192, "search": _search(8192, 12.5, chosen), "folds": _folds([0.971, 0.975])},
                       {"cap": 2048, "search": _search(2048, 5.0, {**chosen, "fold_ratios": {"conv2": 0.25}}),
                        "folds": _folds([0.969, 0.976])}]}
    md = render(result)
    assert "| 8192 | 12.50 | 1.25 | 10.00 | 11 | 0.963 |" in md
    assert "| 2048 | 5.00 | 1.25 | 4.00 | 11 | 0.963 |" in md
    assert "| 25% | 0.250 | kmeans | 97.10% / 99.00% (2.0) | 96.90% / 99.00% (2.0) |" in md
    assert "- cap 2048: decide 2.50x as fast; the search chose another setting; fold test accuracy -0.2 to " \
           "+0.1 pp (worst to best row)." in md
    assert "The test split has 1000 samples: 0.1 pp is one sample." in md
    assert "CHECK every search met its budget on the final check: PASS" in md
