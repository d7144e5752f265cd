"""Issue 16's own case: wake-word-shaped detectors with their batch fixed at 1.

Issue 16 was filed on a wake-word detector: 213 k parameters, Flatten -> Gemm
1536->128 -> Relu -> Gemm 128->128 -> Relu -> Gemm 128->1 -> Sigmoid, batch
fixed at 1, 15 k calibration windows, ``--min-agreement 99
--positive-threshold 0.5``; it ran for many minutes, and a detector with a
3264-wide input for over 30. That model is not ours to ship, so this script
builds two of the same shapes (inputs of 16 x 96 and 34 x 96 features, batch
fixed at 1) and trains them with scikit-learn's MLPClassifier on synthetic
keyword windows: smoothed noise, 30 % of windows carrying a shifted keyword
template at varying strength. Each detector is trained on 15,000 windows, calibrated on
15,000 others and evaluated on 5,000 more (about 99 % test accuracy).

Each detector is optimized with the issue's command in a fresh process; with
``--before DIR`` the onnxfold checkout in DIR runs the same command, the
two interleaved per detector. Stage seconds come from the reports.

Writes ``tools/results/wakeword.json`` and the block between
``<!-- begin:bench_wakeword -->`` and ``<!-- end:bench_wakeword -->`` of
BENCHMARKS.md.

    PYTHONPATH=. python tools/bench_wakeword.py [--before DIR] [--frames 16 34]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (ROOT, brief_setting, checkout_commit, machine, now, previous_run, reason_argument, save_block,  # noqa: E402
                    setting_knobs)
from perf_cost import run_cli  # noqa: E402

BEGIN, END = "<!-- begin:bench_wakeword -->", "<!-- end:bench_wakeword -->"
FEATURES = 96  # per frame
HIDDEN = 128
TRAIN, CALIB, EVAL = 15000, 15000, 5000
SEED = 16
#: the issue's command, after the model and its data
BUDGET = ["--min-agreement", "99", "--positive-threshold", "0.5"]


def windows(count: int, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic feature windows (frames x FEATURES, float32) and
    their labels: noise smoothed over neighbouring frames and features; a
    window is positive with probability 0.3 and then carries a keyword
    template, shifted by up to 2 frames, at an amplitude of 0.25-0.8 (the
    noise's is about 0.6)."""
    x = rng.normal(size=(count, frames, FEATURES)).astype(np.float32)
    x = (x + np.roll(x, 1, 2) + np.roll(x, 1, 1)) / 3
    template = (np.sin(np.linspace(0, 6, frames))[:, None] * np.cos(np.linspace(0, 9, FEATURES))[None, :])
    positive = rng.random(count) < 0.3
    shift = rng.integers(-2, 3, count)
    amplitude = rng.uniform(0.25, 0.8, count).astype(np.float32)
    for s in range(-2, 3):
        m = positive & (shift == s)
        x[m] += amplitude[m, None, None] * np.roll(template, s, 0).astype(np.float32)[None]
    return x, positive.astype(np.int64)


def detector(frames: int, coefs: list[np.ndarray], intercepts: list[np.ndarray]) -> onnx.ModelProto:
    """Flatten -> (Gemm -> Relu) x 2 -> Gemm -> Sigmoid on a [1, frames,
    FEATURES] input, with a trained MLPClassifier's weights."""
    nodes = [helper.make_node("Flatten", ["x"], ["flat"])]
    inits, prev = [], "flat"
    for i, (w, b) in enumerate(zip(coefs, intercepts)):
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T, dtype=np.float32), f"W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"B{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [f"gemm{i}"], transB=1))
        prev = f"gemm{i}"
        if i < len(coefs) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"relu{i}"]))
            prev = f"relu{i}"
    nodes.append(helper.make_node("Sigmoid", [prev], ["prob"]))
    graph = helper.make_graph(nodes, "wakeword", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [1, frames, FEATURES])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # make_model's default is newer than onnxruntime takes
    onnx.checker.check_model(model)
    return model


def build(frames: int, work: Path) -> tuple[Path, Path, Path, float, int]:
    """The detector for ``frames`` frames, its calibration and evaluation
    data (.npz with labels) in ``work``, its test accuracy and its parameters."""
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(SEED + frames)
    x, y = windows(TRAIN + CALIB + EVAL, frames, rng)
    flat = x.reshape(len(x), -1)
    clf = MLPClassifier(hidden_layer_sizes=(HIDDEN, HIDDEN), max_iter=30, random_state=SEED)
    clf.fit(flat[:TRAIN], y[:TRAIN])
    accuracy = float(clf.score(flat[-EVAL:], y[-EVAL:]))
    stem = work / f"wakeword_{frames * FEATURES}"
    model = detector(frames, clf.coefs_, clf.intercepts_)
    onnx.save(model, f"{stem}.onnx")
    np.savez(f"{stem}.calib.npz", x=x[TRAIN:TRAIN + CALIB], labels=y[TRAIN:TRAIN + CALIB])
    np.savez(f"{stem}.eval.npz", x=x[-EVAL:], labels=y[-EVAL:])
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return Path(f"{stem}.onnx"), Path(f"{stem}.calib.npz"), Path(f"{stem}.eval.npz"), accuracy, params


def _row(rep: dict) -> dict:
    t = rep["timings_s"]
    search = rep.get("search") or {}
    return {"wall_s": rep["_wall_s"], "calibration_s": t.get("calibration", 0.0), "decide_s": t.get("decide", 0.0),
            "ratio": t.get("decide", 0.0) / max(t.get("calibration", 0.0), 1e-9),
            "candidates": len(search.get("evaluated") or []), "chosen": search.get("chosen"),
            "parameters_ratio": rep["ratios"]["parameters"], "status": rep["status"],
            "failures": (rep.get("budget") or {}).get("failures") or []}


def run(frame_counts: list[int], work: Path, before: Path | None) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for frames in frame_counts:
        model, calib, evaluation, accuracy, params = build(frames, work)
        row = {"input_width": frames * FEATURES, "parameters": params, "test_accuracy": accuracy}
        for label, code in (("before", before), ("after", ROOT)):
            if code is None:
                continue
            rep = run_cli([str(model), "--calib", str(calib), "--eval", str(evaluation), "--no-auto-data",
                           "--no-latency", *BUDGET, "-o", str(work / f"{model.stem}.{label}.onnx")],
                          work / f"{model.stem}.{label}.json", code=code)
            row[label] = _row(rep)
            print(frames * FEATURES, label, row[label], flush=True)
        rows.append(row)
    return rows


def flatten(payload: dict) -> dict:
    return {f"input {r['input_width']}": {"wall s": r["after"]["wall_s"],
                                           "decide / calibration": r["after"]["ratio"]} for r in payload["rows"]}


def section(r: dict) -> str:
    rows = r["rows"]
    has_before = all("before" in row for row in rows)
    lines = [BEGIN, "### Issue 16's case: wake-word-shaped detectors, batch fixed at 1", "",
             f"Generated by `PYTHONPATH=. python tools/bench_wakeword.py"
             + (" --before DIR" if has_before else "") + f"` ({r['machine']}), {r['generated']}. "
             "Flatten -> Gemm (input width -> 128) -> Relu -> Gemm 128 -> 128 -> Relu -> Gemm 128 -> 1 -> Sigmoid, "
             f"batch fixed at 1, trained by scikit-learn on {TRAIN:,} synthetic keyword windows, calibrated on "
             f"{CALIB:,} others and evaluated on {EVAL:,} more; `onnxfold optimize MODEL --calib ... --eval ... "
             f"{' '.join(BUDGET)}` in a fresh process per run"
             + (f", the onnxfold before issue 16's changes ({r['before_commit']}) and this one interleaved per "
                "detector" if has_before else "") + ". Stage seconds from the reports.", "",
             "| input width | parameters | test accuracy | " + ("wall s before | " if has_before else "")
             + "wall s | " + ("speed-up | decide / calibration before | " if has_before else "")
             + "calibration s | decide s | decide / calibration | candidates | parameters ratio | chosen | status |"
             + (" same setting | status before |" if has_before else ""),
             "|---:|---:|---:|" + ("---:|" if has_before else "") + "---:|" + ("---:|---:|" if has_before else "")
             + "---:|---:|---:|---:|---:|---|---|" + ("---|---|" if has_before else "")]
    for row in rows:
        a = row["after"]
        cells = [f"{row['input_width']}", f"{row['parameters']:,}", f"{row['test_accuracy']:.3f}"]
        if has_before:
            cells.append(f"{row['before']['wall_s']:.1f}")
        cells.append(f"{a['wall_s']:.1f}")
        if has_before:
            cells += [f"{row['before']['wall_s'] / a['wall_s']:.1f} x", f"{row['before']['ratio']:.2f}"]
        cells += [f"{a['calibration_s']:.2f}", f"{a['decide_s']:.2f}", f"{a['ratio']:.2f}", f"{a['candidates']}",
                  f"{a['parameters_ratio']:.3f}", brief_setting(a["chosen"]), a["status"]]
        if has_before:
            cells += ["yes" if setting_knobs(row["before"]["chosen"]) == setting_knobs(a["chosen"]) else "no",
                      row["before"]["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [f"input {row['input_width']}: {'; '.join(row['after'].get('failures') or ['see its report'])}"
              for row in rows if row["after"]["status"] != "optimized"]
    lines += ["", "*status*: `optimized`, the chosen model met the budget on the evaluation windows and was "
              "written; `final_check_failed`, its 95 % upper bound on the evaluation windows missed the budget, "
              "so the original was written instead (said on stderr; `--check` exits 1)"
              + (f" - {'; '.join(failed)}" if failed else "") + "."
              + (" The onnxfold before issue 16 judged its final check by the observed rates, not their bounds."
                 if has_before else "")]
    ratios = [row["after"]["ratio"] for row in rows]
    text = f"decide / calibration: {min(ratios):.2f}-{max(ratios):.2f}"
    if has_before:
        was = [row["before"]["ratio"] for row in rows]
        stages = "; ".join(f"input {row['input_width']}: calibration {row['before']['calibration_s']:.1f} -> "
                           f"{row['after']['calibration_s']:.2f} s, decide {row['before']['decide_s']:.1f} -> "
                           f"{row['after']['decide_s']:.2f} s" for row in rows)
        text += (f", was {min(was):.2f}-{max(was):.2f}: both stages got faster together ({stages}). The old "
                 "calibration ran the fixed-batch detectors one window at a time; now they run in batches on a "
                 "copy with a symbolic batch axis")
    lines += ["", text + ". "
              f"1-minute load average after the run: {r['load_average_1min_after']}. Raw numbers: "
              "`tools/results/wakeword.json`.", "", *r.get("against_previous", []), END]
    return "\n".join(lines)


def write(result: dict, out_json: Path, markdown: Path, reason: str | None) -> None:
    print(save_block(result, out_json, markdown, (BEGIN, END), section, flatten(result),
                     {"wall s", "decide / calibration"}, reason, level=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 34],
                    help=f"frames of {FEATURES} features per window (16: the issue's 1536-wide input, 34: 3264)")
    ap.add_argument("--before", type=Path, help="an older onnxfold checkout to run side by side")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--render", action="store_true", help="only rewrite the BENCHMARKS.md block from the json")
    reason_argument(ap)
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.frames):
        ap.error("--frames takes positive frame counts")
    if args.before is not None and not (args.before / "onnxfold" / "cli.py").is_file():
        ap.error(f"--before {args.before}: not an onnxfold checkout (no onnxfold/cli.py)")
    out_json = ROOT / "tools" / "results" / "wakeword.json"
    if args.render:
        write(json.loads(out_json.read_text()), out_json, Path(args.out), args.reason)
        return 0
    result = {"generated": now(), "machine": machine(),
              "rows": run(args.frames, ROOT / "tools" / "_work" / "wakeword", args.before and args.before.resolve())}
    if args.before is not None:
        result["before_commit"] = checkout_commit(args.before)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    result["previous"] = previous_run(out_json.parent, "wakeword", flatten)
    write(result, out_json, Path(args.out), args.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
