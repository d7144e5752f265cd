"""User-facing errors.

Every error a user can cause (bad model, bad calibration data, bad path, unmet
budget) is an ``OnnxFoldError``: its message is one line that names the problem
and, where there is one, the fix. The CLI prints that line and exits non-zero;
anything else escaping is a bug and gets a traceback.
"""

from __future__ import annotations


class OnnxFoldError(Exception):
    """Base class: an expected failure with a one-line message for the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class ModelLoadError(OnnxFoldError):
    """The model file is missing, unreadable, corrupt or not supported."""


class ModelSaveError(OnnxFoldError):
    """The output could not be written (bad directory, permissions, checker failure)."""


class CalibrationDataError(OnnxFoldError):
    """Calibration or evaluation data does not fit the model's inputs."""


class UnsupportedModelError(OnnxFoldError):
    """The model uses something onnxfold cannot handle at all."""


class BudgetNotMetError(OnnxFoldError):
    """No candidate met the requested budget (only raised with --check)."""

    exit_code = 1


class UsageError(OnnxFoldError):
    """Inconsistent or invalid options."""


class RayNotInstalledError(UsageError):
    """``--ray`` / ``ray_address`` was asked for but Ray is not installed."""


class ScaleOutError(OnnxFoldError):
    """The Ray cluster could not be reached, lost its workers or timed out."""
