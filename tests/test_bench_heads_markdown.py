"""tools/bench_heads.py's comparison with the results a rerun replaces (no benchmark run)."""

import json
import shutil
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

from bench_heads import compared, flatten_folds, flatten_search, main, search_checks  # noqa: E402

HEADING = "### Against the previous search run"


def _search(size, heldout, met, when):
    return {"generated": when, "machine": f"machine of {when}", "size": size, "heldout_agreement": heldout,
            "final_check": {"met": met}}


def test_a_rerun_search_is_dated_by_the_search_it_replaces_and_lists_what_got_worse(tmp_path):
    # the folds and the search run separately: the file's own date is the folds'
    old = {"generated": "folds day", "machine": "folds machine", "search": _search(1.0, 1.0, False, "search day")}
    (tmp_path / "heads.json").write_text(json.dumps(old))
    new = {**old, "search": _search(0.9, 0.95, True, "today")}
    lines = compared(tmp_path, new, flatten_search, {"encoder size"}, None, HEADING, section="search")
    assert lines[0] == HEADING
    text = "\n".join(lines)
    assert "ran search day on machine of search day:" in text and "folds day" not in text
    # smaller and met: better; the held-out agreement fell
    assert "2 numbers got better, 0 stayed the same, 1 got worse" in text
    assert "- budget search: held-out agreement 1 → 0.95" in text
    assert "Why: no reason given" in text


def test_fold_rows_are_compared_by_method_heads_and_ratio(tmp_path):
    row = {"method": "fold mean", "heads": 8, "ffn_ratio": 0.0, "spearman": 0.7, "cosine": 0.8, "window_cosine": 0.8,
           "size": 0.95}
    (tmp_path / "heads.json").write_text(json.dumps({"generated": "then", "machine": "m", "runs": [row]}))
    new = {"runs": [{**row, "spearman": 0.69, "size": 0.94}]}
    lines = compared(tmp_path, new, flatten_folds, {"encoder size"}, "a reason", "## Against")
    text = "\n".join(lines)
    assert "1 numbers got better, 2 stayed the same, 1 got worse" in text
    assert "- fold mean, 8 heads, FFN r 0: Spearman 0.7 → 0.69" in text and "Why: a reason" in text


def test_render_fills_in_the_reason_found_out_after_the_run(tmp_path):
    result = json.loads((TOOLS / "results" / "heads.json").read_text())
    result["against_previous"] = ["## Against the previous run (fixed head counts)", "", "1 got worse:", "",
                                  "- a row: Spearman 0.7 → 0.6", "",
                                  "Why: no reason given (regenerate with --reason TEXT)", ""]
    (tmp_path / "heads.json").write_text(json.dumps(result))
    assert main(["--render", "--out", str(tmp_path), "--reason", "found out later"]) == 0
    md = (tmp_path / "heads.md").read_text()
    assert "- a row: Spearman 0.7 → 0.6\n\nWhy: found out later\n" in md and "no reason given" not in md
    assert json.loads((tmp_path / "heads.json").read_text())["against_previous"][6] == "Why: found out later"


def _cand(heads, ffn, size, spent, met=True):
    return {"heads_kept": heads, "fold_ratios": ffn, "fold_select": "kmeans", "size": size, "spent": spent, "met": met}


def test_the_search_check_needs_both_knob_kinds_tried_and_a_smaller_model_that_met_the_final_check():
    cands = [_cand({}, {}, 1.0, 0.1), _cand({"attn0": 11}, {}, 0.98, 0.9), _cand({}, {"layer0": 0.4}, 0.9, 0.8),
             _cand({"attn0": 6}, {}, 0.92, 1.5, met=False)]
    run = {"candidates": cands, "status": "optimized", "size": 0.9, "heads_kept": {"attn0": 12},
           "fold_ratios": {"layer0": 0.4}}
    lines = search_checks(run)
    assert lines[0].startswith("CHECK") and lines[0].endswith("PASS")
    assert "2 candidates with fewer heads, 1 with folded FFN blocks, of 4" in lines[0]
    assert "heads all kept" in lines[1]
    # the evidence: the best met candidate of each kind (the unmet 6-head one does not count)
    assert "heads-only one saved 2.0 % of the parameters spending 0.90" in lines[2]
    assert "FFN-only one 10.0 % spending 0.80" in lines[2]
    for broken in ({"status": "final_check_failed"}, {"size": 1.0},
                   {"candidates": [c for c in cands if not c["heads_kept"]]},
                   {"candidates": [c for c in cands if not c["fold_ratios"]]}):
        assert search_checks({**run, **broken})[0].endswith("FAIL"), broken
