"""Calibration throughput on Ray against the number of workers, side by side.

One statistics job - what ``onnxfold inspect`` and the linearity pass measure:
per-neuron piece statistics of every hidden layer, plus the Gram matrix of the
first hidden layer's activation - streamed over the same calibration set by:

* the single-process backend (``LocalStats``; onnxruntime uses every core),
  and the same run held to one thread (onnxruntime and BLAS),
* ``RayStats`` with 1 worker and with 2 workers on a local Ray instance
  (each worker reserves one CPU and runs its session on one thread).

Throughput is calibration samples per second (best of ``--repeats`` runs;
the workers are started before timing, as an optimize run starts them once
for all its jobs). Each Ray result is checked against the single-process one.
Writes ``tools/results/ray.json`` and the section between
``<!-- begin:bench_ray -->`` and ``<!-- end:bench_ray -->`` of BENCHMARKS.md
(replaced when present, else appended).

    python tools/bench_ray.py [--model mnist_mlp] [--samples 20000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, compare_lines, machine, previous_run, reason_argument, write_block  # noqa: E402

from onnxfold.distributed import LocalStats, RayStats, StatsJob, run_stats_job  # noqa: E402
from onnxfold.find import find_dense_graph  # noqa: E402
from onnxfold.io import load_model  # noqa: E402
from onnxfold.measure.data import load_calibration  # noqa: E402
from onnxfold.measure.stats import GramAccumulator, NeuronStats  # noqa: E402

BEGIN, END = "<!-- begin:bench_ray -->", "<!-- end:bench_ray -->"


def _init(layers: dict, gram: str) -> dict:
    out = {name: NeuronStats(act, n) for name, (act, n) in layers.items()}
    out["gram:" + gram] = GramAccumulator(with_bias=False)
    return out


def _update(gram: str, accs: dict, _start, _feed, _labels, tensors: list) -> None:
    for name, acc in accs.items():
        acc.update(tensors[0][gram if name.startswith("gram:") else name])


def _job(model):
    view = find_dense_graph(model)
    layers = {c.activation.input: (c.activation, c.width) for c in view.chains}
    gram = view.chains[0].activation.output
    return StatsJob([(model, [*layers, gram])], partial(_init, layers, gram), partial(_update, gram))


def _max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name, acc in a.items():
        for key in ("sum_z", "m2_z", "sxx", "mean_x"):
            x, y = getattr(acc, key, None), getattr(b[name], key, None)
            if isinstance(x, np.ndarray):
                worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300)))
    return worst


class _OneThread:
    """The single-process run with onnxruntime and numpy's BLAS on one thread:
    the same budget as one Ray worker, without Ray."""

    def reduce(self, job, data, *, batch_size, providers):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return run_stats_job(job, data, batch_size=batch_size, providers=providers, intra_op_threads=1)


def _time(backend, job, data, batch_size: int, repeats: int):
    backend.reduce(job, data, batch_size=batch_size, providers=["CPUExecutionProvider"])  # warm-up, untimed
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = backend.reduce(job, data, batch_size=batch_size, providers=["CPUExecutionProvider"])
        best = min(best, time.perf_counter() - t0)
    return best, result


def _peak_growth(fn) -> tuple[float, object]:
    """(peak growth of this (driver) process's resident memory while ``fn()``
    runs, MB, and what it returned); sampled every 2 ms, the baseline taken
    just before."""
    import threading

    from onnxfold.profile import current_rss

    base = current_rss()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], current_rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return (max(peak[0], current_rss()) - base) / 2**20, out


def _driver_rss_growth(backend, job, data, batch_size: int) -> float:
    """Peak growth of the driver's resident memory during one job, MB."""
    return _peak_growth(lambda: backend.reduce(job, data, batch_size=batch_size,
                                               providers=["CPUExecutionProvider"]))[0]


def _shard_memory(model_name: str, sizes: list[int], shards: int = 8) -> list[dict]:
    """The driver's memory while a directory of .npz shards is read and split
    into fit / select / final parts as ``onnxfold optimize`` does with fixed
    settings: by the driver (``load_calibration``, the default up to 2 GiB of
    shards), and by Ray tasks into the object store (``load_ray_calibration``,
    above 2 GiB); the samples are the model's calibration set, repeated."""
    import gc
    import tempfile

    from onnxfold.api import split_data
    from onnxfold.measure.raydata import load_ray_calibration

    model = load_model(ROOT / "models" / f"{model_name}.onnx")
    base = np.load(ROOT / "models" / f"{model_name}.calib.npz")
    rows = []
    for n in [1000, *sizes]:  # the first, small, run warms Ray Data up (imports, its executor): not reported
        reps = -(-n // base["input"].shape[0])
        x = np.concatenate([base["input"]] * reps)[:n]
        y = np.concatenate([base["labels"]] * reps)[:n]
        with tempfile.TemporaryDirectory() as tmp:
            for i, (a, b) in enumerate(zip(np.linspace(0, n, shards + 1).astype(int)[:-1],
                                           np.linspace(0, n, shards + 1).astype(int)[1:])):
                np.savez(Path(tmp) / f"part-{i:03d}.npz", input=x[a:b], labels=y[a:b])
            data_mb = (x.nbytes + y.nbytes) / 2**20
            del x, y
            gc.collect()
            in_memory, _ = _peak_growth(lambda: split_data(load_calibration(tmp, model), None, 0, None))
            gc.collect()
            by_ray, parts = _peak_growth(lambda: split_data(load_ray_calibration(tmp, model), None, 0, None))
            held = sum(p.num_samples for p in parts[1:])
            del parts
            gc.collect()
        rows.append({"samples": n, "data_mb": data_mb, "held_out_samples": held,
                     "driver_growth_mb": in_memory, "ray_growth_mb": by_ray})
    return rows[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist_mlp", help="a shipped model in models/ (default mnist_mlp)")
    ap.add_argument("--samples", type=int, default=20000, help="calibration samples (the shipped set, repeated)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-samples", type=int, nargs="+", default=[300_000, 1_200_000],
                    help="samples of digits_mlp data written as .npz shards for the driver-memory table")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the BENCHMARKS.md block from tools/results/ray.json (e.g. with a --reason)")
    ap.add_argument("--previous", type=Path, help="with --render: compare with this ray.json (e.g. one checked out "
                                                  "from git) instead of the one ray.json keeps")
    reason_argument(ap)
    args = ap.parse_args(argv)
    out_json = ROOT / "tools" / "results" / "ray.json"
    if args.render:
        result = json.loads(out_json.read_text())
        if args.previous:
            result["previous"] = previous_run(args.previous.parent, args.previous.stem, flatten)
        write(result, out_json, Path(args.out), args.reason)
        return 0

    import ray

    model = load_model(ROOT / "models" / f"{args.model}.onnx")
    base = np.load(ROOT / "models" / f"{args.model}.calib.npz")
    reps = -(-args.samples // base["input"].shape[0])
    x = np.concatenate([base["input"]] * reps)[:args.samples]
    data = load_calibration({"input": x}, model)
    job = _job(model)

    rows = []
    t_local, ref = _time(LocalStats(), job, data, args.batch_size, args.repeats)
    rows.append({"backend": "single process (LocalStats)", "workers": None, "seconds": t_local,
                 "samples_per_s": args.samples / t_local, "max_rel_diff_vs_single": 0.0})
    t_one, got = _time(_OneThread(), job, data, args.batch_size, args.repeats)
    rows.append({"backend": "single process, 1 thread", "workers": None, "seconds": t_one,
                 "samples_per_s": args.samples / t_one, "max_rel_diff_vs_single": _max_rel_diff(got, ref)})
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=max(cpus, max(args.workers)), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        for n in args.workers:
            backend = RayStats(workers=n, provider="cpu")
            try:
                backend.worker_info()  # started before timing
                t, got = _time(backend, job, data, args.batch_size, args.repeats)
            finally:
                backend.close()
            rows.append({"backend": f"Ray, {n} worker{'s' if n > 1 else ''}", "workers": n, "seconds": t,
                         "samples_per_s": args.samples / t, "max_rel_diff_vs_single": _max_rel_diff(got, ref)})
        # the same samples from a Parquet file: read with Ray Data, each job a map_batches over an actor pool
        rows.append(_parquet_row(model, x, job, ref, max(args.workers), args))
        # the driver's memory: a job merges per-shard accumulators, never per-sample tensors
        memory = []
        backend = RayStats(workers=max(args.workers), provider="cpu")
        try:
            backend.worker_info()  # the actors are started on first use: before measuring
            for n in (args.samples // 4, args.samples):
                sub = load_calibration({"input": x[:n]}, model)
                first = _driver_rss_growth(backend, job, sub, args.batch_size)  # also cuts and stores the shards
                later = _driver_rss_growth(backend, job, sub, args.batch_size)
                memory.append({"samples": n, "data_mb": x[:n].nbytes / 2**20, "first_job_growth_mb": first,
                               "later_job_growth_mb": later})
        finally:
            backend.close()
        shard_memory = _shard_memory("digits_mlp", args.shard_samples)
    finally:
        ray.shutdown()
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["vs_single_process"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        r["vs_1_worker"] = None if one is None or r["workers"] is None else r["samples_per_s"] / one["samples_per_s"]

    result = {"generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "model": args.model, "samples": args.samples, "batch_size": args.batch_size,
              "repeats": args.repeats, "machine": machine(), "ray": ray.__version__,
              "load_average_1min_after": round(os.getloadavg()[0], 2),
              "job": f"NeuronStats of {len(find_dense_graph(model).chains)} hidden layers + Gram of the first",
              "rows": rows, "driver_memory": memory, "memory_workers": max(args.workers),
              "shard_memory": shard_memory}
    result["previous"] = previous_run(out_json.parent, "ray", flatten)  # kept for --render
    write(result, out_json, Path(args.out), args.reason)
    return 0


def write(result: dict, out_json: Path, markdown: Path, reason: str | None) -> None:
    """ray.json and the BENCHMARKS.md block, which ends with the comparison with the run ``result`` replaced."""
    result["against_previous"] = compare_lines(result.get("previous"), flatten(result),
                                               {"max rel. diff", "driver growth (MB)", "Ray growth (MB)"}, reason, level=3)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    write_block(markdown, BEGIN, END, _section(result))
    print(_section(result))


def _parquet_row(model, x: np.ndarray, job, ref: dict, workers: int, args) -> dict:
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from onnxfold.measure.raydata import load_ray_calibration

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.parquet"
        pq.write_table(pa.table({"input": ArrowTensorArray.from_numpy(x)}), path)
        fit = load_ray_calibration(path, model).split((1.0,), 0)[0]  # every row in the fit part
        backend = RayStats(workers=workers, provider="cpu")
        try:
            t, got = _time(backend, job, fit, args.batch_size, args.repeats)
        finally:
            backend.close()
    return {"backend": f"Ray Data from Parquet, {workers} workers", "workers": None, "seconds": t,
            "samples_per_s": args.samples / t, "max_rel_diff_vs_single": _max_rel_diff(got, ref)}


def flatten(payload: dict) -> dict:
    """The numbers compared with the previous run: each backend's throughput and its difference from the
    single process, and the driver's memory growth."""
    cells = {row["backend"]: {"samples/s": row["samples_per_s"], "max rel. diff": row["max_rel_diff_vs_single"]}
             for row in payload["rows"]}
    cells.update({f"driver memory, {m['samples']} samples, {job} job": {"driver growth (MB)": m[f"{job}_job_growth_mb"]}
                  for m in payload["driver_memory"] for job in ("first", "later")})
    cells.update({f"reading .npz shards, {m['samples']} samples": {"driver growth (MB)": m["driver_growth_mb"],
                                                                  "Ray growth (MB)": m["ray_growth_mb"]}
                  for m in payload.get("shard_memory", [])})
    return cells


def _section(r: dict) -> str:
    lines = [BEGIN, "## Scale-out: calibration throughput on Ray", "",
             f"Generated by `tools/bench_ray.py` ({r['machine']}; Ray {r['ray']}). One statistics job ({r['job']})",
             f"of `{r['model']}` over {r['samples']} calibration samples, batch {r['batch_size']}, best of "
             f"{r['repeats']} runs after a warm-up; the Ray workers run on a local instance on this machine, each reserving one CPU",
             "and running its onnxruntime session on one thread (Ray also limits numpy's BLAS to one thread there).",
             "The first row lets onnxruntime and BLAS use every core; the second holds both to one thread, the",
             "budget of one worker. The Parquet row reads the same samples from a Parquet file with Ray Data",
             "(Parquet / Dataset sources): each job is a `map_batches` over a new actor pool, whose start-up",
             "(a process and an onnxruntime session per actor) is part of every job's time.",
             "", "| backend | seconds | samples/s | vs single process | vs 1 worker | max rel. diff of the statistics vs single process |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        vs1 = "" if row["vs_1_worker"] is None else f"{row['vs_1_worker']:.2f}x"
        lines.append(f"| {row['backend']} | {row['seconds']:.3f} | {row['samples_per_s']:,.0f} | "
                     f"{row['vs_single_process']:.2f}x | {vs1} | {row['max_rel_diff_vs_single']:.1e} |")
    lines += ["", f"Driver memory during one job ({r['memory_workers']} workers): growth of the driver's resident set over",
              "its level just before the job (the data set itself is already loaded). The first job on a data set",
              "also cuts it into shards and puts them in the object store; later jobs reuse them.", "",
              "| samples | data (MB) | first job: driver growth (MB) | later job: driver growth (MB) |",
              "|---:|---:|---:|---:|"]
    for m in r["driver_memory"]:
        lines.append(f"| {m['samples']} | {m['data_mb']:.1f} | {m['first_job_growth_mb']:.1f} | "
                     f"{m['later_job_growth_mb']:.1f} |")
    if r.get("shard_memory"):
        lines += ["", "Reading a directory of 8 `.npz` shards (`digits_mlp` samples, repeated) and splitting it into",
                  "fit / select / final parts as `optimize` does with fixed settings: growth of the driver's resident",
                  "set when the driver loads the shards (the default up to 2 GiB of shards) and when Ray tasks read",
                  "them into the object store (above 2 GiB; the held-out parts, at most 50,000 samples each, are",
                  "then gathered on the driver).", "",
                  "| samples | data (MB) | held-out samples | driver loads: growth (MB) | Ray reads: growth (MB) |",
                  "|---:|---:|---:|---:|---:|"]
        for m in r["shard_memory"]:
            lines.append(f"| {m['samples']:,} | {m['data_mb']:.1f} | {m['held_out_samples']:,} | "
                         f"{m['driver_growth_mb']:.1f} | {m['ray_growth_mb']:.1f} |")
    lines += ["", "Ray pays per job: shipping the model to the workers and one session per worker per job; the",
              "shards stay in the object store between the jobs of one run. Here the driver, the workers and the",
              "Ray daemons share 2 cores with whatever else runs (1-minute load average "
              f"{r['load_average_1min_after']} right after the run),",
              "so the ratios are noisy; on a cluster each worker brings its own cores (or a GPU,",
              "`--ray-gpus-per-worker`). Raw numbers: `tools/results/ray.json`.", "",
              *r.get("against_previous", []), END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
