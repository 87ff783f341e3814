"""The statistics a seed study reports, from metrics rows and drop-off events.

Per run (:func:`run_summary`); across runs (:func:`summarize`: mean with Student's t
interval, which holds its level at the 3-8 runs of a study where a bootstrap does not;
:func:`dropoff_rate`, :func:`rate_summary`: Clopper-Pearson intervals); arms against a
baseline arm (:func:`compare_arms`: Welch or paired t-interval of the difference and
P(better); :func:`compare_arm_rates`: Newcombe's interval of a difference of rates);
group A vs B (:func:`compare_groups`: difference of means with Welch's interval, P(A > B),
Welch's t or a permutation test); per-factor
variance in a hold-others-fixed design (:func:`variance_decomposition`, after Bouthillier
et al. 2021, "Accounting for variance in machine learning benchmarks"); and which
drop-offs are shared by every run of a study (:func:`attribute_events`).

Every random draw comes from a ``numpy.random.Generator`` seeded by the caller, so a
report is a pure function of its inputs. The t and beta distributions are computed here
(:func:`t_quantile`, :func:`beta_quantile`), so the intervals need no scipy.
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics

import numpy as np


def run_summary(rows, k_last: int = 3, n_loss: int = 10) -> dict:
    """Summarizes one run's metrics rows.

    Args:
        rows: the run's metrics rows (train and eval), in logged order.
        k_last: how many final evals to average (one eval moves 10-20 points on the
            digits default, so the mean of the last few is steadier than the last).
        n_loss: how many final finite training losses of a phase to average.

    Returns:
        ``{"eval": {"phase/split": {"final", "best", "best_step", "last_k_mean",
        "final_step", "n_evals", "eval_to_eval"}}, "train": {"phase": {"final_loss",
        "final_step", "n_steps", "n_nonfinite"}}}``; ``eval_to_eval`` is the median absolute
        change between consecutive evals over the phase's second half (its last
        ``max(2, ceil(n/2))`` evals; NaN below 2 evals): how much one eval moves.
    """
    if k_last < 1 or n_loss < 1:
        raise ValueError(f"k_last and n_loss must be >= 1, got {k_last} and {n_loss}")
    evals, losses = collections.defaultdict(list), collections.defaultdict(list)
    for row in rows:
        if row.get("kind") == "eval":
            evals[f"{row['phase']}/{row['split']}"].append((row["step"], row["accuracy"]))
        elif row.get("kind") == "train":
            losses[row["phase"]].append((row["step"], row["loss"]))
    out = {"eval": {}, "train": {}}
    for key, points in evals.items():
        steps, accs = zip(*points, strict=True)
        accs = np.asarray(accs, dtype=np.float64)
        best = int(np.nanargmax(accs)) if np.isfinite(accs).any() else len(accs) - 1
        out["eval"][key] = {
            "final": float(accs[-1]),
            "best": float(accs[best]),
            "best_step": steps[best],
            "last_k_mean": float(np.mean(accs[-k_last:])),
            "final_step": steps[-1],
            "n_evals": len(accs),
            "eval_to_eval": _eval_to_eval(accs),
        }
    for phase, points in losses.items():
        steps, values = zip(*points, strict=True)
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        out["train"][phase] = {
            "final_loss": float(np.mean(finite[-n_loss:])) if finite.size else math.nan,
            "final_step": steps[-1],
            "n_steps": len(values),
            "n_nonfinite": int(values.size - finite.size),
        }
    return out


def _eval_to_eval(accs: np.ndarray) -> float:
    tail = accs[-max(2, (accs.size + 1) // 2) :]
    steps = np.abs(np.diff(tail))
    steps = steps[np.isfinite(steps)]
    return float(np.median(steps)) if steps.size else math.nan


def _clean(values, name: str = "values") -> tuple[np.ndarray, int]:
    """Finite values as float64, and how many were not finite."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError(f"{name} holds no finite value")
    return finite, int(x.size - finite.size)


# ----------------------------------------------------------------------------- distributions


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"the incomplete beta function did not converge at a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b): the Beta(a, b) CDF at x."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _bisect(f, lo: float, hi: float, target: float) -> float:
    """x in [lo, hi] with f(x) = target, for f increasing (to double precision)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def beta_quantile(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b)."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    return _bisect(lambda x: betainc(a, b, x), 0.0, 1.0, q)


def t_cdf(t: float, dof: float) -> float:
    """The CDF of Student's t with ``dof`` (> 0, not necessarily whole) degrees of freedom."""
    if not dof > 0:
        raise ValueError(f"t_cdf needs dof > 0, got {dof}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(dof / 2, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, dof: float) -> float:
    """The q-quantile of Student's t (scipy.stats.t.ppf, without scipy)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1 - q, dof)
    hi = 1.0
    while t_cdf(hi, dof) < q:
        hi *= 2
    return _bisect(lambda t: t_cdf(t, dof), 0.0, hi, q)


# ----------------------------------------------------------------------------- intervals

# Below this many values a bootstrap interval of the mean under-covers badly (a 95%
# percentile bootstrap covers ~80% at n = 4 and ~87% at n = 8, tests/test_stats.py): the
# t-interval is the study's interval, a bootstrap only an extra where n is this large.
BOOTSTRAP_MIN_N = 30


def _z(ci: float) -> float:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    return statistics.NormalDist().inv_cdf((1 + ci) / 2)


def bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``x``."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def bca_interval(values, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> tuple:
    """The bias-corrected and accelerated (BCa) bootstrap interval of the mean.

    Refuses fewer than ``BOOTSTRAP_MIN_N`` values, where no bootstrap holds its level.
    """
    x, _ = _clean(values)
    if x.size < BOOTSTRAP_MIN_N:
        raise ValueError(
            f"n={x.size} is too small for a bootstrap interval of the mean (below "
            f"n={BOOTSTRAP_MIN_N} it under-covers: a 95% percentile bootstrap covers ~80% at "
            "n=4); use the t-interval"
        )
    normal = statistics.NormalDist()
    boot = bootstrap_means(x, n_boot, np.random.default_rng(seed))
    below = (np.sum(boot < x.mean()) + 0.5 * np.sum(boot == x.mean())) / n_boot
    z0 = normal.inv_cdf(min(max(below, 0.5 / n_boot), 1 - 0.5 / n_boot))
    jack = (x.sum() - x) / (x.size - 1)
    d = jack.mean() - jack
    denom = 6 * float(np.sum(d * d)) ** 1.5
    accel = float(np.sum(d**3)) / denom if denom > 0 else 0.0
    z = _z(ci)
    levels = [normal.cdf(z0 + (z0 + zz) / (1 - accel * (z0 + zz))) for zz in (-z, z)]
    lo, hi = np.quantile(boot, levels)
    return float(lo), float(hi)


def mean_intervals(samples, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student's t intervals of the mean of each row of ``samples`` (shape (..., n)).

    Its coverage holds at any n >= 2 for normal values, and stays near it for moderately
    skewed ones (tests/test_stats.py simulates both at n = 3, 4, 8).
    """
    x = np.asarray(samples, dtype=np.float64)
    n = x.shape[-1]
    if n < 2:
        raise ValueError(f"a t-interval needs >= 2 values, got {n}")
    half = t_quantile((1 + ci) / 2, n - 1) * x.std(axis=-1, ddof=1) / math.sqrt(n)
    mean = x.mean(axis=-1)
    return mean - half, mean + half


def mean_interval(values, ci: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of finite ``values``; NaNs for a single value."""
    x, _ = _clean(values)
    if x.size < 2:
        return math.nan, math.nan
    lo, hi = mean_intervals(x, ci)
    return float(lo), float(hi)


def summarize(
    values, ci: float = 0.95, n_boot: int = 2000, seed: int = 0, bounds=(-math.inf, math.inf)
) -> dict:
    """Across-run statistics of one quantity.

    Non-finite values (a diverged run's loss) are left out and counted in
    ``n_nonfinite``, so they are reported, not hidden.

    Args:
        values: one number per run.
        ci: the confidence level.
        n_boot: resamples of the BCa bootstrap interval, computed only where there are at
            least ``BOOTSTRAP_MIN_N`` values (else ``bootstrap`` says why not).
        seed: seed of the bootstrap's numpy Generator.
        bounds: the range the quantity lives in (an accuracy: (0, 1)); the interval is
            clipped to it, which cannot lower its coverage (the true mean is inside).

    Returns:
        ``{"n", "n_nonfinite", "mean", "std", "median", "min", "max", "spread", "ci_low",
        "ci_high", "ci", "ci_method": "t", "bootstrap": {"ci_low", "ci_high", "method"} or
        {"skipped": why}}``; std and the t-interval are NaN for a single run.
    """
    x, n_bad = _clean(values)
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    lo, hi = mean_interval(x, ci)
    if x.size > 1:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    try:
        b_lo, b_hi = bca_interval(x, n_boot, seed, ci)
        boot = {"ci_low": b_lo, "ci_high": b_hi, "method": "bca"}
    except ValueError as e:
        boot = {"skipped": str(e)}
    return {
        "n": int(x.size),
        "n_nonfinite": n_bad,
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
        "median": float(np.median(x)),
        "min": float(x.min()),
        "max": float(x.max()),
        "spread": float(x.max() - x.min()),
        "ci_low": lo,
        "ci_high": hi,
        "ci": ci,
        "ci_method": "t",
        "bootstrap": boot,
    }


def proportion_interval(k: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson (exact) interval of a proportion k/n.

    Its coverage is at least ``ci`` at every true proportion and every n (conservative);
    Wilson's dips below it at small n (0/4 gives [0, 0.60] here, [0, 0.49] by Wilson).
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    alpha = 1 - ci
    lo = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def rate_summary(k: int, n: int, ci: float = 0.95) -> dict:
    """``{"k", "n", "rate", "ci_low", "ci_high", "ci", "ci_method"}`` of k events in n runs."""
    lo, hi = proportion_interval(k, n, ci)
    return {"k": k, "n": n, "rate": k / n, "ci_low": lo, "ci_high": hi, "ci": ci,
            "ci_method": "clopper-pearson"}  # fmt: skip


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is usable at the small n
    of a diagnosis (0/4 gives [0, 0.49], 4/4 gives [0.51, 1]).
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ----------------------------------------------------------------------------- arms

NO_EFFECT = "no detectable effect"


def _verdict(lo: float, hi: float, diff: float, higher_is_better: bool) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "too few runs for an interval"
    if lo <= 0 <= hi:
        return NO_EFFECT
    return "better" if (diff > 0) == higher_is_better else "worse"


def compare_means(
    arm,
    baseline,
    *,
    paired: bool = False,
    ci: float = 0.95,
    higher_is_better: bool = True,
    bounds=(-math.inf, math.inf),
) -> dict:
    """An arm's mean against the baseline's: the difference, its t-interval, P(better).

    Independent runs: Welch's interval (unequal variances, Welch-Satterthwaite degrees of
    freedom). Runs paired by seed (``paired``: ``arm[i]`` and ``baseline[i]`` share every
    seed): the paired t-interval of the differences; a pair with a non-finite value is
    left out.

    ``p_better`` is the probability that the arm's true mean is better than the
    baseline's (higher, or lower with ``higher_is_better=False``) under the same t
    approximation of the difference's posterior (flat prior): ``F_t(diff / se; dof)``.
    It exceeds (1 + ci) / 2 exactly when the interval excludes zero on the better side.
    With ``bounds`` (the range of the values, e.g. (0, 1)) the interval is clipped to the
    differences possible, +-(high - low).

    Returns:
        ``{"n_arm", "n_baseline", "mean_arm", "mean_baseline", "diff", "se", "dof",
        "ci_low", "ci_high", "ci", "method" ('welch' | 'paired'), "p_better",
        "verdict" ('no detectable effect' | 'better' | 'worse' | 'too few runs ...')}``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if paired:
        a = np.asarray(arm, dtype=np.float64).ravel()
        b = np.asarray(baseline, dtype=np.float64).ravel()
        if a.size != b.size:
            raise ValueError(
                f"paired runs need as many values in each arm, got {a.size} and {b.size}"
            )
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        if a.size == 0:
            raise ValueError("no pair of runs has finite values in both arms")
        d = a - b
        n_a = n_b = int(d.size)
        dof = float(d.size - 1)
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    else:
        a, _ = _clean(arm, "arm")
        b, _ = _clean(baseline, "baseline")
        n_a, n_b = int(a.size), int(b.size)
        if n_a > 1 and n_b > 1:
            va, vb = a.var(ddof=1) / n_a, b.var(ddof=1) / n_b
            se = math.sqrt(va + vb)
            welch = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if se > 0 else 0
            dof = float(welch) if se > 0 else float(n_a + n_b - 2)
        else:
            se, dof = math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if not math.isfinite(se):
        lo = hi = p_higher = math.nan
    elif se == 0:
        lo = hi = diff
        p_higher = 1.0 if diff > 0 else (0.0 if diff < 0 else 0.5)
    else:
        half = t_quantile((1 + ci) / 2, dof) * se
        width = bounds[1] - bounds[0]
        lo, hi = max(diff - half, -width), min(diff + half, width)
        p_higher = t_cdf(diff / se, dof)
    return {
        "n_arm": n_a,
        "n_baseline": n_b,
        "mean_arm": float(a.mean()),
        "mean_baseline": float(b.mean()),
        "diff": diff,
        "se": se,
        "dof": dof,
        "ci_low": lo,
        "ci_high": hi,
        "ci": ci,
        "method": "paired" if paired else "welch",
        "p_better": p_higher if higher_is_better else 1 - p_higher,
        "verdict": _verdict(lo, hi, diff, higher_is_better),
    }


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prob_rate_lower(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """P(p_a < p_b) for the true rates behind k_a/n_a and k_b/n_b: their posteriors under
    uniform priors, Beta(k + 1, n - k + 1), compared exactly (a finite sum)."""
    a1, b1, a2, b2 = k_a + 1, n_a - k_a + 1, k_b + 1, n_b - k_b + 1
    total = sum(
        math.exp(
            _log_beta(a1 + i, b1 + b2) - math.log(b2 + i) - _log_beta(1 + i, b2) - _log_beta(a1, b1)
        )  # fmt: skip
        for i in range(a2)
    )
    return min(1.0, max(0.0, total))


def compare_rates(
    k_arm: int, n_arm: int, k_base: int, n_base: int, *, ci: float = 0.95,
    lower_is_better: bool = True,
) -> dict:  # fmt: skip
    """An arm's event rate (runs with a drop-off, failed runs) against the baseline's.

    The difference's interval is Newcombe's hybrid score interval (his method 10) built
    from the two Clopper-Pearson intervals instead of Wilson's: at 3-16 runs per arm its
    exact coverage stays >= 0.92 at every pair of true rates (~0.98 on average), where
    the Wilson-based one dips to 0.88 (tests/test_stats.py). ``p_better`` is the
    posterior probability that the arm's true rate is better (lower, by default) than
    the baseline's, uniform priors (:func:`prob_rate_lower`).

    Returns:
        ``{"arm": rate_summary, "baseline": rate_summary, "diff", "ci_low", "ci_high",
        "ci", "method": "newcombe-cp", "p_better", "verdict"}``.
    """
    ra, rb = rate_summary(k_arm, n_arm, ci), rate_summary(k_base, n_base, ci)
    pa, pb = ra["rate"], rb["rate"]
    diff = pa - pb
    lo = diff - math.hypot(pa - ra["ci_low"], rb["ci_high"] - pb)
    hi = diff + math.hypot(ra["ci_high"] - pa, pb - rb["ci_low"])
    p_lower = prob_rate_lower(k_arm, n_arm, k_base, n_base)
    return {
        "arm": ra,
        "baseline": rb,
        "diff": diff,
        "ci_low": lo,
        "ci_high": hi,
        "ci": ci,
        "method": "newcombe-cp",
        "p_better": p_lower if lower_is_better else 1 - p_lower,
        "verdict": _verdict(lo, hi, diff, not lower_is_better),
    }


def _first(mapping: dict, baseline, what: str):
    if not mapping:
        raise ValueError(f"{what} is empty: a comparison needs arms")
    baseline = next(iter(mapping)) if baseline is None else baseline
    if baseline not in mapping:
        raise ValueError(f"baseline arm {baseline!r} is not one of {list(mapping)}")
    return baseline


def compare_arms(
    values_by_arm: dict,
    *,
    baseline=None,
    ci: float = 0.95,
    higher_is_better: bool = True,
    bounds=(-math.inf, math.inf),
) -> dict:
    """Each arm's distribution of one quantity, and its difference to the baseline arm.

    Args:
        values_by_arm: arm -> {pairing key: value}, one value per run; the key names the
            run's seeds (its varied seeds), so that an arm whose keys are the baseline's
            is compared run for run (paired t), any other by Welch's interval.
        baseline: the baseline arm (default: the first).
        ci: the confidence level.
        higher_is_better: whether a higher value is better (accuracy) or not (loss).
        bounds: the range the quantity lives in (see :func:`summarize`).

    Returns:
        ``{"baseline", "arms": {arm: {"summary": summarize(...) or {"n": 0, "error"},
        "vs_baseline": compare_means(...) or None (the baseline) or {"error"}}}}``.
    """
    baseline = _first(values_by_arm, baseline, "values_by_arm")
    base = values_by_arm[baseline]
    arms = {}
    for arm, values in values_by_arm.items():
        entry = {}
        try:
            entry["summary"] = summarize(list(values.values()), ci=ci, bounds=bounds)
        except ValueError as e:
            entry["summary"] = {"n": 0, "n_nonfinite": len(values), "error": str(e)}
        entry["vs_baseline"] = None
        if arm != baseline:
            paired = set(values) == set(base) and len(values) > 1
            keys = list(base)
            a = [values[k] for k in keys] if paired else list(values.values())
            b = [base[k] for k in keys] if paired else list(base.values())
            try:
                entry["vs_baseline"] = compare_means(
                    a, b, paired=paired, ci=ci, higher_is_better=higher_is_better, bounds=bounds
                )
            except ValueError as e:
                entry["vs_baseline"] = {"error": str(e)}
        arms[arm] = entry
    return {"baseline": baseline, "arms": arms}


def compare_arm_rates(counts_by_arm: dict, *, baseline=None, ci: float = 0.95) -> dict:
    """Each arm's rate of an unwanted event (k runs of n), against the baseline arm.

    Returns:
        ``{"baseline", "arms": {arm: {"rate": rate_summary, "vs_baseline":
        compare_rates or None (the baseline)}}}``.
    """
    baseline = _first(counts_by_arm, baseline, "counts_by_arm")
    kb, nb = counts_by_arm[baseline]
    return {
        "baseline": baseline,
        "arms": {
            arm: {
                "rate": rate_summary(k, n, ci),
                "vs_baseline": None if arm == baseline else compare_rates(k, n, kb, nb, ci=ci),
            }
            for arm, (k, n) in counts_by_arm.items()
        },
    }


def dropoff_rate(events_by_run: dict) -> dict:
    """The fraction of runs with at least one drop-off, per phase and metric.

    Args:
        events_by_run: run name -> its events (a run without events still counts).

    Returns:
        ``{"phase/metric": {"rate", "n_with", "n_runs", "steps", "runs"}}`` where
        ``steps`` lists every event's step (sorted) and ``runs`` the runs with one.
    """
    if not events_by_run:
        raise ValueError("events_by_run is empty: a drop-off rate needs runs")
    steps, runs = collections.defaultdict(list), collections.defaultdict(set)
    for run, events in events_by_run.items():
        for e in events:
            key = f"{e['phase']}/{e['metric']}"
            steps[key].append(e["step"])
            runs[key].add(run)
    n = len(events_by_run)
    return {
        key: {
            "rate": len(runs[key]) / n,
            "n_with": len(runs[key]),
            "n_runs": n,
            "steps": sorted(steps[key]),
            "runs": sorted(runs[key]),
        }
        for key in sorted(steps)
    }


def prob_improvement(a, b) -> float:
    """P(A > B): the fraction of (a, b) pairs with a > b, ties counting 1/2."""
    a, _ = _clean(a, "a")
    b, _ = _clean(b, "b")
    diff = a[:, None] - b[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def welch_t(a, b) -> dict:
    """Welch's unequal-variance t-test (two-sided)."""
    a, _ = _clean(a, "a")
    b, _ = _clean(b, "b")
    if a.size < 2 or b.size < 2:
        raise ValueError("Welch's t-test needs >= 2 values per group")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        raise ValueError("Welch's t-test is undefined: both groups are constant")
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p = 2 * (1 - t_cdf(abs(t), dof))
    return {"name": "welch_t", "statistic": float(t), "dof": float(dof), "p_value": p}


def permutation_test(a, b, n_perm: int = 10000, seed: int = 0) -> dict:
    """Two-sided permutation test of the difference of means.

    Exact (every split of the pooled values) when there are at most ``n_perm``
    splits, else Monte Carlo with ``p = (hits + 1) / (n_perm + 1)``.

    Returns:
        ``{"name", "statistic" (mean a - mean b), "p_value", "exact", "n_perm"}``.
    """
    a, _ = _clean(a, "a")
    b, _ = _clean(b, "b")
    pooled, na = np.concatenate([a, b]), a.size
    observed = a.mean() - b.mean()
    # A relative tolerance so that splits equal to the observed one up to rounding count.
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    n_splits = math.comb(pooled.size, na)
    if n_splits <= n_perm:
        mask = np.zeros((n_splits, pooled.size), dtype=bool)
        for i, idx in enumerate(itertools.combinations(range(pooled.size), na)):
            mask[i, list(idx)] = True
        exact = True
    else:
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((n_perm, pooled.size)), axis=1)
        mask = np.zeros((n_perm, pooled.size), dtype=bool)
        np.put_along_axis(mask, order[:, :na], True, axis=1)
        exact = False
    diffs = (mask * pooled).sum(1) / na - (~mask * pooled).sum(1) / (pooled.size - na)
    hits = int((np.abs(diffs) >= abs(observed) - tol).sum())
    p = hits / n_splits if exact else (hits + 1) / (n_perm + 1)
    return {
        "name": "permutation",
        "statistic": float(observed),
        "p_value": float(p),
        "exact": exact,
        "n_perm": int(n_splits if exact else n_perm),
    }


def compare_groups(a, b, seed: int = 0, ci: float = 0.95, test: str = "auto") -> dict:
    """Group A vs group B (e.g. final accuracy under two configs).

    Args:
        a: one value per run of group A.
        b: one value per run of group B.
        seed: seed of the Monte-Carlo permutations (where there are too many splits).
        ci: confidence level of the interval of the difference (Welch's t-interval).
        test: 'welch', 'permutation', or 'auto' (Welch where both groups have >= 2
            values and some spread, else permutation).

    Returns:
        ``{"n_a", "n_b", "mean_a", "mean_b", "diff", "diff_ci_low", "diff_ci_high",
        "ci", "ci_method": "welch", "p_improvement", "test": {...}}``; the interval is NaN
        where a group has a single value.
    """
    if test not in ("auto", "welch", "permutation"):
        raise ValueError(f"test must be 'auto', 'welch' or 'permutation', got {test!r}")
    xa, _ = _clean(a, "a")
    xb, _ = _clean(b, "b")
    diff = compare_means(xa, xb, ci=ci)
    if test == "auto":
        spread = xa.size > 1 and xb.size > 1 and (xa.var() + xb.var()) > 0
        test = "welch" if spread else "permutation"
    result = welch_t(xa, xb) if test == "welch" else permutation_test(xa, xb, seed=seed)
    return {
        "n_a": int(xa.size),
        "n_b": int(xb.size),
        "mean_a": float(xa.mean()),
        "mean_b": float(xb.mean()),
        "diff": diff["diff"],
        "diff_ci_low": diff["ci_low"],
        "diff_ci_high": diff["ci_high"],
        "ci": ci,
        "ci_method": "welch",
        "p_improvement": prob_improvement(xa, xb),
        "test": result,
    }


def _seed_records(records) -> tuple[list[dict], np.ndarray, list[str]]:
    """Validated seeds dicts, values, and the seed names (all records share them)."""
    if len(records) < 2:
        raise ValueError(f"a variance decomposition needs >= 2 records, got {len(records)}")
    seeds, values = [], []
    names = None
    for i, rec in enumerate(records):
        if not isinstance(rec.get("seeds"), dict) or "value" not in rec:
            raise ValueError(f"record {i} must be {{'seeds': {{...}}, 'value': float}}")
        if names is None:
            names = list(rec["seeds"])
        elif set(rec["seeds"]) != set(names):
            raise ValueError(f"record {i} has seeds {sorted(rec['seeds'])}, record 0 {names}")
        if not math.isfinite(float(rec["value"])):
            raise ValueError(f"record {i} has a non-finite value {rec['value']!r}")
        seeds.append(rec["seeds"])
        values.append(float(rec["value"]))
    return seeds, np.asarray(values), names


def _held_fixed_variance(seeds, values, factor, names, ddof) -> tuple[float, int]:
    """Mean over the settings of the other factors of the variance across ``factor``."""
    groups = collections.defaultdict(list)
    for s, v in zip(seeds, values, strict=True):
        groups[tuple(s[n] for n in names if n != factor)].append((s[factor], v))
    variances = [
        np.var([v for _, v in g], ddof=ddof)
        for g in groups.values()
        if len({f for f, _ in g}) >= 2 and len(g) > ddof
    ]
    if not variances:
        return math.nan, 0
    return float(np.mean(variances)), len(variances)


def _grid_anova(seeds, values, factors) -> dict | None:
    """Main-effect variances of a complete, balanced grid over ``factors`` (else None).

    With population variances (ddof=0) the decomposition is exact:
    ``total = sum(main) + interaction``, each term >= 0.
    """
    levels = [sorted({s[f] for s in seeds}) for f in factors]
    counts = collections.Counter(tuple(s[f] for f in factors) for s in seeds)
    n_cells = math.prod(len(lv) for lv in levels)
    if len(counts) != n_cells or len(set(counts.values())) != 1:
        return None
    main = {}
    for f in factors:
        marginal = collections.defaultdict(list)
        for s, v in zip(seeds, values, strict=True):
            marginal[s[f]].append(v)
        main[f] = float(np.var([np.mean(v) for v in marginal.values()]))
    total = float(np.var(values))
    return {"main": main, "interaction": total - sum(main.values()), "total": total}


def variance_decomposition(records, factors=None, ddof: int = 1) -> dict:
    """Per-factor variance of a result over a grid of factor seeds.

    Hold-others-fixed (Bouthillier et al. 2021): for each factor, the variance of the
    value across that factor's seeds with every other seed held fixed, averaged over
    the fixed settings that vary it. Works for one-factor-at-a-time designs and for
    full grids. In a grid a factor's held-fixed variance also holds its interactions,
    so ``residual = total - sum(per-factor)`` is 0 for an additive effect and negative
    where factors interact; a complete balanced grid also gets an exact ANOVA split
    (``grid``: main effects and interaction, population variances).

    Args:
        records: ``[{"seeds": {factor: seed}, "value": float}]``.
        factors: the factors to report (default: every seed that takes >= 2 values).
        ddof: delta degrees of freedom of the held-fixed and total variances.

    Returns:
        ``{"factors": {f: {"variance", "std", "n_settings", "n_seeds", "fraction"}},
        "total", "residual", "grid", "n_records", "ddof"}``.
    """
    seeds, values, names = _seed_records(records)
    if factors is None:
        factors = [n for n in names if len({s[n] for s in seeds}) >= 2]
    unknown = [f for f in factors if f not in names]
    if unknown or not factors:
        raise ValueError(f"factors {unknown or factors} are not varied seeds of {names}")
    total = float(np.var(values, ddof=ddof))
    out = {}
    for f in factors:
        var, n_settings = _held_fixed_variance(seeds, values, f, names, ddof)
        out[f] = {
            "variance": var,
            "std": math.sqrt(var) if var >= 0 else math.nan,
            "n_settings": n_settings,
            "n_seeds": len({s[f] for s in seeds}),
            "fraction": var / total if total > 0 else math.nan,
        }
    explained = sum(v["variance"] for v in out.values() if math.isfinite(v["variance"]))
    return {
        "factors": out,
        "total": total,
        "residual": total - explained,
        "grid": _grid_anova(seeds, values, factors),
        "n_records": len(values),
        "ddof": ddof,
    }


def _check_study(runs, varied) -> list[str]:
    """Validates a study's runs; returns the held-fixed factors (those not varied)."""
    if len(runs) < 2:
        raise ValueError(f"attributing events needs >= 2 runs, got {len(runs)}")
    if not varied or isinstance(varied, str):
        raise ValueError(f"varied must be a non-empty list of factor names, got {varied!r}")
    names = [r.get("run") for r in runs]
    if len(set(names)) != len(names) or None in names:
        raise ValueError(f"runs need unique 'run' names, got {names}")
    seeds = [r.get("seeds") or {} for r in runs]
    keys = set().union(*seeds)
    for f in keys:
        values = {s.get(f) for s in seeds}
        if f in varied and len(values) < 2:
            raise ValueError(f"factor {f!r} is listed as varied but is {values} in every run")
        if f not in varied and len(values) > 1:
            raise ValueError(
                f"factor {f!r} differs across runs {sorted(map(str, values))} "
                "but is not listed in varied"
            )
    missing = [f for f in varied if keys and f not in keys]
    if missing:
        raise ValueError(f"varied factors {missing} are not among the runs' seeds {sorted(keys)}")
    return [f for f in (runs[0].get("seeds") or {}) if f not in varied]


def _cluster(events, window: int) -> list[list[tuple[str, dict]]]:
    """Single-linkage clusters of (run, event) by step: a gap > window starts a new one."""
    events = sorted(events, key=lambda re: re[1]["step"])
    clusters = []
    for run, e in events:
        if clusters and e["step"] - clusters[-1][-1][1]["step"] <= window:
            clusters[-1].append((run, e))
        else:
            clusters.append([(run, e)])
    return clusters


def _suspects(present, runs, varied) -> list[str]:
    """Varied factors whose seeds separate the runs with the event from those without."""
    out = []
    for f in varied:
        have = {str(r["seeds"].get(f)) for r in runs if r["run"] in present and r.get("seeds")}
        lack = {str(r["seeds"].get(f)) for r in runs if r["run"] not in present and r.get("seeds")}
        if have and lack and not have & lack:
            out.append(f)
    return out or list(varied)


def attribute_events(runs, varied, window: int, shared_fraction: float = 1.0) -> list[dict]:
    """Groups the drop-offs of a study's runs and counts in how many runs each is seen.

    Events of all runs are grouped by (phase, metric) and step: events whose steps are
    within ``window`` of the previous one join its group (single linkage). This is
    co-occurrence, not cause (a cause needs an intervention: jaxrepro.diagnose). A group
    seen in every run (at least ``shared_fraction`` of them) co-occurs with what was held
    fixed (a batch of the fixed data order, say); one seen in some runs only co-varies
    with the varied factor(s): where several vary, with those whose seed values separate
    the runs with the event from the runs without (all of them if none does).

    Args:
        runs: ``[{"run": name, "seeds": {factor: seed}, "events": [event, ...]}]``.
        varied: the factors the study varies, e.g. ``["aug"]``.
        window: steps; events of different runs this close are the same event.
        shared_fraction: the fraction of runs that makes a group shared.

    Returns:
        Groups sorted by step: ``{"phase", "metric", "kinds", "step_min", "step_max",
        "runs", "n_runs", "n_total", "fraction", "shared", "co_varies_with", "seen_in",
        "events", "example_ids"}``; ``example_ids`` is None, for the engine to fill.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if not 0 < shared_fraction <= 1:
        raise ValueError(f"shared_fraction must be in (0, 1], got {shared_fraction}")
    held = _check_study(runs, varied)
    by_stream = collections.defaultdict(list)
    for r in runs:
        for e in r.get("events", []):
            by_stream[(e["phase"], e["metric"])].append((r["run"], e))
    groups = []
    for (phase, metric), events in by_stream.items():
        for cluster in _cluster(events, window):
            groups.append(_group(phase, metric, cluster, runs, varied, held, shared_fraction))
    return sorted(groups, key=lambda g: (g["step_min"], g["phase"], g["metric"]))


def _group(phase, metric, cluster, runs, varied, held, shared_fraction) -> dict:
    present = {run for run, _ in cluster}
    fraction = len(present) / len(runs)
    shared = fraction >= shared_fraction - 1e-12
    seen = f"seen in {len(present)} of {len(runs)} runs"
    if shared:
        attributed = held
        what = ", ".join(held) if held else f"everything but {', '.join(varied)}"
        seen += f" (all share the held-fixed factors: {what})"
    else:
        attributed = _suspects(present, runs, varied)
        seen += f" (they differ from the others in {', '.join(attributed)})"
    steps = [e["step"] for _, e in cluster]
    return {
        "phase": phase,
        "metric": metric,
        "kinds": sorted({e["kind"] for _, e in cluster}),
        "step_min": min(steps),
        "step_max": max(steps),
        "runs": sorted(present),
        "n_runs": len(present),
        "n_total": len(runs),
        "fraction": fraction,
        "shared": shared,
        "co_varies_with": list(attributed),
        "seen_in": seen,
        "events": [
            {"run": run, "step": e["step"], "kind": e["kind"], "size": e.get("size")}
            for run, e in cluster
        ],
        "example_ids": None,
    }
