"""A diagnosis's figure and markdown summary.

The figure has two panels sharing the step axis: the training loss of the event's phase
and the accuracy of the phase's own target split (source test in pretraining, target
test in fine-tuning), in percent. The original run is a thick dark line, each arm a
labelled line of its own (one colour per arm family, a different line style per arm of a
family), the onset window shaded and the restore step marked. PNG at 150 dpi and an SVG.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
_FAMILY_COLOURS = {
    "exact": "#000000",
    "aug": "#E69F00",
    "order": "#56B4E9",
    "skip": "#009E73",
    "lr": "#CC79A7",
    "clip": "#D55E00",
}
_STYLES = ("-", "--", ":", "-.")
SPLIT_OF_PHASE = {"pretrain": "source_test", "finetune": "target_test"}


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
    """Writes ``out``.png and ``out``.svg; returns the PNG's path."""
    phase, onset = event["phase"], int(event["step"])
    lo, hi = int(diag["restore_step"]), int(diag["until"])
    split = SPLIT_OF_PHASE.get(phase, "target_test")
    fig = Figure(figsize=(9.0, 6.4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    panels = (
        (ax_loss, "train", "loss", None, 1.0, "training loss"),
        (ax_acc, "eval", "accuracy", split, 100.0, f"{split.replace('_', ' ')} accuracy (%)"),
    )
    for ax, kind, metric, sp, scale, label in panels:
        s, v = _series(original, phase, kind, metric, sp, lo - (hi - lo), hi)
        ax.plot(s, v * scale, color="#444444", lw=2.6, alpha=0.55, label="original", zorder=1)
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
            )
        w = int(diag["window"])
        ax.axvspan(onset - w, onset + w, color="#F0E442", alpha=0.3, lw=0, label="onset window")
        ax.axvline(lo, color="#777777", lw=0.8, ls="--", label="restore point")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.set_xlabel("global step")
    verdict = diag.get("verdict", {})
    fig.suptitle(
        f"Drop-off {event.get('kind')} of {event.get('metric')} at step {onset} ({phase}): "
        f"{verdict.get('cause', '?')}",
        fontsize=11,
    )
    ax_loss.legend(fontsize=7, ncol=4, loc="upper left", frameon=False)
    fig.tight_layout()
    png = out + ".png"
    fig.savefig(png, dpi=150)
    fig.savefig(out + ".svg")
    return png


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
