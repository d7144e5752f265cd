"""Budgets on data the tool never saw: a hold-out study, and the search vs fixed settings.

Section 1, the hold-out study. For every shipped model (NAME.onnx with
NAME.calib.npz and NAME.test.npz) and three budgets (accuracy drop <= 0.5 pp,
top-1 agreement >= 99.5 %, >= 99 %), ``onnxfold.optimize`` runs with the
calibration data alone, over 10 seeds (the seed draws the fit / select /
final-check split and seeds k-means). The test split, never shown to
onnxfold, then judges the returned model: how often it meets the budget, and
the parameter ratios reached. Next to them: onnxsim 0.8.1's structured Wanda
pruning followed by its ridge refit (``apply_pruning_finetune``), given the
same calibration data, at the largest sparsity (step 0.05) that meets the
budget on the test split: an oracle that looks at the test data to choose, the
most favourable reading for the peer.

Section 2 compares, under the default budget, the search with the best single
fixed setting (one linearity threshold T, one fold ratio r, one selection
method for every layer), each judged as the search judges candidates on the
held-out calibration split and then on the test split.

    python tools/bench_budget.py [--models mnist_mlp,digits_mlp] [--seeds 10] [--out tools/results/budget.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from _bench import ROOT, Judge, compare_lines, load_shipped, machine, previous_run, reason_argument

import onnxfold
from onnxfold.api import split_data
from onnxfold.decide.budget import Budget
from onnxfold.find import find_dense_graph
from onnxfold.io import count_parameters
from onnxfold.passes.base import PassContext
from onnxfold.search import RATIO_STEPS, THRESHOLD_STEPS, BudgetSearch, Setting

THRESHOLDS = (1.0, 0.99, 0.95, 0.9)
METHODS = ("kmeans", "magnitude")
MIN_AGREEMENT = 0.995


def agreement(report: dict) -> float:
    return report["verification"]["outputs"]["logits"]["agreement"] if report["verification"] else 1.0


def run_model(name: str) -> dict:
    model = ROOT / "models" / f"{name}.onnx"
    calib, test = ROOT / "models" / f"{name}.calib.npz", ROOT / "models" / f"{name}.test.npz"
    t0 = time.perf_counter()
    res = onnxfold.optimize(model, calib, eval_data=test, provider="cpu", latency=False)
    search_s = time.perf_counter() - t0
    rep = res.report
    searched = {"parameter_ratio": rep["ratios"]["parameters"], "agreement": agreement(rep),
                "accuracy_before": rep["verification"]["outputs"]["logits"]["accuracy_original"] if rep["verification"] else None,
                "accuracy_after": rep["verification"]["outputs"]["logits"]["accuracy_candidate"] if rep["verification"] else None,
                "status": rep["status"], "chosen": (rep.get("search") or {}).get("chosen"),
                "evaluations": len((rep.get("search") or {}).get("evaluated") or []), "seconds": search_s,
                "notes": [n for n in rep["notes"] if "cannot resolve" in n]}
    # judge fixed settings exactly as the search judges candidates, on the same splits
    shipped = load_shipped(ROOT / "models", name)
    original, calib_set, test_set = shipped.model, shipped.calib, shipped.test
    on_test = shipped.judge_on_test()
    fit, select, _ = split_data(calib_set, test_set, 0, Budget.default().samples_needed())
    ctx = PassContext(calibration=fit, heldout=select, providers=["CPUExecutionProvider"])
    searcher = BudgetSearch(original, Budget.default(), ctx, max_evaluations=10**6)
    layers = [c.name for c in find_dense_graph(original).chains]
    fixed = []
    for ti, t in enumerate(THRESHOLD_STEPS):
        if t not in THRESHOLDS:
            continue
        for ri, r in enumerate(RATIO_STEPS):
            for method in METHODS if r > 0 else ("kmeans",):
                setting = Setting.of({**{(n, "threshold"): ti for n in layers}, **{(n, "ratio"): ri for n in layers}},
                                     select=method)
                c = searcher.evaluate(setting)
                test_agreement = on_test(searcher.model_for(c)).agreement
                fixed.append({"threshold": t, "ratio": r, "method": method if r > 0 else "-",
                              "parameter_ratio": c.parameters / searcher.original_params,
                              "meets_on_select": c.met, "agreement": test_agreement})
    meeting = [f for f in fixed if f["agreement"] >= MIN_AGREEMENT and f["meets_on_select"]]
    best_any = min(meeting, key=lambda f: f["parameter_ratio"]) if meeting else None

    def held(t, r, method):
        if r == 0.0:
            method = "-"
        return any(g["meets_on_select"] for g in fixed
                   if g["threshold"] == t and g["ratio"] == r and g["method"] == method)

    # a setting whose next smaller ratio (same T and method) fails on the held-out split is an
    # isolated lucky point on small calibration sets: no search that assumes quality falls as the
    # ratio grows would stop there, and nobody tuning one knob would trust it
    supported = [f for f in meeting if f["ratio"] == 0.0 or held(
        f["threshold"], RATIO_STEPS[RATIO_STEPS.index(f["ratio"]) - 1], f["method"])]
    best_fixed = min(supported, key=lambda f: f["parameter_ratio"]) if supported else None
    oracle = [f for f in fixed if f["agreement"] >= MIN_AGREEMENT]
    best_oracle = min(oracle, key=lambda f: f["parameter_ratio"]) if oracle else None
    ok = searched["agreement"] >= MIN_AGREEMENT and (
        best_fixed is None or searched["parameter_ratio"] <= best_fixed["parameter_ratio"] + 1e-9)
    return {"model": name, "search": searched, "best_fixed": best_fixed, "best_any": best_any, "oracle": best_oracle,
            "fixed": fixed, "pass": ok}


# ---------------------------------------------------------------------------
# section 1: the hold-out study

STUDY_BUDGETS = {  # name: (Budget kwargs, judged on the test split by)
    "accuracy drop <= 0.5 pp": dict(max_accuracy_drop=0.5),
    "agreement >= 99.5 %": dict(min_agreement=99.5),
    "agreement >= 99 %": dict(min_agreement=99.0),
}
ONNXSIM_SPARSITIES = tuple(round(0.05 * k, 2) for k in range(1, 20))


def meets_on_test(spec: dict, out) -> bool:
    """The budget judged as a user would on the test split: the point estimate."""
    if "max_accuracy_drop" in spec:
        return out.accuracy_drop_pp <= spec["max_accuracy_drop"] + 1e-9
    return 100 * out.agreement >= spec["min_agreement"] - 1e-9


def onnxsim_curve(original: onnx.ModelProto, calib_set, on_test: Judge) -> list[dict]:
    """onnxsim's structured Wanda pruning + ridge refit at every sparsity, judged on the test split."""
    import onnxsim

    feeds = [dict(f) for f in calib_set.batches(256)]
    rows = []
    for sparsity in ONNXSIM_SPARSITIES:
        t0 = time.perf_counter()
        try:
            pruned = onnxsim.apply_structured_wanda_pruning(original, calibration_data=feeds, sparsity=sparsity)
            refit = onnxsim.apply_pruning_finetune(original, pruned, calibration_data=feeds)
            out = on_test(refit)
        except Exception as e:  # noqa: BLE001 - the peer's failure is a result, not a crash
            rows.append({"sparsity": sparsity, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        rows.append({"sparsity": sparsity, "parameter_ratio": count_parameters(refit) / count_parameters(original),
                     "agreement": out.agreement, "accuracy_drop_pp": out.accuracy_drop_pp,
                     "seconds": time.perf_counter() - t0, "out": out})
    return rows


def study_model(name: str, seeds: int) -> dict:
    model, calib = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.calib.npz"
    shipped = load_shipped(ROOT / "models", name)
    original, on_test = shipped.model, shipped.judge_on_test()
    peer = onnxsim_curve(original, shipped.calib, on_test)
    rows = []
    for budget_name, spec in STUDY_BUDGETS.items():
        runs = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            res = onnxfold.optimize(model, str(calib), budget=Budget(**spec), seed=seed, provider="cpu",
                                    latency=False)
            out = on_test(res.model)
            rep = res.report
            runs.append({"seed": seed, "parameter_ratio": rep["ratios"]["parameters"], "status": rep["status"],
                         "fallback": (rep.get("budget") or {}).get("fallback", {}).get("returned"),
                         "meets_on_test": meets_on_test(spec, out), "test_agreement": out.agreement,
                         "test_accuracy_drop_pp": out.accuracy_drop_pp, "split": rep["settings"]["split"],
                         "seconds": time.perf_counter() - t0,
                         "unresolved": [n for n in rep["notes"] if n.startswith("too little held-out data")]})
            print(f"{name} | {budget_name} | seed {seed}: ratio {runs[-1]['parameter_ratio']:.3f}, "
                  f"{rep['status']}, meets on test: {runs[-1]['meets_on_test']}", flush=True)
        meeting = [p for p in peer if "error" not in p and meets_on_test(spec, p["out"])]
        oracle = min(meeting, key=lambda p: p["parameter_ratio"]) if meeting else None
        rows.append({"model": name, "budget": budget_name, "spec": spec, "runs": runs,
                     "needed_per_part": Budget(**spec).samples_needed(),
                     "onnxsim_oracle": None if oracle is None else {k: v for k, v in oracle.items() if k != "out"}})
    for p in peer:
        p.pop("out", None)
    return {"model": name, "rows": rows, "onnxsim": peer}


def study_lines(results: list[dict], seeds: int) -> tuple[list[str], bool]:
    lines = ["## 1. Hold-out study: does the returned model meet the budget on unseen data?", "",
             f"onnxfold sees only NAME.calib.npz (split per seed into fit / select / final check); the test split "
             f"judges what it returns, by the point estimate a user would compute. {seeds} seeds per row. "
             "*Meets*: seeds whose returned model meets the budget on the test split (the goal: at least 95 %). "
             "*Fallbacks*: seeds whose chosen model failed onnxfold's own final check, so that it returned the "
             "lossless model or the original instead. *onnxsim oracle*: structured Wanda pruning + "
             "apply_pruning_finetune at the largest sparsity meeting the budget on the test split (it chooses by "
             "looking at the test data).", "",
             "| model | budget | meets on test | ratio median [min, max] | fallbacks | held-out part / needed "
             "| onnxsim oracle ratio (sparsity) | onnxfold below oracle |",
             "|---|---|---|---|---|---|---|---|"]
    ok_all = True
    why = []
    for res in results:
        for r in res["rows"]:
            runs = r["runs"]
            ratios = np.array([x["parameter_ratio"] for x in runs])
            meets = sum(x["meets_on_test"] for x in runs)
            ok = meets >= 0.95 * len(runs)
            ok_all &= ok
            fallbacks = sum(x["status"] == "final_check_failed" for x in runs)
            part = runs[0]["split"]["select"]
            o = r["onnxsim_oracle"]
            median = float(np.median(ratios))
            if o is None:
                below = "yes (no onnxsim sparsity meets it)"
            elif median < o["parameter_ratio"] - 1e-3:
                below = "yes"
            else:
                below = "tie" if abs(median - o["parameter_ratio"]) <= 1e-3 else "no"
            lines.append(f"| {r['model']} | {r['budget']} | {meets}/{len(runs)} {'PASS' if ok else 'FAIL'} | "
                         f"{np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}] | {fallbacks} | "
                         f"{part} / {r['needed_per_part']} | "
                         + ("none meets" if o is None else f"{o['parameter_ratio']:.3f} ({o['sparsity']:g})")
                         + f" | {below} |")
            if below in ("no", "tie"):
                if below == "tie" and part >= r["needed_per_part"]:
                    why.append(f"- {r['model']}, {r['budget']}: a tie at {median:.3f}: the held-out parts resolve "
                               f"the budget ({part} >= {r['needed_per_part']} samples), but in {fallbacks} of "
                               f"{len(runs)} seeds the model the search chose failed onnxfold's own final check "
                               "(its third part of the calibration data), so the lossless model or the original "
                               "came back; onnxsim's test-chosen oracle removes no more.")
                elif part < r["needed_per_part"]:
                    why.append(f"- {r['model']}, {r['budget']}: the calibration data hold {part} samples per "
                               f"held-out part, and the budget needs {r['needed_per_part']} at 95 % confidence; "
                               "below that only candidates with no observed change can be accepted, so onnxfold "
                               "returns (about) the lossless model. onnxsim's ratio is chosen on the test split "
                               "itself, which a user cannot do; with onnxfold's rule it would need the same "
                               "samples to be trusted.")
                else:
                    why.append(f"- {r['model']}, {r['budget']}: the held-out parts resolve the budget "
                               f"({part} >= {r['needed_per_part']} samples), and onnxsim's test-chosen oracle is "
                               "still smaller: on this model structured Wanda pruning with a ridge refit of every "
                               "surviving layer keeps more of the budget per parameter removed than the search's "
                               "folds; onnxfold does not reach it here.")
    if why:
        lines += ["", "Where onnxfold's median ratio is not below the onnxsim oracle, and why:", ""] + why
    return lines, ok_all


def flatten(payload: dict) -> dict:
    """The numbers compared with the previous run: per model and budget the seeds meeting the budget on the
    test split and the median ratio; per model the search's ratio and test agreement (section 2)."""
    cells = {f"{r['model']}, {r['budget']}": {
        "meets on test": sum(x["meets_on_test"] for x in r["runs"]),
        "median ratio": float(np.median([x["parameter_ratio"] for x in r["runs"]])),
        "min ratio": min(x["parameter_ratio"] for x in r["runs"]),
        "max ratio": max(x["parameter_ratio"] for x in r["runs"]),
        "fallbacks": sum(x["status"] == "final_check_failed" for x in r["runs"])}
        for res in payload["holdout"] for r in res["rows"]}
    cells.update({f"{r['model']}, search (default budget)": {
        "ratio": r["search"]["parameter_ratio"], "test agreement": r["search"]["agreement"]}
        for r in payload["fixed"]})
    return cells


LOWER_IS_BETTER = {"median ratio", "min ratio", "max ratio", "fallbacks", "ratio"}

# shipped models the default model list leaves out (``--models`` can still name them), and why
LEFT_OUT = {
    "llama_mha": "byte-level decoder: onnxsim's sweep alone (19 sparsities, each structured Wanda pruning + "
                 "apply_pruning_finetune) had not finished on llama_mha after 4 min on 2 shared cores, and the "
                 "study adds 30 budget searches (~10 s each) per decoder, more than doubling this benchmark's "
                 "~15 min; the decoders' budget search is compared with onnxsim in tools/results/transformers.md",
    "llama_gqa": "byte-level decoder, left out as llama_mha (same size and architecture)",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated model names (default: all in models/)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per model and budget in the hold-out study")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "budget.md"))
    ap.add_argument("--render", metavar="JSON", help="only re-render the markdown from a saved budget.json")
    ap.add_argument("--previous", metavar="JSON", help="with --render: compare with this results file (e.g. one "
                                                        "checked out from git) instead of the one the JSON keeps")
    reason_argument(ap)
    args = ap.parse_args()
    out = Path(args.out)
    names = args.models.split(",") if args.models else sorted(
        p.name[:-5] for p in (ROOT / "models").glob("*.onnx") if (ROOT / "models" / f"{p.name[:-5]}.test.npz").exists()
        and p.name[:-5] not in LEFT_OUT)
    # section 2 compares dense-layer settings: models without dense chains (the CNN) are left out of it
    dense = [n for n in names if find_dense_graph(onnx.load(ROOT / "models" / f"{n}.onnx")).chains]
    if args.render:  # re-render the markdown from a saved run (the numbers are that run's)
        saved = json.loads(Path(args.render).read_text())
        study, results, previous = saved["holdout"], saved["fixed"], saved.get("previous")
        generated, where = saved.get("generated", "?"), saved.get("machine", "?")
        left_out = saved.get("left_out", {})
        if args.previous:
            previous = previous_run(Path(args.previous).parent, Path(args.previous).stem, flatten)
    else:
        previous = previous_run(out.parent, out.stem, flatten)
        generated, where = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", machine()
        left_out = {} if args.models else {
            n: why for n, why in LEFT_OUT.items() if (ROOT / "models" / f"{n}.onnx").exists()}
        study = [study_model(n, args.seeds) for n in names]
        results = [run_model(n) for n in dense]
    payload = {"generated": generated, "machine": where, "holdout": study, "fixed": results, "previous": previous,
               "left_out": left_out}
    study_text, study_ok = study_lines(study, args.seeds)
    lines = ["# Budgets on unseen data", "",
             f"Generated by `python tools/bench_budget.py` on {generated}, {where}, "
             f"onnxfold {onnxfold.__version__}, onnxruntime CPU provider. Do not edit by hand. Budgets are judged "
             "by one-sided 95 % confidence bounds on held-out samples (docs/statistics.md)."
             + (f" Numbers re-rendered from the saved run `{args.render}`." if args.render else ""), ""]
    if left_out:
        lines += ["Shipped models not in this file, and why:", ""] + [f"- {n}: {why}." for n, why in left_out.items()]
        lines.append("")
    lines += study_text
    lines += ["", "## 2. Budget search vs the best fixed setting", "",
             "Budget: the default one, top-1 agreement >= 99.5 % with the original. The search sees only the "
             "calibration data (split into fit/select); the test split reports. Fixed settings: one linearity "
             f"threshold T in {THRESHOLDS}, one fold ratio r in {RATIO_STEPS}, one method (k-means or magnitude, LS "
             "repair) for every layer, after the lossless step. *Best fixed*: smallest setting meeting the budget "
             "on the held-out calibration split (judged as the search judges) and on the test split, whose next "
             "smaller ratio (same T and method) meets on the held-out split too; *isolated*: the smallest such "
             "setting without that condition, when it differs (a lucky point between failing neighbours). "
             "*Oracle*: smallest meeting it on the test split alone (needs the test data to choose; shown for "
             "transparency, not a target).", "",
             "| model | search: parameter ratio | test agreement | test accuracy before → after | evaluations | "
             "time (s) | best fixed setting | its ratio | its agreement | isolated | oracle setting | oracle ratio "
             "| check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, b = r["search"], r["best_fixed"]
        acc = "-" if s["accuracy_before"] is None else f"{100 * s['accuracy_before']:.2f} → {100 * s['accuracy_after']:.2f}"
        bf = "none" if b is None else f"T={b['threshold']}, r={b['ratio']}, {b['method']}"
        o = r["oracle"]
        of = "none" if o is None else f"T={o['threshold']}, r={o['ratio']}, {o['method']}"
        a = r["best_any"]
        iso = "-" if a is None or a is b else f"T={a['threshold']}, r={a['ratio']}, {a['method']} ({a['parameter_ratio']:.3f})"
        lines.append(f"| {r['model']} | {s['parameter_ratio']:.3f} | {100 * s['agreement']:.2f}% | {acc} | "
                     f"{s['evaluations']} | {s['seconds']:.0f} | {bf} | "
                     f"{'-' if b is None else format(b['parameter_ratio'], '.3f')} | "
                     f"{'-' if b is None else format(100 * b['agreement'], '.2f') + '%'} | {iso} | {of} | "
                     f"{'-' if o is None else format(o['parameter_ratio'], '.3f')} | "
                     f"{'PASS' if r['pass'] else 'FAIL'} |")
    lines += ["", "Chosen per-layer settings:", ""]
    for r in results:
        lines.append(f"- {r['model']}: `{json.dumps(r['search']['chosen'])}`")
    strict = [(r["model"], n) for r in results for n in r["search"]["notes"]]
    if strict:
        lines += ["", "Where the held-out data cannot resolve the budget at 95 % confidence, only candidates with no "
                  "observed change pass, and the fixed settings are judged by the same rule; onnxfold says so:", ""]
        lines += [f"- {m}: {n}" for m, n in strict]
    lines += ["", *compare_lines(previous, flatten(payload), LOWER_IS_BETTER, args.reason)]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(text)
    print(f"CHECK hold-out study: every model and budget meets on test in >= 95 % of seeds: "
          f"{'PASS' if study_ok else 'FAIL'}")
    for r in results:
        print(f"CHECK {r['model']}: meets budget on test and <= best fixed setting: {'PASS' if r['pass'] else 'FAIL'}")
    return 0 if study_ok and all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
