"""The JSON report: written by the CLI, read back, keys as the README documents them."""

import json
import re
import shutil
from pathlib import Path

import pytest

from onnxfold.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    for suffix in (".onnx", ".calib.npz", ".test.npz"):
        shutil.copy(ROOT / "models" / f"digits_mlp{suffix}", d / f"digits_mlp{suffix}")
    rep = d / "report.json"
    assert main(["optimize", str(d / "digits_mlp.onnx"), "--fold-ratio", "0.25", "--report", str(rep),
                 "--quiet", "--provider", "cpu", "--profile-memory"]) == 0
    return json.loads(rep.read_text())


def _documented_keys() -> set[str]:
    """Top-level keys named in the README's report-schema table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Report schema", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            keys.update(k.rstrip("[]") for k in re.findall(r"`([a-z_\[\]]+)`", first_cell))
    return keys


def test_memory_profile_has_a_peak_per_stage(report):
    mem = report["memory"]
    stages = mem["stage_peak_rss_bytes"]
    assert {"load", "calibration", "decide", "verify", "save"} <= set(stages)
    # sampled stage peaks can only be at or below the process high-water mark
    assert all(0 < v <= mem["peak_rss_bytes"] for v in stages.values())


def test_every_report_key_is_documented_and_vice_versa(report):
    assert set(report) == _documented_keys()


def test_report_contents(report):
    assert report["schema_version"] == 1
    # explicit settings are returned as asked; 397 test samples cannot show the default budget
    # (0.5 % disagreement at 95 % confidence needs 598) for a model that changed some outputs
    assert report["status"] == "budget_not_met_on_evaluation"
    assert report["settings"]["mode"] == "fixed"
    (limit,) = report["budget"]["limits"]
    assert limit["kind"] == "agreement" and limit["needed"] == 598 and limit["resolved"] is False
    assert report["budget"]["confidence"] == 0.95 and "fallback" not in report["budget"]
    split = report["settings"]["split"]
    assert split["fit"] + split["select"] == report["settings"]["calibration_samples"]
    assert split["final"] == report["settings"]["evaluation_samples"]
    for side in ("before", "after"):
        s = report[side]
        assert {"parameters", "bytes", "dense_flops_per_row", "hidden_widths"} <= set(s)
    assert abs(report["ratios"]["parameters"] - report["after"]["parameters"] / report["before"]["parameters"]) < 1e-12
    assert len(report["layers"]) == 3
    for lr in report["layers"]:
        assert lr["kind"] == "neuron"
        assert {"layer", "producer", "activation", "width_before", "width_after", "linear", "constant", "merged",
                "pruned", "path_form", "path_rank", "params_before", "params_after", "note"} <= set(lr)
        assert lr["width_after"] <= lr["width_before"]
    assert report["after"]["hidden_widths"] == {lr["layer"]: lr["width_after"] for lr in report["layers"]}
    v = report["verification"]["outputs"]["logits"]
    assert v["kind"] == "classifier" and 0 <= v["agreement"] <= 1
    assert {"max_abs_error", "mean_abs_error", "relative_max_error", "accuracy_original", "accuracy_candidate",
            "accuracy_drop_pp"} <= set(v)
    assert report["budget"]["spec"]["min_agreement"] == 99.5
    for row in report["latency"].values():
        assert row["before_ms"] > 0 and row["after_ms"] > 0
    assert {"load", "load_data", "calibration", "decide", "rewrite", "verify", "latency", "save"} \
        == set(report["timings_s"])
    assert all(v >= 0 for v in report["timings_s"].values())
    assert report["skipped"] and all({"kind", "where", "reason"} == set(s) for s in report["skipped"])
    for side in ("before", "after"):  # an MLP: its dense chains, each with its producer and consumer FLOPs
        assert [g["kind"] for g in report[side]["groups"]] == ["neuron"] * 3
        assert report[side]["conv_flops_per_sample"] == 0
    # digits_mlp: 64 inputs → 256 → 256 → 256 → 10 (hand-counted FLOPs of layer0's producer and consumer)
    assert report["before"]["groups"][0] == {"kind": "neuron", "name": "layer0", "width": 256,
                                             "flops": 2 * 64 * 256 + 2 * 256 * 256}


# ---------------------------------------------------------------------------
# every group kind in the report: conv chains, residual streams, attention heads


def test_report_covers_conv_chains_with_their_flops():
    import onnxfold
    from test_channel_folding import chain_model

    model = chain_model(n=8, bn=False)  # x[N,3,9,9] → Conv 3→8 (3×3, pad 1) → Relu → Conv 8→5 (3×3, pad 1)
    res = onnxfold.optimize(model, fold_ratio=0.5, provider="cpu", latency=False)
    r = res.report
    positions = 9 * 9
    assert r["before"]["conv_flops_per_sample"] == 2 * positions * (8 * 3 * 9 + 5 * 8 * 9)
    assert r["after"]["conv_flops_per_sample"] == 2 * positions * (4 * 3 * 9 + 5 * 4 * 9)
    assert r["ratios"]["conv_flops"] == 0.5
    assert r["before"]["groups"] == [{"kind": "channel", "name": "conv0", "width": 8,
                                      "flops": r["before"]["conv_flops_per_sample"]}]
    assert r["after"]["hidden_widths"] == {"conv0": 4}
    assert [(lr["kind"], lr["layer"], lr["width_after"]) for lr in r["layers"]] == [("channel", "conv0", 4)]


def test_report_lists_residual_streams_as_groups():
    import onnxfold
    from test_channel_folding import residual_model

    r = onnxfold.optimize(residual_model(), fold_ratio=0.5, provider="cpu", latency=False).report
    kinds = {g["name"]: g["kind"] for g in r["before"]["groups"]}
    assert "residual" in kinds.values() and "channel" in kinds.values(), kinds
    # the stream is not folded without fold_residual: the convs writing it are skipped, with the kind
    assert any(s["kind"] == "channel" and "residual stream" in s["reason"] for s in r["skipped"]), r["skipped"]


def test_report_covers_attention_heads():
    import onnxfold

    pytest.importorskip("torch")
    from test_head_folding import HEAD_DIM, HEADS, HIDDEN, _attention_model

    model = _attention_model(layers=1)
    res = onnxfold.optimize(model, fold_heads=2, linear=False, provider="cpu", latency=False)
    r = res.report
    (head,) = [g for g in r["before"]["groups"] if g["kind"] == "head"]
    # q, k, v and o projections: 2·in·out each, per token
    assert head == {"kind": "head", "name": "attn0", "width": HEADS, "flops": 4 * 2 * HIDDEN * HEADS * HEAD_DIM}
    assert r["after"]["hidden_widths"]["attn0"] == 2
    assert [(lr["kind"], lr["width_after"]) for lr in r["layers"]] == [("head", 2)]
    # the q/k/v projections start no dense chain, but they are the heads' rows: not listed as skipped
    assert not any(s["where"].endswith(("q/MatMul", "k/MatMul", "v/MatMul")) for s in r["skipped"]), r["skipped"]



def test_grouped_query_attention_is_a_head_group_with_whole_group_steps():
    """Its kv sharing is the coupling: every key/value group keeps the same number of query
    heads, so the head counts the search may choose are whole multiples of the key/value heads."""
    import onnxfold
    from onnxfold.find.groups import find_groups

    pytest.importorskip("torch")
    from test_head_folding import HEADS, _attention_model

    model = _attention_model(layers=1, kv_heads=2)
    found = find_groups(model)
    (head,) = found.of_kind("head")
    assert head.width == HEADS and head.searchable
    assert head.knobs["heads"] == tuple(2 * n for n in range(HEADS // 2, 0, -1))
    assert any(c.startswith(f"kv sharing: {HEADS // 2} query heads per key/value head") for c in head.coupling)
    res = onnxfold.optimize(model, linear=False, fold_ratio=0.5, provider="cpu", latency=False)
    assert not any(s["kind"] == "head" and "grouped-query" in s["reason"] for s in res.report["skipped"])
    (row,) = [g for g in res.report["before"]["groups"] if g["kind"] == "head"]
    assert (row["name"], row["width"]) == (head.name, HEADS)
