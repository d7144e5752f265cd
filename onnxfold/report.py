"""Report: what a run did, as a JSON-ready dict and as console tables.

The JSON keys are a public interface (CI jobs read them); they are documented
in the README ("Report schema") and ``SCHEMA_VERSION`` changes when a key
changes meaning. The library builds the dict; only the CLI prints.
"""

from __future__ import annotations

from collections.abc import Collection

from dataclasses import dataclass, field
from typing import Any

import onnx

from .find import find_dense_graph
from .find.groups import FoldableGroups, find_groups

SCHEMA_VERSION = 1


@dataclass
class ModelSummary:
    parameters: int  # elements of all float initializers / Constant tensors
    bytes: int  # serialized size (weights included, estimated above 2 GB)
    dense_flops_per_row: int  # 2·in·out over dense ops and linear paths, per sample (per token for 3-D inputs)
    hidden_widths: dict[str, int] = field(default_factory=dict)  # group name -> units (neurons, channels, heads)
    conv_flops_per_sample: int | None = 0  # 2·weights·output positions over Conv nodes; None: shapes unknown
    groups: list[dict] = field(default_factory=list)  # per group: kind, name, width, flops

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def conv_flops(model: onnx.ModelProto) -> dict[str, int | None]:
    """FLOPs per sample of every Conv node (2 · kernel elements · output
    positions), by node name; None where onnx shape inference leaves an
    output position count unknown. Kernel shapes come from the initializer
    headers: no weight data is read."""
    from .find.graph_index import GraphIndex

    ix = GraphIndex(model)
    convs = [n for n in ix.nodes if n.op_type == "Conv"]
    if not convs:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model protobuf cannot serialize (over 2 GB) or an op onnx cannot infer
        inferred = model
    g = inferred.graph
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in (*g.value_info, *g.output, *g.input) if vi.type.HasField("tensor_type")}
    out: dict[str, int | None] = {}
    for n in convs:
        meta = ix.const_meta(n.input[1]) if len(n.input) > 1 else None
        spatial = (dims.get(n.output[0]) or [None, None])[2:]
        if meta is None or not spatial or any(d is None for d in spatial):
            out[n.name] = None
            continue
        kernel, positions = 1, 1
        for d in meta[0]:
            kernel *= int(d)
        for d in spatial:
            positions *= int(d)
        out[n.name] = 2 * kernel * positions
    return out


def _sum_known(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else int(sum(values))


def summarize_model(model: onnx.ModelProto, groups: FoldableGroups | None = None) -> ModelSummary:
    """``groups``: ``find_groups(model)`` when the caller has them already.
    A group's FLOPs are those of its producers and consumers: per row (sample
    or token) for dense kinds (neuron, head: the q/k/v/o projections, not the
    sequence-length-dependent attention products; gated), per sample for conv
    kinds (channel, residual)."""
    from .io import count_parameters, model_bytes

    groups = find_groups(model) if groups is None else groups
    dense = {name: 2 * op.out_features * op.in_features + sum(2 * f.size for p in op.paths for f in p.factors)
             for name, op in find_dense_graph(model).ops.items()}
    conv = conv_flops(model)
    per_op = {**dense, **conv}
    rows = [{"kind": g.kind, "name": g.name, "width": g.width,
             "flops": _sum_known(per_op.get(n, 0) for n in (*g.producers, *g.consumers))} for g in groups.groups]
    return ModelSummary(parameters=count_parameters(model), bytes=model_bytes(model),
                        dense_flops_per_row=int(sum(dense.values())),
                        hidden_widths={g.name: g.width for g in groups.groups if g.width is not None},
                        conv_flops_per_sample=_sum_known(conv.values()), groups=rows)


def ratio(after: float, before: float) -> float | None:
    return None if not before else after / before


def build_report(*, input_path: str | None, output_path: str | None, status: str, provider: str,
                 settings: dict, before: ModelSummary, after: ModelSummary, layers: list, skipped: list,
                 verification: dict | None, timings: dict, notes: list[str], budget: dict | None = None,
                 latency: dict | None = None, search: dict | None = None,
                 groups: FoldableGroups | None = None) -> dict[str, Any]:
    """``skipped``: find's skipped patterns (with a ``kind`` when they come
    from ``find_groups``); ``groups``: the input's groups, which give each
    layer row its ``kind``."""
    from .version import __version__

    def layer_row(lr) -> dict:
        row = lr.to_dict() if hasattr(lr, "to_dict") else dict(lr)
        return {"kind": None if groups is None else groups.kind_of(row["layer"]), **row}

    return {
        "schema_version": SCHEMA_VERSION,
        "onnxfold_version": __version__,
        "input": input_path,
        "output": output_path,
        "status": status,
        "provider": provider,
        "settings": settings,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "ratios": {
            "parameters": ratio(after.parameters, before.parameters),
            "bytes": ratio(after.bytes, before.bytes),
            "dense_flops": ratio(after.dense_flops_per_row, before.dense_flops_per_row),
            "conv_flops": None if after.conv_flops_per_sample is None or before.conv_flops_per_sample is None
            else ratio(after.conv_flops_per_sample, before.conv_flops_per_sample),
        },
        "layers": [layer_row(lr) for lr in layers],
        "skipped": [{"kind": getattr(s, "kind", None), "where": s.where, "reason": s.reason} for s in skipped],
        "verification": verification,
        "budget": budget,
        "latency": latency,
        "search": search,
        "timings_s": timings,
        "notes": list(notes),
    }


# ---------------------------------------------------------------------------
# console rendering (rich); used by the CLI only

from rich.table import Table  # noqa: E402 - rich is a runtime dependency; only the CLI renders


def _fmt_int(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_report(report: dict, console, already_said: Collection[str] = ()) -> None:
    """The report as console tables and notes; ``already_said``: notes printed during the run."""

    layers = report.get("layers") or []
    if layers:
        t = Table(title="Hidden layers", title_justify="left")
        for col in ("layer", "kind", "producer", "activation", "units", "linear", "constant", "merged", "pruned",
                    "path", "params"):
            t.add_column(col, justify="left" if col in ("layer", "kind", "producer", "activation", "path")
                         else "right")
        for lr in layers:
            path = "-" if not lr.get("path_form") else f"{lr['path_form']} r={lr.get('path_rank')}"
            t.add_row(lr["layer"], lr.get("kind") or "-", lr["producer"], lr["activation"],
                      f"{lr['width_before']} → {lr['width_after']}", str(lr.get("linear", 0)),
                      str(lr.get("constant", 0)), str(lr.get("merged", 0)), str(lr.get("pruned", 0)), path,
                      f"{_fmt_int(lr.get('params_before'))} → {_fmt_int(lr.get('params_after'))}")
        console.print(t)
    b, a, r = report["before"], report["after"], report["ratios"]
    t = Table(title="Model", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("parameters", _fmt_int(b["parameters"]), _fmt_int(a["parameters"]), _ratio(r["parameters"]))
    t.add_row("bytes", _fmt_int(b["bytes"]), _fmt_int(a["bytes"]), _ratio(r["bytes"]))
    t.add_row("dense FLOPs / sample", _fmt_int(b["dense_flops_per_row"]), _fmt_int(a["dense_flops_per_row"]),
              _ratio(r["dense_flops"]))
    if b.get("conv_flops_per_sample"):
        t.add_row("conv FLOPs / sample", _fmt_int(b["conv_flops_per_sample"]), _fmt_int(a.get("conv_flops_per_sample")),
                  _ratio(r.get("conv_flops")))
    lat = report.get("latency") or {}
    for key, row in lat.items():
        t.add_row(f"latency {key} (ms)", f"{row['before_ms']:.3f}", f"{row['after_ms']:.3f}", _ratio(row["ratio"]))
    console.print(t)
    v = report.get("verification")
    if v:
        t = Table(title=f"Verification on {v['samples']} held-out samples ({v.get('split', 'held-out')})",
                  title_justify="left")
        for col in ("output", "kind", "max abs err", "mean abs err", "agreement", "accuracy before", "accuracy after",
                    "positives kept"):
            t.add_column(col, justify="left" if col in ("output", "kind") else "right")
        for name, o in v["outputs"].items():
            pos = "-" if o.get("positive_agreement") is None else _fmt_pct(o["positive_agreement"])
            kind = o["kind"] if o.get("tokens") is None else f"per token ({o['tokens']} tokens)"
            t.add_row(name, kind, f"{o['max_abs_error']:.3g}", f"{o['mean_abs_error']:.3g}",
                      _fmt_pct(o.get("agreement")), _fmt_pct(o.get("accuracy_original")),
                      _fmt_pct(o.get("accuracy_candidate")), pos)
        console.print(t)
        for name, o in v["outputs"].items():
            if o.get("perplexity_original") is not None:
                console.print(f"{name}: perplexity {o['perplexity_original']:.4g} -> {o['perplexity_candidate']:.4g}"
                              f" ({o['perplexity_increase_pct']:+.3g}%)", markup=False, highlight=False)
    _render_budget(report.get("budget"), console)
    for s in report.get("skipped") or []:
        kind = f" ({s['kind']})" if s.get("kind") else ""
        console.print(f"[dim]skipped {s['where']}{kind}: {s['reason']}[/dim]", highlight=False)
    for n in report.get("notes") or []:
        if n in already_said:
            continue
        if n.startswith("CUDA not available"):
            continue  # the CLI printed the provider line before the run
        console.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)


def _render_budget(budget: dict | None, console) -> None:
    """Each limit with its observed value and upper confidence bound."""
    # after a failed final check, the bounds of the model that was returned (none for the original)
    limits = (budget.get("returned_check") or budget).get("limits") if budget else None
    if not limits:
        return
    conf = 100 * budget.get("confidence", 0.95)
    t = Table(title=f"Budget on the final check ({conf:g}% one-sided bounds)", title_justify="left")
    for col in ("limit", "output", "samples", "observed", "upper bound", "allowed", "met"):
        t.add_column(col, justify="left" if col in ("limit", "output", "met") else "right")
    for lc in limits:
        fmt = (lambda x: f"{x:.3g}") if lc["kind"] == "mean_error" else _fmt_pct
        resolved = lc.get("resolved", True)
        bound = fmt(lc["bound"]) if resolved else f"unresolved (needs {lc['needed'] or '∞'})"
        t.add_row(lc["kind"], lc["output"], str(lc["samples"]), fmt(lc["observed"]), bound, fmt(lc["limit"]),
                  "yes" if lc["met"] else "NO")
    console.print(t)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"
