"""Unit groups: the sets of units a fold removes or merges together.

A :class:`UnitGroup` is the fold's view of one place in a model, whatever
the architecture: ``width`` units, the *producers* whose output rows they
are, the *followers* that carry the unit index channelwise (a depthwise
conv, a per-channel activation; BatchNormalization is already folded into
its conv) and the *consumers* whose input columns they feed. Each member
brings the handler of its op kind (:mod:`onnxfold.passes.handlers`), so the
folding core (:mod:`onnxfold.passes.foldcore`) selects, merges, repairs and
refits every kind the same way. There is one description of each group:
``find.groups.Group`` (kind, name, width, producers, followers, consumers
and path readers by name, coupling, knobs), which ``find_groups`` lists for
the search and the report. A unit group holds its ``Group`` and is built
from it by a binder per kind, which resolves those names to the ops of the
finder's object (an unknown name, or an op the description leaves out, is
an error) and adds what only the fold needs: rows per unit, which producers
Fold-AR repairs, refit sources, clustering features:

==============  ========================  ====================  ===================
group           producers                 followers             consumers
==============  ========================  ====================  ===================
dense chain     dense op                  activation slopes     dense op, path reads
conv chain      conv (+BN)                depthwise convs       conv
residual        every conv on the stream  -                     convs, pooled Gemms
gated MLP       gate, up                  -                     down
attention       q, k, v (head_dim rows)   -                     o
kv groups       q (n heads), k, v         -                     o (n heads)
query heads     q (head_dim rows)         -                     o
==============  ========================  ====================  ===================

Grouped-query attention (n query heads per key/value head) couples two
ways: a key/value head and its n query heads are one unit of the *kv
groups* group (multi-head attention is the case n = 1: units are heads),
and query heads fold only within their key/value group, the same number in
each (the graph repeats every key/value head n times): the *query heads*
group has one ``part`` per key/value head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix

from ..decide import channels as dch
from ..decide import folding as decide
from ..find.attention import AttentionBlock, GatedMLP
from ..find.chains import Chain
from ..find.conv import ConvChain, ConvGraph, ResidualGroup
from ..find import groups as described
from ..find.graph_index import GraphIndex
from ..find.groups import Group, activation_key
from .handlers import (
    ActivationHandler,
    ConvHandler,
    DenseHandler,
    GemmReaderHandler,
    OpHandler,
    PathRead,
    PathReadHandler,
    ProjectionHandler,
    RowSource,
)

#: dense layers wider than this get their fold maps as sparse matrices (a
#: dense k × n map of a 8192-wide layer is 256 MiB and a 10¹²-flop product)
SPARSE_MAPS_ABOVE = 1024


@dataclass
class Member:
    """One op of a group. ``unit``: its rows (columns) per unit;
    ``repaired``: a producer whose merged rows Fold-AR / REPAIR rescale;
    ``features``: its rows (columns) are clustering features;
    ``source``: for a consumer, where its refit reads its input rows."""

    op: Any
    handler: OpHandler
    unit: int = 1
    repaired: bool = True
    features: bool = True
    source: RowSource | None = None


@dataclass
class UnitGroup:
    name: str
    width: int
    producers: list[Member]
    consumers: list[Member]
    followers: list[Member] = field(default_factory=list)
    #: units whose own rows are equal compute the same values: merged before
    #: k-means whatever their readers (the conv rule: folding duplicates is lossless)
    merge_equal_own: bool = False
    #: the magnitude baseline ranks units by all their features, not only the producers' rows
    magnitude_on_features: bool = False
    sparse_maps: bool = False
    #: clustering features that replace the handlers' (heads' circuits)
    features: Callable[[], np.ndarray] | None = None
    #: units fold only within these index sets, keeping as many in each
    #: (query heads within their key/value group); None: across all units
    parts: list[np.ndarray] | None = None
    #: the find side's description this group is bound to (members by name, coupling, knobs)
    group: Group | None = None

    def ops(self) -> list:
        """The ops whose parameters the group's units hold (each once)."""
        ops: dict[int, Any] = {}
        for m in self.producers + self.consumers:
            op = m.handler.owner(m.op)
            ops.setdefault(id(op), op)
        return list(ops.values())

    @property
    def num_params(self) -> int:
        return int(sum(op.num_params for op in self.ops()))

    def keep(self, units: np.ndarray) -> None:
        """Keep ``units`` (indices, in order) and drop the others, in every
        member: a selection map, which the handlers apply by indexing."""
        units = np.asarray(units, dtype=np.int64).reshape(-1)
        if units.size < 1 or units.min() < 0 or units.max() >= self.width:
            raise ValueError(f"{self.name}: keep needs 1 to {self.width} units in [0, {self.width})")
        # sparse: a k × n dense selection of a 16k-wide layer would be gigabytes
        sel = csr_matrix((np.ones(units.size), (np.arange(units.size), units)), shape=(units.size, self.width))
        for m in self.producers + self.followers:
            m.handler.merge_rows(m.op, sel, unit=m.unit)
        for m in self.consumers:
            m.handler.sum_columns(m.op, sel.T, m.unit)

    def own_blocks(self, units: np.ndarray | None = None) -> list[np.ndarray]:
        return [b for m in self.producers + self.followers if m.features
                for b in m.handler.own_blocks(m.op, m.unit, units)]

    def reader_blocks(self, units: np.ndarray | None = None) -> list[np.ndarray]:
        return [m.handler.reader_block(m.op, m.unit, units) for m in self.consumers if m.features]

    def magnitude_rows(self, units: np.ndarray | None = None) -> np.ndarray:
        if self.magnitude_on_features:
            return decide.unit_features(self.own_blocks(units) + self.reader_blocks(units))
        rows = [m.handler.weight_rows(m.op, m.unit, units) for m in self.producers]
        return rows[0] if len(rows) == 1 else np.hstack(rows)

    def cluster(self, k: int, seed: int, units: np.ndarray | None = None,
                kmeans: Callable[[np.ndarray, int, int], np.ndarray] = decide.kmeans_labels) -> np.ndarray:
        """k-means labels (0..k'-1) of the units (of ``units`` when given).
        ``kmeans(features, k, seed)``: the clustering (one that may already
        know the answer, see ``FoldCore.prefetch_clusters``)."""
        if self.features is None and self.merge_equal_own:
            own, readers = self.own_blocks(units), self.reader_blocks(units)
            return dch.channel_labels(decide.unit_features(own), decide.unit_features(readers), k, seed=seed)
        return kmeans(self.kmeans_features(seed, units), k, seed)

    def kmeans_features(self, seed: int, units: np.ndarray | None = None) -> np.ndarray | None:
        """What :meth:`cluster` hands k-means (None for conv chains that merge
        equal kernels first, which cluster in their own way)."""
        if self.features is not None:
            feats = self.features()
            return feats if units is None else feats[units]
        if self.merge_equal_own:
            return None
        blocks = self.own_blocks(units) + self.reader_blocks(units)
        return decide.unit_sketch(blocks, seed=seed) if decide.needs_sketch(blocks) else decide.unit_features(blocks)


# --------------------------------------------------------------------------
# binders: a unit group is bound to the find side's description of it
# (find.groups.Group: which ops are producers, followers and consumers, in
# which order, and what couples them); a binder per kind resolves those names
# to the fold-side ops of the finder's object and says how many rows a unit
# is and how each member is repaired, refit and clustered.


def _resolve(names, table: dict, group: Group, role: str) -> list:
    """The ops ``names`` stand for; every name must be one of the finder object's ops."""
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{group.kind} group {group.name}: {role} {', '.join(missing)} not in the finder's view")
    return [table[n] for n in names]


def _check_covers(group: Group, role: str, listed, ops) -> None:
    """The description lists every op the finder's object has in that role (no op is folded unlisted)."""
    if len(listed) != len(ops):
        raise ValueError(f"{group.kind} group {group.name}: its {role} ({len(listed)}) are not the finder's"
                         f" ({len(ops)})")


def bind_dense(group: Group, chain: Chain) -> UnitGroup:
    """``neuron``: producer rows, the activation's per-unit slopes (follower),
    the consumer's columns and the first-factor rows of reading paths."""
    prod, cons = chain.producer, chain.consumer
    ops = {prod.name: prod, cons.name: cons, **{op.name: op for op, _ in chain.path_readers}}
    dense = DenseHandler()
    (producer,) = _resolve(group.producers, ops, group, "producer")
    (consumer,) = _resolve(group.consumers, ops, group, "consumer")
    (act,) = _resolve(group.followers, {activation_key(chain.activation): chain.activation}, group, "follower")
    _check_covers(group, "path readers", group.path_readers, chain.path_readers)
    reads = [PathRead(op, k) for op, (_, k) in zip(_resolve([n for n, _ in group.path_readers], ops, group,
                                                              "path reader"), group.path_readers)]
    return UnitGroup(
        group.name, group.width, producers=[Member(producer, dense)],
        followers=[Member(act, ActivationHandler(), features=False)],
        consumers=[Member(consumer, dense, source=RowSource(producer.output, producer.dtype, act))]
        + [Member(r, PathReadHandler(), features=False) for r in reads],
        sparse_maps=group.width > SPARSE_MAPS_ABOVE, group=group)


def bind_conv_chain(group: Group, chain: ConvChain, index: GraphIndex) -> UnitGroup:
    """``channel``: producer conv (+BN) rows, depthwise convs as followers, consumer conv columns."""
    conv = ConvHandler(index)
    ops = {op.name: op for op in (chain.producer, chain.consumer, *(m for m, _ in chain.mids))}
    _check_covers(group, "followers", group.followers, chain.mids)
    (producer,) = _resolve(group.producers, ops, group, "producer")
    return UnitGroup(group.name, group.width, producers=[Member(producer, conv)],
                     followers=[Member(m, conv) for m in _resolve(group.followers, ops, group, "follower")],
                     consumers=[Member(c, conv, source=RowSource(chain.hidden, producer.dtype))
                                for c in _resolve(group.consumers, ops, group, "consumer")],
                     merge_equal_own=True, group=group)


def bind_residual(group: Group, grp: ResidualGroup, view: ConvGraph, index: GraphIndex) -> UnitGroup:
    """``residual``: every conv writing the stream, every conv reading it and,
    for each pooled reader (GlobalAveragePool → Flatten → Gemm), its Gemm."""
    conv, gemm = ConvHandler(index), GemmReaderHandler()
    producers = _resolve(group.producers, view.ops, group, "producer")
    readers = _resolve([n for n in group.consumers if n in grp.conv_readers], view.ops, group, "reader")
    pooled = [n for n in group.consumers if n not in grp.conv_readers]
    _check_covers(group, "pooled readers", pooled, grp.gemm_readers)
    gemms = _resolve(grp.gemm_readers, view.gemms, group, "pooled reader")  # the Gemm after each pool, in order
    return UnitGroup(group.name, int(group.width), producers=[Member(p, conv) for p in producers],
                     consumers=[Member(c, conv, source=RowSource(c.input, c.dtype)) for c in readers]
                     + [Member(g, gemm, source=RowSource(g.input, g.dtype)) for g in gemms],
                     merge_equal_own=True, group=group)


def bind_gated(group: Group, glu: GatedMLP) -> UnitGroup:
    """``gated``: gate and up rows, down columns. Fold-AR scales the *up* rows
    only: the linear branch, so the factor scales the product directly."""
    proj = ProjectionHandler()
    ops = {p.node: p for p in glu.projections}
    gate, up = _resolve(group.producers, ops, group, "producer")
    return UnitGroup(group.name, group.width, producers=[Member(gate, proj, repaired=False), Member(up, proj)],
                     consumers=[Member(d, proj, source=RowSource(glu.hidden, d.dtype))
                                for d in _resolve(group.consumers, ops, group, "consumer")],
                     magnitude_on_features=True, group=group)


def bind_kv_groups(group: Group, block: AttentionBlock, features: Callable[[], np.ndarray] | None = None
                   ) -> UnitGroup:
    """``head``, by whole key/value groups (heads, in multi-head attention):
    ``head_dim`` rows of k, ``v_head_dim`` of v, and the ``n`` query heads'
    rows of q and columns of o."""
    proj = ProjectionHandler()
    ops = {p.node: p for p in block.projections}
    d, dv, n = block.head_dim, block.v_head_dim, block.group_size
    q, k, v = _resolve(group.producers, ops, group, "producer")
    return UnitGroup(group.name, block.num_kv_heads,
                     producers=[Member(q, proj, n * d), Member(k, proj, d), Member(v, proj, dv)],
                     consumers=[Member(o, proj, n * dv, source=RowSource(o.input, o.dtype))
                                for o in _resolve(group.consumers, ops, group, "consumer")],
                     magnitude_on_features=True, features=features, group=group)


def bind_query_heads(group: Group, block: AttentionBlock, features: Callable[[], np.ndarray] | None = None
                     ) -> UnitGroup:
    """``head``, by query heads (``head_dim`` rows of q, ``v_head_dim`` columns
    of o) within their key/value group: k and v (the group's other producers)
    are shared and stay."""
    proj = ProjectionHandler()
    ops = {p.node: p for p in block.projections}
    q, _k, _v = _resolve(group.producers, ops, group, "producer")
    n = block.group_size
    return UnitGroup(group.name, group.width, producers=[Member(q, proj, block.head_dim)],
                     consumers=[Member(o, proj, block.v_head_dim, source=RowSource(o.input, o.dtype))
                                for o in _resolve(group.consumers, ops, group, "consumer")],
                     magnitude_on_features=True, features=features,
                     parts=[np.arange(g * n, (g + 1) * n) for g in range(block.num_kv_heads)], group=group)


# the fold side's entry points: describe the finder's object (find.groups), bind to it


def dense_group(chain: Chain) -> UnitGroup:
    return bind_dense(described.describe_chain(chain), chain)


def conv_chain_group(chain: ConvChain, index: GraphIndex) -> UnitGroup:
    return bind_conv_chain(described.describe_conv_chain(chain), chain, index)


def residual_group(grp: ResidualGroup, view: ConvGraph, index: GraphIndex) -> UnitGroup:
    return bind_residual(described.describe_residual(grp), grp, view, index)


def gated_group(glu: GatedMLP) -> UnitGroup:
    return bind_gated(described.describe_gated(glu), glu)


def head_group(block: AttentionBlock, features: Callable[[], np.ndarray] | None = None) -> UnitGroup:
    return bind_kv_groups(described.describe_block(block), block, features)


def query_head_group(block: AttentionBlock, features: Callable[[], np.ndarray] | None = None) -> UnitGroup:
    return bind_query_heads(described.describe_block(block), block, features)
