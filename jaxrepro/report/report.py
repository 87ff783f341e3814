"""A seed study's statistics, figures and report.md, from what its runs wrote to disk.

The study (``jaxrepro.study``) loads each finished run into a *record*: ``{"run", "point",
"varied_seeds", "seeds", "status", "workdir", "events", "summary" (stats.run_summary),
"info" (run.json)}``. This module turns records into numbers (:func:`point_statistics`,
:func:`compare_points`), figures (:func:`draw_figures`) and markdown (:func:`write_report`).
"""

from __future__ import annotations

import itertools
import math
import os
import re

from jaxrepro import stats, trajectory
from jaxrepro.report import figures

QUANTITIES = ("final", "last_k_mean", "best")
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


def _summarize(values, n_boot: int) -> dict:
    try:
        return stats.summarize(values, n_boot=n_boot)
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
            k: {q: _summarize(_values(records, k, q), n_boot) for q in QUANTITIES} for k in keys
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
                )
            }
            for p in phases
        },
        "dropoffs": {
            "rate": stats.dropoff_rate(events),
            "runs_with_any": sorted(run for run, ev in events.items() if ev),
            "n_diverged": sum(r["status"] == "diverged" for r in records),
        },
        "variance": _variance(records, factors, keys),
    }


def compare_points(by_point: dict, n_boot: int = 2000) -> list[dict]:
    """Every pair of grid points: difference of means, bootstrap CI, P(A>B), a test."""
    out = []
    for (a, ra), (b, rb) in itertools.combinations(by_point.items(), 2):
        for key in [k for k in _eval_keys(ra) if k in _eval_keys(rb)]:
            for q in ("final", "last_k_mean"):
                try:
                    result = stats.compare_groups(
                        _values(ra, key, q), _values(rb, key, q), n_boot=n_boot
                    )
                except ValueError as e:
                    result = {"error": str(e)}
                out.append({"a": a, "b": b, "metric": key, "quantity": q, **result})
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


def run_row(record: dict) -> dict:
    """One run's line of the summary: seeds, status, final metrics, drop-offs, time."""
    info = record["info"]
    return {
        "run": record["run"],
        "point": record["point"],
        "seeds": record["varied_seeds"],
        "status": record["status"],
        "wall_time_s": info.get("wall_time_s"),
        "resumes": len(info.get("resumes", [])),
        "final_param_hash": info.get("final_param_hash"),
        "dropoffs": len(record["events"]),
        "eval": {k: {q: v[q] for q in QUANTITIES} for k, v in record["summary"]["eval"].items()},
        "workdir": os.path.join("runs", record["run"]),
    }


# ----------------------------------------------------------------------------- figures


def _label(record) -> str:
    return ",".join(f"{f}={s}" for f, s in record["varied_seeds"].items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_+-]+", "_", text)[:80]


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ValueError:  # e.g. a phase of zero steps: no curve to draw
        return None


def draw_figures(out: str, by_point: dict, k_last: int = 3) -> dict:
    """The study's PNGs under OUT/figures; returns name -> {"path" (relative), "title"}."""
    fig_dir = os.path.join(out, "figures")
    made = {}
    multi = len(by_point) > 1
    finals = {}
    for point, records in by_point.items():
        runs = [(_label(r), r["workdir"]) for r in records]
        prefix, suffix = (f"{_slug(point)}_", f" ({point})") if multi else ("", "")
        specs = [
            (
                "pretrain_loss",
                "pretraining loss per seed",
                figures.curves_across_seeds,
                ("pretrain",),
            ),
            (
                "finetune_loss",
                "fine-tuning loss per seed",
                figures.curves_across_seeds,
                ("finetune",),
            ),
            (
                "pretrain_source_accuracy",
                "source test accuracy during pretraining",
                figures.eval_accuracy_across_seeds,
                ("pretrain", "source_test"),
            ),
            (
                "finetune_target_accuracy",
                "target test accuracy during fine-tuning",
                figures.eval_accuracy_across_seeds,
                ("finetune", "target_test"),
            ),
        ]
        for name, title, fn, args in specs:
            png = os.path.join(fig_dir, f"{prefix}{name}.png")
            if _try(fn, runs, *args, out_png=png):
                made[prefix + name] = {"path": os.path.relpath(png, out), "title": title + suffix}
        for key in ("pretrain/source_test", "finetune/target_test"):
            phase, split = key.split("/")
            for q, what in (("final", "last eval"), ("last_k_mean", f"mean of last {k_last}")):
                values = _values(records, key, q)
                if values:
                    head = f"{point}\n" if multi else ""
                    finals[f"{head}{phase} {split.split('_')[0]}\n({what})"] = values
    if finals:
        png = os.path.join(fig_dir, "final_accuracy.png")
        if _try(
            figures.final_distribution,
            finals,
            png,
            ylabel="accuracy",
            title=f"Final accuracy across seeds (last eval; mean of the last {k_last} evals)",
        ):
            made["final_accuracy"] = {
                "path": os.path.relpath(png, out),
                "title": "final accuracy distribution",
            }
    return made


# ----------------------------------------------------------------------------- markdown


def _pct(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _num(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _stat_cells(s: dict, fmt) -> str:
    if "error" in s:
        return f"{s['n']} | {s['error']} | | |"
    std = f" ± {fmt(s['std'])}" if math.isfinite(s["std"]) else ""
    bad = f" ({s['n_nonfinite']} non-finite)" if s["n_nonfinite"] else ""
    return (
        f"{s['n']}{bad} | {fmt(s['mean'])}{std} | [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}] | "
        f"{fmt(s['min'])} – {fmt(s['max'])} | {fmt(s['spread'])}"
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


def _stats_table(point: str, entry: dict, k: int) -> list[str]:
    lines = [
        f"### Statistics: {point}" if point != "base" else "### Statistics",
        "",
        "Accuracies in %; CI: bootstrap 95% of the mean.",
        "",
        "| metric | n | mean ± std | 95% CI | min – max | spread |",
        "|---|---|---|---|---|---|",
    ]
    for key, by_q in entry["eval"].items():
        for q, s in by_q.items():
            lines.append(f"| {key} ({_QUANTITY_NAMES[q].format(k=k)}) | {_stat_cells(s, _pct)} |")
    for phase, s in entry["train"].items():
        lines.append(
            f"| {phase} training loss (mean of last 10) | {_stat_cells(s['final_loss'], _num)} |"
        )
    return lines + [""]


def _runs_table(summary: dict, k: int) -> list[str]:
    keys = [key for key in _MAIN_KEYS if any(key in r["eval"] for r in summary["runs"])]
    head = " | ".join(f"{key} last / mean last {k}" for key in keys)
    lines = [
        "### Runs",
        "",
        f"| run | status | {head} | drop-offs | train s |",
        "|---" * (4 + len(keys)) + "|",
    ]
    for r in summary["runs"]:
        cells = " | ".join(
            f"{_pct(r['eval'][key]['final'])} / {_pct(r['eval'][key]['last_k_mean'])}"
            if key in r["eval"]
            else "–"
            for key in keys
        )
        lines.append(
            f"| [{r['run']}]({r['workdir']}/run.json) | {r['status']} | {cells} | "
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
    lines += ["", "| phase/metric | runs with one | rate | steps |", "|---|---|---|---|"]
    for key, r in d["rate"].items():
        steps = ", ".join(map(str, r["steps"]))
        lines.append(f"| {key} | {r['n_with']}/{r['n_runs']} | {r['rate']:.2f} | {steps} |")
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
        "| metric | factor | variance | std | fraction of total |",
        "|---|---|---|---|---|",
    ]
    for metric, v in entry["variance"].items():
        for f, fv in v.get("factors", {}).items():
            cells = " | ".join(_num(fv[c]) for c in ("variance", "std", "fraction"))
            lines.append(f"| {metric} | {f} | {cells} |")
    return lines + [""]


def _comparison_lines(summary: dict, k: int) -> list[str]:
    if not summary["comparisons"]:
        return []
    lines = [
        "## Grid points compared (A − B)",
        "",
        "| A | B | metric | mean A | mean B | diff [95% CI] | P(A>B) | test, p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        metric = f"{c['metric']} ({_QUANTITY_NAMES[c['quantity']].format(k=k)})"
        if "error" in c:
            lines.append(f"| {c['a']} | {c['b']} | {metric} | {c['error']} | | | | |")
            continue
        t = c["test"]
        lines.append(
            f"| {c['a']} | {c['b']} | {metric} | {_pct(c['mean_a'])} | {_pct(c['mean_b'])} | "
            f"{_pct(c['diff'])} [{_pct(c['diff_ci_low'])}, {_pct(c['diff_ci_high'])}] | "
            f"{c['p_improvement']:.2f} | {t['name']}, {t['p_value']:.3g} |"
        )
    return lines + [""]


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
        f"({_num(e['before'])} → {_num(e.get('peak_after', e['after']))} at its peak, "
        f"until step {e.get('end_step', e['step'])}).",
        f"Replayed from checkpoint {replay['from_step']} to step {replay['until']} "
        f"([{replay['replay_dir']}]({replay['replay_dir']}/replay_summary.json)): "
        f"{replay['compared_rows']} rows compared, {verdict}.",
    ]
    v = replay.get("event_value") or {}
    if v.get("replayed") is not None:
        same = "reproduced bit for bit" if v["reproduced"] else "NOT reproduced"
        lines.append(
            f"At the event the replay's value is {_num(v['replayed'])} against "
            f"{_num(v['original'])} in the original: the drop-off is {same}."
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


def write_report(out: str, summary: dict) -> str:
    """Writes OUT/report.md from a study's summary; returns its path."""
    k = summary["study"]["k_last"]
    lines = ["# Seed study: " + ", ".join(summary["study"]["vary"]), ""]
    lines += _what_was_run(summary)
    lines += ["## Results", ""] + _runs_table(summary, k)
    lines += _diagnosis_lines(summary.get("diagnoses") or {})
    for point, entry in summary["points"].items():
        lines += _stats_table(point, entry, k) + _variance_lines(entry)
        lines += _dropoff_lines(point, entry)
    lines += _comparison_lines(summary, k)
    lines += ["## Figures", ""]
    for fig in summary["figures"].values():
        lines += [f"![{fig['title']}]({fig['path']})", ""]
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
            f"platform fingerprint {fid}, **portable mode**: the same config gives these bits on "
            f"any x86-64 CPU with AVX2 and FMA, with {p.get('cpu_threads')} CPU threads and "
            "the same library versions"
        )
    isa = cpu.get("isa") or []
    level = "AVX-512" if "avx512f" in isa else ("AVX2+FMA" if "fma" in isa else "pre-AVX2")
    return (
        f"platform fingerprint {fid}: {cpu.get('vendor')} family {cpu.get('family')} model "
        f"{cpu.get('model')} ({cpu.get('model_name')}, {level}), native mode. Bitwise the same "
        "numbers only on a CPU of the same family and model with the same thread count, "
        "flags and library versions; on another CPU expect other numbers from the first "
        "evaluation on (summation order: docs/determinism.md). "
        "`--config.determinism.portable=True` makes a study reproducible on any AVX2+FMA CPU."
    )
