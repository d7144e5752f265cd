"""Pictures for ``onnxfold inspect --plot`` and ``onnxfold optimize --plot``.

matplotlib is optional (``pip install 'onnxfold[plot]'``); :func:`require_matplotlib`
raises a one-line :class:`~onnxfold.errors.UsageError` (exit 2) when it is
missing, so the CLI can check before doing any work. Rendering uses the Agg
backend (no display needed) and never touches the caller's pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

LINEAR_COLOR = "#2a9d8f"
CONSTANT_COLOR = "#e76f51"
MIXED_COLOR = "#8d99ae"


def require_matplotlib():
    """The ``matplotlib`` module, or a one-line UsageError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'onnxfold[plot]'") from None
    return matplotlib


def _figure(nrows: int, ncols: int, size):
    require_matplotlib()
    from matplotlib.figure import Figure  # object API: no global pyplot state, no display

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path) -> Path:
    target = Path(path)
    if not target.parent.exists():
        raise UsageError(f"plot directory does not exist: {target.parent}")
    try:
        fig.savefig(target, dpi=110)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot write the plot to {target}: {e}") from None
    return target


# ---------------------------------------------------------------------------
# inspect: neuron activation rates per layer


def neuron_rates(model, calibration, *, provider: str = "auto", batch_size: int = 256) -> list[dict[str, Any]]:
    """Per chain: each neuron's share of calibration rows on its "on" side and its class.

    ``rate`` is the share of rows with the pre-activation above the activation's
    (first) kink: z > 0 for the ReLU family, z inside the bounds for Clip, z > 0
    for smooth activations. ``cls`` is "linear" (one linear piece on every row),
    "constant" (a constant piece on every row) or "mixed"; smooth activations
    have no linear pieces, so all their neurons are "mixed".
    """
    from .io import load_working_copy
    from .find import find_dense_graph
    from .measure.data import load_calibration
    from .measure.stats import collect_neuron_stats
    from .runtime import resolve_provider

    m, _ = load_working_copy(model)
    view = find_dense_graph(m)
    providers, _ = resolve_provider(provider)
    data = load_calibration(calibration, m)
    specs = {c.producer.output: c.activation for c in view.chains}
    stats = collect_neuron_stats(m, specs, data, batch_size=batch_size, providers=providers)
    out = []
    for c in view.chains:
        st = stats[c.producer.output]
        act = c.activation
        cls = np.array(["mixed"] * c.width, dtype=object)
        if act.is_piecewise_linear:
            pieces = act.pieces(c.width)
            piece, one_rate = st.on_one_piece_rate()
            one = one_rate >= 1.0
            const = one & np.array([pieces[p].is_constant for p in piece])
            cls[one & ~const] = "linear"
            cls[const] = "constant"
            if act.kind == "clip" and len(pieces) == 3:
                rate = st.piece_rate(1)  # inside the bounds
            else:
                rate = st.active_rate
        else:
            rate = st.active_rate
        out.append({"layer": c.name, "activation": act.describe(), "kind": act.kind, "width": c.width,
                    "rate": np.asarray(rate, dtype=np.float64), "cls": cls, "samples": data.num_samples,
                    "rows": int(np.max(st.count))})  # rows = samples x tokens for 3-D inputs
    return out


def plot_inspect(layers: list[dict[str, Any]], path, *, title: str = "") -> Path:
    """One row per layer: histogram of neuron "on" rates with the linear and
    constant regions marked, and the neuron counts by class."""
    if not layers:
        raise UsageError("--plot: the model has no dense chains to draw")
    fig, axes = _figure(len(layers), 2, (10, 2.6 * len(layers) + 0.6))
    bins = np.linspace(0.0, 1.0, 41)
    for row, layer in enumerate(layers):
        ax, bx = axes[row]
        rate, cls = layer["rate"], layer["cls"]
        groups = [("mixed", MIXED_COLOR), ("linear", LINEAR_COLOR), ("constant", CONSTANT_COLOR)]
        data = [rate[cls == g] for g, _ in groups]
        ax.hist(data, bins=bins, stacked=True, color=[c for _, c in groups],
                label=[f"{g} ({len(d)})" for (g, _), d in zip(groups, data)], edgecolor="white", linewidth=0.3)
        kind = layer.get("kind", "")
        # rate 0: ReLU off / Clip saturated = constant; LeakyRelu/PRelu negative piece = linear
        low = {"relu": ("constant", CONSTANT_COLOR), "clip": ("constant", CONSTANT_COLOR),
               "leaky_relu": ("linear", LINEAR_COLOR), "prelu": ("linear", LINEAR_COLOR)}.get(kind)
        if low is not None:  # piecewise-linear: mark both ends
            ax.axvspan(0.0, bins[1], color=low[1], alpha=0.12, lw=0)
            ax.axvspan(bins[-2], 1.0, color=LINEAR_COLOR, alpha=0.12, lw=0)
            ax.text(bins[1], 0.97, " " + low[0], transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                    color=low[1])
            ax.text(bins[-2], 0.97, "linear ", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                    ha="right", color=LINEAR_COLOR)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylabel("neurons")
        what = "with the pre-activation inside the Clip bounds" if kind == "clip" else "with pre-activation > 0"
        rows = layer.get("rows", layer["samples"])
        rows_txt = f"{rows:,} calibration rows" + (f" ({layer['samples']:,} samples)" if rows != layer["samples"] else "")
        ax.set_xlabel(f"share of {rows_txt} {what}")
        ax.set_title(f"{layer['layer']}: {layer['width']} neurons, {layer['activation']}", loc="left", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", frameon=False, ncols=3, bbox_to_anchor=(0.5, 0.93))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # room for the legend and the region labels
        counts = [int(np.sum(cls == g)) for g, _ in groups]
        bars = bx.barh([g for g, _ in groups], counts, color=[c for _, c in groups])
        bx.bar_label(bars, labels=[str(n) for n in counts], padding=3, fontsize=8)
        bx.set_xlim(0, max(max(counts), 1) * 1.2)
        bx.set_xlabel("neurons")
        bx.set_title("by class", loc="left", fontsize=10)
        bx.invert_yaxis()
    fig.suptitle(title or "Neuron activation rates per layer (linear: one linear piece on every row; "
                 "constant: a constant piece on every row)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# optimize: the budget search


def _label(setting: dict) -> str:
    parts = []
    if setting.get("fold_ratios"):
        parts.append("fold " + ",".join(f"{k}={v:g}" for k, v in setting["fold_ratios"].items()))
    if setting.get("heads_kept"):
        parts.append("heads " + ",".join(f"{k}={v}" for k, v in setting["heads_kept"].items()))
    if setting.get("linear_thresholds"):
        parts.append("lin " + ",".join(f"{k}={v:g}" for k, v in setting["linear_thresholds"].items()))
    return "; ".join(parts) or "exact rewrites only"


def plot_search(report: dict, path) -> Path:
    """Parameter ratio vs budget spent for every candidate the search evaluated,
    with the limit (spent = 1) and the chosen point marked."""
    search = report.get("search")
    if not search or not search.get("evaluated"):
        raise UsageError("--plot draws the budget search, but this run did no search (it needs calibration "
                         "data and no explicit --fold-ratio/--linear-threshold/--linear-mode paper)")
    ev = search["evaluated"]
    x = np.array([e["parameter_ratio"] for e in ev], dtype=np.float64)
    spent = np.array([np.nan if e["spent"] is None else e["spent"] for e in ev], dtype=np.float64)
    met = np.array([bool(e["met"]) for e in ev])
    finite = np.isfinite(spent)
    y = np.where(finite, spent, np.nan)
    fig, axes = _figure(1, 1, (8, 5))
    ax = axes[0][0]
    use_log = finite.any() and np.nanmax(y) / max(np.nanmin(y[y > 0]) if (y > 0).any() else 1.0, 1e-12) > 50
    if use_log:
        floor = min(1e-3, float(np.nanmin(y[y > 0])) / 3)
        ax.set_yscale("log")
        if (y == 0).any():  # candidates with no measurable change (spent 0) drawn on a marked floor
            y = np.where(y > 0, y, floor)
            ax.axhline(floor, color="grey", lw=0.8, ls=":")
            ax.text(0.01, floor, "spent 0 (no measurable change) ", va="bottom", ha="left", fontsize=8,
                    color="grey", transform=ax.get_yaxis_transform())
    # the size-versus-budget trade-off: candidates no other one beats on both axes
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if np.isfinite(y[i]) and y[i] < best:
            front.append(i)
            best = y[i]
    if len(front) > 1:
        ax.plot(x[front], y[front], color="grey", lw=0.8, zorder=2, label="trade-off front")
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.text(1.0, 1.0, " budget limit", va="bottom", ha="right", fontsize=8, transform=ax.get_yaxis_transform())
    ax.scatter(x[met], y[met], c=LINEAR_COLOR, s=28, label=f"met ({int(met.sum())})", zorder=3)
    ax.scatter(x[~met], y[~met], c=CONSTANT_COLOR, marker="x", s=28, label=f"not met ({int((~met).sum())})",
               zorder=3)
    chosen = search.get("chosen")
    idx = next((i for i, e in enumerate(ev) if chosen is not None and e["setting"] == chosen and e["met"]), None)
    if idx is not None:
        ax.scatter([x[idx]], [y[idx]], s=200, facecolors="none", edgecolors="black", linewidths=1.6,
                   label="chosen", zorder=4)
        ax.annotate(f"chosen: ratio {x[idx]:.3f}, spent {spent[idx]:.2f}\n{_label(chosen)}", (x[idx], y[idx]),
                    textcoords="axes fraction", xytext=(0.35, 0.55), fontsize=8,
                    bbox=dict(boxstyle="round", fc="white", ec="grey", lw=0.6),
                    arrowprops=dict(arrowstyle="->", lw=0.8, color="black"))
    ax.set_xlabel("parameter ratio (after / before)")
    ax.set_ylabel("budget spent (share of the tightest limit; log)" if use_log else
                  "budget spent (share of the tightest limit)")
    ax.set_xlim(min(0.0, np.nanmin(x) - 0.02), 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    status = report.get("status", "")
    ratio = (report.get("ratios") or {}).get("parameters")
    ax.set_title(f"Budget search: {len(ev)} candidates; status {status}"
                 + (f", final parameter ratio {ratio:.3f}" if ratio is not None else ""), fontsize=10, loc="left")
    return _save(fig, path)
