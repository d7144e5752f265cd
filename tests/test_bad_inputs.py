"""Bad inputs: every way a user can get it wrong, through the CLI and the API.

Each case in ``CASES`` sets up files in ``src/`` (the model and its data) and
names an output in ``out/``, runs ``onnxfold.cli.main`` and asserts

* the exit code,
* stderr (file-descriptor level, so onnxruntime's C++ log would show up too)
  is exactly one line, starting with the expected prefix (``error:``) and
  containing the case's key words,
* every file in ``src/`` is unchanged (sha256) and nothing else appeared there,
* ``out/`` holds exactly what the case expects (nothing, for an error: no
  output, no temporary file).

Where the API is relevant the same case is run through ``onnxfold.optimize``
(+ ``result.save``) and must raise the exact ``OnnxFoldError`` subclass.

``python tests/test_bad_inputs.py`` regenerates ``docs/errors.md`` (case ->
exit code -> the message as printed, with temporary paths shortened) from
these cases; ``test_docs_table_lists_every_case`` keeps the two in sync.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import build_mlp, make_model, ort_run, tensor_info  # noqa: E402

import onnxfold  # noqa: E402
from onnxfold import io as fio  # noqa: E402
from onnxfold.cli import main  # noqa: E402
from onnxfold.errors import (BudgetNotMetError, CalibrationDataError, ModelLoadError, ModelSaveError,  # noqa: E402
                             OnnxFoldError, RayNotInstalledError, UsageError)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
N_IN = 6


# --------------------------------------------------------------------------
# models and data


def dense_model(seed: int = 1, widths=(N_IN, 32, 32, 3)) -> onnx.ModelProto:
    """An MLP whose hidden layers have provably dead rows (zero weights,
    negative bias) and rows that are always on: data-free rewrites happen."""
    rng = np.random.default_rng(seed)
    weights = []
    for i in range(len(widths) - 1):
        W = rng.standard_normal((widths[i + 1], widths[i])) / np.sqrt(widths[i])
        b = rng.standard_normal(widths[i + 1]) * 0.1
        if i < len(widths) - 2:  # every hidden layer
            W[:4] = 0.0
            b[:4] = -1.0
        weights.append((W, b))
    return build_mlp(list(widths), weights=weights)


def calib_x(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_IN)).astype(np.float32)


def two_input_model() -> onnx.ModelProto:
    """y = MLP(a + b), inputs a and b of shape [N, 6]."""
    m = dense_model()
    nodes = list(m.graph.node)
    for n in nodes:
        for k, name in enumerate(n.input):
            if name == "x":
                n.input[k] = "ab"
    nodes.insert(0, helper.make_node("Add", ["a", "b"], ["ab"], name="sum_ab"))
    return make_model(nodes, [tensor_info("a", np.float32, ["N", N_IN]), tensor_info("b", np.float32, ["N", N_IN])],
                      list(m.graph.output), list(m.graph.initializer))


def with_custom_op(domain: str, op: str) -> onnx.ModelProto:
    """``dense_model`` (4 layers) with ``domain::op`` between the first hidden activation and fc1."""
    m = dense_model(widths=(N_IN, 32, 32, 32, 3))
    nodes = list(m.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == "fc1")
    nodes[i].input[0] = "h0.custom"
    nodes.insert(i, helper.make_node(op, ["h0"], ["h0.custom"], name="custom", domain=domain))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def no_chain_model() -> onnx.ModelProto:
    return make_model([helper.make_node("Softplus", ["x"], ["t"], name="sp"),
                       helper.make_node("Relu", ["t"], ["y"], name="relu")],
                      [tensor_info("x", np.float32, ["N", N_IN])], [tensor_info("y", np.float32, ["N", N_IN])])


def unknown_ops_around_model() -> onnx.ModelProto:
    """Transpose/Softplus/Reshape before and after a standard chain."""
    m = dense_model()
    nodes = list(m.graph.node)
    for n in nodes:
        n.input[:] = ["xt" if s == "x" else s for s in n.input]
        n.output[:] = ["yd" if s == "y" else s for s in n.output]
    pre = [helper.make_node("Softplus", ["x"], ["xs"], name="pre_softplus"),
           helper.make_node("Transpose", ["xs"], ["xtt"], name="pre_t1", perm=[1, 0]),
           helper.make_node("Transpose", ["xtt"], ["xt"], name="pre_t2", perm=[1, 0])]
    post = [helper.make_node("Softplus", ["yd"], ["y"], name="post_softplus")]
    return make_model(pre + nodes + post, [tensor_info("x", np.float32, ["N", N_IN])],
                      [tensor_info("y", np.float32, ["N", 3])], list(m.graph.initializer))


def dynamic_feature_model() -> onnx.ModelProto:
    """Input ``[N, F]`` with a symbolic feature dim F that only the weights fix (6)."""
    m = dense_model()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    return m


def checker_failing_model() -> onnx.ModelProto:
    m = dense_model()
    m.graph.node[1].input[0] = "no_such_tensor"  # Relu reads a tensor nobody produces
    return m


# --------------------------------------------------------------------------
# the cases


@dataclass
class Env:
    root: Path
    src: Path
    out: Path

    def model(self, m: onnx.ModelProto | None = None, name: str = "m.onnx") -> Path:
        p = self.src / name
        onnx.save_model(m if m is not None else dense_model(), str(p))
        return p

    def npz(self, name: str = "calib.npz", **arrays) -> Path:
        p = self.src / name
        np.savez(p, **arrays)
        return p

    def o(self, name: str = "small.onnx") -> Path:
        return self.out / name


@dataclass
class Case:
    id: str
    what: str  # one line for docs/errors.md
    setup: Callable[[Env], list] | None  # returns argv (after "onnxfold"); None: an API-only case
    code: int = 2
    words: tuple = ()  # key words of the message (all must appear)
    prefix: str = "error:"
    out_files: tuple = ()  # what out/ holds afterwards
    api: Callable[[Env], None] | None = None  # raises `error` through the API
    error: type | None = None
    patches: Callable[[Env], list] | None = None  # context managers active during the run
    src_changes: bool = False


CPU = ["--provider", "cpu", "--no-latency", "--quiet", "--no-auto-data"]


def _opt(env: Env, model: Path, *extra) -> list:
    return ["optimize", str(model), "-o", str(env.o()), *CPU, *extra]


def _calib_case(arrays: Callable[[], dict], *extra) -> Callable[[Env], list]:
    def setup(env: Env) -> list:
        return _opt(env, env.model(), "--calib", str(env.npz(**arrays())), *extra)

    return setup


def _api_calib(arrays: Callable[[], dict], model: Callable[[], onnx.ModelProto] = dense_model):
    def api(env: Env) -> None:
        onnxfold.optimize(model(), arrays(), provider="cpu")

    return api


def _shards(env: Env, *shards: dict) -> list:
    """optimize with --calib a directory of .npz shards (a.npz, b.npz, ...)."""
    (env.src / "shards").mkdir()
    for i, arrays in enumerate(shards):
        env.npz(f"shards/{chr(97 + i)}.npz", **arrays)
    return _opt(env, env.model(), "--calib", str(env.src / "shards"))


def _truncated(env: Env) -> list:
    data = dense_model().SerializeToString()
    (env.src / "m.onnx").write_bytes(data[: len(data) // 2])
    return _opt(env, env.src / "m.onnx")


def _external(env: Env) -> Path:
    return fio.save_model(dense_model(widths=(N_IN, 64, 64, 3)), env.src / "m.onnx", external_data=True)


def _missing_external(env: Env) -> list:
    p = _external(env)
    (env.src / "m.onnx.data").unlink()
    return _opt(env, p)


def _moved_external(env: Env) -> list:
    p = _external(env)
    (env.src / "elsewhere").mkdir()
    (env.src / "m.onnx.data").rename(env.src / "elsewhere" / "m.onnx.data")
    return _opt(env, p)


def _truncated_external(env: Env) -> list:
    p = _external(env)
    data = env.src / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return _opt(env, p)


def _new_opset(env: Env) -> list:
    m = dense_model()
    m.opset_import[0].version = 99
    # onnx's checker refuses unknown opsets too; write it unchecked
    (env.src / "m.onnx").write_bytes(m.SerializeToString())
    return _opt(env, env.src / "m.onnx")


def _interrupt(exc: BaseException):
    """Patch the writers so the save fails half-way through the output file."""
    def boom(model, model_path, *a, **k):
        with open(model_path, "wb") as f:
            f.write(b"partial")
        raise exc

    from onnxfold.io import write as io_write

    return lambda env: [mock.patch.object(io_write, "write_inline", boom),
                        mock.patch.object(io_write, "write_external", boom)]


CASES: list[Case] = [
    # ---- the model file
    Case("missing_model", "model path does not exist",
         lambda e: _opt(e, e.src / "nope.onnx"), words=("model file not found", "nope.onnx", "check the path"),
         api=lambda e: onnxfold.optimize(e.src / "nope.onnx"), error=ModelLoadError),
    Case("model_is_directory", "model path is a directory",
         lambda e: _opt(e, e.src), words=("is a directory", "path of the .onnx file"),
         api=lambda e: onnxfold.optimize(e.src), error=ModelLoadError),
    Case("empty_model", "model file is empty (0 bytes)",
         lambda e: (e.src / "m.onnx").write_bytes(b"") and [] or _opt(e, e.src / "m.onnx"),
         words=("model file is empty", "re-export")),
    Case("truncated_model", "model file cut in half", _truncated,
         words=("not a valid ONNX model", "truncated"),
         api=lambda e: onnxfold.optimize(_truncated(e)[1]), error=ModelLoadError),
    Case("text_file", "a text file given as the model",
         lambda e: (e.src / "m.onnx").write_text("hello, not a model\n") and [] or _opt(e, e.src / "m.onnx"),
         words=("not an ONNX model file", "text file", "give the exported .onnx model")),
    Case("npz_as_model", "the calibration .npz given as the model",
         lambda e: _opt(e, e.npz("m.npz", x=calib_x())), words=("not an ONNX model file", "zip archive")),
    Case("checker_fails", "a model that fails onnx.checker (a node reads an undefined tensor)",
         lambda e: _opt(e, e.model(checker_failing_model())), words=("fails the ONNX checker", "no_such_tensor", "re-export"),
         api=lambda e: onnxfold.optimize(e.model(checker_failing_model())), error=ModelLoadError),
    Case("opset_too_new", "default-domain opset newer than onnxruntime supports", _new_opset,
         words=("opset 99",)),
    Case("external_data_missing", "external-data file deleted", _missing_external,
         words=("external data file 'm.onnx.data'", "missing", "next to the model"),
         api=lambda e: onnxfold.optimize(_missing_external(e)[1]), error=ModelLoadError),
    Case("external_data_moved", "external-data file moved to another directory", _moved_external,
         words=("external data file 'm.onnx.data'", "missing")),
    Case("external_data_truncated", "external-data file truncated", _truncated_external,
         words=("external data file 'm.onnx.data'", "truncated", "copy the complete file")),
    Case("api_wrong_type", "API only: model is neither a path nor a ModelProto", None,
         api=lambda e: onnxfold.optimize(42), error=UsageError),
    # ---- what the model contains
    Case("custom_op_unknown_to_ort_data_free",
         "custom-domain op onnxruntime cannot run, no calibration data: the chains are rewritten but the output "
         "cannot be verified in onnxruntime, so it is not written",
         lambda e: _opt(e, e.model(with_custom_op("com.example", "MyOp"))),
         words=("onnxruntime cannot load the saved model", "com.example:MyOp", "check=False"),
         api=lambda e: onnxfold.optimize(with_custom_op("com.example", "MyOp")).save(e.o()), error=ModelSaveError),
    Case("custom_op_unknown_to_ort_with_calib", "custom-domain op onnxruntime cannot run, with calibration data",
         lambda e: _opt(e, e.model(with_custom_op("com.example", "MyOp")), "--calib", str(e.npz(x=calib_x()))),
         words=("onnxruntime cannot create a session", "com.example:MyOp", "check=False")),
    # ---- calibration data
    Case("calib_missing_input", "calibration data lacks an input name",
         _calib_case(lambda: {"input": calib_x()}), words=("missing input 'x'", "has: 'input'"),
         api=_api_calib(lambda: {"input": calib_x()}), error=CalibrationDataError),
    Case("calib_extra_name", "calibration data has a name that is not a model input",
         _calib_case(lambda: {"x": calib_x(), "mask": calib_x()}), words=("'mask'", "not a model input"),
         api=_api_calib(lambda: {"x": calib_x(), "mask": calib_x()}), error=CalibrationDataError),
    Case("calib_wrong_rank", "calibration array of rank 3 for a rank-2 input",
         _calib_case(lambda: {"x": calib_x()[:, None, :]}), words=("rank 3", "expects rank 2"),
         api=_api_calib(lambda: {"x": calib_x()[:, None, :]}), error=CalibrationDataError),
    Case("calib_wrong_feature_size", "calibration array with 7 features for a model fixing 6",
         _calib_case(lambda: {"x": np.zeros((40, 7), np.float32)}), words=("size 7 on axis 1", "expects 6"),
         api=_api_calib(lambda: {"x": np.zeros((40, 7), np.float32)}), error=CalibrationDataError),
    Case("calib_wrong_dtype", "integer calibration data for a float input",
         _calib_case(lambda: {"x": np.ones((40, N_IN), np.int64)}), words=("int64", "expects float32", "astype"),
         api=_api_calib(lambda: {"x": np.ones((40, N_IN), np.int64)}), error=CalibrationDataError),
    Case("calib_nan", "NaN in the calibration data",
         _calib_case(lambda: {"x": np.where(np.arange(40)[:, None] == 3, np.nan, calib_x())}),
         words=("non-finite", "NaN", "clean or drop"),
         api=_api_calib(lambda: {"x": np.where(np.arange(40)[:, None] == 3, np.nan, calib_x())}),
         error=CalibrationDataError),
    Case("calib_inf", "Inf in the calibration data",
         _calib_case(lambda: {"x": np.where(np.arange(40)[:, None] == 3, np.inf, calib_x())}),
         words=("non-finite", "Inf"),
         api=_api_calib(lambda: {"x": np.where(np.arange(40)[:, None] == 3, -np.inf, calib_x())}),
         error=CalibrationDataError),
    Case("calib_zero_samples", "calibration arrays with zero samples",
         _calib_case(lambda: {"x": np.zeros((0, N_IN), np.float32)}), words=("zero samples",),
         api=_api_calib(lambda: {"x": np.zeros((0, N_IN), np.float32)}), error=CalibrationDataError),
    Case("calib_empty_iterable", "API only: an iterable that yields no feed dicts", None,
         api=_api_calib(lambda: iter([])), error=CalibrationDataError),
    Case("calib_sample_count_mismatch", "two inputs with different sample counts",
         lambda e: _opt(e, e.model(two_input_model()), "--calib",
                        str(e.npz(a=calib_x(40), b=calib_x(30)))),
         words=("different numbers of samples", "'a' has 40", "'b' has 30"),
         api=_api_calib(lambda: {"a": calib_x(40), "b": calib_x(30)}, two_input_model), error=CalibrationDataError),
    Case("labels_wrong_length", "labels with fewer entries than samples",
         _calib_case(lambda: {"x": calib_x(), "labels": np.zeros(39, np.int64)}),
         words=("labels have 39 entries", "40 samples"),
         api=_api_calib(lambda: {"x": calib_x(), "labels": np.zeros(39, np.int64)}), error=CalibrationDataError),
    Case("too_few_samples", "fewer than 10 calibration samples and no evaluation set",
         _calib_case(lambda: {"x": calib_x(5)}), words=("5 samples", "at least 10"),
         api=_api_calib(lambda: {"x": calib_x(5)}), error=CalibrationDataError),
    Case("calib_file_missing", "--calib names a file that does not exist",
         lambda e: _opt(e, e.model(), "--calib", str(e.src / "nope.npz")), words=("does not exist", "nope.npz")),
    Case("calib_not_npz", "--calib names a file that is not an .npz",
         lambda e: (e.src / "c.npz").write_text("a,b\n1,2\n") and [] or
         _opt(e, e.model(), "--calib", str(e.src / "c.npz")), words=("is not an .npz archive", "numpy.savez")),
    Case("calib_dir_without_npy", "--calib names a directory without .npy files",
         lambda e: (e.src / "cd").mkdir() or _opt(e, e.model(), "--calib", str(e.src / "cd")),
         words=("has no .npy files",)),
    Case("eval_data_bad", "evaluation data with the wrong dtype",
         lambda e: _opt(e, e.model(), "--calib", str(e.npz(x=calib_x())), "--eval",
                        str(e.npz("eval.npz", x=np.ones((20, N_IN), np.int32)))),
         words=("evaluation input 'x'", "int32")),
    Case("dynamic_dim_not_fixed_by_data",
         "input [N, F] with symbolic F: the data's F (7) does not fit the weights (6), found when onnxruntime runs",
         lambda e: _opt(e, e.model(dynamic_feature_model()), "--calib",
                        str(e.npz(x=np.zeros((40, 7), np.float32)))),
         words=("onnxruntime failed on the calibration data", "make the data match"),
         api=lambda e: onnxfold.optimize(dynamic_feature_model(), {"x": np.zeros((40, 7), np.float32)},
                                         provider="cpu"), error=CalibrationDataError),
    Case("dynamic_dim_fixed_search_bad_eval",
         "input [N, F]: calibration fits, evaluation data has another F (explicit settings)",
         lambda e: _opt(e, e.model(dynamic_feature_model()), "--calib", str(e.npz(x=calib_x())),
                        "--eval", str(e.npz("eval.npz", x=np.zeros((20, 5), np.float32))), "--fold-ratio", "0.25"),
         words=("onnxruntime failed on the evaluation data",)),
    Case("dynamic_feeds_ragged", "API only: feed dicts whose per-sample shapes differ (a dynamic dim left free)",
         None, api=lambda e: onnxfold.optimize(dynamic_feature_model(), [{"x": calib_x(20)}, {"x": np.zeros((20, 7),
                                                                                       np.float32)}]),
         error=CalibrationDataError),
    # ---- the output
    Case("output_dir_missing", "output in a directory that does not exist",
         lambda e: ["optimize", str(e.model()), "-o", str(e.out / "nodir" / "s.onnx"), *CPU],
         words=("output directory does not exist", "create it first"),
         api=lambda e: onnxfold.optimize(dense_model()).save(e.out / "nodir" / "s.onnx"), error=ModelSaveError),
    Case("output_dir_is_a_file", "output directory path goes through a regular file (read-only even for root)",
         lambda e: ["optimize", str(e.model()), "-o", str(e.src / "m.onnx" / "s.onnx"), *CPU],
         words=("is not a directory", "choose another output path"),
         api=lambda e: onnxfold.optimize(dense_model()).save(e.model() / "s.onnx"), error=ModelSaveError),
    Case("output_dir_read_only", "output under /proc (not writable, even for root)",
         lambda e: ["optimize", str(e.model()), "-o", "/proc/onnxfold-out.onnx", *CPU],
         words=("/proc", "writable"),
         api=lambda e: onnxfold.optimize(dense_model()).save("/proc/onnxfold-out.onnx"), error=ModelSaveError),
    Case("output_is_directory", "output path is an existing directory",
         lambda e: ["optimize", str(e.model()), "-o", str(e.out), *CPU], words=("output path is a directory",),
         api=lambda e: onnxfold.optimize(dense_model()).save(e.out), error=ModelSaveError),
    Case("output_equals_input", "output path equal to the input path",
         lambda e: ["optimize", str(e.model()), "-o", str(e.src / "m.onnx"), *CPU],
         words=("output path equals the input path", "choose another"),
         api=lambda e: onnxfold.optimize(e.model()).save(e.src / "m.onnx"), error=ModelSaveError),
    Case("output_equals_input_relative", "output path equal to the input path, spelled differently",
         lambda e: ["optimize", str(e.model()), "-o", str(e.src / ".." / "src" / "." / "m.onnx"), *CPU],
         words=("output path equals the input path",)),
    Case("report_dir_missing", "--report in a directory that does not exist (checked before any work)",
         lambda e: _opt(e, e.model()) + ["--report", str(e.out / "nodir" / "r.json")],
         words=("report directory does not exist", "create it first")),
    Case("save_fails_midway", "the disk fails while the output is written (OSError half-way)",
         lambda e: _opt(e, e.model()), words=("cannot write", "free space"),
         patches=_interrupt(OSError(28, "No space left on device")),
         api=lambda e: onnxfold.optimize(dense_model()).save(e.o()), error=ModelSaveError),
    Case("save_interrupted", "Ctrl-C while the output is written",
         lambda e: _opt(e, e.model()), code=130, prefix="interrupted", words=("nothing was written",),
         patches=_interrupt(KeyboardInterrupt())),
    # ---- scale-out (--ray)
    Case("calib_shard_bad", "--calib names a directory of .npz shards, one of them with a wrong input name",
         lambda e: _shards(e, {"x": calib_x()}, {"inp": calib_x()}), words=("calibration shard", "b.npz", "missing input 'x'")),
    Case("ray_not_installed", "--ray without Ray installed",
         lambda e: _opt(e, e.model(), "--ray"), words=("needs Ray", "pip install 'onnxfold[ray]'"),
         patches=lambda e: [mock.patch.dict(sys.modules, {"ray": None})],
         api=lambda e: onnxfold.optimize(dense_model(), ray_address="local"), error=RayNotInstalledError),
    Case("ray_unreachable", "--ray HOST:PORT where no Ray cluster listens (checked before Ray retries for minutes)",
         lambda e: _opt(e, e.model(), "--ray", "127.0.0.1:1"), words=("cannot reach the Ray cluster", "ray start")),
    # ---- onnxfold inspect
    Case("inspect_missing_model", "`onnxfold inspect` on a missing file",
         lambda e: ["inspect", str(e.src / "nope.onnx"), "--provider", "cpu", "--no-auto-data"],
         words=("model file not found",), api=lambda e: onnxfold.inspect(e.src / "nope.onnx"), error=ModelLoadError),
    Case("inspect_bad_calib", "`onnxfold inspect` with calibration data of the wrong rank",
         lambda e: ["inspect", str(e.model()), "--calib", str(e.npz(x=calib_x()[:, None])), "--provider", "cpu",
                    "--no-auto-data"],
         words=("rank 3", "expects rank 2"),
         api=lambda e: onnxfold.inspect(dense_model(), {"x": calib_x()[:, None]}), error=CalibrationDataError),
    # ---- options and budgets
    Case("budget_without_data", "a budget flag without calibration data",
         lambda e: _opt(e, e.model(), "--min-agreement", "99"), words=("needs calibration data", "--calib"),
         api=lambda e: onnxfold.optimize(dense_model(), budget=onnxfold.decide.budget.Budget(min_agreement=99.0)),
         error=UsageError),
    Case("fold_heads_without_attention", "--fold-heads on a model without a foldable attention block",
         lambda e: _opt(e, e.model(), "--fold-heads", "2"), words=("no foldable attention block",),
         api=lambda e: onnxfold.optimize(dense_model(), fold_heads=2), error=UsageError),
    Case("accuracy_budget_without_labels", "--max-accuracy-drop with data that has no labels",
         _calib_case(lambda: {"x": calib_x()}, "--max-accuracy-drop", "1"), words=("needs labels", "'labels'")),
    Case("batch_size_zero", "--batch-size 0",
         _calib_case(lambda: {"x": calib_x()}, "--batch-size", "0"), words=("batch size must be a positive integer",)),
    Case("budget_cannot_be_met", "a budget no candidate meets, with --check (the unchanged model is written)",
         _calib_case(lambda: {"x": calib_x()}, "--target-ratio", "0.01", "--min-agreement", "100", "--check"),
         code=1, prefix="budget not met:", words=("no candidate met the budget",), out_files=("small.onnx",)),
    # ---- no-ops that must succeed
    Case("no_dense_chain", "a model without any dense chain: a no-op with a note, output = input",
         lambda e: _opt(e, e.model(no_chain_model()), "--calib", str(e.npz(x=calib_x()))),
         code=0, prefix="", out_files=("small.onnx",)),
    Case("unknown_ops_around_chains", "Softplus/Transpose before and after the chains: the chains are still optimized",
         lambda e: _opt(e, e.model(unknown_ops_around_model())), code=0, prefix="", out_files=("small.onnx",)),
    Case("custom_op_known_to_ort", "a com.microsoft op between chains: kept untouched, the other chains optimized",
         # 1600 samples: the final check's 480 resolve the 99 % error quantile at 95 % confidence (299 needed)
         lambda e: _opt(e, e.model(with_custom_op("com.microsoft", "Gelu")), "--calib", str(e.npz(x=calib_x(1600))),
                        "--linear-threshold", "1.0", "--max-error", "1000"),
         code=0, prefix="", out_files=("small.onnx",)),
]

CLI_CASES = [c for c in CASES if c.setup is not None]
ERROR_CASES = [c for c in CLI_CASES if c.code != 0]
API_CASES = [c for c in CASES if c.api is not None]


# --------------------------------------------------------------------------
# running a case


def _hash_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def make_env(root: Path) -> Env:
    env = Env(root, root / "src", root / "out")
    env.src.mkdir(parents=True)
    env.out.mkdir()
    return env


def run_case(case: Case, env: Env) -> tuple[int, dict, dict]:
    """(exit code, src hashes after setup, src hashes after the run); stderr is left to the caller."""
    argv = case.setup(env)
    before = _hash_tree(env.src)
    with contextlib.ExitStack() as stack:
        for p in (case.patches(env) if case.patches else []):
            stack.enter_context(p)
        code = main(argv)
    return code, before, _hash_tree(env.src)


def check_stderr(case: Case, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case.code == 0:
        assert not lines, err
        return ""
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith(case.prefix), line
    for w in case.words:
        assert w in line, f"{w!r} not in {line!r}"
    assert "Traceback" not in line and "[ONNXRuntimeError]" not in line
    if case.prefix == "error:":  # the problem, then the fix
        assert any(sep in line for sep in ("; ", ": pass ", ": add ")), f"no fix named in {line!r}"
    return line


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_case(case: Case, tmp_path, capfd):
    env = make_env(tmp_path)
    code, before, after = run_case(case, env)
    out, err = capfd.readouterr()
    assert code == case.code, err
    check_stderr(case, err)
    assert after == before, "the input directory changed"
    assert sorted(p.name for p in env.out.iterdir()) == sorted(case.out_files)
    assert not [p for p in Path(tmp_path).rglob("*.tmp*")]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_case(case: Case, tmp_path):
    env = make_env(tmp_path)
    snapshot = _hash_tree(env.src)
    with pytest.raises(OnnxFoldError) as info, contextlib.ExitStack() as stack:
        for p in (case.patches(env) if case.patches else []):
            stack.enter_context(p)
        case.api(env)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert "\n" not in str(info.value)
    assert not list(env.out.iterdir())
    now = _hash_tree(env.src)
    assert all(now.get(k) == v for k, v in snapshot.items())


def test_enough_cases():
    assert len(ERROR_CASES) >= 30


# --------------------------------------------------------------------------
# the no-op / partial cases in more detail


def test_no_dense_chain_output_equals_input(tmp_path):
    m = no_chain_model()
    res = onnxfold.optimize(m, {"x": calib_x()}, provider="cpu")
    assert not res.changed and res.report["status"] == "unchanged"
    assert any("no dense" in n for n in res.report["notes"])
    out = res.save(tmp_path / "o.onnx")
    saved = onnx.load(str(out))
    assert saved.graph.SerializeToString() == m.graph.SerializeToString()
    x = calib_x()
    np.testing.assert_array_equal(ort_run(saved, x)[0], ort_run(m, x)[0])
    res2 = onnxfold.optimize(m, provider="cpu")  # data-free: same
    assert not res2.changed and res2.report["status"] == "unchanged"


def test_unknown_ops_around_chains_are_kept_and_chain_rewritten():
    m = unknown_ops_around_model()
    res = onnxfold.optimize(m, provider="cpu")
    assert res.changed
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Softplus") == 2 and ops.count("Transpose") == 2
    assert res.report["after"]["parameters"] < res.report["before"]["parameters"]
    x = calib_x()
    np.testing.assert_allclose(ort_run(res.model, x)[0], ort_run(m, x)[0], rtol=1e-5, atol=1e-5)


def test_custom_op_data_free_rewrites_chains_keeps_node(tmp_path):
    """Decided behaviour: onnxfold rewrites the standard chains (exact, data-free)
    and leaves the custom node untouched; ``save`` refuses the output because
    onnxruntime cannot load it (ModelSaveError, one line, naming the unchecked
    save as the way out). Saving unchecked writes the rewritten model."""
    m = with_custom_op("com.example", "MyOp")
    res = onnxfold.optimize(m, provider="cpu")
    assert res.changed
    custom = [n for n in res.model.graph.node if n.domain == "com.example"]
    orig = [n for n in m.graph.node if n.domain == "com.example"]
    assert [c.SerializeToString() for c in custom] == [c.SerializeToString() for c in orig]
    assert res.report["after"]["parameters"] < res.report["before"]["parameters"]
    onnx.checker.check_model(res.model)
    with pytest.raises(ModelSaveError, match="check=False"):
        res.save(tmp_path / "o.onnx")
    assert not list(tmp_path.iterdir())
    out = fio.save_model(res.model, tmp_path / "o.onnx", check=False)
    assert [n.op_type for n in onnx.load(str(out)).graph.node if n.domain == "com.example"] == ["MyOp"]


def test_custom_op_known_to_ort_is_kept_and_output_matches(tmp_path):
    m = with_custom_op("com.microsoft", "Gelu")
    x = calib_x(200, seed=3)
    res = onnxfold.optimize(m, {"x": x}, provider="cpu", linear_threshold=1.0)
    nodes = [n for n in res.model.graph.node if n.domain == "com.microsoft"]
    assert len(nodes) == 1 and nodes[0].op_type == "Gelu"
    assert res.report["after"]["parameters"] < res.report["before"]["parameters"]
    out = res.save(tmp_path / "o.onnx")
    np.testing.assert_allclose(ort_run(onnx.load(str(out)), x)[0], ort_run(m, x)[0], rtol=1e-4, atol=1e-4)


def test_budget_not_met_api_and_output_is_original(tmp_path):
    from onnxfold.decide.budget import Budget

    m = dense_model()
    res = onnxfold.optimize(m, {"x": calib_x()}, provider="cpu",
                            budget=Budget(min_agreement=100.0, target_ratio=0.01))
    assert res.report["status"] == "budget_not_met" and not res.changed
    assert res.model.graph.SerializeToString() == m.graph.SerializeToString()
    assert issubclass(BudgetNotMetError, OnnxFoldError) and BudgetNotMetError.exit_code == 1


def test_api_save_over_the_input_is_refused(tmp_path):
    env = make_env(tmp_path)
    p = env.model()
    before = _hash_tree(env.src)
    res = onnxfold.optimize(p, provider="cpu")
    assert res.changed
    with pytest.raises(ModelSaveError, match="equals the input path"):
        res.save(env.src / ".." / "src" / "m.onnx")
    assert _hash_tree(env.src) == before


def test_verbose_adds_traceback(tmp_path, capfd):
    env = make_env(tmp_path)
    assert main(["optimize", str(env.src / "nope.onnx"), *CPU, "--verbose"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: model file not found")


def test_unexpected_exception_is_internal_error_exit_3(tmp_path, capfd):
    env = make_env(tmp_path)
    p = env.model()
    with mock.patch("onnxfold.api.find_groups", side_effect=RuntimeError("boom")):
        code = main(_opt(env, p))
    err = capfd.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and err.startswith("internal error: RuntimeError: boom")
    assert not list(env.out.iterdir())


# --------------------------------------------------------------------------
# docs/errors.md


def _shorten(line: str, env: Env) -> str:
    return line.replace(str(env.src), "src").replace(str(env.out), "out").replace(str(env.root), ".")


def render_doc() -> str:
    import tempfile

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            env = make_env(Path(tmp))
            api = f"`{case.error.__name__}`" if case.error else ""
            if case.setup is None:  # API only: the exception's message
                try:
                    case.api(env)
                except OnnxFoldError as e:
                    code, msg = "-", f"(API) {_shorten(str(e), env)}"
            else:
                buf = io.StringIO()
                with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
                    code, _, _ = run_case(case, env)
                lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
                msg = _shorten(lines[0], env) if lines else "(nothing on stderr; exit 0)"
        rows.append(f"| `{case.id}` | {case.what} | {code} | {api} | {msg.replace('|', '/')} |")
    head = [
        "# Errors: what onnxfold says when the input is wrong",
        "",
        "Generated by `python tests/test_bad_inputs.py` from the cases in `tests/test_bad_inputs.py`, which",
        "assert every row: the exit code, that stderr is exactly this one line (`--verbose` adds the",
        "traceback), that the input files are unchanged and that nothing (no output, no temporary file) was",
        "written - except the exit-0/1 rows, which write exactly the output. `-`: an API-only case (the",
        "exception's message). Paths are shortened (`src/` holds the inputs, `out/` is the output directory). The API",
        "column is the `onnxfold.OnnxFoldError` subclass `onnxfold.optimize` / `result.save` raise for the",
        "same case (all have `exit_code` 2 except `BudgetNotMetError`, 1).",
        "",
        "Exit codes: 0 success, 1 a check failed (`--check`, budget not met), 2 bad input or usage,",
        "3 internal error (a bug), 130 interrupted.",
        "",
        "Decided behaviours:",
        "",
        "* **Custom-domain ops onnxruntime cannot run** (`custom_op_unknown_to_ort_*`): with calibration data the",
        "  model cannot be run, so it is refused up front. Without data, the standard chains around the custom",
        "  node are rewritten exactly (provably dead/linear neurons) and the custom node is kept byte-for-byte,",
        "  but onnxfold only writes outputs that load in onnxruntime, so the save is refused with one line;",
        "  `onnxfold.io.save_model(result.model, path, check=False)` writes it unchecked from Python. Ops from",
        "  domains onnxruntime implements (e.g. `com.microsoft`) are kept untouched and everything else is",
        "  optimized normally (`custom_op_known_to_ort`).",
        "* **Budget not met** with `--check`: exit 1, and the output is never a model known to miss the budget:",
        "  the unchanged original when no candidate met it (`budget_not_met`), the lossless model or the original",
        "  when the chosen one failed the final check (`final_check_failed`); it *is* written. Without `--check`",
        "  the same output with a warning line and exit 0 (docs/statistics.md).",
        "* **No dense chain**: exit 0, the output is the input model unchanged, the report notes why.",
        "* **Dynamic dims**: data is checked against every fixed dim up front; a symbolic dim the weights fix",
        "  is only found when onnxruntime runs the original model on the data, and is reported as a data error",
        "  (never as an internal error).",
        "* **Interrupted save**: the output is written in a temporary directory inside the output directory and",
        "  renamed into place only after it passed the checks; on any failure (or Ctrl-C) the directory is",
        "  removed, so nothing is left.",
        "",
        "| case | situation | exit | API error | message (stderr) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def test_docs_table_lists_every_case():
    text = DOC.read_text()
    for case in CASES:
        assert f"| `{case.id}` |" in text, f"docs/errors.md lacks case {case.id}: run python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_doc())
    print(f"wrote {DOC}")
