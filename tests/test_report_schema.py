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
    assert report["skipped"] and all({"where", "reason"} == set(s) for s in report["skipped"])
