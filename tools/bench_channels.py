"""Benchmark conv channel folding on the shipped CNN.

    PYTHONPATH=. python tools/bench_channels.py [--models DIR] [--out tools/results]

For ``models/mnist_resnet.onnx`` (with its calib/test splits), every parameter
sparsity in SPARSITIES (share of the parameters of the foldable conv chains
removed) and every (selection, repair) in CONFIGS, runs
``ChannelFoldingPass`` with the calibration split and reports test accuracy,
agreement with the original's predictions, and parameter counts.

Then issue #14's done-when: ``onnxfold optimize models/mnist_resnet.onnx
--max-accuracy-drop 1`` with no other settings (through the CLI's entry
point; ``-o`` and ``--report`` only send its files to a temporary folder)
must fold conv channels to at most CONV_RATIO_LIMIT of the conv parameters
and meet the budget on the test split (found next to the model, so it is the
``--eval`` set of the final check). Exits 1 if it does not.

Writes ``OUT/channels.md`` and ``OUT/channels.json`` (generated: never edit
them by hand) and prints the table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _bench import PROVIDERS, Judge, against_previous, header, load_shipped, machine, model_arguments, now, \
    ready_models, write_results

from onnxfold.decide import channels as dch
from onnxfold.find.conv import find_conv_graph
from onnxfold.io import count_parameters
from onnxfold.passes.base import PassContext
from onnxfold.passes.channel_folding import ChannelFoldingPass

MODELS = ("mnist_resnet",)
SPARSITIES = (0.25, 0.5, 0.7)
SELECTS = ("kmeans", "magnitude")
REPAIRS = ("none", "ar", "repair", "ls")
#: Extra rows: the residual stream folded too (``fold_residual=True``), same r for stream and chains.
RESIDUAL_RATIOS = (0.25, 0.5, 0.7)
RESIDUAL_CONFIGS = (("kmeans", "none"), ("kmeans", "ar"), ("kmeans", "repair"), ("kmeans", "ls"),
                    ("magnitude", "ls"))
SEED = 0
COMMAND = "PYTHONPATH=. python tools/bench_channels.py"
#: issue #14's done-when, run as a user types it (plus where its files go)
DONE_WHEN_BUDGET = ["--max-accuracy-drop", "1"]
CONV_RATIO_LIMIT = 0.75


def conv_params(model: onnx.ModelProto) -> int:
    """Elements of the initializers Conv and BatchNormalization nodes read
    (kernels, biases, BN scale/shift/statistics)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(i, 0) for n in model.graph.node if n.op_type in ("Conv", "BatchNormalization")
               for i in n.input[1:])


def bn_folded_params(model: onnx.ModelProto) -> int:
    """Parameters of ``model`` once every BatchNormalization that follows a conv
    is folded into it (what a folded file would hold at r = 0)."""
    view = find_conv_graph(model)
    total = count_parameters(model)
    for op in view.ops.values():
        if op.bn:
            n = op.out_channels
            total -= 4 * n  # gamma, beta, mean, var
            if len(next(nd for nd in model.graph.node if nd.name == op.name).input) < 3:
                total += n  # the conv gains a bias
    return int(total)


def chain_costs(model: onnx.ModelProto):
    """Per chain: hidden width, parameters per hidden channel, fixed parameters
    (BN folded into the convs: kernel + bias)."""
    view = find_conv_graph(model)
    widths, per, fixed = [], [], []
    for c in view.chains:
        p, q = c.producer, c.consumer
        per_channel = p.rows().shape[1] + 1  # producer kernel row + bias (BN folded)
        per_channel += sum(m.rows().shape[1] + 1 for m, _ in c.mids)
        per_channel += q.out_channels * int(np.prod(q.weight.shape[2:]))  # consumer input slice
        widths.append(c.width)
        per.append(per_channel)
        fixed.append(q.out_channels)  # consumer bias
    return view, widths, per, fixed


def judged(verdict) -> dict:
    return {"test_acc": verdict.accuracy, "agreement": verdict.agreement}


def bench(models_dir: Path, name: str) -> dict:
    shipped = load_shipped(models_dir, name)
    model, calib, test = shipped.model, shipped.calib, shipped.test
    on_test = shipped.judge_on_test()
    acc0 = on_test(model).accuracy
    view, widths, per, fixed = chain_costs(model)
    chain_params0 = dch.chain_params(widths, per, fixed)
    runs = []
    for target in SPARSITIES:
        r, _share = dch.ratio_for_sparsity(target, widths, per, fixed)
        for select in SELECTS:
            for repair in REPAIRS:
                ctx = PassContext(calibration=calib, providers=PROVIDERS, batch_size=250, seed=SEED)
                t0 = time.perf_counter()
                res = ChannelFoldingPass(r, select=select, repair=repair, seed=SEED)(model, ctx)
                secs = time.perf_counter() - t0
                after = sum(rep.params_after for rep in res.layers)
                runs.append({
                    "target_sparsity": target, "ratio": r, "select": select, "repair": repair,
                    "widths_after": [rep.width_after for rep in res.layers],
                    "chain_params_after": int(after), "sparsity": 1.0 - after / chain_params0,
                    "model_params": count_parameters(res.model), **judged(on_test(res.model)),
                    "seconds": round(secs, 2), "notes": [rep.note for rep in res.layers if rep.note],
                })
                print(f"{name} s={target:.2f} r={r:.3f} {select}+{repair}: acc {runs[-1]['test_acc']:.4f}"
                      f" ({secs:.1f}s)", flush=True)
    residual_runs = []
    for r in RESIDUAL_RATIOS:
        for select, repair in RESIDUAL_CONFIGS:
            ctx = PassContext(calibration=calib, providers=PROVIDERS, batch_size=250, seed=SEED)
            t0 = time.perf_counter()
            res = ChannelFoldingPass(r, select=select, repair=repair, seed=SEED, fold_residual=True)(model, ctx)
            secs = time.perf_counter() - t0
            residual_runs.append({
                "ratio": r, "select": select, "repair": repair,
                "widths_after": [rep.width_after for rep in res.layers],
                "model_params": count_parameters(res.model), **judged(on_test(res.model)), "seconds": round(secs, 2),
            })
            print(f"{name} fold_residual r={r:.2f} {select}+{repair}: acc {residual_runs[-1]['test_acc']:.4f}"
                  f" ({secs:.1f}s)", flush=True)
    return {
        "model": name, "test_acc": acc0, "model_params_bn_folded": bn_folded_params(model),
        "residual_runs": residual_runs, "n_test": int(test.num_samples), "n_calib": int(calib.num_samples),
        "model_params": count_parameters(model),
        "chains": [{"name": c.name, "producer": c.producer.name, "consumer": c.consumer.name, "width": c.width,
                    "params": c.num_params} for c in view.chains],
        "chain_params": chain_params0,
        "residual_groups": [{"name": g.name, "width": g.width, "producers": g.producers, "readers": g.readers,
                             "joins": g.joins} for g in view.residual],
        "runs": runs,
    }


def done_when(models_dir: Path, name: str) -> dict:
    """Issue #14's done-when on ``name``: the CLI with the budget alone; the
    folded file judged here on the test split, conv parameters counted here."""
    from onnxfold.cli import main as onnxfold_cli

    src = models_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / f"{name}.fold.onnx", Path(tmp) / "report.json"
        argv = ["optimize", str(src), *DONE_WHEN_BUDGET, "-o", str(out), "--report", str(rep)]
        t0 = time.perf_counter()
        rc = onnxfold_cli(argv)
        seconds = time.perf_counter() - t0
        report = json.loads(rep.read_text())
        folded = onnx.load(out) if out.exists() else None
    shipped = load_shipped(models_dir, name)
    original = shipped.model
    returned = folded if folded is not None else original  # unchanged: no file is written
    test = Judge(original, shipped.test)(returned)
    limit = next((lim for lim in (report.get("budget") or {}).get("limits", []) if lim["kind"] == "accuracy_drop"),
                 None)
    conv_ratio = conv_params(returned) / conv_params(original)
    result = {
        "command": "onnxfold optimize " + " ".join([f"models/{name}.onnx", *DONE_WHEN_BUDGET]), "exit_code": rc,
        "status": report["status"], "seconds": round(seconds, 1), "split": report["settings"]["split"],
        "chosen": (report.get("search") or {}).get("chosen"),
        "evaluations": len((report.get("search") or {}).get("evaluated") or []),
        "conv_params": conv_params(original), "conv_params_after": conv_params(returned), "conv_ratio": conv_ratio,
        "parameter_ratio": count_parameters(returned) / count_parameters(original),
        "widths": {lr["layer"]: [lr["width_before"], lr["width_after"]] for lr in report["layers"]},
        "test": test.to_dict(), "final_check": limit,
    }
    result["pass"] = bool(conv_ratio <= CONV_RATIO_LIMIT and limit is not None and limit["met"]
                          and test.accuracy_drop_pp <= float(DONE_WHEN_BUDGET[1]))
    return result


def render_done_when(d: dict) -> list[str]:
    t, lim = d["test"], d["final_check"]
    bound = "-" if lim is None else f"{100 * lim['observed']:+.2f} pp observed, bound {100 * lim['bound']:.2f} pp"
    widths = ", ".join(f"{k} {a} → {b}" for k, (a, b) in d["widths"].items())
    return [
        "## Issue #14's done-when: the budget search folds conv channels",
        "",
        (f"Command: `{d['command']}` with no other settings (run through the CLI's entry point; `-o` and"
         " `--report` only send its files to a temporary folder). The test split next to the model is the final check's `--eval` set;"
         f" the calibration data are split fit / select {d['split']['fit']} / {d['split']['select']}. Conv"
         " parameters: elements of the initializers Conv and BatchNormalization nodes read (BN is folded into"
         " every edited conv). Test accuracy counted here on the returned file; the bound is the final check's"
         " one-sided 95 % bound on the accuracy drop (McNemar's paired counts, docs/statistics.md)."),
        "",
        "| status | chosen setting | widths | conv params | conv ratio | model param. ratio | test accuracy before → after"
        " | newly wrong / right | final check (1 pp allowed) | evaluations | time (s) | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        (f"| {d['status']} | `{json.dumps((d['chosen'] or {}).get('fold_ratios'))}`"
         f" {(d['chosen'] or {}).get('fold_select', '')} | {widths} | {d['conv_params']:,} → {d['conv_params_after']:,}"
         f" | {d['conv_ratio']:.3f} | {d['parameter_ratio']:.3f} | {100 * t['accuracy_original']:.2f}% →"
         f" {100 * t['accuracy']:.2f}% | {t['newly_wrong']} / {t['newly_right']} | {bound} | {d['evaluations']}"
         f" | {d['seconds']:.0f} | {'PASS' if d['pass'] else 'FAIL'} |"),
        "",
        (f"Check: conv ratio ≤ {CONV_RATIO_LIMIT}, the final check met, and the accuracy drop on the test split"
         f" ≤ {DONE_WHEN_BUDGET[1]} pp. Time: wall-clock seconds of the whole command on a shared machine"
         " (latency measurement included), indicative only."),
        "",
    ]


def flatten(payload: dict) -> dict:
    """Every cell of the two tables, for the comparison with the previous run."""
    res = payload["results"][0]
    cells = {f"{x['target_sparsity']:.0%} {x['select']}+{x['repair']}": x for x in res["runs"]}
    cells.update({f"fold_residual r={x['ratio']:.2f} {x['select']}+{x['repair']}": x for x in res["residual_runs"]})
    rows = {k: {"test_acc": x["test_acc"], "agreement": x["agreement"]} for k, x in cells.items()}
    d = res.get("done_when")
    if d and d.get("test"):  # the budget search of the first section (lower conv ratio is better)
        rows["done-when budget search"] = {"conv_ratio": d["conv_ratio"], "test_acc": d["test"]["accuracy"],
                                           "agreement": d["test"]["agreement"]}
    return rows


def render(result: dict, when: str, total_s: float) -> str:
    r0 = result
    lines = header("Conv channel folding benchmark", "bench_channels.py", when, machine(),
                   f"; whole benchmark {total_s:.0f} s") + render_done_when(r0["done_when"]) + [
        f"## {r0['model']}",
        "",
        (f"Original test accuracy {r0['test_acc'] * 100:.2f}% ({r0['n_test']} test samples; {r0['n_calib']}"
         f" calibration samples used for fitting); {r0['model_params']:,} parameters in the ONNX file"
         " (BatchNormalization included)."),
        "",
        "Foldable conv chains (producer Conv+BN → ReLU → consumer Conv): "
        + ", ".join(f"{c['name']} = {c['producer']} → {c['consumer']} ({c['width']} channels)"
                    for c in r0["chains"])
        + f"; {r0['chain_params']:,} parameters with BN folded into the convs (kernels + biases).",
        "",
        "Residual stream (reported, not folded in the first table; see the second): "
        + "; ".join(f"{g['name']}: {g['width']} channels, joins {', '.join(g['joins'])}, written by"
                    f" {', '.join(g['producers'])}" for g in r0["residual_groups"]) + ".",
        "",
        ("**Sparsity** = share of the foldable chains' parameters removed (BN folded; producer kernel rows +"
        " biases, consumer input-channel slices; the consumer's bias stays). One ratio r of hidden channels"
        " is removed in every chain (k = round(n·(1−r)) kept, as in Wang et al.); r is the value on a"
        " 1/400 grid whose widths give the sparsity closest to the target"
        " (`onnxfold.decide.channels.ratio_for_sparsity`). *kmeans*: k-means on [kernel row, bias,"
        " consumer slice], clusters averaged / consumer slices summed (model folding). *magnitude*: keep the"
        " k output channels with the largest (BN-folded) kernel L2 norm (structured pruning). Repairs: *none*,"
        " *ar* (Fold-AR, data-free; nothing is merged by magnitude pruning, so it equals none there),"
        " *repair* (REPAIR: per-channel mean/std of the merged pre-activation matched on calibration data),"
        " *ls* (ridge least-squares refit of each consumer conv on calibration patches, ridge chosen on a"
        " held-out fifth). Cells: test accuracy / agreement with the original's predictions. Seed 0."
        " Params: parameters in the folded ONNX file (BN folded into every edited conv)."),
        "",
    ]
    columns = "| target | r | widths | sparsity | params | " + " | ".join(
        f"{s}+{r}" for s in SELECTS for r in REPAIRS) + " |"
    lines += [columns, "|" + "---|" * (5 + len(SELECTS) * len(REPAIRS))]
    for target in SPARSITIES:
        rows = [x for x in r0["runs"] if x["target_sparsity"] == target]
        first = rows[0]
        cells = []
        for s in SELECTS:
            for rp in REPAIRS:
                x = next(y for y in rows if y["select"] == s and y["repair"] == rp)
                cells.append(f"{x['test_acc'] * 100:.1f}% / {x['agreement'] * 100:.1f}%")
        lines.append(f"| {target:.0%} | {first['ratio']:.3f} | {'-'.join(map(str, first['widths_after']))} |"
                     f" {first['sparsity'] * 100:.1f}% | {first['model_params']:,} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        "### Residual stream folded too (`fold_residual=True`)",
        "",
        ("The same ratio r is removed from the residual stream (one shared assignment for every conv writing it:"
         " the stem and each block's second conv; the block's first convs and the final Gemm sum their input"
         " slices) and from every block's hidden channels. Params: whole ONNX file; the original is"
         f" {r0['model_params']:,} ({r0['model_params_bn_folded']:,} with BN folded into the convs)."),
        "",
        "| r | widths (stream, chains) | params | " + " | ".join(f"{s}+{r}" for s, r in RESIDUAL_CONFIGS) + " |",
        "|" + "---|" * (3 + len(RESIDUAL_CONFIGS)),
    ]
    for ratio in RESIDUAL_RATIOS:
        rows = [x for x in r0["residual_runs"] if x["ratio"] == ratio]
        cells = []
        for s, rp in RESIDUAL_CONFIGS:
            x = next(y for y in rows if y["select"] == s and y["repair"] == rp)
            cells.append(f"{x['test_acc'] * 100:.1f}% / {x['agreement'] * 100:.1f}%")
        lines.append(f"| {ratio:.2f} | {'-'.join(map(str, rows[0]['widths_after']))} | {rows[0]['model_params']:,} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    times = {}
    for x in r0["runs"]:
        times.setdefault(f"{x['select']}+{x['repair']}", []).append(x["seconds"])
    lines.append("Mean pass time of the first table's runs (s, shared machine, indicative): "
                 + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in times.items()))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = model_arguments(__doc__.split("\n\n")[0], MODELS)
    args = ap.parse_args(argv)
    names = ready_models(args, MODELS)
    if not names:
        return 1
    t0 = time.perf_counter()
    when = now()
    finished = done_when(args.models, names[0])
    result = {**bench(args.models, names[0]), "done_when": finished}
    total = time.perf_counter() - t0
    md = render(result, when, total)
    payload = {"generated_by": "tools/bench_channels.py", "command": COMMAND, "run": when, "machine": machine(),
               "seconds": round(total, 1), "sparsities": list(SPARSITIES), "selects": list(SELECTS),
               "repairs": list(REPAIRS), "residual_ratios": list(RESIDUAL_RATIOS),
               "residual_configs": ["+".join(c) for c in RESIDUAL_CONFIGS], "seed": SEED, "results": [result]}
    md += "\n".join(["", *against_previous(args.out, "channels", payload, flatten, {"conv_ratio"}, args.reason)])
    write_results(args.out, "channels", md, payload)
    print(md)
    line = f"CHECK {names[0]} done-when: {'PASS' if result['done_when']['pass'] else 'FAIL'}"
    print(line)
    return 0 if result["done_when"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
