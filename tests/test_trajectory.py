"""Row-by-row comparison of two runs: the window, missing and extra rows, bitwise values."""

from __future__ import annotations

import math

import pytest

from jaxrepro import audit, trajectory
from jaxrepro.compare import divergence


def _train(step, phase="pretrain", loss=None):
    return {
        "kind": "train",
        "step": step,
        "phase": phase,
        "loss": 2.0 - 0.1 * step if loss is None else loss,
    }


def _eval(step, phase="pretrain", split="source_test", accuracy=0.5):
    return {
        "kind": "eval",
        "step": step,
        "phase": phase,
        "split": split,
        "loss": 1.0,
        "accuracy": accuracy,
    }


def _run(total=8, boundary=4):
    """Train rows 0..total-1; evals at 0, at the phase boundary (both phases) and at the end."""
    rows = [_eval(0)]
    for s in range(total):
        phase = "pretrain" if s < boundary else "finetune"
        if s == boundary:
            rows += [_eval(s, "pretrain"), _eval(s, "finetune")]
        rows.append(_train(s, phase))
    return rows + [_eval(total, "finetune")]


def test_identical_rows_are_bitwise_equal():
    rows = _run()
    c = trajectory.compare(rows, [dict(r) for r in rows], start=0)
    assert c["bitwise_equal"] and c["compared_rows"] == len(rows)
    assert c["missing_rows"] == [] and c["extra_rows"] == [] and c["first_difference"] is None


def test_a_replay_that_stopped_early_is_not_bitwise():
    original = _run()
    stopped = [r for r in original if r["step"] < 6]  # no steps 6, 7, no final eval
    c = trajectory.compare(original, stopped, start=2)
    assert not c["bitwise_equal"]
    assert [(m["kind"], m["step"]) for m in c["missing_rows"]] == [
        ("train", 6),
        ("train", 7),
        ("eval", 8),
    ]
    assert c["first_difference"] == {
        "step": 6,
        "kind": "train",
        "phase": "finetune",
        "split": None,
        "problem": "missing",
    }
    assert "in the original, not in the replay" in trajectory.describe(c["first_difference"])
    # every row it has is equal: only the missing rows make it not bitwise
    assert all(e["equal"] for e in c["steps"])


def test_extra_and_differing_rows_are_reported():
    original = _run()
    extra = [
        *original[:3],
        dict(_train(1), phase="pretrain", kind="eval", split="x"),
        *original[3:],
    ]
    c = trajectory.compare(original, extra, start=0)
    assert not c["bitwise_equal"] and c["missing_rows"] == []
    assert c["extra_rows"] == [{"step": 1, "kind": "eval", "phase": "pretrain", "split": "x"}]
    assert c["first_difference"]["problem"] == "extra"
    changed = [
        dict(r, loss=math.nextafter(r["loss"], 9.0)) if r["step"] == 5 else r for r in original
    ]
    c = trajectory.compare(original, changed, start=0)
    assert not c["bitwise_equal"] and c["missing_rows"] == c["extra_rows"] == []
    assert c["first_difference"]["problem"] == "differs" and c["first_difference"]["step"] == 5
    assert (
        trajectory.describe(c["first_difference"]) == "train row at finetune step 5 differs in loss"
    )


def test_the_window_of_a_branch():
    original = _run()
    # A branch restored at the phase boundary (into the fine-tune phase: no pretrain eval
    # there), stopping at `until` = 6 with its own final eval: bitwise, nothing missing.
    branch = [
        r for r in original if 4 <= r["step"] < 6 and (r["step"], r["phase"]) != (4, "pretrain")
    ]
    branch.append(_eval(6, "finetune"))
    c = trajectory.compare(original, branch, start=4, until=6)
    assert c["bitwise_equal"], c["first_difference"]
    assert c["compared_rows"] == 3  # eval 4 finetune, train 4, train 5
    # rows before `start` are not compared, whatever the branch holds there
    c = trajectory.compare(original, [_train(0, loss=9.0), *branch], start=4, until=6)
    assert c["bitwise_equal"]
    # the same branch without its last train row is not
    c = trajectory.compare(original, [r for r in branch if r["step"] != 5], start=4, until=6)
    assert not c["bitwise_equal"] and c["missing_rows"][0]["step"] == 5
    # run to the end (until None or past it): the original's final eval is required
    to_end = [r for r in original if r["step"] >= 4 and (r["step"], r["phase"]) != (4, "pretrain")]
    for until in (None, 8, 20):
        assert trajectory.compare(original, to_end, start=4, until=until)["bitwise_equal"]
        c = trajectory.compare(original, to_end[:-1], start=4, until=until)
        assert c["missing_rows"] == [
            {"step": 8, "kind": "eval", "phase": "finetune", "split": "source_test"}
        ]


def test_a_counterfactual_has_the_same_rows_and_other_values():
    original = _run()
    other = [
        dict(r, loss=r["loss"] + 1.0) if r["kind"] == "train" and r["step"] >= 3 else r
        for r in original
    ]
    c = trajectory.compare(original, other, start=2)
    assert not c["bitwise_equal"] and c["missing_rows"] == c["extra_rows"] == []
    assert c["first_difference"]["step"] == 3


def test_values_are_compared_by_their_bits():
    assert trajectory.same_value(math.nan, float("nan"))
    assert not trajectory.same_value(0.0, -0.0)
    assert not trajectory.same_value(1.0, math.nextafter(1.0, 2.0))
    assert not trajectory.same_value(1, 1.0) and not trajectory.same_value(True, 1)
    assert trajectory.same_value([1.0, math.nan], [1.0, math.nan])
    assert not trajectory.same_value([0.0], [-0.0])
    a = _train(3)
    assert trajectory.differing_fields(a, dict(a)) == []
    assert trajectory.differing_fields(a, dict(a, extra=1)) == ["extra"]  # one side only
    assert trajectory.differing_fields(a, dict(a, loss=-a["loss"])) == ["loss"]


def test_audit_replay_and_compare_share_the_row_matching(monkeypatch):
    """audit.divergence, compare's trajectory_divergence and trajectory.compare (the
    replay's and the audit's bitwise verdict) all pair rows with ``trajectory.pairs``:
    replace it, and every one of them sees the replacement."""
    calls = []
    real = trajectory.pairs

    def spy(a, b):
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(trajectory, "pairs", spy)
    rows = [dict(r, grad_norm=1.0) for r in _run()]
    audit.divergence(rows, rows)
    assert len(calls) == 1
    divergence.trajectory_divergence(rows, rows)
    assert len(calls) == 3  # train rows, eval rows
    trajectory.compare(rows, rows)
    assert len(calls) == 4
    monkeypatch.setattr(trajectory, "pairs", lambda a, b: [])
    assert audit.divergence(rows, rows)["compared_rows"] == 0
    assert not trajectory.compare(rows, rows)["bitwise_equal"]
    with pytest.raises(divergence.CompareError, match="share no logged training step"):
        divergence.trajectory_divergence(rows, rows)
