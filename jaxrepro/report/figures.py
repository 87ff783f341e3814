"""Figures of a seed study, drawn from what runs wrote to disk (PNG, Agg).

Every figure is titled, has labelled axes and a legend, and reads on its own. Figures
are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so
no global state and no display is touched.

A ``runs`` argument is a list of ``(label, source)`` where source is a workdir (its
metrics.jsonl and dropoffs.json are read) or a list of metrics rows (drop-offs are then
detected with the default thresholds).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrepro import dropoff

_DPI = 100
_EVENT_STYLE = {
    "spike": ("*", "tab:orange"),
    "rise": ("^", "tab:red"),
    "fall": ("v", "tab:red"),
    "nonfinite": ("X", "black"),
}


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


def _load_runs(runs) -> list[tuple[str, list[dict], list[dict]]]:
    if not runs:
        raise ValueError("no runs to plot")
    out = []
    for item in runs:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"each run is a (label, workdir-or-rows) pair, got {item!r:.80}")
        label, source = item
        out.append((str(label), *load_run(source)))
    return out


def _series(rows, kind, phase, metric, split=None) -> tuple[np.ndarray, np.ndarray]:
    """Steps (sorted) and values of ``metric`` over the rows of one kind/phase (and split).

    A step logged twice (a resumed run that re-logged it) keeps its last value.
    """
    points = {}
    for r in rows:
        if r.get("kind") == kind and r.get("phase") == phase:
            if split is None or r.get("split") == split:
                value = r.get(metric)
                points[r["step"]] = math.nan if value is None else float(value)
    steps = np.asarray(sorted(points), dtype=np.float64)
    return steps, np.asarray([points[s] for s in sorted(points)], dtype=np.float64)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average over finite values (a width <= 1 is no smoothing)."""
    if width <= 1 or values.size == 0:
        return values
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    kernel = np.ones(width)
    num = np.convolve(filled, kernel)[: values.size]
    den = np.convolve(finite.astype(np.float64), kernel)[: values.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _band(series: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std (ddof=1) over runs, at the steps every run logged."""
    common = series[0][0]
    for steps, _ in series[1:]:
        common = np.intersect1d(common, steps)
    if common.size == 0:
        return common, common, common
    stack = np.stack([v[np.searchsorted(s, common)] for s, v in series])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every run is NaN
        mean = np.nanmean(stack, axis=0)
        std = np.nanstd(stack, axis=0, ddof=1)
    return common, mean, std


def _draw_band(ax, series) -> None:
    """The mean and a +-1 std band over the runs (only where there are >= 2 runs)."""
    if len(series) < 2:
        return
    common, mean, std = _band(series)
    if common.size:
        ax.plot(common, mean, color="black", linewidth=1.8, label=f"mean of {len(series)}")
        ax.fill_between(common, mean - std, mean + std, color="gray", alpha=0.25,
                        label="mean ± std (ddof=1)")  # fmt: skip


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _new_figure(figsize=(8.0, 4.8)) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str) -> str:
    out_dir = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, format="png", dpi=_DPI)
    return out_png


def _mark_events(ax, events, steps, values, color, labelled: set) -> None:
    """Marks events at their (step, value); non-finite ones at the top of the axes."""
    for e in events:
        marker, ecolor = _EVENT_STYLE.get(e["kind"], ("o", "tab:red"))
        label = f"drop-off ({e['kind']})" if e["kind"] not in labelled else None
        labelled.add(e["kind"])
        i = np.searchsorted(steps, e["step"])
        y = values[i] if i < steps.size and steps[i] == e["step"] else math.nan
        if math.isfinite(y):
            ax.scatter([e["step"]], [y], marker=marker, s=70, color=ecolor, zorder=5,
                       edgecolors=color, linewidths=1.2, label=label)  # fmt: skip
        else:
            ax.axvline(e["step"], color=ecolor, linestyle=":", linewidth=1.2, label=label)


def curves_across_seeds(
    runs, phase: str, metric: str = "loss", out_png: str = "curves.png",
    dropoffs: bool = True, smooth: int = 1, logy: bool = False,
) -> str:  # fmt: skip
    """Per-seed training curves of one phase, their mean +- std, drop-offs marked.

    Args:
        runs: ``[(label, workdir or rows)]``, one per seed.
        phase: 'pretrain' or 'finetune'.
        metric: a train-row field (loss, accuracy, grad_norm, ...).
        out_png: where to write the figure.
        dropoffs: mark the runs' training-loss drop-offs of this phase (rises and
            non-finite values) on the drawn curve.
        smooth: trailing moving-average width of the drawn curves (1: raw).
        logy: logarithmic y axis.

    Returns:
        ``out_png``.
    """
    loaded = _load_runs(runs)
    fig = _new_figure()
    ax = fig.add_subplot()
    colors = _colors(len(loaded))
    series, labelled = [], set()
    for (label, rows, events), color in zip(loaded, colors, strict=True):
        steps, values = _series(rows, "train", phase, metric)
        if steps.size == 0:
            continue
        values = _smooth(values, smooth)
        series.append((steps, values))
        ax.plot(steps, values, color=color, alpha=0.45, linewidth=0.9, label=label)
        if dropoffs:
            mine = [e for e in events if e["phase"] == phase and e["metric"] == "loss"]
            _mark_events(ax, mine, steps, values, color, labelled)
    if not series:
        raise ValueError(f"no train rows of phase {phase!r} with {metric!r} in any run")
    _draw_band(ax, series)
    if logy:
        ax.set_yscale("log")
    smoothed = f", moving average of {smooth}" if smooth > 1 else ""
    ax.set_title(f"{phase}: training {metric} across {_seeds(len(series))}{smoothed}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {metric} (batch)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def eval_accuracy_across_seeds(runs, phase: str, split: str, out_png: str) -> str:
    """Eval accuracy of one phase and split per seed, the mean +- std, falls marked.

    Args:
        runs: ``[(label, workdir or rows)]``, one per seed.
        phase: 'pretrain' or 'finetune'.
        split: 'source_test' or 'target_test'.
        out_png: where to write the figure.

    Returns:
        ``out_png``.
    """
    loaded = _load_runs(runs)
    fig = _new_figure()
    ax = fig.add_subplot()
    series, labelled = [], set()
    metric = f"accuracy/{split}"
    for (label, rows, events), color in zip(loaded, _colors(len(loaded)), strict=True):
        steps, values = _series(rows, "eval", phase, "accuracy", split)
        if steps.size == 0:
            continue
        series.append((steps, values))
        ax.plot(steps, values, marker="o", markersize=3, color=color, alpha=0.7, label=label)
        mine = [e for e in events if e["phase"] == phase and e["metric"] == metric]
        _mark_events(ax, mine, steps, values, color, labelled)
    if not series:
        raise ValueError(f"no eval rows of phase {phase!r}, split {split!r} in any run")
    _draw_band(ax, series)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{phase}: {split} accuracy across {_seeds(len(series))}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} accuracy")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def final_distribution(
    values_by_group: dict, out_png: str, ylabel: str, title: str | None = None, seed: int = 0
) -> str:
    """One group per column: a violin (>= 2 values), a box, every run as a dot, the mean.

    Args:
        values_by_group: group name -> one value per run (non-finite values are left
            out and counted in the tick label).
        out_png: where to write the figure.
        ylabel: what the values are (e.g. "final source accuracy").
        title: the figure title (default: "<ylabel> across runs").
        seed: seed of the horizontal jitter of the dots (so a figure is reproducible).

    Returns:
        ``out_png``.
    """
    if not values_by_group:
        raise ValueError("values_by_group is empty")
    rng = np.random.default_rng(seed)
    fig = _new_figure((max(4.5, 1.6 * len(values_by_group) + 2), 4.8))
    ax = fig.add_subplot()
    ticks = []
    for pos, (name, values) in enumerate(values_by_group.items(), start=1):
        x = np.asarray(values, dtype=np.float64).ravel()
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            raise ValueError(f"group {name!r} has no finite value")
        if finite.size >= 2 and np.ptp(finite) > 0:
            parts = ax.violinplot([finite], positions=[pos], showextrema=False, widths=0.8)
            for body in parts["bodies"]:
                body.set_alpha(0.25)
        ax.boxplot([finite], positions=[pos], widths=0.25, showfliers=False)
        jitter = rng.uniform(-0.12, 0.12, finite.size)
        ax.scatter(pos + jitter, finite, s=22, color="tab:blue", zorder=3,
                   label="one run" if pos == 1 else None)  # fmt: skip
        ax.scatter([pos], [finite.mean()], marker="D", s=45, color="tab:red", zorder=4,
                   label="mean" if pos == 1 else None)  # fmt: skip
        bad = x.size - finite.size
        ticks.append(f"{name}\n(n={finite.size}" + (f", {bad} non-finite)" if bad else ")"))
    ax.set_xticks(range(1, len(ticks) + 1), ticks)
    ax.set_xlabel("group")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} across runs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_png)


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
    original_rows, replay_rows, event: dict, out_png: str, metric: str = "loss",
    window: int = 40, restore_step: int | None = None,
) -> str:  # fmt: skip
    """The original and the replayed curve around a drop-off.

    Args:
        original_rows: the original run's rows (or its workdir).
        replay_rows: the replay's rows (or its workdir).
        event: the drop-off (its step and phase place the view).
        out_png: where to write the figure.
        metric: a train-row field, or 'accuracy/<split>' for eval accuracy.
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
    lo, hi = min(event["step"] - window, restore_step - 1), event["step"] + window
    fig = _new_figure()
    ax = fig.add_subplot()
    keep0, keep1 = (s0 >= lo) & (s0 <= hi), (s1 >= lo) & (s1 <= hi)
    style = {"marker": "o", "markersize": 3} if metric.startswith("accuracy/") else {}
    ax.plot(s0[keep0], v0[keep0], color="tab:blue", linewidth=1.2, label="original", **style)
    ax.plot(s1[keep1], v1[keep1], color="tab:orange", linewidth=1.2, linestyle="--",
            label="replay", **style)  # fmt: skip
    what = f"drop-off ({event['kind']})" if "kind" in event else "event step"
    ax.axvline(event["step"], color="tab:red", linestyle=":", label=what)
    ax.axvline(restore_step, color="tab:green", linestyle="-.", label="restored checkpoint")
    after = event.get("after")
    if isinstance(after, int | float) and math.isfinite(after):
        ax.scatter([event["step"]], [after], color="tab:red", marker="^", s=60, zorder=5)
    ax.set_title(f"Replay around {event['phase']} step {event['step']} (from step {restore_step})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric if metric.startswith("accuracy/") else f"training {metric} (batch)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]
