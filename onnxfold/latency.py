"""Latency of the original and the optimized model, measured side by side.

The machines this runs on are shared and noisy, so the two models are timed
interleaved (A, B, A, B, …) after a warm-up, and the report gives medians and
their ratio rather than absolute promises.
"""

from __future__ import annotations

import time

import numpy as np
import onnx


def _feed_for(data, batch: int) -> dict[str, np.ndarray]:
    """A batch of ``batch`` samples from ``data``, repeating samples if needed."""
    feed = {}
    head = data.subset(slice(0, min(batch, data.num_samples)))  # only the rows needed, not the whole set
    for name, arr in head.arrays.items():
        reps = int(np.ceil(batch / arr.shape[0]))
        feed[name] = np.concatenate([arr] * reps, axis=0)[:batch] if reps > 1 else arr[:batch]
    return feed


def measure_latency(before: onnx.ModelProto, after: onnx.ModelProto, data, *, providers: list[str],
                    batch_sizes=(1, 256), min_time_s: float = 0.5, max_repeats: int = 200) -> dict:
    """{"batch N": {before_ms, after_ms, ratio, repeats}} for each batch size.

    Models whose batch axis is fixed (``data.fixed_batch``) are timed at that
    batch size only.
    """
    from .runtime import create_session

    sa, sb = create_session(before, providers), create_session(after, providers)
    sizes = (data.fixed_batch,) if data.fixed_batch else batch_sizes
    out = {}
    for bs in sizes:
        feed = _feed_for(data, bs)
        for _ in range(3):  # warm-up (allocations, thread pools)
            sa.run(None, feed)
            sb.run(None, feed)
        ta, tb = [], []
        t_end = time.perf_counter() + min_time_s
        while len(ta) < max_repeats and (len(ta) < 10 or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            sa.run(None, feed)
            t1 = time.perf_counter()
            sb.run(None, feed)
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        a, b = 1e3 * float(np.median(ta)), 1e3 * float(np.median(tb))
        out[f"batch {bs}"] = {"before_ms": a, "after_ms": b, "ratio": b / a if a else None, "repeats": len(ta)}
    return out
