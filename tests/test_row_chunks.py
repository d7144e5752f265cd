"""RowChunks: a refit's (and a linearity path's) rows reach their Gram in
chunks of about CHUNK_ELEMENTS, not a batch at a time. The statistics must
be those of all the rows, computed here from the rows themselves with plain
numpy; only the number of updates may change."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfold.measure.stats import GramAccumulator, RowChunks

P, Q = 12, 5


class _CountingGram(GramAccumulator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def update(self, *args, **kwargs):
        self.calls += 1
        super().update(*args, **kwargs)


def _batches(seed, sizes, shape=()):
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal((m, *shape, P)) * 3 + 1).astype(np.float32) for m in sizes]
    ys = [rng.standard_normal((m, *shape, Q)) for m in sizes]
    ws = [rng.uniform(0.1, 2.0, m * int(np.prod(shape, dtype=int))) for m in sizes]
    return xs, ys, ws


def _expected(xs, ys, ws=None):
    """Weighted centred cross-products of all rows, straight from their definition."""
    X = np.concatenate([x.reshape(-1, P) for x in xs]).astype(np.float64)
    Y = np.concatenate([y.reshape(-1, Q) for y in ys])
    w = np.ones(len(X)) if ws is None else np.concatenate(ws)
    mx, my = w @ X / w.sum(), w @ Y / w.sum()
    xc, yc = X - mx, Y - my
    return {"count": len(X), "mean_x": mx, "mean_y": my, "sxx": (xc * w[:, None]).T @ xc,
            "sxy": (xc * w[:, None]).T @ yc, "syy": w @ (yc * yc)}


def _check(acc, want):
    assert acc.count == want["count"]
    for k in ("mean_x", "mean_y", "sxx", "sxy", "syy"):
        np.testing.assert_allclose(getattr(acc, k), want[k], rtol=1e-10, atol=1e-9, err_msg=k)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_gram_has_the_statistics_of_all_rows_in_few_updates(weighted):
    xs, ys, ws = _batches(0, [37] * 40)  # 40 small batches of 37 rows
    gram = _CountingGram(with_bias=True)
    chunks = RowChunks(gram, elements=300 * P)  # a chunk: about 300 rows
    for x, y, w in zip(xs, ys, ws):
        chunks.update(x, y, w if weighted else None)
    assert chunks.flush() is gram
    _check(gram, _expected(xs, ys, ws if weighted else None))
    assert gram.calls == 5  # ceil(1480 / 300-ish rows): 9 batches of 37 per chunk (333 rows)


def test_token_rows_and_uneven_batches_are_flattened_like_the_gram_does():
    xs, ys, _ = _batches(1, [3, 50, 1, 9, 120, 2], shape=(4,))  # (batch, seq, width) tensors
    chunks = RowChunks(GramAccumulator(with_bias=True), elements=100 * P)
    for x, y in zip(xs, ys):
        chunks.update(x, y)
    _check(chunks.flush(), _expected(xs, ys))


def test_a_batch_as_big_as_a_chunk_is_passed_on_as_it_is():
    xs, ys, _ = _batches(2, [500, 10])
    gram = _CountingGram(with_bias=True)
    chunks = RowChunks(gram, elements=100 * P)
    x0, y0 = xs[0].copy(), ys[0].copy()
    chunks.update(xs[0], ys[0])
    assert gram.calls == 1 and gram.count == 500  # nothing pending: no copy, no wait
    chunks.update(xs[1], ys[1])
    assert gram.calls == 1  # 10 rows wait for more
    _check(chunks.flush(), _expected(xs, ys))
    assert gram.calls == 2
    np.testing.assert_array_equal(xs[0], x0)  # the caller's rows are not centred in place
    np.testing.assert_array_equal(ys[0], y0)


def test_pending_rows_are_never_modified_in_the_callers_arrays():
    xs, ys, _ = _batches(3, [20, 20, 20])
    keep = [(x.copy(), y.copy()) for x, y in zip(xs, ys)]
    chunks = RowChunks(GramAccumulator(with_bias=True), elements=10**6)
    for x, y in zip(xs, ys):
        chunks.update(x, y)
    chunks.flush()
    for (x, y), (x0, y0) in zip(zip(xs, ys), keep):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)


def test_merged_shards_equal_one_stream():
    xs, ys, ws = _batches(4, [30] * 12)
    a, b = (RowChunks(GramAccumulator(with_bias=True), elements=200 * P) for _ in range(2))
    for i, (x, y, w) in enumerate(zip(xs, ys, ws)):
        (a if i < 7 else b).update(x, y, w)
    merged = a.merge(b)
    _check(merged.flush(), _expected(xs, ys, ws))


def test_a_gram_without_targets():
    xs, _, _ = _batches(5, [25] * 9)
    chunks = RowChunks(GramAccumulator(with_bias=False), elements=80 * P)
    for x in xs:
        chunks.update(x)
    acc = chunks.flush()
    X = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(acc.XtX, X.T @ X, rtol=1e-10)
    np.testing.assert_allclose(acc.sum_x, X.sum(axis=0), rtol=1e-10)


def test_batches_merged_from_workers_join_the_drivers_chunks():
    """Ray's task pool sends each batch's accumulators to the driver: their
    pending rows are chunked there, not added one batch at a time."""
    xs, ys, ws = _batches(7, [30] * 20)
    gram = _CountingGram(with_bias=True)
    driver = RowChunks(gram, elements=200 * P)
    for x, y, w in zip(xs, ys, ws):
        batch = RowChunks(GramAccumulator(with_bias=True), elements=200 * P)
        batch.update(x, y, w)  # 30 rows: pending on the worker
        driver.merge(batch)
    _check(driver.flush(), _expected(xs, ys, ws))
    assert gram.calls == 3  # 600 rows in chunks of 210


def test_unweighted_rows_among_weighted_ones_weigh_one():
    xs, ys, ws = _batches(8, [20] * 6)
    mixed = [w if i % 2 else None for i, w in enumerate(ws)]
    chunks = RowChunks(GramAccumulator(with_bias=True), elements=10**6)
    for x, y, w in zip(xs, ys, mixed):
        chunks.update(x, y, w)
    _check(chunks.flush(), _expected(xs, ys, [np.ones(20) if w is None else w for w in mixed]))


def test_targets_in_some_batches_only_are_refused_as_the_gram_refuses_them():
    xs, ys, _ = _batches(9, [10, 10])
    chunks = RowChunks(GramAccumulator(with_bias=True), elements=10**6)
    chunks.update(xs[0], ys[0])
    chunks.update(xs[1])
    with pytest.raises(ValueError, match="every update gives Y"):
        chunks.flush()


def test_a_scratch_batch_passed_on_alone_is_centred_in_place_as_the_gram_would():
    """overwrite=True: the caller's own copy (a refit's chosen rows); a batch big enough to go on alone
    is then centred in place instead of in a new array, as GramAccumulator.update(overwrite=True) does."""
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((400, P)) + 3.0, rng.standard_normal((400, Q)) + 1.0
    kept = RowChunks(GramAccumulator(with_bias=True), elements=100 * P)
    kept.update(x.copy(), y.copy())  # not scratch: left alone
    scratch_x, scratch_y = x.copy(), y.copy()
    chunks = RowChunks(GramAccumulator(with_bias=True), elements=100 * P)
    chunks.update(scratch_x, scratch_y, overwrite=True)
    assert not np.allclose(scratch_x, x)  # centred in place: its column means are now 0
    np.testing.assert_allclose(scratch_x.mean(axis=0), 0.0, atol=1e-12)
    for k in ("sxx", "sxy", "syy", "mean_x", "mean_y"):
        np.testing.assert_array_equal(getattr(chunks.flush(), k), getattr(kept.flush(), k))
