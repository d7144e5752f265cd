"""onnxfold: structural compression of exported ONNX models, no retraining.

Python API::

    import onnxfold
    result = onnxfold.optimize("model.onnx", calibration="model.calib.npz")
    result.save("model.fold.onnx")
    print(result.report["ratios"])

Settings come as flat keywords (``fold_ratio=0.5``) or as one typed
``OptimizeOptions`` grouped by concern (``onnxfold.options``).
"""

from .version import __version__
from .api import OptimizeResult, inspect, optimize
from .decide.budget import Budget
from .errors import OnnxFoldError
from .options import OptimizeOptions

__all__ = ["optimize", "inspect", "OptimizeResult", "OptimizeOptions", "Budget", "OnnxFoldError", "__version__"]
