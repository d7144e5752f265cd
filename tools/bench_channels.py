"""Benchmark conv channel folding on the shipped CNN.

    PYTHONPATH=. python tools/bench_channels.py [--models DIR] [--out tools/results]

For ``models/mnist_resnet.onnx`` (with its calib/test splits), every parameter
sparsity in SPARSITIES (share of the parameters of the foldable conv chains
removed) and every (selection, repair) in CONFIGS, runs
``ChannelFoldingPass`` with the calibration split and reports test accuracy,
agreement with the original's predictions, and parameter counts.

Writes ``OUT/channels.md`` and ``OUT/channels.json`` (generated: never edit
them by hand) and prints the table.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import PROVIDERS, logits, machine, model_arguments, ready_models

from onnxfold.decide import channels as dch
from onnxfold.find.conv import find_conv_graph
from onnxfold.measure.data import load_calibration
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


def model_params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def bn_folded_params(model: onnx.ModelProto) -> int:
    """Parameters of ``model`` once every BatchNormalization that follows a conv
    is folded into it (what a folded file would hold at r = 0)."""
    view = find_conv_graph(model)
    total = model_params(model)
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


def bench(models_dir: Path, name: str) -> dict:
    model = onnx.load(models_dir / f"{name}.onnx")
    calib = load_calibration(models_dir / f"{name}.calib.npz", model)
    test = load_calibration(models_dir / f"{name}.test.npz", model, what="evaluation")
    pred0 = logits(model, test).argmax(-1)
    acc0 = float((pred0 == test.labels).mean())
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
                pred = logits(res.model, test).argmax(-1)
                after = sum(rep.params_after for rep in res.layers)
                runs.append({
                    "target_sparsity": target, "ratio": r, "select": select, "repair": repair,
                    "widths_after": [rep.width_after for rep in res.layers],
                    "chain_params_after": int(after), "sparsity": 1.0 - after / chain_params0,
                    "model_params": model_params(res.model),
                    "test_acc": float((pred == test.labels).mean()),
                    "agreement": float((pred == pred0).mean()), "seconds": round(secs, 2),
                    "notes": [rep.note for rep in res.layers if rep.note],
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
            pred = logits(res.model, test).argmax(-1)
            residual_runs.append({
                "ratio": r, "select": select, "repair": repair,
                "widths_after": [rep.width_after for rep in res.layers],
                "model_params": model_params(res.model), "test_acc": float((pred == test.labels).mean()),
                "agreement": float((pred == pred0).mean()), "seconds": round(secs, 2),
            })
            print(f"{name} fold_residual r={r:.2f} {select}+{repair}: acc {residual_runs[-1]['test_acc']:.4f}"
                  f" ({secs:.1f}s)", flush=True)
    return {
        "model": name, "test_acc": acc0, "model_params_bn_folded": bn_folded_params(model),
        "residual_runs": residual_runs, "n_test": int(test.num_samples), "n_calib": int(calib.num_samples),
        "model_params": model_params(model),
        "chains": [{"name": c.name, "producer": c.producer.name, "consumer": c.consumer.name, "width": c.width,
                    "params": c.num_params} for c in view.chains],
        "chain_params": chain_params0,
        "residual_groups": [{"name": g.name, "width": g.width, "producers": g.producers, "readers": g.readers,
                             "joins": g.joins} for g in view.residual],
        "runs": runs,
    }


def render(result: dict, when: str, total_s: float) -> str:
    r0 = result
    lines = [
        "# Conv channel folding benchmark",
        "",
        "Generated by `tools/bench_channels.py` - do not edit by hand. Regenerate with",
        f"`{COMMAND}` (from the repository root).",
        "",
        f"Run: {when} on {machine()}; whole benchmark {total_s:.0f} s.",
        "",
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
    header = "| target | r | widths | sparsity | params | " + " | ".join(
        f"{s}+{r}" for s in SELECTS for r in REPAIRS) + " |"
    lines += [header, "|" + "---|" * (5 + len(SELECTS) * len(REPAIRS))]
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
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = bench(args.models, names[0])
    total = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(result, when, total)
    (args.out / "channels.md").write_text(md)
    payload = {"generated_by": "tools/bench_channels.py", "command": COMMAND, "run": when, "machine": machine(),
               "seconds": round(total, 1), "sparsities": list(SPARSITIES), "selects": list(SELECTS),
               "repairs": list(REPAIRS), "residual_ratios": list(RESIDUAL_RATIOS),
               "residual_configs": ["+".join(c) for c in RESIDUAL_CONFIGS], "seed": SEED, "results": [result]}
    (args.out / "channels.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
