"""The Ray backend on a local Ray instance (2 CPUs, started once for the module):
the same result as one process, a killed worker retried, bad shards one clear
error. Kept few: starting Ray and its workers costs seconds."""

import functools
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import onnxfold  # noqa: E402
from helpers import build_mlp, ort_run  # noqa: E402
from onnxfold.cli import main  # noqa: E402
from onnxfold.distributed import LocalStats, RayStats, StatsJob  # noqa: E402
from onnxfold.errors import CalibrationDataError  # noqa: E402
from onnxfold.find.activations import ActivationSpec  # noqa: E402
from onnxfold.measure.data import CalibrationSet, load_calibration  # noqa: E402
from onnxfold.measure.stats import GramAccumulator, NeuronStats  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
CPU = ["CPUExecutionProvider"]

# the workers cannot import this test module: ship its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # one declared GPU (no real one here): the GPU wiring is checked without CUDA
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture()
def digits(tmp_path):
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"digits_mlp{suffix}", tmp_path / f"digits_mlp{suffix}")
    return tmp_path / "digits_mlp.onnx"


@pytest.mark.parametrize("model, settings", [
    ("digits_mlp", dict(fold_ratio=0.5, batch_size=64)),  # linearity + folding with least-squares refits, 4 shards
    ("cancer_mlp_paper", dict(max_evaluations=18, batch_size=256)),  # budget search down to its per-layer step
], ids=["fixed", "search"])
def test_ray_gives_the_single_process_result(tmp_path, monkeypatch, model, settings):
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(MODELS / f"{model}{suffix}", tmp_path / f"{model}{suffix}")
    path = tmp_path / f"{model}.onnx"
    tasks, map_tasks = [], RayStats.map_tasks

    def counted_map_tasks(self, fn, items, progress=None):
        tasks.extend(items)
        return map_tasks(self, fn, items, progress)

    monkeypatch.setattr(RayStats, "map_tasks", counted_map_tasks)
    common = dict(eval_data=path.with_suffix(".test.npz"), provider="cpu", seed=3, latency=False, **settings)
    single = onnxfold.optimize(path, path.with_suffix(".calib.npz"), **common)
    on_ray = onnxfold.optimize(path, path.with_suffix(".calib.npz"), ray_address="local", **common)
    assert "calibration statistics computed by 2 Ray workers" in on_ray.report["notes"]
    if "max_evaluations" in settings:  # the per-layer step's candidates were judged by Ray tasks
        assert len(tasks) >= 2
    assert single.changed and on_ray.changed
    assert on_ray.report["settings"] == single.report["settings"]
    assert on_ray.report["search"] == single.report["search"]  # same candidates, same choice
    assert [lr.to_dict() for lr in on_ray.layers] == [lr.to_dict() for lr in single.layers]
    assert on_ray.report["after"]["parameters"] == single.report["after"]["parameters"]
    x = np.load(path.with_suffix(".test.npz"))["input"]
    (y_single,), (y_ray,) = ort_run(single.model, {"input": x}), ort_run(on_ray.model, {"input": x})
    np.testing.assert_allclose(y_ray, y_single, rtol=0, atol=1e-5)


def test_the_blocks_of_a_transformer_cluster_side_by_side_as_ray_tasks(monkeypatch):
    """Data-free folding of a LLaMA-class decoder: every gated MLP's and every
    attention block's k-means runs as a Ray task, ahead of the block-by-block
    rewrite (a block's fold rewrites only its own projections); the driver
    clusters nothing itself, and the model is the one-process model, byte for
    byte. The answers are memoised as the driver's own would be."""
    import onnxfold.decide.folding as decide

    tasks, map_tasks = [], RayStats.map_tasks

    def counted_map_tasks(self, fn, items, progress=None):
        tasks.extend(items)
        return map_tasks(self, fn, items, progress)

    settings = dict(fold_ratio=0.3, fold_heads=0.5, provider="cpu", latency=False, seed=2)
    single = onnxfold.optimize(MODELS / "llama_gqa.onnx", None, **settings)
    monkeypatch.setattr(decide, "_KMEANS_CACHE", type(decide._KMEANS_CACHE)())  # forget the one-process run's
    driver_calls = []
    computed = decide._kmeans_labels  # what clusters, past the memo
    monkeypatch.setattr(decide, "_kmeans_labels", lambda *a, **k: driver_calls.append(1) or computed(*a, **k))
    monkeypatch.setattr(RayStats, "map_tasks", counted_map_tasks)
    shown = []
    on_ray = onnxfold.optimize(MODELS / "llama_gqa.onnx", None, ray_address="local", ray_workers=2,
                               progress=lambda task, done, total: shown.append((task, done, total)), **settings)
    # 4 gated MLPs, then 4 attention blocks x 2 key/value groups of query heads
    assert len(tasks) == 12 and not driver_calls
    assert "no calibration data: the 2 Ray workers only cluster transformer blocks" in on_ray.report["notes"]
    assert [s for s in shown if "on Ray" in s[0]] == [("gated folding: clustering on Ray", i, 4) for i in (1, 2, 3, 4)] \
        + [("head folding: clustering on Ray", i, 8) for i in range(1, 9)]
    assert [lr.to_dict() for lr in on_ray.layers] == [lr.to_dict() for lr in single.layers]
    assert on_ray.model.graph.SerializeToString() == single.model.graph.SerializeToString()
    # the answers are remembered like the driver's own: the same fold again sends nothing
    again = onnxfold.optimize(MODELS / "llama_gqa.onnx", None, ray_address="local", ray_workers=2, **settings)
    assert len(tasks) == 12 and not driver_calls
    assert again.model.graph.SerializeToString() == single.model.graph.SerializeToString()


def _init(n):
    return {"z": NeuronStats(ActivationSpec("relu"), n), "gram": GramAccumulator(with_bias=False)}


def _update(accs, _start, _feed, _labels, tensors):
    accs["z"].update(tensors[0]["h0.pre"])
    accs["gram"].update(tensors[0]["h0.pre"])


def _die_once(marker, accs, start, feed, labels, tensors):
    """The first worker to get here is killed (SIGKILL, mid-task); later ones work."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return _update(accs, start, feed, labels, tensors)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _square_or_die(marker, x):
    """A decision task: the first worker to run one is killed (SIGKILL)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return x * x
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_restarted_and_the_result_is_right(tmp_path):
    model = build_mlp([6, 10, 4], "relu", seed=3)
    x = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    data = load_calibration({"x": x}, model)
    expected = LocalStats().reduce(StatsJob([(model, ["h0.pre"])], functools.partial(_init, 10), _update), data,
                                   batch_size=50, providers=CPU)
    marker = tmp_path / "killed"
    # the timeout only guards against a hang: restarting a worker process (Ray,
    # numpy, onnxruntime imported again) took over 60 s on a loaded 2-core machine
    backend = RayStats(workers=2, provider="cpu", max_restarts=2, timeout_s=300)
    try:
        before = {w["pid"] for w in backend.worker_info()}
        job = StatsJob([(model, ["h0.pre"])], functools.partial(_init, 10), functools.partial(_die_once, str(marker)))
        got = backend.reduce(job, data, batch_size=50)
        after = {w["pid"] for w in backend.worker_info()}
        # decision tasks (budget-search candidates) are retried the same way
        squares = backend.map_tasks(functools.partial(_square_or_die, str(tmp_path / "killed-task")), [1, 2, 3, 4])
    finally:
        backend.close()
    killed = int(marker.read_text())
    assert killed in before and killed not in after  # a worker really died and was replaced
    assert got["z"].count == got["gram"].count == 400
    np.testing.assert_array_equal(got["z"].piece_counts, expected["z"].piece_counts)
    np.testing.assert_allclose(got["z"].mean_z, expected["z"].mean_z, rtol=1e-12)
    np.testing.assert_allclose(got["gram"].XtX, expected["gram"].XtX, rtol=1e-10)
    assert (tmp_path / "killed-task").exists() and squares == [1, 4, 9, 16]


def test_a_gpu_worker_reserves_its_gpu_and_chooses_its_own_provider():
    """--ray-gpus-per-worker: an actor reserves that many of the cluster's GPUs
    (Ray hands it the device) and resolves the provider on its own host: under
    'auto', a host without CUDA falls back to CPU, says why, and computes the
    right statistics. No CUDA here, so the CUDA session itself is not run."""
    from onnxfold.errors import ScaleOutError

    model = build_mlp([6, 10, 4], "relu", seed=3)
    x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    data = load_calibration({"x": x}, model)
    job = StatsJob([(model, ["h0.pre"])], functools.partial(_init, 10), _update)
    expected = LocalStats().reduce(job, data, batch_size=50, providers=CPU)
    backend = RayStats(provider="auto", gpus_per_worker=1, timeout_s=300)
    try:
        assert backend.num_workers == 1  # one per GPU of the cluster
        (info,) = backend.worker_info()
        note = backend.provider_note(["CUDAExecutionProvider", "CPUExecutionProvider"])
        got = backend.reduce(job, data, batch_size=50)
    finally:
        backend.close()
    assert info["gpus"] == ["0"] and info["providers"] == CPU
    assert info["notice"].startswith("CUDA not available")
    assert note.startswith("Ray workers' sessions: CPU on 1 of 1 workers (CUDA not available")
    np.testing.assert_allclose(got["gram"].XtX, expected["gram"].XtX, rtol=1e-10)
    with pytest.raises(ScaleOutError, match="the Ray cluster has 1 GPUs; a worker asks for 2"):
        RayStats(gpus_per_worker=2)


# ---------------------------------------------------------------------------
# Parquet files and Ray Dataset objects (Ray Data). Before the module's `backend`
# fixture: its actors hold the CPUs that Ray Data's actors need.
def _write_parquet(path, x, labels=None, name="input", tensor=True):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    cols = {name: ArrowTensorArray.from_numpy(x) if tensor else pa.array([list(r) for r in x.reshape(len(x), -1)])}
    if labels is not None:
        cols["labels"] = labels
    pq.write_table(pa.table(cols), path)
    return path


def test_parquet_and_a_dataset_give_the_npz_result(digits, tmp_path):
    """A Parquet file of the shipped calibration data, and the same data as a
    ray.data Dataset object, give the .npz result: the rows are numbered in
    order and split by the same seeded permutation, so every part holds the
    same samples; the fit part's statistics (and the least-squares refit's
    Grams, whose ridge hold-out is chosen by sample index) come from Ray Data
    actors, whose batches are cut elsewhere: float64 rounding only. Fixed
    settings without linearity keep the Ray Data jobs (a few seconds each) few:
    4 on 2 actors for Parquet (least-squares refit), 2 on 1 actor for the Dataset."""
    calib = np.load(digits.with_suffix(".calib.npz"))
    pq_path = _write_parquet(tmp_path / "calib.parquet", calib["input"], calib["labels"])
    common = dict(eval_data=digits.with_suffix(".test.npz"), provider="cpu", seed=3, latency=False, linear=False,
                  fold_ratio=0.5, batch_size=64)
    single = onnxfold.optimize(digits, digits.with_suffix(".calib.npz"), **common)
    from_parquet = onnxfold.optimize(digits, pq_path, ray_address="local", **common)
    # a Dataset object; without an evaluation set (the final check is gathered too), averaging repair
    ds = ray.data.from_items([{"input": x, "labels": y} for x, y in zip(calib["input"], calib["labels"])])
    common.update(eval_data=None, fold_repair="ar")
    from_dataset = onnxfold.optimize(digits, ds, ray_address="local", ray_workers=1, **common)
    single_ar = onnxfold.optimize(digits, digits.with_suffix(".calib.npz"), **common)
    assert "calibration statistics computed by 1 Ray workers" in from_dataset.report["notes"]
    x = np.load(digits.with_suffix(".test.npz"))["input"]
    for got, want in ((from_parquet, single), (from_dataset, single_ar)):
        assert want.changed and got.changed
        assert got.report["settings"] == want.report["settings"]  # same split sizes, same settings
        assert [lr.to_dict() for lr in got.layers] == [lr.to_dict() for lr in want.layers]
        assert got.report["verification"]["samples"] == want.report["verification"]["samples"]
        (y_want,), (y_got,) = ort_run(want.model, {"input": x}), ort_run(got.model, {"input": x})
        np.testing.assert_allclose(y_got, y_want, rtol=0, atol=1e-5)


def test_npz_shards_are_read_by_ray_tasks_and_give_the_npz_result(digits, tmp_path, monkeypatch):
    """A directory of .npz shards with --ray: each shard is read and validated
    by a Ray task into the object store (the driver never loads them: its
    in-memory shard reader is made to fail here), numbered and split like the
    concatenated .npz, so the result is the single-process one."""
    import onnxfold.measure.data as data_module
    import onnxfold.measure.raydata as raydata

    calib = np.load(digits.with_suffix(".calib.npz"))
    shards = tmp_path / "shards"
    shards.mkdir()
    n = len(calib["input"])
    cuts = [0, n // 3, n // 3 + 1, n - 7, n]  # uneven, one a single sample
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.savez(shards / f"part-{i:03d}.npz", input=calib["input"][a:b], labels=calib["labels"][a:b])
    common = dict(eval_data=digits.with_suffix(".test.npz"), provider="cpu", seed=3, latency=False, linear=False,
                  fold_ratio=0.5, batch_size=64, fold_repair="ar")
    single = onnxfold.optimize(digits, digits.with_suffix(".calib.npz"), **common)

    def no_driver_read(*_a, **_k):
        raise AssertionError("the driver read the shards into memory")

    monkeypatch.setattr(data_module, "_load_shards", no_driver_read)
    monkeypatch.setattr(raydata, "SHARDS_IN_MEMORY_MAX_BYTES", 0)  # the real threshold is 2 GiB
    on_ray = onnxfold.optimize(digits, shards, ray_address="local", ray_workers=1, **common)
    assert f"calibration data (shards '{shards}') read by Ray into the object store; the driver holds only the " \
           "held-out parts" in on_ray.report["notes"]
    assert on_ray.report["settings"] == single.report["settings"]
    assert [lr.to_dict() for lr in on_ray.layers] == [lr.to_dict() for lr in single.layers]
    assert on_ray.report["verification"]["samples"] == single.report["verification"]["samples"]
    x = np.load(digits.with_suffix(".test.npz"))["input"]
    (y_single,), (y_ray,) = ort_run(single.model, {"input": x}), ort_run(on_ray.model, {"input": x})
    np.testing.assert_allclose(y_ray, y_single, rtol=0, atol=1e-5)
    # a shard that does not fit the model: one line naming it, from the task that read it
    np.savez(shards / "part-002.npz", input=calib["input"][:5, :10], labels=calib["labels"][:5])
    with pytest.raises(CalibrationDataError) as e:
        onnxfold.optimize(digits, shards, ray_address="local", ray_workers=1, **common)
    assert f"calibration shard '{shards / 'part-002.npz'}'" in str(e.value) and "\n" not in str(e.value)


def test_next_token_labels_of_data_read_by_ray_are_the_in_memory_labels():
    """--labels next-token on a Ray Dataset: each batch of rows gets its labels
    where it is (a Ray Data map, row by row), equal to the in-memory labels,
    padding ignored; the data is never gathered for them."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxfold.measure.labels import next_token_labels
    from onnxfold.measure.raydata import load_ray_calibration

    emb = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["logits"])], "lm",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])],
                              [numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, size=(300, 12))
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, size=(300, 1))).astype(np.int64)
    ds = ray.data.from_items([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)])
    on_ray = next_token_labels(load_ray_calibration(ds, model))
    assert on_ray.is_ray_dataset and on_ray.has_labels
    got = on_ray.gather(np.arange(300))
    want = next_token_labels(load_calibration({"input_ids": ids, "attention_mask": mask}, model))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.arrays["input_ids"], ids)
    assert (got.labels == -100).sum() > 300  # the last position and the padding are ignored


def test_a_parquet_file_with_a_wrong_column_is_one_clear_error(digits, tmp_path):
    calib = np.load(digits.with_suffix(".calib.npz"))
    pq_path = _write_parquet(tmp_path / "calib.parquet", calib["input"], calib["labels"], name="image", tensor=False)
    t0 = time.perf_counter()
    with pytest.raises(CalibrationDataError) as e:
        onnxfold.optimize(digits, pq_path, ray_address="local", provider="cpu", fold_ratio=0.5, latency=False)
    assert time.perf_counter() - t0 < 30
    assert "has no column for input 'input' (has: 'image', 'labels')" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_value_in_a_fit_row_is_one_clear_error_from_the_actor(digits, tmp_path):
    """A row the driver never sees (fit part) is validated on its actor; the
    error comes back as the same one line."""
    from onnxfold.measure.data import split_indices

    calib = np.load(digits.with_suffix(".calib.npz"))
    x = calib["input"].copy()
    x[split_indices(len(x), (0.6, 0.2, 0.2), 0)[0][5], 3] = np.nan
    pq_path = _write_parquet(tmp_path / "calib.parquet", x, calib["labels"], tensor=False)  # list column
    with pytest.raises(CalibrationDataError) as e:
        onnxfold.optimize(digits, pq_path, ray_address="local", ray_workers=1, provider="cpu", fold_ratio=0.5,
                          linear=False, fold_repair="ar", latency=False, seed=0)
    assert str(e.value).startswith("calibration input 'input' has 1 non-finite values") and "\n" not in str(e.value)


def test_parquet_without_ray_is_one_line_and_exit_2(digits, tmp_path, capsys):
    calib = np.load(digits.with_suffix(".calib.npz"))
    pq_path = _write_parquet(tmp_path / "calib.parquet", calib["input"], calib["labels"], tensor=False)
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(digits), "--calib", str(pq_path), "-o", str(out), "--provider", "cpu",
                 "--fold-ratio", "0.5", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "--ray" in err and "onnxfold[ray]" in err and not out.exists()


@pytest.fixture(scope="module")
def backend():
    stats = RayStats(workers=2, provider="cpu", timeout_s=60)
    yield stats
    stats.close()


@pytest.mark.parametrize("shard, words", [
    ({"inp": np.zeros((40, 6), np.float32)}, "has no input 'x' (has: 'inp')"),
    ({"x": np.zeros((40, 5), np.float32)}, "for input: x for the following indices: index: 1 Got: 5 Expected: 6"),
], ids=["wrong-name", "wrong-shape"])
def test_a_bad_shard_on_a_worker_is_one_clear_error(backend, shard, words):
    model = build_mlp([6, 10, 4], "relu", seed=3)
    t0 = time.perf_counter()
    with pytest.raises(CalibrationDataError) as e:
        backend.reduce(StatsJob([(model, ["h0.pre"])], functools.partial(_init, 10), _update),
                       CalibrationSet(shard), batch_size=8)
    assert time.perf_counter() - t0 < 30
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_bad_shard_file_with_ray_is_one_line_and_exit_2(digits, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    calib = np.load(digits.with_suffix(".calib.npz"))
    np.savez(shards / "part-000.npz", input=calib["input"][:100], labels=calib["labels"][:100])
    np.savez(shards / "part-001.npz", input=calib["input"][100:, :10], labels=calib["labels"][100:])
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(digits), "--calib", str(shards), "-o", str(out), "--ray", "--provider", "cpu",
                 "--fold-ratio", "0.5", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "part-001.npz" in err and "input" in err
    assert not out.exists()
