"""Seed studies: parsing, planning, jobs, refusal of another study, synthetic analysis,
and a real study of 3 seeds at smoke size, interrupted (kill -9) and resumed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from helpers import REPO, TINY_FLAGS, check_event_files, snapshot, tiny_digits

from jaxrepro import config as config_lib
from jaxrepro import dropoff, rng, study
from jaxrepro.data import order
from jaxrepro.errors import ConfigError, WorkdirError
from jaxrepro.plumbing import jsonio
from jaxrepro.report import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny digits config (helpers.tiny_digits) as CLI flags, with a drop-off detector
# sensitive enough to flag something in 8 + 6 steps (the defaults exclude a phase's first
# 10 steps and then need 20 points).
SENSITIVE = {
    "dropoff.loss.transient_steps": 0,
    "dropoff.loss.min_history": 3,
    "dropoff.loss.z_threshold": 1.0,
    "dropoff.loss.min_ratio": 1.02,
}
CLI_FLAGS = [*TINY_FLAGS, *(f"--config.{k}={v}" for k, v in SENSITIVE.items())]


def _config(data_dir, **overrides):
    return tiny_digits(
        data_dir, **{k.replace(".", "__"): v for k, v in SENSITIVE.items()}, **overrides
    )


# ----------------------------------------------------------------------------- parsing


def test_parse_seeds():
    assert study.parse_seeds("0-3") == (0, 1, 2, 3)
    assert study.parse_seeds("0,1,5") == (0, 1, 5)
    assert study.parse_seeds(" 2-3, 7 ") == (2, 3, 7)
    assert study.parse_seeds([4, 1]) == (4, 1)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "--seeds is empty"),
        ("  ", "--seeds is empty"),
        ("0-", "'0-'"),
        ("a,b", "'a'"),
        ("3-1", "runs backwards (3 > 1)"),
        ("1,,2", "''"),
        ("-1", "'-1'"),
        ("1,0-2", "seed 1 appears twice"),
    ],
)
def test_parse_seeds_rejects(text, needle):
    with pytest.raises(ConfigError, match="seed|--seeds") as e:
        study.parse_seeds(text)
    assert needle in str(e.value)


def test_parse_vary():
    assert study.parse_vary("aug") == (("aug",), "oat")
    assert study.parse_vary("aug,data") == (("aug", "data"), "oat")
    assert study.parse_vary("aug*data") == (("aug", "data"), "grid")
    assert study.parse_vary("all") == (rng.FACTORS, "oat")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("augment", "unknown factor 'augment' in --vary; known: init, head, data, aug, dropout"),
        ("aug,aug", "twice"),
        ("aug*data,init", "not both"),
        ("", "--vary is required"),
        ("aug,", "empty factor name"),
    ],
)
def test_parse_vary_rejects(text, needle):
    with pytest.raises(ConfigError) as e:
        study.parse_vary(text)
    assert needle in str(e.value)


def test_parse_grid():
    grid = study.parse_grid(
        ["data.augment.crop.padding=4,3", "data.normalize.std=(0.4,0.4,0.4),(0.3,0.3,0.3)"]
    )
    assert grid == (
        ("data.augment.crop.padding", ("4", "3")),
        ("data.normalize.std", ("(0.4,0.4,0.4)", "(0.3,0.3,0.3)")),
    )
    for bad, needle in [("padding", "key=value1"), ("a=1,,2", "empty value"), ("a=1,1", "repeats")]:
        with pytest.raises(ConfigError, match=needle):
            study.parse_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        study.parse_grid(["a=1", "a=2"])


# ----------------------------------------------------------------------------- planning


def test_plan_runs_designs(data_dir):
    config = _config(data_dir)
    oat = study.plan_runs(config, study.make_spec("aug,data", "0-3"))
    # aug 0..3 at data=0, then data 1..3 at aug=0 (aug0-data0 is not run twice).
    assert [r.name for r in oat] == [
        "aug0-data0",
        "aug1-data0",
        "aug2-data0",
        "aug3-data0",
        "aug0-data1",
        "aug0-data2",
        "aug0-data3",
    ]
    assert oat[5].overrides == (("seeds.aug", "0"), ("seeds.data", "2"))
    assert len(study.plan_runs(config, study.make_spec("aug*data*init", "0-1"))) == 8
    # 'all' of a model without dropout: 4 factors x 2 seeds - 3 repeats of the base run
    assert len(study.plan_runs(config, study.make_spec("all", "0-1", config=config))) == 5
    grid = study.plan_runs(config, study.make_spec("aug", "0-1", ["data.augment.crop.padding=4,3"]))
    assert [(r.point, r.seeds) for r in grid] == [
        ("data.augment.crop.padding=4", {"aug": 0}),
        ("data.augment.crop.padding=4", {"aug": 1}),
        ("data.augment.crop.padding=3", {"aug": 0}),
        ("data.augment.crop.padding=3", {"aug": 1}),
    ]
    assert grid[3].overrides == (("data.augment.crop.padding", "3"), ("seeds.aug", "1"))
    with pytest.raises(ConfigError, match="grid point data.augment.crop.padding=-1: .*padding"):
        study.plan_runs(config, study.make_spec("aug", "0", ["data.augment.crop.padding=-1"]))
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.crop.padd'"):
        study.plan_runs(config, study.make_spec("aug", "0", ["data.augment.crop.padd=3"]))
    with pytest.raises(ConfigError, match="already varied"):
        study.make_spec("aug", "0", ["seeds.aug=1,2"])


def test_jobs_only_writes_jobs_and_runs_nothing(data_dir, tmp_path):
    out = str(tmp_path / "s")
    config = _config(data_dir, optimizer__lr=0.01)
    res = study.run_study(config, out, vary="aug", seeds="3-5", jobs_only=True)
    lines = open(res["jobs"]).read().splitlines()
    assert res["runs"] == ["aug3", "aug4", "aug5"] and len(lines) == 3
    # paths relative to OUT: no absolute path of the machine (nor of this temp dir)
    assert " --workdir=runs/aug4 " in lines[1] and "--config.seeds.aug=4" in lines[1]
    assert " --config=study_config.py " in lines[1]
    assert lines[1].endswith(" >> logs/aug4.txt 2>&1")
    python = lines[1].split()[0]
    assert not os.path.isabs(python)
    assert os.path.samefile(os.path.join(out, python), sys.executable)
    assert str(tmp_path) not in open(res["jobs"]).read()
    assert os.listdir(os.path.join(out, "runs")) == []
    assert not os.path.exists(os.path.join(out, "summary.json"))
    # The generated config file gives back the exact base config, overrides included.
    loaded = config_lib.load_config_file(os.path.join(out, "study_config.py"))
    assert config_lib.to_dict(loaded) == config_lib.to_dict(config)
    assert loaded.optimizer.lr == 0.01
    stored = jsonio.read_json(os.path.join(out, study.STUDY_FILE))
    assert stored["spec"] == {"vary": ["aug"], "design": "oat", "seeds": [3, 4, 5], "grid": []}


def test_out_holding_another_study_is_refused(data_dir, tmp_path):
    out = str(tmp_path / "s")
    study.run_study(_config(data_dir), out, vary="aug", seeds="0-2", jobs_only=True)
    before = snapshot(out)
    cases = [
        (dict(config=_config(data_dir), vary="aug", seeds="0-3"), "seeds ([0, 1, 2] there"),
        (dict(config=_config(data_dir), vary="data", seeds="0-2"), "vary (['aug'] there"),
        (
            dict(config=_config(data_dir, optimizer__lr=0.1), vary="aug", seeds="0-2"),
            "config field optimizer.lr",
        ),
        (
            dict(config=_config(data_dir), vary="aug", seeds="0-2", grid=["optimizer.lr=0.1,0.2"]),
            "grid ([] there",
        ),
    ]
    for kw, needle in cases:
        with pytest.raises(WorkdirError, match="holds another study") as e:
            study.run_study(kw.pop("config"), out, jobs_only=True, **kw)
        assert needle in str(e.value)
    assert snapshot(out) == before
    # The same study (another data_dir, which does not change results) is accepted.
    study.run_study(_config(data_dir), out, vary="aug", seeds="0-2", jobs_only=True)
    other = tmp_path / "not_a_study"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(WorkdirError, match="not empty and holds no study"):
        study.run_study(_config(data_dir), str(other), vary="aug", seeds="0-1", jobs_only=True)
    assert os.listdir(other) == ["notes.txt"]


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(vary="augg", seeds="0-1"), "unknown factor 'augg'"),
        (dict(vary="aug", seeds="0-"), "'0-'"),
        (dict(vary="aug", seeds=""), "empty"),
        (dict(vary="aug", seeds="0-1", parallel=0), "--parallel"),
    ],
)
def test_bad_input_writes_nothing(data_dir, tmp_path, kw, needle):
    with pytest.raises(ConfigError) as e:
        study.run_study(_config(data_dir), str(tmp_path / "s"), **kw)
    assert needle in str(e.value)
    assert not os.path.exists(tmp_path / "s")


def test_cli_bad_vary_exits_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrepro",
            "study",
            "--config=configs/digits.py:smoke",
            "--vary=color",
            "--seeds=0-1",
            f"--out={tmp_path}/s",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAXREPRO_COMPILE_CACHE="0"),
    )
    assert r.returncode == 2
    assert "error: unknown factor 'color' in --vary" in r.stderr
    assert not os.path.exists(tmp_path / "s")


# ----------------------------------------------------------------------------- synthetic


AUG_EFFECT = {0: 0.0, 1: 0.10, 2: -0.05, 3: 0.20}
DATA_EFFECT = {0: 0.0, 1: 0.04, 2: 0.08, 3: -0.04}


def _fake_rows(final: float) -> list[dict]:
    """8 pretrain + 6 fine-tune steps; evals [0.1, 0.5, final] and [0.1, 0.3, final - 0.2]."""
    rows = []
    for phase, start, n, accs in (
        ("pretrain", 0, 8, (0.1, 0.5, final)),
        ("finetune", 8, 6, (0.1, 0.3, final - 0.2)),
    ):
        evals = dict(zip((start, start + n // 2, start + n), accs, strict=True))
        for s in range(start, start + n + 1):
            if s in evals:
                for split in ("source_test", "target_test"):
                    rows.append(
                        {
                            "kind": "eval",
                            "step": s,
                            "phase": phase,
                            "split": split,
                            "phase_step": s - start,
                            "loss": 1.0,
                            "accuracy": evals[s],
                        }
                    )
            if s < start + n:
                loss = 3.0 if s == 5 else 2.0 - 0.05 * (s - start)
                rows.append(
                    {
                        "kind": "train",
                        "step": s,
                        "phase": phase,
                        "phase_step": s - start,
                        "loss": loss,
                        "finite": True,
                    }
                )
    return rows


def _event(step, metric, kind, before, after):
    size = after / before if kind == "rise" else before - after
    return {
        "index": 0,
        "step": step,
        "phase": "pretrain",
        "phase_step": step,
        "metric": metric,
        "kind": kind,
        "before": before,
        "after": after,
        "size": size,
        "end_step": step,
        "n_points": 1,
        "peak_after": after,
        "peak_size": size,
    }


def _fake_run(out, config, run: study.Run) -> float:
    """A finished run with planted final accuracy, a shared spike and, for aug=2, a fall."""
    cfg = study.copy_config(config)
    for k, v in run.overrides:
        config_lib.apply_override(cfg, k, v)
    seeds = rng.resolve_seeds(cfg)
    final = 0.6 + AUG_EFFECT[seeds["aug"]] + DATA_EFFECT[seeds["data"]]
    wd = os.path.join(out, "runs", run.name)
    os.makedirs(wd)
    jsonio.write_json(os.path.join(wd, "config.json"), config_lib.to_dict(cfg))
    jsonio.write_json(
        os.path.join(wd, "run.json"), {"status": "done", "seeds": seeds, "wall_time_s": 1.5}
    )
    jsonio.write_jsonl(os.path.join(wd, "metrics.jsonl"), _fake_rows(final))
    events = [_event(5, "loss", "rise", 2.0, 3.0)]
    if seeds["aug"] == 2:
        events.append(_event(8, "accuracy/source_test", "fall", 0.5, 0.3))
    dropoff.write_dropoffs(wd, events)
    return final


def test_analysis_of_a_synthetic_study(data_dir, tmp_path):
    out = str(tmp_path / "s")
    config = _config(data_dir)
    study.run_study(config, out, vary="aug,data", seeds="0-3", jobs_only=True)
    runs = study.plan_runs(config, study.make_spec("aug,data", "0-3"))
    finals = {r.name: _fake_run(out, config, r) for r in runs}
    summary = study.run_study(config, out, vary="aug,data", seeds="0-3", replay=False)
    session = summary["sessions"][-1]
    assert session["launched"] == [] and len(summary["runs"]) == 7
    assert session["code_at_start"] == session["code_at_end"] == study.source_hash()
    assert not summary["code_changed"]
    point = summary["points"]["base"]
    # Statistics against hand-computed values.
    values = np.array(list(finals.values()))
    s = point["eval"]["pretrain/source_test"]["final"]
    assert s["n"] == 7 and math.isclose(s["mean"], values.mean(), rel_tol=1e-12)
    assert math.isclose(s["std"], values.std(ddof=1), rel_tol=1e-12)
    assert math.isclose(s["spread"], values.max() - values.min(), rel_tol=1e-12)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    k_mean = point["eval"]["pretrain/source_test"]["last_k_mean"]["mean"]
    assert math.isclose(k_mean, np.mean((0.1 + 0.5 + values) / 3), rel_tol=1e-12)
    t = point["eval"]["finetune/target_test"]["final"]
    assert math.isclose(t["mean"], values.mean() - 0.2, rel_tol=1e-12)
    # Variance decomposition: each factor's planted variance, held-others-fixed.
    var = point["variance"]["pretrain/source_test/final"]["factors"]
    assert math.isclose(var["aug"]["variance"], np.var(list(AUG_EFFECT.values()), ddof=1))
    assert math.isclose(var["data"]["variance"], np.var(list(DATA_EFFECT.values()), ddof=1))
    # Attribution: the spike in every run is shared; the fall only where aug=2 is aug's.
    spike, fall = point["attribution"]  # by step: 5, then 8
    assert fall["metric"] == "accuracy/source_test" and fall["runs"] == ["aug2-data0"]
    assert not fall["shared"] and fall["co_varies_with"] == ["aug"]
    assert spike["metric"] == "loss" and spike["shared"] and spike["n_runs"] == 7
    assert set(spike["co_varies_with"]) == {"init", "head", "dropout"}
    assert point["dropoffs"]["rate"]["pretrain/loss"]["rate"] == 1.0
    # Example ids of the batch at step 5, one batch per data seed.
    n = 1400  # digits train split (docs/findings.md)
    by_data = {
        d: [f"aug{a}-data{d}" for a in range(4)] if d == 0 else [f"aug0-data{d}"] for d in range(4)
    }
    for entry in spike["example_ids"]:
        (d,) = [d for d, names in by_data.items() if sorted(names) == sorted(entry["runs"])]
        ids, _ = order.batch_ids(rng.factor_root("data", d), "pretrain", 5, 16, n, "drop")
        assert entry["step"] == 5 and entry["ids"] == [int(i) for i in ids]
    assert len(spike["example_ids"]) == 4
    assert summary["replay"] == {"skipped": "replay disabled"}
    # The report: links resolve, verdicts and numbers are in it.
    md = os.path.join(out, "report.md")
    assert report.broken_links(md) == []
    text = open(md).read()
    assert "they differ from the others in aug" in text and "share the held-fixed factors" in text
    assert "co-occurrence, not a cause" in text
    assert f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f}" in text
    assert json.load(open(os.path.join(out, "summary.json")))["points"]["base"]["n_runs"] == 7


def test_largest_event_is_the_most_severe():
    # A one-batch loss spike of 4x outranks nothing: an accuracy collapse that gave back
    # most of what the phase had learned comes first, whatever the relative changes.
    spike = dict(_event(5, "loss", "spike", 0.5, 2.0), severity=0.06)  # +300%
    fall = dict(_event(3, "accuracy/source_test", "fall", 0.9, 0.45), severity=0.56)  # -50%
    records = [
        {"run": "a", "events": [spike]},
        {"run": "b", "events": [fall, dict(_event(9, "loss", "rise", 1.0, 1.3), severity=0.2)]},
    ]
    record, index, event = study.largest_event(records)
    assert (record["run"], index, event["step"]) == ("b", 0, 3)
    assert study.largest_event(records, metric="loss")[2]["step"] == 9
    nonfinite = _event(1, "loss", "nonfinite", 1.0, 1.0)
    assert study.severity(nonfinite) == dropoff.SEVERITY_CAP  # the first format: computed
    old_fall = _event(3, "accuracy/source_test", "fall", 0.9, 0.45)  # no severity field
    assert study.severity(old_fall) == pytest.approx(0.5)  # half the accuracy it had
    assert study.largest_event([{"run": "c", "events": []}]) is None


# ----------------------------------------------------------------------------- end to end


def _status(out, name):
    path = os.path.join(out, "runs", name, "run.json")
    return jsonio.read_json(path).get("status") if os.path.exists(path) else None


@pytest.fixture(scope="module")
def real_study(data_dir, tmp_path_factory):
    """3 seeds at smoke size: the CLI study killed (-9) after its first run, then resumed."""
    root = tmp_path_factory.mktemp("study")
    # The runs share the compile cache of this test session (conftest), so programs that
    # other tests compiled are not compiled again.
    cache = jax.config.jax_compilation_cache_dir or str(root / "xla")
    out, env = str(root / "s"), {"JAXREPRO_COMPILE_CACHE_DIR": cache}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxrepro",
            "study",
            *CLI_FLAGS,
            f"--config.data.data_dir={data_dir}",
            "--vary=aug",
            "--seeds=0-2",
            f"--out={out}",
            "--keep_checkpoints=all",  # the tests below replay from them
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while _status(out, "aug0") != "done":
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the first run did not finish in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its running run, as a node loss would
    proc.wait()
    proc.stderr.close()
    at_kill = {n: _status(out, n) for n in ("aug0", "aug1", "aug2")}
    first = snapshot(os.path.join(out, "runs", "aug0"))
    summary = study.run_study(
        _config(data_dir), out, vary="aug", seeds="0-2", parallel=2, env=env, keep_checkpoints="all"
    )
    return out, summary, at_kill, first, env


def test_resumed_study_skips_finished_runs(real_study):
    out, summary, at_kill, first, _ = real_study
    session = summary["sessions"][-1]
    assert "aug0" in session["skipped"]
    assert session["launched"] == [n for n, s in at_kill.items() if s not in study.FINISHED]
    assert session["failed"] == [] and summary["missing_runs"] == []
    assert {n: _status(out, n) for n in at_kill} == dict.fromkeys(at_kill, "done")
    after = snapshot(os.path.join(out, "runs", "aug0"))
    for name in ("metrics.jsonl", "run.json", "config.json"):
        assert after[name] == first[name], name


def test_study_figures_report_and_statistics(real_study):
    out, summary, *_ = real_study
    names = {
        "pretrain_loss",
        "finetune_loss",
        "pretrain_source_accuracy",
        "finetune_target_accuracy",
        "final_accuracy",
    }
    assert names <= set(summary["figures"])
    pngs = [f["path"] for f in summary["figures"].values()] + [summary["replay"]["figure"]]
    for rel in pngs:
        data = open(os.path.join(out, rel), "rb").read()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, rel
    md = os.path.join(out, "report.md")
    assert report.broken_links(md) == []
    text = open(md).read()
    for rel in pngs:
        assert f"]({rel})" in text
    # The table's numbers are those of the runs' own metrics files.
    finals = []
    for name in ("aug0", "aug1", "aug2"):
        rows = dropoff.read_metrics(os.path.join(out, "runs", name))
        evals = [
            r
            for r in rows
            if r["kind"] == "eval" and r["split"] == "target_test" and r["phase"] == "finetune"
        ]
        finals.append(evals[-1]["accuracy"])
    s = summary["points"]["base"]["eval"]["finetune/target_test"]["final"]
    assert s["n"] == 3 and math.isclose(s["mean"], float(np.mean(finals)), rel_tol=1e-12)
    assert summary["environment"]["libraries"]["jax"]


def test_study_outputs_hold_no_absolute_path_of_their_directory(real_study):
    """What the study writes names its files relative to OUT (or the replay's directory):
    results can be committed and moved, and carry no path of the machine they ran on."""
    out, summary, *_ = real_study
    replay = os.path.join(out, "runs", summary["replay"]["run"], "replays", "study_largest")
    files = [os.path.join(out, n) for n in ("summary.json", "report.md", "jobs.txt")]
    files += [os.path.join(replay, n) for n in ("replay_summary.json", "run.json")]
    root = os.path.dirname(out)  # the temp dir the study ran in
    for path in files:
        text = open(path).read()
        assert root not in text and os.path.realpath(root) not in text, path
    written = jsonio.read_json(os.path.join(replay, "replay_summary.json"))
    assert written["run"] == os.path.join("..", "..") and written["replay_dir"] == "."
    assert written["figure"] == "replay_overlay.png"
    assert os.path.isfile(os.path.join(replay, written["figure"]))
    assert jsonio.read_json(os.path.join(replay, "run.json"))["replay"]["run"] == written["run"]


def test_study_replays_its_largest_dropoff_exactly(real_study):
    out, summary, *_ = real_study
    events = {
        n: dropoff.load_dropoffs(os.path.join(out, "runs", n)) for n in ("aug0", "aug1", "aug2")
    }
    best = max(
        (study.severity(e), -e["step"], n, i) for n, ev in events.items() for i, e in enumerate(ev)
    )
    r = summary["replay"]
    assert (r["run"], r["dropoff"]) == (best[2], best[3])
    assert r["kind"] == "exact" and r["bitwise_equal"] and r["compared_rows"] > 0
    value = r["event_value"]
    assert value["reproduced"] and value["replayed"] == r["event"]["after"]
    assert r["event_recurs"]


def test_event_files_of_the_killed_and_resumed_study(real_study):
    """Runs killed by the study's SIGKILL and resumed: each point once, as metrics.jsonl."""
    out, summary, *_ = real_study
    for name in ("aug0", "aug1", "aug2"):
        check_event_files(os.path.join(out, "runs", name))
    check_event_files(os.path.join(out, summary["replay"]["replay_dir"]))


def test_results_load_gives_tidy_frames_of_the_study(real_study):
    from jaxrepro import results

    out, *_ = real_study
    r = results.load(out)
    assert r.incomplete == {}
    rows = {n: dropoff.read_metrics(os.path.join(out, "runs", n)) for n in ("aug0", "aug1", "aug2")}
    assert len(r.metrics) == sum(len(v) for v in rows.values())
    assert list(r.metrics.columns[:2]) == ["run", "arm"] and set(r.metrics.arm) == {"base"}
    for name, want in rows.items():
        got = r.metrics[r.metrics.run == name]
        assert set(got.seed_aug) == {int(name[-1])} and set(got.seed_init) == {0}
        assert got.step.tolist() == [w["step"] for w in want]
        assert got.loss.tolist() == [w["loss"] for w in want]
    events = sum(len(dropoff.load_dropoffs(os.path.join(out, "runs", n))) for n in rows)
    assert len(r.events) == events and {"run", "seed_aug", "step", "metric"} <= set(r.events)
    assert r.runs.run.tolist() == ["aug0", "aug1", "aug2"] and set(r.runs.status) == {"done"}


def test_results_load_of_a_half_written_study(real_study, tmp_path):
    """aug0 done, aug1 killed mid-run (a torn last line), aug2 never started."""
    import shutil

    from jaxrepro import results

    out, *_ = real_study
    half = tmp_path / "half"
    shutil.copytree(
        out, half, ignore=shutil.ignore_patterns("checkpoints", "replays", "tb", "aug2")
    )
    run1 = half / "runs" / "aug1"
    info = jsonio.read_json(str(run1 / "run.json"))
    jsonio.write_json(str(run1 / "run.json"), dict(info, status="running"))
    lines = (run1 / "metrics.jsonl").read_text().splitlines()
    (run1 / "metrics.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:7])
    r = results.load(str(half))
    assert set(r.metrics.run) == {"aug0"} and list(r.runs.run) == ["aug0", "aug1"]
    assert r.incomplete == {"aug1": "running", "aug2": "not started"}
    r = results.load(str(half), partial=True)
    assert (r.metrics.run == "aug1").sum() == 10 and r.incomplete["aug1"] == "running"
    with pytest.raises(results.ResultsError, match="neither a jaxrepro study"):
        results.load(str(tmp_path))


def test_rerun_of_a_finished_study_runs_nothing(real_study, data_dir):
    out, _, _, _, env = real_study
    summary = study.run_study(
        _config(data_dir), out, vary="aug", seeds="0-2", env=env, keep_checkpoints="all"
    )
    assert summary["sessions"][-1]["launched"] == []
    assert summary["replay"]["bitwise_equal"]


def test_study_whose_replay_is_not_bitwise_exits_non_zero(
    real_study, data_dir, tmp_path, monkeypatch, capsys
):
    """`jaxrepro study` fails when its exact replay is not bit for bit, naming the run, the
    drop-off and the first differing row, and still writes its report. Here: a copy of the
    study whose replayed run's metrics.jsonl had one loss moved by one ulp after the run."""
    out, summary, _, _, env = real_study
    copy = str(tmp_path / "s")
    shutil.copytree(out, copy)
    r = summary["replay"]
    workdir = os.path.join(copy, "runs", r["run"])
    shutil.rmtree(os.path.join(workdir, "replays"))  # the study replays again
    rows = jsonio.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    target = next(x for x in rows if x["kind"] == "train" and x["step"] >= r["from_step"])
    target["loss"] = math.nextafter(target["loss"], math.inf)
    jsonio.write_jsonl(os.path.join(workdir, "metrics.jsonl"), rows)
    monkeypatch.setenv("JAXREPRO_COMPILE_CACHE_DIR", env["JAXREPRO_COMPILE_CACHE_DIR"])
    flags = types.SimpleNamespace(
        out=copy,
        vary="aug",
        seeds="0-2",
        grid=[],
        parallel=1,
        jobs_only=False,
        keep_checkpoints="all",
    )
    assert study.main_from_flags(flags, _config(data_dir)) == 1
    err = capsys.readouterr().err
    assert f"error: the exact replay of run {r['run']}, drop-off {r['dropoff']} (" in err
    assert f"train row at {target['phase']} step {target['step']} differs in loss" in err
    saved = jsonio.read_json(os.path.join(copy, "summary.json"))["replay"]
    assert saved["bitwise_equal"] is False and saved["first_difference"]["step"] == target["step"]
    assert "NOT bit for bit" in open(os.path.join(copy, "report.md")).read()
    # the untouched study's replay is bitwise: nothing for the job to fail on
    assert study.replay_failure(summary["replay"]) is None


def test_keep_checkpoints_dropoffs_prunes_all_but_the_replayable(real_study, data_dir):
    """Runs last: it deletes checkpoints of the shared study."""
    from jaxrepro import replay
    from jaxrepro.checkpoints import Checkpoints, protected_steps

    out, _, _, _, env = real_study
    before = {}
    for name in ("aug0", "aug1", "aug2"):
        ckpts = Checkpoints(os.path.join(out, "runs", name, "checkpoints"), read_only=True)
        before[name] = ckpts.steps()
        ckpts.close()
    with pytest.raises(ConfigError, match="--keep_checkpoints"):
        study.run_study(_config(data_dir), out, vary="aug", seeds="0-2", keep_checkpoints="none")
    summary = study.run_study(
        _config(data_dir), out, vary="aug", seeds="0-2", env=env, keep_checkpoints="dropoffs"
    )
    assert summary["sessions"][-1]["launched"] == []
    pruned = summary["pruned_checkpoints"]
    assert sum(len(p["deleted"]) for p in pruned.values()) > 0
    for name, steps in before.items():
        workdir = os.path.join(out, "runs", name)
        events = dropoff.load_dropoffs(workdir)
        want = protected_steps(steps, [e["step"] for e in events]) | {steps[-1]}
        assert pruned[name]["kept"] == sorted(want)
        assert sorted(pruned[name]["kept"] + pruned[name]["deleted"]) == steps
        ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
        assert ckpts.steps() == sorted(want)
        ckpts.close()
        for i, e in enumerate(events):  # every drop-off can still be replayed
            if any(s < e["step"] for s in steps):
                assert replay.plan(workdir, dropoff=i)["start"] < e["step"]


def test_log_paths_are_shown_relative_inside_the_current_directory(tmp_path, monkeypatch):
    from jaxrepro.workdir import shown

    monkeypatch.chdir(tmp_path)
    assert shown(str(tmp_path / "runs" / "a")) == os.path.join("runs", "a")
    assert shown("runs/a") == os.path.join("runs", "a")
    assert shown(str(tmp_path)) == "."
    outside = os.path.dirname(str(tmp_path))
    assert shown(outside) == outside  # not ../..: an absolute path outside stays as it is
