"""How many patch rows a conv refit needs per batch: quality against decide time (issue 16).

A conv chain's least-squares refit (repair ``ls``, what the budget search's
folds use) accumulates the Gram of its consumer's input patches over at most
``onnxfold.passes.handlers.MAX_ROWS_PER_BATCH`` output positions per
calibration batch (8192), drawn at random. On ``models/mnist_resnet.onnx``
those Gram products are most of the default budget search's decide stage
(BENCHMARKS.md section 2: decide about 10x calibration). Fewer rows would cut
that cost in proportion; whether the refits stay as good is what this script
measures, without changing onnxfold's default.

For each cap in CAPS, in a fresh process (no cache warmed by another cap):

1. ``onnxfold optimize models/mnist_resnet.onnx`` under the default budget
   search (first, so that nothing before it warmed a cache): decide and
   calibration seconds from the report, the chosen setting, the candidates,
   the final check's agreement on the test split;
2. ``ChannelFoldingPass`` with repair ``ls`` at bench_channels' sparsities,
   selection k-means and magnitude: test accuracy, agreement with the
   original's predictions, and the pass's seconds.

Writes ``tools/results/conv_rows.md`` and ``.json`` (generated: never edit them).

    PYTHONPATH=. python tools/bench_conv_rows.py [--caps 8192 4096 2048 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import PROVIDERS, ROOT, ResultsRun, brief_setting, footer, header, load_shipped  # noqa: E402

MODEL = "mnist_resnet"
CAPS = (8192, 4096, 2048, 1024)
SPARSITIES = (0.25, 0.5, 0.7)  # bench_channels' targets
SELECTS = ("kmeans", "magnitude")
SEED = 0
#: the batch bench_channels folds with (the search uses the CLI's default)
FOLD_BATCH = 250


def one_cap(cap: int, models_dir: Path) -> dict:
    """Every measurement at one cap, in this process (run it in a fresh one)."""
    from onnxfold.cli import main as onnxfold_cli
    from onnxfold.decide import channels as dch
    from onnxfold.passes import handlers
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.channel_folding import ChannelFoldingPass
    from bench_channels import chain_costs

    handlers.MAX_ROWS_PER_BATCH = cap  # read when a conv refit's rows builder is made
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
        t0 = time.perf_counter()
        rc = onnxfold_cli(["optimize", str(models_dir / f"{MODEL}.onnx"), "-o", str(out), "--report", str(rep),
                           "--no-latency", "--quiet"])
        wall = time.perf_counter() - t0
        report = json.loads(rep.read_text())
    verification = report["verification"]["outputs"]
    final = next(iter(verification.values()))
    search = {"exit_code": rc, "wall_s": round(wall, 2), "status": report["status"],
              "calibration_s": report["timings_s"].get("calibration", 0.0),
              "decide_s": report["timings_s"].get("decide", 0.0),
              "candidates": len(report["search"]["evaluated"]), "chosen": report["search"]["chosen"],
              "parameters_ratio": report["ratios"]["parameters"], "final_agreement": final.get("agreement"),
              "final_accuracy": final.get("accuracy_candidate"), "final_samples": final.get("count")}

    shipped = load_shipped(models_dir, MODEL)
    on_test = shipped.judge_on_test()
    _view, widths, per, fixed = chain_costs(shipped.model)
    folds = []
    for target in SPARSITIES:
        r, _share = dch.ratio_for_sparsity(target, widths, per, fixed)
        for select in SELECTS:
            ctx = PassContext(calibration=shipped.calib, providers=PROVIDERS, batch_size=FOLD_BATCH, seed=SEED)
            t0 = time.perf_counter()
            res = ChannelFoldingPass(r, select=select, repair="ls", seed=SEED)(shipped.model, ctx)
            seconds = time.perf_counter() - t0
            verdict = on_test(res.model)
            folds.append({"target_sparsity": target, "ratio": r, "select": select, "test_acc": verdict.accuracy,
                          "agreement": verdict.agreement, "seconds": round(seconds, 2),
                          "test_samples": verdict.samples})
            print(f"cap {cap}: s={target} {select}+ls: acc {verdict.accuracy:.4f} agreement "
                  f"{verdict.agreement:.4f} ({seconds:.1f} s)", flush=True)
    return {"cap": cap, "search": search, "folds": folds}


def flatten(result: dict) -> dict:
    """{row label: {metric: value}} for the comparison with the previous run."""
    rows = {}
    for run in result["runs"]:
        s = run["search"]
        rows[f"cap {run['cap']} search"] = {"final_agreement": s["final_agreement"],
                                             "parameters_ratio": s["parameters_ratio"]}
        for f in run["folds"]:
            rows[f"cap {run['cap']} s={f['target_sparsity']} {f['select']}+ls"] = {
                "test_acc": f["test_acc"], "agreement": f["agreement"]}
    return rows


def render(result: dict) -> str:
    runs = result["runs"]
    caps = [r["cap"] for r in runs]
    lines = header("Conv refit rows per batch: quality against decide time", "bench_conv_rows.py",
                   result["generated"], result["machine"])
    lines += [f"Model: `models/{MODEL}.onnx` with its calibration and test splits. *cap*: the most output positions "
              "(patch rows) a conv refit takes per calibration batch, drawn at random "
              "(`onnxfold.passes.handlers.MAX_ROWS_PER_BATCH`; onnxfold's default is 8192, which this script "
              "does not change). Each cap ran in a fresh process. Times are wall-clock seconds on a shared "
              "2-core machine, single runs.", "",
              "## The default budget search", "",
              "`onnxfold optimize` with no settings: stage seconds from the report; final check on the test split "
              "(agreement with the original's top-1 and the candidate's accuracy).", "",
              "| cap | decide s | calibration s | decide / calibration | candidates | parameters ratio | chosen "
              "| final agreement | final accuracy | status |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for run in runs:
        s = run["search"]
        ratio = s["decide_s"] / max(s["calibration_s"], 1e-9)
        lines.append(f"| {run['cap']} | {s['decide_s']:.2f} | {s['calibration_s']:.2f} | {ratio:.2f} | "
                     f"{s['candidates']} | {s['parameters_ratio']:.3f} | {brief_setting(s['chosen'])} | "
                     f"{s['final_agreement']:.4f} | {s['final_accuracy']:.4f} | {s['status']} |")
    lines += ["", "## Channel folding with the least-squares refit", "",
              "`ChannelFoldingPass(r, select, repair=\"ls\")` at bench_channels' target sparsities (batches of "
              f"{FOLD_BATCH}, seed {SEED}). Cells: test accuracy / agreement with the original's predictions "
              "(pass seconds).", "",
              "| target | r | select | " + " | ".join(f"cap {c}" for c in caps) + " |",
              "|---:|---:|---|" + "---|" * len(caps)]
    for i, f0 in enumerate(runs[0]["folds"]):
        cells = [f"{run['folds'][i]['test_acc']:.2%} / {run['folds'][i]['agreement']:.2%} "
                 f"({run['folds'][i]['seconds']:.1f})" for run in runs]
        lines.append(f"| {f0['target_sparsity']:.0%} | {f0['ratio']:.3f} | {f0['select']} | " + " | ".join(cells)
                     + " |")
    base = runs[0]
    lines += ["", f"Against cap {base['cap']}:"]
    for run in runs[1:]:
        drops = [b["test_acc"] - f["test_acc"] for b, f in zip(base["folds"], run["folds"])]
        same = run["search"]["chosen"] == base["search"]["chosen"]
        speed = base["search"]["decide_s"] / max(run["search"]["decide_s"], 1e-9)
        lines.append(f"- cap {run['cap']}: decide {speed:.2f}x as fast; the search chose "
                     f"{'the same setting' if same else 'another setting'}; fold test accuracy "
                     f"{100 * -max(drops) + 0.0:+.1f} to {100 * -min(drops) + 0.0:+.1f} pp (worst to best row).")
    n_test = base["folds"][0].get("test_samples")
    if n_test:
        lines += ["", f"The test split has {n_test} samples: 0.1 pp is one sample. Single runs with one seed; "
                      "how far another seed's row draw moves these cells was not measured, so differences of a "
                      "few samples are no evidence either way."]
    lines += footer(result["total_seconds"], result["checks"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def options(ap):
        ap.add_argument("--caps", type=int, nargs="+", default=list(CAPS))
        ap.add_argument("--models", type=Path, default=ROOT / "models")
        ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the worker (see main)
        ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
        ap.add_argument("--render", action="store_true", help="only re-render conv_rows.md from conv_rows.json")

    run, args = ResultsRun.from_args(__doc__.split("\n")[0], argv, options)
    if args.one is not None:  # the worker: one cap, in this (fresh) process
        args.json.write_text(json.dumps(one_cap(args.one, args.models)))
        return 0
    if args.render:
        result = json.loads((run.out / "conv_rows.json").read_text())
        run.when, run.where = result.pop("generated"), result.pop("machine")
        run.write("conv_rows", render({**result, "generated": run.when, "machine": run.where}), result, flatten)
        return 0
    if any(c < 1 for c in args.caps):
        print("--caps takes positive row counts", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for cap in args.caps:
            path = Path(tmp) / f"{cap}.json"
            proc = subprocess.run([sys.executable, __file__, "--one", str(cap), "--json", str(path),
                                   "--models", str(args.models)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(f"the run at cap {cap} failed ({proc.returncode})", file=sys.stderr)
                return 1
            runs.append(json.loads(path.read_text()))
    run.check("every search met its budget on the final check",
              all(r["search"]["status"] == "optimized" and r["search"]["exit_code"] == 0 for r in runs))
    result = {"model": MODEL, "caps": args.caps, "sparsities": list(SPARSITIES), "selects": list(SELECTS),
              "runs": runs, "checks": run.checks, "total_seconds": round(run.seconds, 1)}
    run.write("conv_rows", render({**result, "generated": run.when, "machine": run.where}), result, flatten)
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
