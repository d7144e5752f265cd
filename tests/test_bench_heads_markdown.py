"""tools/bench_heads.py's comparison with the results a rerun replaces (no benchmark run)."""

import json
import shutil
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

from bench_heads import compared, flatten_folds, flatten_search, main  # noqa: E402

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
