"""Each figure writes a real PNG from synthetic workdirs."""

import json
import math
import struct

import numpy as np
import pytest

from jaxrepro import dropoff
from jaxrepro.report import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_png(path, min_bytes=8000):
    width, height = _png_size(path)
    assert path.stat().st_size > min_bytes
    assert width >= 400 and height >= 300


def _rows(seed, spike_at=None, drop_at=None, nan_at=None):
    """Pretrain + finetune rows with batch noise, evals every 20 steps."""
    rng = np.random.default_rng(seed)
    rows, step = [], 0
    for phase, n in (("pretrain", 100), ("finetune", 60)):
        for i in range(n):
            loss = (0.3 + 2.0 * math.exp(-i / 25)) * (1 + rng.normal(0, 0.1))
            loss = 6.0 * loss if step == spike_at else loss
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
    (path / "run.json").write_text(json.dumps({"seeds": seeds, "status": "done"}))
    (path / "config.json").write_text("{}")
    dropoff.write_dropoffs(str(path), dropoff.detect(rows))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return [
        ("aug=0", _workdir(root / "s0", 0, spike_at=80)),
        ("aug=1", _workdir(root / "s1", 1, spike_at=80, drop_at=60)),
        ("aug=2", _workdir(root / "s2", 2, nan_at=130)),
    ]


def test_workdirs_hold_the_planted_events(study):
    events = {label: dropoff.load_dropoffs(wd) for label, wd in study}
    assert [e["step"] for e in events["aug=0"]] == [80]
    assert {(e["step"], e["metric"]) for e in events["aug=1"]} == {
        (80, "loss"),
        (60, "accuracy/source_test"),
    }
    assert [(e["step"], e["kind"]) for e in events["aug=2"]] == [(130, "nonfinite")]


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_curves_across_seeds(study, tmp_path, phase):
    out = tmp_path / "curves.png"
    assert figures.curves_across_seeds(study, phase, out_png=str(out), smooth=3) == str(out)
    _assert_png(out)


def test_curves_from_rows_and_errors(tmp_path):
    runs = [("a", _rows(0, spike_at=50)), ("b", _rows(1))]
    out = tmp_path / "sub" / "rows.png"
    figures.curves_across_seeds(runs, "pretrain", "loss", str(out), logy=True)
    _assert_png(out)
    with pytest.raises(ValueError, match="no train rows"):
        figures.curves_across_seeds(runs, "warmup", out_png=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no runs"):
        figures.curves_across_seeds([], "pretrain", out_png=str(tmp_path / "x.png"))


@pytest.mark.parametrize("split", ["source_test", "target_test"])
def test_eval_accuracy_across_seeds(study, tmp_path, split):
    out = tmp_path / "acc.png"
    figures.eval_accuracy_across_seeds(study, "pretrain", split, str(out))
    _assert_png(out)


def test_final_distribution(tmp_path):
    out = tmp_path / "final.png"
    values = {"lr 3e-3": [0.615, 0.907, 0.927, 0.683], "lr 1e-3": [0.84, 0.90, 0.87, math.nan]}
    figures.final_distribution(values, str(out), ylabel="final source accuracy")
    _assert_png(out)
    with pytest.raises(ValueError, match="no finite"):
        figures.final_distribution({"a": [math.nan]}, str(out), ylabel="x")


@pytest.mark.parametrize("metric", ["loss", "accuracy/source_test"])
def test_replay_overlay(study, tmp_path, metric):
    original = dropoff.read_metrics(study[1][1])
    # A replay from the checkpoint at step 40, on another augmentation stream.
    replay = [r for r in _rows(7) if r["step"] >= 40]
    event = next(e for e in dropoff.load_dropoffs(study[1][1]) if e["metric"] == metric)
    out = tmp_path / "replay.png"
    figures.replay_overlay(original, replay, event, str(out), metric=metric, window=30)
    _assert_png(out)


def test_replay_overlay_from_a_step_without_an_event(study, tmp_path):
    # A replay branched with --from_step has no event: only its step is known.
    original = dropoff.read_metrics(study[0][1])
    replay = [r for r in _rows(9) if r["step"] >= 120]
    out = tmp_path / "from_step.png"
    figures.replay_overlay(original, replay, {"step": 120}, str(out), restore_step=120)
    _assert_png(out)
    with pytest.raises(ValueError, match="'step'"):
        figures.replay_overlay(original, replay, {}, str(out))
