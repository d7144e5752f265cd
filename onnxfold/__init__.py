"""onnxfold: structural compression of exported ONNX models, no retraining.

Python API::

    import onnxfold
    result = onnxfold.optimize("model.onnx", calibration="model.calib.npz")
    result.save("model.fold.onnx")
    print(result.report["ratios"])
"""

__version__ = "0.1.0"

from .api import OptimizeResult, inspect, optimize  # noqa: E402
from .errors import OnnxFoldError  # noqa: E402

__all__ = ["optimize", "inspect", "OptimizeResult", "OnnxFoldError", "__version__"]
