"""Fuzz the exact passes on random dense graphs (too slow for CI).

    python tools/fuzz.py --graphs 3000 --seed 0 [--out tools/results/fuzz.md]

Every graph comes from ``random_graph(seed)``: 2-4 dense layers of random
widths, Gemm (transB 0/1, random alpha/beta) or MatMul+Add form, 2-D or 3-D
input (MatMul form), a random activation (relu, leaky_relu, prelu, clip, and
gelu / gelu_erf / silu / tanh / sigmoid), a random bias per layer, weights as
initializers or Constant nodes. Some hidden rows get a large positive or
negative bias (always / never active on the data), some a zero weight row
(provably constant for every input), so the rewrites really happen.

Properties checked on each graph (``check_graph``), the same ones
``tests/test_property.py`` checks with hypothesis:

1. ``LinearityPass(threshold=1.0)`` with calibration data keeps the outputs on
   that data within 1e-5 (relative to the output's magnitude);
2. ``LinearityPass()`` without data (provable rewrites only) keeps them on any
   input, including inputs 10x larger than the calibration data;
3. ``FoldingPass(ratio=0.0)`` (data-free) and
   ``FoldingPass(ratio=0.0, drop_constant=True, repair="none")`` with data
   keep them within 1e-5;
4. every pass output passes ``onnx.checker`` (full check) and loads and runs in
   onnxruntime;
5. ``onnxfold.optimize`` with the same seed twice (fold ratio 0.5, k-means,
   least-squares repair) saves byte-identical files.

Writes ``tools/results/fuzz.md`` (date, machine, command, counts, failures with
the seed to reproduce: ``python tools/fuzz.py --only SEED``, and the comparison
with the run it replaces) and ``fuzz.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from random_graphs import check_graph, random_graph  # noqa: E402  (the generator lives with the tests)

from _bench import compare_lines, machine, previous_run, reason_argument  # noqa: E402  (tools/ is on sys.path)


def flatten(payload: dict) -> dict:
    """The numbers compared with the previous run: failures (fewer is better) and how many graphs each
    pass changed (a drop means a pass found less to rewrite)."""
    return {"all graphs": {"failures": payload["failures"]},
            **{f"pass {k}": {"graphs it changed": v} for k, v in payload["changed"].items()}}


def previous_payload(md: Path) -> dict | None:
    """The counts of a fuzz.md written before fuzz.json existed, read back from the tables this script writes."""
    if not md.exists():
        return None
    text = md.read_text()
    failures = re.search(r"\*\*failures: (\d+)\*\*", text)
    date = re.search(r"^\* date: (.+)$", text, re.M)
    where = re.search(r"^\* machine: (.+)$", text, re.M)
    table = text.split("| pass | graphs it changed |", 1)[-1].split("\n\n", 1)[0]
    changed = {m[1]: int(m[2]) for m in re.finditer(r"^\| (.+?) \| (\d+) \|$", table, re.M)}
    if failures is None or not changed:
        return None
    return {"generated": date and date[1], "machine": where and where[1], "failures": int(failures[1]),
            "changed": changed}

# --------------------------------------------------------------------------
# the run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="first seed; graph i uses seed + i")
    ap.add_argument("--determinism-every", type=int, default=10,
                    help="run the (slower) determinism check on every N-th graph")
    ap.add_argument("--only", type=int, default=None, help="check one seed and print the traceback")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "fuzz.md"))
    reason_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    import warnings

    warnings.filterwarnings("ignore")
    if args.only is not None:
        g = random_graph(args.only)
        print(g.desc)
        print(check_graph(g))
        print("ok")
        return 0
    t0 = time.time()
    failures: list[tuple[str, str]] = []
    counts = {"graphs": 0, "determinism_checked": 0}
    changed_counts: dict[str, int] = {}
    by_act: dict[str, int] = {}
    by_form: dict[str, int] = {}
    for i in range(args.graphs):
        seed = args.seed + i
        g = random_graph(seed)
        det = args.determinism_every > 0 and i % args.determinism_every == 0
        try:
            changed = check_graph(g, determinism=det)
            for k, v in changed.items():
                changed_counts[k] = changed_counts.get(k, 0) + int(v)
        except Exception as e:  # noqa: BLE001 - record and go on
            msg = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, AssertionError):
                msg = f"{type(e).__name__}: {msg} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
            failures.append((g.desc, msg[:300]))
        counts["graphs"] += 1
        counts["determinism_checked"] += int(det)
        act = g.desc.split("act=")[1].split()[0]
        form = g.desc.split("form=")[1].split()[0] + "/" + g.desc.split("rank=")[1].split()[0] + "d"
        by_act[act] = by_act.get(act, 0) + 1
        by_form[form] = by_form.get(form, 0) + 1
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{args.graphs} graphs, {len(failures)} failures, {time.time() - t0:.0f} s", flush=True)
    elapsed = time.time() - t0
    if out.with_suffix(".json").exists():
        previous = previous_run(out.parent, out.stem, flatten)
    else:
        old = previous_payload(out)
        previous = None if old is None else {"when": old["generated"] or "?", "where": old["machine"] or "?",
                                             "cells": flatten(old)}
    generated = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    payload = {"generated": generated, "machine": machine(), "graphs": counts["graphs"], "seed": args.seed,
               "determinism_checked": counts["determinism_checked"], "seconds": round(elapsed, 1),
               "failures": len(failures), "changed": changed_counts, "activations": by_act, "forms": by_form,
               "failed": [{"graph": d, "failure": m} for d, m in failures]}
    cmd = "python tools/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Fuzz run of the exact passes",
        "",
        "Generated by `tools/fuzz.py`; do not edit. Properties: see the script's docstring.",
        "",
        f"* date: {generated}",
        f"* machine: {payload['machine']}",
        f"* command: `{cmd.strip()}`",
        f"* graphs: {counts['graphs']} (seeds {args.seed} … {args.seed + args.graphs - 1}), "
        f"determinism checked on {counts['determinism_checked']}",
        f"* time: {elapsed:.0f} s",
        f"* **failures: {len(failures)}**",
        "",
        "| pass | graphs it changed |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in changed_counts.items()],
        "",
        "| activation | graphs |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(by_act.items())],
        "",
        "| form / input rank | graphs |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(by_form.items())],
        "",
    ]
    if failures:
        lines += ["## Failures", "", "| graph | failure |", "|---|---|"]
        lines += [f"| `{d}` | {m.replace('|', '/')} |" for d, m in failures]
    else:
        lines += ["No failures."]
    lines += ["", *compare_lines(previous, flatten(payload), {"failures"}, args.reason)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{counts['graphs']} graphs, {len(failures)} failures, {elapsed:.0f} s; wrote {args.out}")
    for d, m in failures[:20]:
        print(f"FAIL {d}: {m}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
