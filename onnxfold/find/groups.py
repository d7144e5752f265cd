"""Every foldable group of a model, with the knobs its kind declares.

A *group* is a set of units removed or merged together: the hidden neurons of
a dense chain, the hidden channels of a conv chain, the channels of a conv
residual stream, the heads of an attention block, the hidden neurons of a
gated MLP. This module lists them from the three finders (``find.chains``,
``find.conv``, ``find.attention``) for the budget search and the report; it
reads no weight data of its own (names, widths and node names only).

Each kind declares its knobs, as the values a pass takes, step 0 being
"untouched":

========== =========================================== ==========================
kind       units                                        knobs
========== =========================================== ==========================
neuron     hidden neurons of dense → act → dense        ratio, threshold (piecewise-
                                                        linear activations)
channel    hidden channels of conv → act → conv         ratio
residual   channels of a conv residual stream           ratio, only when folding
                                                        residual streams is asked
head       heads of an attention block                  heads (heads kept)
gated      hidden neurons of down(act(gate) · up)       ratio
hidden     a transformer's hidden width (residual       none: its norms normalise
           stream: embeddings, o/down rows, q/k/v,      over all channels, and no
           gate/up/FFN-in/LM-head columns, norms)       fold of it exists (reason)
========== =========================================== ==========================

A group without knobs says why in ``reason`` (and find lists it as skipped
with that reason): the report and ``onnxfold inspect`` show it, the search
never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .chains import find_dense_graph

KINDS = ("neuron", "channel", "residual", "head", "gated", "hidden")
#: share of a group's units removed, per step
RATIO_STEPS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: linearity threshold per step (1.0: only exactly linear or constant neurons)
THRESHOLD_STEPS = (1.0, 0.999, 0.99, 0.98, 0.95, 0.9)
#: head-count steps remove about 1/HEAD_STEP_DIVISIONS of the heads each (every count for up to that many heads)
HEAD_STEP_DIVISIONS = 16
#: the order knobs are listed and walked in
KNOB_ORDER = ("ratio", "heads", "threshold")


def head_steps(num_heads: int) -> tuple[int, ...]:
    """Heads kept per step, from all of them down to one."""
    removed = sorted({round(num_heads * k / HEAD_STEP_DIVISIONS) for k in range(HEAD_STEP_DIVISIONS)})
    return tuple(num_heads - r for r in removed if num_heads - r >= 1)


@dataclass
class Group:
    kind: str  # one of KINDS
    name: str  # layer0 / conv0 / residual0 / attn0 / glu0: the name passes and reports use
    width: int | None  # units: neurons, channels or heads (None: a residual stream of unknown width)
    producers: list[str]  # nodes whose output rows (units) the group owns
    consumers: list[str]  # nodes whose input columns the units feed
    coupling: list[str] = field(default_factory=list)  # what ties the units to more than one op, in words
    knobs: dict[str, tuple] = field(default_factory=dict)  # knob name -> value per step (step 0: untouched)
    detail: str = ""  # the units in words: the activation, or the heads' layout
    norms: list[str] = field(default_factory=list)  # norms whose scale/bias vectors the units index
    reason: str = ""  # why a group has no knobs (empty for a searchable one)
    #: ops that carry the unit index channelwise (an activation with per-unit slopes, depthwise convs)
    followers: list[str] = field(default_factory=list)
    #: (op, path index): linear paths of other ops that read the units (a dense chain's hidden activation)
    path_readers: list[tuple[str, int]] = field(default_factory=list)

    @property
    def searchable(self) -> bool:
        return bool(self.knobs)


@dataclass
class SkippedPattern:
    kind: str  # the group kind that was looked for
    where: str  # node or tensor name
    reason: str


@dataclass
class FoldableGroups:
    groups: list[Group]
    skipped: list[SkippedPattern]

    def of_kind(self, *kinds: str) -> list[Group]:
        return [g for g in self.groups if g.kind in kinds]

    def names(self, *kinds: str) -> list[str]:
        return [g.name for g in self.of_kind(*kinds)]

    def kind_of(self, name: str) -> str | None:
        return next((g.kind for g in self.groups if g.name == name), None)

    @property
    def searchable(self) -> list[Group]:
        return [g for g in self.groups if g.searchable]


# --------------------------------------------------------------------------
# one description per kind, from the finder's object: find_groups lists these,
# and the fold side binds its unit groups to them (passes/units.py)


def describe_chain(c) -> Group:
    """A dense chain (``find.chains.Chain``) as a ``neuron`` group."""
    knobs = {"ratio": RATIO_STEPS}
    if c.activation.is_piecewise_linear:  # linearity folding acts on piecewise-linear activations only
        knobs["threshold"] = THRESHOLD_STEPS
    return Group("neuron", c.name, c.width, [c.producer.name], [c.consumer.name],
                 [f"linear path into {op.name}" for op, _ in c.path_readers], knobs, c.activation.describe(),
                 followers=[activation_key(c.activation)],
                 path_readers=[(op.name, int(k)) for op, k in c.path_readers])


def activation_key(act) -> str:
    """The name a group lists an activation under: its first node (its input when it has none)."""
    return act.nodes[0] if act.nodes else act.input


def describe_conv_chain(c) -> Group:
    """A conv chain (``find.conv.ConvChain``) as a ``channel`` group."""
    coupling = [f"BatchNormalization {c.producer.bn}"] if c.producer.bn else []
    coupling += [f"depthwise Conv {m.name}" for m, _ in c.mids]
    return Group("channel", c.name, c.width, [c.producer.name], [c.consumer.name], coupling,
                 {"ratio": RATIO_STEPS}, c.activation.describe(), followers=[m.name for m, _ in c.mids])


def describe_residual(r, fold_residual: bool = False) -> Group:
    """A conv residual stream (``find.conv.ResidualGroup``) as a ``residual`` group."""
    knobs = {"ratio": RATIO_STEPS} if fold_residual and r.foldable else {}
    reason = "" if knobs else r.reason or "residual streams fold only when asked (fold_residual)"
    return Group("residual", r.name, r.width, list(r.producers), list(r.readers),
                 [f"join {j}" for j in r.joins], knobs, reason=reason)


def describe_block(b) -> Group:
    """An attention block (``find.attention.AttentionBlock``) as a ``head`` group: q, k, v rows, o columns."""
    coupling = [f"head count in Reshape {r.reshape}" for r in b.shape_refs]
    producers, consumers = [b.q.node, b.k.node, b.v.node], [b.o.node]
    if b.grouped:
        # a key/value head is shared by its group's query heads: every group keeps the same
        # number of query heads, so the steps are whole multiples of the key/value heads
        steps = tuple(b.num_kv_heads * n for n in range(b.group_size, 0, -1))
        return Group("head", b.name, b.num_heads, producers, consumers,
                     [f"kv sharing: {b.group_size} query heads per key/value head", *coupling],
                     {"heads": steps}, f"{b.num_heads} heads over {b.num_kv_heads} key/value heads")
    return Group("head", b.name, b.num_heads, producers, consumers, coupling,
                 {"heads": head_steps(b.num_heads)}, f"{b.num_heads} heads × {b.head_dim}")


def describe_gated(g) -> Group:
    """A gated MLP (``find.attention.GatedMLP``) as a ``gated`` group: gate and up rows, down columns."""
    return Group("gated", g.name, g.width, [g.gate.node, g.up.node], [g.down.node],
                 [f"gate · up product {g.mul}"], {"ratio": RATIO_STEPS}, f"gated {g.activation.describe()}")


def _neuron_groups(model: onnx.ModelProto) -> tuple[list[Group], list[SkippedPattern]]:
    view = find_dense_graph(model)
    return [describe_chain(c) for c in view.chains], [SkippedPattern("neuron", s.where, s.reason)
                                                      for s in view.skipped]


def _conv_groups(model: onnx.ModelProto, fold_residual: bool) -> tuple[list[Group], list[SkippedPattern]]:
    from .conv import find_conv_graph

    view = find_conv_graph(model)
    groups = [describe_conv_chain(c) for c in view.chains]
    skipped = [SkippedPattern("channel", s.where, s.reason) for s in view.skipped]
    for r in view.residual:
        if not r.producers:  # joins of tensors no conv writes (e.g. a transformer's residual adds)
            continue
        groups.append(describe_residual(r, fold_residual))
        if not r.foldable:
            skipped.append(SkippedPattern("residual", r.name, f"residual stream not folded: {r.reason}"))
    return groups, skipped


def _hidden_groups(model: onnx.ModelProto, view) -> tuple[list[Group], list[SkippedPattern]]:
    """The residual stream of each transformer whose blocks ``view`` found."""
    from .hidden import transformer_streams

    streams, skipped = transformer_streams(model, view)
    groups, why = [], [SkippedPattern("hidden", s.where, s.reason) for s in skipped]
    for s in streams:
        reason = "; ".join(s.reasons)
        groups.append(Group("hidden", s.name, s.width, list(s.producers), list(s.consumers), s.coupling(), {},
                            f"residual stream, {len(s.joins)} joins, {len(s.norms)} norms", s.norm_names, reason))
        why.append(SkippedPattern("hidden", s.name, f"hidden width not folded: {reason}"))
    return groups, why


def _transformer_groups(model: onnx.ModelProto) -> tuple[list[Group], list[SkippedPattern]]:
    from .attention import find_transformer

    view = find_transformer(model)
    groups = [describe_block(b) for b in view.blocks] + [describe_gated(g) for g in view.gated]
    hidden, why = _hidden_groups(model, view)
    # fused attention and what else looked like attention but did not match are reported by the finder
    return groups + hidden, [SkippedPattern("head", s.where, s.reason) for s in view.skipped] + why


def _may_have_attention(model: onnx.ModelProto) -> bool:
    from .attention import FUSED_ATTENTION, FUSED_TRANSFORMER_OPS

    fused = set(FUSED_ATTENTION) | set(FUSED_TRANSFORMER_OPS)
    return any(n.op_type in ("Softmax", "Mul") or n.op_type in fused for n in model.graph.node)


def find_groups(model: onnx.ModelProto, *, fold_residual: bool = False) -> FoldableGroups:
    """Every foldable group of ``model`` and one list of what was skipped, with
    reasons. ``fold_residual``: residual streams get a fold-ratio knob.

    The conv finder runs only on models with a Conv node, the transformer
    finder only where a Softmax, a Mul or a fused attention node could make
    one. A skip that names a producer of a searchable group or of a hidden
    stream is dropped: its units are covered there (an attention q
    projection starts no dense chain, but its rows are the heads' rows; an
    o projection's rows are the stream's, whose own entry gives the reason)."""
    groups, skipped = _neuron_groups(model)
    if any(n.op_type == "Conv" for n in model.graph.node):
        more, why = _conv_groups(model, fold_residual)
        groups += more
        skipped += why
    if _may_have_attention(model):
        more, why = _transformer_groups(model)
        groups += more
        skipped += why
    # a transformer's o/down projections start no chain: their rows are the hidden stream's, whose entry says why
    covered = {p for g in groups if g.searchable or g.kind == "hidden" for p in g.producers}
    unique: dict[tuple[str, str], SkippedPattern] = {}
    for s in skipped:
        if s.where not in covered:
            unique.setdefault((s.where, s.reason), s)
    return FoldableGroups(groups, list(unique.values()))
