"""Sequence outputs [batch, positions, classes]: judged per position, with the
sequence as the statistical unit; next-token labels; perplexity budgets."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold.cli import main
from onnxfold.decide.budget import Budget
from onnxfold.decide.confidence import rate_upper, sequences_for_unit_mean, unit_mean_upper
from onnxfold.errors import UsageError
from onnxfold.measure.data import CalibrationSet
from onnxfold.measure.labels import IGNORE_LABEL, next_token_labels
from onnxfold.verify import compare_models

VOCAB, DIM, HIDDEN = 11, 6, 16


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(VOCAB, DIM)).astype(np.float32), rng.normal(size=(DIM, HIDDEN)).astype(np.float32),
            rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32))


def _lm(emb, w1, w2, with_mask: bool = False) -> onnx.ModelProto:
    """A tiny byte-level 'language model': Gather → MatMul → Relu → MatMul → logits [b, s, vocab];
    an attention_mask input, when asked for, only scales the logits (it must not be judged as an output)."""
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["logits" if not with_mask else "raw"], name="fc2")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
                  helper.make_node("Mul", ["raw", "m3"], ["logits"])]
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"))
    g = helper.make_graph(nodes, "lm", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                              ["b", "s", VOCAB])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _numpy_logits(ids, emb, w1, w2):
    return np.maximum(emb[ids].astype(np.float64) @ w1, 0) @ w2


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _perturbed(seed: int, sequences: int, positions: int = 12):
    """Weights, the same with the output layer perturbed, token ids and their next-token labelled set."""
    emb, w1, w2 = _weights(seed)
    w2_changed = w2 + np.random.default_rng(seed + 1).normal(scale=0.4, size=w2.shape).astype(np.float32)
    ids = np.random.default_rng(seed + 2).integers(0, VOCAB, size=(sequences, positions))
    return emb, w1, w2, w2_changed, ids, next_token_labels(CalibrationSet({"input_ids": ids}))


def test_per_token_agreement_accuracy_and_perplexity_match_numpy():
    emb, w1, w2, w2_changed, ids, data = _perturbed(0, 40)
    comp = compare_models(_lm(emb, w1, w2), _lm(emb, w1, w2_changed), data, batch_size=16)
    o = comp.outputs["logits"]
    assert o.kind == "sequence" and o.count == 40 and o.tokens == 40 * 12

    # independent: numpy forward, per-position argmax, labels shifted by hand
    ref, cand = _numpy_logits(ids, emb, w1, w2), _numpy_logits(ids, emb, w1, w2_changed)
    same = ref.argmax(-1) == cand.argmax(-1)
    assert o.agreement == pytest.approx(same.mean(), abs=1e-12)
    assert 0.2 < o.agreement < 0.98  # the perturbation changes some positions, not all
    nxt = ids[:, 1:]
    right_r, right_c = ref[:, :-1].argmax(-1) == nxt, cand[:, :-1].argmax(-1) == nxt
    assert o.labeled == 40 * 11
    assert o.accuracy_original == pytest.approx(right_r.mean(), abs=1e-12)
    assert o.accuracy_candidate == pytest.approx(right_c.mean(), abs=1e-12)
    assert o.newly_wrong == int((right_r & ~right_c).sum()) and o.newly_right == int((~right_r & right_c).sum())
    nll_r = -np.take_along_axis(_log_softmax(ref[:, :-1]), nxt[..., None], -1).mean()
    nll_c = -np.take_along_axis(_log_softmax(cand[:, :-1]), nxt[..., None], -1).mean()
    assert o.perplexity_original == pytest.approx(np.exp(nll_r), rel=1e-5)
    assert o.perplexity_candidate == pytest.approx(np.exp(nll_c), rel=1e-5)
    # per sequence: the counts the budget bounds
    np.testing.assert_array_equal(o.sample_token_flips, (~same).sum(1))
    report = comp.to_dict()["outputs"]["logits"]
    assert report["tokens"] == 480 and report["perplexity_increase_pct"] == pytest.approx(
        100 * (np.exp(nll_c - nll_r) - 1), rel=1e-4)


def test_masked_positions_are_not_judged():
    emb, w1, w2 = _weights(3)
    w2_changed = w2 + np.random.default_rng(4).normal(scale=0.5, size=w2.shape).astype(np.float32)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, VOCAB, size=(30, 10))
    lengths = rng.integers(3, 11, size=30)
    mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
    data = next_token_labels(CalibrationSet({"input_ids": ids, "attention_mask": mask}))
    comp = compare_models(_lm(emb, w1, w2, True), _lm(emb, w1, w2_changed, True), data, batch_size=8)
    o = comp.outputs["logits"]
    ref, cand = _numpy_logits(ids, emb, w1, w2), _numpy_logits(ids, emb, w1, w2_changed)
    on = mask.astype(bool)
    assert o.tokens == int(on.sum())
    assert o.flips == int(((ref.argmax(-1) != cand.argmax(-1)) & on).sum())
    # labels: the next token, ignored at the last position and where the next token is padding
    assert o.labeled == int(on[:, 1:].sum())


def test_next_token_labels_shift_and_ignore():
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = next_token_labels(CalibrationSet({"input_ids": ids, "attention_mask": mask})).labels
    np.testing.assert_array_equal(got, [[2, 3, 4, IGNORE_LABEL], [6, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]])
    with pytest.raises(UsageError, match="integer input"):
        next_token_labels(CalibrationSet({"x": np.zeros((2, 3), np.float32)}))


def _sequence_comparison(flips_per_sequence, tokens=64):
    """A comparison of a sequence output whose sequences changed the given number of tokens."""
    n = len(flips_per_sequence)
    ref = np.zeros((n, tokens, 2), np.float32)
    ref[..., 0] = 1.0
    cand = ref.copy()
    for i, k in enumerate(flips_per_sequence):
        cand[i, :k, 1] = 2.0
    from onnxfold.verify import _Acc

    acc = _Acc("logits", None)
    acc.update(ref, cand, None)
    from onnxfold.verify import Comparison

    return Comparison(samples=n, outputs={"logits": acc.result()})


def test_token_agreement_is_bounded_per_sequence():
    # 0.39 % of tokens changed, one token in every 4th window of 64 tokens. Counted as
    # independent tokens, 38,400 of them would certify 99 % agreement (Clopper-Pearson
    # 0.47 %); but tokens of one window are not independent draws, so the unit is the
    # window: 600 windows cannot certify it, 1,200 can.
    budget = Budget(min_agreement=99.0)
    assert rate_upper(150, 600 * 64, 0.95) < 0.005
    for windows, met in ((600, False), (1200, True)):
        flips = [1 if i % 4 == 0 else 0 for i in range(windows)]
        check = budget.check(_sequence_comparison(flips))
        (lc,) = [lc for lc in check.limits if lc.kind == "token_agreement"]
        assert lc.observed == pytest.approx(1 / 256)
        assert lc.samples == windows  # sequences, not tokens
        assert lc.needed == sequences_for_unit_mean(0.01, 0.95)
        assert lc.bound == pytest.approx(unit_mean_upper(np.array(flips) / 64, 0.95))
        assert check.met is met, check.failures


def test_perplexity_budget_needs_labels_and_a_sequence_output():
    with pytest.raises(UsageError, match="next-token"):
        Budget(max_perplexity_increase=1.0).validate(has_labels=False)
    check = Budget(max_perplexity_increase=1.0).check(_sequence_comparison([0] * 50))
    assert not check.met and "no sequence output with labels" in check.failures[0]


def test_cli_next_token_labels_and_perplexity_budget(tmp_path, capsys):
    emb, w1, w2 = _weights(6)
    path = tmp_path / "lm.onnx"
    onnx.save(_lm(emb, w1, w2), path)
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, VOCAB, size=(200, 16)))
    np.savez(tmp_path / "test.npz", input_ids=rng.integers(0, VOCAB, size=(100, 16)))
    report = tmp_path / "r.json"
    rc = main(["optimize", str(path), "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "test.npz"),
               "--labels", "next-token", "--max-perplexity-increase", "50", "--no-latency", "--quiet",
               "--report", str(report), "-o", str(tmp_path / "out.onnx")])
    assert rc == 0
    r = json.loads(report.read_text())
    kinds = {lc["kind"] for lc in r["budget"]["limits"]}
    assert "perplexity_increase" in kinds
    out = (r["verification"] or {}).get("outputs", {}).get("logits")
    if out is not None:  # a model was rewritten: judged per token with perplexity
        assert out["kind"] == "sequence" and out["tokens"] == 100 * 16 and out["perplexity_original"] > 1
    # without labels the perplexity budget is a one-line usage error
    rc = main(["optimize", str(path), "--calib", str(tmp_path / "calib.npz"), "--max-perplexity-increase", "5",
               "--no-latency", "--quiet", "-o", str(tmp_path / "out2.onnx")])
    assert rc == 2 and not (tmp_path / "out2.onnx").exists()
    assert "--labels next-token" in capsys.readouterr().err


def test_docs_sequence_table_matches_the_code():
    from pathlib import Path

    from onnxfold.decide.confidence import sequences_for_paired_drop

    text = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text()
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `--m")}
    assert f"**{sequences_for_unit_mean(0.01, 0.95)}** for 99 %" in row["`--min-agreement A`"]
    assert f"**{sequences_for_unit_mean(0.005, 0.95)}** for 99.5 %" in row["`--min-agreement A`"]
    assert f"**{sequences_for_paired_drop(0.01, 0.95)}** for 1 pp" in row["`--max-accuracy-drop D`"]


def test_a_comparison_without_perplexity_counts_the_same_and_says_no_perplexity():
    emb, w1, w2, w2_changed, _, data = _perturbed(8, 30)
    with_ppl = compare_models(_lm(emb, w1, w2), _lm(emb, w1, w2_changed), data, batch_size=8)
    without = compare_models(_lm(emb, w1, w2), _lm(emb, w1, w2_changed), data, batch_size=8, perplexity=False)
    a, b = with_ppl.outputs["logits"], without.outputs["logits"]
    assert a.perplexity_original > 1 and a.sample_nll_increase is not None
    assert b.perplexity_original is None and b.perplexity_candidate is None and b.sample_nll_increase is None
    for field in ("tokens", "flips", "labeled", "newly_wrong", "newly_right", "accuracy_original",
                  "accuracy_candidate"):
        assert getattr(b, field) == getattr(a, field), field
    np.testing.assert_array_equal(b.sample_token_flips, a.sample_token_flips)
    assert without.to_dict()["outputs"]["logits"]["perplexity_increase_pct"] is None


@pytest.mark.parametrize("budget, judged", [(Budget(max_perplexity_increase=50.0), True),
                                            (Budget(min_agreement=90.0), False)],
                         ids=["perplexity budget", "agreement budget"])
def test_the_search_judges_perplexity_only_when_its_budget_limits_it(budget, judged):
    from onnxfold.passes.base import PassContext
    from onnxfold.search import BudgetSearch

    emb, w1, w2 = _weights(11)
    ids = np.random.default_rng(12).integers(0, VOCAB, size=(300, 16))
    data = next_token_labels(CalibrationSet({"input_ids": ids}))
    ctx = PassContext(calibration=data.subset(np.arange(200)), heldout=data.subset(np.arange(200, 300)),
                      batch_size=64)
    search = BudgetSearch(_lm(emb, w1, w2), budget, ctx, max_evaluations=8)
    search.run()
    candidates = list(search.cache.values())
    assert candidates
    ppl = [c.comparison["outputs"]["logits"]["perplexity_original"] for c in candidates]
    assert all((p is not None) is judged for p in ppl), ppl
    if judged:  # judged on the perplexity: some candidate passes a 50 % increase
        assert any(c.met for c in candidates)
