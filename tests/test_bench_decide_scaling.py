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
