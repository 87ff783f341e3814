"""The study report's numbers and sentences, from synthetic run records (no training)."""

import math
import os
import re

import pytest

from jaxrepro import stats
from jaxrepro.report import report

# Per run: pretraining's source accuracy evals, fine-tuning's target accuracy evals.
CURVES = {
    "aug0": ([0.5, 0.9, 0.95, 0.96], [0.3, 0.7, 0.8, 0.7, 0.8]),
    "aug1": ([0.5, 0.8, 0.85, 0.86], [0.3, 0.6, 0.7, 0.5, 0.7]),  # weak backbone: 86%
    "aug2": ([0.5, 0.9, 0.93, 0.94], [0.3, 0.5, 0.3, 0.2, 0.12]),  # failed: 12%, chance 10%
    "aug3": ([0.5, 0.9, 0.92, 0.91], [0.3, 0.7, 0.75, 0.8, 0.85]),
}


def _rows(source, target):
    rows = []
    for i, acc in enumerate(source):
        rows.append({"kind": "eval", "step": 10 * i, "phase": "pretrain", "split": "source_test",
                     "accuracy": acc, "loss": 1.0})  # fmt: skip
    for i, acc in enumerate(target):
        rows.append({"kind": "eval", "step": 100 + 10 * i, "phase": "finetune",
                     "split": "target_test", "accuracy": acc, "loss": 1.0})  # fmt: skip
    rows.append({"kind": "train", "step": 0, "phase": "pretrain", "loss": 1.0})
    return rows


def _record(name, point="base", seed=None, status="done", events=(), arm=None, curves=None):
    source, target = curves or CURVES[name]
    info = {
        "status": status,
        "wall_time_s": 10.0,
        "phases": {"pretrain": {"num_classes": 10}, "finetune": {"num_classes": 10}},
    }
    record = {
        "run": name,
        "point": point,
        "varied_seeds": {"aug": int(name[-1]) if seed is None else seed},
        "seeds": {"aug": 0},
        "status": status,
        "workdir": os.path.join("runs", name),
        "events": list(events),
        "summary": stats.run_summary(_rows(source, target)),
        "info": info,
    }
    if arm:
        record["arm"] = arm
    return record


def _event(phase, metric, step):
    return {"phase": phase, "metric": metric, "kind": "fall", "step": step}


def test_run_verdicts_name_failed_runs_and_weak_backbones():
    rows = {name: report.run_row(_record(name)) for name in CURVES}
    assert [n for n, r in rows.items() if r["failed"]] == ["aug2"]
    assert "12.0% is within 5.0 points of chance (10.0%)" in rows["aug2"]["failed"]
    assert rows["aug1"]["weak_backbone"] == pytest.approx(0.86)
    assert rows["aug0"]["weak_backbone"] is None and rows["aug0"]["chance"] == 0.1
    # Just above the margin is not a failure; a diverged run is one whatever its numbers.
    evals = {"finetune/target_test": {"final": 0.151}}
    assert report.run_verdicts("done", evals, {"finetune": 10})["failed"] is None
    assert report.run_verdicts("done", evals, {"finetune": 100})["failed"] is None
    low = {"finetune/target_test": {"final": 0.07}}
    assert report.run_verdicts("done", low, {"finetune": 100})["failed"] is None  # chance 1%
    assert "7.0% is within" in report.run_verdicts("done", low, {"finetune": 10})["failed"]
    diverged = report.run_verdicts("diverged", {"finetune/target_test": {"final": 0.9}}, {})
    assert diverged["failed"] == "stopped on a non-finite value"


def test_arm_of_names_the_arm_grid_point_or_all():
    assert report.arm_of(_record("aug0")) == report.SINGLE_ARM == "all"
    assert report.arm_of(_record("aug0", point="lr=0.001")) == "lr=0.001"
    assert report.arm_of(_record("aug0", point="lr=0.001", arm="remedy-clip")) == "remedy-clip"


def _three_arms():
    base = [_record(n, point="pad=4") for n in CURVES]
    # The same seeds, every target accuracy 10 points higher: paired, and better.
    up = {n: (s, [a + 0.1 for a in t]) for n, (s, t) in CURVES.items()}
    better = [_record(f"p3-{n}", "pad=3", int(n[-1]), curves=up[n]) for n in CURVES]
    # Other seeds (5, 6), with drop-offs in both runs: Welch, not paired.
    other = [
        _record(f"lr-aug{s}", "lr=x0.5", s, curves=CURVES["aug0"],
                events=[_event("finetune", "accuracy/target_test", 120)])
        for s in (5, 6)
    ]  # fmt: skip
    return base + better + other


def test_arm_statistics_baseline_first_paired_by_seed_and_rates():
    arms = report.arm_statistics(_three_arms())
    assert arms["baseline"] == "pad=4" and arms["arms"] == ["pad=4", "pad=3", "lr=x0.5"]
    assert arms["paired"] == {"pad=4": True, "pad=3": True, "lr=x0.5": False}
    final = arms["metrics"]["finetune/target_test/final"]["arms"]
    assert final["pad=3"]["vs_baseline"]["method"] == "paired"
    assert final["pad=3"]["vs_baseline"]["diff"] == pytest.approx(0.1)
    assert final["pad=3"]["vs_baseline"]["verdict"] == "better"
    assert final["lr=x0.5"]["vs_baseline"]["method"] == "welch"
    assert final["pad=4"]["summary"]["n"] == 4 and final["pad=4"]["vs_baseline"] is None
    failed = arms["rates"]["failed"]["arms"]
    assert (failed["pad=4"]["rate"]["k"], failed["pad=3"]["rate"]["k"]) == (1, 0)
    drops = arms["rates"]["drop-off finetune/accuracy/target_test"]["arms"]
    assert (drops["pad=4"]["rate"]["k"], drops["lr=x0.5"]["rate"]["k"]) == (0, 2)
    assert drops["lr=x0.5"]["vs_baseline"]["p_better"] < 0.5  # more drop-offs: worse


def test_eval_noise_is_the_median_of_the_runs_eval_to_eval_change():
    rows = [report.run_row(_record(n)) for n in CURVES]
    # Second halves of the target evals: aug0 0.8,0.7,0.8 -> 0.1; aug1 0.7,0.5,0.7 -> 0.2;
    # aug2 0.3,0.2,0.12 -> median(0.1, 0.08) = 0.09; aug3 0.75,0.8,0.85 -> 0.05.
    noise = report.eval_noise(rows, "finetune/target_test")
    assert noise["median"] == pytest.approx((0.09 + 0.1) / 2)
    assert (noise["min"], noise["max"], noise["max_run"]) == pytest.approx((0.05, 0.2, "aug1"))


def _summary(records, diagnoses=None):
    return {
        "study": {
            "vary": ["aug"],
            "design": "oat",
            "seeds": [0, 1, 2, 3],
            "grid": [],
            "n_runs": len(records),
            "k_last": 3,
        },  # fmt: skip
        "held_fixed": {"data": 0},
        "config": {"file": "study_config.json", "fields": {}},
        "environment": {"platform": {"cpu": None}},
        "runs": [report.run_row(r) for r in records],
        "missing_runs": [],
        "points": {
            p: dict(
                report.point_statistics([r for r in records if r["point"] == p], ["aug"]),
                attribution=[],
                attribution_note="none",
            )
            for p in dict.fromkeys(r["point"] for r in records)
        },  # fmt: skip
        "arms": report.arm_statistics(records),
        "figures": {},
        "replay": {"skipped": "replay disabled"},
        "diagnoses": diagnoses or {},
    }


DIAGNOSIS = {
    "budget": 1,
    "n_events": 3,
    "diagnosed": [
        {"run": "aug2", "index": 0, "event": _event("finetune", "accuracy/target_test", 130),
         "severity": 1.0, "cause": "the augmentation draw", "rule": "r", "because": "aug arm "
         "recovered in 4/4", "remedies": {}, "exact_bitwise": True, "summary": "s.md",
         "figure": None},
    ],
}  # fmt: skip


def test_report_says_what_happened_first(tmp_path):
    records = [_record(n) for n in CURVES]
    text = open(report.write_report(str(tmp_path), _summary(records, DIAGNOSIS))).read()
    head = text[: text.index("## What was run")]
    # Verdicts by intervention first, then failures, then confounds.
    diag = head.index("**Diagnosed by intervention**: the fall of accuracy/target_test in run aug2")
    failed = head.index("**1 of 4 runs failed**: aug2 (final finetune/target_test accuracy 12.0%")
    weak = head.index("**Confound: a weak backbone** in 1 of 4 runs")
    assert diag < failed < weak and "aug1 86.0%" in head
    assert "moves by a median 9.5 points" in head  # (9 + 10) / 2, see the test above
    assert "reproducible elsewhere: unknown" in head  # the platform sentence
    # One arm: its distribution, with a t-interval and its n.
    s = stats.summarize([0.8, 0.7, 0.12, 0.85], bounds=(0, 1))
    assert (
        f"mean {100 * s['mean']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}] (n=4)"
        in head
    )
    # The runs table names the failed run and the weak backbone.
    assert re.search(r"\| \[aug2\]\(runs/aug2/run.json\) \| done, \*\*failed\*\* \|", text)
    assert re.search(r"\| \[aug1\]\(runs/aug1/run.json\) \| done, weak backbone \|", text)


def test_every_interval_in_the_report_gives_its_n(tmp_path):
    text = open(report.write_report(str(tmp_path), _summary(_three_arms()))).read()
    intervals = re.findall(r"\[-?\d+\.\d+, -?\d+\.\d+\]( \(n=[^)]*\))?", text)
    assert len(intervals) > 20 and all(intervals), [i for i in intervals if not i][:3]
    assert "## Arms compared with the baseline (pad=4)" in text
    assert "- Arm **pad=3** against the baseline pad=4: finetune target test accuracy" in text
    assert "+10.0 points" in text and "paired" in text
    assert "- Arm **lr=x0.5** against the baseline pad=4" in text
    assert stats.NO_EFFECT in text
    # Percentages, not fractions: no accuracy printed as 0.xx.
    table = text[text.index("### Runs") : text.index("## Arms")]
    assert not re.search(r"\b0\.\d\d\b", table)


def test_report_without_failures_says_so(tmp_path):
    records = [_record(n) for n in ("aug0", "aug3")]
    text = open(report.write_report(str(tmp_path), _summary(records))).read()
    assert "- No run failed: none stopped on a non-finite value or ended within 5.0 points " \
        "of chance (10.0%)." in text  # fmt: skip
    assert "weak backbone" not in text and "Arms compared" not in text
    assert not math.isnan(report.arm_statistics(records)["metrics"][
        "finetune/target_test/final"]["arms"]["all"]["summary"]["ci_low"])  # fmt: skip
