"""Figures of a study, drawn from what its runs wrote to disk: PNG and a PDF of each.

**Style**, one for every figure of the package (the diagnosis figure uses it too):

* Colours are colour-blind-safe: Paul Tol's "muted" scheme (nine colours) and black
  give one colour per run up to :data:`MAX_RUN_COLOURS` (10) runs; beyond, one colour
  per *arm* (runs drawn thin in their arm's colour, with the arm's median and IQR band;
  the small multiples tell the runs apart by their panel titles). Marks that are not
  runs (drop-off episodes, the onset window, arm families of a diagnosis) take the
  Okabe-Ito colours (:data:`OKABE_ITO`). With several arms and at most ten runs, an
  arm is told by its line style.
* Curves are smoothed by an exponential moving average (EMA, debiased as TensorBoard
  does, span ``smooth`` logged steps; of the log for a loss, whose batch noise is
  multiplicative) and the raw curve is drawn faint behind. Each phase is smoothed on
  its own (a new head makes the loss jump at a phase start). The axis label says so.
* Bands are the median and the interquartile range across runs at each step:
  quantiles of the drawn values, so a band never leaves their range (a mean +- std of a
  skewed loss does, below zero). They need 3 runs at a step.
* Labels are words with units: "Training loss (cross-entropy, nats)", "Target test
  accuracy (%)", "Pretraining step". Accuracies, stored as fractions, are shown in %.
* Files: a PNG at :data:`DPI` (150) dpi, at least 1200 px wide, and a vector copy (PDF
  by default) beside it with the same stem. The PDF carries no creation date, so
  drawing the same data twice gives the same bytes.

**Inputs.** ``runs`` is a list of ``(label, source)``, where source is a workdir (its
metrics.jsonl, dropoffs.json and run.json are read) or a list of metrics rows (drop-offs
are then detected with the default thresholds). ``arms`` optionally maps each label to
the arm it belongs to; without it every run is in one arm.

The builders (``*_figure``, :func:`run_panels`, :func:`timeline`,
:func:`final_accuracy_by_arm`) return a ``matplotlib.figure.Figure`` on the Agg canvas
(never pyplot: no global state, no display); :func:`save` writes one, and
:func:`study_figures` draws and writes a study's whole set. Every artist that stands for
a run, an arm, a band or an episode carries a ``gid`` (``run:LABEL``, ``raw:LABEL``,
``arm:ARM``, ``band:ARM``, ``episode:LABEL``, ``point:LABEL``) so what a figure shows can
be checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from jaxrepro import dropoff

DPI = 150
MIN_WIDTH_IN = 8.5  # 8.5 in at 150 dpi: 1275 px
VECTOR_FORMAT = "pdf"
MAX_RUN_COLOURS = 10
MIN_BAND_RUNS = 3
DEFAULT_SMOOTH = 10

# Okabe & Ito (2008), "Color Universal Design": distinguishable with the common
# colour-vision deficiencies.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
# Paul Tol's "muted" qualitative scheme (nine colours) and black: one colour per run.
PALETTE = (
    "#332288",  # indigo
    "#CC6677",  # rose
    "#117733",  # green
    "#DDCC77",  # sand
    "#88CCEE",  # cyan
    "#882255",  # wine
    "#44AA99",  # teal
    "#999933",  # olive
    "#AA4499",  # purple
    "#000000",  # black
)
LINESTYLES = ("-", "--", ":", "-.")
GREY = "#777777"
# Shading of drop-off episodes by the stream they are on.
EPISODE_COLOURS = {
    "loss": OKABE_ITO["vermillion"],
    "accuracy": OKABE_ITO["sky_blue"],
    "nonfinite": OKABE_ITO["black"],
}

PHASE_NAMES = {"pretrain": "pretraining", "finetune": "fine-tuning"}
SPLIT_NAMES = {"source_test": "source test", "target_test": "target test"}
OWN_SPLIT = {"pretrain": "source_test", "finetune": "target_test"}
LOSS_LABEL = "Training loss (cross-entropy, nats)"
_TRAIN_LABELS = {
    "loss": LOSS_LABEL,
    "accuracy": "Training batch accuracy (%)",
    "grad_norm": "Gradient norm (global L2)",
    "update_norm": "Update norm (global L2)",
    "param_norm": "Parameter norm (global L2)",
    "lr": "Learning rate",
}


def phase_name(phase: str) -> str:
    """'pretraining', 'fine-tuning', or the phase's own name."""
    return PHASE_NAMES.get(phase, str(phase))


def accuracy_label(split: str) -> str:
    """'Source test accuracy (%)' for 'source_test' (and so on)."""
    return f"{SPLIT_NAMES.get(split, split.replace('_', ' ')).capitalize()} accuracy (%)"


def train_label(metric: str) -> str:
    """The axis label of a train-row field, with its unit."""
    return _TRAIN_LABELS.get(metric, metric.replace("_", " ").capitalize())


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- loading


def load_run(source) -> tuple[list[dict], list[dict]]:
    """Rows and drop-off events of one run.

    Args:
        source: a workdir, or a list of metrics rows.

    Returns:
        ``(rows, events)``: events from dropoffs.json when the workdir has one, else
        detected from the rows with ``dropoff.default_config()``.
    """
    if isinstance(source, str | os.PathLike):
        workdir = os.fspath(source)
        rows = dropoff.read_metrics(workdir)
        if os.path.exists(os.path.join(workdir, dropoff.DROPOFFS_FILE)):
            return rows, dropoff.load_dropoffs(workdir)
        return rows, dropoff.detect(rows)
    if isinstance(source, list):
        return source, dropoff.detect(source)
    raise ValueError(f"a run is a workdir or a list of rows, got {type(source).__name__}")


@dataclasses.dataclass
class _Run:
    label: str
    arm: str
    rows: list
    events: list
    info: dict  # run.json, or {} for rows

    def chance(self, phase: str) -> float | None:
        """1 / number of classes of the phase, when run.json says it."""
        n = (self.info.get("phases") or {}).get(phase, {}).get("num_classes")
        return 1.0 / n if isinstance(n, int) and n > 0 else None


def _info(source) -> dict:
    if isinstance(source, str | os.PathLike):
        path = os.path.join(os.fspath(source), "run.json")
        if os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
            return info if isinstance(info, dict) else {}
    return {}


def _load_runs(runs, arms=None) -> list[_Run]:
    if not runs:
        raise ValueError("no runs to plot")
    if arms is not None and not isinstance(arms, dict):
        raise ValueError(f"arms maps a run's label to its arm, got {type(arms).__name__}")
    out, seen = [], set()
    for item in runs:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"each run is a (label, workdir-or-rows) pair, got {item!r:.80}")
        label, source = str(item[0]), item[1]
        if label in seen:
            raise ValueError(f"two runs are labelled {label!r}: labels tell runs apart")
        seen.add(label)
        if arms is not None and label not in arms:
            raise ValueError(f"run {label!r} has no arm in arms (arms: {sorted(map(str, arms))})")
        arm = "all runs" if arms is None else str(arms[label])
        out.append(_Run(label, arm, *load_run(source), _info(source)))
    return out


@dataclasses.dataclass
class _Colours:
    """One colour per run up to MAX_RUN_COLOURS runs, else one per arm."""

    per_run: bool
    arms: list
    run_colour: dict
    run_style: dict

    @classmethod
    def of(cls, loaded: list[_Run]) -> _Colours:
        arms = list(dict.fromkeys(r.arm for r in loaded))
        per_run = len(loaded) <= MAX_RUN_COLOURS
        colour, style = {}, {}
        for i, r in enumerate(loaded):
            a = arms.index(r.arm)
            if per_run:
                colour[r.label] = PALETTE[i]
                style[r.label] = LINESTYLES[a % len(LINESTYLES)]
            else:
                colour[r.label] = PALETTE[a % len(PALETTE)]
                style[r.label] = LINESTYLES[(a // len(PALETTE)) % len(LINESTYLES)]
        return cls(per_run, arms, colour, style)

    def arm_colour(self, arm: str) -> str:
        return PALETTE[self.arms.index(arm) % len(PALETTE)]

    def arm_style(self, arm: str) -> str:
        return LINESTYLES[(self.arms.index(arm) // len(PALETTE)) % len(LINESTYLES)]


# ----------------------------------------------------------------------------- series


def _series(rows, kind, phase, metric, split=None) -> tuple[np.ndarray, np.ndarray]:
    """Steps (sorted) and values of ``metric`` over the rows of one kind and phase (any
    phase when None) and split. A step logged twice (a resumed run that re-logged it)
    keeps its last value; a missing or non-finite value is NaN."""
    points = {}
    for r in rows:
        if r.get("kind") == kind and (phase is None or r.get("phase") == phase):
            if split is None or r.get("split") == split:
                value = r.get(metric)
                ok = isinstance(value, int | float) and math.isfinite(value)
                points[r["step"]] = float(value) if ok else math.nan
    steps = sorted(points)
    return np.asarray(steps, dtype=np.float64), np.asarray([points[s] for s in steps])


def _phase_offset(rows, phase) -> int:
    """step - phase_step of the phase's rows (0 when the rows do not say)."""
    for r in rows:
        if r.get("phase") == phase and isinstance(r.get("phase_step"), int):
            return int(r["step"]) - int(r["phase_step"])
    return 0


def _phase_starts(rows) -> dict:
    """Phase -> its first step, in the order the phases ran."""
    starts = {}
    for r in rows:
        p = r.get("phase")
        if p is not None and p not in starts:
            starts[p] = int(r["step"]) - int(r.get("phase_step", 0))
    return starts


def ema(values, span: int, log: bool = False) -> np.ndarray:
    """Debiased exponential moving average over the finite values.

    ``alpha = 2 / (span + 1)``; the average at a point is a weighted mean of the finite
    values up to it, divided by the weights' sum (so the first points are not pulled
    towards zero), hence within their range. A non-finite value is NaN in the output and
    does not enter the average. ``log``: average the logs and exponentiate (a geometric
    mean: batch losses are right-skewed, their log is roughly symmetric); only when
    every finite value is positive, otherwise the plain average. A span <= 1 returns
    the values unchanged.
    """
    x = np.asarray(values, dtype=np.float64)
    if span <= 1 or x.size == 0:
        return x.copy()
    finite = np.isfinite(x)
    use_log = log and bool(np.all(x[finite] > 0))
    y = np.log(np.where(finite, x, 1.0)) if use_log else x
    decay = 1.0 - 2.0 / (span + 1.0)
    out = np.full(x.shape, np.nan)
    num = den = 0.0
    for i in range(x.size):
        if finite[i]:
            num = decay * num + (1.0 - decay) * y[i]
            den = decay * den + (1.0 - decay)
            out[i] = num / den
    return np.exp(out) if use_log else out


def median_iqr(series, min_runs: int = MIN_BAND_RUNS):
    """``(steps, q25, median, q75)`` across runs at every step any run logged.

    Args:
        series: ``[(steps, values)]``, one per run.
        min_runs: the finite values a step needs; with fewer its quantiles are NaN.

    Quantiles are linear interpolations between order statistics, so they lie within
    the values' range at each step.
    """
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.array([])
    stack = np.full((len(series), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        stack[i, np.searchsorted(steps, s)] = v
    enough = np.sum(np.isfinite(stack), axis=0) >= min_runs
    q = np.full((3, steps.size), np.nan)
    if enough.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q[:, enough] = np.nanquantile(stack[:, enough], [0.25, 0.5, 0.75], axis=0)
    return steps, q[0], q[1], q[2]


def _final(rows, phase, split) -> float:
    """The last eval accuracy of a phase and split (NaN when none)."""
    _, values = _series(rows, "eval", phase, "accuracy", split)
    return float(values[-1]) if values.size else math.nan


# ----------------------------------------------------------------------------- figure


def new_figure(width: float = 10.0, height: float = 5.2) -> Figure:
    """A figure on the Agg canvas, constrained layout, at least MIN_WIDTH_IN wide."""
    fig = Figure(figsize=(max(width, MIN_WIDTH_IN), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax, grid: bool = True) -> None:
    """Ticks, grid and spines of the package's figures."""
    ax.tick_params(labelsize=9)
    if grid:
        ax.grid(alpha=0.3, linewidth=0.6)
    ax.spines["top"].set_visible(False)


def set_title(fig_or_ax, title: str, note: str | None = None) -> None:
    """A title and, on a second smaller line, how the figure was drawn."""
    text = title if not note else f"{title}\n" + "\n".join(textwrap.wrap(note, 90))
    if isinstance(fig_or_ax, Figure):
        fig_or_ax.suptitle(text, fontsize=12 if not note else 11)
    else:
        fig_or_ax.set_title(text, fontsize=12 if not note else 11)


def save(fig: Figure, out_png: str, vector: str = VECTOR_FORMAT) -> str:
    """Writes ``out_png`` at DPI and a vector copy (``pdf`` or ``svg``) with the same stem.

    Returns:
        ``out_png``.
    """
    if not out_png.endswith(".png"):
        raise ValueError(f"a figure's path ends in .png, got {out_png!r}")
    if vector not in ("pdf", "svg"):
        raise ValueError(f"the vector copy is a pdf or an svg, got {vector!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png", dpi=DPI)
    fig.set_layout_engine("none")  # the layout is done: the vector copy keeps it (and time)
    meta = {"CreationDate": None} if vector == "pdf" else {"Date": None}
    fig.savefig(out_png[: -len(".png")] + "." + vector, format=vector, metadata=meta)
    return out_png


def vector_path(out_png: str, vector: str = VECTOR_FORMAT) -> str:
    """The vector copy :func:`save` writes beside ``out_png``."""
    return out_png[: -len(".png")] + "." + vector


def _legend(ax, **kw) -> None:
    """The axes' legend, the runs' entries first."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(
            range(len(handles)),
            key=lambda i: not str(handles[i].get_gid() or "").startswith(("run:", "arm:")),
        )
        handles, labels = [handles[i] for i in order], [labels[i] for i in order]
        kw = {"fontsize": 8, "frameon": False, **kw}
        ax.legend(handles, labels, **kw)


def _outside_legend(ax) -> None:
    n_entries = len(ax.get_legend_handles_labels()[0])
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_entries <= 18 else 2)


def _smooth_note(smooth: int, log: bool, band: bool) -> str:
    what = f"EMA{' of the log' if log else ''} over {smooth} logged steps"
    parts = [f"lines: {what}; faint: raw" if smooth > 1 else "lines: raw values"]
    if band:
        parts.append(f"band: median and IQR across runs (>= {MIN_BAND_RUNS} at a step)")
    return "; ".join(parts)


def _episode_metric(event) -> str:
    if event.get("kind") == "nonfinite":
        return "nonfinite"
    return "loss" if event.get("metric") == "loss" else "accuracy"


def _peak(event) -> tuple[float, float]:
    """(step, value) of an episode's peak; in files of the first format, which give no
    peak step, its onset and the value there."""
    if "peak_step" in event:
        step, value = event["peak_step"], event.get("peak_after")
    else:
        step, value = event["step"], event.get("after")
    ok = isinstance(value, int | float) and math.isfinite(value)
    return float(step), (float(value) if ok else math.nan)


def _mark_peaks(ax, events, offset, colour, scale, labelled: set, gid: str) -> None:
    """Marks episodes at their peak (a loss's highest level, an accuracy's trough; the onset in
    files of the first format); non-finite ones as a dotted vertical line."""
    for e in events:
        step, value = _peak(e)
        kind = _episode_metric(e)
        label = None
        if kind not in labelled:
            labelled.add(kind)
            label = {
                "loss": "loss drop-off",
                "accuracy": "accuracy drop-off",
                "nonfinite": "non-finite values",
            }[kind]
        if kind == "nonfinite" or not math.isfinite(value):
            ax.axvline(
                e["step"] - offset,
                color=EPISODE_COLOURS["nonfinite"],
                linestyle=":",
                linewidth=1.2,
                label=label,
                gid=gid,
            )
        else:
            ax.scatter(
                [step - offset],
                [value * scale],
                marker="^" if kind == "loss" else "v",
                s=60,
                facecolor=colour,
                edgecolor="black",
                linewidth=0.8,
                zorder=5,
                label=label,
                gid=gid,
            )


def _shade_episodes(ax, events, offset=0) -> int:
    """One axvspan per episode, onset to end (at least one step wide); returns the count."""
    for e in events:
        kind = _episode_metric(e)
        lo = e["step"] - offset
        end = e.get("end_step")
        hi = max(lo + 1, (end if isinstance(end, int | float) else e["step"]) - offset)
        ax.axvspan(
            lo,
            hi,
            color=EPISODE_COLOURS[kind],
            alpha=0.22 if kind != "nonfinite" else 0.35,
            linewidth=0,
            zorder=0,
            gid=f"episode:{kind}",
        )
    return len(events)


def _draw_bands(ax, loaded, colours, series_of, scale=1.0) -> bool:
    """Median and IQR: of all runs in grey (one arm, <= 10 runs), or per arm in its
    colour (> 10 runs); none for several arms at <= 10 runs (their lines are few).
    Returns whether a band was drawn."""
    if colours.per_run:
        groups = {"all runs": loaded} if len(colours.arms) == 1 else {}
    else:
        groups = {a: [r for r in loaded if r.arm == a] for a in colours.arms}
    drawn = False
    for arm, members in groups.items():
        series = [series_of[r.label] for r in members if r.label in series_of]
        if len(series) < MIN_BAND_RUNS:
            continue
        steps, q25, q50, q75 = median_iqr(series)
        if not np.isfinite(q50).any():
            continue
        grey = colours.per_run
        colour = "#444444" if grey else colours.arm_colour(arm)
        ax.fill_between(
            steps,
            q25 * scale,
            q75 * scale,
            color="#BBBBBB" if grey else colour,
            alpha=0.45 if grey else 0.2,
            linewidth=0,
            zorder=1,
            label=f"IQR of {len(series)} runs" if grey else None,
            gid=f"band:{arm}",
        )
        label = f"median of {len(series)} runs" if grey else f"{arm} (median, IQR; n={len(series)})"
        ax.plot(
            steps,
            q50 * scale,
            color=colour,
            linewidth=2.2 if not grey else 1.6,
            linestyle="--" if grey else colours.arm_style(arm),
            zorder=4,
            label=label,
            gid=f"arm:{arm}",
        )
        drawn = True
    return drawn


def _arm_legend_entries(ax, colours) -> None:
    """Legend entries of the arms' line styles (several arms, <= 10 runs)."""
    if colours.per_run and len(colours.arms) > 1:
        for i, arm in enumerate(colours.arms):
            ax.plot(
                [], [], color=GREY, linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"arm: {arm}"
            )


# ----------------------------------------------------------------------------- builders


def loss_across_runs(
    runs,
    phase: str,
    *,
    metric: str = "loss",
    arms: dict | None = None,
    title: str | None = None,
    smooth: int = DEFAULT_SMOOTH,
    logy: bool | None = None,
    dropoffs: bool = True,
) -> Figure:
    """A training curve of one phase across runs (Fig. 1, 2 and 3 of the study).

    Args:
        runs: ``[(label, workdir or rows)]``.
        phase: 'pretrain' or 'finetune'.
        metric: a train-row field (loss, accuracy, grad_norm, ...).
        arms: label -> arm (default: one arm).
        title: the figure's title (default: "<Phase> <metric> across N runs").
        smooth: EMA span in logged steps (1: raw only).
        logy: logarithmic y axis (default: for the loss, when every value is positive).
        dropoffs: mark the peaks of the runs' drop-off episodes of this phase's metric.

    Returns:
        The figure: per run a faint raw line (``raw:LABEL``) and a smoothed one
        (``run:LABEL``), the bands (:func:`_draw_bands`), episode marks (``episode:LABEL``).
    """
    loaded = _load_runs(runs, arms)
    colours = _Colours.of(loaded)
    scale = 100.0 if metric == "accuracy" else 1.0
    is_loss = metric == "loss"
    fig = new_figure()
    ax = fig.add_subplot()
    smoothed, labelled, every = {}, set(), []
    for r in loaded:
        steps, raw = _series(r.rows, "train", phase, metric)
        if steps.size == 0:
            continue
        x = steps - _phase_offset(r.rows, phase)
        line = ema(raw, smooth, log=is_loss)
        smoothed[r.label] = (x, line)
        every.append(raw[np.isfinite(raw)])
        colour = colours.run_colour[r.label]
        if smooth > 1:
            ax.plot(
                x,
                raw * scale,
                color=colour,
                linewidth=0.6,
                alpha=0.25 if colours.per_run else 0.08,
                zorder=2,
                gid=f"raw:{r.label}",
            )
        ax.plot(x, line * scale, **_line_kw(colours, r.label, 1.5), zorder=3, gid=f"run:{r.label}")
        if dropoffs:
            mine = [e for e in r.events if e["phase"] == phase and e["metric"] == metric]
            _mark_peaks(
                ax,
                mine,
                _phase_offset(r.rows, phase),
                colour,
                scale,
                labelled,
                f"episode:{r.label}",
            )
    if not smoothed:
        raise ValueError(f"no train rows of phase {phase!r} with {metric!r} in any run")
    band = _draw_bands(ax, loaded, colours, smoothed, scale)
    _arm_legend_entries(ax, colours)
    values = np.concatenate(every) if every else np.array([])
    if logy is None:
        logy = is_loss and values.size > 0 and bool(np.all(values > 0))
    if logy:
        ax.set_yscale("log")
    name = "loss" if is_loss else metric.replace("_", " ")
    n = len(smoothed)
    set_title(
        ax,
        title or f"{_capital(phase_name(phase))} {name} across {n} runs",
        _smooth_note(smooth, is_loss, band),
    )
    ax.set_xlabel(f"{_capital(phase_name(phase))} step", fontsize=11)
    ax.set_ylabel(train_label(metric) + (", log scale" if logy else ""), fontsize=11)
    style_axes(ax)
    _outside_legend(ax)
    return fig


def accuracy_across_runs(
    runs,
    phase: str,
    split: str,
    *,
    arms: dict | None = None,
    title: str | None = None,
    dropoffs: bool = True,
) -> Figure:
    """Eval accuracy (%) of one phase and split across runs, falls marked at the trough.

    Evals are sparse: no smoothing. Bands as :func:`loss_across_runs`; a dotted line at
    chance level when the runs' run.json gives the number of classes.
    """
    loaded = _load_runs(runs, arms)
    colours = _Colours.of(loaded)
    fig = new_figure()
    ax = fig.add_subplot()
    series, labelled = {}, set()
    metric = f"accuracy/{split}"
    for r in loaded:
        steps, values = _series(r.rows, "eval", phase, "accuracy", split)
        if steps.size == 0:
            continue
        offset = _phase_offset(r.rows, phase)
        series[r.label] = (steps - offset, values)
        colour = colours.run_colour[r.label]
        kw = _line_kw(colours, r.label, 1.3) | {"markersize": 3 if colours.per_run else 1.5}
        ax.plot(steps - offset, values * 100, marker="o", **kw, zorder=3, gid=f"run:{r.label}")
        if dropoffs:
            mine = [e for e in r.events if e["phase"] == phase and e["metric"] == metric]
            _mark_peaks(ax, mine, offset, colour, 100.0, labelled, f"episode:{r.label}")
    if not series:
        raise ValueError(f"no eval rows of phase {phase!r}, split {split!r} in any run")
    band = _draw_bands(ax, loaded, colours, series, 100.0)
    _arm_legend_entries(ax, colours)
    chance = {r.chance(phase) for r in loaded} - {None}
    if len(chance) == 1:
        c = 100 * chance.pop()
        ax.axhline(c, color=GREY, linestyle=":", linewidth=1, label=f"chance ({c:.0f}%)")
    ax.set_ylim(-2, 102)
    n = len(series)
    note = "lines: every eval" + (
        f"; band: median and IQR across runs (>= {MIN_BAND_RUNS} at a step)" if band else ""
    )
    default = f"{accuracy_label(split)[:-4]} during {phase_name(phase)} across {n} runs"
    set_title(ax, title or default, note)
    ax.set_xlabel(f"{_capital(phase_name(phase))} step", fontsize=11)
    ax.set_ylabel(accuracy_label(split), fontsize=11)
    style_axes(ax)
    _outside_legend(ax)
    return fig


def _grid(n: int) -> tuple[int, int]:
    ncols = min(n, 4 if n <= 16 else 6)
    return math.ceil(n / ncols), ncols


def _joined(parts) -> tuple[np.ndarray, ...]:
    """Arrays of several phases joined into one, a NaN between phases (a gap in a line).
    ``parts``: tuples of equally long arrays, at least one of them not empty."""
    parts = [p for p in parts if p[0].size]
    out = []
    for k in range(len(parts[0])):
        pieces = []
        for i, p in enumerate(parts):
            pieces += [p[k]] + ([np.array([np.nan])] if i < len(parts) - 1 else [])
        out.append(np.concatenate(pieces))
    return tuple(out)


def _whole_run(rows, smooth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, raw loss, smoothed loss) over every phase, each phase smoothed on its own."""
    parts = []
    for phase in _phase_starts(rows):
        steps, raw = _series(rows, "train", phase, "loss")
        parts.append((steps, raw, ema(raw, smooth, log=True)))
    if not any(p[0].size for p in parts):
        return np.array([]), np.array([]), np.array([])
    return _joined(parts)


def _own_accuracy(rows) -> tuple[np.ndarray, np.ndarray]:
    """(steps, accuracy) of each phase's own split: source test, then target test."""
    parts = [
        _series(rows, "eval", phase, "accuracy", OWN_SPLIT[phase])
        for phase in _phase_starts(rows)
        if phase in OWN_SPLIT
    ]
    return _joined(parts) if any(p[0].size for p in parts) else (np.array([]), np.array([]))


def _line_kw(colours: _Colours, label: str, width: float) -> dict:
    """A run's line: its colour and style; thin and translucent beyond ten runs."""
    kw = {"color": colours.run_colour[label], "linestyle": colours.run_style[label]}
    if colours.per_run:
        return kw | {"linewidth": width, "label": label}
    return kw | {"linewidth": 0.7, "alpha": 0.5}


def run_panels(
    runs, *, arms: dict | None = None, title: str | None = None, smooth: int = DEFAULT_SMOOTH
) -> Figure:
    """Small multiples: one panel per run over the whole run (both phases).

    Each panel has the training loss (left axis, log scale: raw faint, EMA in the run's
    colour, or its arm's beyond ten runs) and the eval accuracies on a twin axis in %
    (source test dashed, target test solid), the phase boundary as a vertical line, and
    each drop-off episode shaded from its onset to its end (``episode:<stream>``
    axvspans on the loss axis: vermillion for the loss, sky blue for an accuracy fall,
    black for non-finite values). The panel's title is the run's label (and arm), with
    its final target test accuracy.

    Returns:
        The figure; ``fig.run_axes`` maps each label to its ``(loss_ax, accuracy_ax)``.
    """
    loaded = _load_runs(runs, arms)
    colours = _Colours.of(loaded)
    nrows, ncols = _grid(len(loaded))
    fig = new_figure(max(12.0, 3.3 * ncols), 1.2 + 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    fig.run_axes = {}
    for i, r in enumerate(loaded):
        ax = axes[i // ncols][i % ncols]
        colour = colours.run_colour[r.label]
        steps, raw, smoothed = _whole_run(r.rows, smooth)
        if smooth > 1:
            ax.plot(steps, raw, color=colour, linewidth=0.5, alpha=0.3, gid=f"raw:{r.label}")
        ax.plot(steps, smoothed, color=colour, linewidth=1.3, gid=f"run:{r.label}")
        twin = ax.twinx()
        for split, ls, marker in (("source_test", "--", "o"), ("target_test", "-", "s")):
            steps, acc = _series(r.rows, "eval", None, "accuracy", split)
            twin.plot(
                steps,
                acc * 100,
                color="#222222" if split == "target_test" else GREY,
                linestyle=ls,
                marker=marker,
                markersize=2.2,
                linewidth=0.9,
                gid=f"acc:{split}:{r.label}",
            )
        for start in list(_phase_starts(r.rows).values())[1:]:
            ax.axvline(start, color=GREY, linewidth=0.9, linestyle="-.", gid="phase_boundary")
        _shade_episodes(ax, r.events)
        twin.set_ylim(-2, 102)
        twin.tick_params(labelsize=8)
        if i % ncols != ncols - 1 and i != len(loaded) - 1:
            twin.tick_params(labelright=False)
        else:
            twin.set_ylabel("Test accuracy (%)", fontsize=10)
        final = _final(r.rows, "finetune", "target_test")
        head = r.label + (f" ({r.arm})" if len(colours.arms) > 1 else "")
        tail = f"final target test {100 * final:.1f}%" if math.isfinite(final) else "no final eval"
        ax.set_title(f"{head}\n{tail}", fontsize=9)
        ax.set_yscale("log")
        if i + ncols >= len(loaded):  # the lowest panel of its column
            ax.set_xlabel("Step (pretraining, then fine-tuning)", fontsize=9)
            ax.xaxis.set_tick_params(labelbottom=True)
        style_axes(ax)
        ax.tick_params(labelsize=8)
        fig.run_axes[r.label] = (ax, twin)
    for ax in axes.ravel()[len(loaded) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color="#555555", linewidth=0.5, alpha=0.5, label="training loss (raw)"),
        Line2D([], [], color="#555555", linewidth=1.3, label=f"training loss (EMA, {smooth})"),
        Line2D([], [], color=GREY, ls="--", marker="o", ms=3, label="source test accuracy (%)"),
        Line2D([], [], color="#222222", marker="s", ms=3, label="target test accuracy (%)"),
        Line2D([], [], color=GREY, linestyle="-.", label="pretraining | fine-tuning"),
        Patch(color=EPISODE_COLOURS["loss"], alpha=0.3, label="loss drop-off (onset to end)"),
        Patch(color=EPISODE_COLOURS["accuracy"], alpha=0.3, label="accuracy drop-off"),
        Patch(color=EPISODE_COLOURS["nonfinite"], alpha=0.35, label="non-finite values"),
    ]
    set_title(fig, title or f"Each run: training loss and test accuracy ({len(loaded)} runs)")
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.supylabel(LOSS_LABEL + ", log scale", fontsize=11)
    return fig


def timeline(
    runs, *, arms: dict | None = None, title: str | None = None, smooth: int = DEFAULT_SMOOTH
) -> Figure:
    """The whole run across both phases: training loss above, test accuracy below.

    The loss panel is as :func:`loss_across_runs` over the global step (each phase
    smoothed on its own, one line per run with a gap between phases), drop-off peaks
    marked; the accuracy panel has each phase's own split (source test in pretraining,
    target test in fine-tuning) in %. The phase boundaries are vertical lines, named at
    the top.

    Returns:
        The figure; ``fig.axes[0]`` the loss, ``fig.axes[1]`` the accuracy.
    """
    loaded = _load_runs(runs, arms)
    colours = _Colours.of(loaded)
    fig = new_figure(11.0, 7.0)
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    labelled, boundaries, drawn = set(), {}, 0
    for r in loaded:
        steps, raw, smoothed = _whole_run(r.rows, smooth)
        if steps.size == 0:
            continue
        drawn += 1
        for p, start in _phase_starts(r.rows).items():
            boundaries.setdefault(start, p)
        colour = colours.run_colour[r.label]
        if smooth > 1:
            alpha = 0.25 if colours.per_run else 0.08
            ax_loss.plot(steps, raw, color=colour, linewidth=0.5, alpha=alpha, gid=f"raw:{r.label}")
        ax_loss.plot(steps, smoothed, **_line_kw(colours, r.label, 1.4), gid=f"run:{r.label}")
        mine = [e for e in r.events if e["metric"] == "loss"]
        _mark_peaks(ax_loss, mine, 0, colour, 1.0, labelled, f"episode:{r.label}")
        s, acc = _own_accuracy(r.rows)
        kw = _line_kw(colours, r.label, 1.2) | {"label": None}
        ax_acc.plot(s, acc * 100, marker="o", markersize=2.5, **kw, gid=f"acc:{r.label}")
    if not drawn:
        raise ValueError("no train rows in any run")
    if not colours.per_run:
        for arm in colours.arms:
            ax_loss.plot(
                [],
                [],
                color=colours.arm_colour(arm),
                linestyle=colours.arm_style(arm),
                linewidth=2,
                label=arm,
                gid=f"arm:{arm}",
            )
    _arm_legend_entries(ax_loss, colours)
    first = min(boundaries)
    for start, phase in sorted(boundaries.items()):
        if start > first:
            for ax in (ax_loss, ax_acc):
                ax.axvline(start, color=GREY, linestyle="-.", linewidth=1, gid="phase_boundary")
        ax_loss.annotate(
            _capital(phase_name(phase)),
            (start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=9,
            color="#333333",
        )
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel(LOSS_LABEL + ", log scale", fontsize=11)
    ax_acc.set_ylabel("Test accuracy (%)\nsource, then target", fontsize=11)
    ax_acc.set_ylim(-2, 102)
    ax_acc.set_xlabel("Step (pretraining, then fine-tuning)", fontsize=11)
    for ax in (ax_loss, ax_acc):
        style_axes(ax)
    set_title(
        ax_loss,
        title or f"Whole runs across both phases ({drawn} runs)",
        _smooth_note(smooth, True, False) + "; marks: drop-off peaks",
    )
    _outside_legend(ax_loss)
    return fig


def _strip(ax, groups: dict, colour_of, scale: float, label_points: bool) -> list[str]:
    """Box (median, quartiles, whiskers to min and max) and every value as a point, per
    group; each point labelled with its run when ``label_points``. Returns tick labels.

    ``groups``: name -> [(run label or None, value)].
    """
    ticks = []
    for pos, (name, items) in enumerate(groups.items(), start=1):
        finite = [(lab, v) for lab, v in items if isinstance(v, int | float) and math.isfinite(v)]
        if not finite:
            raise ValueError(f"group {name!r} has no finite value")
        values = np.asarray([v for _, v in finite]) * scale
        box = ax.boxplot(
            [values],
            positions=[pos],
            widths=0.4,
            whis=(0, 100),
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "black", "linewidth": 1.6},
        )
        for patch in box["boxes"]:
            patch.set(facecolor="#DDDDDD", alpha=0.6, edgecolor="#555555")
        order = np.argsort(values, kind="stable")
        for k, idx in enumerate(order):
            lab, v = finite[idx][0], values[idx]
            side = -1 if k % 2 == 0 else 1
            x = pos + side * 0.09
            ax.scatter(
                [x],
                [v],
                s=28,
                color=colour_of(name, lab),
                edgecolor="black",
                linewidth=0.5,
                zorder=4,
                gid=f"point:{lab if lab is not None else name}",
            )
            if label_points and lab is not None:
                ax.annotate(
                    lab,
                    (x, v),
                    xytext=(6 * side, 0),
                    textcoords="offset points",
                    ha="left" if side > 0 else "right",
                    va="center",
                    fontsize=7,
                )
        bad = len(items) - len(finite)
        ticks.append(f"{name}\n(n={len(finite)}" + (f", {bad} non-finite)" if bad else ")"))
    ax.set_xticks(range(1, len(ticks) + 1), ticks)
    ax.set_xlim(0.4, len(ticks) + 0.6)
    return ticks


def final_accuracy_by_arm(
    runs,
    *,
    arms: dict | None = None,
    phase: str = "finetune",
    split: str = "target_test",
    title: str | None = None,
) -> Figure:
    """The final accuracy (last eval of ``phase`` on ``split``, %) per arm: a box, every
    run as a point labelled with its run, n under each arm, chance level dotted.

    Returns:
        The figure; each run's point has gid ``point:LABEL``.
    """
    loaded = _load_runs(runs, arms)
    colours = _Colours.of(loaded)
    groups = {a: [] for a in colours.arms}
    for r in loaded:
        groups[r.arm].append((r.label, _final(r.rows, phase, split)))
    fig = new_figure(max(MIN_WIDTH_IN, 2.2 * len(groups) + 3.0), 5.6)
    ax = fig.add_subplot()
    _strip(ax, groups, lambda arm, lab: colours.run_colour[lab], 100.0, True)
    chance = {r.chance(phase) for r in loaded} - {None}
    if len(chance) == 1:
        c = 100 * chance.pop()
        ax.axhline(c, color=GREY, linestyle=":", linewidth=1, label=f"chance ({c:.0f}%)")
        _legend(ax, loc="lower right")
    ax.set_ylim(-2, 102)
    what = f"Final {accuracy_label(split)[0].lower()}{accuracy_label(split)[1:]}"
    ax.set_ylabel(f"{what}\nlast {phase_name(phase)} eval", fontsize=11)
    ax.set_xlabel("Arm", fontsize=11)
    set_title(
        ax,
        title or f"{what[:-4]} per arm ({len(loaded)} runs)",
        "box: median, quartiles, min to max; points: runs",
    )
    style_axes(ax)
    ax.grid(False, axis="x")
    return fig


def final_distribution_figure(
    values_by_group: dict, ylabel: str, title: str | None = None, percent: bool = False
) -> Figure:
    """Unlabelled values per group: a box and every value as a point (``percent``: the
    values are fractions, shown in %)."""
    if not values_by_group:
        raise ValueError("values_by_group is empty")
    groups = {
        str(k): [(None, float(v)) for v in np.asarray(vals, dtype=np.float64).ravel()]
        for k, vals in values_by_group.items()
    }
    fig = new_figure(max(MIN_WIDTH_IN, 2.2 * len(groups) + 3.0), 5.2)
    ax = fig.add_subplot()
    order = list(groups)
    _strip(
        ax,
        groups,
        lambda g, _: PALETTE[order.index(g) % len(PALETTE)],
        100.0 if percent else 1.0,
        False,
    )
    if percent:
        ax.set_ylim(-2, 102)
    ax.set_ylabel(ylabel, fontsize=11)
    set_title(ax, title or f"{ylabel} across runs", "box: median, quartiles, min to max")
    style_axes(ax)
    ax.grid(False, axis="x")
    return fig


# ----------------------------------------------------------------------------- writers


def curves_across_seeds(
    runs,
    phase: str,
    metric: str = "loss",
    out_png: str = "curves.png",
    dropoffs: bool = True,
    smooth: int = DEFAULT_SMOOTH,
    logy: bool | None = None,
    arms: dict | None = None,
    title: str | None = None,
) -> str:
    """Writes :func:`loss_across_runs` to ``out_png`` (and its PDF); returns ``out_png``."""
    fig = loss_across_runs(
        runs,
        phase,
        metric=metric,
        arms=arms,
        title=title,
        smooth=smooth,
        logy=logy,
        dropoffs=dropoffs,
    )
    return save(fig, out_png)


def eval_accuracy_across_seeds(
    runs, phase: str, split: str, out_png: str, arms: dict | None = None, title: str | None = None
) -> str:
    """Writes :func:`accuracy_across_runs` to ``out_png`` (and its PDF); returns ``out_png``."""
    return save(accuracy_across_runs(runs, phase, split, arms=arms, title=title), out_png)


def final_distribution(
    values_by_group: dict,
    out_png: str,
    ylabel: str,
    title: str | None = None,
    percent: bool = False,
) -> str:
    """Writes :func:`final_distribution_figure` to ``out_png`` (and its PDF)."""
    return save(final_distribution_figure(values_by_group, ylabel, title, percent), out_png)


# name -> default title: what :func:`study_figures` draws.
STUDY_FIGURES = {
    "pretrain_loss": "Pretraining loss across runs",
    "finetune_loss": "Fine-tuning loss across runs",
    "pretrain_source_accuracy": "Source test accuracy during pretraining",
    "finetune_target_accuracy": "Target test accuracy during fine-tuning",
    "run_panels": "Each run: loss, accuracy and drop-off episodes",
    "timeline": "Whole runs across both phases",
    "final_accuracy": "Final target test accuracy per arm",
    "final_source_accuracy": "Source test accuracy at the end of pretraining, per arm",
}


def study_figures(
    runs,
    fig_dir: str,
    *,
    arms: dict | None = None,
    titles: dict | None = None,
    smooth: int = DEFAULT_SMOOTH,
) -> dict:
    """Draws a study's figures into ``fig_dir``: ``NAME.png`` and ``NAME.pdf`` for each
    name of :data:`STUDY_FIGURES` that has data (a phase of zero steps has no curve).

    Args:
        runs: ``[(label, workdir or rows)]``.
        fig_dir: the directory to write into.
        arms: label -> arm (default: one arm).
        titles: name -> title, replacing the default of that figure (e.g. a Fig. 3
            analogue: ``{"pretrain_loss": "Pretraining loss under init seeds, stem B"}``).
        smooth: EMA span of the loss curves.

    Returns:
        name -> ``{"png", "pdf", "title"}`` (absolute paths), in the order drawn.
    """
    titles = {**STUDY_FIGURES, **(titles or {})}
    unknown = set(titles) - set(STUDY_FIGURES)
    if unknown:
        raise ValueError(f"no study figure named {sorted(unknown)}; names: {list(STUDY_FIGURES)}")
    _load_runs(runs, arms)  # bad input fails here, before anything is written
    kw = {"arms": arms}
    builders = {
        "pretrain_loss": lambda t: loss_across_runs(runs, "pretrain", title=t, smooth=smooth, **kw),
        "finetune_loss": lambda t: loss_across_runs(runs, "finetune", title=t, smooth=smooth, **kw),
        "pretrain_source_accuracy": lambda t: accuracy_across_runs(
            runs, "pretrain", "source_test", title=t, **kw
        ),
        "finetune_target_accuracy": lambda t: accuracy_across_runs(
            runs, "finetune", "target_test", title=t, **kw
        ),
        "run_panels": lambda t: run_panels(runs, title=t, smooth=smooth, **kw),
        "timeline": lambda t: timeline(runs, title=t, smooth=smooth, **kw),
        "final_accuracy": lambda t: final_accuracy_by_arm(runs, title=t, **kw),
        "final_source_accuracy": lambda t: final_accuracy_by_arm(
            runs, phase="pretrain", split="source_test", title=t, **kw
        ),
    }
    made = {}
    for name, build in builders.items():
        try:
            fig = build(titles[name])
        except ValueError:  # no rows of that phase or split: no such figure
            continue
        png = save(fig, os.path.join(fig_dir, f"{name}.png"))
        made[name] = {"png": png, "pdf": vector_path(png), "title": titles[name]}
    return made


# ----------------------------------------------------------------------------- replay


def _phase_at(rows, step) -> str | None:
    """The phase of the last train row at or before ``step`` (None if there is none)."""
    phase = None
    for r in rows:
        if r.get("kind") == "train" and r["step"] <= step:
            phase = r.get("phase")
    return phase


def _metric_series(rows, event, metric) -> tuple[np.ndarray, np.ndarray]:
    if metric.startswith("accuracy/"):
        return _series(rows, "eval", event["phase"], "accuracy", metric.split("/", 1)[1])
    return _series(rows, "train", event["phase"], metric)


def replay_overlay(
    original_rows,
    replay_rows,
    event: dict,
    out_png: str,
    metric: str = "loss",
    window: int = 40,
    restore_step: int | None = None,
) -> str:
    """The original and the replayed curve around a drop-off (PNG and PDF).

    Args:
        original_rows: the original run's rows (or its workdir).
        replay_rows: the replay's rows (or its workdir).
        event: the drop-off (its step and phase place the view).
        out_png: where to write the figure.
        metric: a train-row field, or 'accuracy/<split>' for eval accuracy (in %).
        window: steps shown on each side of the event.
        restore_step: the checkpoint step the replay branched from (default:
            ``event["restore_step"]`` if set, else the replay's first logged step).

    Returns:
        ``out_png``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if "step" not in event:
        raise ValueError(f"the event needs a 'step', got {sorted(event)}")
    orig, rep = load_run(original_rows)[0], load_run(replay_rows)[0]
    event = {"phase": _phase_at(orig, event["step"]), **event}
    s0, v0 = _metric_series(orig, event, metric)
    s1, v1 = _metric_series(rep, event, metric)
    if s0.size == 0 or s1.size == 0:
        raise ValueError(f"no {metric!r} rows of phase {event['phase']!r} in both runs")
    if restore_step is None:
        restore_step = event.get("restore_step", int(s1.min()))
    is_acc = metric.startswith("accuracy/")
    scale = 100.0 if is_acc else 1.0
    lo, hi = min(event["step"] - window, restore_step - 1), event["step"] + window
    fig = new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    keep0, keep1 = (s0 >= lo) & (s0 <= hi), (s1 >= lo) & (s1 <= hi)
    style = {"marker": "o", "markersize": 3} if is_acc else {}
    ax.plot(
        s0[keep0],
        v0[keep0] * scale,
        color=PALETTE[0],
        linewidth=1.4,
        label="original",
        gid="run:original",
        **style,
    )
    ax.plot(
        s1[keep1],
        v1[keep1] * scale,
        color=OKABE_ITO["orange"],
        linewidth=1.4,
        linestyle="--",
        label="replay",
        gid="run:replay",
        **style,
    )
    what = f"drop-off ({event['kind']})" if "kind" in event else "event step"
    ax.axvline(event["step"], color=OKABE_ITO["vermillion"], linestyle=":", label=what)
    ax.axvline(
        restore_step, color=OKABE_ITO["bluish_green"], linestyle="-.", label="restored checkpoint"
    )
    after = event.get("after")
    if isinstance(after, int | float) and math.isfinite(after):
        ax.scatter(
            [event["step"]],
            [after * scale],
            color=OKABE_ITO["vermillion"],
            marker="^",
            s=60,
            zorder=5,
        )
    set_title(
        ax,
        f"Replay around {phase_name(event['phase'])} step {event['step']} "
        f"(from step {restore_step})",
    )
    ax.set_xlabel("Step", fontsize=11)
    ax.set_ylabel(
        accuracy_label(metric.split("/", 1)[1]) if is_acc else train_label(metric), fontsize=11
    )
    style_axes(ax)
    _legend(ax)
    return save(fig, out_png)
