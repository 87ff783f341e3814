"""The command line over a real run: dropoffs, replay, audit."""

from __future__ import annotations

import os

import pytest
from helpers import tiny_digits
from test_cli_errors import cli

from jaxrepro import audit
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


def test_audit_reports_bitwise_agreement(data_dir, tmp_path):
    report = audit.audit(tiny_digits(data_dir), steps=6, out=str(tmp_path))
    assert report["ok"], report
    assert report["repeat"]["differing_leaf_count"] == 0
    assert report["kill_and_resume"]["state_bitwise_equal"]
    assert os.path.isfile(tmp_path / "audit.json")
