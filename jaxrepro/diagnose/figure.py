"""A diagnosis's figure and markdown summary.

The figure has two panels sharing the step axis: the training loss of the event's phase
(log scale) and the accuracy of the phase's own target split (source test in
pretraining, target test in fine-tuning), in percent. The original run is a thick dark
line, each arm a labelled line of its own (one Okabe-Ito colour per arm family, a
different line style per arm of a family), the onset window shaded and the restore step
marked. The style, labels and files are those of the study's figures
(:mod:`jaxrepro.report.figures`): PNG at ``figures.DPI`` dpi, at least 1200 px wide, and
an SVG.
"""

from __future__ import annotations

import os

import numpy as np

from jaxrepro.report import figures

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
_FAMILY_COLOURS = {
    "exact": figures.OKABE_ITO["black"],
    "aug": figures.OKABE_ITO["orange"],
    "order": figures.OKABE_ITO["sky_blue"],
    "skip": figures.OKABE_ITO["bluish_green"],
    "lr": figures.OKABE_ITO["reddish_purple"],
    "clip": figures.OKABE_ITO["vermillion"],
}
_STYLES = figures.LINESTYLES
SPLIT_OF_PHASE = figures.OWN_SPLIT


def _series(rows, phase, kind, metric, split=None, lo=None, hi=None):
    pts = [
        (r["step"], r[metric])
        for r in rows
        if r.get("kind") == kind
        and r.get("phase") == phase
        and (split is None or r.get("split") == split)
        and (lo is None or r["step"] >= lo)
        and (hi is None or r["step"] <= hi)
        and isinstance(r.get(metric), int | float)
    ]
    if not pts:
        return np.array([]), np.array([])
    s, v = zip(*pts, strict=True)
    return np.asarray(s), np.asarray(v, float)


def draw(original: list[dict], arms: dict[str, list[dict]], event: dict, diag: dict, out: str):
    """Writes :func:`build`'s figure to ``out``.png and ``out``.svg; returns the PNG's path."""
    return figures.save(build(original, arms, event, diag), out + ".png", vector="svg")


def build(original: list[dict], arms: dict[str, list[dict]], event: dict, diag: dict):
    """The diagnosis figure (a ``matplotlib.figure.Figure``): loss above, accuracy below;
    the original's lines have gid ``original``, an arm's ``arm:NAME``."""
    phase, onset = event["phase"], int(event["step"])
    lo, hi = int(diag["restore_step"]), int(diag["until"])
    split = SPLIT_OF_PHASE.get(phase, "target_test")
    fig = figures.new_figure(9.0, 6.4)
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    panels = (
        (ax_loss, "train", "loss", None, 1.0, figures.LOSS_LABEL),
        (ax_acc, "eval", "accuracy", split, 100.0, figures.accuracy_label(split)),
    )
    for ax, kind, metric, sp, scale, label in panels:
        s, v = _series(original, phase, kind, metric, sp, lo - (hi - lo), hi)
        ax.plot(s, v * scale, color="#444444", lw=2.6, alpha=0.55, label="original", zorder=1,
                gid="original")  # fmt: skip
        seen: dict[str, int] = {}
        for name, rows in arms.items():
            family = name.rstrip("0123456789.-")
            i = seen.get(family, 0)
            seen[family] = i + 1
            s, v = _series(rows, phase, kind, metric, sp, lo, hi)
            ax.plot(
                s,
                v * scale,
                color=_FAMILY_COLOURS.get(family, "#999999"),
                ls=_STYLES[i % len(_STYLES)],
                lw=1.3,
                marker="o" if kind == "eval" else None,
                ms=3,
                label=name,
                zorder=2,
                gid=f"arm:{name}",
            )
        w = int(diag["window"])
        yellow = figures.OKABE_ITO["yellow"]
        ax.axvspan(onset - w, onset + w, color=yellow, alpha=0.3, lw=0, label="onset window")
        ax.axvline(lo, color=figures.GREY, lw=0.8, ls="--", label="restore point", gid="restore")
        ax.set_ylabel(label, fontsize=10)
        figures.style_axes(ax)
    ax_acc.set_ylim(-2, 102)
    curves = [line for line in ax_loss.get_lines() if line.get_gid() != "restore"]
    losses = [y for line in curves for y in np.asarray(line.get_ydata(), float)]
    if losses and all(y > 0 for y in losses if np.isfinite(y)):
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel(figures.LOSS_LABEL + ", log scale", fontsize=10)
    ax_acc.set_xlabel("Step", fontsize=11)
    verdict = diag.get("verdict", {})
    figures.set_title(
        fig,
        f"Drop-off ({event.get('kind')} of {event.get('metric')}) at step {onset}, "
        f"{figures.phase_name(phase)}: {verdict.get('cause', '?')}",
    )
    ax_loss.legend(fontsize=7, ncol=4, loc="upper left", frameon=False)
    return fig


def summary_markdown(diag: dict) -> str:
    """The markdown summary of one event's diagnosis."""
    e, v = diag["event"], diag["verdict"]
    lines = [
        f"## Drop-off {diag['index']}: {e.get('kind')} of {e.get('metric')} at step {e['step']} "
        f"({e['phase']})",
        "",
        f"**Verdict: {v['cause']}**" + (f"; remedies: {_remedies(v)}" if v["remedies"] else ""),
        "",
        f"- rule: {v['rule']}",
        f"- because: {v['because']}",
        f"- restored checkpoint {diag['restore_step']}, arms ran to step {diag['until']}; "
        f"recurrence: the same phase, metric and kind with an onset within "
        f"{diag['window']} steps of {e['step']}",
        f"- exact arm bitwise equal to the original: {diag['exact_bitwise']}",
        "",
        "| arm family | recurred | fraction | 95% Wilson CI |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in v["families"].items():
        lines.append(
            f"| {name} | {f['recurred']}/{f['n']} | {f['fraction']:.0%} | "
            f"[{f['ci95'][0]:.0%}, {f['ci95'][1]:.0%}] |"
        )
    lines += ["", "| arm | recurred | peak loss | min accuracy (%) |", "| --- | --- | --- | --- |"]
    for o in diag["arms"]:
        acc = o.get("min_accuracy")
        lines.append(
            f"| {o['arm']} | {'yes' if o['recurred'] else 'no'} | "
            f"{_fmt(o.get('peak_loss'))} | {_fmt(None if acc is None else 100 * acc)} |"
        )
    if diag.get("figure"):
        lines += ["", f"![diagnosis]({os.path.basename(diag['figure'])})"]
    return "\n".join(lines) + "\n"


def _remedies(v: dict) -> str:
    return ", ".join(f"{k} {t}" for k, t in v["remedies"].items())


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"
