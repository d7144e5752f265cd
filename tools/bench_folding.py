"""Benchmark neuron folding on the shipped models.

    PYTHONPATH=. python tools/bench_folding.py [--models DIR] [--out tools/results] [--only NAME]

For every ``models/NAME.onnx`` (with ``NAME.calib.npz`` / ``NAME.test.npz``),
every ratio r in RATIOS (share of each hidden layer's neurons removed) and
every (selection, repair) in CONFIGS, runs ``FoldingPass`` with the
calibration split (the pass holds out a fifth of it to choose the ridge
strength of ``ls``) and reports, on the test split:

* size: parameters of all dense layers (weights, biases, linear paths)
  relative to the original;
* test accuracy and agreement with the original model's predictions.

Writes ``OUT/folding.md`` and ``OUT/folding.json``, prints the tables and the
mnist check line (kmeans+ls at r = 0.7 loses at most 0.5 pp of test accuracy);
exits 1 if that check fails.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _bench import PROVIDERS, against_previous, dense_params, header, load_shipped, machine, model_arguments, now, \
    ready_models, write_results

from onnxfold.passes.base import PassContext
from onnxfold.passes.folding import FoldingPass

MODELS = ("mnist_mlp", "digits_mlp", "digits_seq_mlp", "cancer_mlp_paper")
RATIOS = (0.1, 0.25, 0.5, 0.7, 0.8, 0.9)
#: (select, repair); kmeans+none is the paper's data-free method.
CONFIGS = (("kmeans", "none"), ("kmeans", "ar"), ("kmeans", "repair"), ("kmeans", "ls"),
           ("magnitude", "none"), ("magnitude", "ls"))
CHECK_MODEL, CHECK_CONFIG, CHECK_RATIO, LOSS_BUDGET_PP = "mnist_mlp", ("kmeans", "ls"), 0.7, 0.5
SEED = 0


def label(config) -> str:
    return "+".join(config)


def bench_model(models_dir: Path, name: str) -> dict:
    shipped = load_shipped(models_dir, name)
    model, calib = shipped.model, shipped.calib
    on_test = shipped.judge_on_test()
    base = on_test(model)
    params0, _ = dense_params(model)
    runs = []
    for r in RATIOS:
        for select, repair in CONFIGS:
            t0 = time.perf_counter()
            res = FoldingPass(r, select=select, repair=repair, seed=SEED)(
                model, PassContext(calibration=calib, providers=PROVIDERS))
            seconds = time.perf_counter() - t0
            test = on_test(res.model)
            params, _ = dense_params(res.model)
            runs.append(dict(ratio=r, select=select, repair=repair, seconds=round(seconds, 3),
                             params=params, size=params / params0, correct=test.correct,
                             accuracy=test.accuracy, agreement=test.agreement,
                             widths=[lr.width_after for lr in res.layers], layers=[lr.to_dict() for lr in res.layers]))
            print(f"  r={r:<4g} {label((select, repair)):16s} size {runs[-1]['size']:.4f}"
                  f" acc {runs[-1]['accuracy']:.2%} agree {runs[-1]['agreement']:.2%} ({seconds:.2f}s)", flush=True)
    return dict(model=name, params=params0, correct=base.correct, accuracy=base.accuracy,
                test_samples=base.samples, calib_samples=calib.num_samples,
                widths=[lr.width_before for lr in res.layers], runs=runs)


def check(result: dict) -> tuple[bool, str]:
    run = next(r for r in result["runs"]
               if (r["select"], r["repair"]) == CHECK_CONFIG and r["ratio"] == CHECK_RATIO)
    lost = result["correct"] - run["correct"]
    # in whole test samples, so that no float rounding decides the verdict
    ok = lost * 100 <= LOSS_BUDGET_PP * result["test_samples"]
    line = (f"CHECK {result['model']} {label(CHECK_CONFIG)} r={CHECK_RATIO:g}: test accuracy {run['accuracy']:.2%}"
            f" vs original {result['accuracy']:.2%} ({(run['accuracy'] - result['accuracy']) * 100:+.2f} pp,"
            f" budget -{LOSS_BUDGET_PP} pp) at size {run['size']:.4f} -> {'PASS' if ok else 'FAIL'}")
    return ok, line


def flatten(payload: dict) -> dict:
    """Every cell of the tables, for the comparison with the previous run."""
    return {f"{res['model']} r={x['ratio']:g} {label((x['select'], x['repair']))}":
            {"accuracy": x["accuracy"], "agreement": x["agreement"], "size": x["size"]}
            for res in payload["results"] for x in res["runs"]}


def render(results: list[dict], checks: list[str], when: str, where: str) -> str:
    out = header("Neuron folding benchmark", "bench_folding.py", when, where) + [
        "r: share of every hidden layer's neurons removed (k = round(n·(1−r)) kept). Size: parameters of all"
        " dense layers (weights, biases, linear paths) relative to the original; it is the same for every"
        " method at one r. Each cell: test accuracy / agreement with the original's predicted class, test"
        " split. Methods: *kmeans* merges k-means clusters of `[w_in, b, w_out]` (model folding);"
        " *magnitude* keeps the k neurons with the largest incoming rows (structured pruning). Repairs:"
        " *none* (kmeans+none is the paper's data-free folding), *ar* (Fold-AR, data-free), *repair* (REPAIR:"
        " mean/std of every merged pre-activation matched on calibration data), *ls* (ridge least-squares"
        " refit of each consumer, layer by layer, ridge chosen on a held-out fifth of the calibration data)."
        f" Seed {SEED}; calibration split only for fitting. Times: wall-clock seconds of the pass on a"
        " shared machine, indicative only; k-means results are memoised, so kmeans+none includes the"
        " clustering and the other kmeans rows at the same r reuse it.", ""]
    for res in results:
        configs = [label(c) for c in CONFIGS]
        out += [f"## {res['model']}", "",
                f"Hidden widths {'-'.join(map(str, res['widths']))}; {res['params']:,} dense parameters;"
                f" original test accuracy {res['accuracy']:.2%} ({res['test_samples']} test,"
                f" {res['calib_samples']} calibration samples).", "",
                "| r | size | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
        for r in RATIOS:
            runs = [x for x in res["runs"] if x["ratio"] == r]
            cells = [f"{x['accuracy']:.2%} / {x['agreement']:.2%}" for x in runs]
            out.append(f"| {r:g} | {runs[0]['size']:.4f} | " + " | ".join(cells) + " |")
        out += ["", "Mean pass time (s): " + ", ".join(
            f"{label(c)} {sum(x['seconds'] for x in res['runs'] if (x['select'], x['repair']) == c) / len(RATIOS):.2f}"
            for c in CONFIGS), ""]
    out += ["## Checks", ""] + [f"- {c}" for c in checks]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = model_arguments(__doc__.split("\n")[0], MODELS, wait_s=0.0).parse_args(argv)
    ready = ready_models(args, MODELS)
    when, where = now(), machine()
    results, checks, ok = [], [], True
    for name in ready:
        print(f"== {name}", flush=True)
        res = bench_model(args.models, name)
        results.append(res)
        if name == CHECK_MODEL:
            passed, line = check(res)
            ok &= passed
            checks.append(line)
            print(line, flush=True)
    payload = dict(generated=when, machine=where, results=results)
    previous = against_previous(args.out, "folding", payload, flatten, {"size"}, args.reason)
    write_results(args.out, "folding", render(results, checks, when, where) + "\n".join(["", *previous]), payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
