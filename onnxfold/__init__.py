"""onnxfold: structural compression of exported ONNX models, no retraining.

Python API::

    import onnxfold
    result = onnxfold.optimize("model.onnx", calibration="model.calib.npz")
    result.save("model.fold.onnx")
    print(result.report["ratios"])

Settings come as flat keywords (``fold_ratio=0.5``) or as one typed
``OptimizeOptions`` grouped by concern (``onnxfold.options``).
"""

__version__ = "0.1.0"

from .api import OptimizeResult, inspect, optimize  # noqa: E402
from .decide.budget import Budget  # noqa: E402
from .errors import OnnxFoldError  # noqa: E402
from .options import OptimizeOptions  # noqa: E402

__all__ = ["optimize", "inspect", "OptimizeResult", "OptimizeOptions", "Budget", "OnnxFoldError", "__version__"]
