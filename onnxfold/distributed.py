"""Where streamed statistics are computed: in this process, or on a Ray cluster.

A pass that needs statistics of some tensors over the calibration data (neuron
piece counts, means, Gram matrices, cross moments) describes them as a
:class:`StatsJob`: the model(s) to run, the tensors to expose, how to create
empty accumulators and how to add one batch to them. A *backend* runs the job
and returns the accumulators:

* :class:`LocalStats` (the default) streams the data once through the models
  in this process, batch by batch - exactly what the passes always did;
* :class:`RayStats` cuts the data into contiguous shards, lets a pool of Ray
  actors (one onnxruntime session per job each) run the same job on their
  shards, and merges the shards' accumulators on the driver, in shard order;
  for a Parquet / ``ray.data.Dataset`` source (:mod:`onnxfold.measure.raydata`)
  each job is a Ray Data ``map_batches`` over an actor pool instead, whose
  per-batch accumulators the driver merges as they stream in.

Every accumulator (``NeuronStats``, ``GramAccumulator``) is float64 and merges
exactly (counts and sums add; centred moments follow Chan's update), so the
Ray result equals the single-process one up to float64 rounding. Shard
boundaries fall on multiples of the batch size: a shard's batches are the
single-process batches, only the order of the final merges differs. The
driver holds one set of accumulators per shard (width², never samples).

Ray is optional (``pip install 'onnxfold[ray]'``) and imported only when a
:class:`RayStats` is created.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import onnx

from onnxfold.errors import OnnxFoldError, RayNotInstalledError, ScaleOutError, UsageError, first_line, wrapped_error
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.jobs import (Accumulators, StatsJob, StreamMemo, UpdateFn, merge_accumulators, model_of,
                                   run_stats_job)

__all__ = ["StatsJob", "StatsBackend", "LocalStats", "RayStats", "merge_accumulators", "run_stats_job",
           "make_backend", "import_ray", "RAY_INSTALL_HINT", "Accumulators", "UpdateFn"]

RAY_INSTALL_HINT = "--ray needs Ray, which is not installed; install it with pip install 'onnxfold[ray]'"

class StatsBackend(Protocol):
    name: str

    def reduce(self, job: StatsJob, data: CalibrationSet, *, batch_size: int, providers: list[str],
               progress: Callable[[int, int], None] | None = None,
               memo: StreamMemo | None = None) -> Accumulators: ...

    def close(self) -> None: ...


class LocalStats:
    """The single-process backend: one streamed run in this process."""

    name = "local"

    def reduce(self, job: StatsJob, data: CalibrationSet, *, batch_size: int, providers: list[str],
               progress: Callable[[int, int], None] | None = None,
               memo: StreamMemo | None = None) -> Accumulators:
        return run_stats_job(job, data, batch_size=batch_size, providers=providers, progress=progress, memo=memo)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Ray
def import_ray():
    """The ``ray`` module, or a one-line UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError(RAY_INSTALL_HINT) from None
    return ray


class _StatsWorker:
    """A Ray actor: runs statistics jobs on the shards it is given. It
    resolves its own provider (a worker host may have a GPU the driver lacks)."""

    def __init__(self, provider: str, threads: int):
        from onnxfold.runtime import resolve_provider

        self.providers, self.notice = resolve_provider(provider)
        self.threads = threads  # the CPUs this actor reserved: onnxruntime would otherwise take every core

    def run(self, models: list[tuple[bytes, list[str]]], init, update, shard: CalibrationSet, first_sample: int,
            batch_size: int) -> Accumulators:
        job = StatsJob([(onnx.load_from_string(b), names) for b, names in models], init, update)
        return run_stats_job(job, shard, batch_size=batch_size, providers=self.providers, first_sample=first_sample,
                             intra_op_threads=self.threads)

    def call(self, fn, item):
        """``fn(item)``: a decision task (one budget-search candidate) on this worker."""
        return fn(item)

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "providers": self.providers, "notice": self.notice,
                "gpus": [str(g) for g in ray.get_gpu_ids()]}


@dataclass
class _Shards:
    data: CalibrationSet  # kept alive: the cache is keyed by its id
    batch_size: int
    parts: list[tuple[int, int, Any]]  # (first sample, samples, object ref)


class RayStats:
    """Statistics on a Ray cluster: a pool of ``workers`` actors, each holding
    one onnxruntime session per job (``provider``; ``cpus_per_worker`` CPUs,
    which its session uses as threads, and ``gpus_per_worker`` GPUs).

    address: ``"local"`` starts a local Ray instance (shut down by
    :meth:`close`); anything else (``"HOST:6379"``, ``"auto"``,
    ``"ray://HOST:10001"``) connects to that cluster. When Ray is already
    initialised in this process (a notebook, a test fixture) that instance is
    used and left running. workers: default one per CPU (per GPU share with
    ``gpus_per_worker``) of the cluster. A worker that dies is restarted and
    its shard retried (``max_restarts`` times); ``timeout_s`` bounds each
    job, so a lost cluster is an error, never a hang.
    """

    name = "ray"

    def __init__(self, address: str = "local", *, workers: int | None = None, provider: str = "auto",
                 cpus_per_worker: int = 1, gpus_per_worker: float = 0.0, max_restarts: int = 3,
                 timeout_s: float = 3600.0):
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address not in ("local", "auto"):
                _check_reachable(address)
            try:
                # Ray's own INFO/WARNING lines would break the CLI's one-line errors and --quiet
                # "local" always starts a new instance (None would join a 'ray start' cluster of this host)
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ScaleOutError(f"cannot connect to the Ray cluster at {address!r} ({first_line(e)}); start one "
                                    "with 'ray start --head' or use --ray without an address for a local instance"
                                    ) from None
            self._started = True
        if gpus_per_worker < 0 or cpus_per_worker < 1 or (workers is not None and workers < 1):
            self.close()
            raise UsageError("Ray workers and CPUs per worker must be >= 1, GPUs per worker >= 0")
        resources = ray.cluster_resources()
        if workers is None:
            workers = int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else \
                int(resources.get("CPU", 1) // cpus_per_worker)
        if gpus_per_worker and resources.get("GPU", 0) < gpus_per_worker:
            self.close()
            raise ScaleOutError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs; a worker asks for "
                                f"{gpus_per_worker:g}")
        self.timeout_s = float(timeout_s)
        self.num_workers, self.provider = max(1, workers), provider
        self.cpus_per_worker, self.gpus_per_worker, self.max_restarts = cpus_per_worker, gpus_per_worker, max_restarts
        self._workers: list | None = None  # started on first use: Ray Data jobs need the CPUs a pool would hold
        self._shards: dict[int, _Shards] = {}

    @property
    def workers(self) -> list:
        """The actor pool (started on first use)."""
        if self._workers is None:
            actor = self._ray.remote(_StatsWorker).options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=self.max_restarts,
                max_task_retries=self.max_restarts)
            self._workers = [actor.remote(self.provider, self.cpus_per_worker) for _ in range(self.num_workers)]
        return self._workers

    # -- data ---------------------------------------------------------------
    def _shards_of(self, data: CalibrationSet, batch_size: int) -> list[tuple[int, int, Any]]:
        """Contiguous shards of ``data`` in the object store (made once per set),
        cut on batch boundaries: two per worker, for balance."""
        cached = self._shards.get(id(data))
        if cached is not None and cached.data is data and cached.batch_size == batch_size:
            return cached.parts
        n, bs = data.num_samples, data.effective_batch_size(batch_size)
        batches = -(-n // bs)
        count = max(1, min(batches, 2 * len(self.workers)))
        cuts = [round(i * batches / count) * bs for i in range(count + 1)]
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            b = min(b, n)
            if b <= a:
                continue
            sub = data.subset(slice(a, b))  # gathered into standalone arrays: only the shard is shipped
            shard = CalibrationSet(sub.arrays, sub.labels, fixed_batch=data.fixed_batch, what=data.what)
            parts.append((a, b - a, self._ray.put(shard)))
        self._shards[id(data)] = _Shards(data, batch_size, parts)
        return parts

    # -- jobs ---------------------------------------------------------------
    def reduce(self, job: StatsJob, data: CalibrationSet, *, batch_size: int, providers: list[str] | None = None,
               progress: Callable[[int, int], None] | None = None,
               memo: StreamMemo | None = None) -> Accumulators:
        """``job`` over every shard of ``data``, merged in shard order. ``providers``
        is ignored: each worker resolved its own; so is ``memo`` (the workers'
        runs are not recorded on the driver)."""
        from onnxfold.measure.stream import MEASURING_STAGES
        from onnxfold.profile import stage

        with stage("calibration", unless_in=MEASURING_STAGES):
            if getattr(data, "is_ray_dataset", False):
                return self._reduce_dataset(job, data, batch_size, progress)
            return self._reduce(job, data, batch_size, progress)

    def _reduce_dataset(self, job: StatsJob, data, batch_size: int,
                        progress: Callable[[int, int], None] | None) -> Accumulators:
        """``job`` over a :class:`~onnxfold.measure.raydata.RayFitData`: Ray Data
        maps its batches over a pool of actors (one onnxruntime session per
        model each), which return their batches' accumulators; merged here as
        they arrive, in the data's order."""
        import pickle

        from onnxfold.measure.raydata import DatasetStatsWorker

        if self._workers is not None:  # the pool would hold the CPUs the Ray Data actors need
            for w in self._workers:
                self._ray.kill(w)
            self._workers = None
        ray = self._ray
        parent = data.parent
        size = self._dataset_pool_size()
        models = [(model_of(m).SerializeToString(), list(names)) for m, names in job.models]
        # rows per map_batches call: a few stats batches, so that each call's accumulators (width^2) stay cheap
        rows = max(batch_size, min(data.num_samples, 4 * batch_size))
        out = parent.ds.map_batches(
            DatasetStatsWorker, batch_format="numpy", batch_size=rows, zero_copy_batch=True,
            fn_constructor_args=(self.provider, self.cpus_per_worker, models, job.init, job.update, batch_size,
                                 data.held, parent.dims, parent.has_labels, parent.what),
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None)
        merged, done = job.init(), 0
        try:
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                for blob, count, error in zip(batch["accs"], batch["rows"], batch["error"]):
                    if len(error):  # the data's fault (a bad value in a fit row): the user's error, one line
                        kind, message = pickle.loads(error)
                        raise kind(message)
                    merge_accumulators(merged, pickle.loads(blob))
                    done += int(count)
                if progress is not None:
                    progress(done, data.num_samples)
        except OnnxFoldError:
            raise
        except Exception as e:
            cause = wrapped_error(e)
            if cause is not None:  # the data or model's fault, not the cluster's: the user's error, one line
                raise type(cause)(str(cause)) from None
            raise ScaleOutError(f"the Ray Data statistics job failed ({first_line(e)})") from None
        if done != data.num_samples:
            raise ScaleOutError(f"the Ray Data statistics job saw {done} of {data.num_samples} samples")
        return merged

    def _reduce(self, job: StatsJob, data: CalibrationSet, batch_size: int,
                progress: Callable[[int, int], None] | None) -> Accumulators:
        ray = self._ray
        parts = self._shards_of(data, batch_size)
        # put once, shared by every shard's task: the models and what the update closes over (weights, masks)
        models = ray.put([(model_of(m).SerializeToString(), list(names)) for m, names in job.models])
        init, update = ray.put(job.init), ray.put(job.update)
        refs = [self.workers[i % len(self.workers)].run.remote(models, init, update, ref, first, batch_size)
                for i, (first, _count, ref) in enumerate(parts)]
        # a fresh, writable start: what ray.get returns is read-only, shared with the object store
        total, done, merged = data.num_samples, 0, job.init()
        try:
            for ref, (_first, count, _r) in zip(refs, parts):
                accs = self._get(ref)
                merge_accumulators(merged, accs)
                done += count
                if progress is not None:
                    progress(done, total)
        except BaseException:
            self._drop(refs)
            raise
        return merged

    def _dataset_pool_size(self, wait_s: float = 10.0) -> int:
        """Ray Data actors that fit in the cluster's free resources now (up to
        ``num_workers``): Ray Data would wait forever for resources that other
        actors hold, so none fitting is an error, not a hang."""
        import time

        def fitting(resources: dict) -> int:
            fit = int(resources.get("CPU", 0) // self.cpus_per_worker)
            if self.gpus_per_worker:
                fit = min(fit, int(resources.get("GPU", 0) // self.gpus_per_worker))
            return fit

        want = max(1, min(self.num_workers, fitting(self._ray.cluster_resources())))
        deadline = time.monotonic() + wait_s  # resources of just-killed actors come back within moments
        while True:
            fit = fitting(self._ray.available_resources())
            if fit >= want or (fit >= 1 and time.monotonic() > deadline):
                return min(fit, want)
            if time.monotonic() > deadline:
                need = f"{self.cpus_per_worker} CPU" + (f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
                raise ScaleOutError(f"the Ray cluster has no free resources for a Ray Data worker ({need}): other "
                                    "actors hold them; free them or add nodes")
            time.sleep(0.2)

    def _get(self, ref):
        ray = self._ray
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ScaleOutError(f"the Ray workers gave no result within {self.timeout_s:g} s; check the cluster "
                                "('ray status') or raise the timeout") from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, OnnxFoldError):  # the data or model's fault, not the cluster's: the user's error
                raise type(cause)(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as e:
            raise ScaleOutError(f"a Ray worker died and was not restarted ({first_line(e)})") from None

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any],
                  progress: Callable[[int, int], None] | None = None) -> list:
        """``[fn(item) for item in items]`` as tasks spread over the workers
        (independent decisions, e.g. budget-search candidates); results in the
        order of ``items``, ``progress(done, total)`` as they come. ``fn`` is
        pickled once; a task whose worker dies is retried on the restarted worker."""
        ray = self._ray
        fn_ref = ray.put(fn)
        refs = [self.workers[i % len(self.workers)].call.remote(fn_ref, item) for i, item in enumerate(items)]
        try:
            out = []
            for ref in refs:
                out.append(self._get(ref))
                if progress is not None:
                    progress(len(out), len(refs))
            return out
        except BaseException:
            self._drop(refs)
            raise

    def _drop(self, refs) -> None:
        """Cancel what is left of a failed job and collect the other shards'
        errors, so that Ray does not log each of them as unhandled."""
        ray = self._ray
        for ref in refs:
            ray.cancel(ref)  # actor tasks: queued ones are dropped, a running one finishes
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - the first error is the one reported
                pass

    def worker_info(self) -> list[dict]:
        return self._ray.get([w.info.remote() for w in self.workers], timeout=self.timeout_s)

    def provider_note(self, driver_providers: list[str]) -> str | None:
        """One line when the workers' sessions run on other providers than the
        driver's (each worker resolves ``provider`` on its own host: a worker
        without CUDA falls back to CPU under 'auto'); None when they agree."""
        infos = self.worker_info()
        chosen = [i["providers"][0].replace("ExecutionProvider", "") for i in infos]
        if all(c == driver_providers[0].replace("ExecutionProvider", "") for c in chosen):
            return None
        counts = ", ".join(f"{c} on {chosen.count(c)}" for c in dict.fromkeys(chosen))
        why = next((i["notice"] for i in infos if i["notice"]), None)
        return f"Ray workers' sessions: {counts} of {len(infos)} workers" + (f" ({why})" if why else "")

    def close(self) -> None:
        ray = self._ray
        for w in getattr(self, "_workers", None) or []:
            ray.kill(w)
        self._workers = None
        self._shards = {}
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an address nothing answers on: Ray would keep retrying it
    for minutes, logging from C++ to stderr."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # not HOST:PORT: Ray judges the form
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ScaleOutError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start it with "
                            "'ray start --head --port=6379' on that host, or use --ray without an address for a "
                            "local instance") from None


def make_backend(ray_address: str | None, *, provider: str = "auto", workers: int | None = None,
                 gpus_per_worker: float = 0.0) -> StatsBackend:
    """:class:`LocalStats` without an address, else a :class:`RayStats` on it."""
    if ray_address is None:
        return LocalStats()
    return RayStats(ray_address, workers=workers, provider=provider, gpus_per_worker=gpus_per_worker)
