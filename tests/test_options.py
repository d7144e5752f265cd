"""The typed options object: one place for optimize()'s settings, grouped like the CLI."""

from dataclasses import fields

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfold
from onnxfold.cli import build_parser, options_from_args
from onnxfold.decide.budget import Budget
from onnxfold.errors import UsageError
from onnxfold.options import (
    KEYWORDS,
    FoldOptions,
    LinearityOptions,
    OptimizeOptions,
    RuntimeOptions,
    SearchOptions,
)


def _mlp(seed: int = 0, hidden: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(4, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(hidden, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_every_group_field_has_exactly_one_keyword():
    opts = OptimizeOptions()
    pairs = {(g.name, f.name) for g in fields(opts) for f in fields(getattr(opts, g.name))}
    assert sorted(KEYWORDS.values()) == sorted(pairs)
    assert len(set(KEYWORDS.values())) == len(KEYWORDS)


def test_keywords_go_to_their_groups_and_back():
    opts = OptimizeOptions().with_keywords(fold_ratio=0.4, fold_select="magnitude", seed=3, linear=False,
                                           max_evaluations=7, provider="cpu", latency=True)
    assert opts.fold == FoldOptions(ratio=0.4, select="magnitude")
    assert opts.runtime == RuntimeOptions(provider="cpu", seed=3)
    assert opts.linearity == LinearityOptions(enabled=False)
    assert opts.search == SearchOptions(max_evaluations=7)
    assert opts.report.latency is True
    assert OptimizeOptions().with_keywords(**opts.keywords()) == opts


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="fold_ration"):
        OptimizeOptions().with_keywords(fold_ration=0.5)


@pytest.mark.parametrize("kw, words", [
    (dict(fold_ratio=1.5), "fold ratio must be a number in [0, 1)"),
    (dict(fold_ratio={"layer0": -0.1}), "fold ratio for layer0"),
    (dict(fold_select="largest"), "unknown fold selection 'largest'"),
    (dict(fold_repair="magic"), "unknown fold repair 'magic'"),
    (dict(fold_heads=0), "heads must be a head count"),
    (dict(fold_heads=2, fold_kv_heads=1.5), "kv heads must be a head count"),
    (dict(fold_kv_heads=1), "kv heads need heads too"),
    (dict(linear_threshold=0.3), "linear threshold must be in (0.5, 1]"),
    (dict(linear_mode="fast"), "unknown linear mode 'fast'"),
    (dict(provider="tpu"), "unknown provider 'tpu'"),
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(max_evaluations=0), "max evaluations must be a positive integer"),
    (dict(budget="99%"), "budget must be an onnxfold Budget"),
])
def test_bad_values_are_one_line_before_any_work(kw, words, tmp_path):
    missing = tmp_path / "does_not_exist.onnx"  # validation comes first: the missing file is not the error
    with pytest.raises(UsageError) as e:
        onnxfold.optimize(missing, **kw)
    assert words in str(e.value) and "\n" not in str(e.value) and "; " in str(e.value)


def test_options_object_and_flat_keywords_give_the_same_run():
    model = _mlp()
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    data = {"x": x}
    by_kw = onnxfold.optimize(model, data, fold_ratio=0.5, fold_repair="ar", provider="cpu", seed=2)
    opts = OptimizeOptions(fold=FoldOptions(ratio=0.5, repair="ar"), runtime=RuntimeOptions(provider="cpu", seed=2))
    by_opts = onnxfold.optimize(model, data, options=opts)
    assert by_kw.report["settings"] == by_opts.report["settings"]
    assert by_kw.report["settings"]["fold_ratio"] == 0.5 and by_kw.report["settings"]["seed"] == 2
    assert by_kw.model.SerializeToString() == by_opts.model.SerializeToString()
    # keywords override the object's groups field by field
    mixed = OptimizeOptions(fold=FoldOptions(ratio=0.25, repair="ar")).with_keywords(fold_ratio=0.5)
    assert mixed.fold == FoldOptions(ratio=0.5, repair="ar")


def test_the_callers_budget_is_not_modified():
    budget = Budget(min_agreement=90.0)
    assert budget.positive_threshold is None
    model = _mlp()
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    onnxfold.optimize(model, {"x": x}, budget=budget, positive_threshold=0.7, provider="cpu", max_evaluations=2)
    assert budget.positive_threshold is None


def test_cli_option_groups_map_to_option_groups():
    args = build_parser().parse_args([
        "optimize", "m.onnx", "--fold-ratio", "layer0=0.3", "--fold-select", "magnitude", "--fold-repair", "ar",
        "--fold-heads", "4", "--fold-kv-heads", "0.5", "--fold-residual", "--no-linear", "--linear-mode", "paper", "--linear-path", "svd",
        "--provider", "cpu", "--batch-size", "32", "--seed", "5", "--max-evaluations", "9",
        "--positive-threshold", "0.4", "--no-latency", "--profile-memory", "--ray", "--ray-workers", "2",
        "--memo-mib", "0"])
    budget = Budget(min_agreement=99.0)
    opts = options_from_args(args, budget)
    assert opts.linearity == LinearityOptions(enabled=False, threshold=None, mode="paper", path="svd")
    assert opts.fold == FoldOptions(ratio={"layer0": 0.3}, select="magnitude", repair="ar", heads=4, residual=True,
                                    kv_heads=0.5)
    assert opts.search == SearchOptions(budget=budget, positive_threshold=0.4, max_evaluations=9)
    assert opts.runtime == RuntimeOptions(provider="cpu", batch_size=32, seed=5, ray_address="local", ray_workers=2,
                                          memo_mib=0)
    assert opts.runtime.memo_bytes == 0 and RuntimeOptions().memo_bytes == 1 << 30
    assert (opts.report.latency, opts.report.profile_memory) == (False, True)
    assert opts.explicit
    assert not options_from_args(build_parser().parse_args(["optimize", "m.onnx"]), None).explicit
