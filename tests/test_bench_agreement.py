"""``ksbopt.bench.agreement``: does a smaller suite's verdict stand in the larger suite?"""

from __future__ import annotations

import json

import pytest

from ksbopt.bench import agreement


def _row(lr, verdict=None, mean=None, vs="adamw", wd=0.01):
    paired = None if verdict is None else {"verdict": verdict, "vs": vs, "mean": mean}
    return {"best_lr": lr, "hparams": {"weight_decay": wd}, "paired": paired}


def _summary(rows, arm="cosine"):
    task = {"reference": "adamw", "optimizers": rows}
    return {"grid_arm": arm, "arms": {arm: {"t": task}, "other": {"t": {"optimizers": {}}}}}


@pytest.mark.parametrize(
    "small, large, status",
    [
        (("tie", 0.01), ("tie", 0.02), "same"),
        (("worse", -0.02), ("worse", -0.01), "same"),
        (("tie", -0.01), ("worse", -0.02), "resolved"),  # more seeds, a narrower interval
        (("tie", 0.01), ("worse", -0.02), "contradiction"),  # resolved the other way
        (("better", 0.02), ("tie", 0.00), "contradiction"),  # the small suite over-claimed
        (("better", 0.02), ("worse", -0.02), "contradiction"),
    ],
)
def test_verdicts_agree_only_when_the_larger_suite_confirms_or_resolves(small, large, status):
    pairs = agreement.compare(
        _summary({"adamw": _row(0.03), "mine": _row(0.1, *small)}),
        _summary({"adamw": _row(0.03), "mine": _row(0.1, *large), "extra": _row(1.0, "tie", 0)}),
    )
    assert [(p.optimizer, p.status) for p in pairs] == [("adamw", "same"), ("mine", status)]
    assert all(p.same_setting for p in pairs)


def test_a_different_reference_or_setting_is_reported():
    small = _summary({"mine": _row(0.1, "tie", 0.0, vs="adamw")})
    large = _summary({"mine": _row(0.3, "tie", 0.0, vs="muon", wd=0.1)})
    (p,) = agreement.compare(small, large)
    assert p.status == "contradiction" and not p.same_setting
    text = "\n".join(agreement.markdown([p]))
    assert "lr 0.1, weight_decay 0.01 / lr 0.3, weight_decay 0.1" in text
    assert "tie vs adamw / tie vs muon" in text and "1 contradicting" in text


def test_cli_exits_1_on_a_contradiction_and_names_a_missing_summary(tmp_path, capsys):
    def write(name, summary):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return str(tmp_path / name)

    quick = write("quick", _summary({"mine": _row(0.1, "better", 0.02)}))
    agree = write("agree", _summary({"mine": _row(0.1, "better", 0.01)}))
    disagree = write("disagree", _summary({"mine": _row(0.1, "worse", -0.01)}))
    assert agreement.main([quick, agree]) == 0
    assert agreement.main([quick, disagree]) == 1
    assert (
        "0 the same, 0 a tie the larger suite resolves, 1 contradicting" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        agreement.main([quick, str(tmp_path / "nowhere")])
    assert "nowhere/summary.json: cannot read the summary" in capsys.readouterr().err
    other = write("other", {"grid": {"u": {"optimizers": {"mine": _row(0.1)}}}})
    with pytest.raises(SystemExit):
        agreement.main([quick, other])
    assert "share no (task, optimizer)" in capsys.readouterr().err


def test_the_committed_quick_suite_agrees_with_the_committed_full_suite():
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert agreement.main([str(results / "quick-cpu"), str(results / "full-cpu-v2")]) == 0
