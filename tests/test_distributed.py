"""Statistics backends without Ray: shards merge to the one-pass numbers, data
comes in .npz shards, and ``--ray`` without Ray installed is a one-line error.
(The Ray backend itself: tests/test_ray.py.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import build_mlp, ort_run, with_outputs
from onnxfold.cli import main
from onnxfold.distributed import LocalStats, StatsJob, merge_accumulators, run_stats_job
from onnxfold.errors import CalibrationDataError
from onnxfold.find.activations import ActivationSpec
from onnxfold.measure.data import load_calibration
from onnxfold.measure.stats import GramAccumulator, NeuronStats

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def _model_and_data(n=203, seed=5):
    model = build_mlp([6, 10, 4], "relu", seed=3)
    x = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    return model, x


def _job(model, seen=None):
    def init():
        return {"z": NeuronStats(ActivationSpec("relu"), 10), "gram": GramAccumulator(with_bias=False)}

    def update(accs, start, feed, _labels, tensors):
        if seen is not None:
            seen.append((start, feed["x"].shape[0]))
        accs["z"].update(tensors[0]["h0.pre"])
        accs["gram"].update(tensors[0]["h0.pre"])

    return StatsJob([(model, ["h0.pre"])], init, update)


def test_merged_shards_equal_one_pass_and_numpy():
    model, x = _model_and_data()
    data = load_calibration({"x": x}, model)
    whole = LocalStats().reduce(_job(model), data, batch_size=32, providers=["CPUExecutionProvider"])

    seen = []
    merged = None
    for a, b in ((0, 64), (64, 150), (150, 203)):  # uneven, and not on batch boundaries
        part = run_stats_job(_job(model, seen), data.subset(slice(a, b)), batch_size=32,
                             providers=["CPUExecutionProvider"], first_sample=a)
        merged = part if merged is None else merge_accumulators(merged, part)
    # every sample is seen once, each batch told where it starts in the whole set
    starts = sorted(seen)
    assert starts[0][0] == 0 and all(s + c == t for (s, c), (t, _) in zip(starts, starts[1:]))
    assert starts[-1][0] + starts[-1][1] == 203

    z = ort_run(with_outputs(model, ["h0.pre"]), {"x": x}, ["h0.pre"])[0].astype(np.float64)
    for got in (whole, merged):
        st, g = got["z"], got["gram"]
        assert st.count == g.count == 203
        np.testing.assert_array_equal(st.active_count, (z > 0).sum(axis=0))
        np.testing.assert_array_equal(st.min_z, z.min(axis=0))
        np.testing.assert_allclose(st.mean_z, z.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.var_z, z.var(axis=0), rtol=1e-10)
        np.testing.assert_allclose(g.XtX, z.T @ z, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(st.mean_a, np.maximum(z, 0).mean(axis=0), rtol=1e-12, atol=1e-12)
    # merged shards = one pass, to float64 rounding
    np.testing.assert_allclose(merged["z"].m2_z, whole["z"].m2_z, rtol=1e-10)
    np.testing.assert_allclose(merged["gram"].sxx, whole["gram"].sxx, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(merged["z"].piece_counts, whole["z"].piece_counts)


def test_npz_shard_directory_is_concatenated_and_a_bad_shard_is_named(tmp_path):
    model, x = _model_and_data(n=30)
    labels = np.arange(30) % 4
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate(((0, 10), (10, 25), (25, 30))):
        np.savez(shards / f"part-{i:03d}.npz", x=x[a:b], labels=labels[a:b])
    data = load_calibration(shards, model)
    np.testing.assert_array_equal(data.arrays["x"], x)
    np.testing.assert_array_equal(data.labels, labels)

    np.savez(shards / "part-003.npz", inp=x[:5], labels=labels[:5])  # wrong input name
    with pytest.raises(CalibrationDataError) as e:
        load_calibration(shards, model)
    assert "part-003.npz" in str(e.value) and "missing input 'x'" in str(e.value) and "\n" not in str(e.value)
    np.savez(shards / "part-003.npz", x=x[:5, :5], labels=labels[:5])  # wrong shape
    with pytest.raises(CalibrationDataError, match="part-003.npz"):
        load_calibration(shards, model)


def test_stream_with_a_misnamed_input_says_which_name_is_missing():
    from onnxfold.measure.data import CalibrationSet

    model, x = _model_and_data(n=8)
    job = _job(model)
    with pytest.raises(CalibrationDataError, match="has no input 'x' \\(has: 'inp'\\)"):
        LocalStats().reduce(job, CalibrationSet({"inp": x}), batch_size=4, providers=["CPUExecutionProvider"])


def test_ray_option_without_ray_installed_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(tmp_path / "digits_mlp.onnx"), "-o", str(out), "--ray", "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'onnxfold[ray]'" in err
    assert not out.exists()


def test_an_unreachable_ray_address_is_one_line_and_exit_2_not_a_hang(tmp_path, capsys):
    pytest.importorskip("ray")
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(tmp_path / "digits_mlp.onnx"), "-o", str(out), "--ray", "127.0.0.1:1",
                 "--provider", "cpu"]) == 2  # port 1: nothing listens there
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach the Ray cluster at '127.0.0.1:1'" in err
    assert not out.exists()


def test_importing_onnxfold_does_not_import_ray():
    code = ("import sys, onnxfold, onnxfold.api, onnxfold.cli, onnxfold.distributed; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode == 0
