"""Measuring a model on data: calibration sets, streamed runs, statistics.

* :mod:`.data` - :class:`CalibrationSet` and :func:`load_calibration`, built on
  :mod:`.sources` (reading ``.npz`` / ``.npy`` / feed dicts) and :mod:`.inputs`
  (checking data against the model's inputs); :mod:`.raydata` for Parquet
  and Ray Datasets.
* :mod:`.stream` - :func:`expose_outputs`, :func:`stream_tensors`, :func:`run_model`.
* :mod:`.stats` - :class:`NeuronStats`, :class:`GramAccumulator`,
  :func:`ridge_path`, :func:`collect_neuron_stats`.
* :mod:`.jobs` - :class:`~onnxfold.measure.jobs.StatsJob` and running one in
  this process (:mod:`onnxfold.distributed` runs them elsewhere too).
"""

from onnxfold.measure.data import LABELS_KEY, CalibrationSet, load_calibration, model_inputs
from onnxfold.measure.stats import (
    DEFAULT_RIDGE_LAMS,
    GramAccumulator,
    NeuronStats,
    collect_neuron_stats,
    ridge_path,
)
from onnxfold.measure.stream import expose_outputs, run_model, stream_tensors

__all__ = [
    "LABELS_KEY",
    "CalibrationSet",
    "load_calibration",
    "model_inputs",
    "expose_outputs",
    "stream_tensors",
    "run_model",
    "NeuronStats",
    "GramAccumulator",
    "ridge_path",
    "collect_neuron_stats",
    "DEFAULT_RIDGE_LAMS",
]
