"""The command line over a real run: dropoffs, replay, audit."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import spy, tiny_digits
from test_cli_errors import cli

from jaxrepro import audit, trajectory
from jaxrepro.errors import JaxreproError
from jaxrepro.plumbing import jsonio, sigkill
from jaxrepro.train import loop


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "run")
    loop.run(tiny_digits(data_dir), path)
    return path


def test_dropoffs_and_exact_replay_from_the_command_line(run_dir, tmp_path):
    r = cli("dropoffs", f"--workdir={run_dir}")
    assert r.returncode == 0 and ("no drop-offs" in r.stdout or "step" in r.stdout)
    r = cli("replay", f"--workdir={run_dir}", "--from_step=9", "--steps=4", "--name=cli")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bit for bit" in r.stdout
    assert os.path.isfile(os.path.join(run_dir, "replays", "cli", "replay_summary.json"))
    r = cli("replay", f"--workdir={run_dir}", "--dropoff=99")
    assert r.returncode == 2 and "error:" in r.stderr
    r = cli("dropoffs", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "not a jaxrepro run" in r.stderr


def test_audit_sigkills_the_training_process_and_resumes_bitwise(data_dir, tmp_path, monkeypatch):
    # the audit's row verdicts are trajectory.compare's
    calls = spy(monkeypatch, trajectory, "compare")
    report = audit.audit(tiny_digits(data_dir), steps=6, out=str(tmp_path))
    assert report["ok"], report
    assert calls == [{"start": 0}, {"start": 0}]  # repeat, kill_and_resume
    assert report["repeat"]["differing_leaf_count"] == 0
    k = report["kill_and_resume"]
    # a real process, dead of a real SIGKILL, past a checkpoint half way and before the end
    assert k["killed"] and k["signal"] == "SIGKILL"
    assert (
        k["process"]["returncode"] == -signal.SIGKILL
        and "jaxrepro.audit" in k["process"]["command"]
    )
    assert k["total_steps"] == 6 and 3 <= k["killed_after_checkpoint"] < 6
    assert k["resumed_from"] == k["killed_after_checkpoint"]
    assert k["metrics_bitwise_equal"] and k["state_bitwise_equal"] and k["missing_rows"] == []
    line = audit.describe_kill(k)
    assert line.startswith(
        "bitwise identical: the training process was SIGKILLed after its checkpoint"
    )
    assert f"at step {k['killed_after_checkpoint']} of 6" in line
    assert json.load(open(tmp_path / "audit.json"))["kill_and_resume"]["signal"] == "SIGKILL"


def test_kill_and_resume_fails_when_nothing_was_killed(data_dir, tmp_path, monkeypatch):
    config = audit.shorten(tiny_digits(data_dir), 6)
    straight = str(tmp_path / "straight")
    loop.run(config, straight)
    # the kill point never comes: the process runs to its end
    monkeypatch.setattr(sigkill, "complete_checkpoints", lambda path: [])
    v = audit.kill_and_resume(config, straight, str(tmp_path / "killed"), str(tmp_path))
    assert not v["killed"] and not v["ok"] and v["process"]["returncode"] == 0
    assert "before it reached a checkpoint at step >= 3 of 6" in v["error"]
    assert audit.describe_kill(v).startswith("NOT CHECKED: the training process finished")


def test_kill_and_resume_refuses_another_process_setup(tmp_path):
    platform = {"backend": "cpu", "device_kind": "cpu", "device_count": 1, "process_count": 1}
    platform.update(cpu_threads=2, xla_flags="")
    for name, extra in (
        ("a", {}),
        ("b", {}),
        ("c", {"cpu_threads": 1}),
        ("d", {"xla_flags": "--x"}),
    ):
        os.makedirs(tmp_path / name)
        jsonio.write_json(str(tmp_path / name / "run.json"), {"platform": dict(platform, **extra)})
    audit.check_same_setup(str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(JaxreproError, match="cpu_threads: recorded 2, here 1"):
        audit.check_same_setup(str(tmp_path / "a"), str(tmp_path / "c"))
    with pytest.raises(JaxreproError, match="xla_flags: recorded '', here '--x'"):
        audit.check_same_setup(str(tmp_path / "a"), str(tmp_path / "d"))
