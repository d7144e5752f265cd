"""ActivationSpec.apply computes smooth activations as onnxruntime does: in
the tensor's float32, compared with onnxruntime's own Gelu on inline models."""

import numpy as np
import pytest
from onnx import helper

from onnxfold.find.activations import ActivationSpec
from helpers import OPSET_GELU, activation_model, make_model, ort_run, tensor_info


def _z(shape=(400, 64), seed=0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)
    z[0, :8] = [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 6.0, -6.0]  # zeros, tiny, saturated
    return z


def _gelu_tanh_model(n: int):
    node = helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")
    return make_model([node], [tensor_info("x", np.float32, ["N", n])], [tensor_info("y", np.float32, ["N", n])],
                      opset=OPSET_GELU)


@pytest.mark.parametrize("kind", ["gelu", "gelu_erf", "gelu_tanh"])
def test_gelu_matches_onnxruntime_in_float32(kind):
    z = _z()
    model = _gelu_tanh_model(z.shape[1]) if kind == "gelu_tanh" else activation_model(kind, z.shape[1])[0]
    (expected,) = ort_run(model, z)
    got = ActivationSpec("gelu_tanh" if kind == "gelu_tanh" else "gelu").apply(z)
    assert got.dtype == np.float32 and got.shape == z.shape
    # a few float32 ulps of x: 0.5 x (1 + erf) cancels where erf is near -1, in float32 as in onnxruntime
    assert np.all(np.abs(got - expected) <= 8 * np.finfo(np.float32).eps * np.maximum(np.abs(z), 1.0))


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
def test_gelu_keeps_the_input_dtype_and_does_not_modify_it(kind):
    z = _z((50, 9), seed=1)
    before = z.copy()
    spec = ActivationSpec(kind)
    assert spec.apply(z).dtype == np.float32
    np.testing.assert_array_equal(z, before)
    z64 = z.astype(np.float64)
    y64 = spec.apply(z64)
    assert y64.dtype == np.float64
    # float64 input is computed in float64: closer to the exact value than float32 can be
    from math import erf, sqrt, tanh, pi
    exact = np.vectorize((lambda v: 0.5 * v * (1 + erf(v / sqrt(2)))) if kind == "gelu"
                         else (lambda v: 0.5 * v * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 * v**3)))))(z64)
    np.testing.assert_allclose(y64, exact, rtol=1e-12, atol=1e-15)
    assert spec.apply(z.astype(np.float16)).dtype == np.float16
