"""User-facing errors.

Every error a user can cause (bad model, bad calibration data, bad path, unmet
budget) is an ``OnnxFoldError``: its message is one line that names the problem
and, where there is one, the fix. The CLI prints that line and exits non-zero;
anything else escaping is a bug and gets a traceback.
"""

from __future__ import annotations

import re


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


# ---------------------------------------------------------------------------
# one-line messages from other libraries' exceptions


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"


def wrapped_error(e: BaseException | None) -> "OnnxFoldError | None":
    """The OnnxFoldError a library's error wraps (a Ray task's, Ray Data's), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a Ray task error's original (Ray's own class also derives from it)
        if isinstance(cause, OnnxFoldError):
            return cause
        if isinstance(e, OnnxFoldError):
            return e
        e = cause or e.__cause__ or e.__context__
    return None


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|cpp|cu|h|hpp):\d+\s+")


def _strip_signature(text: str) -> str:
    """Drop a leading C++ function signature (``ns::f(args) const``)."""
    paren = text.find("(")
    if paren <= 0 or "::" not in text[:paren]:
        return text
    depth = 0
    for i in range(paren, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                rest = text[i + 1 :].lstrip()
                if rest.startswith("const "):
                    rest = rest[len("const ") :]
                return rest or text
    return text


def ort_message(exc: BaseException | str, limit: int = 300) -> str:
    """The useful part of onnxruntime's error: its first line, without the
    ``[ONNXRuntimeError] : 1 : FAIL :`` code, source location and C++
    signature noise."""
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    line = _ORT_PREFIX.sub("", line)
    line = re.sub(r"^Load model from .*? failed:\s*", "", line)  # the caller knows which model
    # "Load model from X failed:/src/...cc:12 sig(...) message"
    m = re.search(r"(?:^|:\s*)(/\S+\.(?:cc|cpp|cu|h|hpp):\d+\s+.*)$", line)
    if m:
        head = line[: m.start(1)]
        tail = _strip_signature(_SOURCE_LOCATION.sub("", m.group(1)))
        line = f"{head.rstrip()} {tail}".strip() if head.strip() else tail
    elif _SOURCE_LOCATION.match(line):
        line = _strip_signature(_SOURCE_LOCATION.sub("", line))
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line
