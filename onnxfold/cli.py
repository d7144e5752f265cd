"""Command line: ``onnxfold optimize`` and ``onnxfold inspect``.

Options are grouped by concern (input/output, data, runtime, linearity
folding, neuron folding, checks). Every expected failure is an
``OnnxFoldError``: one line on stderr and a non-zero exit code
(``--verbose`` adds the traceback). Exit codes: 0 success, 1 a check failed
(``--check``), 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path

from .version import __version__
from .decide.allocation import ALLOCATIONS
from .decide.budget import Budget, parse_max_error
from .errors import OnnxFoldError, UsageError
from .options import (
    FOLD_REPAIRS,
    FOLD_SELECTS,
    MEMO_MIB,
    DataOptions,
    FoldOptions,
    LinearityOptions,
    OptimizeOptions,
    ReportOptions,
    RuntimeOptions,
    SearchOptions,
)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _count_or_share(flag: str):
    """A parser of ``8`` (heads kept per attention block) or ``0.33`` (the share removed) for ``flag``."""

    def parse(text: str):
        try:
            if text.strip().isdigit():
                k = int(text)
                if k >= 1:
                    return k
            else:
                r = float(text)
                if 0.0 <= r < 1.0:
                    return r
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{flag} takes a head count >= 1 or a share in [0, 1), got {text!r}")

    return parse



def _ratio_arg(text: str):
    """``0.5`` for every layer, or ``layer0=0.5,layer2=0.3`` per layer."""
    if "=" not in text:
        r = float(text)
        if not 0.0 <= r < 1.0:
            raise argparse.ArgumentTypeError(f"fold ratio must be in [0, 1), got {r}")
        return r
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        r = float(val)
        if not 0.0 <= r < 1.0:
            raise argparse.ArgumentTypeError(f"fold ratio for {name} must be in [0, 1), got {r}")
        out[name.strip()] = r
    return out


def _threshold_arg(text: str) -> float:
    t = float(text)
    if not 0.5 < t <= 1.0:
        raise argparse.ArgumentTypeError(f"linear threshold must be in (0.5, 1], got {t}")
    return t


def _add_data_options(p: argparse.ArgumentParser, *, eval_too: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--calib", metavar="DATA", help="calibration data: .npz (keys = input names, optional 'labels') "
                   "or a directory of .npy files (one per input) or of .npz shards (with --ray, shards over 2 GiB in all "
                   "are read by Ray tasks, never by this process); with --ray also a .parquet file or a "
                   "directory of them (columns = input names, optional 'labels'); default: <model stem>.calib.npz next to the model, if present")
    if eval_too:
        g.add_argument("--eval", metavar="DATA", help="separate evaluation data for the final report (never used "
                       "to decide); default: <model stem>.test.npz or .eval.npz next to the model, if present")
        g.add_argument("--labels", choices=("next-token",), default=None,
                       help="language models: label each position with the next input id (input_ids shifted by "
                       "one), for per-token accuracy, perplexity and --max-perplexity-increase")
    g.add_argument("--data-loader-script", metavar="FILE.py[:FUNC]",
                   help="calibration data from a Python function (default name load_data) returning an iterable "
                   "of feed dicts {input_name: array}, as in Polygraphy; instead of --calib")
    g.add_argument("--no-auto-data", action="store_true", help="do not look for calibration/evaluation files "
                   "next to the model")
    g.add_argument("--batch-size", type=int, default=256, metavar="N", help="inference batch size (default 256)")


def _add_runtime_options(p: argparse.ArgumentParser):
    """The "runtime" group (returned: a command adds its own options to it)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime execution provider (auto: CUDA when it really works, else CPU)")
    g.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    g.add_argument("--quiet", action="store_true", help="print only errors")
    return g


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxfold", description="Structural compression of exported ONNX models "
                                     "(linearity folding and neuron folding), verified with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"onnxfold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="compress a model and verify it")
    g = opt.add_argument_group("input/output")
    g.add_argument("model", help="input .onnx model (never modified)")
    g.add_argument("-o", "--output", help="output path (default: <stem>.fold.onnx next to the input)")
    g.add_argument("--report", metavar="JSON", help="write the machine-readable report here")
    g.add_argument("--profile-memory", action="store_true",
                   help="record each stage's peak resident memory in the report (Linux; a sampling thread)")
    g.add_argument("--external-data", action="store_true",
                   help="store the output's weights in a .data file beside it (automatic above 2 GB)")
    _add_data_options(opt, eval_too=True)
    _add_runtime_options(opt).add_argument(
        "--memo-mib", type=int, default=None, metavar="N",
        help=f"streamed activations each of onnxfold's memos may keep, so that later runs over the same data "
        f"replay them or start where the model starts to differ (default {MEMO_MIB}); 0 keeps none: "
        "working memory flat in the number of samples, every run run again")
    g = opt.add_argument_group("linearity folding")
    g.add_argument("--no-linear", action="store_true", help="skip linearity folding")
    g.add_argument("--linear-threshold", type=_threshold_arg, default=None, metavar="T",
                   help="a neuron on one linear piece for at least this share of calibration rows is linear "
                   "(1.0 = never left its piece; default 1.0)")
    g.add_argument("--linear-mode", choices=("extended", "paper"), default="extended",
                   help="extended (default): constant neurons too, bias correction, cheapest path form; "
                   "paper: the published method")
    g.add_argument("--linear-path", choices=("auto", "dense", "factored", "svd"), default="auto",
                   help="how linear paths are stored (extended mode)")
    g = opt.add_argument_group("neuron folding")
    g.add_argument("--fold-ratio", type=_ratio_arg, default=None, metavar="R",
                   help="share of neurons removed per hidden layer, e.g. 0.5, or layer0=0.5,layer1=0.3")
    g.add_argument("--fold-select", "--select", dest="fold_select", choices=FOLD_SELECTS, default="kmeans",
                   help="merge clusters (kmeans, default), keep the largest neurons (magnitude), or keep the "
                   "neurons whose removal the refit of their readers makes up for best on the calibration data "
                   "(obs: Optimal Brain Surgeon; dense, gated MLP and attention layers)")
    g.add_argument("--fold-repair", choices=FOLD_REPAIRS, default="auto",
                   help="auto: ls with calibration data, ar without")
    g.add_argument("--refit", dest="fold_refit", choices=("auto", "consumer", "downstream"), default="auto",
                   help="with the ls repair: consumer = refit each fold's consumer only; downstream = also every "
                   "linear op after the first changed one, in order, each on the refit model before it; auto "
                   "(default): downstream, kept only when its output error on held-out data is lower")
    g.add_argument("--fold-heads", type=_count_or_share("--fold-heads"), default=None, metavar="K",
                   help="attention: query heads kept per block (e.g. 8), or the share removed (e.g. 0.33); whole "
                   "heads are clustered and merged. Grouped-query attention folds query heads within each key/value "
                   "group first (the same number in each: at most K in all, a multiple of the key/value heads), "
                   "whole key/value groups only below one query head per group")
    g.add_argument("--fold-kv-heads", type=_count_or_share("--fold-kv-heads"), default=None, metavar="K",
                   help="grouped-query attention (with --fold-heads): key/value heads kept per block, or the share "
                   "removed; each is merged with its query heads into another group (default: all kept)")
    g.add_argument("--fold-residual", action="store_true",
                   help="conv models: also fold residual-stream channels (one shared assignment per stream)")
    g.add_argument("--fold-allocate", dest="fold_allocate", choices=ALLOCATIONS, default="uniform",
                   help="with one --fold-ratio for every dense hidden layer: uniform (default) folds each by it; "
                   "sensitivity first folds each layer alone and measures the output error on held-out samples, "
                   "then removes the same number of neurons in all, more from the layers that cost least")
    g.add_argument("--refine-epochs", dest="refine_epochs", type=int, default=0, metavar="N",
                   help="after the refits, train each folded hidden layer's kept neurons and its reader together "
                   "for N epochs (Adam) towards the original's output on calibration rows; kept only when the "
                   "output error on held-out data falls. Needs PyTorch (pip install 'onnxfold[refine]'); 0 "
                   "(default): off")
    g.add_argument("--seed", type=int, default=0, help="random seed (splits, k-means)")
    g = opt.add_argument_group("budget and checks",
                               "With calibration data and no explicit --fold-ratio/--fold-heads/--linear-threshold, "
                               "onnxfold searches every foldable group (dense and conv chains, attention heads, "
                               "gated MLPs) for the smallest model meeting the budget (default: top-1 agreement >= "
                               "99.5%, or the 99% error quantile <= 1e-3 relative for non-classifier outputs). "
                               "Every limit is judged by a one-sided upper confidence bound on held-out samples, "
                               "and a model that fails the final check is never the output.")
    g.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP",
                   help="allowed accuracy loss in percentage points (needs labels in the data)")
    g.add_argument("--min-agreement", type=float, default=None, metavar="PCT",
                   help="minimum top-1 agreement with the original model, in percent")
    g.add_argument("--max-error", type=parse_max_error, default=None, metavar="X",
                   help="maximum absolute output deviation, for all outputs (0.01) or per output (scores=0.01,boxes=0.5)")
    g.add_argument("--max-perplexity-increase", type=float, default=None, metavar="PCT",
                   help="sequence outputs with next-token labels: allowed perplexity increase in percent")
    g.add_argument("--error-metric", choices=("max", "mean"), default="max",
                   help="--max-error bounds the max (default) or the mean absolute deviation")
    g.add_argument("--target-ratio", type=float, default=None, metavar="R",
                   help="reach this parameter ratio (after/before) with the least error")
    g.add_argument("--positive-threshold", type=float, default=None, metavar="P",
                   help="detector outputs: compare binary decisions (score > P; softmax: any non-first class > P); "
                   "--min-agreement must then hold overall and on the original's positives")
    g.add_argument("--confidence", type=float, default=None, metavar="P",
                   help="every budget is judged by a one-sided upper confidence bound at this level on held-out "
                   "samples (default 0.95; see docs/statistics.md)")
    g.add_argument("--error-quantile", type=float, default=None, metavar="Q",
                   help="--max-error (max metric) and the default relative error bound this quantile of the "
                   "per-sample error (default 0.99)")
    g.add_argument("--max-evaluations", type=int, default=30, metavar="N",
                   help="at most N candidate models in the budget search (default 30)")
    g.add_argument("--check", action="store_true",
                   help="exit 1 when the budget is not met (CI use); the output is then never the failing model: "
                   "the lossless model if it passes, else the unchanged original")
    g.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    g.add_argument("--plot", metavar="PNG", help="draw the budget search (parameter ratio vs budget spent of every "
                   "candidate, chosen one marked); needs matplotlib (pip install 'onnxfold[plot]')")
    g = opt.add_argument_group("scale-out (Ray)", "compute the calibration statistics on a Ray cluster; "
                               "decisions, rewrite, verification and saving stay here (pip install 'onnxfold[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="use Ray: without ADDRESS a local Ray instance is started; HOST:6379 (or auto) joins a "
                   "cluster started with 'ray start --head'")
    g.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray workers, each one onnxruntime session (default: one per CPU of the cluster)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs each Ray worker reserves (with --provider cuda; default 0)")

    ins = sub.add_parser("inspect", help="list dense chains and, with data, per-layer neuron statistics")
    ins.add_argument("model", help="input .onnx model")
    ins.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    ins.add_argument("--plot", metavar="PNG", help="with calibration data: per layer, a histogram of neuron "
                     "activation rates (linear and constant regions marked) and neuron counts by class; "
                     "needs matplotlib (pip install 'onnxfold[plot]')")
    _add_data_options(ins, eval_too=False)
    _add_runtime_options(ins)
    return parser


def options_from_args(args, budget: Budget | None) -> OptimizeOptions:
    """``optimize``'s options, one group per option group of the parser."""
    return OptimizeOptions(
        data=DataOptions(labels=args.labels),
        linearity=LinearityOptions(enabled=not args.no_linear, threshold=args.linear_threshold,
                                   mode=args.linear_mode, path=args.linear_path),
        fold=FoldOptions(ratio=args.fold_ratio, select=args.fold_select, repair=args.fold_repair,
                         refit=args.fold_refit, heads=args.fold_heads, residual=args.fold_residual, kv_heads=args.fold_kv_heads,
                         allocate=args.fold_allocate, refine_epochs=args.refine_epochs),
        search=SearchOptions(budget=budget, positive_threshold=args.positive_threshold,
                             max_evaluations=args.max_evaluations),
        runtime=RuntimeOptions(provider=args.provider, batch_size=args.batch_size, seed=args.seed,
                               ray_address=args.ray, ray_workers=args.ray_workers,
                               ray_gpus_per_worker=args.ray_gpus_per_worker, memo_mib=args.memo_mib),
        report=ReportOptions(latency=not args.no_latency, profile_memory=args.profile_memory))


def _auto_data(model: Path, given: str | None, suffixes: tuple[str, ...], disabled: bool) -> str | None:
    if given is not None or disabled:
        return given
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.stem
    for suf in suffixes:
        cand = model.with_name(stem + suf)
        if cand.exists():
            return str(cand)
    return None


def _load_data_loader(spec: str):
    """``file.py[:func]`` → the feed dicts ``func()`` returns (Polygraphy's convention;
    ``func`` defaults to ``load_data``). Any failure is a one-line UsageError."""
    import importlib.util

    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py"):  # no ":func" (a ":" may be part of a Windows path)
        path, func = spec, "load_data"
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--data-loader-script: no such file {file}")
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_onnxfold_data_loader_{abs(hash(str(file)))}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's script failed
        raise UsageError(f"--data-loader-script: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--data-loader-script: {file} has no function {func!r}; give FILE.py:FUNC")
    try:
        feeds = fn()
        if hasattr(feeds, "get_next") and callable(feeds.get_next):  # a CalibrationDataReader
            feeds = iter(feeds.get_next, None)
        # materialise: read once (inspect --plot reads twice) and the script's errors surface here
        return list(feeds)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--data-loader-script: {file}:{func}() failed: {type(e).__name__}: {e}") from None


def _calibration_source(args, model: Path, console):
    """The calibration argument for the API: a path, feed dicts from a data loader script, or None."""
    script = getattr(args, "data_loader_script", None)
    if script:
        if args.calib:
            raise UsageError("give either --calib or --data-loader-script, not both")
        return _load_data_loader(script)
    calib = _auto_data(model, args.calib, (".calib.npz", ".calib"), args.no_auto_data)
    if calib and not args.calib and not args.quiet:
        console.print(f"using calibration data {calib}")
    return calib


def _write_json_atomic(obj, path: str) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise UsageError(f"report directory does not exist: {target.parent}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class _ProgressSink:
    """Adapts the library's progress callbacks to one rich progress bar per task."""

    def __init__(self, console, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True,
                                 disable=not enabled)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)


def _cmd_optimize(args, console) -> int:
    from .api import optimize
    from .io import default_output_path, model_has_external_data
    from .profile import StageProfiler

    model = Path(args.model)
    out = Path(args.output) if args.output else default_output_path(model)
    if out.resolve() == model.resolve():
        raise UsageError(f"output path equals the input path ({model}); choose another -o/--output")
    # paths are checked before the (possibly long) run, so a bad path fails
    # fast and nothing is written
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"report directory does not exist: {Path(args.report).resolve().parent}; create it first")
    for what, path in (("report", args.report), ("plot", args.plot)):  # fail before any work is written
        if path and not Path(path).parent.exists():
            raise UsageError(f"{what} directory does not exist: {Path(path).parent}")
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()  # before any work
        if options_from_args(args, None).explicit:
            raise UsageError("--plot draws the budget search; explicit --fold-ratio/--fold-heads/--linear-threshold/"
                             "--linear-mode paper settings do not search")
    calib = _calibration_source(args, model, console)
    evald = _auto_data(model, args.eval, (".eval.npz", ".test.npz"), args.no_auto_data)
    if not args.quiet:
        if evald and not args.eval:
            console.print(f"using evaluation data {evald}")
    budget = None
    statistics = {k: v for k, v in (("confidence", args.confidence), ("error_quantile", args.error_quantile))
                  if v is not None}
    limits = (args.max_accuracy_drop, args.min_agreement, args.max_error, args.max_perplexity_increase,
              args.target_ratio)
    if any(x is not None for x in limits):
        budget = Budget(max_accuracy_drop=args.max_accuracy_drop, min_agreement=args.min_agreement,
                        max_error=args.max_error, error_metric=args.error_metric, target_ratio=args.target_ratio,
                        max_perplexity_increase=args.max_perplexity_increase,
                        positive_threshold=args.positive_threshold, **statistics)
    elif statistics:  # the default budget, judged at another level
        budget = replace(Budget.default(args.positive_threshold), **statistics)

    said: list[str] = []

    def notify(text: str) -> None:  # said before the long run; the final report does not repeat it
        if not args.quiet:
            console.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)
            said.append(text)

    with _ProgressSink(console, enabled=not args.quiet) as progress:
        result = optimize(model, calib, eval_data=evald, options=options_from_args(args, budget), progress=progress,
                          notify=notify)
    external = True if (args.external_data or model_has_external_data(model)) else None
    with StageProfiler(memory=args.profile_memory) as profiler, profiler.stage("save"):
        saved = result.save(out, external_data=external)
    result.report["timings_s"].update(profiler.timings())
    if "memory" in result.report and profiler.memory():
        result.report["memory"]["stage_peak_rss_bytes"].update(profiler.peaks)
        result.report["memory"]["peak_rss_bytes"] = max(result.report["memory"]["peak_rss_bytes"],
                                                        profiler.memory()["peak_rss_bytes"])
    result.report["output"] = str(saved)
    if args.report:
        _write_json_atomic(result.report, args.report)
    if args.plot:
        from .plot import plot_search

        plot_search(result.report, args.plot)
        if not args.quiet:
            console.print(f"wrote {args.plot}")
    if not args.quiet:
        from .report import render_report

        render_report(result.report, console, already_said=said)
        console.print(f"wrote {saved}" + (f" and {args.report}" if args.report else ""))
    status = result.report["status"]
    budget_info = result.report.get("budget") or {}
    warning = None
    if status.startswith("budget_not_met"):
        warning = f"budget not met: {'; '.join(budget_info.get('failures') or []) or 'see the report'}"
    elif status == "final_check_failed":
        fb = budget_info.get("fallback") or {}
        warning = (f"warning: the chosen model (parameter ratio {fb.get('chosen_parameter_ratio', float('nan')):.3f}) "
                   f"failed the final check ({'; '.join(fb.get('chosen_failures') or [])}); wrote the "
                   f"{fb.get('returned', 'original')} model instead")
    if warning:  # shown even with --quiet: a CI log must carry it
        type(console)(stderr=True).print(warning, markup=False, highlight=False, soft_wrap=True)
        if args.check:
            return EXIT_CHECK_FAILED
    return EXIT_OK


def _cmd_inspect(args, console) -> int:
    from .api import inspect

    model = Path(args.model)
    for what, path in (("JSON", args.json), ("plot", args.plot)):  # fail before any work
        if path and not Path(path).parent.exists():
            raise UsageError(f"{what} directory does not exist: {Path(path).parent}")
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()  # before any work
    calib = _calibration_source(args, model, console)
    if args.plot and calib is None:
        raise UsageError("--plot draws neuron statistics and needs calibration data: pass --calib")
    with _ProgressSink(console, enabled=not args.quiet) as progress:
        info = inspect(model, calib, provider=args.provider, batch_size=args.batch_size, progress=progress)
    if args.json:
        _write_json_atomic(info, args.json)
    if args.plot:
        from .plot import neuron_rates, plot_inspect

        plot_inspect(neuron_rates(model, calib, provider=args.provider, batch_size=args.batch_size), args.plot,
                     title=f"{model.name}: neuron activation rates per layer "
                     f"({info.get('calibration_samples')} calibration samples)")
        if not args.quiet:
            console.print(f"wrote {args.plot}")
    if info["chains"] or not (info["attention"] or info["gated"]):  # transformers: their blocks' tables below
        _print_dense_chains(info, model.name, console)
    _print_transformer_blocks(info, model.name, console)
    _print_hidden_streams(info, model.name, console)
    for s in info["skipped"]:
        console.print(f"[dim]skipped {s['where']}: {s['reason']}[/dim]")
    for n in info["notes"]:
        console.print(f"note: {n}")
    return EXIT_OK


def _print_dense_chains(info: dict, model_name: str, console) -> None:
    from rich.table import Table

    t = Table(title=f"Dense chains in {model_name}", title_justify="left")
    cols = ["layer", "producer", "activation", "in", "neurons", "out"]
    stats = any("mixed" in c for c in info["chains"])
    if stats:
        cols += ["always on", "never on", "mixed"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("layer", "producer", "activation") else "right")
    for c in info["chains"]:
        row = [c["layer"], c["producer"], c["activation"], str(c["in"]), str(c["neurons"]), str(c["out"])]
        if stats:
            on = c.get("always_on", c.get("always_one_linear_piece"))
            off = c.get("never_on", c.get("always_constant"))
            row += [str(on) if on is not None else "-", str(off) if off is not None else "-", str(c.get("mixed", "-"))]
        t.add_row(*row)
    console.print(t)
    if stats:
        console.print(f"statistics over {info['calibration_samples']} calibration samples "
                      "(always on: one linear piece on every row; never on: constant on every row)")


def _print_transformer_blocks(info: dict, model_name: str, console) -> None:
    """inspect's attention and gated-MLP tables (when the model has any)."""
    from rich.table import Table

    tables = (("attention", f"Attention blocks in {model_name}",
               [("block", "block"), ("q projection", "q"), ("heads", "heads"), ("kv heads", "kv_heads"),
                ("head dim", "head_dim"), ("hidden", "hidden"), ("rotary", "rotary"), ("foldable", "foldable")]),
              ("gated", f"Gated MLPs in {model_name}",
               [("block", "block"), ("gate", "gate"), ("activation", "activation"), ("in", "in"),
                ("neurons", "neurons"), ("out", "out")]))
    for key, title, cols in tables:
        if not info.get(key):
            continue
        t = Table(title=title, title_justify="left")
        for head, _ in cols:
            t.add_column(head, justify="right" if head in ("heads", "kv heads", "head dim", "hidden", "in", "neurons",
                                                           "out") else "left")
        for row in info[key]:
            t.add_row(*[("yes" if row[k] else "no") if isinstance(row[k], bool) else str(row[k]) for _, k in cols])
        console.print(t)


def _print_hidden_streams(info: dict, model_name: str, console) -> None:
    """inspect's table of transformer hidden widths (residual streams), with why each is not folded."""
    from rich.table import Table

    if not info.get("hidden"):
        return
    t = Table(title=f"Hidden width (residual streams) in {model_name}", title_justify="left")
    for head in ("stream", "width", "writers", "readers", "norms", "joins", "foldable"):
        t.add_column(head, justify="left" if head in ("stream", "foldable") else "right")
    for row in info["hidden"]:
        t.add_row(row["stream"], str(row["width"]), str(len(row["producers"])), str(len(row["consumers"])),
                  str(len(row["norms"])), str(row["joins"]), "yes" if row["foldable"] else "no")
    console.print(t)
    for row in info["hidden"]:
        if row["reason"]:
            console.print(f"{row['stream']} not folded: {row['reason']}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=False, quiet=getattr(args, "quiet", False))
    if not console.is_terminal:  # CI logs and pipes: no 80-column squeeze of the tables
        console.width = max(console.width, 140)
    err = Console(stderr=True)
    try:
        if getattr(args, "provider", None) and not getattr(args, "quiet", False):
            from .runtime import resolve_provider

            _, notice = resolve_provider(args.provider)  # probed once, cached for the run
            if notice:
                console.print(notice, markup=False, highlight=False, soft_wrap=True)
        if args.command == "optimize":
            return _cmd_optimize(args, console)
        return _cmd_inspect(args, console)
    except OnnxFoldError as e:
        if args.verbose:
            traceback.print_exc()
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", markup=False)
        return 130
    except Exception as e:  # a bug: say so, keep it to one line unless asked
        if args.verbose:
            traceback.print_exc()
        err.print(f"internal error: {type(e).__name__}: {e} (rerun with --verbose and report it)",
                  markup=False, highlight=False, soft_wrap=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
