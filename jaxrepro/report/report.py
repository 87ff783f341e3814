"""A seed study's statistics, figures and report.md, from what its runs wrote to disk.

The study (``jaxrepro.study``) loads each finished run into a *record*: ``{"run", "point",
"varied_seeds", "seeds", "status", "workdir", "events", "summary" (stats.run_summary),
"info" (run.json)}`` and optionally ``"arm"``. This module turns records into numbers
(:func:`point_statistics`, :func:`arm_statistics`), figures (:func:`draw_figures`) and
markdown (:func:`write_report`).

Arms: every run belongs to one arm, :func:`arm_of`: its record's ``arm`` where the study
names arms, else its grid point (``--grid``), or the single arm ``all`` of a study
without a grid. The first arm (in the study's order) is the baseline the others are
compared with.

What a run's numbers say (:func:`run_row`): a run *failed* when it stopped on a
non-finite value or its final target accuracy is within ``CHANCE_MARGIN`` of chance
(1 / the number of classes); its backbone is *weak* when its source accuracy at the end
of pretraining is below ``WEAK_BACKBONE``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import statistics

from jaxrepro import stats, trajectory
from jaxrepro.report import figures

QUANTITIES = ("final", "last_k_mean", "best")
CHANCE_MARGIN = 0.05  # a final accuracy this close to chance (or closer) is a failed run
WEAK_BACKBONE = 0.90  # source accuracy at the end of pretraining below this: a weak backbone
SINGLE_ARM = "all"  # the arm of every run of a study without arms or grid
_ARM_QUANTITIES = ("final", "last_k_mean")
_ACC_BOUNDS = (0.0, 1.0)
_EVAL_ORDER = (
    "pretrain/source_test",
    "pretrain/target_test",
    "finetune/target_test",
    "finetune/source_test",
)
_MAIN_KEYS = ("pretrain/source_test", "finetune/target_test")
_QUANTITY_NAMES = dict(final="last eval", last_k_mean="mean of last {k} evals", best="best eval")
_DIGEST_KEYS = """
    seed model.name model.stem data.source.name data.target.name data.image_size
    data.augment.crop.padding optimizer.lr optimizer.schedule pretrain.steps pretrain.epochs
    pretrain.batch_size pretrain.eval_every finetune.steps finetune.batch_size
    finetune.eval_every finetune.lr checkpoint.every
""".split()


def _eval_key_order(key: str):
    return (_EVAL_ORDER.index(key) if key in _EVAL_ORDER else len(_EVAL_ORDER), key)


def _summarize(values, n_boot: int, bounds=(-math.inf, math.inf)) -> dict:
    try:
        return stats.summarize(values, n_boot=n_boot, bounds=bounds)
    except ValueError as e:  # no finite value: say so rather than fail the report
        return {"n": 0, "n_nonfinite": len(values), "error": str(e)}


def _eval_keys(records) -> list[str]:
    keys = set().union(*(r["summary"]["eval"] for r in records))
    return sorted(keys, key=_eval_key_order)


def _values(records, key, quantity) -> list[float]:
    return [r["summary"]["eval"][key][quantity] for r in records if key in r["summary"]["eval"]]


def _variance(records, factors, keys) -> dict:
    """Per-factor variance of each final metric, when more than one factor varies."""
    varied = [f for f in factors if len({r["seeds"][f] for r in records}) > 1]
    if len(varied) < 2:
        return {}
    out = {}
    for key, q in itertools.product(keys, ("final", "last_k_mean")):
        recs = [
            {"seeds": r["seeds"], "value": r["summary"]["eval"][key][q]}
            for r in records
            if key in r["summary"]["eval"] and math.isfinite(r["summary"]["eval"][key][q])
        ]
        try:
            out[f"{key}/{q}"] = stats.variance_decomposition(recs, factors=varied)
        except ValueError as e:
            out[f"{key}/{q}"] = {"error": str(e)}
    return out


def point_statistics(records: list[dict], factors, n_boot: int = 2000) -> dict:
    """Across-run statistics of one grid point's runs.

    Returns:
        ``{"n_runs", "runs", "eval": {"phase/split": {quantity: stats.summarize}},
        "train": {phase: {"final_loss": ...}}, "dropoffs": {"rate": stats.dropoff_rate,
        "runs_with_any", "n_diverged"}, "variance": {"phase/split/quantity": ...}}``.
    """
    keys = _eval_keys(records)
    phases = sorted(set().union(*(r["summary"]["train"] for r in records)))
    events = {r["run"]: r["events"] for r in records}
    return {
        "n_runs": len(records),
        "runs": [r["run"] for r in records],
        "eval": {
            k: {q: _summarize(_values(records, k, q), n_boot, _ACC_BOUNDS) for q in QUANTITIES}
            for k in keys
        },
        "train": {
            p: {
                "final_loss": _summarize(
                    [
                        r["summary"]["train"][p]["final_loss"]
                        for r in records
                        if p in r["summary"]["train"]
                    ],
                    n_boot,
                    (0.0, math.inf),  # a cross-entropy loss is >= 0
                )
            }
            for p in phases
        },
        "dropoffs": {
            "rate": {
                key: dict(r, ci=stats.rate_summary(r["n_with"], r["n_runs"]))
                for key, r in stats.dropoff_rate(events).items()
            },
            "runs_with_any": sorted(run for run, ev in events.items() if ev),
            "n_diverged": sum(r["status"] == "diverged" for r in records),
        },
        "variance": _variance(records, factors, keys),
    }


def arm_of(record: dict) -> str:
    """The run's arm: its record's ``arm``, else its grid point, else ``all``."""
    if record.get("arm"):
        return record["arm"]
    return SINGLE_ARM if record["point"] == "base" else record["point"]


def _by_arm(records) -> dict:
    out = {}
    for r in records:
        out.setdefault(arm_of(r), []).append(r)
    return out


def _pair_key(record) -> str:
    """Runs of two arms with the same varied seeds are paired (the same seeds, one change)."""
    return ",".join(f"{f}={s}" for f, s in sorted(record["varied_seeds"].items()))


def arm_statistics(records: list[dict], ci: float = 0.95) -> dict:
    """Each arm's final accuracies and event rates, and each arm against the baseline.

    Returns:
        ``{"baseline", "arms": [arm, ...], "n_runs": {arm: n}, "paired": {arm: bool},
        "metrics": {"phase/split/quantity": stats.compare_arms(...)}, "rates": {"failed" |
        "dropoff phase/metric": stats.compare_arm_rates(...)}}``; rates count runs.
    """
    by_arm = _by_arm(records)
    if not by_arm:
        return {}
    baseline = next(iter(by_arm))
    rows = {arm: [run_row(r) for r in recs] for arm, recs in by_arm.items()}
    out = {
        "baseline": baseline,
        "arms": list(by_arm),
        "n_runs": {arm: len(recs) for arm, recs in by_arm.items()},
        "paired": {
            arm: {_pair_key(r) for r in recs} == {_pair_key(r) for r in by_arm[baseline]}
            for arm, recs in by_arm.items()
        },
        "metrics": {},
        "rates": {},
    }
    for key, q in itertools.product(_MAIN_KEYS, _ARM_QUANTITIES):
        values = {
            arm: {
                _pair_key(r): r["summary"]["eval"][key][q]
                for r in recs
                if key in r["summary"]["eval"]
            }
            for arm, recs in by_arm.items()
        }
        if all(values.values()):
            out["metrics"][f"{key}/{q}"] = stats.compare_arms(
                values, baseline=baseline, ci=ci, bounds=_ACC_BOUNDS
            )
    failed = {arm: (sum(bool(r["failed"]) for r in rs), len(rs)) for arm, rs in rows.items()}
    out["rates"]["failed"] = stats.compare_arm_rates(failed, baseline=baseline, ci=ci)
    streams = sorted({f"{e['phase']}/{e['metric']}" for r in records for e in r["events"]})
    for stream in streams:
        counts = {
            arm: (
                sum(any(f"{e['phase']}/{e['metric']}" == stream for e in r["events"]) for r in rs),
                len(rs),
            )
            for arm, rs in by_arm.items()
        }
        out["rates"][f"drop-off {stream}"] = stats.compare_arm_rates(
            counts, baseline=baseline, ci=ci
        )
    return out


def config_digest(config: dict) -> dict:
    """The fields a reader of the report wants first (the whole config is beside it)."""
    flat = {}
    for key in _DIGEST_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            flat[key] = node
    return {"file": "study_config.json", "fields": flat}


def _final_key(evals: dict) -> str | None:
    """The run's final target metric: fine-tuning's target accuracy, else pretraining's."""
    for key in ("finetune/target_test", "pretrain/source_test"):
        if key in evals:
            return key
    return None


def run_verdicts(status: str, evals: dict, num_classes: dict) -> dict:
    """Whether a run failed, and whether its backbone is weak (see the module docstring).

    Args:
        status: run.json's status ('diverged': it stopped on a non-finite value).
        evals: ``{"phase/split": {"final": accuracy, ...}}``.
        num_classes: phase -> its number of classes (chance is 1 / that); a phase
            missing here is taken to have 10.

    Returns:
        ``{"failed": why or None, "chance": float, "weak_backbone": source accuracy or
        None}``.
    """
    key = _final_key(evals)
    phase = key.split("/")[0] if key else "finetune"
    chance = 1.0 / (num_classes.get(phase) or 10)
    failed = None
    if status == "diverged":
        failed = "stopped on a non-finite value"
    elif key is not None:
        final = evals[key]["final"]
        if not math.isfinite(final):
            failed = f"final {key} accuracy is not finite"
        elif final <= chance + CHANCE_MARGIN:
            failed = (
                f"final {key} accuracy {_pct(final)}% is within {_pct(CHANCE_MARGIN)} points "
                f"of chance ({_pct(chance)}%)"
            )
    source = evals.get("pretrain/source_test", {}).get("final")
    weak = source if source is not None and source < WEAK_BACKBONE else None
    return {"failed": failed, "chance": chance, "weak_backbone": weak}


def run_row(record: dict) -> dict:
    """One run's line of the summary: seeds, status, final metrics, verdicts, time."""
    info = record["info"]
    evals = record["summary"]["eval"]
    num_classes = {p: v.get("num_classes") for p, v in (info.get("phases") or {}).items()}
    return {
        "run": record["run"],
        "point": record["point"],
        "arm": arm_of(record),
        "seeds": record["varied_seeds"],
        "status": record["status"],
        **run_verdicts(record["status"], evals, num_classes),
        "wall_time_s": info.get("wall_time_s"),
        "resumes": len(info.get("resumes", [])),
        "final_param_hash": info.get("final_param_hash"),
        "dropoffs": len(record["events"]),
        "eval": {
            k: {q: v.get(q, math.nan) for q in (*QUANTITIES, "eval_to_eval")}
            for k, v in evals.items()
        },
        "workdir": os.path.join("runs", record["run"]),
    }


# ----------------------------------------------------------------------------- figures


def _label(record) -> str:
    return ",".join(f"{f}={s}" for f, s in record["varied_seeds"].items())


def draw_figures(out: str, by_point: dict, k_last: int = 3) -> dict:
    """The study's figures under OUT/figures (``figures.study_figures``: PNG and PDF);
    returns name -> {"path" (the PNG, relative), "vector" (the PDF, relative), "title"}.

    A run's arm is its record's ``arm`` when set, else its grid point; its label is its
    varied seeds, or its run name when several points share those seeds. ``k_last`` is
    unused (the figures show the last eval), kept for the callers.
    """
    del k_last
    records = [r for rs in by_point.values() for r in rs]
    if not records:
        return {}
    labels = [_label(r) or r["run"] for r in records]
    if len(set(labels)) < len(labels):
        labels = [r["run"] for r in records]
    runs = [(label, r["workdir"]) for label, r in zip(labels, records, strict=True)]
    arms = {
        label: str(r.get("arm") or r["point"]) for label, r in zip(labels, records, strict=True)
    }
    made = figures.study_figures(runs, os.path.join(out, "figures"), arms=arms)
    made.update(_arm_loss_figures(runs, arms, os.path.join(out, "figures")))
    return {
        name: {
            "path": os.path.relpath(f["png"], out),
            "vector": os.path.relpath(f["pdf"], out),
            "title": f["title"],
        }
        for name, f in made.items()
    }


def _arm_loss_figures(runs, arms: dict, fig_dir: str) -> dict:
    """With several arms, each arm's training loss per phase, one colour per run (up to ten):
    the paper's Fig. 1 and 2 for the baseline (the first arm); an arm of another
    configuration that varies the initialisation seeds gives its Fig. 3."""
    names = list(dict.fromkeys(arms.values()))
    if len(names) < 2:
        return {}
    made = {}
    for i, arm in enumerate(names):
        sub = [(label, w) for label, w in runs if arms[label] == arm]
        for phase in ("pretrain", "finetune"):
            what = "Pretraining" if phase == "pretrain" else "Fine-tuning"
            fig_no = {"pretrain": "Fig. 1", "finetune": "Fig. 2"}[phase] if i == 0 else None
            title = f"{what} loss, arm {arm} ({len(sub)} runs)"
            if fig_no:
                title += f" ({fig_no} analogue: the baseline)"
            try:
                fig = figures.loss_across_runs(sub, phase, title=title)
            except ValueError:  # a branch arm has no pretraining rows
                continue
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", arm)
            png = figures.save(fig, os.path.join(fig_dir, f"arm_{slug}_{phase}_loss.png"))
            made[f"arm_{slug}_{phase}_loss"] = {
                "png": png,
                "pdf": figures.vector_path(png),
                "title": title,
            }
    return made


# ----------------------------------------------------------------------------- markdown


def _pct(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _num(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _ci(lo, hi, n, fmt) -> str:
    """An interval with its n beside it; a single value has none."""
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"no interval (n={n})"
    return f"[{fmt(lo)}, {fmt(hi)}] (n={n})"


def _stat_cells(s: dict, fmt) -> str:
    if "error" in s:
        return f"{s['error']} (n={s['n']}) | | | "
    std = f" ± {fmt(s['std'])}" if math.isfinite(s["std"]) else ""
    bad = f"; {s['n_nonfinite']} non-finite left out" if s["n_nonfinite"] else ""
    return (
        f"{fmt(s['mean'])}{std} | {_ci(s['ci_low'], s['ci_high'], s['n'], fmt)}{bad} | "
        f"{fmt(s['median'])} | {fmt(s['min'])} – {fmt(s['max'])}"
    )


def _what_was_run(summary: dict) -> list[str]:
    st, env = summary["study"], summary.get("environment", {})
    design = {
        "oat": "one factor at a time, the others held fixed",
        "grid": "full grid of seeds",
        "arms": f"the arms of {st.get('source')}, the first the baseline",
    }
    if len(st["vary"]) == 1:
        design["oat"] = "one run per seed, the other factors held fixed"
    lines = ["## What was run", ""]
    if summary.get("command"):
        lines += ["```", summary["command"], "```", ""]
    lines += [
        f"- varied: **{', '.join(st['vary'])}** ({design[st['design']]}), seeds "
        f"{', '.join(map(str, st['seeds']))}; {st['n_runs']} runs",
        "- held fixed: " + ", ".join(f"{f}={s}" for f, s in summary["held_fixed"].items()),
    ]
    for key, values in st["grid"]:
        lines.append(f"- config grid: `{key}` in {', '.join(values)} (every seed at every value)")
    if summary.get("disk", {}).get("line"):
        lines.append(f"- disk: {summary['disk']['line']}")
    for arm in st.get("arms", []):
        changes = ", ".join(f"`{k}`={v}" for k, v in arm["overrides"]) or "the base config"
        how = (
            f"a branch of the baseline run of the same seeds from its {arm['branch']} start"
            if arm["branch"]
            else "full runs"
        )
        lines.append(
            f"- arm **{arm['name']}**: {', '.join(arm['vary'])} seeds "
            f"{', '.join(map(str, arm['seeds']))}; {changes}; {how}"
        )
    digest = summary["config"]
    lines.append(
        f"- config: [{digest['file']}]({digest['file']}) (complete, overrides included); "
        + ", ".join(f"`{k}`={v}" for k, v in digest["fields"].items())
    )
    if env:
        libs = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items())
        p, code = env.get("platform") or {}, env.get("code") or {}
        lines += [
            f"- versions: jaxrepro {code.get('jaxrepro')} (git {code.get('git_commit')}"
            f"{', dirty' if code.get('git_dirty') else ''}); {libs}",
            f"- platform: {p.get('backend')} {p.get('device_kind')} x{p.get('device_count')}, "
            f"{p.get('cpu_threads')} CPU threads, python {p.get('python')}, PRNG "
            f"{p.get('prng_impl')} (partitionable={p.get('threefry_partitionable')}), "
            f"XLA_FLAGS={p.get('xla_flags')!r}; {env.get('distinct_setups')} distinct setup(s)",
            "- " + platform_sentence(p),
        ]
    walls = [r["wall_time_s"] for r in summary["runs"] if r.get("wall_time_s")]
    per_run = f"; a run's training {min(walls):.0f}–{max(walls):.0f} s" if walls else ""
    lines.append(
        f"- wall time: {summary.get('wall_time_s', 0):.0f} s in "
        f"{len(summary.get('sessions', []))} session(s){per_run}"
    )
    if summary.get("code_changed"):
        hashes = ", ".join(
            f"{r.get('code_at_start')} -> {r.get('code_at_end')}" for r in summary["sessions"]
        )
        lines.append(
            "- **warning: jaxrepro's source changed while this study ran** (source hashes per "
            f"session: {hashes}): its runs and replay may come from different code; rerun it"
        )
    if summary["missing_runs"]:
        lines.append(f"- **not finished**: {', '.join(summary['missing_runs'])} (see logs/)")
    return lines + [""]


_CI_NOTE = (
    "CI: 95% Student's t interval of the mean over the n runs (n − 1 degrees of freedom; "
    "for accuracies clipped to 0–100%). With a few runs it is wide, as it must be: a "
    "bootstrap of 4 runs would claim a 95% interval that holds ~80% of the time."
)


def _stats_table(point: str, entry: dict, k: int) -> list[str]:
    lines = [
        f"### Statistics: {point}" if point != "base" else "### Statistics",
        "",
        f"Accuracies in %. {_CI_NOTE}",
        "",
        "| metric | mean ± std | 95% CI (n) | median | min – max |",
        "|---|---|---|---|---|",
    ]
    for key, by_q in entry["eval"].items():
        for q, s in by_q.items():
            lines.append(f"| {key} ({_QUANTITY_NAMES[q].format(k=k)}) | {_stat_cells(s, _pct)} |")
    for phase, s in entry["train"].items():
        lines.append(
            f"| {phase} training loss (mean of last 10) | {_stat_cells(s['final_loss'], _num)} |"
        )
    return lines + [""]


def _run_verdict(r: dict) -> str:
    out = [r["status"]]
    if r.get("failed"):
        out.append("**failed**")
    if r.get("weak_backbone") is not None:
        out.append("weak backbone")
    return ", ".join(out)


def _runs_table(summary: dict, k: int) -> list[str]:
    keys = [key for key in _MAIN_KEYS if any(key in r["eval"] for r in summary["runs"])]
    head = " | ".join(f"{key} last / mean last {k} (%)" for key in keys)
    arms = len({r.get("arm") for r in summary["runs"]}) > 1
    lines = [
        "### Runs",
        "",
        f"| run |{' arm |' if arms else ''} status | {head} | drop-offs | train s |",
        "|---" * (4 + len(keys) + arms) + "|",
    ]
    for r in summary["runs"]:
        cells = " | ".join(
            f"{_pct(r['eval'][key]['final'])} / {_pct(r['eval'][key]['last_k_mean'])}"
            if key in r["eval"]
            else "–"
            for key in keys
        )
        arm = f" {r.get('arm')} |" if arms else ""
        lines.append(
            f"| [{r['run']}]({r['workdir']}/run.json) |{arm} {_run_verdict(r)} | {cells} | "
            f"{r['dropoffs']} | {r['wall_time_s'] or 0:.0f} |"
        )
    return lines + [""]


def _dropoff_lines(point: str, entry: dict) -> list[str]:
    d, n = entry["dropoffs"], entry["n_runs"]
    lines = [f"### Drop-offs{'' if point == 'base' else ': ' + point}", ""]
    lines.append(
        f"{d['n_diverged']} of {n} runs diverged."
        if d["n_diverged"]
        else f"No run diverged ({n} of {n} finished without a non-finite stop)."
    )
    if not d["rate"]:
        return lines + ["", f"No drop-off was detected in any of the {n} runs.", ""]
    lines += [
        "",
        "Runs with at least one drop-off; rate with its Clopper-Pearson 95% interval.",
        "",
        "| phase/metric | runs with one | rate (95% CI) | steps |",
        "|---|---|---|---|",
    ]
    for key, r in d["rate"].items():
        steps = ", ".join(map(str, r["steps"]))
        c = r.get("ci") or stats.rate_summary(r["n_with"], r["n_runs"])
        rate = f"{_pct(r['rate'])}% {_ci(c['ci_low'], c['ci_high'], r['n_runs'], _pct)}"
        lines.append(f"| {key} | {r['n_with']}/{r['n_runs']} | {rate} | {steps} |")
    if entry.get("attribution_note"):
        return lines + ["", entry["attribution_note"], ""]
    lines += [
        "",
        "Events (same phase and metric, steps within the window), counted across runs. This "
        "is co-occurrence, not a cause: the interventional verdicts above say why.",
        "",
        "| phase | metric | steps | runs | seen in |",
        "|---|---|---|---|---|",
    ]
    for g in entry["attribution"]:
        verdict = g["seen_in"]
        if not g["shared"] and g["example_ids"]:
            verdict += "; in most runs: see the batch below"
        steps = f"{g['step_min']}" + (f"–{g['step_max']}" if g["step_max"] != g["step_min"] else "")
        lines.append(
            f"| {g['phase']} | {g['metric']} | {steps} | {g['n_runs']}/{g['n_total']} "
            f"({', '.join(g['runs'])}) | {verdict} |"
        )
    for g in entry["attribution"]:
        for b in g.get("example_ids") or []:
            lines.append(
                f"\n- {'shared ' if g['shared'] else ''}{g['metric']} event at {g['phase']} "
                f"step {b['step']} "
                f"(runs {', '.join(b['runs'])}): the batch held example ids {b['ids']}"
            )
    return lines + [""]


def _variance_lines(entry: dict) -> list[str]:
    if not entry.get("variance"):
        return []
    lines = [
        "### Variance decomposition (hold others fixed)",
        "",
        "Accuracies: variance in points², std in points (1 point = 1% accuracy).",
        "",
        "| metric | factor | variance | std | fraction of total |",
        "|---|---|---|---|---|",
    ]
    for metric, v in entry["variance"].items():
        for f, fv in v.get("factors", {}).items():
            scale = 100.0 if "/" in metric else 1.0  # phase/split/quantity: an accuracy
            cells = " | ".join(
                _num(x) for x in (fv["variance"] * scale**2, fv["std"] * scale, fv["fraction"])
            )
            lines.append(f"| {metric} | {f} | {cells} |")
    return lines + [""]


def _metric_name(key: str, k: int) -> str:
    phase, split, q = key.split("/")
    what = {"source_test": "source test accuracy", "target_test": "target test accuracy"}
    return f"{phase} {what.get(split, split)} ({_QUANTITY_NAMES[q].format(k=k)})"


def _diff_cells(c: dict | None, fmt, unit: str) -> str:
    if c is None:
        return "baseline | | "
    if "error" in c:
        return f"{c['error']} | | "
    ci = _ci(c["ci_low"], c["ci_high"], f"{c.get('n_arm', '?')} vs {c.get('n_baseline', '?')}", fmt)
    how = {"paired": ", paired", "welch": ", Welch"}.get(c["method"], "")
    p = f"{c['p_better']:.2f}" if math.isfinite(c["p_better"]) else "–"
    return f"{fmt(c['diff'])}{unit} {ci}{how} | {p} | {c['verdict']}"


_ARM_NOTE = (
    "Accuracies in %, differences in points (arm − baseline). CI: 95% Student's t interval "
    "of the mean (n runs); of a difference: paired t where the arm ran the baseline's "
    "seeds, else Welch's. P(better): the probability that the arm's mean is higher than "
    "the baseline's under the same t approximation (flat prior), so it exceeds 0.975 "
    "exactly when the interval lies above zero. Rates: runs with the event, "
    "Clopper-Pearson 95% interval; a difference of rates: Newcombe's interval from "
    "Clopper-Pearson limits; P(better): the posterior probability (uniform priors) that "
    "the arm's rate is lower. 'no detectable effect': the interval covers zero."
)


def _arm_lines(arms: dict, k: int) -> list[str]:
    if not arms or len(arms["arms"]) < 2:
        return []
    lines = [f"## Arms compared with the baseline ({arms['baseline']})", "", _ARM_NOTE, ""]
    for key, comp in arms["metrics"].items():
        lines += [
            f"### {_metric_name(key, k)}",
            "",
            "| arm | mean [95% CI] (n) | median | min – max | arm − baseline [95% CI] | "
            "P(better) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, e in comp["arms"].items():
            s = e["summary"]
            if "error" in s:
                lines.append(f"| {arm} | {s['error']} | | | | | |")
                continue
            lines.append(
                f"| {arm} | {_pct(s['mean'])} {_ci(s['ci_low'], s['ci_high'], s['n'], _pct)} | "
                f"{_pct(s['median'])} | {_pct(s['min'])} – {_pct(s['max'])} | "
                f"{_diff_cells(e['vs_baseline'], _pct, '')} |"
            )
        lines.append("")
    lines += [
        "### Rates: failed runs and drop-offs",
        "",
        "| event | arm | runs | rate [95% CI] | arm − baseline [95% CI] | P(better) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for event, comp in arms["rates"].items():
        for arm, e in comp["arms"].items():
            r = e["rate"]
            diff = e["vs_baseline"]
            if diff is not None:
                diff = dict(
                    diff, n_arm=r["n"], n_baseline=comp["arms"][comp["baseline"]]["rate"]["n"]
                )
            lines.append(
                f"| {event} | {arm} | {r['k']}/{r['n']} | {_pct(r['rate'])}% "
                f"{_ci(r['ci_low'], r['ci_high'], r['n'], _pct)} | "
                f"{_diff_cells(diff, _pct, '')} |"
            )
    return lines + [""]


def _accuracy(metric: str, x) -> str:
    """A drop-off's value: accuracy in %, loss as is."""
    return f"{_pct(x)}%" if metric.startswith("accuracy") else _num(x)


def _replay_lines(replay: dict) -> list[str]:
    lines = ["## Replay of the largest drop-off", ""]
    if "skipped" in replay:
        return lines + [f"No replay: {replay['skipped']}.", ""]
    e = replay["event"]
    verdict = (
        "bit for bit identical"
        if replay["bitwise_equal"]
        else f"NOT bit for bit: {len(replay.get('missing_rows') or [])} rows missing in the "
        f"replay, {len(replay.get('extra_rows') or [])} extra, first: "
        f"{trajectory.describe(replay['first_difference'])}"
    )
    lines += [
        f"The most severe drop-off (severity {replay['severity']:.3g}) is {e['kind']} of "
        f"{e['metric']} in run {replay['run']} at {e['phase']} step {e['step']} "
        f"({_accuracy(e['metric'], e['before'])} → "
        f"{_accuracy(e['metric'], e.get('peak_after', e['after']))} at its peak, "
        f"until step {e.get('end_step', e['step'])}).",
        f"Replayed from checkpoint {replay['from_step']} to step {replay['until']} "
        f"([{replay['replay_dir']}]({replay['replay_dir']}/replay_summary.json)): "
        f"{replay['compared_rows']} rows compared, {verdict}.",
    ]
    v = replay.get("event_value") or {}
    if v.get("replayed") is not None:
        same = "reproduced bit for bit" if v["reproduced"] else "NOT reproduced"
        lines.append(
            f"At the event the replay's value is {_accuracy(e['metric'], v['replayed'])} "
            f"against {_accuracy(e['metric'], v['original'])} in the original: the drop-off "
            f"is {same}."
        )
    flagged = "flagged it again" if replay.get("event_recurs") else "did not flag it"
    lines.append(
        f"(The replay's own online detector, primed with the original's rows before the "
        f"restored checkpoint, {flagged}.)"
    )
    if replay.get("figure"):
        lines += ["", f"![replay overlay]({replay['figure']})"]
    return lines + [""]


def _diagnosis_lines(diag: dict) -> list[str]:
    """The interventional verdicts: why the most severe drop-offs happened."""
    if not diag:
        return []
    lines = ["## Why the drop-offs happened (diagnosis by intervention)", ""]
    budget, n = diag.get("budget", 0), diag.get("n_events", 0)
    if diag.get("skipped"):
        return lines + [f"No diagnosis: {diag['skipped']} ({n} drop-offs in all).", ""]
    lines += [
        f"The {len(diag['diagnosed'])} most severe of the study's {n} drop-offs (budget "
        f"{budget}), each replayed from the checkpoint before it with one thing changed per "
        "arm (exact, other augmentation draws, another order, the batch skipped, remedies).",
        "",
        "| run | drop-off | verdict | because | remedies | exact arm bitwise |",
        "|---|---|---|---|---|---|",
    ]
    for d in diag["diagnosed"]:
        e = d["event"]
        what = f"{e['kind']} of {e['metric']} at {e['phase']} step {e['step']}"
        if "failed" in d:
            lines.append(f"| {d['run']} | {what} | failed ({d['failed']}) | | | |")
            continue
        remedies = ", ".join(f"{k} {v}" for k, v in d["remedies"].items()) or "-"
        lines.append(
            f"| {d['run']} | [{what}]({d['summary']}) | **{d['cause']}** | {d['because']} | "
            f"{remedies} | {d['exact_bitwise']} |"
        )
    for d in diag["diagnosed"]:
        if d.get("figure"):
            lines += ["", f"![diagnosis of {d['run']} drop-off {d['index']}]({d['figure']})"]
    return lines + [""]


def _names(rows, fmt) -> str:
    return ", ".join(fmt(r) for r in rows)


def _diagnosis_sentences(diag: dict) -> list[str]:
    if not diag:
        return []
    if diag.get("skipped"):
        return [f"- No diagnosis by intervention: {diag['skipped']}."]
    out = []
    for d in diag["diagnosed"]:
        e = d["event"]
        what = f"{e['kind']} of {e['metric']} in run {d['run']} at {e['phase']} step {e['step']}"
        if "failed" in d:
            out.append(f"- The diagnosis of the {what} failed ({d['failed']}).")
        else:
            out.append(
                f"- **Diagnosed by intervention**: the {what} is due to **{d['cause']}** "
                f"({d['because']})."
            )
    return out


def _failure_sentences(runs: list[dict]) -> list[str]:
    failed = [r for r in runs if r.get("failed")]
    if not failed:
        chance = {r.get("chance") for r in runs if r.get("chance")}
        level = f" ({', '.join(f'{_pct(c)}%' for c in sorted(chance))})" if chance else ""
        return [
            f"- No run failed: none stopped on a non-finite value or ended within "
            f"{_pct(CHANCE_MARGIN)} points of chance{level}."
        ]
    return [
        f"- **{len(failed)} of {len(runs)} runs failed**: "
        + _names(failed, lambda r: f"{r['run']} ({r['failed']})")
        + "."
    ]


def _backbone_sentences(runs: list[dict]) -> list[str]:
    weak = [r for r in runs if r.get("weak_backbone") is not None]
    if not weak:
        return []
    return [
        f"- **Confound: a weak backbone** in {len(weak)} of {len(runs)} runs (source test "
        f"accuracy at the end of pretraining below {_pct(WEAK_BACKBONE)}%: "
        + _names(weak, lambda r: f"{r['run']} {_pct(r['weak_backbone'])}%")
        + "): what fine-tuning does after it may come from the weak pretraining, not from "
        "what the study varies."
    ]


def eval_noise(runs: list[dict], key: str) -> dict | None:
    """How much one eval of ``key`` moves: the runs' eval-to-eval changes (stats.run_summary)."""
    moves = [
        (r["eval"][key]["eval_to_eval"], r["run"])
        for r in runs
        if key in r["eval"] and math.isfinite(r["eval"][key].get("eval_to_eval", math.nan))
    ]
    if not moves:
        return None
    values = sorted(m for m, _ in moves)
    return {
        "median": float(statistics.median(values)),
        "min": values[0],
        "max": values[-1],
        "max_run": max(moves)[1],
        "n": len(values),
    }


def _noise_sentences(runs: list[dict], k: int) -> list[str]:
    out = []
    for key in _MAIN_KEYS:
        noise = eval_noise(runs, key)
        if noise is None:
            continue
        phase, split = key.split("/")
        out.append(
            f"- **Single-eval noise**: one eval of {phase} {split.replace('_', ' ')} accuracy "
            f"moves by a median {_pct(noise['median'])} points from one eval to the next over "
            f"the phase's second half (across the {noise['n']} runs: "
            f"{_pct(noise['min'])}–{_pct(noise['max'])}, the most in {noise['max_run']}): a "
            f"difference of single evals ('last eval') smaller than that is noise; the mean "
            f"of the last {k} evals is steadier."
        )
    return out


def _arm_sentences(arms: dict, k: int) -> list[str]:
    if not arms or len(arms.get("arms", [])) < 2:
        return []
    preferred = ("finetune/target_test/last_k_mean", "pretrain/source_test/last_k_mean")
    key = next((m for m in preferred if m in arms["metrics"]), None)
    out = []
    for arm in arms["arms"][1:]:
        parts = []
        if key:
            c = arms["metrics"][key]["arms"][arm]["vs_baseline"]
            if c and "error" not in c:
                ci = _ci(c["ci_low"], c["ci_high"], f"{c['n_arm']} vs {c['n_baseline']}", _pct)
                p = f"{c['p_better']:.2f}" if math.isfinite(c["p_better"]) else "–"
                parts.append(
                    f"{_metric_name(key, k)} {_signed_pct(c['diff'])} points {ci}, "
                    f"P(better) {p}: {c['verdict']}"
                )
        f = arms["rates"]["failed"]["arms"][arm]
        base = arms["rates"]["failed"]["arms"][arms["baseline"]]["rate"]
        parts.append(
            f"failed runs {f['rate']['k']}/{f['rate']['n']} against {base['k']}/{base['n']}: "
            f"{f['vs_baseline']['verdict']}"
        )
        out.append(f"- Arm **{arm}** against the baseline {arms['baseline']}: " + "; ".join(parts))
    return out


def _distribution_sentences(arms: dict, k: int) -> list[str]:
    if not arms or len(arms.get("arms", [])) != 1:
        return []
    out = []
    for key, comp in arms["metrics"].items():
        if not key.startswith("finetune/target_test"):
            continue
        s = next(iter(comp["arms"].values()))["summary"]
        if "error" in s:
            continue
        out.append(
            f"- {_metric_name(key, k)}: mean {_pct(s['mean'])}% "
            f"{_ci(s['ci_low'], s['ci_high'], s['n'], _pct)}, median {_pct(s['median'])}%, "
            f"{_pct(s['min'])}–{_pct(s['max'])}%."
        )
    return out


def _signed_pct(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}"


def what_happened(summary: dict) -> list[str]:
    """The report's first section: verdicts by intervention first, then failed runs,
    confounds, the arms against the baseline, and whether other machines give these
    numbers."""
    k = summary["study"]["k_last"]
    runs = summary["runs"]
    lines = ["## What happened", ""]
    if summary.get("design_description"):
        lines.append(f"- The design: {summary['design_description']}")
    lines += _diagnosis_sentences(summary.get("diagnoses") or {})
    lines += _failure_sentences(runs) if runs else ["- No run finished."]
    lines += _backbone_sentences(runs) + _noise_sentences(runs, k)
    lines += _distribution_sentences(summary.get("arms") or {}, k)
    lines += _arm_sentences(summary.get("arms") or {}, k)
    platform = (summary.get("environment") or {}).get("platform")
    if platform:
        lines.append(f"- Other machines: {platform_sentence(platform)}.")
    return lines + [""]


def write_report(out: str, summary: dict) -> str:
    """Writes OUT/report.md from a study's summary; returns its path."""
    k = summary["study"]["k_last"]
    st = summary["study"]
    title = f"Study: {st['source']}" if st.get("source") else "Seed study: " + ", ".join(st["vary"])
    lines = ["# " + title, ""]
    lines += what_happened(summary)
    lines += _what_was_run(summary)
    lines += ["## Results", ""] + _runs_table(summary, k)
    lines += _diagnosis_lines(summary.get("diagnoses") or {})
    lines += _arm_lines(summary.get("arms") or {}, k)
    for point, entry in summary["points"].items():
        lines += _stats_table(point, entry, k) + _variance_lines(entry)
        lines += _dropoff_lines(point, entry)
    lines += ["## Figures", ""]
    for fig in summary["figures"].values():
        lines += [f"![{fig['title']}]({fig['path']})", ""]
        if fig.get("vector"):
            lines += [f"{fig['title']}: [vector copy]({fig['vector']})", ""]
    lines += _replay_lines(summary["replay"])
    lines += [
        "Machine-readable: [summary.json](summary.json); per run: runs/NAME/ "
        "(config.json, run.json, metrics.jsonl, dropoffs.json); logs: logs/.",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def broken_links(md_path: str) -> list[str]:
    """Relative links and images of a markdown file whose target does not exist."""
    base = os.path.dirname(os.path.abspath(md_path))
    with open(md_path) as f:
        targets = re.findall(r"\]\(([^)\s]+)\)", f.read())
    return [t for t in targets if "://" not in t and not os.path.exists(os.path.join(base, t))]


def platform_sentence(p: dict) -> str:
    """Which machines can reproduce these numbers bit for bit (jaxrepro.machine)."""
    cpu = p.get("cpu")
    if not cpu:
        return (
            "reproducible elsewhere: unknown (the runs recorded no CPU fingerprint; numbers "
            "on another CPU may differ from the first evaluation on)"
        )
    fid = p.get("fingerprint_id")
    if p.get("portable"):
        return (
            f"platform fingerprint {fid}, **portable mode**: designed to give these bits on "
            f"any x86-64 CPU with AVX2 and FMA, with {p.get('cpu_threads')} CPU threads and "
            "the same library versions (docs/determinism.md says on which CPUs this was "
            "measured)"
        )
    isa = cpu.get("isa") or []
    level = "AVX-512" if "avx512f" in isa else ("AVX2+FMA" if "fma" in isa else "pre-AVX2")
    return (
        f"platform fingerprint {fid}: {cpu.get('vendor')} family {cpu.get('family')} model "
        f"{cpu.get('model')} ({cpu.get('model_name')}, {level}), native mode. Bitwise the same "
        "numbers only on a CPU of the same family and model with the same thread count, "
        "flags and library versions; on another CPU expect other numbers from the first "
        "evaluation on (summation order: docs/determinism.md). "
        "`--config.determinism.portable=True` is designed to make a study reproducible on any "
        "AVX2+FMA CPU (docs/determinism.md: where that was measured)."
    )
