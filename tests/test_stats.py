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


def test_run_summary_eval_to_eval_is_the_median_change_of_the_second_half():
    rows = [
        {"kind": "eval", "step": i, "phase": "finetune", "split": "target_test",
         "accuracy": acc, "loss": 1.0}
        for i, acc in enumerate([0.1, 0.5, 0.9, 0.7, 0.8, 0.5])
    ]  # fmt: skip
    # Second half: 0.7, 0.8, 0.5 -> changes 0.1, 0.3 -> median 0.2.
    ev = stats.run_summary(rows)["eval"]["finetune/target_test"]
    assert ev["eval_to_eval"] == pytest.approx(0.2)
    assert math.isnan(stats.run_summary(rows[:1])["eval"]["finetune/target_test"]["eval_to_eval"])


def test_summarize_exact_moments_and_t_interval():
    s = stats.summarize([1.0, 2.0, 3.0, 6.0])
    assert s["n"] == 4 and s["mean"] == 3.0 and s["median"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(14 / 3))  # sum of squares 4+1+0+9, ddof=1
    assert (s["min"], s["max"], s["spread"]) == (1.0, 6.0, 5.0)
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2  # t(0.975, 3 dof) s / sqrt(n)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((3.0 - half, 3.0 + half))
    assert s["ci_method"] == "t" and "n=4 is too small" in s["bootstrap"]["skipped"]
    # Clipped to the quantity's range (an accuracy cannot pass 100%).
    clipped = stats.summarize([0.2, 0.9, 0.95, 1.0], bounds=(0.0, 1.0))
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] > 0.0


def test_summarize_counts_nonfinite_and_rejects_empty():
    s = stats.summarize([1.0, math.nan, 3.0])
    assert s["n"] == 2 and s["n_nonfinite"] == 1 and s["mean"] == 2.0
    one = stats.summarize([5.0])
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    with pytest.raises(ValueError, match="empty"):
        stats.summarize([])
    with pytest.raises(ValueError, match="no finite"):
        stats.summarize([math.nan])


def test_t_and_beta_quantiles_against_tables():
    # Student's t table: t(0.975) at 1, 3, 7 dof; the normal limit at large dof.
    for dof, value in ((1, 12.706204736), (3, 3.182446305), (7, 2.364624252)):
        assert stats.t_quantile(0.975, dof) == pytest.approx(value, rel=1e-8)
        assert stats.t_quantile(0.025, dof) == pytest.approx(-value, rel=1e-8)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959963985, rel=1e-5)
    assert stats.t_cdf(0.0, 4.5) == 0.5 and stats.t_cdf(math.inf, 2) == 1.0
    # Beta(a, 1) has quantile q^(1/a); Beta(1, b) has 1 - (1 - q)^(1/b).
    assert stats.beta_quantile(0.3, 2.5, 1) == pytest.approx(0.3 ** (1 / 2.5), abs=1e-12)
    assert stats.beta_quantile(0.3, 1, 4) == pytest.approx(1 - 0.7 ** (1 / 4), abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (2.3, 5.7, 40.0):  # Welch's degrees of freedom are not whole
        for q in (0.6, 0.9, 0.995):
            assert stats.t_quantile(q, dof) == pytest.approx(scipy_stats.t.ppf(q, dof), rel=1e-9)
    assert stats.beta_quantile(0.05, 0.5, 3.5) == pytest.approx(
        scipy_stats.beta.ppf(0.05, 0.5, 3.5), abs=1e-12
    )


def _coverage(lo, hi, mu) -> float:
    return float(np.mean((lo <= mu) & (mu <= hi)))


def test_t_interval_coverage_at_the_sample_sizes_of_a_study():
    """Nominal 95%: within 0.01 of it for normal values, and above 0.92 (within 0.03) for
    a skewed gamma (shape 4, skewness 1), at n = 3, 4, 8. 20000 samples each: the
    simulation's own standard error is 0.0015."""
    rng = np.random.default_rng(0)
    for n in (3, 4, 8):
        normal = rng.normal(0.7, 0.1, size=(20000, n))
        cov = _coverage(*stats.mean_intervals(normal), 0.7)
        assert abs(cov - 0.95) <= 0.01, (n, cov)
        skewed = rng.gamma(4.0, 1.0, size=(20000, n))  # mean 4
        cov = _coverage(*stats.mean_intervals(skewed), 4.0)
        assert 0.92 <= cov <= 0.96, (n, cov)


def test_percentile_bootstrap_under_covers_at_n4():
    """What the report printed before: the same normal-values check fails for the 95%
    percentile bootstrap of the mean at n = 4 (it covers ~80%)."""
    rng = np.random.default_rng(1)
    samples = rng.normal(0.7, 0.1, size=(1000, 4))
    idx = rng.integers(0, 4, size=(1000, 500, 4))
    means = np.take_along_axis(samples[:, None, :], idx, axis=2).mean(axis=2)
    lo, hi = np.quantile(means, [0.025, 0.975], axis=1)
    cov = _coverage(lo, hi, 0.7)
    assert cov < 0.88, cov
    assert abs(_coverage(*stats.mean_intervals(samples), 0.7) - 0.95) <= 0.02


def test_bca_bootstrap_refuses_small_n_and_holds_at_its_minimum():
    with pytest.raises(ValueError, match="n=8 is too small for a bootstrap"):
        stats.bca_interval(np.arange(8.0))
    rng = np.random.default_rng(2)
    n = stats.BOOTSTRAP_MIN_N
    hits = [
        lo <= 0.7 <= hi
        for lo, hi in (
            stats.bca_interval(rng.normal(0.7, 0.1, n), n_boot=1000, seed=i) for i in range(400)
        )
    ]
    assert abs(np.mean(hits) - 0.95) <= 0.04  # 400 samples: standard error 0.011
    s = stats.summarize(rng.normal(0.7, 0.1, n))
    assert s["bootstrap"]["method"] == "bca" and s["bootstrap"]["ci_low"] < s["mean"]


def _binom_pmf(k, n, p):
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def test_clopper_pearson_exact_coverage_and_wilson_dips():
    """Exact coverage (a sum over outcomes, no simulation) at 99 true rates: >= 0.95 for
    Clopper-Pearson at n = 3, 4, 8; Wilson's falls below 0.9 at some rate."""
    ps = np.linspace(0.01, 0.99, 99)
    for n in (3, 4, 8):
        for interval, holds in ((stats.proportion_interval, True), (stats.wilson, False)):
            limits = [interval(k, n) for k in range(n + 1)]
            cov = [
                sum(_binom_pmf(k, n, p) for k, (lo, hi) in enumerate(limits) if lo <= p <= hi)
                for p in ps
            ]
            assert (min(cov) >= 0.95 - 1e-12) == holds, (n, interval.__name__, min(cov))
    assert stats.proportion_interval(0, 4) == pytest.approx((0.0, 1 - 0.025**0.25))
    r = stats.rate_summary(1, 4)
    assert (r["rate"], r["ci_method"]) == (0.25, "clopper-pearson")


def _rate_diff_coverage(n, limits_of):
    limits = {(a, b): limits_of(a, b) for a in range(n + 1) for b in range(n + 1)}
    covs = []
    for p1, p2 in itertools.product(np.linspace(0.02, 0.98, 25), repeat=2):
        covs.append(
            sum(
                _binom_pmf(a, n, p1) * _binom_pmf(b, n, p2)
                for (a, b), (lo, hi) in limits.items()
                if lo <= p1 - p2 <= hi
            )
        )
    return min(covs), float(np.mean(covs))


def test_rate_difference_interval_coverage_at_n4():
    """Newcombe's hybrid interval from Clopper-Pearson limits: exact coverage >= 0.92 at
    every pair of true rates with 4 runs an arm, >= 0.95 on average; from Wilson limits
    (his original) it dips below 0.9."""

    def cp(a, b):
        r = stats.compare_rates(a, 4, b, 4)
        return r["ci_low"], r["ci_high"]

    def wilson_based(a, b):
        (la, ua), (lb, ub), pa, pb = stats.wilson(a, 4), stats.wilson(b, 4), a / 4, b / 4
        d = pa - pb
        return d - math.hypot(pa - la, ub - pb), d + math.hypot(ua - pa, pb - lb)

    low, mean = _rate_diff_coverage(4, cp)
    assert low >= 0.92 and mean >= 0.95, (low, mean)
    assert _rate_diff_coverage(4, wilson_based)[0] < 0.9
    # 4/4 against 0/4: difference 1, lower limit 1 - sqrt(2) * (1 - 0.025^(1/4)).
    r = stats.compare_rates(4, 4, 0, 4, lower_is_better=False)
    assert r["diff"] == 1.0 and r["ci_high"] == 1.0
    assert r["ci_low"] == pytest.approx(1 - math.sqrt(2) * (1 - 0.025**0.25))
    assert r["verdict"] == "better" and r["p_better"] > 0.99


def test_prob_rate_lower_against_monte_carlo():
    rng = np.random.default_rng(4)
    for (ka, na), (kb, nb) in (((1, 4), (3, 4)), ((0, 8), (2, 8)), ((5, 6), (2, 5))):
        exact = stats.prob_rate_lower(ka, na, kb, nb)
        pa = rng.beta(ka + 1, na - ka + 1, 200_000)
        pb = rng.beta(kb + 1, nb - kb + 1, 200_000)
        assert exact == pytest.approx(np.mean(pa < pb), abs=0.005)
        assert exact + stats.prob_rate_lower(kb, nb, ka, na) == pytest.approx(1.0)
    assert stats.prob_rate_lower(2, 4, 2, 4) == pytest.approx(0.5)


def test_compare_means_welch_by_hand():
    a, b = [0.9, 0.8, 0.85, 0.95], [0.6, 0.65, 0.55]
    r = stats.compare_means(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    diff = np.mean(a) - np.mean(b)
    half = stats.t_quantile(0.975, dof) * se
    assert r["method"] == "welch" and r["dof"] == pytest.approx(dof)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff - half, diff + half))
    assert r["p_better"] == pytest.approx(stats.t_cdf(diff / se, dof))
    assert r["verdict"] == "better" and r["ci_low"] > 0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert r["p_better"] == pytest.approx(scipy_stats.t.cdf(diff / se, dof), rel=1e-9)


def test_compare_means_p_better_agrees_with_the_interval():
    # P(better) passes 0.975 exactly where the 95% interval leaves zero.
    rng = np.random.default_rng(5)
    for shift in np.linspace(-0.3, 0.3, 25):
        r = stats.compare_means(rng.normal(shift, 0.1, 4), rng.normal(0, 0.1, 5))
        assert (r["p_better"] > 0.975) == (r["ci_low"] > 0)
        assert (r["p_better"] < 0.025) == (r["ci_high"] < 0)
        assert (r["verdict"] == stats.NO_EFFECT) == (r["ci_low"] <= 0 <= r["ci_high"])
    lower = stats.compare_means([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], higher_is_better=False)
    assert lower["verdict"] == "worse" and lower["p_better"] < 0.01


def test_compare_means_paired_sees_what_welch_cannot():
    # Each seed moves both arms alike; the arm adds 0.02 with a little noise.
    seed_effect = np.array([0.5, 0.7, 0.9, 0.6])
    base = seed_effect
    arm = seed_effect + np.array([0.021, 0.019, 0.020, 0.022])
    paired = stats.compare_means(arm, base, paired=True)
    welch = stats.compare_means(arm, base)
    d = arm - base
    half = stats.t_quantile(0.975, 3) * d.std(ddof=1) / 2
    assert paired["method"] == "paired" and paired["dof"] == 3
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx(
        (d.mean() - half, d.mean() + half)
    )
    assert paired["verdict"] == "better" and welch["verdict"] == stats.NO_EFFECT
    with pytest.raises(ValueError, match="as many values"):
        stats.compare_means([1.0, 2.0], [1.0], paired=True)
    one = stats.compare_means([1.0], [0.5, 0.7])
    assert math.isnan(one["ci_low"]) and one["verdict"] == "too few runs for an interval"


def test_compare_arms_pairs_runs_by_seed_and_names_the_baseline():
    base = {"aug0": 0.70, "aug1": 0.60, "aug2": 0.80}
    values = {
        "padding=4": base,
        "padding=3": {k: v + 0.05 + 0.001 * i for i, (k, v) in enumerate(base.items())},
        "lr=0.5x": {"aug5": 0.7, "aug6": 0.4},  # other seeds: not paired
    }
    out = stats.compare_arms(values)
    assert out["baseline"] == "padding=4" and out["arms"]["padding=4"]["vs_baseline"] is None
    pad3 = out["arms"]["padding=3"]
    assert pad3["vs_baseline"]["method"] == "paired" and pad3["vs_baseline"]["verdict"] == "better"
    assert pad3["summary"]["n"] == 3
    lr = out["arms"]["lr=0.5x"]["vs_baseline"]
    assert lr["method"] == "welch" and lr["verdict"] == stats.NO_EFFECT
    assert stats.compare_arms(values, baseline="lr=0.5x")["arms"]["lr=0.5x"]["vs_baseline"] is None
    with pytest.raises(ValueError, match="baseline arm 'x' is not one of"):
        stats.compare_arms(values, baseline="x")
    with pytest.raises(ValueError, match="empty"):
        stats.compare_arms({})
    nan_arm = stats.compare_arms({"a": base, "b": {"s": math.nan}})["arms"]["b"]
    assert nan_arm["summary"]["n"] == 0 and "error" in nan_arm["vs_baseline"]


def test_compare_arm_rates():
    out = stats.compare_arm_rates({"base": (3, 4), "warmup": (0, 4), "clip": (3, 4)})
    assert out["baseline"] == "base" and out["arms"]["base"]["vs_baseline"] is None
    warm = out["arms"]["warmup"]
    assert warm["rate"]["rate"] == 0.0 and warm["vs_baseline"]["diff"] == -0.75
    assert warm["vs_baseline"]["p_better"] > 0.9  # fewer drop-offs is better
    assert warm["vs_baseline"]["verdict"] == stats.NO_EFFECT  # 4 runs cannot tell
    assert out["arms"]["clip"]["vs_baseline"]["p_better"] == pytest.approx(0.5)


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
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    r = stats.welch_t(a, b)
    assert r["statistic"] == pytest.approx((2.5 - 4.0) / math.sqrt(va + vb))
    assert r["dof"] == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2))
    assert r["p_value"] == pytest.approx(2 * stats.t_cdf(r["statistic"], r["dof"]))
    assert 0.1 < r["p_value"] < 0.5


def test_compare_groups():
    a, b = [0.90, 0.92, 0.88, 0.91], [0.60, 0.90, 0.93, 0.68]
    r = stats.compare_groups(a, b, seed=0, test="permutation")
    assert r["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    welch = stats.compare_means(a, b)
    assert (r["diff_ci_low"], r["diff_ci_high"]) == (welch["ci_low"], welch["ci_high"])
    assert r["ci_method"] == "welch" and r["diff_ci_low"] < r["diff"] < r["diff_ci_high"]
    # a beats 0.60 and 0.68 always (8 pairs); 0.90: beaten by 0.92 and 0.91, tied by
    # 0.90 (2 + 1/2); 0.93: never. (8 + 2.5) / 16.
    assert r["p_improvement"] == pytest.approx(10.5 / 16)
    assert r["test"]["name"] == "permutation" and r["test"]["exact"]
    assert stats.compare_groups(a, b)["test"]["name"] == "welch_t"
    # No spread: Welch's t is undefined, the permutation test is not.
    flat = stats.compare_groups([1.0, 1.0], [0.0, 0.0])
    assert flat["test"]["name"] == "permutation"
    with pytest.raises(ValueError, match="test must be"):
        stats.compare_groups(a, b, test="mann-whitney")


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
