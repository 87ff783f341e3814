"""The study's figures show what they must: a line per run (or per arm beyond ten runs),
human labels in %, drop-off episodes shaded from onset to end, bands inside the data's
range; and their files are PNGs of >= 150 dpi and >= 1200 px with a vector copy.

Figures are built from synthetic rows and workdirs and inspected through their artists
(each carries a gid naming the run, arm, band or episode it draws).
"""

import json
import math
import os
import struct

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.patches import Rectangle

from jaxrepro import dropoff
from jaxrepro.diagnose import figure as diagnose_figure
from jaxrepro.report import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRETRAIN_STEPS = 100  # the fine-tuning phase starts at step 100


def _png_info(path) -> tuple[int, int, float]:
    """(width, height, dpi) from the PNG's IHDR and pHYs chunks."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    i = data.index(b"pHYs")
    ppm_x, _, unit = struct.unpack(">IIB", data[i + 4 : i + 13])
    assert unit == 1  # pixels per metre
    return width, height, ppm_x * 0.0254


def _rows(seed, spike_at=None, drop_at=None, nan_at=None, rise=None):
    """Pretrain + finetune rows with batch noise, evals every 20 steps.

    ``rise``: (first, last) steps whose loss is 4x (a sustained rise).
    """
    rng = np.random.default_rng(seed)
    rows, step = [], 0
    for phase, n in (("pretrain", PRETRAIN_STEPS), ("finetune", 60)):
        for i in range(n):
            loss = (0.3 + 2.0 * math.exp(-i / 25)) * (1 + rng.normal(0, 0.1))
            loss = 6.0 * loss if step == spike_at else loss
            loss = 4.0 * loss if rise and rise[0] <= step <= rise[1] else loss
            loss = math.nan if step == nan_at else loss
            rows.append({"kind": "train", "step": step, "phase": phase, "phase_step": i,
                         "epoch": 0, "loss": loss, "accuracy": 0.5, "grad_norm": 1.0,
                         "update_norm": 0.01, "param_norm": 10.0, "lr": 1e-3,
                         "finite": math.isfinite(loss)})  # fmt: skip
            if i % 20 == 0 or i == n - 1:
                for split in ("source_test", "target_test"):
                    acc = min(0.95, 0.1 + i / 40) + rng.normal(0, 0.02)
                    acc = acc - 0.3 if step == drop_at and split == "source_test" else acc
                    rows.append({"kind": "eval", "step": step, "phase": phase,
                                 "phase_step": i, "split": split, "loss": 1.0,
                                 "accuracy": acc, "n": 100})  # fmt: skip
            step += 1
    return rows


def _workdir(path, seed, **kw):
    path.mkdir()
    rows = _rows(seed, **kw)
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    seeds = {"init": 0, "head": 0, "data": 0, "aug": seed, "dropout": 0}
    phases = {
        "pretrain": {"start": 0, "steps": PRETRAIN_STEPS, "num_classes": 10},
        "finetune": {"start": PRETRAIN_STEPS, "steps": 60, "num_classes": 10},
    }
    info = {"seeds": seeds, "status": "done", "phases": phases}
    (path / "run.json").write_text(json.dumps(info))
    (path / "config.json").write_text("{}")
    dropoff.write_dropoffs(str(path), dropoff.detect(rows))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Four runs: a spike; a spike and an accuracy fall; a NaN; a sustained rise."""
    root = tmp_path_factory.mktemp("study")
    return [
        ("aug=0", _workdir(root / "s0", 0, spike_at=80)),
        ("aug=1", _workdir(root / "s1", 1, spike_at=80, drop_at=60)),
        ("aug=2", _workdir(root / "s2", 2, nan_at=130)),
        ("aug=3", _workdir(root / "s3", 4, rise=(140, 151))),
    ]


def _gids(container, prefix):
    """gid -> artists of the container's lines, collections and patches with that prefix."""
    out = {}
    artists = [*container.lines, *container.collections, *container.patches]
    for a in artists:
        gid = a.get_gid() or ""
        if gid.startswith(prefix):
            out.setdefault(gid, []).append(a)
    return out


def _hex(colour) -> str:
    return mcolors.to_hex(colour).upper()


def test_workdirs_hold_the_planted_events(study):
    events = {label: dropoff.load_dropoffs(wd) for label, wd in study}
    assert [e["step"] for e in events["aug=0"]] == [80]
    assert {(e["step"], e["metric"]) for e in events["aug=1"]} == {
        (80, "loss"),
        (60, "accuracy/source_test"),
    }
    assert [(e["step"], e["kind"]) for e in events["aug=2"]] == [(130, "nonfinite")]
    [rise] = events["aug=3"]
    assert (rise["step"], rise["kind"]) == (140, "rise") and rise["end_step"] > 145


# ----------------------------------------------------------------------------- helpers


def test_ema_is_debiased_stays_in_range_and_skips_nonfinite():
    assert np.allclose(figures.ema([2.0, 2.0, 2.0], 5), 2.0)  # a biased EMA starts at 0.67
    x = np.array([1.0, 4.0, np.nan, 0.5, 8.0, 2.0])
    y = figures.ema(x, 3)
    assert np.isnan(y[2]) and np.isfinite(np.delete(y, 2)).all()
    assert np.all(np.delete(y, 2) >= 0.5) and np.all(np.delete(y, 2) <= 8.0)
    # The NaN does not enter: the average after it is that of the finite values alone.
    assert y[3] == pytest.approx(figures.ema(np.delete(x, 2), 3)[2])
    # In log space the average is geometric: below the arithmetic one of 1 and 100.
    assert figures.ema([1.0, 100.0], 3, log=True)[1] < figures.ema([1.0, 100.0], 3)[1]
    assert np.array_equal(figures.ema(x, 1), x, equal_nan=True)


def test_median_iqr_stays_inside_skewed_values_where_mean_minus_std_does_not():
    # One run's loss 10x the others' at a step (a spike): mean - std is below zero.
    series = [(np.arange(3.0), np.array(v)) for v in ([0.1, 0.1, 0.1], [0.2, 0.2, 0.2],
                                                      [10.0, 0.3, 0.3])]  # fmt: skip
    stack = np.stack([v for _, v in series])
    assert (stack.mean(0) - stack.std(0, ddof=1))[0] < 0
    steps, q25, q50, q75 = figures.median_iqr(series)
    assert np.array_equal(steps, [0, 1, 2])
    assert np.all(q25 >= stack.min(0)) and np.all(q75 <= stack.max(0))
    assert np.allclose(q50, np.median(stack, 0))
    # A step that fewer than 3 runs logged has no band.
    _, _, q50, _ = figures.median_iqr([(np.array([0.0, 1.0]), np.ones(2))] * 2 + series[:1])
    assert np.isfinite(q50[0]) and np.isnan(figures.median_iqr(series[:2])[2]).all()


# ----------------------------------------------------------------------------- Fig. 1-3


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_loss_figure_has_a_smoothed_and_a_raw_line_per_run(study, phase):
    fig = figures.loss_across_runs(study, phase, title="Fig. 3: pretraining loss, init seeds")
    [ax] = fig.axes
    labels = [label for label, _ in study]
    runs, raw = _gids(ax, "run:"), _gids(ax, "raw:")
    assert {k: len(v) for k, v in runs.items()} == {f"run:{lab}": 1 for lab in labels}
    assert {k: len(v) for k, v in raw.items()} == {f"raw:{lab}": 1 for lab in labels}
    assert len({_hex(v[0].get_color()) for v in runs.values()}) == len(labels)
    assert {_hex(v[0].get_color()) for v in runs.values()} <= set(figures.PALETTE)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[: len(labels)] == labels
    assert (
        ax.get_xlabel() == {"pretrain": "Pretraining step", "finetune": "Fine-tuning step"}[phase]
    )
    assert ax.get_ylabel().startswith("Training loss (cross-entropy, nats)")
    assert ax.get_yscale() == "log"
    assert ax.get_title().startswith("Fig. 3: pretraining loss, init seeds\n")
    assert "EMA" in ax.get_title() and "median and IQR" in ax.get_title()
    # The raw line is the logged loss; the smoothed one the EMA of its log.
    rows = dropoff.read_metrics(study[0][1])
    loss = np.array([r["loss"] for r in rows if r["kind"] == "train" and r["phase"] == phase])
    assert np.allclose(raw["raw:aug=0"][0].get_ydata(), loss)
    smoothed = figures.ema(loss, figures.DEFAULT_SMOOTH, log=True)
    assert np.allclose(runs["run:aug=0"][0].get_ydata(), smoothed)
    assert runs["run:aug=0"][0].get_xdata()[0] == 0  # the phase's own step


def test_loss_band_is_the_median_and_iqr_of_the_drawn_lines(study):
    [ax] = figures.loss_across_runs(study, "pretrain").axes
    lines = {g: v[0] for g, v in _gids(ax, "run:").items()}
    stack = np.stack([line.get_ydata() for line in lines.values()])
    steps = next(iter(lines.values())).get_xdata()
    [band] = _gids(ax, "band:")["band:all runs"]
    assert isinstance(band, PolyCollection)
    lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    for x, y in band.get_paths()[0].vertices:
        i = int(np.searchsorted(steps, x))
        assert steps[i] == x
        assert lo[i] - 1e-9 <= y <= hi[i] + 1e-9, (x, y)
    [median] = _gids(ax, "arm:")["arm:all runs"]
    assert np.allclose(median.get_ydata(), np.nanmedian(stack, axis=0))


def test_loss_figure_marks_each_loss_episode_at_its_peak(study):
    [ax] = figures.loss_across_runs(study, "pretrain").axes
    marks = _gids(ax, "episode:")
    # Pretraining loss episodes: the spikes at step 80 of aug=0 and aug=1.
    assert set(marks) == {"episode:aug=0", "episode:aug=1"}
    for label in ("aug=0", "aug=1"):
        [event] = [e for e in dropoff.load_dropoffs(dict(study)[label]) if e["metric"] == "loss"]
        [mark] = marks[f"episode:{label}"]
        assert np.allclose(mark.get_offsets(), [[event["peak_step"], event["peak_after"]]])


def test_accuracy_figure_is_in_percent_with_falls_and_chance(study):
    [ax] = figures.accuracy_across_runs(study, "pretrain", "source_test").axes
    assert ax.get_ylabel() == "Source test accuracy (%)"
    rows = dropoff.read_metrics(study[1][1])
    acc = [r["accuracy"] for r in rows if r["kind"] == "eval" and r["phase"] == "pretrain"
           and r["split"] == "source_test"]  # fmt: skip
    [line] = _gids(ax, "run:aug=1")["run:aug=1"]
    assert np.allclose(line.get_ydata(), 100 * np.asarray(acc))
    [fall] = [e for e in dropoff.load_dropoffs(study[1][1]) if e["kind"] == "fall"]
    [mark] = _gids(ax, "episode:aug=1")["episode:aug=1"]
    assert np.allclose(mark.get_offsets(), [[fall["peak_step"], 100 * fall["peak_after"]]])
    chance = [line for line in ax.lines if line.get_label() == "chance (10%)"]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == 10


# ----------------------------------------------------------------------------- per run


def test_run_panels_shade_every_episode_from_onset_to_end(study):
    quiet = ("quiet", _rows(5))
    fig = figures.run_panels([*study, quiet])
    assert set(fig.run_axes) == {*dict(study), "quiet"}
    for label, source in [*study, quiet]:
        ax, twin = fig.run_axes[label]
        events = dropoff.detect(source) if isinstance(source, list) else (
            dropoff.load_dropoffs(source))  # fmt: skip
        spans = [p for p in ax.patches if (p.get_gid() or "").startswith("episode:")]
        assert len(spans) == len(events), label
        for span, e in zip(spans, events, strict=True):
            assert isinstance(span, Rectangle)
            x0, x1 = span.get_x(), span.get_x() + span.get_width()
            assert (x0, x1) == (e["step"], max(e["step"] + 1, e["end_step"]))
            kind = "nonfinite" if e["kind"] == "nonfinite" else e["metric"].split("/")[0]
            assert _hex(span.get_facecolor()) == figures.EPISODE_COLOURS[kind]
        assert len(_gids(ax, "run:")) == 1 and len(_gids(ax, "raw:")) == 1
        assert twin.get_ylim() == (-2, 102)
        assert max(np.nanmax(line.get_ydata()) for line in twin.lines) > 1  # in %
        boundary = [line for line in ax.lines if line.get_gid() == "phase_boundary"]
        assert [line.get_xdata()[0] for line in boundary] == [PRETRAIN_STEPS]
        assert ax.get_title().startswith(label + "\nfinal target test ")
    [rise_span] = [p for p in fig.run_axes["aug=3"][0].patches if p.get_gid()]
    assert rise_span.get_width() > 10  # a sustained rise is a band, not a line
    assert fig.run_axes["quiet"][1].get_ylabel() == "Test accuracy (%)"


def test_timeline_spans_both_phases_with_one_line_per_run(study):
    fig = figures.timeline(study)
    ax_loss, ax_acc = fig.axes
    labels = [label for label, _ in study]
    lines = _gids(ax_loss, "run:")
    assert {k: len(v) for k, v in lines.items()} == {f"run:{lab}": 1 for lab in labels}
    x = lines["run:aug=0"][0].get_xdata()
    assert x[0] == 0 and x[-1] == PRETRAIN_STEPS + 59  # the global step, both phases
    y = lines["run:aug=0"][0].get_ydata()
    assert np.isnan(y[PRETRAIN_STEPS])  # a gap at the phase boundary
    for ax in (ax_loss, ax_acc):
        boundary = [line for line in ax.lines if line.get_gid() == "phase_boundary"]
        assert [line.get_xdata()[0] for line in boundary] == [PRETRAIN_STEPS]
    assert "(%)" in ax_acc.get_ylabel() and ax_acc.get_xlabel().startswith("Step")
    acc = _gids(ax_acc, "acc:aug=0")["acc:aug=0"][0].get_ydata()
    assert 1 < np.nanmax(acc) <= 100


# ----------------------------------------------------------------------------- arms


def test_up_to_ten_runs_each_run_has_its_own_colour():
    runs = [(f"r{i}", _rows(3 + i)) for i in range(10)]
    [ax] = figures.loss_across_runs(runs, "finetune").axes
    colours = [_hex(v[0].get_color()) for v in _gids(ax, "run:").values()]
    assert sorted(colours) == sorted(figures.PALETTE)


@pytest.fixture(scope="module")
def twelve_runs():
    runs = [(f"r{i}", _rows(3 + i)) for i in range(12)]
    arms = {f"r{i}": "pad 4" if i % 2 == 0 else "pad 3" for i in range(12)}
    return runs, arms


def test_beyond_ten_runs_a_colour_and_a_legend_entry_per_arm(twelve_runs):
    runs, arms = twelve_runs
    [ax] = figures.loss_across_runs(runs, "pretrain", arms=arms).axes
    runs_drawn = _gids(ax, "run:")
    assert len(runs_drawn) == 12  # every run is still drawn, thin
    by_arm = {}
    for gid, (line,) in runs_drawn.items():
        by_arm.setdefault(arms[gid[4:]], set()).add(_hex(line.get_color()))
    assert by_arm == {"pad 4": {figures.PALETTE[0]}, "pad 3": {figures.PALETTE[1]}}
    assert set(_gids(ax, "arm:")) == {"arm:pad 4", "arm:pad 3"}
    assert set(_gids(ax, "band:")) == {"band:pad 4", "band:pad 3"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["pad 4 (median, IQR; n=6)", "pad 3 (median, IQR; n=6)"]
    assert not set(legend) & set(arms)  # no run has an entry of its own


def test_beyond_ten_runs_the_small_multiples_name_each_run_and_arm(twelve_runs):
    runs, arms = twelve_runs
    fig = figures.run_panels(runs, arms=arms)
    for label, (ax, _) in fig.run_axes.items():
        assert ax.get_title().startswith(f"{label} ({arms[label]})\n")
        [(line,)] = _gids(ax, "run:").values()
        assert _hex(line.get_color()) == figures.PALETTE[0 if arms[label] == "pad 4" else 1]


def test_several_arms_at_ten_runs_or_fewer_differ_by_line_style(study):
    arms = {"aug=0": "a", "aug=1": "a", "aug=2": "b", "aug=3": "b"}
    [ax] = figures.loss_across_runs(study, "pretrain", arms=arms).axes
    styles = {g[4:]: v[0].get_linestyle() for g, v in _gids(ax, "run:").items()}
    assert styles["aug=0"] == styles["aug=1"] != styles["aug=2"] == styles["aug=3"]
    assert not _gids(ax, "band:")  # two runs per arm: no band
    assert {"arm: a", "arm: b"} <= {t.get_text() for t in ax.get_legend().get_texts()}


def test_final_accuracy_by_arm_labels_every_run(study):
    arms = {"aug=0": "pad 4", "aug=1": "pad 4", "aug=2": "pad 3", "aug=3": "pad 3"}
    [ax] = figures.final_accuracy_by_arm(study, arms=arms).axes
    assert "Final target test accuracy (%)" in ax.get_ylabel()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["pad 4\n(n=2)", "pad 3\n(n=2)"]
    texts = {t.get_text(): t for t in ax.texts}
    for label, workdir in study:
        rows = dropoff.read_metrics(workdir)
        final = [r["accuracy"] for r in rows if r["kind"] == "eval" and r["phase"] == "finetune"
                 and r["split"] == "target_test"][-1]  # fmt: skip
        [point] = _gids(ax, f"point:{label}")[f"point:{label}"]
        x, y = point.get_offsets()[0]
        assert y == pytest.approx(100 * final)
        assert round(x) == (1 if arms[label] == "pad 4" else 2)
        assert texts[label].xy == pytest.approx((x, y))  # the run's name beside its point
    assert any(line.get_label() == "chance (10%)" for line in ax.lines)


def test_final_distribution_counts_nonfinite_values_and_shows_percent(tmp_path):
    values = {"lr 3e-3": [0.615, 0.907, 0.927, 0.683], "lr 1e-3": [0.84, 0.90, 0.87, math.nan]}
    fig = figures.final_distribution_figure(values, "Final accuracy (%)", percent=True)
    [ax] = fig.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["lr 3e-3\n(n=4)", "lr 1e-3\n(n=3, 1 non-finite)"]
    ys = sorted(y for c in ax.collections if (c.get_gid() or "").startswith("point:")
                for _, y in c.get_offsets())  # fmt: skip
    assert ys == pytest.approx(sorted(100 * v for vs in values.values() for v in vs if v == v))
    with pytest.raises(ValueError, match="no finite"):
        figures.final_distribution({"a": [math.nan]}, str(tmp_path / "x.png"), ylabel="x")
    assert not os.path.exists(tmp_path / "x.png")


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def drawn(study, tmp_path_factory):
    """The study's figures as the report draws them (titles: one replaced, a Fig. 3)."""
    out = tmp_path_factory.mktemp("drawn") / "figures"
    titles = {"pretrain_loss": "Fig. 3 analogue"}
    return out, figures.study_figures(study, str(out), titles=titles)


def test_study_figures_writes_each_figure_as_png_and_pdf(drawn):
    out, made = drawn
    assert list(made) == list(figures.STUDY_FIGURES)
    for name, f in made.items():
        assert f["png"] == str(out / f"{name}.png") and f["pdf"] == str(out / f"{name}.pdf")
        width, height, dpi = _png_info(f["png"])
        assert width >= 1200 and height >= 400, name
        assert dpi == pytest.approx(figures.DPI, abs=0.5) and dpi >= 150, name
        with open(f["pdf"], "rb") as fh:
            assert fh.read(5) == b"%PDF-", name
    assert made["pretrain_loss"]["title"] == "Fig. 3 analogue"
    assert made["finetune_loss"]["title"] == figures.STUDY_FIGURES["finetune_loss"]


def test_the_same_figure_saved_again_gives_the_same_pdf(study, drawn, tmp_path):
    out, made = drawn
    fig = figures.final_accuracy_by_arm(study, title=made["final_accuracy"]["title"])
    again = figures.save(fig, str(tmp_path / "again.png"))
    with (
        open(made["final_accuracy"]["pdf"], "rb") as a,
        open(figures.vector_path(again), "rb") as b,
    ):
        assert a.read() == b.read()
    with pytest.raises(ValueError, match=r"\.png"):
        figures.save(fig, str(tmp_path / "fig.jpg"))
    assert not os.path.exists(tmp_path / "fig.jpg")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"arms": {"aug=0": "a"}}, "run 'aug=1' has no arm"),
        ({"titles": {"fig9": "x"}}, "no study figure named"),
    ],
)
def test_study_figures_bad_input_fails_before_writing(study, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        figures.study_figures(study, str(tmp_path / "figures"), **kw)
    assert not os.path.exists(tmp_path / "figures")


def test_bad_runs_are_named():
    with pytest.raises(ValueError, match="no runs"):
        figures.loss_across_runs([], "pretrain")
    with pytest.raises(ValueError, match="two runs are labelled 'a'"):
        figures.loss_across_runs([("a", _rows(3)), ("a", _rows(4))], "pretrain")
    with pytest.raises(ValueError, match="no train rows of phase 'warmup'"):
        figures.loss_across_runs([("a", _rows(3))], "warmup")


# ----------------------------------------------------------------------------- replay


@pytest.mark.parametrize("metric", ["loss", "accuracy/source_test"])
def test_replay_overlay(study, tmp_path, metric):
    original = dropoff.read_metrics(study[1][1])
    # A replay from the checkpoint at step 40, on another augmentation stream.
    replay = [r for r in _rows(7) if r["step"] >= 40]
    event = next(e for e in dropoff.load_dropoffs(study[1][1]) if e["metric"] == metric)
    out = tmp_path / "replay.png"
    figures.replay_overlay(original, replay, event, str(out), metric=metric, window=30)
    assert _png_info(out)[0] >= 1200 and (tmp_path / "replay.pdf").exists()


def test_replay_overlay_from_a_step_without_an_event(study, tmp_path):
    # A replay branched with --from_step has no event: only its step is known.
    original = dropoff.read_metrics(study[0][1])
    replay = [r for r in _rows(9) if r["step"] >= 120]
    out = tmp_path / "from_step.png"
    figures.replay_overlay(original, replay, {"step": 120}, str(out), restore_step=120)
    assert _png_info(out)[0] >= 1200
    with pytest.raises(ValueError, match="'step'"):
        figures.replay_overlay(original, replay, {}, str(out))


# ----------------------------------------------------------------------------- diagnosis


def test_diagnosis_figure_shares_the_style(study, tmp_path):
    original = dropoff.read_metrics(study[0][1])
    arms = {
        "exact": [r for r in original if r["step"] >= 60],
        "aug1": [r for r in _rows(8) if r["step"] >= 60],
    }
    event = {"phase": "pretrain", "step": 80, "kind": "spike", "metric": "loss"}
    diag = {"restore_step": 60, "until": 100, "window": 5, "verdict": {"cause": "data"}}
    fig = diagnose_figure.build(original, arms, event, diag)
    ax_loss, ax_acc = fig.axes
    assert ax_loss.get_ylabel().startswith(figures.LOSS_LABEL) and ax_loss.get_yscale() == "log"
    assert ax_acc.get_ylabel() == "Source test accuracy (%)" and ax_acc.get_xlabel() == "Step"
    [aug] = _gids(ax_loss, "arm:aug1")["arm:aug1"]
    assert _hex(aug.get_color()) == figures.OKABE_ITO["orange"]
    acc = _gids(ax_acc, "original")["original"][0].get_ydata()
    assert np.nanmax(acc) > 1  # in %
    png = diagnose_figure.draw(original, arms, event, diag, str(tmp_path / "figure"))
    assert _png_info(png)[0] >= 1200 and _png_info(png)[2] >= 150
    assert (tmp_path / "figure.svg").exists()


def test_report_draws_one_set_with_grid_points_as_arms(monkeypatch, tmp_path):
    from jaxrepro.report import report

    seen = {}

    def fake(runs, fig_dir, arms=None):
        seen.update(runs=runs, fig_dir=fig_dir, arms=arms)
        png = os.path.join(fig_dir, "pretrain_loss.png")
        return {"pretrain_loss": {"png": png, "pdf": png[:-4] + ".pdf", "title": "T"}}

    monkeypatch.setattr(figures, "study_figures", fake)
    monkeypatch.setattr(report, "_arm_loss_figures", lambda runs, arms, fig_dir: {})

    def record(run, point, seed, arm=None):
        r = {"run": run, "point": point, "varied_seeds": {"aug": seed}, "workdir": f"/w/{run}"}
        return r | ({"arm": arm} if arm else {})

    # Two grid points with the same seeds: the labels are the run names, the arms the points.
    by_point = {
        "pad=4": [record("pad4_aug0", "pad=4", 0), record("pad4_aug1", "pad=4", 1)],
        "pad=3": [record("pad3_aug0", "pad=3", 0), record("pad3_aug1", "pad=3", 1)],
    }
    made = report.draw_figures(str(tmp_path), by_point)
    assert [label for label, _ in seen["runs"]] == [
        "pad4_aug0",
        "pad4_aug1",
        "pad3_aug0",
        "pad3_aug1",
    ]
    assert seen["arms"] == {"pad4_aug0": "pad=4", "pad4_aug1": "pad=4", "pad3_aug0": "pad=3",
                            "pad3_aug1": "pad=3"}  # fmt: skip
    assert made == {"pretrain_loss": {"path": os.path.join("figures", "pretrain_loss.png"),
                                      "vector": os.path.join("figures", "pretrain_loss.pdf"),
                                      "title": "T"}}  # fmt: skip
    # One point: the labels are the varied seeds; a record's own arm wins over its point.
    report.draw_figures(str(tmp_path), {"base": [record("aug0", "base", 0, arm="lr x0.5"),
                                                 record("aug1", "base", 1)]})  # fmt: skip
    assert seen["arms"] == {"aug=0": "lr x0.5", "aug=1": "base"}


def test_several_arms_get_each_arm_loss_figure_the_baseline_as_fig_1_and_2(tmp_path):
    from jaxrepro.report import report

    finetune_only = [r for r in _rows(5) if r["phase"] == "finetune"]  # a branch arm
    runs = [("a0", _rows(0)), ("a1", _rows(1)), ("b0", _rows(2)), ("r0", finetune_only)]
    arms = {"a0": "pad4", "a1": "pad4", "b0": "width 32", "r0": "lr_half"}
    made = report._arm_loss_figures(runs, arms, str(tmp_path))
    assert list(made) == [
        "arm_pad4_pretrain_loss",
        "arm_pad4_finetune_loss",
        "arm_width_32_pretrain_loss",
        "arm_width_32_finetune_loss",
        "arm_lr_half_finetune_loss",  # no pretraining rows: no pretraining figure
    ]
    assert "Fig. 1 analogue" in made["arm_pad4_pretrain_loss"]["title"]
    assert "Fig. 2 analogue" in made["arm_pad4_finetune_loss"]["title"]
    assert "analogue" not in made["arm_width_32_pretrain_loss"]["title"]
    for f in made.values():
        assert os.path.exists(f["png"]) and os.path.exists(f["pdf"])
    assert _png_info(made["arm_pad4_pretrain_loss"]["png"])[0] >= 1200
    assert report._arm_loss_figures(runs[:2], {"a0": "pad4", "a1": "pad4"}, str(tmp_path)) == {}


def test_an_episode_of_the_first_format_is_marked_at_its_onset():
    # No peak_step: peak_after is the trough, but its step is unknown; the onset is drawn.
    old = {"step": 60, "phase": "pretrain", "metric": "accuracy/source_test", "kind": "fall",
           "after": 0.4, "peak_after": 0.1, "end_step": 80}  # fmt: skip
    new = {**old, "peak_step": 80, "version": 2}
    assert figures._peak(old) == (60, 0.4) and figures._peak(new) == (80, 0.1)
