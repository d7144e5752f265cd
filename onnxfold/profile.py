"""Where an optimize run spends its time and memory, by stage.

Stages nest (calibration runs inside a pass, a pass inside the budget search);
each stage is charged only for the time not spent in a stage nested inside it,
so the numbers add up to the run's wall time. Code deep in the library marks
its stage with :func:`stage`, which does nothing unless a :class:`StageProfiler`
is active - the API always activates one for ``optimize``.

Memory (optional, Linux): a sampling thread reads the resident set size from
``/proc/self/statm`` every few milliseconds and records each stage's peak;
``peak_rss_bytes`` is the process's high-water mark (``VmHWM``), which
also catches spikes between samples.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator

_ACTIVE: contextvars.ContextVar[StageProfiler | None] = contextvars.ContextVar("onnxfold_profiler", default=None)

#: the stage names the library reports, in pipeline order
STAGES = ("ray_start", "load", "load_data", "calibration", "decide", "rewrite", "verify", "latency", "save")


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int:
    """High-water mark of this process's resident set, in bytes.

    Linux: ``VmHWM`` of /proc/self/status. Not ``getrusage``: its ``ru_maxrss``
    survives ``exec``, so a process started from a big parent (a benchmark
    script, a test session) would report the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StageProfiler:
    def __init__(self, memory: bool = False, interval_s: float = 0.005):
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, time in nested stages]
        self._memory = memory and current_rss() is not None
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = None

    # -- activation ----------------------------------------------------------
    def __enter__(self) -> StageProfiler:
        self._token = _ACTIVE.set(self)
        if self._memory:
            self._thread = threading.Thread(target=self._sample, name="onnxfold-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._note_rss()

    def _note_rss(self) -> None:
        rss = current_rss()
        try:  # read from the sampling thread while the main thread pushes/pops
            name = self._stack[-1][0]
        except IndexError:
            return
        if rss is None:
            return
        if rss > self.peaks.get(name, 0):
            self.peaks[name] = rss

    # -- stages ----------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._memory:
            self._note_rss()  # the parent's level at the switch
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            if self._memory:
                self._note_rss()
            self._stack.pop()
            total = time.perf_counter() - entry[1]
            self.times[name] = self.times.get(name, 0.0) + total - entry[2]
            if self._stack:
                self._stack[-1][2] += total

    def timings(self, digits: int = 4) -> dict[str, float]:
        order = {s: i for i, s in enumerate(STAGES)}
        return {k: round(v, digits) for k, v in sorted(self.times.items(), key=lambda kv: order.get(kv[0], 99))}

    def memory(self) -> dict | None:
        if not self._memory:
            return None
        # the kernel's high-water mark can lag a sample taken a moment before
        return {"peak_rss_bytes": max([peak_rss(), *self.peaks.values()]), "stage_peak_rss_bytes": dict(self.peaks)}


def stage(name: str, unless_in: tuple[str, ...] = ()):
    """Charge the enclosed work to ``name`` in the active profiler (if any);
    inside a stage named in ``unless_in`` it stays charged to that one (model
    runs during ``verify`` are verification, not calibration)."""
    prof = _ACTIVE.get()
    if prof is None or (prof._stack and prof._stack[-1][0] in unless_in):
        return contextlib.nullcontext()
    return prof.stage(name)
