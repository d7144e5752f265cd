"""Property tests: the exact passes on random dense graphs (hypothesis).

The generator and the properties are the ones of ``tools/fuzz.py`` (which runs
thousands of graphs outside CI): random depth and widths, Gemm (transB 0/1,
alpha/beta) or MatMul+Add, 2-D or 3-D inputs, relu / leaky_relu / prelu / clip
and (for folding) gelu / silu / tanh / sigmoid, random biases, Constant-node
weights, and hidden rows planted always-on / never-on / provably constant so
the rewrites really happen. For every graph:

* LinearityPass(threshold=1.0) with data, LinearityPass without data (also on
  10x larger inputs), FoldingPass(ratio=0.0) without data and
  FoldingPass(ratio=0.0, drop_constant=True) with data keep the outputs on the
  calibration data within 1e-5 relative;
* every pass output passes onnx.checker (full check) and runs in onnxruntime;
* optimize twice with the same seed saves byte-identical files.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from random_graphs import ACTIVATIONS, PIECEWISE, check_graph, random_graph

FORM_RANK = [("gemm", 2), ("gemm_transB0", 2), ("matmul", 2), ("matmul", 3)]


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), form_rank=st.sampled_from(FORM_RANK), activation=st.sampled_from(ACTIVATIONS),
       const_nodes=st.booleans())
def test_exact_passes_keep_outputs(seed, form_rank, activation, const_nodes):
    form, rank = form_rank
    g = random_graph(seed, form=form, rank=rank, activation=activation, const_nodes=const_nodes)
    changed = check_graph(g, determinism=False)
    if activation in PIECEWISE and not changed["linearity T=1.0 (data)"]:
        # planted always-on/off rows: the exact linearity rewrite must fire, unless it would not pay off
        from onnxfold.measure.data import load_calibration
        from onnxfold.passes.base import PassContext
        from onnxfold.passes.linearity import LinearityPass

        res = LinearityPass(threshold=1.0)(g.model, PassContext(calibration=load_calibration({"x": g.x}, g.model)))
        assert all("would not save parameters" in layer.note for layer in res.layers), g.desc


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), form_rank=st.sampled_from(FORM_RANK),
       activation=st.sampled_from(("relu", "gelu", "prelu", "silu")))
def test_optimize_twice_same_seed_is_byte_identical(seed, form_rank, activation, tmp_path_factory):
    form, rank = form_rank
    g = random_graph(seed, form=form, rank=rank, activation=activation)
    check_graph(g, determinism=True, tmpdir=tmp_path_factory.mktemp("det"))


def test_cli_twice_same_seed_is_byte_identical(tmp_path):
    """Through the CLI (search mode, the default), same seed -> same bytes."""
    import onnx

    from onnxfold.cli import main

    g = random_graph(3, form="gemm", activation="relu")
    src = tmp_path / "m.onnx"
    onnx.save_model(g.model, str(src))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=g.x)
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        assert main(["optimize", str(src), "--calib", str(calib), "-o", str(out), "--provider", "cpu", "--quiet",
                     "--no-latency", "--seed", "5"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_once(activation):
    """A fixed seed per activation, so a regression names the activation."""
    check_graph(random_graph(1000 + ACTIVATIONS.index(activation), activation=activation), determinism=False)
