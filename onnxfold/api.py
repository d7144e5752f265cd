"""The Python API: ``optimize`` and ``inspect``.

Both take a path or a ModelProto and return plain objects; nothing here
prints (the CLI does). The pipeline is:

    load → calibrate/split data → passes (find, measure, decide, rewrite)
         → verify on samples the decisions never saw → report

Data splits: with an explicit evaluation set, the calibration data is split
into a *fit* part (statistics, refits) and a *select* part (held-out choices:
ridge strength, budget candidates); the evaluation set only reports. Without
one, a third part of the calibration data is held back for the final report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import onnx

from .decide.budget import Budget
from .errors import CalibrationDataError, UsageError
from .find import find_dense_graph
from .find.groups import find_groups
from .io import count_parameters
from .io import load_working_copy as _load
from .latency import measure_latency
from .measure.data import MIN_SAMPLES_TO_SPLIT
from .measure.jobs import StreamMemo
from .measure.suffix import TensorMemo
from .passes.base import LayerReport, PassContext
from .profile import StageProfiler
from .report import build_report, summarize_model
from .options import OptimizeOptions
from .pipeline import build_passes, choose_mode, run_passes

ProgressFn = Callable[[str, int, int], None]

# Data splits. Without a budget to size for (explicit settings), fixed
# fractions of the calibration data: (fit, select[, final check]).
SPLIT_WITH_EVAL = (0.75, 0.25)
SPLIT_WITHOUT_EVAL = (0.6, 0.2, 0.2)
# With a budget, the held-out parts (select and final check) get the samples
# the budget needs before the fit part takes the rest, within reason:
HELD_OUT_FACTOR = 2  # twice what an unchanged candidate needs, so a candidate with a flip or two can pass
HELD_OUT_CAP_WITHOUT_EVAL = 0.3  # per held-out part: the fit part keeps at least 40 %
HELD_OUT_CAP_WITH_EVAL = 0.4  # the select part, when --eval is the final check: fit keeps at least 60 %
# and at most this many samples per held-out part, unless the budget needs more: a 20 % share of millions
# of samples would only slow every candidate's comparison down, and the held-out parts live on the driver
# even when the data is read by Ray (its memory stays flat in the number of samples beyond this)
HELD_OUT_MAX_SAMPLES = 50_000
# the settings the report's "settings" object records (report schema, flat keyword names)
REPORTED_SETTINGS = ("linear", "linear_threshold", "linear_mode", "linear_path", "fold_ratio", "fold_select",
                     "fold_repair", "fold_refit", "fold_residual", "fold_heads", "fold_kv_heads", "fold_allocate",
                     "refine_epochs", "seed", "batch_size")


@dataclass
class OptimizeResult:
    """What ``optimize`` returns: the optimized model and its report."""

    model: onnx.ModelProto
    report: dict[str, Any]
    changed: bool
    layers: list[LayerReport] = field(default_factory=list)

    def save(self, path: str | Path, *, external_data: bool | None = None) -> Path:
        from .errors import ModelSaveError
        from .io import save_model

        src = self.report.get("input") if isinstance(self.report, dict) else None
        if src and Path(src).exists() and Path(path).resolve() == Path(src).resolve():
            raise ModelSaveError(f"output path equals the input path ({src}); choose another output path")
        return save_model(self.model, path, external_data=external_data)


def held_out_size(n: int, needed: int, cap: float, floor: float) -> int:
    """Samples in one held-out part of ``n``: enough to resolve the budget
    (``needed``, times HELD_OUT_FACTOR) when a ``cap`` share of the data can
    hold that, else the ``floor`` share (more would not resolve the budget
    and would only starve the fit part)."""
    base = max(1, int(round(floor * n)))
    limit = max(HELD_OUT_MAX_SAMPLES, HELD_OUT_FACTOR * needed)
    if cap * n < needed:
        return min(base, limit)
    return min(max(base, min(HELD_OUT_FACTOR * needed, int(cap * n))), limit)


def split_data(calib, eval_set, seed: int, needed: int | None):
    """(fit, select, final) sets; see the module docstring. ``needed``: the
    held-out samples the budget needs (None: fixed fractions)."""
    if calib is None:
        return None, None, eval_set
    n = calib.num_samples
    if eval_set is not None:
        if n < MIN_SAMPLES_TO_SPLIT:
            return calib, calib, eval_set
        if needed is None and round(SPLIT_WITH_EVAL[1] * n) <= HELD_OUT_MAX_SAMPLES:
            fit, select = calib.split(SPLIT_WITH_EVAL, seed)
        else:
            h = held_out_size(n, needed or 0, HELD_OUT_CAP_WITH_EVAL, SPLIT_WITH_EVAL[1])
            fit, select = calib.split(((n - h) / n, h / n), seed)
        return fit, select, eval_set
    if n < MIN_SAMPLES_TO_SPLIT:
        raise CalibrationDataError(
            f"calibration data has {n} samples; give at least {MIN_SAMPLES_TO_SPLIT} (part is held out to verify)"
            " or pass a separate evaluation set")
    if needed is None and round(SPLIT_WITHOUT_EVAL[1] * n) <= HELD_OUT_MAX_SAMPLES:
        return tuple(calib.split(SPLIT_WITHOUT_EVAL, seed))
    h = held_out_size(n, needed or 0, HELD_OUT_CAP_WITHOUT_EVAL, SPLIT_WITHOUT_EVAL[1])
    fit, select, final = calib.split(((n - 2 * h) / n, h / n, h / n), seed)
    return fit, select, final


def has_sequence_output(model: onnx.ModelProto) -> bool:
    """Does the model have a float output of rank 3 ([batch, positions, classes]), judged per position?"""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return any(o.type.tensor_type.elem_type in floats and o.type.tensor_type.HasField("shape")
               and len(o.type.tensor_type.shape.dim) == 3 for o in model.graph.output)


def resolution_warning(budget: Budget, select, final, *, has_eval: bool, sequences: bool = False) -> str | None:
    """Said before the search starts when the held-out parts are too small for
    the budget at its confidence, with the number of samples that would do."""
    needed = budget.samples_needed(sequences=sequences)
    small = [(what, part.num_samples) for what, part in (("select", select), ("final check", final))
             if part is not None and part.num_samples < needed]
    if not small:
        return None
    parts = ", ".join(f"{what} {n}" for what, n in small)
    more = (f"give at least {int(-(-needed // HELD_OUT_CAP_WITH_EVAL))} calibration samples and an --eval set of "
            f"at least {needed}"
            if has_eval else
            f"give at least {int(-(-needed // HELD_OUT_CAP_WITHOUT_EVAL))} calibration samples, or an --eval set "
            f"of at least {needed}")
    return (f"too little held-out data for this budget at {100 * budget.confidence:g}% confidence: it needs "
            f"{needed} samples per held-out part, there are {parts}; only candidates with no observed change "
            f"can be accepted ({more} for more compression)")


def _import_decide_libraries() -> None:
    """Import what the decide stage runs on now, as part of loading:
    scikit-learn takes 1-2 s to import whatever the model, and the passes,
    the search, the graph editor and onnx_graphsurgeon another 0.3-1 s on a
    loaded machine; imported lazily they would land in the first candidate
    of the decide stage and hide what deciding costs (issue 16 compares
    decide with calibration seconds)."""
    import sklearn.cluster  # noqa: F401
    import threadpoolctl  # noqa: F401

    from . import search  # noqa: F401
    from .passes import channel_folding, folding, head_folding, linearity  # noqa: F401
    from .rewrite import materialize  # noqa: F401


def optimize(model, calibration=None, *, eval_data=None, options: OptimizeOptions | None = None,
             progress: ProgressFn | None = None, notify: Callable[[str], None] | None = None,
             **settings) -> OptimizeResult:
    """Compress ``model`` (path or ModelProto) and verify the result.

    calibration / eval_data: an .npz path, a directory of .npy files, a dict of
    arrays, or an iterable of feed dicts (e.g. an onnxruntime
    CalibrationDataReader); with ``ray_address`` also a Parquet path (file or
    directory) or a ``ray.data.Dataset`` (see :mod:`onnxfold.measure.raydata`).

    Settings: an :class:`~onnxfold.options.OptimizeOptions` (``options=``),
    grouped by concern like the CLI, and/or the same settings as flat keywords
    (``fold_ratio=0.5, provider="cpu"``; the names are
    :data:`onnxfold.options.KEYWORDS`), which override ``options``. Bad values
    are one-line ``UsageError``s before any work. ``progress(task, done, total)``
    hears long work; ``notify(text)`` hears what must be said before it starts.

    Modes (see ``choose_mode``):
    - with calibration data and no explicit settings, search for the smallest
      model meeting ``budget`` (default: ``Budget.default()``, top-1
      agreement >= 99.5 % / max error <= 1e-3 relative on held-out samples);
    - with explicit settings (``fold_ratio``, ``linear_threshold``, paper mode)
      run exactly those; a given budget is then only checked;
    - without calibration data only rewrites that are exact for every input
      (provably dead/linear neurons), plus data-free folding with ``fold_ratio``.

    Convolutional chains (Conv [+BN] -> activation -> Conv) are folded
    channel-wise with an explicit ``fold_ratio`` (see
    :class:`onnxfold.passes.channel_folding.ChannelFoldingPass`); channels on
    a residual stream only with ``fold_residual=True``. Gated MLPs
    (``down(act(gate) * up)``) fold with ``fold_ratio`` too; attention blocks
    fold whole heads with ``fold_heads`` (heads kept per block, or the share
    removed as a float), see :class:`onnxfold.passes.head_folding.HeadFoldingPass`.

    Budgets are judged by one-sided confidence bounds (``budget.confidence``,
    default 95 %; see docs/statistics.md): the search chooses on the *select*
    split, and the chosen model is checked again on data the search never saw
    (``eval_data``, or a held-back part of the calibration data). A model known
    to miss a budget is never returned:

    - no candidate met the budget on the select split: the original model
      (``result.changed`` False, ``report["status"] == "budget_not_met"``);
    - the chosen model failed the final check: the lossless model (linearity
      folding at T = 1.0, exact on the calibration data) if it passes that
      check itself, else the original (``report["status"] ==
      "final_check_failed"``, ``report["budget"]["fallback"]`` says which).

    Explicit settings without a budget are checked against the default budget
    and returned as asked (``"budget_not_met_on_evaluation"`` when they miss it).
    The held-out parts are sized for the budget before the fit part takes the
    rest (see ``held_out_size``); when they are too small to resolve it,
    ``notify`` (if given) hears so before the search starts.

    The report's ``timings_s`` splits the run by stage (see
    :mod:`onnxfold.profile`); ``profile_memory=True`` adds each stage's peak
    resident memory (``report["memory"]``, Linux). A model loaded from a path
    with external data keeps untouched weights on disk: ``result.model`` may
    reference the input's data file - save it with ``result.save`` /
    :func:`onnxfold.io.save_model`, or call :func:`onnxfold.tensors.load_deferred`
    on it for a self-contained proto.

    Scale-out: ``ray_address`` computes the streamed calibration statistics on
    a Ray cluster (``"local"`` starts a local instance; ``"HOST:6379"`` or
    ``"auto"`` joins a running cluster; a Ray instance already initialised in
    this process is used as it is), ``ray_workers`` actors (default: one per
    CPU of the cluster, or per ``ray_gpus_per_worker`` GPUs), each holding
    its own onnxruntime session; see :mod:`onnxfold.distributed`. Decisions,
    rewrite, verification and saving stay in this process. Needs
    ``pip install 'onnxfold[ray]'``.
    """
    opts = (options or OptimizeOptions()).with_keywords(**settings).validate()
    if opts.runtime.ray_address is not None:
        from .distributed import import_ray

        import_ray()  # before any work: a missing install is a one-line error
    with StageProfiler(memory=opts.report.profile_memory) as profiler:
        result = _optimize(model, calibration, eval_data, opts, progress=progress, notify=notify,
                           timer=profiler.stage)
    result.report["timings_s"] = profiler.timings()
    memory = profiler.memory()
    if memory is not None:
        result.report["memory"] = memory
    return result


def _optimize(model, calibration, eval_data, opts: OptimizeOptions, *, progress, notify, timer) -> OptimizeResult:
    from .distributed import make_backend

    backend = None
    rt = opts.runtime
    try:
        if rt.ray_address is not None:
            with timer("ray_start"):
                backend = make_backend(rt.ray_address, provider=rt.provider, workers=rt.ray_workers,
                                       gpus_per_worker=rt.ray_gpus_per_worker)
        return _optimize_with(model, calibration, eval_data, opts, progress=progress, notify=notify, timer=timer,
                              backend=backend)
    finally:
        if backend is not None:
            backend.close()


def _load_data(source, model, what: str, backend):
    """A CalibrationSet, or with Ray a Parquet / Ray Dataset source or a
    directory of ``.npz`` shards as a
    :class:`~onnxfold.measure.raydata.RayCalibration` (an evaluation set is
    gathered into memory: it is only compared on)."""
    from .measure.data import load_calibration
    from .measure.raydata import load_ray_calibration, reads_with_ray_data

    if source is None:
        return None
    if backend is not None and reads_with_ray_data(source, model):
        data = load_ray_calibration(source, model, what=what)
        if what == "evaluation" and getattr(data, "is_ray_dataset", False):
            import numpy as np

            data = data.gather(np.arange(data.num_samples))
        return data
    return load_calibration(source, model, what=what)


def _optimize_with(model, calibration, eval_data, opts: OptimizeOptions, *, progress, notify, timer,
                   backend) -> OptimizeResult:
    from .measure.batching import restore_fixed_batch, run_in_batches
    from .runtime import resolve_provider
    from .verify import compare_models

    notes: list[str] = []
    with timer("load"):
        original, input_path = _load(model)
        if calibration is not None or opts.fold.ratio is not None or opts.fold.heads is not None:
            _import_decide_libraries()
    providers, notice = resolve_provider(opts.runtime.provider)
    if notice:
        notes.append(notice)
    batch_size, seed = opts.runtime.batch_size, opts.runtime.seed
    budget, positive_threshold = opts.search.budget, opts.search.positive_threshold
    with timer("load_data"):
        calib = _load_data(calibration, original, "calibration", backend)
        evalset = _load_data(eval_data, original, "evaluation", backend)
        if opts.data.labels == "next-token":
            from .measure.labels import next_token_labels

            calib, evalset = (None if d is None else next_token_labels(d) for d in (calib, evalset))
        # a batch axis fixed at 1: work on a copy that runs in batches when it can
        loaded = original
        original, batching, batching_note = run_in_batches(loaded, [calib, evalset], providers)
        if batching_note:
            notes.append(batching_note)
    mode = choose_mode(opts, has_data=calib is not None)
    # the budget is enforced (a model that misses it is never returned) when it
    # is the user's or the search's; explicit settings without one are only
    # reported against the default budget
    enforced = mode == "search" or (budget is not None and not budget.is_default)
    if budget is None and mode != "exact":
        budget = Budget.default(positive_threshold)
    elif budget is not None:
        budget = replace(budget)  # the positive threshold is filled in below: never on the caller's object
    if budget is not None:
        if budget.positive_threshold is None:
            budget.positive_threshold = positive_threshold
        # the search judges candidates on a part of the calibration data, the
        # final check on the evaluation data: both need labels for an accuracy budget
        budget.validate(has_labels=(calib is not None and calib.has_labels)
                        and (evalset is None or evalset.has_labels))
    with timer("load_data"):
        needed = budget.samples_needed(sequences=has_sequence_output(original)) if enforced and budget else None
        fit, select, final = split_data(calib, evalset, seed, needed)
    if enforced and budget is not None and mode != "exact":
        warning = resolution_warning(budget, select, final, has_eval=evalset is not None,
                                     sequences=has_sequence_output(original))
        if warning:
            notes.append(warning)
            if notify:
                notify(warning)
    ctx = PassContext(calibration=fit, heldout=select, providers=providers, batch_size=batch_size, seed=seed,
                      progress=progress,
                      streams=StreamMemo(max_bytes=opts.runtime.memo_bytes,
                                         tensors=TensorMemo(max_bytes=opts.runtime.memo_bytes)))
    if backend is not None:
        ctx.stats_backend = backend
        notes.append(f"calibration statistics computed by {backend.num_workers} Ray workers" if fit is not None else
                     f"no calibration data: the {backend.num_workers} Ray workers only cluster transformer blocks")
        source = getattr(fit, "parent", None)
        if source is not None:
            notes.append(f"calibration data ({source.source}) read by Ray into the object store; the driver holds "
                         "only the held-out parts")
        elif fit is not None:  # the task pool starts now (a Ray Data source's jobs start actor pools of their own)
            note = backend.provider_note(providers)
            if note:
                notes.append(note)
    # every foldable group and what was skipped (names, widths and node names: no weights read)
    groups = find_groups(original, fold_residual=opts.fold.residual)
    before = summarize_model(original, groups)
    # conv channel groups a fold ratio can name: chains, and residual streams when they fold
    chain_names = groups.names("neuron")
    conv_chains = [g.name for g in groups.of_kind("channel", "residual") if g.searchable]
    gated = groups.names("gated")
    attention = [g.name for g in groups.of_kind("head") if g.searchable]
    if opts.fold.heads is not None and not attention:
        raise UsageError("--fold-heads: no foldable attention block found in the model (fused attention nodes "
                         "are not folded; see the report's notes)")
    search_info, search_result = None, None
    status = "optimized"
    with timer("decide"):
        if mode == "search":  # the search covers every group with a knob
            nothing_to_do = not groups.searchable
        else:  # explicit settings: what they name must exist
            nothing_to_do = not chain_names and not ((conv_chains or gated) and opts.fold.ratio is not None) \
                and opts.fold.heads is None
        if nothing_to_do:
            current, changed, layers = original, False, []
            notes.append("no dense or conv chain, attention block or gated MLP found to fold; nothing to optimize")
        elif mode == "search":
            from .search import BudgetSearch

            searcher = BudgetSearch(original, budget, ctx, groups=groups,
                                    max_evaluations=opts.search.max_evaluations, progress=progress)
            res = search_result = searcher.run()
            notes.extend(res.notes)
            search_info = {"evaluated": res.evaluated, "chosen": res.chosen, "best_uniform": res.best_uniform}
            if res.best is None:
                current, changed, layers, status = original, False, [], "budget_not_met"
                notes.append("no candidate met the budget on held-out data; the original model is returned unchanged")
            else:
                # a candidate that saves nothing is no reason to hand back a rewritten graph
                changed = res.best.parameters < count_parameters(original)
                current, layers = (res.best.model, res.best.layers) if changed else (original, [])
                notes.extend(res.best.notes)
        else:
            passes = build_passes(opts, has_data=fit is not None, conv_chains=conv_chains, gated=gated)
            current, changed, layers, pass_notes = run_passes(original, passes, ctx)
            notes.extend(pass_notes)
    verification, budget_info = None, None
    if final is not None and changed:
        with timer("verify"):
            comp = compare_models(original, current, final, providers=providers, batch_size=batch_size,
                                  positive_threshold=positive_threshold if budget is None else budget.positive_threshold)
            verification = comp.to_dict()
            verification["split"] = "evaluation set" if evalset is not None else "held-out part of calibration data"
            notes.extend(comp.notes)
            if budget is not None:
                check = _judge_final(budget, comp, current, original)
                budget_info = {"spec": budget.to_dict(), **check.to_dict()}
                if not check.met and enforced:
                    # never hand back a model known to miss the budget: fall back to the
                    # lossless model if it passes the same final check, else the original
                    fallback = _lossless_fallback(original, search_result, opts.linearity.enabled, ctx, budget, final, providers,
                                                  batch_size)
                    status = "final_check_failed"
                    budget_info["fallback"] = {"chosen_parameter_ratio": count_parameters(current)
                                               / count_parameters(original),
                                               "chosen_failures": check.failures,
                                               "returned": fallback.returned}
                    notes.append(f"the chosen model failed the final check on data the search never saw "
                                 f"({'; '.join(check.failures)}); returning the {fallback.returned} model instead")
                    current, layers = fallback.model, fallback.layers
                    changed = fallback.returned == "lossless"
                    verification = None if fallback.comparison is None else fallback.comparison.to_dict()
                    if verification is not None:
                        verification["split"] = "evaluation set" if evalset is not None else \
                            "held-out part of calibration data"
                    budget_info.update(met=fallback.check is not None and fallback.check.met,
                                       returned_check=None if fallback.check is None else fallback.check.to_dict())
                elif not check.met:
                    status = "budget_not_met_on_evaluation"
    elif budget is not None and status == "budget_not_met":
        budget_info = {"spec": budget.to_dict(), "met": False, "spent": None,
                       "failures": ["no candidate met the budget on held-out data"]}
    if not changed and status == "optimized":
        status = "unchanged"
        notes.append("no rewrite applied; the output equals the input")
    if changed and batching is not None:  # the output keeps the input's fixed batch axis
        current = restore_fixed_batch(current, loaded, batching)
    latency_info = None
    if opts.report.latency and changed and (final is not None or fit is not None):
        with timer("latency"):  # the models as the user runs them: a fixed batch axis is timed at 1
            latency_info = measure_latency(loaded, current, final if final is not None else fit,
                                           providers=providers, **({"batch_sizes": (1,)} if batching else {}))
    if search_info is not None:
        notes.append(f"budget search evaluated {len(search_info['evaluated'])} candidates")
    report = build_report(
        input_path=input_path, output_path=None, status=status, provider=providers[0],
        settings=dict(mode=mode, **{k: v for k, v in opts.keywords().items() if k in REPORTED_SETTINGS},
                      calibration_samples=None if calib is None else calib.num_samples,
                      evaluation_samples=None if evalset is None else evalset.num_samples,
                      split={"fit": None if fit is None else fit.num_samples,
                             "select": None if select is None else select.num_samples,
                             "final": None if final is None else final.num_samples}),
        before=before, after=summarize_model(current) if changed else before, layers=layers,
        skipped=groups.skipped, groups=groups, verification=verification, budget=budget_info,
        latency=latency_info, timings={}, notes=notes, search=search_info)
    return OptimizeResult(model=current if changed else loaded, report=report, changed=changed, layers=layers)


def _judge_final(budget: Budget, comp, model, original):
    """The budget's check of ``model`` on the final split, plus its size target."""
    check = budget.check(comp)
    if budget.target_ratio is not None and count_parameters(model) > budget.target_ratio * count_parameters(original):
        check.met = False
        check.failures.append(f"parameter ratio above the target {budget.target_ratio}")
    return check


@dataclass
class _Fallback:
    returned: str  # "lossless" | "original"
    model: onnx.ModelProto
    layers: list
    comparison: Any = None  # the lossless model's final comparison
    check: Any = None


def _lossless_fallback(original, search_result, linear: bool, ctx: PassContext, budget: Budget, final, providers,
                       batch_size: int) -> _Fallback:
    """The lossless model (linearity folding at T = 1.0, exact on the
    calibration data) when it saves parameters and passes the final check
    itself, else the original."""
    from .verify import compare_models

    lossless = None
    if search_result is not None and search_result.lossless is not None and search_result.lossless.met \
            and search_result.lossless is not search_result.best:
        lossless = (search_result.lossless.model, search_result.lossless.layers)
    elif search_result is None and linear:
        from .passes.linearity import LinearityPass

        model, changed, layers, _ = run_passes(original, [LinearityPass(threshold=1.0)], ctx)
        lossless = (model, layers) if changed else None
    if lossless is not None and count_parameters(lossless[0]) < count_parameters(original):
        comp = compare_models(original, lossless[0], final, providers=providers, batch_size=batch_size,
                              positive_threshold=budget.positive_threshold)
        check = _judge_final(budget, comp, lossless[0], original)
        if check.met:
            return _Fallback("lossless", lossless[0], lossless[1], comp, check)
    return _Fallback("original", original, [])


def inspect(model, calibration=None, *, provider: str = "auto", batch_size: int = 256,
            progress: ProgressFn | None = None) -> dict[str, Any]:
    """Dense chains, attention blocks, gated MLPs and hidden streams (with
    the reason each is not folded) of ``model`` and, with
    calibration data, per-layer neuron statistics of the dense chains: how
    many neurons are always on / never on / mixed."""
    from .find.attention import find_transformer
    from .find.hidden import transformer_streams
    from .measure.data import load_calibration
    from .measure.stats import collect_neuron_stats
    from .runtime import resolve_provider

    m, path = _load(model)
    view = find_dense_graph(m)
    tview = find_transformer(m)
    # a projection of an attention block or gated MLP is no dense chain, and is not reported as a failed one
    covered = {n for b in tview.blocks for n in b.nodes} | {n for g in tview.gated for p in g.projections
                                                            for n in p.nodes}
    # the transformer's hidden width (residual stream): listed with the reason it is not folded
    streams, stream_skips = transformer_streams(m, tview)
    covered |= {p for s in streams for p in s.producers}
    skipped = [s for s in view.skipped if s.where not in covered] + tview.skipped + stream_skips
    out: dict[str, Any] = {"model": path, "chains": [], "skipped": [s.__dict__ for s in skipped], "notes": []}
    # every attention block found, in graph order (multi-head and grouped-query blocks both fold)
    out["attention"] = [{**b.summary(), "foldable": True} for b in tview.blocks]
    out["gated"] = [g.summary() for g in tview.gated]
    out["hidden"] = [s.summary() for s in streams]
    stats = {}
    if calibration is not None:
        providers, notice = resolve_provider(provider)
        if notice:
            out["notes"].append(notice)
        data = load_calibration(calibration, m)
        out["calibration_samples"] = data.num_samples
        specs = {c.producer.output: c.activation for c in view.chains}
        cb = (lambda d, t: progress("calibration", d, t)) if progress else None
        stats = collect_neuron_stats(m, specs, data, batch_size=batch_size, providers=providers, progress=cb)
    for c in view.chains:
        row = {"layer": c.name, "producer": c.producer.name, "consumer": c.consumer.name,
               "activation": c.activation.describe(), "in": c.producer.in_features, "neurons": c.width,
               "out": c.consumer.out_features, "form": c.producer.form, "linear_paths": len(c.consumer.paths)}
        st = stats.get(c.producer.output)
        if st is not None:
            piece, rate = st.on_one_piece_rate() if c.activation.is_piecewise_linear else (None, None)
            if c.activation.is_piecewise_linear:
                pieces = c.activation.pieces(c.width)
                one = rate >= 1.0
                const = one & [pieces[p].is_constant for p in piece]
                row["always_one_linear_piece"] = int((one & ~const).sum())
                row["always_constant"] = int(const.sum())
                row["mixed"] = int(c.width - one.sum())
                if c.activation.kind == "relu":
                    row["always_on"] = int(st.always_on().sum())
                    row["never_on"] = int(st.never_on().sum())
        out["chains"].append(row)
    return out
