"""One handler per kind of op: how a set of units slices it.

A fold merges *units* (neurons, channels, heads) of a
:class:`~onnxfold.passes.units.UnitGroup`: the rows its producers own
(output neurons / channels, ``unit`` rows per unit: a head is ``head_dim``
rows), the rows of its followers (ops that carry the unit index channelwise:
a depthwise conv, a per-channel activation) and the columns its consumers
read. A handler says, for one op kind, how

* its rows and columns for the units are read (k-means features, magnitude);
* its rows are merged by a row map ``R`` (k × n, with an optional Fold-AR /
  REPAIR scale and shift per merged unit) and its columns summed by a column
  map ``C`` (n × k);
* the least-squares refit reads its prior weights, builds its rows from
  streamed tensors and writes the refit weights back.

Weights are edited in place on the op (the find views' ``weight`` / ``bias``
attributes); writing them into the graph is the pass's materializer.
A new op kind is a new handler (register it in :data:`HANDLERS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import issparse

from ..decide.channels import PatchRows, nchw_rows
from ..find.activations import ActivationSpec
from ..find.attention import Projection
from ..find.conv import ConvOp, GemmReader
from ..find.dense import DenseOp
from ..find.graph_index import GraphIndex
from ..rewrite.conv import merge_depthwise_channels, merge_output_channels, sum_input_channels
from ..rewrite.edits import (
    column_selection,
    merge_dense_rows,
    merge_slopes,
    row_selection,
    sum_dense_columns,
    sum_path_rows,
)


def last_axis_rows(x: np.ndarray) -> np.ndarray:
    """[..., C] → rows [prod(...), C]."""
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1])


def output_rows(x: np.ndarray, channels_first: bool) -> np.ndarray:
    """One row per position of a streamed tensor, one column per channel."""
    return nchw_rows(x) if channels_first else last_axis_rows(x)


def _dense(m) -> np.ndarray:
    return m.toarray() if issparse(m) else np.asarray(m, dtype=np.float64)


def expand_rows(row_map, unit: int):
    """A row map over units as a map over rows (``unit`` rows per unit)."""
    return row_map if unit == 1 else np.kron(_dense(row_map), np.eye(unit))


def expand_scale(scale: np.ndarray | None, unit: int) -> np.ndarray | None:
    """A per-unit scale or shift as one per row."""
    return scale if scale is None or unit == 1 else np.repeat(np.asarray(scale, dtype=np.float64), unit)


class OpHandler:
    """The interface; each op kind implements what its role in a group needs."""

    #: whether the op's streamed output is [N, C, ...] (conv) rather than [..., C]
    channels_first = False

    def weight_rows(self, op, unit: int = 1, units: np.ndarray | None = None) -> np.ndarray:
        """Incoming weights of each unit as one row (no bias): magnitude and Fold-AR read these."""
        raise NotImplementedError(f"{type(self).__name__} has no rows")

    def own_blocks(self, op, unit: int = 1, units: np.ndarray | None = None) -> list[np.ndarray]:
        """What makes each unit's value, one row per unit: [weight rows, bias]."""
        return [self.weight_rows(op, unit, units), self._bias_rows(op, unit, units)]

    def _bias_rows(self, op, unit, units) -> np.ndarray:
        b = np.asarray(op.bias_or_zero(), dtype=np.float64).reshape(-1, unit)
        return b if units is None else b[units]

    def reader_block(self, op, unit: int = 1, units: np.ndarray | None = None) -> np.ndarray:
        """How the op reads each unit, one row per unit (its input columns)."""
        raise NotImplementedError(f"{type(self).__name__} reads no units")

    def reader_factors(self, op) -> list[np.ndarray]:
        """How the op reads the units as a product of factors, the first with
        one row per unit (what linearity folding composes new paths with)."""
        raise NotImplementedError(f"{type(self).__name__} reads no units")

    def owner(self, op):
        """The op whose parameters (bias, paths) the edit changes."""
        return op

    def sources(self, op) -> list[tuple[str, list[np.ndarray]]]:
        """What the op's output rows read, as (input tensor, factors) pairs whose
        product maps that input to the rows (linearity folding composes a
        linear unit's new path from these)."""
        raise NotImplementedError(f"{type(self).__name__} has no sources")

    def row_bias(self, op) -> np.ndarray:
        """The bias of each output row (zeros without one)."""
        return np.asarray(op.bias_or_zero(), dtype=np.float64)

    def row_params(self, op) -> int:
        """Parameters one output row holds (what removing a unit saves on a producer)."""
        raise NotImplementedError(f"{type(self).__name__} has no rows")

    def merge_rows(self, op, row_map, scale=None, shift=None, unit: int = 1) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge rows")

    def sum_columns(self, op, col_map, unit: int = 1) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot sum columns")

    # -- least-squares refit ----------------------------------------------
    def prior(self, op) -> tuple[np.ndarray, np.ndarray]:
        """(weight as out × features, bias) the refit starts from (copies)."""
        raise NotImplementedError(f"{type(self).__name__} is not refit")

    def set_refit(self, op, weight: np.ndarray, bias: np.ndarray) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not refit")

    def refit_rows(self, op, source: "RowSource", b_prior: np.ndarray, out_map=None):
        """(a picklable rows builder for :class:`~onnxfold.passes.refit.RefitEngine`,
        or None and why the op is not refit). A builder has ``current`` and
        ``original`` (the tensors it streams), ``widths`` (per column group,
        the target's width), ``max_rows`` and ``rows(cur, orig)``; one that
        can tell a batch's rows before building them adds ``layout(cur)`` and
        ``rows(cur, orig, keep=)`` (:class:`ProjectionRows`)."""
        raise NotImplementedError(f"{type(self).__name__} is not refit")


@dataclass(frozen=True)
class RowSource:
    """Where a refit's X rows come from: a tensor of the current model, through
    the group's activation when the tensor is the pre-activation (dense)."""

    tensor: str
    dtype: Any
    activation: ActivationSpec | None = None


# --------------------------------------------------------------------------
# dense


class DenseHandler(OpHandler):
    """``DenseOp``: rows are output neurons, columns input features."""

    def weight_rows(self, op: DenseOp, unit=1, units=None):
        return op.weight if units is None else op.weight[units]

    def reader_block(self, op: DenseOp, unit=1, units=None):
        return (op.weight if units is None else op.weight[:, units]).T

    def reader_factors(self, op: DenseOp):
        return [op.weight.T]

    def sources(self, op: DenseOp):
        return [(op.input, [op.weight.T])] + [(p.input, list(p.factors)) for p in op.paths]

    def row_bias(self, op: DenseOp):
        return op.bias_or_zero()

    def row_params(self, op: DenseOp):
        return op.in_features + (op.bias is not None) + sum(p.factors[-1].shape[0] for p in op.paths)

    def merge_rows(self, op: DenseOp, row_map, scale=None, shift=None, unit=1):
        M, rows = row_selection(row_map)
        merge_dense_rows(op, M, rows, scale, shift)

    def sum_columns(self, op: DenseOp, col_map, unit=1):
        C, cols = column_selection(col_map)
        sum_dense_columns(op, C, cols)

    def prior(self, op: DenseOp):
        return op.weight.copy(), op.bias_or_zero().copy()

    def set_refit(self, op: DenseOp, weight, bias):
        op.weight = np.asarray(weight, dtype=np.float64)
        op.bias = np.asarray(bias, dtype=np.float64).copy()
        op.changed = True

    def refit_rows(self, op: DenseOp, source: RowSource, b_prior, out_map=None):
        return OutputRows(source.tensor, source.dtype, op.output, op.dtype, b_prior, source.activation,
                          out_map=out_map), ""


@dataclass
class PathRead:
    """Linear path ``index`` of ``op``: it reads the hidden units through its first factor's rows."""

    op: DenseOp
    index: int


class PathReadHandler(OpHandler):
    def reader_factors(self, read: PathRead):
        return list(read.op.paths[read.index].factors)

    def owner(self, read: PathRead):
        return read.op

    def sum_columns(self, read: PathRead, col_map, unit=1):
        C, cols = column_selection(col_map)
        sum_path_rows(read.op, read.index, C, cols)


class ActivationHandler(OpHandler):
    """A follower: per-channel activation parameters (PReLU slopes) follow the rows."""

    def merge_rows(self, act: ActivationSpec, row_map, scale=None, shift=None, unit=1):
        M, rows = row_selection(row_map)
        merge_slopes(act, M.shape[1], M, rows)


# --------------------------------------------------------------------------
# convolutions


class ConvHandler(OpHandler):
    """``ConvOp`` (BN folded): rows are output channels (a kernel each),
    columns input-channel slices. A depthwise conv is a follower: its
    per-channel kernels follow the rows and its group count the width.
    ``index`` (the model's GraphIndex) gives the geometry the refit needs."""

    channels_first = True

    def __init__(self, index: GraphIndex | None = None):
        self.index = index

    def weight_rows(self, op: ConvOp, unit=1, units=None):
        return op.rows() if units is None else op.rows()[units]

    def reader_block(self, op: ConvOp, unit=1, units=None):
        readers = np.moveaxis(op.weight, 1, 0).reshape(op.weight.shape[1], -1)
        return readers if units is None else readers[units]

    def merge_rows(self, op: ConvOp, row_map, scale=None, shift=None, unit=1):
        if op.is_depthwise:
            merge_depthwise_channels(op, _dense(row_map))
        else:
            merge_output_channels(op, _dense(row_map), scale, shift)

    def sum_columns(self, op: ConvOp, col_map, unit=1):
        sum_input_channels(op, _dense(col_map))

    def prior(self, op: ConvOp):
        return op.rows().copy(), op.bias_or_zero().copy()

    def set_refit(self, op: ConvOp, weight, bias):
        op.weight = weight.reshape(op.weight_shape)
        op.bias = bias
        op.changed = True

    def geometry(self, op: ConvOp) -> tuple[tuple, str]:
        """(kernel, strides, pads, dilations) of a refittable conv, or () and why not."""
        ix = self.index
        if ix is None:
            return (), "ls: the conv's geometry is unknown here (no graph index); kept the plain fold"
        node = ix.node_by_name[op.name]
        kernel = tuple(op.weight.shape[2:])
        if op.group != 1:
            return (), "ls: grouped conv is not refit; kept the plain fold"
        if len(kernel) != 2:
            return (), f"ls: {len(kernel)}-D conv is not refit (2-D only); kept the plain fold"
        auto_pad = ix.attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            return (), f"ls: auto_pad {auto_pad} is not refit; kept the plain fold"
        strides = tuple(ix.attr(node, "strides", [1, 1]))
        pads = tuple(ix.attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else (0, 0, 0, 0)
        dilations = tuple(ix.attr(node, "dilations", [1, 1]))
        return (kernel, strides, pads, dilations), ""

    def refit_rows(self, op: ConvOp, source: RowSource, b_prior, out_map=None):
        geometry, why = self.geometry(op)
        if why:
            return None, why
        return OutputRows(source.tensor, source.dtype, op.output, op.dtype, b_prior, geometry=geometry,
                          channels_first=True, out_map=out_map, max_rows=MAX_ROWS_PER_BATCH), ""


#: Patch rows (output positions) a conv refit uses per batch: neighbouring
#: positions are highly redundant, a random subset is enough and keeps the
#: im2col memory bounded. Each row costs p² in the refit's Gram (p = input
#: channels x kernel area, about 1,000 in mnist_resnet's blocks), most of a
#: conv model's search. tools/results/conv_rows.md: on two conv models, 10
#: seeds each, 2048 rows instead of 8192 made the decide stage 1.7-1.8x as
#: fast, with the same fold accuracy within a few test samples and about as
#: many searches returning a model (11 of 20 fell back at 2048, 10 at 8192).
#: Fewer rows than features in a batch are fine: the Gram sums over batches,
#: the ridge is chosen on held-out rows, and a refit that does not beat the
#: plain fold there is not kept.
MAX_ROWS_PER_BATCH = 2048


class GemmReaderHandler(OpHandler):
    """``GemmReader``: a Gemm reading pooled channels; columns are channels."""

    channels_first = True

    def reader_block(self, op: GemmReader, unit=1, units=None):
        return op.weight.T if units is None else op.weight[:, units].T

    def sum_columns(self, op: GemmReader, col_map, unit=1):
        sum_input_channels(op, _dense(col_map))

    def prior(self, op: GemmReader):
        return op.weight.copy(), op.bias_or_zero().copy()

    def set_refit(self, op: GemmReader, weight, bias):
        op.weight, op.bias, op.changed = weight, bias, True

    def refit_rows(self, op: GemmReader, source: RowSource, b_prior, out_map=None):
        return OutputRows(source.tensor, source.dtype, op.output, op.dtype, b_prior, channels_first=True,
                          out_map=out_map), ""


# --------------------------------------------------------------------------
# transformer projections


class ProjectionHandler(OpHandler):
    """``Projection`` (MatMul [+ Add]): rows are output features, ``unit``
    of them per unit (a head's ``head_dim`` rows), columns input features."""

    def weight_rows(self, op: Projection, unit=1, units=None):
        w = op.weight.reshape(-1, unit * op.weight.shape[1])
        return w if units is None else w[units]

    def reader_block(self, op: Projection, unit=1, units=None):
        cols = op.weight.T.reshape(-1, unit * op.weight.shape[0])
        return cols if units is None else cols[units]

    def merge_rows(self, op: Projection, row_map, scale=None, shift=None, unit=1):
        R = expand_rows(row_map, unit)
        w = R @ op.weight
        b = None if op.bias is None else R @ op.bias
        s = expand_scale(scale, unit)
        if s is not None:
            w = w * np.asarray(s)[:, None]
            b = None if b is None else b * s
        if shift is not None:
            b = (np.zeros(w.shape[0]) if b is None else b) + expand_scale(shift, unit)
        op.weight, op.bias = w, b

    def sum_columns(self, op: Projection, col_map, unit=1):
        C = expand_rows(_dense(col_map).T, unit).T
        op.weight = op.weight @ C

    def prior(self, op: Projection):
        return op.weight.copy(), op.bias_or_zero().copy()

    def set_refit(self, op: Projection, weight, bias):
        op.weight, op.bias = weight, bias

    def refit_rows(self, op: Projection, source: RowSource, b_prior, out_map=None):
        return ProjectionRows(source.tensor, source.dtype, op.output, op.weight.copy()), ""


#: the handler of each op kind
HANDLERS: dict[type, OpHandler] = {DenseOp: DenseHandler(), PathRead: PathReadHandler(),
                                   ActivationSpec: ActivationHandler(), ConvOp: ConvHandler(),
                                   GemmReader: GemmReaderHandler(), Projection: ProjectionHandler()}


def handler_for(op) -> OpHandler:
    try:
        return HANDLERS[type(op)]
    except KeyError:
        raise TypeError(f"no fold handler for {type(op).__name__}") from None


# --------------------------------------------------------------------------
# least-squares rows (what RefitEngine streams; picklable for Ray workers)


@dataclass
class OutputRows:
    """Rows for refitting an op ``y = W x + b`` to the original model's ``y``:
    X from the current model's ``x`` (through ``activation`` when ``x`` is a
    pre-activation; as im2col patches with ``geometry``), Y = target −
    (current ``y`` − ``b_prior``): what the op's product must add on top of the
    plain fold. Using the current output (not just W x) keeps linear paths
    the op also sums out of the fit without modelling them. A target on
    merged channels (``out_map``, k × n) is the merged original."""

    x: str
    x_dtype: Any
    out: str
    out_dtype: Any
    b_prior: np.ndarray
    activation: ActivationSpec | None = None
    geometry: tuple | None = None
    channels_first: bool = False
    out_map: Any = None
    max_rows: int | None = None  # rows drawn per batch (seeded, in batch order)

    @property
    def current(self) -> dict:
        return {self.x: self.x_dtype, self.out: self.out_dtype}

    @property
    def original(self) -> dict:
        return {self.out: self.out_dtype}

    @property
    def widths(self) -> list[int]:
        return [int(np.asarray(self.b_prior).size)]

    def rows(self, cur: dict, orig: dict) -> tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """(length of the source's first axis, [(X, Y, target)])."""
        x = np.asarray(cur[self.x])
        if self.geometry is not None:
            # the refit takes a few thousand rows of it per batch; patches of a float64 input are
            # gathered as the Gram takes them (one cast of the input, none per drawn row)
            X = PatchRows(x.astype(np.float64, copy=False), *self.geometry)
        else:
            X = last_axis_rows(x if self.activation is None else self.activation.apply(x))
        current, target = output_rows(cur[self.out], self.channels_first), output_rows(orig[self.out],
                                                                                       self.channels_first)
        if self.out_map is not None:
            target = target @ self.out_map.T
        if X.shape[0] != current.shape[0]:
            raise RuntimeError(f"{self.out}: {X.shape[0]} input rows for {current.shape[0]} output positions")
        return x.shape[0], [(X, target.astype(np.float64) - current + self.b_prior, target)]


class OneInputRows:
    """What every rows builder that reads one tensor ``x`` (of dtype
    ``dtype``) of the current model has in common: a refit streams that tensor
    alone from the current model, every row of it."""

    max_rows = None

    @property
    def current(self) -> dict:
        return {self.x: self.dtype}

    def input_rows(self, cur: dict) -> np.ndarray:
        """The streamed input as float64 rows (the last axis is the feature)."""
        x = np.asarray(cur[self.x])
        return x.reshape(-1, x.shape[-1]).astype(np.float64)


@dataclass
class ProjectionRows(OneInputRows):
    """Rows for refitting a projection's columns in groups (see
    ``head_folding``): group ``("output", cols)`` fits the original output
    with ``cols`` (None: all), the other columns' fold in the prediction;
    ``("part", cols, orig_cols, bias)`` fits what the original's
    ``orig_cols`` added (``orig`` is then the original's projection input
    and ``w_orig`` its weight) with the current ``cols``."""

    x: str
    dtype: Any
    orig: str
    w_prior: np.ndarray
    groups: list[tuple] = field(default_factory=lambda: [("output", None)])
    w_orig: np.ndarray | None = None

    @property
    def original(self) -> dict:
        return {self.orig: self.dtype}

    @property
    def widths(self) -> list[int]:
        return [self.w_prior.shape[0]] * len(self.groups)

    def layout(self, cur: dict) -> tuple[int, int, list[int]]:
        """(the input's first axis, rows per batch, features per group), known
        before the rows are built: a refit then builds only the rows it keeps
        (``rows(..., keep=)``)."""
        shape = np.shape(cur[self.x])
        every = np.arange(shape[-1])
        features = [every[slice(None) if g[1] is None else g[1]].size for g in self.groups]
        return shape[0], int(np.prod(shape[:-1])), features

    def rows(self, cur: dict, orig: dict, keep: np.ndarray | None = None):
        """(the input's first axis, [(X, Y, target)] per group); ``keep``: only
        these rows (sorted indices), in that order."""
        x = np.asarray(cur[self.x])
        x2 = x.reshape(-1, x.shape[-1])
        o2 = np.asarray(orig[self.orig]).reshape(x2.shape[0], -1)
        if keep is not None:
            x2, o2 = x2[keep], o2[keep]
        x2, o2 = x2.astype(np.float64), o2.astype(np.float64)
        out = []
        for g in self.groups:
            if g[0] == "output":
                cols = slice(None) if g[1] is None else g[1]
                t = o2
                y = t - x2 @ self.w_prior.T
                out.append((x2[:, cols], y, t))
            else:
                cols, ocols = g[1], g[2]
                x = x2[:, cols]  # a copy (an index array): taken once for the residual and the rows
                t = o2[:, ocols] @ self.w_orig[:, ocols].T
                out.append((x, t - x @ self.w_prior[:, cols].T, t))
        return np.shape(cur[self.x])[0], out
