"""The onnxfold version, in a module of its own: the report and the CLI read
it without importing the package's API (which imports them)."""

__version__ = "0.1.0"
