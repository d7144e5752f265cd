"""How many patch rows a conv refit needs per batch: quality against decide time (issue 16).

A conv chain's least-squares refit (repair ``ls``, what the budget search's
folds use) accumulates the Gram of its consumer's input patches over at most
``onnxfold.passes.handlers.MAX_ROWS_PER_BATCH`` output positions per
calibration batch, drawn at random (2048 since this study; 8192 before).
Those Gram products are most of a conv model's default budget search's
decide stage (on ``models/mnist_resnet.onnx`` with 8192 rows, decide was 10x
calibration: BENCHMARKS.md section 2). Fewer rows cut that cost in
proportion; whether the refits stay as good is what this script measures, on
two conv models:

* ``mnist_resnet`` (shipped): residual blocks of 3x3 convs 16 -> 128 -> 16 on
  7 x 7 maps (refits of 459 to 1,152 patch features, 49 positions per image);
* ``mnist_cnn`` (built here, into tools/_work/conv_rows/, when missing): a
  plain CNN, 3x3 convs 1 -> 32 -> 64 -> 64 -> 64 with bias and ReLU, strided
  to 14 x 14 and 7 x 7 maps (refits of 288 patch features on 196 positions per
  image and of 576 on 49), the same digits and splits as mnist_resnet, trained
  by tools/build_models.py's training loop (torch, CPU, about 40 s).

For each model and each cap in CAPS, in a fresh process (no cache warmed by
another run):

1. ``onnxfold optimize MODEL.onnx`` under the default budget search (first,
   so that nothing before it warmed a cache): decide and calibration seconds
   from the report, the chosen setting, the candidates, the final check's
   agreement on the test split;
2. ``ChannelFoldingPass`` with repair ``ls`` at bench_channels' sparsities,
   selection k-means and magnitude: test accuracy, agreement with the
   original's predictions, and the pass's seconds.

Writes ``tools/results/conv_rows.md`` and ``.json`` (generated: never edit them).

    PYTHONPATH=. python tools/bench_conv_rows.py [--caps 8192 2048] [--seeds 10]   # ~9 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import PROVIDERS, ROOT, ResultsRun, brief_setting, footer, header, load_shipped  # noqa: E402

MODELS = ("mnist_resnet", "mnist_cnn")
BUILT = ("mnist_cnn",)  # not shipped: built into WORK by build_cnn
WORK = ROOT / "tools" / "_work" / "conv_rows"
#: 8192: the cap before this study; 2048: onnxfold's default since (other caps: --caps)
CAPS = (8192, 2048)
SPARSITIES = (0.25, 0.5, 0.7)  # bench_channels' targets
SELECTS = ("kmeans", "magnitude")
SEED = 0
#: the default budget search runs once per seed (its fit / select split, k-means and row draws): whether
#: a cap changes what the search returns is told from the spread over seeds, not from one run
SEARCH_SEEDS = tuple(range(10))
#: the batch bench_channels folds with (the search uses the CLI's default)
FOLD_BATCH = 250


def plain_cnn():
    """mnist_cnn: Conv3x3(1->32, stride 2)-ReLU (14 x 14), Conv3x3(32->64)-ReLU,
    Conv3x3(64->64, stride 2)-ReLU (7 x 7), Conv3x3(64->64)-ReLU,
    GlobalAveragePool, Linear(64, 10); convs with bias, no batch norm (the
    exporter's other conv form). Strided convs downsample: onnxfold's channel
    chains do not run through a MaxPool between two convs."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(64, 10))


def build_cnn(out: Path) -> Path:
    """Train and export mnist_cnn into ``out`` (with its calibration and test
    splits) unless it is there already; the model's path."""
    import build_models as bm

    path = out / "mnist_cnn.onnx"
    if all((out / f"mnist_cnn{ext}").exists() for ext in (".onnx", ".calib.npz", ".test.npz")):
        return path
    out.mkdir(parents=True, exist_ok=True)
    spec = bm.Spec(name="mnist_cnn", architecture=plain_cnn.__doc__.split(": ", 1)[1].split(";")[0],
                   data_source="as mnist_resnet", load=bm.load_mnist_images, build=plain_cnn,
                   epochs=20, batch_size=64, lr=3e-3, weight_decay=5e-4, lr_schedule="cosine",
                   allowed_ops=frozenset({"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}),
                   required_ops=frozenset({"Conv", "Relu", "Gemm"}),
                   expected_form="Conv with bias per conv layer", preprocessing="as mnist_resnet",
                   split_sizes=bm.RESNET_SIZES)
    print(f"building {path} (about 30 s)", flush=True)
    data = spec.load()
    # a training seed of its own: build_models gives its models SEED + 1000 * (position in SPECS + 1)
    model = bm.train(spec, data, bm.SEED + 77)
    bm.export(model, spec, data, str(path))
    bm.check_export(model, spec, data, str(path))
    bm.save_split(str(out / "mnist_cnn.calib.npz"), data.x_calib, data.y_calib)
    bm.save_split(str(out / "mnist_cnn.test.npz"), data.x_test, data.y_test)
    return path


def model_dir(name: str, models_dir: Path) -> Path:
    return WORK if name in BUILT else models_dir


def one_search(name: str, models_dir: Path, seed: int) -> dict:
    """``onnxfold optimize`` under the default budget search with ``seed`` (its splits, k-means and row
    draws), through the CLI's entry point; what its report says."""
    from onnxfold.cli import main as onnxfold_cli

    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
        t0 = time.perf_counter()
        rc = onnxfold_cli(["optimize", str(models_dir / f"{name}.onnx"), "-o", str(out), "--report", str(rep),
                           "--no-latency", "--quiet", "--seed", str(seed)])
        wall = time.perf_counter() - t0
        report = json.loads(rep.read_text())
    # a chosen model that failed onnxfold's own final check is not written (the run falls back):
    # no verification of it in the report, only the fallback's account
    verification = (report.get("verification") or {}).get("outputs") or {}
    final = next(iter(verification.values()), {})
    fallback = (report.get("budget") or {}).get("fallback") or {}
    return {"seed": seed, "exit_code": rc, "wall_s": round(wall, 2), "status": report["status"],
            "calibration_s": report["timings_s"].get("calibration", 0.0),
            "decide_s": report["timings_s"].get("decide", 0.0),
            "candidates": len(report["search"]["evaluated"]), "chosen": report["search"]["chosen"],
            "parameters_ratio": report["ratios"]["parameters"], "final_agreement": final.get("agreement"),
            "final_accuracy": final.get("accuracy_candidate"), "final_samples": final.get("count"),
            "fallback_from_ratio": fallback.get("chosen_parameter_ratio"),
            "fallback_failures": fallback.get("chosen_failures"), "fallback_returned": fallback.get("returned")}


def one_cap(cap: int, name: str, models_dir: Path, seeds=SEARCH_SEEDS) -> dict:
    """Every measurement of one model at one cap, in this process (run it in a fresh one)."""
    from onnxfold.decide import channels as dch
    from onnxfold.passes import handlers
    from onnxfold.passes.base import PassContext
    from onnxfold.passes.channel_folding import ChannelFoldingPass
    from bench_channels import chain_costs

    handlers.MAX_ROWS_PER_BATCH = cap  # read when a conv refit's rows builder is made
    searches = [one_search(name, models_dir, seed) for seed in seeds]  # first: nothing warmed a cache

    shipped = load_shipped(models_dir, name)
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
            print(f"{name} cap {cap}: s={target} {select}+ls: acc {verdict.accuracy:.4f} agreement "
                  f"{verdict.agreement:.4f} ({seconds:.1f} s)", flush=True)
    return {"cap": cap, "model": name, "searches": searches, "folds": folds}


def flatten(result: dict) -> dict:
    """{row label: {metric: value}} for the comparison with the previous run."""
    rows = {}
    for run in result["runs"]:
        name = run.get("model", "mnist_resnet")  # files before mnist_cnn: the resnet only, one search
        for s in _searches(run):
            rows[f"{name} cap {run['cap']} search seed {s['seed']}"] = {"final_agreement": s["final_agreement"],
                                                                         "parameters_ratio": s["parameters_ratio"]}
        for f in run["folds"]:
            rows[f"{name} cap {run['cap']} s={f['target_sparsity']} {f['select']}+ls"] = {
                "test_acc": f["test_acc"], "agreement": f["agreement"]}
    return rows


def _searches(run: dict) -> list[dict]:
    return run.get("searches") or [{**run["search"], "seed": 0}]  # files before the seeds: one search


def _seeds(runs: list[dict]) -> list[int]:
    return list(dict.fromkeys(x["seed"] for r in runs for x in _searches(r)))


def _fell_back(search: dict) -> bool:
    return search.get("fallback_from_ratio") is not None


def _fraction(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def _median(run: dict, value) -> float:
    """The median over a run's seeds of ``value(search)``."""
    return statistics.median(value(x) for x in _searches(run))


def _search_tables(runs: list[dict]) -> list[str]:
    """One model's default budget searches: per cap (medians over seeds), then per seed."""
    lines = ["### The default budget search", "",
             f"`onnxfold optimize` with no settings but `--seed` (seeds {', '.join(map(str, _seeds(runs)))}: each "
             "draws its own fit / select split, k-means starts and refit rows): stage seconds from the report; "
             "final check on the test split. *Returned*: the parameter ratio of the model written, per seed; "
             "*fell back*: the chosen model failed onnxfold's own final check, so the original (or lossless) "
             "model was written instead.", "",
             "| cap | decide s (median) | calibration s (median) | decide / calibration (median) | candidates "
             "(median) | returned, per seed | fell back | lowest final agreement |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for run in runs:
        ss = _searches(run)
        returned = " · ".join(f"{x['parameters_ratio']:.3f}" + (" (fell back)" if _fell_back(x) else "") for x in ss)
        agreements = [x["final_agreement"] for x in ss if x["final_agreement"] is not None]
        lines.append(f"| {run['cap']} | {_median(run, lambda x: x['decide_s']):.2f} | "
                     f"{_median(run, lambda x: x['calibration_s']):.2f} | "
                     f"{_median(run, lambda x: x['decide_s'] / max(x['calibration_s'], 1e-9)):.2f} | "
                     f"{_median(run, lambda x: x['candidates']):g} | {returned} | "
                     f"{sum(map(_fell_back, ss))} of {len(ss)} | {_fraction(min(agreements, default=None))} |")
    lines += ["", "Per seed:", "", "| cap | seed | decide s | candidates | chosen | returned | final agreement | "
              "final accuracy | status |", "|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for run in runs:
        for x in _searches(run):
            status = x["status"]
            if _fell_back(x):
                status += (f": the chosen model (ratio {x['fallback_from_ratio']:.3f}) failed the final check "
                           f"({'; '.join(x.get('fallback_failures') or [])}); the "
                           f"{x.get('fallback_returned') or 'original'} model was written")
            lines.append(f"| {run['cap']} | {x['seed']} | {x['decide_s']:.2f} | {x['candidates']} | "
                         f"{brief_setting(x['chosen'])} | {x['parameters_ratio']:.3f} | "
                         f"{_fraction(x['final_agreement'])} | {_fraction(x['final_accuracy'])} | {status} |")
    return lines


def _fold_table(runs: list[dict]) -> list[str]:
    """One model's least-squares folds, a column per cap."""
    lines = ["### Channel folding with the least-squares refit", "",
             "`ChannelFoldingPass(r, select, repair=\"ls\")` at bench_channels' target sparsities (batches of "
             f"{FOLD_BATCH}, seed {SEED}). Cells: test accuracy / agreement with the original's predictions "
             "(pass seconds).", "",
             "| target | r | select | " + " | ".join(f"cap {r['cap']}" for r in runs) + " |",
             "|---:|---:|---|" + "---|" * len(runs)]
    for i, f0 in enumerate(runs[0]["folds"]):
        cells = [f"{run['folds'][i]['test_acc']:.2%} / {run['folds'][i]['agreement']:.2%} "
                 f"({run['folds'][i]['seconds']:.1f})" for run in runs]
        lines.append(f"| {f0['target_sparsity']:.0%} | {f0['ratio']:.3f} | {f0['select']} | " + " | ".join(cells)
                     + " |")
    return lines


def _against_first_cap(runs: list[dict]) -> list[str]:
    """Each later cap's decide speed, search outcomes and fold accuracy against the first cap's."""
    base = runs[0]
    lines = [f"Against cap {base['cap']}:"]
    for run in runs[1:]:
        drops = [b["test_acc"] - f["test_acc"] for b, f in zip(base["folds"], run["folds"])]
        same = sum(x["chosen"] == y["chosen"] for x, y in zip(_searches(base), _searches(run)))
        speed = _median(base, lambda x: x["decide_s"]) / max(_median(run, lambda x: x["decide_s"]), 1e-9)
        lines.append(f"- cap {run['cap']}: decide {speed:.2f}x as fast (medians); the search chose the same setting "
                     f"with {same} of {len(_searches(run))} seeds and fell back with "
                     f"{sum(map(_fell_back, _searches(run)))} (against {sum(map(_fell_back, _searches(base)))}); "
                     "fold test accuracy "
                     f"{100 * -max(drops) + 0.0:+.1f} to {100 * -min(drops) + 0.0:+.1f} pp (worst to best row).")
    n_test = base["folds"][0].get("test_samples")
    if n_test:
        lines += ["", f"The test split has {n_test} samples: 0.1 pp is one sample. Single runs with one seed; "
                      "how far another seed's row draw moves these cells was not measured, so differences of a "
                      "few samples are no evidence either way."]
    return lines


def _model_section(name: str, runs: list[dict]) -> list[str]:
    """One model's tables: its searches per cap, its folds per cap, each cap against the first."""
    where = f"`tools/_work/conv_rows/{name}.onnx`, built by this script," if name in BUILT \
        else f"`models/{name}.onnx`"
    return [f"## {name}", "", f"{where} with its calibration and test splits.", "", *_search_tables(runs), "",
            *_fold_table(runs), "", *_against_first_cap(runs), ""]


def render(result: dict) -> str:
    runs = result["runs"]
    lines = header("Conv refit rows per batch: quality against decide time", "bench_conv_rows.py",
                   result["generated"], result["machine"])
    lines += ["*cap*: the most output positions (patch rows) a conv refit takes per calibration batch, drawn at "
              "random (`onnxfold.passes.handlers.MAX_ROWS_PER_BATCH`; onnxfold's default when this ran: "
              f"{result['default_cap']}, which this script sets per run and does not change). Each model and cap "
              "ran in a fresh process. Times are wall-clock seconds on a shared 2-core machine: medians over the "
              "seeds for the searches, single runs for the folds.", ""]
    for name in dict.fromkeys(r["model"] for r in runs):
        lines += _model_section(name, [r for r in runs if r["model"] == name])
    lines += footer(result["total_seconds"], result["checks"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def options(ap):
        ap.add_argument("--caps", type=int, nargs="+", default=list(CAPS))
        ap.add_argument("--seeds", type=int, default=len(SEARCH_SEEDS),
                        help=f"budget searches per model and cap, with seeds 0..N-1 (default {len(SEARCH_SEEDS)})")
        ap.add_argument("--models", type=Path, default=ROOT / "models")
        ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the worker (see main)
        ap.add_argument("--name", help=argparse.SUPPRESS)
        ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
        ap.add_argument("--render", action="store_true", help="only re-render conv_rows.md from conv_rows.json")

    run, args = ResultsRun.from_args(__doc__.split("\n")[0], argv, options)
    if args.one is not None:  # the worker: one model at one cap, in this (fresh) process
        args.json.write_text(json.dumps(one_cap(args.one, args.name, model_dir(args.name, args.models),
                                                seeds=range(args.seeds))))
        return 0
    if args.render:
        result = json.loads((run.out / "conv_rows.json").read_text())
        run.when, run.where = result.pop("generated"), result.pop("machine")
        run.write("conv_rows", render({**result, "generated": run.when, "machine": run.where}), result, flatten)
        return 0
    if any(c < 1 for c in args.caps) or args.seeds < 1:
        print("--caps takes positive row counts, --seeds a positive count", file=sys.stderr)
        return 2
    from onnxfold.passes import handlers

    build_cnn(WORK)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for cap in args.caps:
                path = Path(tmp) / f"{name}.{cap}.json"
                proc = subprocess.run([sys.executable, __file__, "--one", str(cap), "--name", name, "--json",
                                       str(path), "--models", str(args.models), "--seeds", str(args.seeds)], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                if proc.returncode != 0:
                    print(f"the run of {name} at cap {cap} failed ({proc.returncode})", file=sys.stderr)
                    return 1
                runs.append(json.loads(path.read_text()))
    # a search whose chosen model fails the final check (and falls back) is an outcome to report, not a
    # failed run: which cap it happens at is down to the rows drawn (tools/results/budget.md: how often)
    run.check("every search finished (exit code 0) and returned a model that met the budget on the final check, "
              "or fell back", all(x["exit_code"] == 0 and x["status"] in ("optimized", "final_check_failed")
                                  for r in runs for x in _searches(r)))
    result = {"models": list(MODELS), "caps": args.caps, "default_cap": handlers.MAX_ROWS_PER_BATCH,
              "sparsities": list(SPARSITIES), "selects": list(SELECTS), "runs": runs, "checks": run.checks,
              "total_seconds": round(run.seconds, 1)}
    run.write("conv_rows", render({**result, "generated": run.when, "machine": run.where}), result, flatten)
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
