"""Study statistics against hand-computed values on small synthetic inputs."""

import itertools
import math

import numpy as np
import pytest

from jaxrepro import stats

SEEDS0 = {"init": 0, "head": 0, "data": 0, "aug": 0, "dropout": 0}


def _rows():
    rows = []
    for step, loss in enumerate([2.0, 1.0, 0.5, 0.4, math.nan, 0.2]):
        rows.append({"kind": "train", "step": step, "phase": "pretrain", "loss": loss})
    for step, acc in [(0, 0.1), (2, 0.8), (4, 0.6), (6, 0.7)]:
        rows.append(
            {"kind": "eval", "step": step, "phase": "pretrain", "split": "source_test",
             "accuracy": acc, "loss": 1.0}
        )  # fmt: skip
    return rows


def test_run_summary_hand_values():
    s = stats.run_summary(_rows(), k_last=3, n_loss=2)
    ev = s["eval"]["pretrain/source_test"]
    assert ev["final"] == 0.7 and ev["best"] == 0.8 and ev["best_step"] == 2
    assert ev["last_k_mean"] == pytest.approx((0.8 + 0.6 + 0.7) / 3)
    assert ev["n_evals"] == 4 and ev["final_step"] == 6
    tr = s["train"]["pretrain"]
    assert tr["final_loss"] == pytest.approx((0.4 + 0.2) / 2)  # the NaN is skipped
    assert tr["n_nonfinite"] == 1 and tr["n_steps"] == 6
    with pytest.raises(ValueError, match="k_last"):
        stats.run_summary(_rows(), k_last=0)


def test_summarize_exact_moments():
    s = stats.summarize([1.0, 2.0, 3.0, 6.0], n_boot=500, seed=1)
    assert s["n"] == 4 and s["mean"] == 3.0
    assert s["std"] == pytest.approx(math.sqrt(14 / 3))  # sum of squares 4+1+0+9, ddof=1
    assert (s["min"], s["max"], s["spread"]) == (1.0, 6.0, 5.0)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert s["ci_low"] >= 1.0 and s["ci_high"] <= 6.0
    assert stats.summarize([1.0, 2.0, 3.0, 6.0], n_boot=500, seed=1) == s  # seeded


def test_summarize_counts_nonfinite_and_rejects_empty():
    s = stats.summarize([1.0, math.nan, 3.0])
    assert s["n"] == 2 and s["n_nonfinite"] == 1 and s["mean"] == 2.0
    assert math.isnan(stats.summarize([5.0])["std"])
    with pytest.raises(ValueError, match="empty"):
        stats.summarize([])
    with pytest.raises(ValueError, match="no finite"):
        stats.summarize([math.nan])


def test_bootstrap_ci_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (8, 32, 128):
        s = stats.summarize(rng.normal(0.8, 0.1, n), n_boot=2000, seed=0)
        assert s["ci_low"] < s["mean"] < s["ci_high"]
        widths.append(s["ci_high"] - s["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    # The percentile CI of a mean is ~ 2 * 1.96 * sigma / sqrt(n).
    assert widths[2] == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(128), rel=0.25)


def test_dropoff_rate():
    ev = lambda step, metric="loss": {"phase": "pretrain", "metric": metric, "step": step}
    rate = stats.dropoff_rate(
        {"a": [ev(117), ev(60, "accuracy/source_test")], "b": [ev(118)], "c": [], "d": []}
    )
    assert rate["pretrain/loss"] == {
        "rate": 0.5, "n_with": 2, "n_runs": 4, "steps": [117, 118], "runs": ["a", "b"]
    }  # fmt: skip
    assert rate["pretrain/accuracy/source_test"]["rate"] == 0.25


def test_prob_improvement_hand_example():
    # Pairs (a > b): 3>1, 3>2, 5>1, 5>2, 5>3(b) -> 5 wins; 3 vs 3 -> a tie (1/2); of 6 pairs.
    assert stats.prob_improvement([3.0, 5.0], [1.0, 2.0, 3.0]) == pytest.approx(5.5 / 6)
    assert stats.prob_improvement([1.0], [1.0]) == 0.5


def test_permutation_test_exact_hand_example():
    # a = {3, 4}, b = {1, 2}: of the 6 splits of {1,2,3,4} into pairs, only {3,4}|{1,2}
    # and {1,2}|{3,4} reach |mean diff| = 2: p = 2/6.
    r = stats.permutation_test([3.0, 4.0], [1.0, 2.0])
    assert r["exact"] and r["n_perm"] == 6
    assert r["statistic"] == 2.0 and r["p_value"] == pytest.approx(2 / 6)


def test_permutation_test_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 1.0, 7)  # C(14, 7) = 3432 splits
    exact = stats.permutation_test(a, b, n_perm=5000)
    mc = stats.permutation_test(a, b, n_perm=2000, seed=1)
    assert exact["exact"] and not mc["exact"]
    assert mc["p_value"] == pytest.approx(exact["p_value"], abs=0.02)


def test_welch_t_statistic_by_hand():
    pytest.importorskip("scipy")
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    r = stats.welch_t(a, b)
    assert r["statistic"] == pytest.approx((2.5 - 4.0) / math.sqrt(va + vb))
    assert r["dof"] == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2))
    assert 0.1 < r["p_value"] < 0.5


def test_compare_groups():
    a, b = [0.90, 0.92, 0.88, 0.91], [0.60, 0.90, 0.93, 0.68]
    r = stats.compare_groups(a, b, n_boot=1000, seed=0, test="permutation")
    assert r["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert r["diff_ci_low"] < r["diff"] < r["diff_ci_high"]
    # a beats 0.60 and 0.68 always (8 pairs); 0.90: beaten by 0.92 and 0.91, tied by
    # 0.90 (2 + 1/2); 0.93: never. (8 + 2.5) / 16.
    assert r["p_improvement"] == pytest.approx(10.5 / 16)
    assert r["test"]["name"] == "permutation" and r["test"]["exact"]
    auto = stats.compare_groups(a, b, n_boot=100)
    expected = "permutation" if stats._scipy_stats is None else "welch_t"
    assert auto["test"]["name"] == expected
    with pytest.raises(ValueError, match="test must be"):
        stats.compare_groups(a, b, test="mann-whitney")


def test_compare_groups_without_scipy(monkeypatch):
    monkeypatch.setattr(stats, "_scipy_stats", None)
    r = stats.compare_groups([1.0, 2.0, 3.0], [0.0, 0.5, 1.0], n_boot=100)
    assert r["test"]["name"] == "permutation" and r["test"]["exact"]
    # Of the C(6, 3) = 20 splits, |diff| = 1.5 is reached by {1, 2, 3} vs {0, 0.5, 1}, by
    # the same with the two 1.0s swapped, and by the two mirror images: p = 4 / 20.
    assert r["test"]["p_value"] == pytest.approx(4 / 20)
    with pytest.raises(ImportError, match="scipy"):
        stats.welch_t([1.0, 2.0], [3.0, 4.0])


def _grid(a, b, noise=None):
    records = []
    for (i, ai), (j, bj) in itertools.product(enumerate(a), enumerate(b)):
        seeds = dict(SEEDS0, aug=i, data=j)
        value = ai + bj + (0.0 if noise is None else noise[i, j])
        records.append({"seeds": seeds, "value": value})
    return records


def test_variance_decomposition_exact_additive_grid():
    a = np.array([0.0, 2.0, -2.0, 4.0])  # var ddof=1: 20/3
    b = np.array([1.0, -1.0, 0.0])  # var ddof=1: 1
    d = stats.variance_decomposition(_grid(a, b))
    assert set(d["factors"]) == {"aug", "data"}
    assert d["factors"]["aug"]["variance"] == pytest.approx(np.var(a, ddof=1))
    assert d["factors"]["data"]["variance"] == pytest.approx(np.var(b, ddof=1))
    assert d["factors"]["aug"]["n_settings"] == 3 and d["factors"]["aug"]["n_seeds"] == 4
    # Population variances: the grid split is exact, with no interaction.
    d0 = stats.variance_decomposition(_grid(a, b), ddof=0)
    assert d0["total"] == pytest.approx(np.var(a) + np.var(b))
    assert d0["residual"] == pytest.approx(0.0, abs=1e-12)
    assert d0["grid"]["main"] == pytest.approx({"aug": np.var(a), "data": np.var(b)})
    assert d0["grid"]["interaction"] == pytest.approx(0.0, abs=1e-12)


def test_variance_decomposition_interaction():
    a, b = np.zeros(2), np.zeros(2)
    c = np.array([[1.0, -1.0], [-1.0, 1.0]])  # pure interaction, population variance 1
    d = stats.variance_decomposition(_grid(a, b, noise=c), ddof=0)
    assert d["grid"]["main"] == pytest.approx({"aug": 0.0, "data": 0.0})
    assert d["grid"]["interaction"] == pytest.approx(1.0)
    # Held fixed, each factor sees the interaction: residual = -1.
    assert d["factors"]["aug"]["variance"] == pytest.approx(1.0)
    assert d["residual"] == pytest.approx(-1.0)


def test_variance_decomposition_one_factor_at_a_time_sampling():
    # Bouthillier's design: vary one seed with the others at their defaults.
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 2.0, 300), rng.normal(0, 1.0, 300)
    records = [{"seeds": dict(SEEDS0, aug=i), "value": a[i] + b[0]} for i in range(300)]
    records += [{"seeds": dict(SEEDS0, data=j), "value": a[0] + b[j]} for j in range(1, 300)]
    d = stats.variance_decomposition(records)
    assert d["factors"]["aug"]["variance"] == pytest.approx(4.0, rel=0.2)
    assert d["factors"]["data"]["variance"] == pytest.approx(1.0, rel=0.2)
    assert d["factors"]["aug"]["n_settings"] == 1 and d["grid"] is None


def test_variance_decomposition_bad_input():
    with pytest.raises(ValueError, match=">= 2 records"):
        stats.variance_decomposition([{"seeds": SEEDS0, "value": 1.0}])
    recs = _grid([0.0, 1.0], [0.0, 1.0])
    recs[0]["value"] = math.nan
    with pytest.raises(ValueError, match="record 0 has a non-finite"):
        stats.variance_decomposition(recs)
    with pytest.raises(ValueError, match="not varied seeds"):
        stats.variance_decomposition(_grid([0.0, 1.0], [0.0]), factors=["lr"])


def _study():
    """Four runs varying aug: one shared spike near step 117, one only in run a2."""
    runs = []
    for i in range(4):
        events = [{"phase": "pretrain", "metric": "loss", "kind": "rise", "step": 117 + i % 2,
                   "size": 1.5 + i / 10}]  # fmt: skip
        if i == 2:
            events.append({"phase": "pretrain", "metric": "accuracy/source_test",
                           "kind": "fall", "step": 100, "size": 0.2})  # fmt: skip
        runs.append({"run": f"a{i}", "seeds": dict(SEEDS0, aug=i), "events": events})
    return runs


def test_attribute_events_shared_and_seed_specific():
    groups = stats.attribute_events(_study(), varied=["aug"], window=3)
    assert [(g["metric"], g["step_min"], g["step_max"]) for g in groups] == [
        ("accuracy/source_test", 100, 100),
        ("loss", 117, 118),
    ]
    specific, shared = groups
    assert not specific["shared"] and specific["runs"] == ["a2"]
    assert specific["fraction"] == 0.25 and specific["co_varies_with"] == ["aug"]
    assert specific["seen_in"] == "seen in 1 of 4 runs (they differ from the others in aug)"
    assert shared["shared"] and shared["n_runs"] == 4 and shared["fraction"] == 1.0
    assert "aug" not in shared["co_varies_with"]
    assert shared["seen_in"] == (
        "seen in 4 of 4 runs (all share the held-fixed factors: init, head, data, dropout)"
    )
    assert shared["example_ids"] is None and len(shared["events"]) == 4


def test_attribute_events_window_splits_groups():
    groups = stats.attribute_events(_study(), varied=["aug"], window=0)
    loss = [g for g in groups if g["metric"] == "loss"]
    assert [(g["step_min"], g["n_runs"], g["shared"]) for g in loss] == [
        (117, 2, False),
        (118, 2, False),
    ]


def test_attribute_events_two_varied_factors():
    # aug x data grid; an event in every run with data=1 (any aug) points at data.
    runs = []
    for aug, data in itertools.product(range(2), range(2)):
        ev = [{"phase": "finetune", "metric": "loss", "kind": "rise", "step": 200}] * (data == 1)
        runs.append({"run": f"r{aug}{data}", "seeds": dict(SEEDS0, aug=aug, data=data),
                     "events": ev})  # fmt: skip
    (group,) = stats.attribute_events(runs, varied=["aug", "data"], window=5)
    assert group["co_varies_with"] == ["data"] and group["runs"] == ["r01", "r11"]


def test_attribute_events_checks_the_design():
    with pytest.raises(ValueError, match="'data' is listed as varied but"):
        stats.attribute_events(_study(), varied=["aug", "data"], window=3)
    runs = _study()
    runs[0]["seeds"]["data"] = 5
    with pytest.raises(ValueError, match="'data' differs across runs .* not listed in varied"):
        stats.attribute_events(runs, varied=["aug"], window=3)
    with pytest.raises(ValueError, match=">= 2 runs"):
        stats.attribute_events(_study()[:1], varied=["aug"], window=3)
    with pytest.raises(ValueError, match="non-empty list"):
        stats.attribute_events(_study(), varied="aug", window=3)
