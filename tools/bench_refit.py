"""Consumer-only least-squares refit vs the downstream refit, on every shipped model.

    PYTHONPATH=. python tools/bench_refit.py [--only NAME] [--out DIR] [--decoder-windows N]

For each shipped model (models/NAME.onnx with NAME.calib.npz / NAME.test.npz)
and each fold setting of the plan, ``onnxfold.optimize`` with explicit
settings, the default selection and the ``ls`` repair, seed 0, three ways:

* ``--refit consumer``: each fold's consumer refit only (the repair before
  the downstream refit existed);
* ``--refit downstream``: then every linear op after the first changed one,
  in graph order, each on the model the previous refits left
  (``onnxfold/passes/downstream.py``), always kept;
* ``--refit auto`` (the default): the downstream refit, kept only when its
  output error against the original on the held-out *select* part of the
  calibration data is lower: the choice onnxfold makes per model at run time.

All three are judged on the TEST split, which none of them sees, by
``tools/_bench.Judge`` (top-1 agreement with the original, per token on the
decoders; accuracy against the labels). The test winner per setting is the
higher agreement (then accuracy); the table says whether auto's run-time
choice picked it. The decoders fit on a seeded ``--decoder-windows`` of
their calibration windows (the downstream refit streams the data once per
group of linear ops: ~1.5 min per decoder run at 512 on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _bench import load_shipped, machine, now, reason_argument, write_results  # noqa: E402

STEM = "refit"
SEED = 0
# (optimize keywords, label) per model. Folding every hidden layer of an MLP leaves one op downstream of
# the folds whose width did not change (the last one, each fold's consumer refit already); folding only
# the first layer leaves the layers after its consumer to the downstream refit
MLP_SETTINGS = ((dict(fold_ratio=0.5), "r = 0.5, every layer"), (dict(fold_ratio={"layer0": 0.75}), "layer0 r = 0.75"))
PLAN = {
    "mnist_mlp": MLP_SETTINGS,
    "digits_mlp": MLP_SETTINGS,
    "mnist1d_mlp": MLP_SETTINGS,
    "cancer_mlp_paper": MLP_SETTINGS,
    "digits_seq_mlp": MLP_SETTINGS,
    "mnist_resnet": ((dict(fold_ratio=0.5), "r = 0.5 (conv channels)"),),
    # one ratio each: tools/results/transformers.md has more, against onnxsim
    "llama_mha": ((dict(fold_ratio=0.3), "FFN r = 0.3"),),
    "llama_gqa": ((dict(fold_ratio=0.3), "FFN r = 0.3"),),
}
DECODERS = ("llama_mha", "llama_gqa")
REFITS = ("consumer", "downstream", "auto")


def run(model, calib, judge, keywords: dict, refit: str) -> dict:
    import onnxfold
    from onnxfold.io import count_parameters

    t0 = time.perf_counter()
    res = onnxfold.optimize(model, calib, provider="cpu", latency=False, seed=SEED, fold_refit=refit,
                            fold_repair="ls", **keywords)
    seconds = time.perf_counter() - t0 - res.report["timings_s"].get("verify", 0.0)
    v = judge(res.model)
    notes = [n for n in res.report["notes"] if n.startswith("downstream refit")]
    return {"refit": refit, "ratio": count_parameters(res.model) / count_parameters(model),
            "agreement": v.agreement, "accuracy": v.accuracy, "samples": v.samples, "seconds": seconds,
            "note": notes[0] if notes else "",
            # auto's run-time choice: the downstream refit only when its held-out comparison kept it
            "kept": bool(notes) and "; kept:" in notes[0]}


def bench_model(models_dir: Path, name: str, decoder_windows: int) -> dict:
    shipped = load_shipped(models_dir, name)
    calib = shipped.calib
    if name in DECODERS and calib.num_samples > decoder_windows:
        calib = calib.subset(np.sort(np.random.default_rng(SEED).choice(calib.num_samples, decoder_windows,
                                                                        replace=False)))
    judge = shipped.judge_on_test()
    settings = []
    for keywords, label in PLAN[name]:
        rows = {}
        for refit in REFITS:
            if refit == "downstream" and name in DECODERS:
                continue  # auto runs the same refit; rerun below only when auto discarded it
            rows[refit] = run(shipped.model, calib, judge, keywords, refit)
            print(f"{name} {label} {refit}: {json.dumps(rows[refit])}", flush=True)
        if "downstream" not in rows:
            if rows["auto"]["kept"]:
                rows["downstream"] = {**rows["auto"], "refit": "downstream", "note": "the same run as auto (kept)"}
            else:
                rows["downstream"] = run(shipped.model, calib, judge, keywords, "downstream")
        settings.append({"setting": label, "keywords": keywords, "rows": [rows[r] for r in REFITS]})
    return {"name": name, "calibration": calib.num_samples, "test": shipped.test.num_samples, "settings": settings}


def winner(rows: list[dict]) -> str:
    """The test winner between consumer and downstream: agreement, then accuracy; 'tie' when equal."""
    by = {r["refit"]: r for r in rows}
    a, b = by["consumer"], by["downstream"]
    key = (lambda r: (r["agreement"], r["accuracy"] if r["accuracy"] is not None else 0.0))
    if key(a) == key(b):
        return "tie"
    return "consumer" if key(a) > key(b) else "downstream"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def render(payload: dict) -> str:
    lines = ["# Consumer-only least-squares refit vs the downstream refit", "",
             "Generated by `tools/bench_refit.py` - do not edit by hand. Regenerate with",
             "`PYTHONPATH=. python tools/bench_refit.py` from the repository root (`--only NAME`: one model,"
             " the others' results kept).", "",
             f"Run: {payload['when']} on {payload['where']}; {payload['seconds']:.0f} s.", "",
             "Per model and fold setting, `onnxfold.optimize` (explicit settings, default selection, repair `ls`,"
             " seed 0, the 60 / 20 / 20 fit / select / final split of the calibration data) with `--refit"
             " consumer` (each fold's consumer refit only), `--refit downstream` (then every linear op after the"
             " first changed one, in graph order, each on the model the previous refits left; always kept) and"
             " `--refit auto` (the default: the downstream refit kept only when its output error against the"
             " original on the select part is lower). Judged on the test split, which none of them sees, by"
             " `tools/_bench.Judge`: top-1 agreement with the original (per token on the decoders) and accuracy."
             f" The decoders fit on {payload.get('decoder_windows', 512)} seeded calibration windows.", "",
             "| model | setting | refit | ratio | test agreement | test accuracy | time (s) | note |",
             "|---|---|---|---|---|---|---|---|"]
    summary = []
    for m in payload["models"]:
        for s in m["settings"]:
            for r in s["rows"]:
                lines.append(f"| {m['name']} | {s['setting']} | {r['refit']} | {r['ratio']:.3f} | "
                             f"{pct(r['agreement'])} | {pct(r['accuracy'])} | {r['seconds']:.1f} | {r['note']} |")
            w = winner(s["rows"])
            auto = next(r for r in s["rows"] if r["refit"] == "auto")
            chose = "downstream" if auto["kept"] else "consumer"
            agrees = w == "tie" or w == chose
            summary.append(f"- {m['name']} {s['setting']}: test winner **{w}**; auto chose {chose} on held-out data"
                           f" ({'the test winner' if agrees else 'NOT the test winner'})")
    wins = [ln for ln in summary if "winner **downstream**" in ln]
    picked = [ln for ln in summary if "(the test winner)" in ln]
    lines += ["", "## Which wins per model", "",
              f"Downstream refit ahead on the test split in {len(wins)} of {len(summary)} settings; auto's"
              f" held-out choice matched the test winner in {len(picked)} of {len(summary)}.", "", *summary, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--only", action="append", choices=list(PLAN))
    ap.add_argument("--decoder-windows", type=int, default=512)
    reason_argument(ap)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    previous = {}
    old = args.out / f"{STEM}.json"
    if args.only and old.exists():
        previous = {m["name"]: m for m in json.loads(old.read_text())["models"]}
    done = {name: bench_model(args.models, name, args.decoder_windows) for name in (args.only or list(PLAN))}
    models = [done.get(n) or previous.get(n) for n in PLAN if done.get(n) or previous.get(n)]
    payload = {"when": now(), "where": machine(), "seconds": time.perf_counter() - t0, "models": models,
               "reason": args.reason, "decoder_windows": args.decoder_windows}
    md = render(payload)
    if args.reason:
        md += f"\nWhy numbers changed from the previous run: {args.reason}\n"
    write_results(args.out, STEM, md, payload)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
