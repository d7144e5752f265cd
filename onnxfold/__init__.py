"""onnxfold: structural compression of exported ONNX models, no retraining.

Python API::

    import onnxfold
    result = onnxfold.optimize("model.onnx", calibration="model.calib.npz")
    result.save("model.fold.onnx")
    print(result.report["ratios"])
"""

from .version import __version__
from .api import OptimizeResult, inspect, optimize
from .errors import OnnxFoldError

__all__ = ["optimize", "inspect", "OptimizeResult", "OnnxFoldError", "__version__"]
