"""The harness the benchmark scripts in tools/ share (not a public API).

Every script judges a model the same way: :class:`Judge` runs the original
once on a split and compares each candidate with it through
``onnxfold.verify.compare_models``, the engine onnxfold's own final check and
budget search use; a :class:`Verdict` holds what the scripts report (accuracy,
agreement, the counts behind them, the output error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxfold.find import find_dense_graph  # noqa: E402
from onnxfold.measure.data import CalibrationSet, load_calibration  # noqa: E402
from onnxfold.verify import OutputComparison, compare_models, reference_outputs  # noqa: E402

PROVIDERS = ["CPUExecutionProvider"]


# --------------------------------------------------------------------------
# judging


@dataclass(frozen=True)
class Verdict:
    """A candidate against the original on one split: ``compare_models``'
    comparison of the output that carries the decision (``Comparison.primary``),
    with the names the benchmarks report."""

    output: OutputComparison

    @property
    def samples(self) -> int:
        return self.output.count

    @property
    def agreement(self) -> float | None:
        """Same top-1 / label as the original (None: not a classifier output)."""
        return self.output.agreement

    @property
    def accuracy(self) -> float | None:
        """The candidate's, against the labels (None: no labels)."""
        return self.output.accuracy_candidate

    @property
    def correct(self) -> int | None:
        """Labelled samples the candidate gets right."""
        o = self.output
        return None if o.accuracy_candidate is None else round(o.accuracy_candidate * o.labeled)

    @property
    def accuracy_drop_pp(self) -> float | None:
        return self.output.accuracy_drop_pp

    @property
    def relative_error(self) -> float:
        """Largest |Δ output| relative to max(1, largest |original output|)."""
        return self.output.max_abs_error / max(1.0, self.output.max_abs_reference)

    def to_dict(self) -> dict:
        return {**self.output.to_dict(), "accuracy": self.accuracy, "correct": self.correct,
                "relative_error": self.relative_error}


class Judge:
    """Judges candidates of ``original`` on ``data`` (a CalibrationSet); the
    original's outputs are computed once, here."""

    def __init__(self, original: onnx.ModelProto, data: CalibrationSet, batch_size: int = 256):
        self.original, self.data, self.batch_size = original, data, batch_size
        self.reference = reference_outputs(original, data, providers=PROVIDERS, batch_size=batch_size)

    def __call__(self, candidate: onnx.ModelProto) -> Verdict:
        comp = compare_models(self.original, candidate, self.data, providers=PROVIDERS, batch_size=self.batch_size,
                              original_outputs=self.reference)
        return Verdict(comp.primary)


@dataclass
class Shipped:
    """A shipped model with its calibration and test splits."""

    name: str
    model: onnx.ModelProto
    calib: CalibrationSet
    test: CalibrationSet

    def judge_on_test(self) -> Judge:
        return Judge(self.model, self.test)


def load_shipped(models_dir: Path, name: str) -> Shipped:
    model = onnx.load(models_dir / f"{name}.onnx")
    return Shipped(name, model, load_calibration(models_dir / f"{name}.calib.npz", model),
                   load_calibration(models_dir / f"{name}.test.npz", model, what="evaluation"))


# --------------------------------------------------------------------------
# counting


def dense_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(all dense parameters incl. paths, those of the input layer)."""
    g = model.graph
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    total = input_layer = 0
    for op in find_dense_graph(model).ops.values():
        total += op.num_params
        if op.input in inputs:
            input_layer += op.weight.size + (0 if op.bias is None else op.bias.size)
    return total, input_layer


# --------------------------------------------------------------------------
# where and when; writing results


def setting_knobs(chosen: dict | None) -> dict | None:
    """A chosen setting (``report["search"]["chosen"]``) without its empty
    knobs (a newer onnxfold names more of them)."""
    return None if chosen is None else {k: v for k, v in chosen.items() if v not in ({}, None)}


def brief_setting(chosen: dict | None) -> str:
    """A chosen setting without its empty knobs, for one line of text."""
    if chosen is None:
        return "none (no candidate met the budget)"
    return ", ".join(f"{k} {v}" for k, v in setting_knobs(chosen).items())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, onnx {onnx.__version__},"
            f" onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)")


def checkout_commit(path: Path) -> str:
    """The short commit of the git checkout at ``path`` (a ``--before`` checkout), or "unknown"."""
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def header(title: str, script: str, when: str, where: str, extra: str = "") -> list[str]:
    """The first lines of a generated results file: what made it, how to
    regenerate it, when and where it ran."""
    return [f"# {title}", "",
            f"Generated by `tools/{script}` - do not edit by hand. Regenerate with",
            f"`PYTHONPATH=. python tools/{script}` (from the repository root).", "",
            f"Run: {when} on {where}{extra}.", ""]


def write_results(out: Path, stem: str, markdown: str, payload: dict) -> None:
    """``OUT/STEM.md`` and ``OUT/STEM.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.json'}")


def write_block(path: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) into
    the markdown file ``path``: in place of the block there, else at the end."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def save_block(result: dict, out_json: Path, markdown: Path, markers: tuple[str, str], render, cells: dict,
               lower_is_better=frozenset(), reason: str | None = None, level: int = 3) -> str:
    """A block script's result: compared with the previous run (``cells``:
    its numbers, :func:`compare_lines`), saved as ``out_json``, and
    ``render(result)`` put between ``markers`` (begin, end) in ``markdown``.
    Returns the block."""
    result["against_previous"] = compare_lines(result.get("previous"), cells, lower_is_better, reason, level=level)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    block = render(result)
    write_block(markdown, *markers, block)
    return block


def previous_run(out: Path, stem: str, flatten) -> dict | None:
    """What the ``OUT/STEM.json`` a run is about to replace holds, as
    ``{"when", "where", "cells": flatten(payload)}`` (None when there is none):
    small enough to keep in the new payload, so that ``--render`` can redo the
    comparison with a ``--reason`` after the old file is gone."""
    path = out / f"{stem}.json"
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    when = (previous.get("generated") or previous.get("run") or previous.get("date")
            or previous.get("meta", {}).get("date"))
    if not when:  # files written before their payload carried a date: the commit that last changed it
        import subprocess

        when = subprocess.run(["git", "log", "-1", "--format=committed %cd", "--date=format:%Y-%m-%d %H:%M",
                               "--", path.name], cwd=path.parent, capture_output=True, text=True).stdout.strip()
    where = previous.get("machine") or previous.get("meta", {}).get("machine", "a machine it did not record")
    return {"when": when or "?", "where": where, "cells": flatten(previous)}


def compare_lines(previous: dict | None, cells: dict, lower_is_better=frozenset(), reason: str | None = None,
                  ignore=frozenset(), level: int = 2) -> list[str]:
    """Markdown lines comparing ``cells`` (``{row label: {metric: value}}``)
    with a ``previous_run``: how many numbers got better or stayed, each one
    that got worse, and the reason given for those. Higher is better unless
    the metric is in ``lower_is_better``; metrics in ``ignore`` (wall times)
    are not compared; ``level``: the heading's level."""
    if previous is None:
        return []
    old = previous["cells"]
    counts, worse = {"better": 0, "the same": 0}, []
    for row, metrics in cells.items():
        for metric, value in metrics.items():
            before = old.get(row, {}).get(metric)
            if before is None or value is None or metric in ignore:
                continue
            gain = (before - value) if metric in lower_is_better else (value - before)
            if gain < -1e-9:
                worse.append(f"- {row}: {metric} {before:.4g} → {value:.4g}")
            else:
                counts["better" if gain > 1e-9 else "the same"] += 1
    lines = ["#" * level + " Against the previous run", "",
             f"The results this file replaced ran {previous['when']} on {previous['where']}: {counts['better']} numbers"
             f" got better, {counts['the same']} stayed the same, {len(worse)} got worse" + (":" if worse else "."), ""]
    if worse:
        lines += worse + ["", f"Why: {reason or 'no reason given (regenerate with --reason TEXT)'}", ""]
    return lines


def against_previous(out: Path, stem: str, current: dict, flatten, lower_is_better=frozenset(),
                     reason: str | None = None) -> list[str]:
    """Markdown lines comparing this run with the ``OUT/STEM.json`` it is about
    to replace (``compare_lines``). ``flatten(payload)`` maps a payload to
    ``{row label: {metric: value}}``."""
    return compare_lines(previous_run(out, stem, flatten), flatten(current), lower_is_better, reason)


# --------------------------------------------------------------------------
# which models


def wait_for(models_dir: Path, names, timeout_s: float) -> list[str]:
    """Model names whose .onnx, .calib.npz and .test.npz all exist, waiting up to timeout_s."""
    deadline = time.time() + timeout_s
    while True:
        ready = [n for n in names
                 if all((models_dir / f"{n}{s}").exists() for s in (".onnx", ".calib.npz", ".test.npz"))]
        if len(ready) == len(names) or time.time() > deadline:
            return ready
        print(f"waiting for models in {models_dir} ({len(ready)}/{len(names)} ready)", flush=True)
        time.sleep(15)


def model_arguments(description: str, models, wait_s: float = 0.0) -> argparse.ArgumentParser:
    """The options every per-model benchmark takes: where the models are, where
    results go, which models, how long to wait for them to appear."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--only", action="append", choices=models)
    ap.add_argument("--wait", type=float, default=wait_s, help="seconds to wait for the models to appear")
    reason_argument(ap)
    return ap


def reason_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reason", help="why numbers got worse than in the results file this run replaces"
                                     " (written into it)")


def ready_models(args, models) -> list[str]:
    """The requested models that exist (waiting up to --wait), saying which are missing."""
    names = args.only or list(models)
    ready = wait_for(args.models, names, args.wait)
    missing = [n for n in names if n not in ready]
    if missing:
        print(f"models not found in {args.models}: {', '.join(missing)}; benchmarking the others", flush=True)
    return ready


def footer(total_seconds: float, checks) -> list[str]:
    """A results file's last lines: the total time and the checks."""
    return ["", f"Total benchmark time: {total_seconds:.0f} s.", "", "## Checks", ""] + [f"- {c}" for c in checks]


@dataclass
class ResultsRun:
    """One benchmark run that writes ``OUT/<stem>.md`` and ``OUT/<stem>.json``:
    where results go (``--out``), when and where it ran, its checks."""

    out: Path
    when: str = field(default_factory=lambda: dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    where: str = field(default_factory=machine)
    started: float = field(default_factory=time.perf_counter)
    checks: list[str] = field(default_factory=list)
    reason: str | None = None  # --reason: why numbers got worse than in the file this run replaces

    @classmethod
    def from_args(cls, description: str, argv=None, add_options=None) -> tuple["ResultsRun", argparse.Namespace]:
        """Parse ``--out`` (and what ``add_options(parser)`` adds) and start the clock."""
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
        reason_argument(ap)
        if add_options is not None:
            add_options(ap)
        args = ap.parse_args(argv)
        return cls(args.out, reason=args.reason), args

    def check(self, what: str, ok: bool) -> None:
        self.checks.append(f"CHECK {what}: {'PASS' if ok else 'FAIL'}")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def passed(self) -> bool:
        return all(c.endswith("PASS") for c in self.checks)

    def write(self, stem: str, markdown: str, result: dict, flatten=None, lower_is_better=frozenset()) -> None:
        """``OUT/STEM.md`` and ``.json``; with ``flatten`` (see ``against_previous``)
        the markdown ends with the comparison with the files this run replaces,
        whose numbers the JSON keeps (``previous``), so that a re-rendering of a
        saved result compares with them and not with itself."""
        self.out.mkdir(parents=True, exist_ok=True)
        if flatten is not None:
            if "previous" not in result:
                result = {**result, "previous": previous_run(self.out, stem, flatten)}
            markdown += "\n".join(["", *compare_lines(result["previous"], flatten(result), lower_is_better,
                                                       self.reason)])
        (self.out / f"{stem}.md").write_text(markdown)
        (self.out / f"{stem}.json").write_text(
            json.dumps({"generated": self.when, "machine": self.where, **result}, indent=1) + "\n")
        print(f"wrote {self.out / (stem + '.md')} and {self.out / (stem + '.json')} ({self.seconds:.0f}s)")
