"""``jaxrepro compare``: JAX runs against PyTorch runs, from what they wrote to disk.

Inputs: ``--jax`` is a jaxrepro run (a workdir) or a study (``STUDY/runs/<name>/``, or any
directory of workdirs); ``--torch`` is a reference-trainer workdir
(``jaxrepro torch_train``), a directory of them, or PyTorch result files that
``readers.read_results`` reads (one file, one run's directory, or a directory holding one
run per subdirectory).

Outputs in ``OUT/``: ``compare.json`` (everything below, as numbers), ``report.md`` and
its figures:

* overlaid curves: training loss per phase, eval accuracy per phase and split;
* for each reference run whose config equals a JAX run's (so both saw the same batches
  from the same initial weights): the per-step divergence of the two trajectories (loss
  and grad-norm differences, eval differences) and the distance between the final
  parameters after porting (the JAX run's last checkpoint vs the saved state_dict);
* final metrics across seeds: each group's values, Welch's t-interval of the difference of
  means (JAX - PyTorch) and a two-sample test (``jaxrepro.stats.compare_groups``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrepro import rng, stats
from jaxrepro.compare import readers
from jaxrepro.compare.divergence import (  # noqa: F401 - re-exported
    CompareError,
    Run,
    final_param_distance,
    jax_final_variables,
    param_distance,
    same_batches,
    trajectory_divergence,
)
from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import jsonio
from jaxrepro.report import figures

log = logging.getLogger("jaxrepro")
COLORS = {"jax": "tab:blue", "pytorch": "tab:orange"}
LABELS = {"jax": "JAX", "pytorch": "PyTorch"}
FRAMEWORK = "pytorch"  # run.json "framework" of a reference run (reference.FRAMEWORK)
_DPI = 100
_RESULT_GLOBS = ("metrics.csv", "*.jsonl", "events.out.tfevents.*")


# ----------------------------------------------------------------------------- loading


def _is_workdir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _workdirs_under(path: Path) -> list[Path]:
    """Workdirs in ``path/runs/`` (a study) or directly under ``path``, sorted by name."""
    base = path / "runs" if (path / "runs").is_dir() else path
    return sorted(p for p in base.iterdir() if p.is_dir() and _is_workdir(p))


def _read_workdir(path: Path, group: str) -> Run:
    try:
        config = jsonio.read_json(str(path / "config.json"))
        info = jsonio.read_json(str(path / "run.json")) if (path / "run.json").exists() else {}
        rows = jsonio.read_jsonl(str(path / "metrics.jsonl"))
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: unreadable run files: {e}") from e
    if not rows:
        raise CompareError(f"{path}: no metrics rows (metrics.jsonl missing or empty)")
    framework = "pytorch" if info.get("framework") == FRAMEWORK else "jax"
    if framework != group:
        flag = "--jax" if group == "jax" else "--torch"
        raise CompareError(f"{flag}: {path} is a {framework} run, not a {group} one")
    return Run(path.name, group, str(path), rows, config, info)


def _read_workdirs(dirs: list[Path], group: str, where: Path) -> list[Run]:
    """The workdirs of a collection that logged rows (a study's unstarted runs have none)."""
    started = [
        p for p in dirs if (p / "metrics.jsonl").is_file() and (p / "metrics.jsonl").stat().st_size
    ]
    for p in sorted(set(dirs) - set(started)):
        log.warning("%s: no metrics rows yet; left out of the comparison", p)
    if not started:
        flag = "--jax" if group == "jax" else "--torch"
        raise CompareError(f"{flag}: none of the {len(dirs)} runs under {where} has metrics rows")
    return [_read_workdir(p, group) for p in started]


def load_jax(path) -> tuple[str, list[Run]]:
    """('run' | 'study', runs) of a jaxrepro workdir or a directory of workdirs."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"--jax: {path} does not exist")
    if path.is_dir() and _is_workdir(path):
        return "run", [_read_workdir(path, "jax")]
    dirs = _workdirs_under(path) if path.is_dir() else []
    if not dirs:
        raise CompareError(
            f"--jax: {path} is neither a jaxrepro run (no config.json) nor a study "
            "(no runs/<name>/config.json)"
        )
    return "study", _read_workdirs(dirs, "jax", path)


def _has_results(path: Path, recursive: bool) -> bool:
    find = path.rglob if recursive else path.glob
    return any(next(find(g), None) for g in _RESULT_GLOBS)


def _read_results(path: Path, mapping, phase) -> Run:
    try:
        rows = readers.read_results(path, mapping, phase=phase)
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"--torch: cannot read {path}: {e}") from e
    if not rows:
        raise CompareError(f"--torch: {path} holds no metric rows")
    return Run(path.stem if path.is_file() else path.name, "pytorch", str(path), rows)


def load_torch(path, mapping=None, phase=None) -> tuple[str, list[Run]]:
    """('reference' | 'results', runs) of reference workdirs or PyTorch result files.

    A directory with result files at its top is one run; otherwise each subdirectory
    holding results (at any depth, e.g. Lightning's ``version_0/metrics.csv``) is a run.
    """
    path = Path(path)
    if not path.exists():
        raise CompareError(f"--torch: {path} does not exist")
    if path.is_dir() and _is_workdir(path):
        return "reference", [_read_workdir(path, "pytorch")]
    if path.is_file() or _has_results(path, recursive=False):
        return "results", [_read_results(path, mapping, phase)]
    dirs = _workdirs_under(path)
    if dirs:
        return "reference", _read_workdirs(dirs, "pytorch", path)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _has_results(p, True))
    if not subdirs:
        raise CompareError(
            f"--torch: {path} holds no reference run (config.json) and no results "
            f"({', '.join(_RESULT_GLOBS)})"
        )
    return "results", [_read_results(p, mapping, phase) for p in subdirs]


def _fill_phase(runs: list[Run], jax_runs: list[Run]) -> str:
    """Gives rows without a phase the JAX runs' only trained phase (else 'pretrain')."""
    phases = {r["phase"] for run in jax_runs for r in run.rows if r.get("kind") == "train"}
    default = phases.pop() if len(phases) == 1 else "pretrain"
    for run in runs:
        for row in run.rows:
            row.setdefault("phase", default)
    return default


# ----------------------------------------------------------------------------- divergence


# ----------------------------------------------------------------------------- statistics


def final_metrics(run: Run) -> dict[str, float]:
    """Eval accuracy (last, mean of last 3) per phase/split; train loss (mean of last 10)."""
    usable = [
        r
        for r in run.rows
        if (r.get("kind") == "train" and "loss" in r)
        or (r.get("kind") == "eval" and "accuracy" in r and "split" in r)
    ]
    summary = stats.run_summary(usable)
    out = {}
    for key, s in summary["eval"].items():
        out[f"{key} accuracy (final)"] = s["final"]
        out[f"{key} accuracy (mean of last 3)"] = s["last_k_mean"]
    for phase, s in summary["train"].items():
        out[f"{phase} train loss (mean of last 10)"] = s["final_loss"]
    return out


def distributions(jax_runs, torch_runs, seed: int) -> dict:
    """Per metric found in both groups: the values, and a comparison when n >= 2 each."""
    ja = [final_metrics(r) for r in jax_runs]
    to = [final_metrics(r) for r in torch_runs]
    common = sorted(set().union(*ja) & set().union(*to))
    out = {}
    for name in common:
        a = [m[name] for m in ja if name in m and math.isfinite(m[name])]
        b = [m[name] for m in to if name in m and math.isfinite(m[name])]
        entry = {"jax": a, "pytorch": b, "comparison": None}
        if len(a) >= 2 and len(b) >= 2:
            entry["comparison"] = stats.compare_groups(a, b, seed=seed)
        else:
            entry["note"] = "a CI and test need >= 2 runs per group"
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- figures


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(8.0, 4.8), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _series(rows, kind, phase, metric, split=None):
    pts = {
        r["step"]: float(r[metric])
        for r in rows
        if r.get("kind") == kind and r.get("phase") == phase and metric in r
        if split is None or r.get("split") == split
    }
    steps = sorted(pts)
    return np.asarray(steps, float), np.asarray([pts[s] for s in steps], float)


def overlay(runs: list[Run], kind, phase, metric, path, split=None) -> str | None:
    """Every run's curve, coloured by framework (thin when a group has several runs)."""
    label = f"{split} accuracy" if split else f"training {metric} (batch)"
    fig, ax = _figure(f"{phase}: {label}, JAX vs PyTorch", "step", label)
    drawn, labelled = 0, set()
    for run in runs:
        x, y = _series(run.rows, kind, phase, metric, split)
        if x.size == 0:
            continue
        n = sum(r.group == run.group for r in runs)
        label = None if run.group in labelled else f"{LABELS[run.group]} ({n} run(s))"
        style = {"marker": "o", "markersize": 3} if kind == "eval" else {}
        style["linestyle"] = "--" if run.group == "pytorch" else "-"
        ax.plot(x, y, color=COLORS[run.group], alpha=0.5 if n > 1 else 0.9, label=label,
                linewidth=1.1, **style)  # fmt: skip
        labelled.add(run.group)
        drawn += 1
    if not drawn:
        return None
    ax.legend(fontsize=8)
    return _save(fig, path)


def divergence_figure(pairs: list[dict], path: str) -> str:
    """|loss difference| per step of each same-batches pair (log scale)."""
    fig, ax = _figure("Per-step training-loss difference, PyTorch vs JAX", "step",
                      "|loss_torch - loss_jax| (log; 0 drawn at 1e-12)")  # fmt: skip
    cmap = colormaps["tab10"]
    for i, pair in enumerate(pairs):
        color = cmap(i % 10)
        pts = pair["divergence"]["train"]["per_step"]
        diffs = np.maximum([p["loss_abs_diff"] for p in pts], 1e-12)  # log axis: 0 -> 1e-12
        ax.plot([p["step"] for p in pts], diffs, marker=".", color=color,
                label=f"{pair['jax']} vs {pair['torch']}")  # fmt: skip
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _figures(runs, pairs, dists, out: Path) -> list[str]:
    """Draws every figure; returns their file names (relative to ``out``)."""
    made = []
    seen = {r.get("phase") for run in runs for r in run.rows}
    for phase in [p for p in rng.PHASES if p in seen] + sorted(seen - {*rng.PHASES, None}):
        made.append(overlay(runs, "train", phase, "loss", str(out / f"loss_{phase}.png")))
        evals = [r for run in runs for r in run.rows if r.get("kind") == "eval"]
        splits = sorted({r.get("split") for r in evals if r.get("phase") == phase} - {None})
        for split in splits:
            png = str(out / f"accuracy_{phase}_{split}.png")
            made.append(overlay(runs, "eval", phase, "accuracy", png, split))
    if pairs:
        made.append(divergence_figure(pairs, str(out / "divergence.png")))
    for name, d in dists.items():
        if d["jax"] and d["pytorch"] and "accuracy (final)" in name:
            png = str(out / f"final_{_slug(name)}.png")
            groups = {"JAX": d["jax"], "PyTorch": d["pytorch"]}
            title = f"{name}: JAX vs PyTorch"
            made.append(figures.final_distribution(groups, png, f"{name} (%)", title, percent=True))
    return [os.path.basename(p) for p in made if p]


# ----------------------------------------------------------------------------- report


def _g(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _pair_lines(pair: dict) -> list[str]:
    tr, ev, pd = pair["divergence"]["train"], pair["divergence"]["eval"], pair["params"]
    first = tr["first"]
    lines = [
        f"### {pair['jax']} (JAX) vs {pair['torch']} (PyTorch)",
        "",
        f"- same initial parameters (hash): {pair['same_init']}",
        f"- first logged step ({first['phase']} {first['step']}): loss {first['loss_jax']:.7g}"
        f" vs {first['loss_torch']:.7g} (relative difference {_g(first['loss_rel_diff'])}),"
        f" grad norm relative difference {_g(first['grad_norm_rel_diff'])}",
        f"- over {tr['n']} logged steps: max |loss difference| {_g(tr['max_loss_abs_diff'])}"
        f" (relative {_g(tr['max_loss_rel_diff'])}), max grad-norm relative difference"
        f" {_g(tr['max_grad_norm_rel_diff'])}",
        f"- over {ev['n']} evals: max eval-loss relative difference"
        f" {_g(ev['max_loss_rel_diff'])}, max accuracy difference"
        f" {_g(ev['max_accuracy_abs_diff'])}",
    ]
    if "unavailable" in pd:
        lines.append(f"- final parameter distance: unavailable ({pd['unavailable']})")
    else:
        lines.append(
            f"- final parameters (step {pd['step']}, after porting): L2 distance {_g(pd['l2'])}"
            f" (relative {_g(pd['rel'])}), max |difference| {_g(pd['max_abs'])}; BatchNorm"
            f" statistics relative {_g(pd['bn_stats_rel'])}"
        )
    return [*lines, ""]


def _dist_lines(dists: dict) -> list[str]:
    lines = [
        "| metric | JAX mean (n) | PyTorch mean (n) | JAX - PyTorch [CI] | test p |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, d in dists.items():
        c = d["comparison"]
        ma = f"{np.mean(d['jax']):.4g} ({len(d['jax'])})" if d["jax"] else "n/a"
        mb = f"{np.mean(d['pytorch']):.4g} ({len(d['pytorch'])})" if d["pytorch"] else "n/a"
        if c is None:
            lines.append(f"| {name} | {ma} | {mb} | {d.get('note', 'n/a')} | |")
            continue
        ci = f"{c['diff']:.4g} [{c['diff_ci_low']:.4g}, {c['diff_ci_high']:.4g}]"
        lines.append(
            f"| {name} | {ma} | {mb} | {ci} | {c['test']['name']} {_g(c['test']['p_value'])} |"
        )
    return lines


def write_report(result: dict, out: Path) -> str:
    lines = [
        "# JAX vs PyTorch",
        "",
        f"- JAX: `{result['jax']['path']}` ({result['jax']['kind']},"
        f" {len(result['jax']['runs'])} run(s))",
        f"- PyTorch: `{result['torch']['path']}` ({result['torch']['kind']},"
        f" {len(result['torch']['runs'])} run(s))",
        *[f"- note: {n}" for n in result["notes"]],
        "",
        "## Curves",
        "",
        *[f"![{f}]({f})" for f in result["figures"] if not f.startswith(("final_", "diverg"))],
        "",
        "## Same batches, same initial weights: divergence",
        "",
    ]
    if result["pairs"]:
        lines += ["![divergence](divergence.png)", ""]
        for pair in result["pairs"]:
            lines += _pair_lines(pair)
    else:
        lines += ["No PyTorch run has the config of a JAX run (no per-step comparison).", ""]
    lines += ["## Final metrics across seeds", "", *_dist_lines(result["distributions"]), ""]
    lines += [f"![{f}]({f})" for f in result["figures"] if f.startswith("final_")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _pairs(jax_runs, torch_runs, notes: list) -> list[dict]:
    """Each PyTorch run with the first JAX run of the same config, and their divergence."""
    pairs = []
    for t in torch_runs:
        j = next((j for j in jax_runs if same_batches(j, t)), None)
        if j is None:
            continue
        try:
            divergence = trajectory_divergence(j.rows, t.rows)
        except CompareError as e:
            notes.append(f"{j.name} vs {t.name}: {e}")
            continue
        pairs.append(
            {
                "jax": j.name,
                "torch": t.name,
                "same_init": j.info.get("init_param_hash") == t.info.get("init_param_hash"),
                "divergence": divergence,
                "params": final_param_distance(j, t),
            }
        )
    return pairs


def _check_comparable(jax_runs, torch_runs, pairs, dists) -> None:
    """Refuses inputs that share no final metric and no same-batches pair."""
    if pairs or dists:
        return

    def names(runs):
        return sorted(set().union(*(final_metrics(r) for r in runs)))

    raise CompareError(
        f"nothing to compare: the JAX runs have {names(jax_runs)[:6]}, the PyTorch runs "
        f"{names(torch_runs)[:6]} (map PyTorch metric names with readers' mapping)"
    )


def compare(jax_path, torch_path, out, *, mapping=None, phase=None, seed=0) -> dict:
    """Compares JAX runs with PyTorch runs; writes OUT/compare.json, report.md and figures.

    Args:
      jax_path: a jaxrepro run directory, or a study directory (``runs/<name>/``).
      torch_path: a reference workdir, a directory of them, or PyTorch results.
      out: the output directory (created).
      mapping: metric-name mapping for PyTorch result files (see ``readers``).
      phase: the phase of PyTorch result rows that carry none (default: the JAX runs'
        only trained phase, else 'pretrain').
      seed: seed of the Monte-Carlo permutation draws.

    Returns:
      What compare.json holds.

    Raises:
      CompareError: for missing or unreadable inputs, or nothing in common to compare.
    """
    jax_kind, jax_runs = load_jax(jax_path)
    torch_kind, torch_runs = load_torch(torch_path, mapping, phase)
    notes = []
    if torch_kind == "results":
        default = _fill_phase(torch_runs, jax_runs) if phase is None else phase
        notes.append(f"PyTorch result rows without a phase were taken as phase {default!r}")
    pairs = _pairs(jax_runs, torch_runs, notes)
    dists = distributions(jax_runs, torch_runs, seed)
    _check_comparable(jax_runs, torch_runs, pairs, dists)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "jax": {"path": str(jax_path), "kind": jax_kind, "runs": [r.name for r in jax_runs]},
        "torch": {
            "path": str(torch_path),
            "kind": torch_kind,
            "runs": [r.name for r in torch_runs],
        },
        "pairs": pairs,
        "distributions": dists,
        "notes": notes,
        "figures": _figures(jax_runs + torch_runs, pairs, dists, out),
    }
    jsonio.write_json(str(out / "compare.json"), result)
    result["report"] = write_report(result, out)
    return result


def main_from_flags(flags) -> int:
    """``jaxrepro compare --jax=RUN_OR_STUDY --torch=PATH --out=DIR``."""
    for name in ("jax", "torch", "out"):
        if not getattr(flags, name):
            raise JaxreproError(f"--{name} is required")
    result = compare(flags.jax, flags.torch, flags.out)
    for pair in result["pairs"]:
        first = pair["divergence"]["train"]["first"]
        print(
            f"{pair['jax']} vs {pair['torch']}: first-step loss relative difference "
            f"{_g(first['loss_rel_diff'])}, max over the run "
            f"{_g(pair['divergence']['train']['max_loss_rel_diff'])}"
        )
    print(f"report: {result['report']}")
    return 0
