"""A refit's row budget (onnxfold.passes.refit.row_budget): a least-squares
refit of p features accumulates at most ROWS_PER_FEATURE * p rows (never
below MIN_BUDGET_ROWS), drawn uniformly over the data with fit and held-out
rows keeping their shares; data within the budget is used whole."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import build_residual_mlp, ort_run
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.stats import GramAccumulator
from onnxfold.passes import refit
from onnxfold.passes.base import HELDOUT_SHARE, PassContext
from onnxfold.passes.folding import FoldingPass

SEQ, WIDTH, KEPT = 16, 32, 16  # a token model: every sample is SEQ rows; the consumer's refit has KEPT features


def _data(n, seed):
    return np.random.default_rng(seed).standard_normal((n, SEQ, 6)).astype(np.float32)


class _CountingGram(GramAccumulator):
    """Records how many rows each refit accumulator took (fit and held-out alike)."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _CountingGram.made.append(self)


def _refit_rows(monkeypatch, model, x, *, per_feature=None, seed=0):
    """(fit rows, held-out rows) the pass's one refit accumulated, and the result."""
    _CountingGram.made = []
    monkeypatch.setattr(refit, "GramAccumulator", _CountingGram)
    if per_feature is not None:
        monkeypatch.setattr(refit, "ROWS_PER_FEATURE", per_feature)
        monkeypatch.setattr(refit, "MIN_BUDGET_ROWS", 1)
    res = FoldingPass(1 - KEPT / WIDTH, repair="ls", seed=seed)(
        model, PassContext(calibration=CalibrationSet({"x": x}), batch_size=64))
    monkeypatch.undo()
    fit, held = _CountingGram.made[0], _CountingGram.made[1]  # _new_grams: fit0, held0
    return fit.count, held.count, res


def test_the_budget_and_the_share_kept_by_hand():
    assert refit.row_budget(1) == refit.MIN_BUDGET_ROWS == 8192
    assert refit.row_budget(344) == 128 * 344 == 44032
    # 64 samples of 64 rows in this batch, 4096 samples in all: 262,144 rows for a budget of 44,032
    assert refit.budget_share(344, 64 * 64, 64, 4096) == pytest.approx(44032 / 262144)
    assert refit.budget_share(344, 64 * 64, 64, 600) == 1.0  # 38,400 rows: within the budget, all kept
    assert refit.budget_share(344, 0, 0, 4096) == 1.0


def test_data_within_the_budget_is_used_whole(monkeypatch):
    model, _ = build_residual_mlp(d=6, n=WIDTH, seq=SEQ)
    x = _data(200, 1)  # 3,200 rows: under the default budget
    fit, held, _ = _refit_rows(monkeypatch, model, x)
    assert fit + held == 200 * SEQ
    assert held == round(200 * HELDOUT_SHARE) * SEQ


def test_a_refit_draws_its_budget_of_rows_with_the_held_out_share(monkeypatch):
    model, _ = build_residual_mlp(d=6, n=WIDTH, seq=SEQ)
    x = _data(400, 1)  # 6,400 rows
    fit, held, _ = _refit_rows(monkeypatch, model, x, per_feature=32)
    budget = 32 * KEPT  # 512 rows
    assert abs(fit + held - budget) <= 7  # rounding: at most one row per batch and set
    assert held / (fit + held) == pytest.approx(HELDOUT_SHARE, abs=0.05)


def test_the_drawn_rows_are_seeded_and_the_same_model_comes_back(monkeypatch):
    model, _ = build_residual_mlp(d=6, n=WIDTH, seq=SEQ)
    x = _data(400, 1)
    runs = [_refit_rows(monkeypatch, model, x, per_feature=32, seed=s)[2].model for s in (0, 0, 1)]
    a, b, c = (r.SerializeToString() for r in runs)
    assert a == b and a != c


def test_a_budgeted_refit_predicts_unseen_data_about_as_well_as_all_rows(monkeypatch):
    model, _ = build_residual_mlp(d=6, n=WIDTH, seq=SEQ)
    x, x_test = _data(400, 1), _data(200, 2)
    (ref,) = ort_run(model, {"x": x_test})

    def err(m):
        out = ort_run(m, {"x": x_test})[0]
        return float(((out - ref) ** 2).sum() / ((ref - ref.mean((0, 1))) ** 2).sum())

    plain = FoldingPass(1 - KEPT / WIDTH, repair="none")(model, PassContext(calibration=None, batch_size=64))
    *_, whole = _refit_rows(monkeypatch, model, x)
    *_, budgeted = _refit_rows(monkeypatch, model, x, per_feature=64)  # 1,024 of 6,400 rows
    errs = {"plain": err(plain.model), "all rows": err(whole.model), "budget": err(budgeted.model)}
    # the fit still repairs most of the fold, and 64 rows per feature cost a few per cent of its error
    assert errs["budget"] < 0.5 * errs["plain"], errs
    assert errs["budget"] < 1.1 * errs["all rows"], errs


def test_a_held_out_split_of_its_own_reports_the_refits_relative_errors():
    """The budget search gives its select split as a held-out set of its own: every row of a batch is
    held out. The note's relative errors are the models' own on that split, computed here with
    onnxruntime (they read 0 when the target's spread skipped whole batches)."""
    import re

    from helpers import build_mlp

    model = build_mlp([6, 32, 4], seed=3)
    rng = np.random.default_rng(0)
    x, h = (rng.standard_normal((m, 6)).astype(np.float32) for m in (300, 200))
    ctx = PassContext(calibration=CalibrationSet({"x": x}), heldout=CalibrationSet({"x": h}), batch_size=64)
    res = FoldingPass(0.5, repair="ls", seed=0)(model, ctx)
    got = re.fullmatch(r"ls: ridge \S+, held-out relative error (\S+) \(plain fold (\S+)\)", res.layers[0].note)
    assert got, res.layers[0].note
    plain = FoldingPass(0.5, repair="none", seed=0)(model, PassContext(calibration=CalibrationSet({"x": x}))).model
    y, y_plain, y_ls = (ort_run(m, {"x": h})[0].astype(np.float64) for m in (model, plain, res.model))
    spread = ((y - y.mean(axis=0)) ** 2).sum()
    assert float(got[1]) == pytest.approx(((y_ls - y) ** 2).sum() / spread, rel=2e-3)
    assert float(got[2]) == pytest.approx(((y_plain - y) ** 2).sum() / spread, rel=2e-3)


class _EveryRow:
    """A rows builder as a refit saw one before ``layout``: every row built, then drawn."""

    def __init__(self, rows):
        self._rows = rows
        self.max_rows, self.widths = rows.max_rows, rows.widths

    def rows(self, cur, orig):
        return self._rows.rows(cur, orig)


class _Spy:
    """A ProjectionRows that records how many rows each call built."""

    def __init__(self, rows):
        self._rows, self.built = rows, []
        self.max_rows, self.widths, self.layout = rows.max_rows, rows.widths, rows.layout

    def rows(self, cur, orig, keep=None):
        first, groups = self._rows.rows(cur, orig, keep=keep)
        self.built.append(groups[0][0].shape[0])
        return first, groups


def _accumulated(builder, batches, held_samples, data_samples):
    accs = refit._new_grams(builder.widths)
    start = 0
    for cur, orig in batches:
        refit._add_rows(builder, held_samples, None, data_samples, 7, accs, start, {"x": cur["x"]}, None,
                        [cur, orig])
        start += cur["x"].shape[0]
    return {k: v.flush() if isinstance(v, refit.RowChunks) else v for k, v in accs.items()}


@pytest.mark.parametrize("held", [False, True])
def test_a_builder_with_a_layout_builds_only_the_rows_kept_and_accumulates_the_same(monkeypatch, held):
    from onnxfold.passes.handlers import ProjectionRows

    rng = np.random.default_rng(3)
    d, q, batch, seq = 12, 5, 8, 32
    w_prior, w_orig = rng.standard_normal((q, d)), rng.standard_normal((q, d))
    # two head groups: each fits what the original's columns added with the current columns ("o" is
    # then the original projection's input)
    rows = ProjectionRows("x", np.float32, "o", w_prior, w_orig=w_orig,
                          groups=[("part", np.array([0, 2, 3, 7, 11]), np.array([1, 4, 5]), None),
                                  ("part", np.array([1, 4, 5, 6]), np.array([0, 2, 3, 6, 7]), None)])
    batches = [({"x": rng.standard_normal((batch, seq, d)).astype(np.float32)},
                {"o": rng.standard_normal((batch, seq, d)).astype(np.float32)}) for _ in range(3)]
    held_samples = (np.arange(3 * batch) % 5 == 0) if held else None
    # a budget of 64 rows per group against 256 rows per batch over 6,400 samples: a small share is kept
    monkeypatch.setattr(refit, "ROWS_PER_FEATURE", 2)
    monkeypatch.setattr(refit, "MIN_BUDGET_ROWS", 64)
    spy = _Spy(rows)
    built = _accumulated(spy, batches, held_samples, 6400)
    every = _accumulated(_EveryRow(rows), batches, held_samples, 6400)
    assert spy.built and max(spy.built) < batch * seq  # only the rows kept were built
    for key in every:
        a, b = built[key], every[key]
        if isinstance(a, GramAccumulator):
            assert a.count == b.count
            if key.startswith("held") and not held:
                assert a.count == 0
                continue
            assert a.count > 0
            assert np.allclose(a.XtX, b.XtX, rtol=1e-12, atol=1e-12)
            assert np.allclose(a.XtY, b.XtY, rtol=1e-12, atol=1e-12)
            assert np.allclose(a.total_ss(per_output=True), b.total_ss(per_output=True), rtol=1e-12)
        else:  # the held-out target's spread
            assert a.count == b.count and np.allclose(a.m2, b.m2, rtol=1e-12)
    assert (built["held0"].count > 0) == held


def test_a_builder_keeping_every_row_builds_them_once_as_before(monkeypatch):
    from onnxfold.passes.handlers import ProjectionRows

    rng = np.random.default_rng(4)
    rows = ProjectionRows("x", np.float32, "o", rng.standard_normal((3, 6)))
    batches = [({"x": rng.standard_normal((4, 10, 6)).astype(np.float32)},
                {"o": rng.standard_normal((4, 10, 3)).astype(np.float32)})]
    spy = _Spy(rows)
    built = _accumulated(spy, batches, None, 4)  # 40 rows: within any budget
    assert spy.built == [40]
    x = batches[0][0]["x"].reshape(-1, 6).astype(np.float64)
    assert built["fit0"].count == 40
    assert np.allclose(built["fit0"].XtX, x.T @ x, rtol=1e-12)
