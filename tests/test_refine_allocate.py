"""Sensitivity allocation of one fold ratio, and the nonlinear refinement of folded layers.

Tiny MLPs built inline, compared with onnxruntime on data the decisions never
saw (the same inputs as tests/test_downstream_refit.py)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers import build_mlp, ort_run
from onnxfold.decide.allocation import allocate_by_sensitivity
from onnxfold.errors import UsageError
from onnxfold.measure.data import CalibrationSet
from onnxfold.passes.base import PassContext
from onnxfold.passes.downstream import DownstreamRefitPass
from onnxfold.passes.folding import FoldingPass
from test_downstream_refit import _ctx, _error, _inputs, _post_norm_block, _scaled_rows, _weights


# ---------------------------------------------------------------- allocation


def test_allocation_is_inverse_to_the_losses_and_removes_as_many_units():
    widths = {"a": 100, "b": 100, "c": 50}
    losses = {"a": 1.0, "b": 2.0, "c": 4.0}
    r = allocate_by_sensitivity(widths, losses, 0.3)
    # r ∝ 1/loss: a removes twice b's share, four times c's
    assert r["a"] == pytest.approx(2 * r["b"]) and r["a"] == pytest.approx(4 * r["c"])
    # the same number of units as 0.3 of every layer: 75
    assert sum(widths[k] * r[k] for k in widths) == pytest.approx(0.3 * 250)
    # equal losses: the ratio itself everywhere
    assert allocate_by_sensitivity(widths, {k: 3.0 for k in widths}, 0.3) == pytest.approx({k: 0.3 for k in widths})


def test_allocation_caps_a_layer_and_passes_the_rest_on():
    widths = {"a": 10, "b": 10, "c": 10}
    # a is nearly free: uncapped it would take 3 × 0.5 = 1.5 of its units
    r = allocate_by_sensitivity(widths, {"a": 1e-9, "b": 1.0, "c": 1.0}, 0.5, cap=0.9)
    assert r["a"] == pytest.approx(0.9)
    assert r["b"] == pytest.approx(r["c"]) == pytest.approx((15 - 9) / 20)
    # a loss of zero takes the cap; when every layer is capped, no more than the caps go
    assert allocate_by_sensitivity(widths, {"a": 0.0, "b": 1.0, "c": 1.0}, 0.5, cap=0.9)["a"] == 0.9
    assert allocate_by_sensitivity({"a": 10}, {"a": 0.0}, 0.5, cap=0.6) == {"a": 0.6}
    with pytest.raises(ValueError):
        allocate_by_sensitivity(widths, {"a": 1.0, "b": 1.0, "c": 1.0}, 1.0)


def _redundant_first_layer() -> onnx.ModelProto:
    """x (8) → fc0 (24 tanh units: 6 distinct rows, each 4 times) → fc1 (24 distinct) → fc2 → y (4):
    folding layer0 down to 6 loses nothing, folding layer1 does."""
    model = build_mlp([8, 24, 24, 4], "tanh", form="matmul", seed=3, weight_scale=2.0)
    for t in model.graph.initializer:
        if t.name == "fc0.B":  # in × out
            w = numpy_helper.to_array(t).copy()
            w[:] = np.tile(w[:, :6], 4)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
        if t.name == "fc0.bias":
            b = numpy_helper.to_array(t).copy()
            b[:] = np.tile(b[:6], 4)
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    return model


def test_sensitivity_allocation_folds_the_layer_that_costs_less():
    model = _redundant_first_layer()
    calib, test = _inputs(3000, 8, seed=1), _inputs(2000, 8, seed=2)
    uniform = FoldingPass(0.3, select="obs", repair="ls", seed=0)(model, _ctx(calib))
    res = FoldingPass(0.3, select="obs", repair="ls", seed=0, allocate="sensitivity")(model, _ctx(calib))
    widths = {lr.layer: lr.width_after for lr in res.layers}
    # as many neurons removed as the uniform ratio removes (round(24 · 0.7) = 17 kept in each)
    assert sum(widths.values()) == sum(lr.width_after for lr in uniform.layers) == 34
    # the duplicated layer gives up all of it (the probes: layer0 costs nothing, layer1 does), and still
    # keeps its 6 distinct units: nothing is lost, where the uniform fold lost some of layer1
    assert widths == {"layer0": 10, "layer1": 24}, widths
    assert any("allocated by sensitivity" in n for n in res.notes)
    assert _error(res.model, model, test) < 1e-3 * _error(uniform.model, model, test)


def test_sensitivity_allocation_needs_one_ratio_and_data():
    from onnxfold import optimize

    model = _redundant_first_layer()
    with pytest.raises(UsageError, match="allocat"):
        FoldingPass(0.3, allocate="biggest")
    with pytest.raises(UsageError, match="calibration data"):
        FoldingPass(0.3, repair="ar", allocate="sensitivity")(model, PassContext())
    with pytest.raises(UsageError, match="one --fold-ratio"):
        optimize(model, CalibrationSet({"x": _inputs(200, 8, 1)}), fold_ratio={"layer0": 0.3},
                 fold_allocate="sensitivity", latency=False)


# ---------------------------------------------------------------- refinement

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the refinement needs PyTorch (the test extra installs it)")


@needs_torch
def test_refine_lowers_the_error_on_unseen_data_and_changes_only_the_folded_chain():
    from onnxfold.passes.refine import BlockRefinePass, refine_targets

    model = build_mlp([8, 24, 16, 16, 4], "tanh", form="matmul", seed=3, weight_scale=2.0)
    calib, test = _inputs(3000, 8, seed=1), _inputs(2000, 8, seed=2)
    folded = FoldingPass({"layer0": 0.5}, select="obs", repair="ls", seed=0)(model, _ctx(calib)).model
    refit = DownstreamRefitPass(keep="always", reference=model)(folded, _ctx(calib)).model
    targets, skipped = refine_targets(refit, model)
    assert [t.chain for t in targets] == ["layer0"] and not skipped  # layer1 and layer2 were not folded
    res = BlockRefinePass(epochs=30, keep="always", reference=model)(refit, _ctx(calib))
    assert res.changed and "layer0: held-out loss" in res.notes[0]
    # fc0 and fc1 trained together: closer to the original on unseen inputs than the least-squares refits
    # left it (measured 1.1 % lower; the refits already fit fc1 alone exactly)
    assert _error(res.model, model, test) < 0.995 * _error(refit, model, test)
    for name in ("fc0", "fc1"):
        assert not np.array_equal(_weights(res.model, name), _weights(refit, name))
    for name in ("fc2", "fc3"):
        np.testing.assert_array_equal(_weights(res.model, name), _weights(refit, name))


@needs_torch
def test_refine_fits_a_post_norm_block_to_the_normalised_output():
    from onnxfold.passes.refine import BlockRefinePass, refine_targets

    model = _post_norm_block()
    calib, test = _scaled_rows(4000, seed=1), _scaled_rows(3000, seed=2)
    folded = FoldingPass({"layer0": 0.5}, select="obs", repair="ls", seed=0)(model, _ctx(calib)).model
    refit = DownstreamRefitPass(keep="always", reference=model)(folded, _ctx(calib)).model
    [t], _ = refine_targets(refit, model)
    # fc1 is added to x and the sum only normalised: the original's sum less x, rows weighed by 1 / variance
    assert t.residual == ("s", "x") and t.weighting == "variance"
    res = BlockRefinePass(epochs=30, keep="always", reference=model)(refit, _ctx(calib))
    # measured 5.3 % lower than the refits alone
    assert _error(res.model, model, test) < 0.97 * _error(refit, model, test)


@needs_torch
def test_refine_keeps_a_model_it_does_not_improve_and_says_so():
    from onnxfold.passes.refine import BlockRefinePass

    model = build_mlp([8, 24, 16, 4], "tanh", form="matmul", seed=3, weight_scale=2.0)
    calib = _inputs(3000, 8, seed=1)
    # nothing folded: nothing to refine, the model comes back as it was
    res = BlockRefinePass(epochs=5, reference=model)(model, _ctx(calib))
    assert not res.changed and res.model is model
    # a learning rate so small that no epoch lowers the held-out loss: the chain keeps its weights
    folded = FoldingPass({"layer0": 0.5}, select="obs", repair="ls", seed=0)(model, _ctx(calib)).model
    res = BlockRefinePass(epochs=1, lr=1e-12, reference=model)(folded, _ctx(calib))
    assert not res.changed and res.model is folded
    assert "layer0: kept (the held-out loss did not fall)" in res.notes[0]
    with pytest.raises(ValueError):
        BlockRefinePass(epochs=-1)


def test_refine_without_torch_is_one_clear_error(monkeypatch):
    from onnxfold.passes.refine import BlockRefinePass

    model = build_mlp([8, 24, 16, 4], "tanh", form="matmul", seed=3, weight_scale=2.0)
    calib = _inputs(600, 8, seed=1)
    folded = FoldingPass({"layer0": 0.5}, select="obs", repair="ls", seed=0)(model, _ctx(calib)).model
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(UsageError, match=r"needs PyTorch: pip install 'onnxfold\[refine\]'"):
        BlockRefinePass(epochs=2, reference=model)(folded, _ctx(calib))


@needs_torch
def test_refine_epochs_through_optimize_and_the_cli(tmp_path):
    from onnxfold import optimize
    from onnxfold.cli import main

    model = build_mlp([8, 24, 16, 4], "tanh", form="matmul", seed=3, weight_scale=2.0)
    calib = CalibrationSet({"x": _inputs(2000, 8, seed=1)})
    res = optimize(model, calib, fold_ratio=0.5, fold_select="obs", refine_epochs=20, latency=False)
    assert res.report["settings"]["refine_epochs"] == 20
    assert any(n.startswith("refine: ") for n in res.report["notes"])
    with pytest.raises(UsageError, match="give --fold-ratio too"):
        optimize(model, calib, refine_epochs=3, latency=False)
    with pytest.raises(UsageError, match="whole number"):
        optimize(model, calib, fold_ratio=0.5, refine_epochs=1.5, latency=False)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=_inputs(2000, 8, seed=1))
    out = tmp_path / "out.onnx"
    rc = main(["optimize", str(path), "--calib", str(tmp_path / "calib.npz"), "--fold-ratio", "0.5",
               "--fold-select", "obs", "--fold-allocate", "sensitivity", "--refine-epochs", "5", "-o", str(out),
               "--no-latency"])
    assert rc == 0 and out.exists()
    (y,), (y0,) = ort_run(onnx.load(out), _inputs(50, 8, seed=3)), ort_run(model, _inputs(50, 8, seed=3))
    assert y.shape == y0.shape


@needs_torch
@pytest.mark.parametrize("spec", [dict(kind="relu"), dict(kind="leaky_relu", alpha=0.2),
                                  dict(kind="prelu", slope=np.array([0.1, 0.3, 0.5])),
                                  dict(kind="clip", lo=-0.5, hi=0.7), dict(kind="clip"), dict(kind="sigmoid"),
                                  dict(kind="tanh"), dict(kind="silu"), dict(kind="gelu"), dict(kind="gelu_tanh"),
                                  dict(kind="identity")], ids=lambda s: s["kind"])
def test_every_activation_trains_as_onnxruntime_computes_it(spec):
    import torch

    from onnxfold.find.activations import ActivationSpec
    from onnxfold.passes.refine import torch_activation

    z = np.random.default_rng(0).normal(scale=2.0, size=(50, 3)).astype(np.float32)
    act = ActivationSpec(**spec)
    np.testing.assert_allclose(torch_activation(act)(torch.from_numpy(z)).numpy(), act.apply(z), rtol=1e-5,
                               atol=1e-6)
