"""Unit groups: the sets of units a fold removes or merges together.

A :class:`UnitGroup` is the fold's view of one place in a model, whatever
the architecture: ``width`` units, the *producers* whose output rows they
are, the *followers* that carry the unit index channelwise (a depthwise
conv, a per-channel activation; BatchNormalization is already folded into
its conv) and the *consumers* whose input columns they feed. Each member
brings the handler of its op kind (:mod:`onnxfold.passes.handlers`), so the
folding core (:mod:`onnxfold.passes.foldcore`) selects, merges, repairs and
refits every kind the same way. The builders below make the groups the
finders describe:

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
from ..find.graph_index import GraphIndex
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

    def cluster(self, k: int, seed: int, units: np.ndarray | None = None) -> np.ndarray:
        """k-means labels (0..k'-1) of the units (of ``units`` when given)."""
        if self.features is not None:
            feats = self.features()
            return decide.kmeans_labels(feats if units is None else feats[units], k, seed=seed)
        own, readers = self.own_blocks(units), self.reader_blocks(units)
        if self.merge_equal_own:
            return dch.channel_labels(decide.unit_features(own), decide.unit_features(readers), k, seed=seed)
        blocks = own + readers
        feats = decide.unit_sketch(blocks, seed=seed) if decide.needs_sketch(blocks) else decide.unit_features(blocks)
        return decide.kmeans_labels(feats, k, seed=seed)


# --------------------------------------------------------------------------
# builders


def dense_group(chain: Chain) -> UnitGroup:
    prod, cons = chain.producer, chain.consumer
    dense = DenseHandler()
    return UnitGroup(
        chain.name, chain.width, producers=[Member(prod, dense)],
        followers=[Member(chain.activation, ActivationHandler(), features=False)],
        consumers=[Member(cons, dense, source=RowSource(prod.output, prod.dtype, chain.activation))]
        + [Member(PathRead(op, idx), PathReadHandler(), features=False) for op, idx in chain.path_readers],
        sparse_maps=chain.width > SPARSE_MAPS_ABOVE)


def conv_chain_group(chain: ConvChain, index: GraphIndex) -> UnitGroup:
    conv = ConvHandler(index)
    return UnitGroup(chain.name, chain.width, producers=[Member(chain.producer, conv)],
                     followers=[Member(m, conv) for m, _ in chain.mids],
                     consumers=[Member(chain.consumer, conv, source=RowSource(chain.hidden, chain.producer.dtype))],
                     merge_equal_own=True)


def residual_group(grp: ResidualGroup, view: ConvGraph, index: GraphIndex) -> UnitGroup:
    conv, gemm = ConvHandler(index), GemmReaderHandler()
    readers = [view.ops[c] for c in grp.conv_readers]
    gemms = [view.gemms[g] for g in grp.gemm_readers]
    return UnitGroup(grp.name, int(grp.width), producers=[Member(view.ops[p], conv) for p in grp.producers],
                     consumers=[Member(c, conv, source=RowSource(c.input, c.dtype)) for c in readers]
                     + [Member(g, gemm, source=RowSource(g.input, g.dtype)) for g in gemms],
                     merge_equal_own=True)


def gated_group(glu: GatedMLP) -> UnitGroup:
    """Fold-AR scales the *up* rows only: the linear branch, so the factor
    scales the product directly."""
    proj = ProjectionHandler()
    return UnitGroup(glu.name, glu.width, producers=[Member(glu.gate, proj, repaired=False), Member(glu.up, proj)],
                     consumers=[Member(glu.down, proj, source=RowSource(glu.hidden, glu.down.dtype))],
                     magnitude_on_features=True)


def head_group(block: AttentionBlock, features: Callable[[], np.ndarray] | None = None) -> UnitGroup:
    """Units are key/value groups (heads, in multi-head attention): ``head_dim``
    rows of k, ``v_head_dim`` of v, and the ``n`` query heads' rows of q and
    columns of o."""
    proj = ProjectionHandler()
    d, dv, n = block.head_dim, block.v_head_dim, block.group_size
    return UnitGroup(block.name, block.num_kv_heads,
                     producers=[Member(block.q, proj, n * d), Member(block.k, proj, d), Member(block.v, proj, dv)],
                     consumers=[Member(block.o, proj, n * dv, source=RowSource(block.o.input, block.o.dtype))],
                     magnitude_on_features=True, features=features)


def query_head_group(block: AttentionBlock, features: Callable[[], np.ndarray] | None = None) -> UnitGroup:
    """Units are query heads (``head_dim`` rows of q, ``v_head_dim`` columns
    of o), folded within their key/value group: k and v are shared and stay."""
    proj = ProjectionHandler()
    n = block.group_size
    return UnitGroup(block.name, block.num_heads, producers=[Member(block.q, proj, block.head_dim)],
                     consumers=[Member(block.o, proj, block.v_head_dim,
                                       source=RowSource(block.o.input, block.o.dtype))],
                     magnitude_on_features=True, features=features,
                     parts=[np.arange(g * n, (g + 1) * n) for g in range(block.num_kv_heads)])
