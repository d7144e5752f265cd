"""Folding and int8 quantization, alone and combined, on the shipped models.

For every model in models/ with its calib/test data:

* fp32       - the original
* fold       - onnxfold's default (budget search: top-1 agreement >= 99.5 % at 95 % confidence on held-out
               calibration rows)
* int8       - onnxruntime quantize_static on the original (QDQ, per-channel int8 weights, int8 activations,
               calibrated on the same calibration data, MinMax)
* fold+int8  - the same quantization applied to onnxfold's output

Reported on the test data: accuracy, top-1 agreement with the original, parameters (float + int
initializer elements) and file size. Writes tools/results/quant.md and quant.json.

    python tools/bench_quant.py [--models models] [--out tools/results] [--only NAME]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _bench import ROOT, Judge, against_previous, header, load_shipped, machine, now, reason_argument, write_results

import onnxfold
from onnxfold.find import find_dense_graph


class _Reader:
    def __init__(self, name, x, batch=64):
        self.items = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.items, None)


def _reader(name, x):
    from onnxruntime.quantization import CalibrationDataReader

    class R(CalibrationDataReader, _Reader):
        def __init__(self):
            _Reader.__init__(self, name, x)

        def get_next(self):
            return _Reader.get_next(self)

    return R()


def quantize(src: Path, dst: Path, name: str, calib: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def parameters(path: Path) -> int:
    m = onnx.load(str(path))
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    n += int(np.prod(a.t.dims))
    return n


def bench(model: Path) -> list[dict]:
    stem = model.name[:-5]
    shipped = load_shipped(model.parent, stem)
    name = shipped.model.graph.input[0].name
    x_calib = shipped.calib.arrays[name]
    on_test = Judge(shipped.model, shipped.test)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        res = onnxfold.optimize(str(model), {name: x_calib, "labels": shipped.calib.labels}, provider="cpu")
        fold_s = time.perf_counter() - t
        fold = d / "fold.onnx"
        res.save(fold)
        q, fq = d / "int8.onnx", d / "fold.int8.onnx"
        quantize(model, q, name, x_calib)
        quantize(fold, fq, name, x_calib)
        base_params = parameters(model)
        for label, path in (("fp32", model), ("fold", fold), ("int8", q), ("fold+int8", fq)):
            test = on_test(onnx.load(str(path)))
            rows.append({"model": stem, "variant": label, "accuracy": test.accuracy, "agreement": test.agreement,
                         "parameters": parameters(path), "parameter_ratio": parameters(path) / base_params,
                         "bytes": path.stat().st_size, "test_samples": test.samples})
        rows[1]["fold_status"] = rows[3]["fold_status"] = res.report["status"]
        rows[1]["fold_seconds"] = round(fold_s, 1)
    return rows


def flatten(payload: dict) -> dict:
    """Every row of the table, for the comparison with the previous run."""
    return {f"{r['model']} {r['variant']}": {k: r[k] for k in ("accuracy", "agreement", "parameter_ratio")}
            for r in payload["rows"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default=str(ROOT / "tools" / "results"))
    ap.add_argument("--only", action="append")
    reason_argument(ap)
    a = ap.parse_args(argv)
    models = sorted(p for p in Path(a.models).glob("*.onnx") if not p.name.endswith(".fold.onnx")
                    and p.with_name(p.name[:-5] + ".calib.npz").exists()
                    and p.with_name(p.name[:-5] + ".test.npz").exists()
                    and find_dense_graph(onnx.load(p)).chains)  # the conv-only CNN: see bench_channels.py
    if a.only:
        models = [m for m in models if m.name[:-5] in a.only]
    rows = []
    for m in models:
        print(f"{m.name} ...", flush=True)
        rows += bench(m)
    meta = {"onnxfold": onnxfold.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "python": platform.python_version(), "machine": machine(), "date": now()}
    lines = header("Folding and int8 quantization", "bench_quant.py", meta["date"], meta["machine"],
                   f"; onnxfold {meta['onnxfold']}") + [
             "fold = onnxfold's default budget search "
             "(top-1 agreement >= 99.5 % with the original at 95 % confidence on held-out calibration rows); int8 = onnxruntime "
             "`quantize_static`, QDQ format, per-channel int8 weights, int8 activations, MinMax calibration on "
             "the model's calibration data. Accuracy and agreement (top-1 with the fp32 original) on the test "
             "data; parameters count initializer elements (int8 weights count like float ones, so the file size "
             "shows the int8 saving).", "",
             "The fold runs get the calibration data only, so onnxfold holds back a part of it for its own final "
             "check, and judges the budget by a one-sided 95 % confidence bound (docs/statistics.md); its status "
             "is shown (`final_check_failed`: the chosen model missed the budget on that final check, so onnxfold "
             "returned the lossless model or the original instead, which is what the row measures).", "",
             "| model | variant | accuracy | agreement | parameters | param. ratio | file size | onnxfold status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {100 * r['accuracy']:.2f} % | {100 * r['agreement']:.2f} % "
                     f"| {r['parameters']:,} | {r['parameter_ratio']:.3f} | {r['bytes'] / 1024:,.1f} KiB "
                     f"| {r.get('fold_status', '')} |")
    payload = {"meta": meta, "rows": rows}
    lines += ["", *against_previous(Path(a.out), "quant", payload, flatten, {"parameter_ratio"}, a.reason)]
    write_results(Path(a.out), "quant", "\n".join(lines) + "\n", payload)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
