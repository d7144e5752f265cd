"""tools/bench_decide_floor.py: the kernel timer's accounting (a scripted clock, no timing), its
hooks on the stage profiler, its BENCHMARKS block, and one real run that must hit the kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from helpers import written_block  # noqa: E402
from bench_decide_floor import (BEGIN, END, KERNELS, KernelClock, decide_clock,  # noqa: E402
                                innermost_stage_tracked, kernels_timed, summarize, write)

ROOT = Path(__file__).resolve().parent.parent


class ScriptedClock:
    """Returns the given readings in order."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def test_a_kernel_is_charged_only_for_the_time_not_spent_in_a_kernel_nested_in_it():
    clock = KernelClock(lambda: True, ScriptedClock(0.0, 1.0, 4.0, 10.0))
    inner = clock.timed("solves", lambda: "inner")
    outer = clock.timed("gram", lambda: inner())
    assert outer() == "inner"
    # outer ran 0 -> 10, inner 1 -> 4: the 3 s inside inner are inner's alone
    assert clock.seconds == {"solves": 3.0, "gram": 7.0}
    assert clock.calls == {"solves": 1, "gram": 1}


def test_calls_while_not_counting_are_neither_timed_nor_counted():
    counting = [False]
    clock = KernelClock(lambda: counting[0], ScriptedClock(5.0, 6.5))
    kernel = clock.timed("kmeans", lambda x: x + 1)
    assert kernel(1) == 2  # runs, uncounted (the scripted clock would run dry if it read it)
    counting[0] = True
    assert kernel(2) == 3
    assert clock.seconds == {"kmeans": 1.5} and clock.calls == {"kmeans": 1}


def test_a_kernel_that_raises_is_still_charged_and_leaves_the_stack_clean():
    clock = KernelClock(lambda: True, ScriptedClock(0.0, 2.0, 3.0, 3.5))

    def boom():
        raise ValueError("no")

    failing = clock.timed("solves", boom)
    with pytest.raises(ValueError):
        failing()
    clock.timed("gram", lambda: None)()
    assert clock.seconds == {"solves": 2.0, "gram": 0.5}


def test_only_the_decide_stage_counts_not_calibration_nested_in_it():
    from onnxfold.profile import StageProfiler

    target = SimpleNamespace(kernel=lambda: None)
    with innermost_stage_tracked() as innermost:
        clock = decide_clock(innermost)
        target.kernel = clock.timed("gram", target.kernel)
        with StageProfiler() as prof:
            target.kernel()  # no stage
            with prof.stage("decide"):
                target.kernel()
                with prof.stage("calibration"):
                    target.kernel()
                target.kernel()
            with prof.stage("verify"):
                target.kernel()
    assert clock.calls == {"gram": 2}


def test_kernels_timed_wraps_module_functions_and_methods_and_puts_them_back():
    from onnxfold.measure.stats import GramAccumulator

    eigh, update = np.linalg.eigh, GramAccumulator.__dict__["update"]
    clock = KernelClock(lambda: True)
    with kernels_timed(clock):
        assert np.linalg.eigh is not eigh
        acc = GramAccumulator(with_bias=True)
        acc.update(np.ones((4, 3)), np.ones((4, 2)))
        np.linalg.eigh(np.eye(3))
    assert np.linalg.eigh is eigh and GramAccumulator.__dict__["update"] is update
    assert clock.calls["gram"] == 1 and clock.calls["solves"] == 1
    assert acc.count == 4


def test_an_inherited_method_comes_back_inherited():
    class Base:
        def work(self):
            return "base"

    class Child(Base):
        pass

    sys.modules["_floor_probe"] = SimpleNamespace(Child=Child)
    try:
        clock = KernelClock(lambda: True)
        with kernels_timed(clock, (("gram", "probe", (("_floor_probe", "Child.work"),)),)):
            assert "work" in vars(Child) and Child().work() == "base"
        assert "work" not in vars(Child) and Child().work() == "base"
        assert clock.calls == {"gram": 1}
    finally:
        del sys.modules["_floor_probe"]


def test_a_kernel_that_no_longer_exists_is_a_clear_error():
    with pytest.raises(AttributeError, match="kernel numpy.linalg.no_such_thing not found"):
        with kernels_timed(KernelClock(lambda: True), (("solves", "x", (("numpy.linalg", "no_such_thing"),)),)):
            pass
    assert not hasattr(np.linalg, "no_such_thing")


def _run(calibration, decide, gram, solves=0.0, chosen="a"):
    keys = [key for key, _what, _targets in KERNELS]
    seconds = {k: 0.0 for k in keys}
    seconds.update(gram=gram, solves=solves)
    return {"calibration_s": calibration, "decide_s": decide, "candidates": 10, "kernels_s": seconds,
            "kernel_calls": {}, "chosen": {"fold_ratios": {"layer0": chosen}}}


def _block(tmp_path, rows, repeats):
    """(the whole BENCHMARKS.md, the block) of a result with ``rows``."""
    result = {"generated": "2026-01-02 03:04 UTC", "machine": "a test machine", "repeats": repeats, "rows": rows,
              "load_average_1min_after": 0.5, "previous": None}
    return written_block(write, (BEGIN, END), result, tmp_path, "decide_floor.json")


def test_the_block_reports_kernels_and_solves_against_calibration_and_the_room_left(tmp_path):
    rows = [summarize("over", [_run(1.0, 5.0, 1.0, 1.0), _run(1.0, 4.0, 0.5, 1.0), _run(2.0, 6.0, 1.0, 2.0)]),
            summarize("under", [_run(1.0, 3.0, 0.6, 0.2), _run(1.0, 3.0, 0.8, 0.4, chosen="b")])]
    text, block = _block(tmp_path, rows, repeats=3)
    # over: medians calibration 1.0, decide 5.0, gram 1.0, solves 1.0 (kernels 2.0); per run kernels /
    # calibration 2.0, 1.5, 1.5 and solves / calibration 1.0, 1.0, 1.0 (not over 1 in every repeat);
    # rest (5.0 - 2.0) / 10 candidates = 300 ms; room max(1.0 - 2.0, 0) = 0
    assert "| over | 10 | 1.000 | 5.000 | 2.000 | 1.000 | 1.000 | 0.000 |" in block
    assert "| 1.50 (1.50-2.00) | 1.00 (1.00-1.00) | 300.0 | 0.00 | 5.00 |" in block
    # under: medians gram 0.7, solves 0.3: kernels 1.0; ratios 0.8 and 1.2: not over in every repeat
    assert "| under | 10 | 1.000 | 3.000 | 1.000 | 0.700 | 0.300 |" in block
    assert "| 1.00 (0.80-1.20) | 0.30 (0.20-0.40) | 200.0 | 0.00 | 3.00 |" in block
    assert "exceed the calibration stage in every repeat on 1 of 2 models (over): there" in block
    assert "residuals alone exceed it in every repeat on 0 of 2. They" in block
    assert "Settings chosen: the same in every repeat on all but under." in block
    assert json.loads((tmp_path / "decide_floor.json").read_text())["rows"][0]["model"] == "over"
    assert text.startswith("# Benchmarks\n")


def test_solves_over_calibration_in_every_repeat_are_named(tmp_path):
    _text, block = _block(tmp_path, [summarize("heavy", [_run(1.0, 5.0, 0.5, 1.2), _run(1.0, 5.0, 0.5, 1.1)])],
                          repeats=2)
    assert "| 1.65 (1.60-1.70) | 1.15 (1.10-1.20) |" in block
    assert "residuals alone exceed it in every repeat on 1 of 1 (heavy)." in block


@pytest.mark.skipif(not (ROOT / "models" / "digits_seq_mlp.onnx").exists(), reason="shipped model missing")
def test_a_real_run_hits_the_kernels_and_charges_no_more_than_the_decide_stage(tmp_path):
    models = ROOT / "models"
    out, report = tmp_path / "kernels.json", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_decide_floor.py"), "--run-one", str(out), "--",
         str(models / "digits_seq_mlp.onnx"), "-o", str(tmp_path / "out.onnx"),
         "--calib", str(models / "digits_seq_mlp.calib.npz"), "--eval", str(models / "digits_seq_mlp.test.npz"),
         "--report", str(report), "--no-latency", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    timed, rep = json.loads(out.read_text()), json.loads(report.read_text())
    # a budget search on an MLP folds (k-means), refits (Gram products, solves) and bounds intervals
    for key in ("gram", "solves", "ridge", "kmeans", "intervals"):
        assert timed["calls"].get(key, 0) > 0, key
    assert "patches" not in timed["calls"]  # no conv in this model
    assert 0 < sum(timed["seconds"].values()) <= rep["timings_s"]["decide"]
