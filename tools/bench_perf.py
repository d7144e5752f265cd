"""Performance evidence: inference speed of compressed models, optimizer cost and scaling.

    PYTHONPATH=. python tools/bench_perf.py            # everything, writes BENCHMARKS.md
    PYTHONPATH=. python tools/bench_perf.py --quick    # small scaling sweep (minutes)

Writes ``BENCHMARKS.md`` (repo root), ``tools/results/perf.json`` and
``tools/results/scaling.png`` (log-log plot; needs matplotlib, the ``plot``
extra). Every figure is measured in this run on this machine; speed is given as
ratios of models timed side by side, interleaved (original, compressed,
original, ...), because the machines are shared and noisy.

1. Inference: every shipped model (``models/``) and its variants - lossless
   (linearity folding at T = 1.0 on the calibration data), the default budget
   search, and fixed fold ratios 0.3 / 0.5 / 0.7 (no linearity, k-means, least-
   squares repair) - on onnxruntime's CPU provider at batch 1 and batch 256,
   median of many runs after warm-up, one intra-op thread (less noise on a
   shared machine), next to FLOPs per sample (dense layers, incl. linear
   paths), parameters and bytes. Checks: not slower than the original at batch
   1 (within timing noise, ``BATCH1_TOLERANCE``) and, at batch 256, latency
   ratio <= 1.15 x FLOP ratio.
2. Optimizer cost: ``onnxfold optimize --profile-memory`` in a fresh process
   per model (the default budget search on the shipped models; the MiniLM
   encoder exported by tools/bench_minilm.py, if present, folded at r = 0.3),
   wall time and peak resident memory per stage from the report.
3. Scaling: synthetic dense ReLU MLPs generated here (width 512 -> 8192,
   depth 4 -> 16, up to 1.07 B parameters, weights in external data, written
   a block at a time) optimized data-free with ``--fold-ratio 0.5`` in a fresh
   process each; time and peak RSS against parameters; the result is loaded
   and run in onnxruntime (another fresh process). Check: peak RSS of the
   optimize run <= 1.5 x the model's size for the largest model.
4. Calibration memory: mnist_mlp folded with the least-squares repair
   (statistics streamed over all samples) with 1k, 10k and 100k calibration
   samples; peak RSS of the calibration/decide stages above the RSS once the
   data is loaded must not grow with the sample count.
5. CUDA: the inference table again on the CUDA provider when one is usable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _bench import compare_lines, machine, previous_run, reason_argument  # noqa: E402
from perf_cost import bench_cost, cost_markdown, cprofile, run_cli  # noqa: E402

from onnxfold.api import optimize  # noqa: E402
from onnxfold.io import load_model  # noqa: E402
from onnxfold.measure.data import load_calibration  # noqa: E402
from onnxfold.report import summarize_model  # noqa: E402

SHIPPED = ("mnist_mlp", "digits_mlp", "digits_seq_mlp", "cancer_mlp_paper")
FIXED_RATIOS = (0.3, 0.5, 0.7)
BATCHES = (1, 256)
FLOP_SLACK = 1.15  # batch-256 latency ratio may exceed the FLOP ratio by this factor
BATCH1_TOLERANCE = 1.05  # batch-1 "not slower": within 5 % timing noise
RSS_LIMIT = 1.5  # peak RSS / model size for the largest synthetic model
IR_VERSION, OPSET = 8, 17
SCALING_FULL = ((512, 4), (1024, 4), (2048, 4), (4096, 4), (8192, 4), (2048, 8), (2048, 16), (8192, 8), (8192, 16))
SCALING_QUICK = ((512, 4), (1024, 4), (2048, 4), (2048, 8))
CALIB_SIZES = (1_000, 10_000, 100_000)
MB = 2**20


# --------------------------------------------------------------------------
# 1. inference


def _session(model: onnx.ModelProto, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=[provider])


def _feed(calib, batch: int) -> dict[str, np.ndarray]:
    feed = {}
    for name, arr in calib.arrays.items():
        reps = int(np.ceil(batch / arr.shape[0]))
        feed[name] = (np.concatenate([arr] * reps) if reps > 1 else arr)[:batch]
    return feed


def time_interleaved(models: list[onnx.ModelProto], feed: dict, provider: str, min_s: float, max_runs: int = 2000):
    """Median seconds per run of each model, timed round-robin."""
    sessions = [_session(m, provider) for m in models]
    for s in sessions:  # warm-up
        for _ in range(5):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    end = time.perf_counter() + min_s
    while len(times[0]) < max_runs and (len(times[0]) < 30 or time.perf_counter() < end):
        for s, ts in zip(sessions, times):
            t0 = time.perf_counter()
            s.run(None, feed)
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times], len(times[0])


def variants(name: str, models_dir: Path) -> list[tuple[str, onnx.ModelProto]]:
    path = models_dir / f"{name}.onnx"
    calib = models_dir / f"{name}.calib.npz"
    test = models_dir / f"{name}.test.npz"
    out = [("lossless (T=1.0)", optimize(path, calib, eval_data=test, linear_threshold=1.0).model),
           ("default budget", optimize(path, calib, eval_data=test).model)]
    for r in FIXED_RATIOS:
        out.append((f"fold r={r}", optimize(path, calib, eval_data=test, linear=False, fold_ratio=r).model))
    return out


def activation_traffic(model: onnx.ModelProto) -> int:
    """Activation elements the dense layers read and write per sample (input +
    output width of each, linear paths included). Layers with a narrow input
    (8 features per token in digits_seq_mlp) are bound by this, not by FLOPs:
    cutting a hidden width cuts what they write, not more."""
    from onnxfold.find import find_dense_graph

    total = 0
    for op in find_dense_graph(model).ops.values():
        total += op.in_features + op.out_features + sum(p.factors[0].shape[0] for p in op.paths)
    return total


def floor_model(original: onnx.ModelProto) -> onnx.ModelProto:
    """The original with every hidden layer folded to one neuron: same nodes,
    next to no FLOPs. Its latency is the part of the original's that no
    folding can remove (node launches, reading inputs, writing outputs)."""
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.folding import FoldingPass

    return FoldingPass(ratio=0.9999, select="magnitude", repair="none")(original, PassContext()).model  # width 1


def bench_inference(models_dir: Path, provider: str, min_s: float, names=SHIPPED) -> list[dict]:
    rows = []
    for name in names:
        if not (models_dir / f"{name}.onnx").exists():
            continue
        original = load_model(models_dir / f"{name}.onnx")
        calib = load_calibration(models_dir / f"{name}.calib.npz", original)
        base = summarize_model(original)
        floor = floor_model(original)
        traffic0 = activation_traffic(original)
        f_floor = summarize_model(floor).dense_flops_per_row
        floor_share = {}
        for b in BATCHES:
            (t_orig, t_floor), _ = time_interleaved([original, floor], _feed(calib, b), provider, min_s)
            floor_share[b] = t_floor / t_orig
        print(f"[inference/{provider}] {name}: floor {floor_share}; building variants", flush=True)
        vs = variants(name, models_dir)
        for label, model in vs:
            s = summarize_model(model)
            row = {"model": name, "variant": label, "provider": provider,
                   "params": s.parameters, "params_ratio": s.parameters / base.parameters,
                   "bytes": s.bytes, "bytes_ratio": s.bytes / base.bytes,
                   "flops": s.dense_flops_per_row, "flop_ratio": s.dense_flops_per_row / base.dense_flops_per_row,
                   "nodes": len(model.graph.node), "nodes_original": len(original.graph.node)}
            for b in BATCHES:
                (t_orig, t_new), runs = time_interleaved([original, model], _feed(calib, b), provider, min_s)
                row[f"b{b}_original_ms"], row[f"b{b}_ms"] = 1e3 * t_orig, 1e3 * t_new
                row[f"b{b}_ratio"], row[f"b{b}_runs"] = t_new / t_orig, runs
            # what the FLOPs promise once the floor is accounted for: the floor
            # stays, the rest scales with the dense FLOPs above the floor's
            share = (s.dense_flops_per_row - f_floor) / max(1, base.dense_flops_per_row - f_floor)
            row["floor_share_b256"] = floor_share[256]
            row["traffic_ratio"] = activation_traffic(model) / traffic0
            # the FLOPs promise once the floor is accounted for, or the activation
            # traffic for memory-bound layers, whichever is larger
            row["expected_b256"] = floor_share[256] + (1 - floor_share[256]) * max(share, row["traffic_ratio"])
            row["ok_b1"] = row["b1_ratio"] <= BATCH1_TOLERANCE
            row["ok_b256"] = row["b256_ratio"] <= FLOP_SLACK * max(row["flop_ratio"], row["expected_b256"]) \
                and (row["b256_ratio"] <= FLOP_SLACK * row["flop_ratio"] or row["nodes"] <= row["nodes_original"])
            rows.append(row)
            print(f"  {label:18s} params {row['params_ratio']:.3f} flops {row['flop_ratio']:.3f} "
                  f"b1 {row['b1_ratio']:.3f} b256 {row['b256_ratio']:.3f}", flush=True)
    return rows


# --------------------------------------------------------------------------
# 2. optimizer cost


# bench_cost, run_cli: tools/perf_cost.py


# --------------------------------------------------------------------------
# 3. scaling


def _ext(name: str, dims, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def build_synthetic(path: Path, width: int, depth: int, seed: int = 0) -> int:
    """x[N, width] -> depth x (Gemm width x width [+ Relu]) -> y, weights in
    ``path.name + '.data'`` written a block of rows at a time. Returns bytes."""
    rng = np.random.default_rng(seed)
    data = path.parent / f"{path.name}.data"
    inits, nodes = [], []
    offset = 0
    with open(data, "wb") as f:
        x = "x"
        for i in range(depth):
            start = offset
            for r0 in range(0, width, 1024):
                rows = min(1024, width - r0)
                f.write((rng.standard_normal((rows, width), dtype=np.float32) / np.float32(np.sqrt(width))).tobytes())
            offset = f.tell()
            inits.append(_ext(f"W{i}", [width, width], data.name, start, offset - start))
            b = (rng.standard_normal(width) * 0.1).astype(np.float32)
            inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, [width], b.tobytes(), raw=True))
            out = "y" if i == depth - 1 else f"z{i}"
            nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
            if i < depth - 1:
                nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
                x = f"h{i}"
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path.write_bytes(model.SerializeToString())
    return path.stat().st_size + data.stat().st_size


_RUN_CHECK = """
import resource, sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
w = s.get_inputs()[0].shape[1]
y = s.run(None, {"x": np.random.default_rng(0).standard_normal((4, w)).astype(np.float32)})[0]
assert y.shape == (4, w) and np.isfinite(y).all(), y.shape
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def bench_scaling(configs, work: Path) -> list[dict]:
    rows = []
    for width, depth in configs:
        d = Path(tempfile.mkdtemp(prefix=f"synth{width}x{depth}-", dir=work))
        try:
            src = d / "synth.onnx"
            t0 = time.perf_counter()
            size = build_synthetic(src, width, depth)
            build_s = time.perf_counter() - t0
            params = depth * (width * width + width)
            print(f"[scaling] width {width} depth {depth}: {params / 1e6:.0f} M params, {size / MB:.0f} MiB "
                  f"(built in {build_s:.0f} s)", flush=True)
            out = d / "synth.fold.onnx"
            rep = run_cli([str(src), "--fold-ratio", "0.5", "--external-data", "-o", str(out)], d / "report.json")
            out_size = out.stat().st_size + (d / "synth.fold.onnx.data").stat().st_size
            check = subprocess.run([sys.executable, "-c", _RUN_CHECK, str(out)], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"onnxruntime could not run {out}: {check.stderr.strip()[-1000:]}")
            peak = rep["memory"]["peak_rss_bytes"]
            rows.append({"width": width, "depth": depth, "params": params, "model_bytes": size,
                         "output_bytes": out_size, "params_ratio": rep["ratios"]["parameters"],
                         "wall_s": rep["_wall_s"], "stages_s": rep["timings_s"], "peak_rss_bytes": peak,
                         "peak_over_size": peak / size, "ort_run_peak_rss_bytes": int(check.stdout.strip()),
                         "external_data": True})
            print(f"  {rep['_wall_s']:.0f} s, peak RSS {peak / MB:.0f} MiB = {peak / size:.2f} x model size; "
                  f"output {out_size / MB:.0f} MiB runs in onnxruntime", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return rows


def plot_scaling(rows: list[dict], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'onnxfold[plot]'): no scaling plot")
        return False
    p = np.array([r["params"] for r in rows], float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].loglog(p, [r["wall_s"] for r in rows], "o-")
    axes[0].set(xlabel="parameters", ylabel="optimize wall time (s)", title="time")
    axes[1].loglog(p, [r["peak_rss_bytes"] / MB for r in rows], "o-", label="peak RSS")
    axes[1].loglog(p, [r["model_bytes"] / MB for r in rows], "--", label="model size")
    axes[1].loglog(p, [RSS_LIMIT * r["model_bytes"] / MB for r in rows], ":", label=f"{RSS_LIMIT} x model size")
    axes[1].set(xlabel="parameters", ylabel="MiB", title="peak resident memory")
    axes[1].legend()
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("onnxfold optimize --fold-ratio 0.5 on synthetic dense MLPs (data-free)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# 4. calibration memory

_CALIB_RUN = """
import json, sys, numpy as np
sys.path.insert(0, {root!r})
from onnxfold.api import optimize
from onnxfold.profile import current_rss
n = int(sys.argv[1])
memo = None if sys.argv[2] == "default" else int(sys.argv[2])
src = np.load({calib!r})["input"].astype(np.float32)
rng = np.random.default_rng(0)
x = src[rng.integers(0, len(src), n)] + rng.normal(0, 0.05, (n, src.shape[1])).astype(np.float32)
test = dict(np.load({test!r}))
loaded = current_rss()
r = optimize({model!r}, {{"input": x}}, eval_data=test, linear=False, fold_ratio=0.5, fold_repair="ls",
             profile_memory=True, memo_mib=memo)
print(json.dumps({{"rss_data_loaded": loaded, "data_bytes": int(x.nbytes), "memory": r.report["memory"],
                   "timings": r.report["timings_s"]}}))
"""


def bench_calibration_memory(models_dir: Path) -> list[dict]:
    model = models_dir / "mnist_mlp.onnx"
    code = _CALIB_RUN.format(root=str(ROOT), calib=str(models_dir / "mnist_mlp.calib.npz"),
                             test=str(models_dir / "mnist_mlp.test.npz"), model=str(model))
    rows = []
    # the default memos of streamed activations, then none (--memo-mib 0): what they add to the working memory
    for n, memo in [(n, memo) for memo in (None, 0) for n in CALIB_SIZES]:
        print(f"[calibration memory] {n} samples, memo_mib={memo}", flush=True)
        proc = subprocess.run([sys.executable, "-c", code, str(n), "default" if memo is None else str(memo)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks = res["memory"]["stage_peak_rss_bytes"]
        work_peak = max(peaks.get(s, 0) for s in ("calibration", "decide", "rewrite"))
        rows.append({"samples": n, "memo_mib": memo, "data_mb": res["data_bytes"] / MB, "rss_data_loaded_mb": res["rss_data_loaded"] / MB,
                     "work_peak_mb": work_peak / MB, "above_data_mb": (work_peak - res["rss_data_loaded"]) / MB,
                     "calibration_s": res["timings"].get("calibration", 0.0)})
        print(f"  data {rows[-1]['data_mb']:.0f} MiB, peak above loaded data {rows[-1]['above_data_mb']:.0f} MiB",
              flush=True)
    return rows


# --------------------------------------------------------------------------
# report


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def write_markdown(res: dict) -> str:
    L = ["# onnxfold benchmarks", "",
         f"Generated by `{res['command']}` on {res['date']} - do not edit by hand.", "",
         f"Machine: {res['machine']}.", "",
         "Method: every number below is measured in this one run. Speed is a ratio of two models timed side by "
         "side, interleaved (original, compressed, original, ...), median of many runs after warm-up, onnxruntime "
         "with one intra-op thread. FLOPs are those of the dense layers (2 x weights per sample, linear paths "
         "included); parameters and bytes are the whole model's.", ""]
    for prov, rows in res["inference"].items():
        L += [f"## 1. Inference ({prov})", "",
              f"Ratios are compressed / original. Checks: batch 1 not slower than the original (ratio <= "
              f"{BATCH1_TOLERANCE}, timing noise); batch 256 latency ratio <= {FLOP_SLACK} x FLOP ratio - or, for "
              "a model that adds no graph node, <= "
              f"{FLOP_SLACK} x the floor-adjusted ratio. The *floor* is the original with every hidden layer folded "
              "to one neuron (same nodes, next to no FLOPs), timed against the original: that share of the "
              "original's time (node launches, reading the input, writing the output) no folding can remove, so "
              "a 10x FLOP cut of a model whose floor is 20 % cannot run 10x faster. Floor-adjusted ratio = floor + "
              "(1 - floor) x max(FLOPs above the floor's as a share of the original's, activation traffic ratio); the "
              "activation traffic is the input + output width of every dense layer per sample: layers with a narrow "
              "input (8 features per token in digits_seq_mlp) are bound by the activations they write, so cutting "
              "a hidden width by 30 % saves at most 30 % of their time however few FLOPs they had.", "",
              "| model | variant | params | FLOPs | bytes | nodes | b1 orig ms | b1 ratio | b256 orig ms | b256 ratio "
              "| b256 / FLOP ratio | activation traffic | floor (b256) | floor-adjusted | checks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ok = "ok" if r["ok_b1"] and r["ok_b256"] else ("FAIL b1" if not r["ok_b1"] else "") + \
                (" FAIL b256" if not r["ok_b256"] else "")
            L.append(f"| {r['model']} | {r['variant']} | {r['params_ratio']:.3f} | {r['flop_ratio']:.3f} | "
                     f"{r['bytes_ratio']:.3f} | {r['nodes']} (was {r['nodes_original']}) | {r['b1_original_ms']:.3f} | "
                     f"{r['b1_ratio']:.3f} | {r['b256_original_ms']:.3f} | {r['b256_ratio']:.3f} | "
                     f"{r['b256_ratio'] / r['flop_ratio']:.2f} | {r['traffic_ratio']:.3f} | {r['floor_share_b256']:.2f} | "
                     f"{r['expected_b256']:.3f} | {ok.strip()} |")
        L.append("")
    if isinstance(res["cost"], dict) and res["cost"]:  # (a list: perf.json of an older bench_perf)
        L += cost_markdown(res["cost"])
    sc = res["scaling"]
    if sc:
        big = max(sc, key=lambda r: r["params"])
        L += ["## 3. Scaling", "",
              "Synthetic dense ReLU MLPs (width x width Gemm layers, float32, weights in external data), "
              "`onnxfold optimize synth.onnx --fold-ratio 0.5 --external-data` (data-free: k-means on a random "
              "projection of the neuron features for wide layers, Fold-AR repair), fresh process each; the output "
              "is then loaded and run in onnxruntime in another fresh process.", "",
              "| width | depth | params | model MiB | optimize s | peak RSS MiB | peak / size | output MiB | "
              "ORT run peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sc:
            L.append(f"| {r['width']} | {r['depth']} | {r['params'] / 1e6:.1f} M | {r['model_bytes'] / MB:.0f} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss_bytes'] / MB:.0f} | {r['peak_over_size']:.2f} | "
                     f"{r['output_bytes'] / MB:.0f} | {r['ort_run_peak_rss_bytes'] / MB:.0f} |")
        verdict = "met" if big["peak_over_size"] <= RSS_LIMIT else "NOT met"
        L += ["", f"Largest model: {big['params'] / 1e9:.2f} B parameters, peak RSS {big['peak_over_size']:.2f} x its "
              f"size (limit {RSS_LIMIT} x): {verdict}. Stage split of that run (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in big["stages_s"].items()) + ".", ""]
        if res.get("scaling_png"):
            L += [f"![scaling]({res['scaling_png']})", ""]
    if res["calibration"]:
        L += ["## 4. Calibration memory against samples", "",
              "mnist_mlp, `fold_ratio=0.5, fold_repair='ls'` (neuron statistics and Gram matrices streamed over all "
              "samples, batch 256). The user's samples are held in memory (they are the input); *above loaded data* is "
              "onnxfold's own working memory: peak RSS during calibration/decide/rewrite above the RSS once the "
              "data is loaded. Its statistics are flat in the samples; what grows is the two memos that keep "
              "streamed activations so that later runs over the same data replay them or start where the model "
              "starts to differ (`StreamMemo` for the original's streams, `TensorMemo` for each run's frontier, "
              "docs/methods.md 3.6): each holds at most 1 GiB, so this column grows with the samples until they "
              "are full and then stays under about 2 GiB plus the flat part, whatever the number of samples. "
              "`--memo-mib 0` keeps none: the column stays flat, and the runs the memos saved are run again "
              "(*calibration s*).", "",
              "| samples | memos | data MiB | RSS with data loaded MiB | work peak MiB | above loaded data MiB | "
              "calibration s |",
              "|---|---|---|---|---|---|---|"]
        for r in res["calibration"]:
            memos = "1 GiB each (default)" if r.get("memo_mib") is None else f"`--memo-mib {r['memo_mib']}`"
            L.append(f"| {r['samples']} | {memos} | {r['data_mb']:.0f} | {r['rss_data_loaded_mb']:.0f} | {r['work_peak_mb']:.0f}"
                     f" | {r['above_data_mb']:.0f} | {r['calibration_s']:.1f} |")
        L.append("")
    L += ["## 5. CUDA", "", res["cuda_note"], ""]
    return "\n".join(L)


SECTIONS = {1: "inference", 2: "cost", 3: "scaling", 4: "calibration", 5: "cuda"}
#: a block another script writes (bench_ray, bench_decompositions): kept verbatim
OTHER_BLOCK = re.compile(r"<!-- begin:([\w-]+) -->.*?<!-- end:\1 -->\n?", re.S)


def _split_sections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first ``## `` heading, {section key: its text}), in order;
    a section's key is its number ("2" for ``## 2. ...``), else its heading."""
    parts = re.split(r"(?m)^(?=## )", text)
    sections = {}
    for part in parts[1:]:
        heading = part.splitlines()[0]
        m = re.match(r"## (\d+)\.", heading)
        sections[m.group(1) if m else heading] = part
    return parts[0], sections


def merge_markdown(old: str, new: str, regenerated: set[int], stamp: str = "") -> str:
    """``new`` where it regenerated a section, ``old`` elsewhere; every block
    between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->`` (other scripts
    write them: bench_ray, bench_decompositions) is kept verbatim, in order,
    at the end of the section it was in (headings inside blocks do not count).
    ``stamp``: a line put under the heading of each regenerated section when
    the file keeps old ones (its header speaks for those)."""
    blocks = []
    for m in OTHER_BLOCK.finditer(old):
        headings = re.findall(r"(?m)^## .*$", OTHER_BLOCK.sub("", old[:m.start()]))
        blocks.append((m.group(0), headings[-1] if headings else ""))
    old = OTHER_BLOCK.sub("", old)
    old_pre, old_secs = _split_sections(old)
    new_pre, new_secs = _split_sections(new)
    everything = regenerated >= set(SECTIONS)
    pre = new_pre if everything or not old_pre else old_pre
    keys = list(dict.fromkeys([*old_secs, *new_secs]))
    first_seen = {k: i for i, k in enumerate(keys)}  # (list.sort empties the list while it sorts)
    keys.sort(key=lambda k: (int(k) if k.isdigit() else len(SECTIONS) + 1 + first_seen[k]))
    secs = {k: (new_secs.get(k, "") if k.isdigit() and int(k) in regenerated else old_secs.get(k, new_secs.get(k, "")))
            for k in keys}
    if stamp and not everything and old_pre:
        for k in keys:
            if k.isdigit() and int(k) in regenerated and secs[k]:
                heading, _, rest = secs[k].partition("\n")
                secs[k] = f"{heading}\n\n{stamp}\n{rest}"
    for i, (block, anchor) in enumerate(blocks):
        text = block if block.endswith("\n") else block + "\n"
        key = next((k for k, v in secs.items() if v.splitlines() and v.splitlines()[0] == anchor), None)
        if anchor == "":
            pre = pre.rstrip("\n") + "\n\n" + text + "\n"
        elif key is not None:
            secs[key] = secs[key].rstrip("\n") + "\n\n" + text + "\n"
        else:
            keys.append(f"block {i}")
            secs[f"block {i}"] = text
    return (pre + "".join(secs[k] for k in keys if secs.get(k))).rstrip("\n") + "\n"


def flatten(payload: dict) -> dict:
    """The numbers compared with the previous run, keyed "N. row" by section (all lower is better): sizes and
    latency ratios (1), optimizer wall time, peak memory and ratio (2), time and memory (3, 4)."""
    cells = {f"1. {r['model']} {r['variant']} ({provider})": {k: r[k] for k in (
        "params_ratio", "flop_ratio", "b1_ratio", "b256_ratio")}
        for provider, rows in payload.get("inference", {}).items() for r in rows}
    cells.update({f"2. {r['model']} {r['setting']}": {k: r[k] for k in ("wall_s", "peak_rss_mb", "params_ratio")}
                  for r in payload.get("cost", {}).get("stages", [])})
    cells.update({f"3. width {r['width']} depth {r['depth']}": {k: r[k] for k in ("wall_s", "peak_over_size")}
                  for r in payload.get("scaling", [])})
    cells.update({f"4. {r['samples']} samples" + ("" if r.get("memo_mib") is None else f", --memo-mib {r['memo_mib']}"):
                  {k: r[k] for k in ("above_data_mb", "calibration_s")} for r in payload.get("calibration", [])})
    return cells


def with_comparison(markdown: str, previous: dict | None, cells: dict, regenerated: set[int], reason) -> str:
    """``markdown`` with each regenerated section ending in its comparison with the previous run."""
    pre, sections = _split_sections(markdown)
    for key, text in sections.items():
        if key.isdigit() and int(key) in regenerated and previous is not None:
            mine = {k: v for k, v in cells.items() if k.startswith(f"{key}. ")}
            if mine:
                before = {**previous, "cells": {k: v for k, v in previous["cells"].items() if k.startswith(f"{key}. ")}}
                lower = {m for v in mine.values() for m in v}
                sections[key] = text.rstrip("\n") + "\n\n" + "\n".join(compare_lines(before, mine, lower, reason, level=3))
    return pre + "".join(sections.values())


def write_benchmarks(res: dict, markdown: Path, reason: str | None) -> None:
    """The sections ``res`` regenerated, merged into ``markdown`` (BENCHMARKS.md)."""
    wanted = set(res["regenerated"])
    fresh = with_comparison(write_markdown(res), res["previous"], flatten(res), wanted, reason)
    old = markdown.read_text() if markdown.exists() else ""
    stamp = f"Regenerated by `{res['command']}` on {res['date']} ({res['machine']})."
    markdown.write_text(merge_markdown(old, fresh, wanted, stamp))


def render_saved(args) -> int:
    """``--render``: the last run's sections again from perf.json (its numbers, a new ``--reason``)."""
    res = json.loads((args.out / "perf.json").read_text())
    if "regenerated" not in res:
        raise SystemExit("perf.json predates --render (no 'regenerated' sections saved): run the benchmark")
    write_benchmarks(res, args.markdown, args.reason)
    print(f"re-rendered sections {res['regenerated']} of {args.markdown} from {args.out / 'perf.json'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="small scaling sweep, no 100k-sample calibration")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per model pair and batch size")
    ap.add_argument("--skip", action="append", default=[], choices=["inference", "cost", "scaling", "calibration"])
    ap.add_argument("--sections", type=int, nargs="+", choices=sorted(SECTIONS),
                    help="regenerate only these sections; the others stay as BENCHMARKS.md has them")
    ap.add_argument("--before", type=Path, help="section 2: an older onnxfold checkout to time side by side")
    ap.add_argument("--repeats", type=int, default=1, help="section 2: interleaved runs per model (median)")
    ap.add_argument("--cprofile", action="store_true",
                    help="only profile the shipped models' optimize runs (cProfile, top functions to stdout)")
    ap.add_argument("--render", action="store_true",
                    help="only re-render the sections the last run regenerated from perf.json (e.g. with a --reason)")
    reason_argument(ap)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        return render_saved(args)
    work = ROOT / "tools" / "_work" / "perf"
    work.mkdir(parents=True, exist_ok=True)
    if args.cprofile:
        cprofile(args.models.resolve(), work)
        return 0
    wanted = set(args.sections or SECTIONS)
    skip = set(args.skip) | {SECTIONS[n] for n in SECTIONS if n not in wanted}
    cmd = "PYTHONPATH=. python tools/bench_perf.py" + (" --quick" if args.quick else "") \
        + (" --sections " + " ".join(map(str, sorted(wanted))) if args.sections else "") \
        + (f" --before {args.before}" if args.before else "") + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
    res = {"command": cmd, "date": dt.date.today().isoformat(), "machine": machine(), "inference": {},
           "cost": {}, "scaling": [], "calibration": []}
    if "inference" not in skip:
        res["inference"]["CPUExecutionProvider"] = bench_inference(args.models, "CPUExecutionProvider", args.min_time)
    import onnxruntime as ort

    from onnxfold.runtime import resolve_provider

    providers, _notice = resolve_provider("auto")
    if "CUDAExecutionProvider" in providers and "inference" not in skip:
        res["inference"]["CUDAExecutionProvider"] = bench_inference(args.models, "CUDAExecutionProvider",
                                                                    args.min_time)
        res["cuda_note"] = "See the CUDAExecutionProvider table above."
    else:
        res["cuda_note"] = (f"Not measured: no usable CUDA device on this machine (onnxruntime {ort.__version__} "
                            f"providers: {', '.join(ort.get_available_providers())}).")
    if "cost" not in skip:
        res["cost"] = bench_cost(args.models.resolve(), work, before=args.before and args.before.resolve(),
                                 repeats=args.repeats)
    if "scaling" not in skip:
        res["scaling"] = bench_scaling(SCALING_QUICK if args.quick else SCALING_FULL, work)
        png = args.out / "scaling.png"
        if res["scaling"] and plot_scaling(res["scaling"], png):
            res["scaling_png"] = os.path.relpath(png, args.markdown.parent)
    if "calibration" not in skip:
        global CALIB_SIZES
        if args.quick:
            CALIB_SIZES = CALIB_SIZES[:2]
        res["calibration"] = bench_calibration_memory(args.models)
    perf_json = args.out / "perf.json"
    previous = previous_run(args.out, "perf", flatten)
    if args.sections and perf_json.exists():  # keep the numbers of the sections not rerun
        res = {**json.loads(perf_json.read_text()),
               **{k: v for k, v in res.items() if k not in SECTIONS.values() or k not in skip}}
    # what --render needs to redo the comparison once perf.json is replaced
    res.update(previous=previous, regenerated=sorted(wanted))
    perf_json.write_text(json.dumps(res, indent=1, default=float))
    write_benchmarks(res, args.markdown, args.reason)
    print(f"wrote {args.markdown} and {perf_json}")
    fails = [r for rows in res["inference"].values() for r in rows if not (r["ok_b1"] and r["ok_b256"])]
    big = max(res["scaling"], key=lambda r: r["params"]) if res["scaling"] else None
    if fails or (big and big["peak_over_size"] > RSS_LIMIT):
        print(f"checks failed: {len(fails)} inference rows" + (", scaling RSS" if big and
                                                                 big["peak_over_size"] > RSS_LIMIT else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
