"""tools/bench_decide_scaling.py: its BENCHMARKS block from a small hand-written result (no benchmark run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from helpers import written_block  # noqa: E402
from bench_decide_scaling import BEGIN, END, main, write  # noqa: E402


def _row(n, calibration, decide, candidates):
    return {"calibration_samples": n, "calibration_s": calibration, "decide_s": decide, "wall_s": 1.0,
            "ratio": decide / calibration, "candidates": candidates, "parameters_ratio": 0.5, "status": "optimized",
            "chosen": {"lossless_linearity": True, "fold_ratios": {}, "linear_thresholds": {"layer0": 0.95}}}


def test_block_reports_the_ratio_per_size_and_its_range(tmp_path):
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "model": "mnist1d_mlp",
              "load_average_1min_after": 0.5,
              "rows": [_row(1000, 0.2, 0.6, 11), _row(8000, 1.6, 4.0, 12)], "previous": None}
    text, block = written_block(write, (BEGIN, END), result, tmp_path, "decide_scaling.json")
    assert "| 1000 | 0.20 | 0.60 | 3.00 | 11 | 0.500 | lossless_linearity True, linear_thresholds" in block
    assert "| 8000 | 1.60 | 4.00 | 2.50 | 12 |" in block
    assert "Over 8x the calibration samples, decide / calibration goes from 3.00 to 2.50" in block
    # (4.0 - 0.6) / (1.6 - 0.2): decide seconds per further calibration second
    assert "each further second of calibration brought 2.43 s of decide" in block
    # the empty knob is left out of the chosen setting
    assert "fold_ratios" not in block
    assert text.startswith("# Benchmarks\n")


def test_one_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["--sizes", "4000"])
    assert exc.value.code == 2


def test_a_run_with_before_gains_the_side_by_side_table(tmp_path):
    after = [_row(1000, 0.2, 0.6, 11), _row(8000, 1.6, 4.0, 12)]
    old = [_row(1000, 0.2, 0.7, 11), _row(8000, 1.6, 5.6, 12)]
    old[1]["chosen"] = {"lossless_linearity": False}
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "model": "mnist1d_mlp",
              "load_average_1min_after": 0.5, "rows": after, "before": {"commit": "abc1234", "rows": old},
              "previous": None}
    _text, block = written_block(write, (BEGIN, END), result, tmp_path, "decide_scaling.json")
    assert "`PYTHONPATH=. python tools/bench_decide_scaling.py --before DIR`" in block
    assert "Side by side with the onnxfold at abc1234" in block
    assert "| 1000 | 0.70 | 0.60 | 1.17 x | 3.50 | 3.00 | yes |" in block
    assert "| 8000 | 5.60 | 4.00 | 1.40 x | 3.50 | 2.50 | no |" in block
    # (5.6 - 0.7) / (1.6 - 0.2) before, (4.0 - 0.6) / (1.6 - 0.2) now
    assert "brought 3.50 s of decide before, 2.43 s now" in block


def test_a_run_without_before_has_no_side_by_side_table(tmp_path):
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "model": "mnist1d_mlp",
              "load_average_1min_after": 0.5, "rows": [_row(1000, 0.2, 0.6, 11), _row(8000, 1.6, 4.0, 12)],
              "previous": None}
    _text, block = written_block(write, (BEGIN, END), result, tmp_path, "decide_scaling.json")
    assert "Side by side" not in block and "--before" not in block
