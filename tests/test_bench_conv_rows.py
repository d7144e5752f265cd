"""tools/bench_conv_rows.py: the cap it sweeps is the one a conv refit obeys,
and its results file reports what its result holds (no benchmark run)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from bench_conv_rows import flatten, render  # noqa: E402
from test_channel_folding import _ctx, _x, chain_model  # noqa: E402

from onnxfold.measure import stats  # noqa: E402
from onnxfold.passes import handlers  # noqa: E402
from onnxfold.passes.channel_folding import ChannelFoldingPass  # noqa: E402


def _refit_rows(monkeypatch, cap: int) -> list[int]:
    """Rows of every batch a conv fold's least-squares refit hands its Grams, with ``cap``
    (they reach the Gram itself in chunks of several batches: RowChunks)."""
    rows = []
    update = stats.RowChunks.update

    def counting(self, X, *args, **kw):
        rows.append(np.asarray(X).shape[0])
        return update(self, X, *args, **kw)

    monkeypatch.setattr(stats.RowChunks, "update", counting)
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


def _search(seed, decide, chosen, ratio=0.963):
    return {"seed": seed, "exit_code": 0, "wall_s": 20.0, "status": "optimized", "calibration_s": 1.25,
            "decide_s": decide, "candidates": 11, "chosen": chosen, "parameters_ratio": ratio,
            "final_agreement": 1.0, "final_accuracy": 0.973, "final_samples": 1000}


def _fallback(seed, decide, chosen):
    return {**_search(seed, decide, chosen, ratio=1.0), "status": "final_check_failed", "final_agreement": None,
            "final_accuracy": None, "fallback_from_ratio": 0.311,
            "fallback_failures": ["logits: disagreement 0.3% observed"], "fallback_returned": "original"}


def _folds(accs):
    return [{"target_sparsity": s, "ratio": r, "select": sel, "test_acc": a, "agreement": 0.99, "seconds": 2.0,
             "test_samples": 1000}
            for (s, r, sel), a in zip([(0.25, 0.25, "kmeans"), (0.25, 0.25, "magnitude")], accs)]


CHOSEN = {"lossless_linearity": True, "fold_ratios": {"conv2": 0.1}, "fold_select": "kmeans"}
OTHER = {**CHOSEN, "fold_ratios": {"conv2": 0.25}}


def test_render_reports_each_model_and_cap_and_compares_with_the_first_cap():
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "total_seconds": 100.0,
              "default_cap": 2048, "checks": ["CHECK every search finished: PASS"],
              "runs": [{"cap": 8192, "model": "mnist_resnet", "folds": _folds([0.971, 0.975]),
                        "searches": [_search(0, 12.0, CHOSEN), _search(1, 13.0, CHOSEN), _search(2, 14.0, CHOSEN)]},
                       {"cap": 2048, "model": "mnist_resnet", "folds": _folds([0.969, 0.976]),
                        "searches": [_search(0, 5.0, OTHER, 0.914), _search(1, 6.0, CHOSEN),
                                     _fallback(2, 7.0, OTHER)]},
                       {"cap": 8192, "model": "mnist_cnn", "folds": _folds([0.940, 0.930]),
                        "searches": [_search(0, 8.0, CHOSEN)]},
                       {"cap": 2048, "model": "mnist_cnn", "folds": _folds([0.945, 0.925]),
                        "searches": [_search(0, 2.0, CHOSEN)]}]}
    md = render(result)
    resnet, cnn = md.split("## mnist_resnet")[1].split("## mnist_cnn")
    assert "`models/mnist_resnet.onnx` with" in resnet and "built by this script" in cnn
    assert "seeds 0, 1, 2:" in resnet
    # medians over seeds: decide 13 and 6 s, decide / calibration 10.4 and 4.8
    assert "| 8192 | 13.00 | 1.25 | 10.40 | 11 | 0.963 · 0.963 · 0.963 | 0 of 3 | 1.0000 |" in resnet
    assert "| 2048 | 6.00 | 1.25 | 4.80 | 11 | 0.914 · 0.963 · 1.000 (fell back) | 1 of 3 | 1.0000 |" in resnet
    assert "| 2048 | 2 | 7.00 | 11 | lossless_linearity True, fold_ratios {'conv2': 0.25}, fold_select kmeans | " \
           "1.000 | — | — | final_check_failed: the chosen model (ratio 0.311) failed the final check " \
           "(logits: disagreement 0.3% observed); the original model was written |" in resnet
    assert "| 25% | 0.250 | kmeans | 97.10% / 99.00% (2.0) | 96.90% / 99.00% (2.0) |" in resnet
    assert "- cap 2048: decide 2.17x as fast (medians); the search chose the same setting with 1 of 3 seeds and " \
           "fell back with 1 (against 0); fold test accuracy -0.2 to +0.1 pp (worst to best row)." in resnet
    assert "| 2048 | 2.00 | 1.25 | 1.60 | 11 | 0.963 | 0 of 1 | 1.0000 |" in cnn
    assert "- cap 2048: decide 4.00x as fast (medians); the search chose the same setting with 1 of 1 seeds and " \
           "fell back with 0 (against 0); fold test accuracy -0.5 to +0.5 pp (worst to best row)." in cnn
    assert "onnxfold's default when this ran: 2048" in md
    assert "The test split has 1000 samples: 0.1 pp is one sample." in md
    assert "CHECK every search finished: PASS" in md


def test_flatten_reads_a_results_file_from_before_the_second_model_and_the_seeds():
    old = {"runs": [{"cap": 8192, "search": _search(0, 12.5, None), "folds": _folds([0.971, 0.975])}]}
    rows = flatten(old)
    assert rows["mnist_resnet cap 8192 search seed 0"] == {"final_agreement": 1.0, "parameters_ratio": 0.963}
    assert rows["mnist_resnet cap 8192 s=0.25 kmeans+ls"]["test_acc"] == 0.971
    old["runs"][0]["search"].pop("seed")
    assert flatten(old) == rows
