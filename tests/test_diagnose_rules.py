"""Diagnosis arms, recurrence and verdict rules (pure functions)."""

import math

import pytest

from jaxrepro import stats
from jaxrepro.diagnose import arms as arms_lib
from jaxrepro.diagnose import verdict as verdict_lib
from jaxrepro.errors import ConfigError


def test_default_arms_expand_in_order():
    arms = arms_lib.parse_arms(arms_lib.DEFAULT_ARMS)
    assert [a.name for a in arms] == [
        "exact", "aug0", "aug1", "aug2", "aug3", "order0", "order1", "skip", "lr0.5", "clip1",
    ]  # fmt: skip
    lr = next(a for a in arms if a.family == "lr")
    assert lr.lr_scale == 0.5 and lr.clip_norm == math.inf and lr.remedy
    exact = arms[0]
    assert exact.lr_scale == 1.0 and exact.clip_norm == math.inf and not exact.remedy


@pytest.mark.parametrize(
    "text, match",
    [
        ("aug:0", "count >= 1"),
        ("aug:x", "count >= 1"),
        ("order:1.5", "count >= 1"),
        ("lr:-1", "positive finite"),
        ("clip:abc", "positive finite"),
        ("lr:inf", "positive finite"),
        ("bogus", "unknown arm"),
        ("skip:2", "integer <= 0"),
        ("skip:x", "integer <= 0"),
        ("exact,exact", "given twice"),
        ("", "empty"),
    ],
)
def test_bad_arms_are_refused_with_the_reason(text, match):
    with pytest.raises(ConfigError, match=match):
        arms_lib.parse_arms(text)


def test_skip_of_an_earlier_batch_is_its_own_arm():
    arms = arms_lib.parse_arms("skip,skip:-3")
    assert [a.name for a in arms] == ["skip", "skip-3"] and arms[1].index == -3


def test_wilson_interval_at_small_n():
    lo, hi = stats.wilson(0, 4)
    assert lo == 0.0 and 0.48 < hi < 0.5
    lo, hi = stats.wilson(4, 4)
    assert 0.5 < lo < 0.52 and hi == 1.0
    lo, hi = stats.wilson(5, 10)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_recurrence_needs_same_phase_metric_kind_within_the_window():
    orig = {"phase": "finetune", "metric": "loss", "kind": "rise", "step": 100}
    near = dict(orig, step=104)
    assert verdict_lib.recurs(orig, [near], window=5) is near
    assert verdict_lib.recurs(orig, [near], window=3) is None
    assert verdict_lib.recurs(orig, [dict(near, kind="fall")], window=5) is None
    assert verdict_lib.recurs(orig, [dict(near, phase="pretrain")], window=5) is None


def _outcomes(**recurred_by_family):
    out = []
    for family, flags in recurred_by_family.items():
        for i, r in enumerate(flags):
            out.append({"family": family, "arm": f"{family}{i}", "recurred": r})
    return out


@pytest.mark.parametrize(
    "case, cause",
    [
        (dict(exact=[1], aug=[0, 0, 0, 0], order=[1, 1], skip=[1]), verdict_lib.AUG),
        (dict(exact=[1], aug=[1, 1, 1, 1], order=[0, 0], skip=[0]), verdict_lib.BATCH),
        (dict(exact=[1], aug=[1, 1, 1, 1], order=[1, 1], skip=[0]), verdict_lib.BATCH),
        (dict(exact=[1], aug=[1, 1, 1, 1], order=[1, 1], skip=[1]), verdict_lib.STATE),
        (dict(exact=[0], aug=[0, 0, 0, 0], order=[1, 1], skip=[1]), verdict_lib.UNDETERMINED),
        (dict(exact=[1], aug=[1, 0, 1, 0], order=[1, 0], skip=[1]), verdict_lib.UNDETERMINED),
    ],
)
def test_verdict_rules(case, cause):
    v = verdict_lib.verdict(_outcomes(**case), exact_bitwise=True)
    assert v["cause"] == cause, v
    assert v["rule"] in verdict_lib.RULES


def test_an_exact_arm_that_is_not_bitwise_leaves_the_cause_undetermined():
    case = dict(exact=[1], aug=[0, 0, 0, 0], order=[1, 1], skip=[1])
    assert verdict_lib.verdict(_outcomes(**case), exact_bitwise=False)["cause"] == (
        verdict_lib.UNDETERMINED
    )


def test_remedies_are_reported_as_prevented_in_k_of_n():
    v = verdict_lib.verdict(_outcomes(exact=[1], aug=[1, 1], lr=[0], clip=[1]), exact_bitwise=True)
    assert v["remedies"] == {"lr": "prevented in 1/1", "clip": "prevented in 0/1"}
    assert v["families"]["aug"]["ci95"][0] > 0.3
