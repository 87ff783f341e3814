"""The statistics a seed study reports, from metrics rows and drop-off events.

Per run (:func:`run_summary`); across runs (:func:`summarize`, :func:`dropoff_rate`);
group A vs B (:func:`compare_groups`: difference of means with a bootstrap CI, P(A > B),
Welch's t with scipy or else a numpy permutation test; scipy is optional); per-factor
variance in a hold-others-fixed design (:func:`variance_decomposition`, after Bouthillier
et al. 2021, "Accounting for variance in machine learning benchmarks"); and which
drop-offs are shared by every run of a study (:func:`attribute_events`).

Every random draw comes from a ``numpy.random.Generator`` seeded by the caller, so a
report is a pure function of its inputs.
"""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np

try:  # optional: Welch's t-test p-value needs the t distribution
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - exercised where scipy is absent
    _scipy_stats = None


def run_summary(rows, k_last: int = 3, n_loss: int = 10) -> dict:
    """Summarizes one run's metrics rows.

    Args:
        rows: the run's metrics rows (train and eval), in logged order.
        k_last: how many final evals to average (one eval moves 10-20 points on the
            digits default, so the mean of the last few is steadier than the last).
        n_loss: how many final finite training losses of a phase to average.

    Returns:
        ``{"eval": {"phase/split": {"final", "best", "best_step", "last_k_mean",
        "final_step", "n_evals"}}, "train": {"phase": {"final_loss", "final_step",
        "n_steps", "n_nonfinite"}}}``.
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


def _clean(values, name: str = "values") -> tuple[np.ndarray, int]:
    """Finite values as float64, and how many were not finite."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError(f"{name} holds no finite value")
    return finite, int(x.size - finite.size)


def bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``x``."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    lo, hi = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def summarize(values, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Across-run statistics of one quantity.

    Non-finite values (a diverged run's loss) are left out and counted in
    ``n_nonfinite``, so they are reported, not hidden.

    Args:
        values: one number per run.
        n_boot: bootstrap resamples for the CI of the mean (percentile method).
        seed: seed of the bootstrap's numpy Generator.
        ci: the confidence level.

    Returns:
        ``{"n", "n_nonfinite", "mean", "std", "min", "max", "spread", "ci_low",
        "ci_high", "ci"}``; std is NaN for a single run.
    """
    x, n_bad = _clean(values)
    lo, hi = _interval(bootstrap_means(x, n_boot, np.random.default_rng(seed)), ci)
    return {
        "n": int(x.size),
        "n_nonfinite": n_bad,
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
        "min": float(x.min()),
        "max": float(x.max()),
        "spread": float(x.max() - x.min()),
        "ci_low": lo,
        "ci_high": hi,
        "ci": ci,
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


def prob_improvement(a, b) -> float:
    """P(A > B): the fraction of (a, b) pairs with a > b, ties counting 1/2."""
    a, _ = _clean(a, "a")
    b, _ = _clean(b, "b")
    diff = a[:, None] - b[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def welch_t(a, b) -> dict:
    """Welch's unequal-variance t-test (two-sided); needs scipy for the p-value."""
    if _scipy_stats is None:
        raise ImportError("scipy is not installed: use permutation_test instead")
    a, _ = _clean(a, "a")
    b, _ = _clean(b, "b")
    if a.size < 2 or b.size < 2:
        raise ValueError("Welch's t-test needs >= 2 values per group")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        raise ValueError("Welch's t-test is undefined: both groups are constant")
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p = 2 * float(_scipy_stats.t.sf(abs(t), dof))
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


def compare_groups(
    a, b, n_boot: int = 2000, seed: int = 0, ci: float = 0.95, test: str = "auto"
) -> dict:
    """Group A vs group B (e.g. final accuracy under two configs).

    Args:
        a: one value per run of group A.
        b: one value per run of group B.
        n_boot: bootstrap resamples of the difference of means (each group resampled
            on its own).
        seed: seed of the numpy Generator (bootstrap and Monte-Carlo permutations).
        ci: confidence level of the interval.
        test: 'welch' (needs scipy), 'permutation', or 'auto' (Welch where scipy is
            installed and both groups have >= 2 values and some spread, else
            permutation).

    Returns:
        ``{"n_a", "n_b", "mean_a", "mean_b", "diff", "diff_ci_low", "diff_ci_high",
        "ci", "p_improvement", "test": {...}}``.
    """
    if test not in ("auto", "welch", "permutation"):
        raise ValueError(f"test must be 'auto', 'welch' or 'permutation', got {test!r}")
    xa, _ = _clean(a, "a")
    xb, _ = _clean(b, "b")
    rng = np.random.default_rng(seed)
    boot = bootstrap_means(xa, n_boot, rng) - bootstrap_means(xb, n_boot, rng)
    lo, hi = _interval(boot, ci)
    if test == "auto":
        spread = xa.size > 1 and xb.size > 1 and (xa.var() + xb.var()) > 0
        test = "welch" if _scipy_stats is not None and spread else "permutation"
    result = welch_t(xa, xb) if test == "welch" else permutation_test(xa, xb, seed=seed)
    return {
        "n_a": int(xa.size),
        "n_b": int(xb.size),
        "mean_a": float(xa.mean()),
        "mean_b": float(xb.mean()),
        "diff": float(xa.mean() - xb.mean()),
        "diff_ci_low": lo,
        "diff_ci_high": hi,
        "ci": ci,
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
